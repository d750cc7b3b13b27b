"""A model slot: one model of a process, loaded once in the background, and the batcher that owns it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.contract import Backend, ModelSpec
from serving.inference.batching import Batcher
from serving.inference.device import free_cuda_cache, is_oom, torch_context
from serving.inference.metrics import Metrics
from serving.inference.residency import Residency
from serving.settings import Settings

log = logging.getLogger(__name__)

# One model loads at a time in a process: transformers' from_pretrained patches torch globally while
# it builds a model (default dtype, meta-device construction, init functions), so two loads in
# parallel threads corrupt each other ("Cannot copy out of meta tensor"; seen with Grounded-SAM's
# detector and the interactive SAM family of one config loading at once).
_LOAD_LOCK = threading.Lock()


@dataclass
class ModelSlot:
    """One loaded (or loading, or failed) model and the batcher that owns it."""

    spec: ModelSpec
    backend: Backend
    state: str = "idle"  # idle | loading | ready | unavailable: <why>
    ready: threading.Event = field(default_factory=threading.Event)
    batcher: Batcher | None = None
    load_seconds: float = 0.0
    pending: int = 0  # items being decoded for this model, across requests
    pending_lock: threading.Lock = field(default_factory=threading.Lock)

    def add_pending(self, delta: int) -> None:
        """Count items in preparation (the batcher waits for company only while some are)."""
        with self.pending_lock:
            self.pending += delta

    def expecting(self) -> bool:
        """Return True while items for this model are still being prepared."""
        return self.pending > 0

    @property
    def failed(self) -> bool:
        """Return True when the model cannot serve."""
        return self.state.startswith("unavailable")

    def load(self, device: str, settings: Settings, metrics: Metrics, residency: Residency) -> None:
        """Load the model on `device` and start the batcher that owns it (in the slot's load thread)."""
        started = time.perf_counter()
        backend = self.backend
        try:
            self._load_backend(device, residency)
            backend.device = getattr(backend, "device", None) or device
            self.batcher = Batcher(
                self.spec.key,
                _forward_fn(self.spec.key, backend, device, settings.fp16 and type(backend).fp16, residency),
                max_batch_size=settings.max_batch_size or type(backend).max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                queue_size=settings.queue_size,
                on_batch=metrics.observe_batch,
                expecting=self.expecting,
                on_wait=metrics.observe_wait,
                max_waiting=settings.max_waiting_items,
            )
            batcher = self.batcher
            reason = residency.loaded(self.spec.key, backend, device, lambda: batcher.depth > 0)
            if reason:
                batcher.close()
                self.state = f"unavailable: {reason}"
                return
            self.state = "ready"
            self.load_seconds = time.perf_counter() - started
            log.info("model %s ready on %s in %.1f s", self.spec.key, device, self.load_seconds)
        except Exception as exc:
            self.state = f"unavailable: load failed: {str(exc)[:300]}"
            metrics.errors.labels(self.spec.key, "load").inc()
            log.exception("model %s failed to load", self.spec.key)
        finally:
            self.ready.set()

    def _load_backend(self, device: str, residency: Residency) -> None:
        """Load the weights; out of device memory, offload every idle model and try once more."""
        with _LOAD_LOCK:
            try:
                self.backend.load(device)
            except Exception as exc:
                if not is_oom(exc) or not residency.offload_idle():
                    raise
                free_cuda_cache()
                log.warning(
                    "model %s: out of memory while loading; idle models offloaded, loading again",
                    self.spec.key,
                )
                self.backend.load(device)


def _forward_fn(
    key: str, backend: Backend, device: str, fp16: bool, residency: Residency
) -> Callable[[list[Any]], list[Any]]:
    """Return the batcher's forward: the backend's, on the device (within the budget), under its lock and autocast."""

    def run(batch: list[Any]) -> list[Any]:
        with residency.using(key), backend.lock, torch_context(device, fp16):
            return backend.forward(batch)

    return run
