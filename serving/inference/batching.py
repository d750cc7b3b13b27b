"""Micro-batcher: one thread owns a model and runs it on batches gathered across requests."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from serving.errors import ForwardLengthError, Overloaded
from serving.inference.device import free_cuda_cache, is_oom

log = logging.getLogger(__name__)

BatchFn = Callable[[list[Any]], list[Any]]


class Batcher:
    """Gather items from many threads into batches of at most max_batch_size for one model thread.

    The queue is bounded: submit() raises Overloaded (HTTP 503 + Retry-After) when it is full.
    A batch that raises is split in halves on out-of-memory, otherwise retried item by item,
    so only the bad item fails. fn must return exactly one output per input (checked).
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
    ) -> None:
        self.name = name
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_ms) / 1000.0)
        self._queue: queue.Queue[tuple[Any, Future[Any]]] = queue.Queue(maxsize=max(1, queue_size))
        self._on_batch = on_batch
        # Tells whether more items are on their way (being decoded for this model). When none are,
        # waiting max_wait_ms for company only adds latency: run the batch now. Under load, items
        # that arrive while the model runs are batched by the next gather anyway.
        self._expecting = expecting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Return the number of items waiting."""
        return self._queue.qsize()

    def submit(self, item: Any) -> Future[Any]:
        """Queue one item; return a future of its output. Raise Overloaded when the queue is full."""
        future: Future[Any] = Future()
        try:
            self._queue.put_nowait((item, future))
        except queue.Full:
            raise Overloaded(
                f"model {self.name} has {self._queue.maxsize} items queued; retry shortly "
                "or raise QUEUE_SIZE / add workers"
            ) from None
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stop the model thread after the items already queued; wait up to `timeout` s for it to end."""
        self._stop.set()
        if timeout is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the model thread is still running."""
        return self._thread.is_alive()

    def _gather(self) -> list[tuple[Any, Future[Any]]]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._expecting is not None and not self._expecting():
                break
            # wait in short slices so a stream that just ended stops the wait early
            slice_s = remaining if self._expecting is None else min(remaining, 0.0005)
            try:
                batch.append(self._queue.get(timeout=slice_s))
            except queue.Empty:
                if self._expecting is None:
                    break
        return batch

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._gather()
            if not batch:
                continue
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._run(live)

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
