"""The embedding cache: LRU bounded in bytes, hit/miss/eviction counts, one computation per key."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from serving.inference.metrics import Metrics
from serving.util.embeddings import EmbeddingCache, nbytes

MB = 1 << 20


def value(mb: int) -> np.ndarray:
    """Return an array of `mb` MiB."""
    return np.zeros(mb * MB, dtype=np.uint8)


def test_sizes_come_from_nbytes_through_containers_and_dataclasses() -> None:
    """Tensors and arrays count their bytes; lists and dataclasses sum their parts."""

    @dataclass
    class Holder:
        maps: list[torch.Tensor]
        extra: np.ndarray

    t = torch.zeros(2, 3, 4)  # 24 floats
    assert nbytes(t) == 96
    assert nbytes([t, t.half()]) == 96 + 48
    assert nbytes(Holder([t], np.zeros(10, dtype=np.float64))) == 96 + 80


def test_hits_misses_and_lru_eviction_within_the_byte_bound() -> None:
    """Three 4 MiB values in a 10 MiB cache: the least recently used one goes, the bound holds."""
    metrics = Metrics()
    cache = EmbeddingCache(10 * MB, metrics)
    calls: list[str] = []

    def make(name: str) -> np.ndarray:
        calls.append(name)
        return value(4)

    cache.get_or_compute(("m", "a"), lambda: make("a"))
    cache.get_or_compute(("m", "b"), lambda: make("b"))
    cache.get_or_compute(("m", "a"), lambda: make("a"))  # hit: "a" becomes most recent
    assert calls == ["a", "b"]
    cache.get_or_compute(("m", "c"), lambda: make("c"))  # 12 MiB > 10: evicts "b", the LRU
    assert ("m", "b") not in cache and ("m", "a") in cache and ("m", "c") in cache
    assert cache.bytes == 8 * MB <= cache.max_bytes
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 1)
    assert (cache.stats.bytes, cache.stats.entries) == (8 * MB, 2)
    text = metrics.render().decode()
    assert 'lsml_embedding_cache_hits_total{backend="m"} 1.0' in text
    assert 'lsml_embedding_cache_misses_total{backend="m"} 3.0' in text
    assert 'lsml_embedding_cache_evictions_total{backend="m"} 1.0' in text
    assert "lsml_embedding_cache_bytes 8.388608e+06" in text
    assert "lsml_embedding_cache_entries 2.0" in text


def test_a_value_larger_than_the_bound_is_returned_but_not_kept() -> None:
    """An oversized embedding is still answered; the cache stays within its bound."""
    cache = EmbeddingCache(2 * MB)
    got = cache.get_or_compute(("m", "big"), lambda: value(3))
    assert got.nbytes == 3 * MB
    assert len(cache) == 0 and cache.bytes == 0


def test_get_counts_hits_only_and_never_computes() -> None:
    """get() answers cached values (a hit) and None otherwise, without counting a miss."""
    cache = EmbeddingCache(10 * MB)
    assert cache.get(("m", "a")) is None
    cache.put(("m", "a"), value(1))
    assert cache.get(("m", "a")) is not None
    assert (cache.stats.hits, cache.stats.misses) == (1, 0)


def test_concurrent_first_lookups_compute_once() -> None:
    """Eight threads asking for the same missing key at once: one computation, seven hits."""
    cache = EmbeddingCache(10 * MB)
    computed = []
    start = threading.Barrier(8)

    def slow() -> np.ndarray:
        computed.append(1)
        time.sleep(0.2)
        return value(1)

    results: list[np.ndarray] = []

    def ask() -> None:
        start.wait()
        results.append(cache.get_or_compute(("m", "img"), slow))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(computed) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert (cache.stats.misses, cache.stats.hits) == (1, 7)


def test_get_waits_for_a_value_being_computed() -> None:
    """A lookup arriving during the computation gets its value (a hit) instead of None."""
    cache = EmbeddingCache(10 * MB)
    started = threading.Event()

    def slow() -> np.ndarray:
        started.set()
        time.sleep(0.2)
        return value(1)

    worker = threading.Thread(target=cache.get_or_compute, args=(("m", "a"), slow))
    worker.start()
    started.wait(5)
    assert cache.get(("m", "a"), wait_s=0) is None  # not waiting: nothing yet
    assert cache.get(("m", "a"), wait_s=5) is not None
    worker.join(5)
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)


def test_get_many_computes_the_missing_keys_together_and_duplicates_once() -> None:
    """One compute call for all misses (in order), a duplicate key is served by the first."""
    cache = EmbeddingCache(100 * MB)
    cache.put(("m", "a"), value(1))
    batches: list[list[tuple[str, str]]] = []

    def compute(keys: list[tuple[str, str]]) -> list[np.ndarray]:
        batches.append(keys)
        return [np.full(4, ord(k[1][0]), dtype=np.uint8) for k in keys]

    keys = [("m", "b"), ("m", "a"), ("m", "c"), ("m", "b")]
    got = cache.get_many(keys, compute)
    assert batches == [[("m", "b"), ("m", "c")]]
    assert [int(g[0]) for g in got] == [ord("b"), 0, ord("c"), ord("b")]
    assert (cache.stats.misses, cache.stats.hits) == (2, 2)


def test_a_failed_computation_is_not_cached_and_reaches_every_waiter() -> None:
    """The error goes to the caller; the next lookup computes again."""
    cache = EmbeddingCache(10 * MB)

    def boom() -> np.ndarray:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.get_or_compute(("m", "a"), boom)
    assert cache.get_or_compute(("m", "a"), lambda: value(1)).nbytes == MB
    assert cache.stats.misses == 2


def test_zero_bytes_keeps_nothing() -> None:
    """EMBEDDING_CACHE_BYTES=0 turns the cache off: every lookup computes."""
    cache = EmbeddingCache(0)
    n = []
    for _ in range(3):
        cache.get_or_compute(("m", "a"), lambda: n.append(1) or value(1))
    assert len(n) == 3 and len(cache) == 0
