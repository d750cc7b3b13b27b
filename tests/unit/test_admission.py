"""Admission to a model's queue (issue #32): room in line first come first served, an urgent lane, prompt refusals."""

from __future__ import annotations

import threading
import time

import pytest

from serving.errors import Overloaded
from serving.inference.batching import BULK, URGENT, Batcher


class Gate:
    """A forward that blocks until opened and records each batch."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.batches: list[list[int]] = []

    def __call__(self, batch: list[int]) -> list[int]:
        self.open.wait(10)
        self.batches.append(list(batch))
        return [x * 10 for x in batch]


def _wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)


def test_tickets_get_room_in_the_order_they_came() -> None:
    gate = Gate()
    batcher = Batcher("m", gate, max_batch_size=2, max_wait_ms=0, queue_size=8)
    far = time.monotonic() + 30
    first = batcher.enter(BULK, 10, far)
    second = batcher.enter(BULK, 3, far)
    # 8 places, 2 of them kept for the urgent lane: the first ticket gets 6 now, the second nothing
    assert first.take(far) == 6
    assert second.take(time.monotonic() + 0.05) == 0
    assert batcher.waiting == 4 + 3
    futures = [batcher.put(i) for i in range(6)]
    gate.open.set()
    # as the model takes items, the first ticket is served to the end before the second gets any
    got = 0
    while got < 4:
        got += first.take(far)
    assert got == 4
    later = second.take(far)
    assert later >= 1
    assert [f.result(timeout=5) for f in futures] == [i * 10 for i in range(6)]
    first.leave()
    second.leave()
    batcher.release(got + later)  # room taken for items never queued goes back
    _wait_for(lambda: batcher.held == 0)
    assert batcher.held == 0 and batcher.waiting == 0


def test_the_urgent_lane_has_reserved_room_and_runs_first() -> None:
    gate = Gate()
    batcher = Batcher("m", gate, max_batch_size=2, max_wait_ms=0, queue_size=8)
    far = time.monotonic() + 30
    blocker = batcher.submit(-1)  # the model thread holds this one until the gate opens
    _wait_for(lambda: batcher.depth == 0)
    bulk = batcher.enter(BULK, 20, far)
    assert bulk.take(far) == 8 - 2  # the 2 reserved places stay free
    bulk_futures = [batcher.put(i) for i in range(6)]
    with pytest.raises(Overloaded):
        batcher.submit(99)  # no bulk room without waiting
    urgent = batcher.submit(7, URGENT, far)  # the reserve: no wait
    gate.open.set()
    assert urgent.result(timeout=5) == 70
    assert blocker.result(timeout=5) == -10
    # the urgent item went into the first batch after the one running, ahead of six bulk items
    assert gate.batches[1][0] == 7
    assert [f.result(timeout=5) for f in bulk_futures] == [i * 10 for i in range(6)]
    bulk.leave()


def test_a_request_that_cannot_finish_in_time_is_refused_at_once_with_retry_after() -> None:
    def model(batch: list[int]) -> list[int]:
        time.sleep(0.01)
        return batch

    batcher = Batcher("m", model, max_batch_size=10, max_wait_ms=0, queue_size=1000)
    far = time.monotonic() + 30
    ticket = batcher.enter(BULK, 200, far)
    assert ticket.take(far) == 200
    futures = [batcher.put(i) for i in range(200)]
    assert [f.result(timeout=10) for f in futures] == list(range(200))
    ticket.leave()
    rate = batcher.rate
    assert 100 < rate < 2000  # ~1000 items/s: batches of 10 in 10 ms
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        batcher.enter(BULK, int(rate * 3), time.monotonic() + 1.0)  # ~3 s of work, 1 s left
    assert time.monotonic() - started < 0.05
    assert refused.value.retry_after_s >= 2  # ~3 s of work - 0.9 s usable
    assert "within this request's deadline" in refused.value.message
    # what fits is taken
    batcher.enter(BULK, int(rate * 0.3), time.monotonic() + 1.0).leave()


def test_the_hard_bound_on_waiting_items_refuses_more() -> None:
    gate = Gate()
    batcher = Batcher("m", gate, max_batch_size=1, max_wait_ms=0, queue_size=4, max_waiting=10)
    far = time.monotonic() + 30
    a = batcher.enter(BULK, 10, far)  # 3 get room (1 is reserved), 7 wait
    b = batcher.enter(BULK, 3, far)  # 10 waiting
    with pytest.raises(Overloaded, match="10 items waiting"):
        batcher.enter(BULK, 1, far)
    b.leave()
    assert batcher.waiting == 7
    batcher.enter(BULK, 3, far).leave()
    a.leave()
    assert batcher.held == 0 and batcher.waiting == 0
    gate.open.set()


def test_leaving_gives_untaken_room_to_the_next_in_line() -> None:
    gate = Gate()
    batcher = Batcher("m", gate, max_batch_size=1, max_wait_ms=0, queue_size=4)
    far = time.monotonic() + 30
    first = batcher.enter(BULK, 5, far)  # granted 3 (1 reserved), not taken yet
    second = batcher.enter(BULK, 2, far)
    assert second.take(time.monotonic() + 0.05) == 0
    first.leave()  # e.g. its request failed before preparing anything
    assert second.take(far) == 2
    second.leave()
    batcher.release(2)
    assert batcher.held == 0
    gate.open.set()
