"""A per-process cache of image embeddings: LRU, bounded in bytes, one computation per key.

Promptable models (Segment Anything and the families built on it) spend almost all their time
encoding the image; each prompt then only runs a small decoder. Keeping the encoder's output
per (model, image) turns every click after the first into a decoder call. Values stay where the
model put them (GPU memory on CUDA), so the byte bound is what the cache may hold on the device.

Concurrent callers asking for the same missing key share one computation (a per-key future):
N annotators clicking on a fresh image at once encode it once. The cache never imports torch:
sizes come from each value's `nbytes` (tensors and arrays have it), summed through containers.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model key, image identity)


class CacheMetrics(Protocol):
    """Where the cache's counters go (serving.inference.metrics.Metrics has them all)."""

    @property
    def embedding_hits(self) -> Counter: ...

    @property
    def embedding_misses(self) -> Counter: ...

    @property
    def embedding_evictions(self) -> Counter: ...

    @property
    def embedding_bytes(self) -> Gauge: ...

    @property
    def embedding_entries(self) -> Gauge: ...


def nbytes(value: Any) -> int:
    """Return the bytes a value holds: `nbytes` of tensors/arrays, summed through containers and dataclasses."""
    size = getattr(value, "nbytes", None)
    if isinstance(size, int) and not isinstance(value, type):
        return size
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return sum(nbytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return sys.getsizeof(value)


@dataclasses.dataclass
class CacheStats:
    """Counters of one cache (also exported on /metrics)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class EmbeddingCache:
    """LRU of computed values keyed by (model key, image identity), bounded by `max_bytes` in all.

    A value larger than the whole bound is returned but not kept. `max_bytes=0` keeps nothing (every
    lookup computes; concurrent lookups of one key still share one computation).
    """

    def __init__(self, max_bytes: int, metrics: CacheMetrics | None = None) -> None:
        """Start empty; counters go to `metrics` (labelled by model key) when given."""
        self.max_bytes = max(0, int(max_bytes))
        self._metrics = metrics
        self._entries: OrderedDict[Key, tuple[Any, int]] = OrderedDict()
        self._pending: dict[Key, Future[Any]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    # ---- counters ----
    def _count(self, what: str, key: Key, n: int = 1) -> None:
        setattr(self.stats, what, getattr(self.stats, what) + n)
        if self._metrics is not None:
            {
                "hits": self._metrics.embedding_hits,
                "misses": self._metrics.embedding_misses,
                "evictions": self._metrics.embedding_evictions,
            }[what].labels(key[0]).inc(n)

    def _gauges(self) -> None:
        self.stats.bytes = self._bytes
        self.stats.entries = len(self._entries)
        if self._metrics is not None:
            self._metrics.embedding_bytes.set(self._bytes)
            self._metrics.embedding_entries.set(len(self._entries))

    # ---- lookups ----
    def get(self, key: Key, wait_s: float = 0.0) -> Any | None:
        """Return the cached value (a hit), waiting up to `wait_s` for one being computed; else None.

        None is not counted as a miss: the caller then computes through get_or_compute/get_many,
        which counts it once.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._count("hits", key)
                return entry[0]
            pending = self._pending.get(key)
        if pending is None or wait_s <= 0:
            return None
        try:
            value = pending.result(timeout=wait_s)
        except Exception:  # timed out or the computation failed: the caller computes itself
            return None
        with self._lock:
            self._count("hits", key)
        return value

    def __contains__(self, key: object) -> bool:
        """Return True when a value is cached for key (no counting, no LRU update)."""
        with self._lock:
            return key in self._entries

    def get_or_compute(self, key: Key, compute: Callable[[], Any]) -> Any:
        """Return the cached value, or compute it once however many threads ask at the same time."""
        return self.get_many([key], lambda keys: [compute()])[0]

    def get_many(self, keys: Sequence[Key], compute_many: Callable[[list[Key]], list[Any]]) -> list[Any]:
        """Return one value per key; the missing ones are computed together by one compute_many call.

        Keys another thread is computing are waited for (not computed twice); duplicate keys in
        `keys` are computed once. compute_many must return one value per key it is given, in order.
        """
        mine, futures, found = self._claim(keys)
        if mine:
            self._compute(mine, futures, compute_many)
        for key, future in futures.items():
            if key not in found:
                found[key] = future.result()
        return [found[key] for key in keys]

    def _claim(self, keys: Sequence[Key]) -> tuple[list[Key], dict[Key, Future[Any]], dict[Key, Any]]:
        """Return (the keys this thread computes, a future per key not stored, the stored values)."""
        mine: list[Key] = []
        futures: dict[Key, Future[Any]] = {}
        found: dict[Key, Any] = {}
        seen: set[Key] = set()
        with self._lock:
            for key in keys:
                if key in seen:
                    self._count("hits", key)  # a duplicate in this batch: served by the first one
                    continue
                seen.add(key)
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._count("hits", key)
                    found[key] = entry[0]
                elif key in self._pending:
                    self._count("hits", key)
                    futures[key] = self._pending[key]
                else:
                    self._count("misses", key)
                    future: Future[Any] = Future()
                    self._pending[key] = future
                    futures[key] = future
                    mine.append(key)
        return mine, futures, found

    def _compute(
        self, mine: list[Key], futures: dict[Key, Future[Any]], compute_many: Callable[[list[Key]], list[Any]]
    ) -> None:
        """Compute the claimed keys in one call, store them and resolve their futures (or fail them all)."""
        try:
            values = compute_many(list(mine))
            if len(values) != len(mine):
                raise RuntimeError(f"compute_many returned {len(values)} values for {len(mine)} keys")
        except BaseException as exc:
            with self._lock:
                for key in mine:
                    self._pending.pop(key, None)
            for key in mine:
                futures[key].set_exception(exc)
            raise
        for key, value in zip(mine, values, strict=True):
            self._store(key, value)
            futures[key].set_result(value)

    # ---- storage ----
    def put(self, key: Key, value: Any) -> None:
        """Store a value (replacing any), evicting least recently used entries beyond the bound."""
        self._store(key, value)

    def _store(self, key: Key, value: Any) -> None:
        size = nbytes(value)
        with self._lock:
            self._pending.pop(key, None)
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                if self.max_bytes:
                    log.warning(
                        "embedding of %s (%d bytes) is larger than EMBEDDING_CACHE_BYTES=%d: not kept",
                        key[0],
                        size,
                        self.max_bytes,
                    )
                self._gauges()
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                evicted, (_, evicted_size) = self._entries.popitem(last=False)
                self._bytes -= evicted_size
                self._count("evictions", evicted)
            self._gauges()

    def discard(self, key: Hashable) -> None:
        """Forget one key (no-op when absent)."""
        with self._lock:
            old = self._entries.pop(key, None)  # type: ignore[call-overload]
            if old is not None:
                self._bytes -= old[1]
            self._gauges()

    def clear(self) -> None:
        """Forget every value (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._gauges()

    def __len__(self) -> int:
        """Return the number of cached values."""
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        """Return the bytes held now."""
        with self._lock:
            return self._bytes
