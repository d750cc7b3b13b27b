"""The GPU memory budget: which loaded models stay on the device, least recently used idle ones offloaded.

Every loaded model is either resident (its torch modules on the model device) or offloaded (on the
CPU). Eviction moves a model's modules to CPU memory rather than unloading it: bringing it back is
one copy over PCIe (a second or two for a few GB) instead of a load from disk and the family's set-up,
and a GPU host has far more CPU memory than GPU memory. A model is in use while a forward (or an
interactive call) runs on it, and a model in use is never moved.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from serving.errors import Overloaded
from serving.inference.device import free_cuda_cache
from serving.inference.metrics import Metrics
from serving.settings import Settings

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class _Entry:
    """One loaded model's place in the budget."""

    key: str
    modules: list[Any]
    bytes: int
    device: str
    resident: bool = True
    in_use: int = 0
    last_used: float = 0.0
    busy: Callable[[], bool] = lambda: False  # items queued for it: evicted last


def module_bytes(modules: list[Any]) -> int:
    """Return the bytes of the parameters and buffers of torch modules, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        tensors = list(module.parameters()) + list(module.buffers())
        for t in tensors:
            ptr = t.data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total


def budget_bytes(settings: Settings, device: str) -> int | None:
    """Return the model memory budget on `device`: GPU_MEMORY_BYTES, else GPU_MEMORY_FRACTION of a CUDA device.

    None means no budget (a CPU device without GPU_MEMORY_BYTES): models stay loaded as before.
    """
    if settings.gpu_memory_bytes > 0:
        return settings.gpu_memory_bytes
    if not device.startswith("cuda") or settings.gpu_memory_fraction <= 0:
        return None
    try:
        import torch

        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory * settings.gpu_memory_fraction)
    except Exception as exc:  # no CUDA after all: no budget
        log.warning("GPU memory budget off: %s", exc)
        return None


class Residency:
    """Keep the loaded models' bytes on the device under a budget (LRU offload of idle models)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        self._budget: int | None = None
        self._budget_known = False

    def budget(self, device: str) -> int | None:
        """Return the budget in bytes (decided once, on the first model loaded)."""
        if not self._budget_known:
            self._budget = budget_bytes(self.settings, device)
            self._budget_known = True
            if self._budget is not None:
                log.info("model memory budget on %s: %.2f GiB", device, self._budget / GIB)
        return self._budget

    # ---- loading ----
    def loaded(self, key: str, backend: Any, device: str, busy: Callable[[], bool]) -> str | None:
        """Account a model just loaded; return why it can never fit (None when it can).

        Idle models are offloaded to make room for it; when the models in use hold too much, the new
        one is offloaded itself until it is used (its first batch waits for room).
        """
        budget = self.budget(device)
        if budget is None:
            return None
        modules = find_modules(backend)
        size = module_bytes(modules)
        if size > budget:
            _move(modules, "cpu")
            return (
                f"the model needs {size / GIB:.2f} GiB of GPU memory, more than the whole budget of "
                f"{budget / GIB:.2f} GiB (GPU_MEMORY_FRACTION / GPU_MEMORY_BYTES)"
            )
        with self._cond:
            entry = _Entry(key, modules, size, device, last_used=time.monotonic(), busy=busy)
            self._entries[key] = entry
            if not self._make_room(entry, budget):
                _move(modules, "cpu")
                entry.resident = False
                log.info("model %s loaded and offloaded: the models in use hold the budget", key)
            self._publish()
        return None

    def offload_idle(self) -> bool:
        """Offload every idle resident model (a load ran out of device memory); True when one was."""
        with self._cond:
            idle = [e for e in self._entries.values() if e.resident and e.in_use == 0]
            for e in idle:
                self._offload(e)
            self._publish()
        return bool(idle)

    def forget(self, key: str) -> None:
        """Drop a released model from the accounting."""
        with self._cond:
            self._entries.pop(key, None)
            self._publish()
            self._cond.notify_all()

    # ---- use ----
    @contextmanager
    def using(self, key: str, timeout_s: float | None = None) -> Iterator[None]:
        """Hold a model on its device for one forward (bringing it back first); never evicted meanwhile.

        Raises Overloaded when the models in use keep it from fitting for `timeout_s`.
        """
        entry = self._entries.get(key)
        if entry is None:  # no budget, or not a torch model
            yield
            return
        timeout = self.settings.predict_timeout_s if timeout_s is None else timeout_s
        self._acquire(entry, time.monotonic() + timeout)
        try:
            yield
        finally:
            with self._cond:
                entry.in_use -= 1
                entry.last_used = time.monotonic()
                self._cond.notify_all()

    def reserve(self, key: str, timeout_s: float) -> None:
        """Bring a model onto its device before a request's items are prepared (503 when it cannot fit)."""
        with self.using(key, timeout_s):
            pass

    def _acquire(self, entry: _Entry, deadline: float) -> None:
        budget = self._budget
        with self._cond:
            while not entry.resident:
                if budget is not None and self._make_room(entry, budget):
                    _move(entry.modules, entry.device)
                    entry.resident = True
                    self._publish()
                    log.info("model %s back on %s", entry.key, entry.device)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded(
                        f"model {entry.key} needs {entry.bytes / GIB:.2f} GiB of GPU memory and the models "
                        f"in use hold the budget ({(budget or 0) / GIB:.2f} GiB); retry shortly",
                        retry_after_s=2,
                    )
                self._cond.wait(min(left, 1.0))
            entry.in_use += 1
            entry.last_used = time.monotonic()

    def _make_room(self, entry: _Entry, budget: int) -> bool:
        """Offload idle models, least recently used first (those with work queued last), until `entry` fits."""
        used = sum(e.bytes for e in self._entries.values() if e.resident and e is not entry)
        if used + entry.bytes <= budget:
            return True
        idle = [e for e in self._entries.values() if e.resident and e.in_use == 0 and e is not entry]
        idle.sort(key=lambda e: (e.busy(), e.last_used))
        victims = []
        for e in idle:
            if used + entry.bytes <= budget:
                break
            victims.append(e)
            used -= e.bytes
        if used + entry.bytes > budget:
            return False
        for e in victims:
            self._offload(e)
            log.info("model %s offloaded to CPU memory (%.2f GiB) for %s", e.key, e.bytes / GIB, entry.key)
        return True

    def _offload(self, entry: _Entry) -> None:
        _move(entry.modules, "cpu")
        entry.resident = False
        self.metrics.evictions.labels(entry.key).inc()
        if entry.device.startswith("cuda"):
            free_cuda_cache()

    def _publish(self) -> None:
        resident = [e for e in self._entries.values() if e.resident]
        self.metrics.resident_models.set(len(resident))
        self.metrics.resident_bytes.set(sum(e.bytes for e in resident))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Return {model key: resident, bytes, in_use} (tests and /metrics readers)."""
        with self._cond:
            return {
                e.key: {"resident": e.resident, "bytes": e.bytes, "in_use": e.in_use}
                for e in self._entries.values()
            }


def _move(modules: list[Any], device: str) -> None:
    for module in modules:
        module.to(device)


def find_modules(backend: Any, depth: int = 3) -> list[Any]:
    """Return the torch modules a backend holds: its attributes, and inside its containers and helpers.

    A backend that knows better defines `torch_modules()`; modules are not searched inside (their
    children move with them), each is listed once.
    """
    if "torch" not in sys.modules:  # nothing imported torch: no modules to move
        return []
    custom = getattr(backend, "torch_modules", None)
    if callable(custom):
        return list(custom())
    from torch import nn

    found: dict[int, Any] = {}
    for value in vars(backend).values():
        _walk(value, depth, found, nn.Module)
    return list(found.values())


def _children(value: Any) -> Iterable[Any]:
    """Return what a container or helper object holds (nothing for plain values)."""
    if isinstance(value, (str, bytes, int, float, bool, type(None), type)):
        return ()
    if isinstance(value, dict):
        return value.values()
    if isinstance(value, (list, tuple, set)):
        return value
    return vars(value).values() if hasattr(value, "__dict__") else ()


def _walk(value: Any, level: int, found: dict[int, Any], module_type: type) -> None:
    if isinstance(value, module_type):
        found.setdefault(id(value), value)
    elif level > 0:
        for child in list(_children(value)):
            _walk(child, level - 1, found, module_type)
