"""Micro-batcher: one thread owns a model and runs it on batches gathered across requests.

Admission (issue #32): the queue holds at most `queue_size` items, counted from the moment a request
is given room for an item (before its image is fetched and decoded) until the model thread takes the
item into a batch. A request that finds no room waits for it in line, first come first served, as
long as its deadline allows at the throughput the model thread measures; it is refused (Overloaded,
503 + Retry-After) at once when the wait cannot end in time. Two lanes: URGENT (interactive calls and
small requests) is given room and taken into batches before BULK, and BULK never fills the last
`reserve` places, so a click or a one-task request never waits behind a big import.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from serving.errors import ForwardLengthError, Overloaded
from serving.inference.device import free_cuda_cache, is_oom

log = logging.getLogger(__name__)

BatchFn = Callable[[list[Any]], list[Any]]

URGENT = 0  # interactive calls and small requests
BULK = 1  # everything else: big /predict requests, batch jobs
LANE_NAMES = ("urgent", "bulk")
# An admitted request's estimated finish must fall within this share of the time it has left:
# the rest is for pre- and post-processing, validation and the answer.
ADMIT_MARGIN = 0.9


class Ticket:
    """A request's place in a model's line: room for up to `want` items, granted in order."""

    __slots__ = ("batcher", "entered", "granted", "lane", "left", "taken", "want")

    def __init__(self, batcher: Batcher, lane: int, want: int) -> None:
        self.batcher = batcher
        self.lane = lane
        self.want = want
        self.granted = 0  # room given to this ticket and not yet taken by its request
        self.taken = 0  # room the request has taken (items it may now prepare and queue)
        self.entered = time.monotonic()
        self.left = False

    @property
    def remaining(self) -> int:
        """Return the items still without room."""
        return self.want - self.taken - self.granted

    def take(self, deadline: float) -> int:
        """Wait (until `deadline`, time.monotonic) for room; return how many items may go now (0: deadline)."""
        return self.batcher._take(self, deadline)

    def leave(self) -> None:
        """Give back room granted and not taken, and leave the line (idempotent)."""
        self.batcher._leave(self)


class Batcher:
    """Gather items from many threads into batches of at most max_batch_size for one model thread.

    The queue is bounded (see the module docstring): submit() without a deadline raises Overloaded
    when there is no room; enter() gives a request a place in line. A batch that raises is split in
    halves on out-of-memory, otherwise retried item by item, so only the bad item fails. fn must
    return exactly one output per input (checked).
    """

    def __init__(
        self,
        name: str,
        fn: BatchFn,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        queue_size: int = 1024,
        on_batch: Callable[[str, int, float], None] | None = None,
        expecting: Callable[[], bool] | None = None,
        on_wait: Callable[[str, str, float], None] | None = None,
        max_waiting: int = 0,
    ) -> None:
        self.name = name
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_ms) / 1000.0)
        self.capacity = max(1, int(queue_size))
        # places only URGENT items may fill: a small request never waits behind a big one's items
        self.reserve = min(self.max_batch_size, self.capacity // 4)
        # items allowed to wait for room across requests: the hard bound (their tasks are held)
        self.max_waiting = int(max_waiting) if max_waiting > 0 else 64 * self.capacity
        self._on_batch = on_batch
        self._on_wait = on_wait
        # Tells whether more items are on their way (being decoded for this model). When none are,
        # waiting max_wait_ms for company only adds latency: run the batch now. Under load, items
        # that arrive while the model runs are batched by the next gather anyway.
        self._expecting = expecting
        self._lock = threading.Lock()
        self._items = threading.Condition(self._lock)  # the model thread waits here for items
        self._room = threading.Condition(self._lock)  # requests wait here for room
        self._queues: tuple[deque[tuple[Any, Future[Any]]], ...] = (deque(), deque())
        self._lines: tuple[deque[Ticket], ...] = (deque(), deque())
        self._held = 0  # room in use: items admitted and not yet taken into a batch
        self._running = 0  # items in the forward now
        self._waiting = 0  # items of tickets still without room
        # measured throughput (items/s of the model thread while items were queued), 0 = unknown
        self._rate = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # ---- state ----
    @property
    def depth(self) -> int:
        """Return the number of items queued for the model thread."""
        with self._lock:
            return len(self._queues[URGENT]) + len(self._queues[BULK])

    @property
    def held(self) -> int:
        """Return the room in use: items admitted (being prepared or queued) and not yet in a batch."""
        return self._held

    @property
    def waiting(self) -> int:
        """Return the items of requests waiting for room."""
        return self._waiting

    @property
    def rate(self) -> float:
        """Return the measured throughput in items/s (0 until the first batch)."""
        return self._rate

    @property
    def alive(self) -> bool:
        """Whether the model thread is still running."""
        return self._thread.is_alive()

    # ---- admission ----
    def estimate_s(self, n: int, lane: int = BULK) -> float:
        """Return the seconds until `n` more items of `lane` would be through the model (0 = unknown)."""
        with self._lock:
            return self._estimate_locked(n, lane)

    def _estimate_locked(self, n: int, lane: int) -> float:
        if self._rate <= 0:
            return 0.0
        ahead = self._held + self._running + sum(t.remaining for t in self._lines[URGENT])
        if lane == BULK:
            ahead += sum(t.remaining for t in self._lines[BULK])
        return (ahead + n) / self._rate

    def enter(self, lane: int, n: int, deadline: float) -> Ticket:
        """Return a place in line for `n` items; raise Overloaded when they cannot be through by `deadline`.

        Refused when the measured throughput says the wait would end too late (Retry-After: when it
        would not), or when more than max_waiting items would wait (the hard bound).
        """
        with self._lock:
            left = deadline - time.monotonic()
            estimate = self._estimate_locked(n, lane)
            if estimate > ADMIT_MARGIN * left:
                retry = max(1, min(300, math.ceil(estimate - ADMIT_MARGIN * left)))
                raise Overloaded(
                    f"model {self.name} cannot take {n} more items within this request's deadline "
                    f"({left:.0f} s left; about {estimate:.0f} s of work queued at {self._rate:.0f} items/s); "
                    f"retry in {retry} s",
                    retry_after_s=retry,
                )
            if self._waiting + n > self.max_waiting + self._free_locked(lane):
                raise Overloaded(
                    f"model {self.name} has {self._waiting} items waiting for room (limit "
                    f"{self.max_waiting}); retry shortly or raise QUEUE_SIZE / add workers",
                    retry_after_s=max(1, math.ceil(self._waiting / self._rate)) if self._rate else 1,
                )
            ticket = Ticket(self, lane, n)
            self._lines[lane].append(ticket)
            self._waiting += n
            self._grant_locked()
            return ticket

    def _free_locked(self, lane: int) -> int:
        limit = self.capacity if lane == URGENT else self.capacity - self.reserve
        return max(0, limit - self._held)

    def _grant_locked(self) -> None:
        """Give free room to the tickets at the head of each line, URGENT first."""
        granted = False
        for lane in (URGENT, BULK):
            line = self._lines[lane]
            while line:
                free = self._free_locked(lane)
                if free <= 0:
                    break
                ticket = line[0]
                n = min(free, ticket.remaining)
                ticket.granted += n
                self._held += n
                self._waiting -= n
                granted = True
                if ticket.remaining == 0:
                    line.popleft()
        if granted:
            self._room.notify_all()

    def _take(self, ticket: Ticket, deadline: float) -> int:
        with self._lock:
            while ticket.granted == 0 and not ticket.left:
                if ticket.remaining == 0:
                    return 0
                left = deadline - time.monotonic()
                if left <= 0:
                    return 0
                self._room.wait(left)
            n, ticket.granted = ticket.granted, 0
            ticket.taken += n
            done = ticket.remaining == 0
        if done and self._on_wait is not None:
            self._on_wait(self.name, LANE_NAMES[ticket.lane], time.monotonic() - ticket.entered)
        return n

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.left:
                return
            ticket.left = True
            unmet = ticket.remaining
            if unmet:
                self._lines[ticket.lane].remove(ticket)
                self._waiting -= unmet
            self._held -= ticket.granted
            ticket.want, ticket.granted = ticket.taken, 0
            self._grant_locked()

    def release(self, n: int = 1) -> None:
        """Give back room taken for items that will not be queued (preparation failed, deadline)."""
        with self._lock:
            self._held -= n
            self._grant_locked()

    def put(self, item: Any, lane: int = BULK) -> Future[Any]:
        """Queue an item whose room its request has taken (Ticket.take); return a future of its output."""
        future: Future[Any] = Future()
        with self._lock:
            self._queues[lane].append((item, future))
            self._items.notify()
        return future

    def submit(self, item: Any, lane: int = BULK, deadline: float | None = None) -> Future[Any]:
        """Queue one item; return a future of its output.

        Without a deadline, raise Overloaded when there is no room now; with one, wait in line for
        room until then (Overloaded when the wait cannot end in time).
        """
        if deadline is None:
            with self._lock:
                if self._lines[lane] or (lane == BULK and self._lines[URGENT]) or not self._free_locked(lane):
                    raise Overloaded(
                        f"model {self.name} has {self.capacity} items queued; retry shortly "
                        "or raise QUEUE_SIZE / add workers"
                    )
                self._held += 1
            return self.put(item, lane)
        ticket = self.enter(lane, 1, deadline)
        try:
            if not ticket.take(deadline):
                raise Overloaded(f"model {self.name}: no room in its queue before the deadline")
        finally:
            ticket.leave()
        return self.put(item, lane)

    def close(self, timeout: float | None = None) -> None:
        """Stop the model thread after the items already queued; wait up to `timeout` s for it to end."""
        self._stop.set()
        with self._lock:
            self._items.notify()
        if timeout is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the model thread ----
    def _pop_locked(self, n: int) -> list[tuple[Any, Future[Any]]]:
        """Take up to n queued items, URGENT first; their room goes to the next in line."""
        out: list[tuple[Any, Future[Any]]] = []
        for queue in self._queues:
            while queue and len(out) < n:
                out.append(queue.popleft())
        if out:
            self._held -= len(out)
            self._running += len(out)
            self._grant_locked()
        return out

    def _has_items(self) -> bool:
        return bool(self._queues[URGENT] or self._queues[BULK])

    def _gather(self) -> tuple[list[tuple[Any, Future[Any]]], bool]:
        """Return a batch and whether items were left queued behind it (the model is the bottleneck)."""
        with self._lock:
            if not self._items.wait_for(self._has_items, timeout=0.1):
                return [], False
            batch = self._pop_locked(self.max_batch_size)
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if self._has_items():
                    batch += self._pop_locked(self.max_batch_size - len(batch))
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._expecting is not None and not self._expecting():
                    break
                # wait in short slices so a stream that just ended stops the wait early
                slice_s = remaining if self._expecting is None else min(remaining, 0.0005)
                if not self._items.wait(slice_s) and self._expecting is None:
                    break
            return batch, self._has_items()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stop.is_set() and not self._has_items():
                    return
            batch, backlog = self._gather()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
                if live:
                    self._run(live)
            finally:
                with self._lock:
                    self._running -= len(batch)
            if live:
                self._measure(len(live), time.perf_counter() - started, backlog)

    def _measure(self, n: int, seconds: float, backlog: bool) -> None:
        """Update the throughput estimate: batches run with items queued behind them count most."""
        if seconds <= 0:
            return
        sample = n / seconds
        if self._rate <= 0:
            self._rate = sample
        elif backlog or sample > self._rate:
            # under load the model runs full batches: that is the rate a waiting request gets
            self._rate = 0.8 * self._rate + 0.2 * sample

    def _call(self, items: list[Any]) -> list[Any]:
        started = time.perf_counter()
        outputs = self.fn(items)
        if not isinstance(outputs, list | tuple) or len(outputs) != len(items):
            got = len(outputs) if isinstance(outputs, list | tuple) else type(outputs).__name__
            raise ForwardLengthError(
                f"{self.name}.forward returned {got} outputs for {len(items)} inputs; "
                "forward must return exactly one output per input"
            )
        if self._on_batch is not None:
            self._on_batch(self.name, len(items), time.perf_counter() - started)
        return list(outputs)

    def _run(self, batch: list[tuple[Any, Future[Any]]]) -> None:
        items = [item for item, _ in batch]
        try:
            outputs = self._call(items)
        except BaseException as exc:  # isolate failures: only the bad item may fail
            if len(batch) == 1:
                log.warning("model %s failed on one item: %s", self.name, exc)
                batch[0][1].set_exception(exc)
                return
            if is_oom(exc):
                log.warning("model %s out of memory on a batch of %d: splitting", self.name, len(batch))
                free_cuda_cache()
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            log.warning(
                "model %s failed on a batch of %d (%s): retrying one by one", self.name, len(batch), exc
            )
            for pair in batch:
                self._run([pair])
            return
        for (_, future), output in zip(batch, outputs, strict=True):
            future.set_result(output)
