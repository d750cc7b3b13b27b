"""The micro-batcher: merging across threads, failure isolation, bounded queue, length check."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.errors import ForwardLengthError, Overloaded
from serving.inference.batching import Batcher


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay

    def __call__(self, batch: list[int]) -> list[int]:
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        if any(x < 0 for x in batch):
            raise ValueError("negative input")
        return [x * 10 for x in batch]


def test_concurrent_requests_are_merged_into_one_forward() -> None:
    model = Recorder(delay=0.05)
    batcher = Batcher("m", model, max_batch_size=32, max_wait_ms=50)
    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(lambda x: batcher.submit(x).result(timeout=5), range(16)))
    assert outputs == [x * 10 for x in range(16)]
    assert sum(model.sizes) == 16
    assert max(model.sizes) >= 8  # 16 clients, not 16 forwards


def test_batches_never_exceed_max_batch_size() -> None:
    model = Recorder()
    batcher = Batcher("m", model, max_batch_size=4, max_wait_ms=20)
    futures = [batcher.submit(i) for i in range(10)]
    assert [f.result(timeout=5) for f in futures] == [i * 10 for i in range(10)]
    assert max(model.sizes) <= 4


def test_a_bad_item_fails_alone() -> None:
    model = Recorder()
    batcher = Batcher("m", model, max_batch_size=8, max_wait_ms=50)
    futures = [batcher.submit(x) for x in (1, 2, -1, 4)]
    assert futures[0].result(timeout=5) == 10
    assert futures[1].result(timeout=5) == 20
    with pytest.raises(ValueError, match="negative"):
        futures[2].result(timeout=5)
    assert futures[3].result(timeout=5) == 40


def test_out_of_memory_batches_are_split_and_retried() -> None:
    sizes: list[int] = []

    def fn(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch

    batcher = Batcher("m", fn, max_batch_size=8, max_wait_ms=50)
    futures = [batcher.submit(i) for i in range(8)]
    assert [f.result(timeout=5) for f in futures] == list(range(8))
    assert sizes[0] == 8
    assert max(sizes[1:]) <= 4 and sizes.count(2) == 4


def test_real_torch_oom_error_type_is_recognised() -> None:
    torch = pytest.importorskip("torch")
    seen: list[int] = []

    def fn(batch: list[int]) -> list[int]:
        seen.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("fake OOM")
        return batch

    batcher = Batcher("m", fn, max_batch_size=4, max_wait_ms=50)
    futures = [batcher.submit(i) for i in range(4)]
    assert [f.result(timeout=5) for f in futures] == [0, 1, 2, 3]
    assert seen[:3] == [4, 2, 1]


def test_wrong_output_count_is_an_error_naming_forward() -> None:
    batcher = Batcher("m", lambda batch: batch[:-1], max_batch_size=1, max_wait_ms=1)
    with pytest.raises(ForwardLengthError, match=r"m.forward returned 0 outputs for 1 inputs"):
        batcher.submit(1).result(timeout=5)


def test_full_queue_raises_overloaded() -> None:
    gate = threading.Event()

    def slow(batch: list[int]) -> list[int]:
        gate.wait(5)
        return batch

    batcher = Batcher("m", slow, max_batch_size=1, max_wait_ms=0, queue_size=2)
    first = batcher.submit(0)
    time.sleep(0.2)  # the model thread took item 0 and is blocked on it
    batcher.submit(1)
    batcher.submit(2)
    with pytest.raises(Overloaded):
        batcher.submit(3)
    gate.set()
    assert first.result(timeout=5) == 0


def test_no_wait_for_company_when_nothing_else_is_coming() -> None:
    model = Recorder()
    batcher = Batcher("m", model, max_batch_size=8, max_wait_ms=2000, expecting=lambda: False)
    started = time.perf_counter()
    assert batcher.submit(3).result(timeout=5) == 30
    assert time.perf_counter() - started < 0.5  # not the 2 s max wait


def test_waits_for_items_still_being_prepared() -> None:
    model = Recorder()
    coming = threading.Event()
    coming.set()
    batcher = Batcher("m", model, max_batch_size=8, max_wait_ms=2000, expecting=coming.is_set)
    first = batcher.submit(1)
    time.sleep(0.1)
    second = batcher.submit(2)
    coming.clear()
    assert (first.result(timeout=5), second.result(timeout=5)) == (10, 20)
    assert model.sizes == [2]


def test_close_finishes_queued_items_and_waits_for_the_thread() -> None:
    """close(timeout) lets the forward in progress and the queued items finish, then the thread ends."""
    model = Recorder(delay=0.05)
    batcher = Batcher("m", model, max_batch_size=2, max_wait_ms=1)
    futures = [batcher.submit(i) for i in range(4)]
    batcher.close(timeout=5)
    assert not batcher.alive
    assert [f.result(timeout=0) for f in futures] == [0, 10, 20, 30]


def test_close_without_timeout_does_not_wait() -> None:
    """A bare close() only asks the thread to stop: a slow forward does not hold the caller."""
    model = Recorder(delay=0.5)
    batcher = Batcher("m", model, max_batch_size=1, max_wait_ms=1)
    future = batcher.submit(1)
    time.sleep(0.1)  # the forward has started
    started = time.perf_counter()
    batcher.close()
    assert time.perf_counter() - started < 0.2
    assert batcher.alive
    assert future.result(timeout=5) == 10
    batcher.close(timeout=5)
    assert not batcher.alive
