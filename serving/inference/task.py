"""One task on one model: prepared in a pool, queued on the model's batcher, post-processed in the pool."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from serving.contract import Backend, Item, ObjectTag, Target
from serving.errors import InputError, Overloaded
from serving.inference.call import Call, Failed
from serving.inference.metrics import Metrics
from serving.inference.prepare import task_targets
from serving.inference.slot import ModelSlot

log = logging.getLogger("serving.inference.runtime")  # the runtime's log, as before the split


class Host(Protocol):
    """What a task needs of the runtime: preparation, the interactive answer, metrics."""

    metrics: Metrics

    def _prepare(
        self,
        task: Any,
        obj: ObjectTag,
        backend: Backend,
        context: Mapping[str, Any] | None,
        targets: Sequence[Target] = (),
    ) -> tuple[Item, Any]: ...

    def _interactive(
        self,
        slot: ModelSlot,
        item: Item,
        targets: list[Target],
        context: Mapping[str, Any],
        x: Any,
        deadline: float | None = None,
    ) -> list[dict[str, Any]]: ...


def postprocess(slot: ModelSlot, output: Any, targets: list[Target], item: Item) -> list[dict[str, Any]]:
    """Return the items of every target of one output."""
    items: list[dict[str, Any]] = []
    for target in targets:
        items.extend(slot.backend.postprocess(output, target, item))
    return items


class TaskRun:
    """Task i of a call on one model; `final` holds its regions, or a Failed with the reason it has none.

    The item's room (taken by the caller for a plain call) is given back if it is never queued, and the
    caller's count of it in slot.pending is taken back once it is queued (or has failed).
    """

    def __init__(
        self,
        host: Host,
        call: Call,
        slot: ModelSlot,
        obj: ObjectTag,
        targets: list[Target],
        i: int,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.host, self.call, self.slot, self.obj, self.targets, self.i, self.pool = (
            host,
            call,
            slot,
            obj,
            targets,
            i,
            pool,
        )
        assert slot.batcher is not None
        self.batcher = slot.batcher
        self.plain = call.context is None
        self.final: Future[list[dict[str, Any]]] = Future()

    def start(self) -> Future[list[dict[str, Any]]]:
        """Submit the task's preparation to the pool; return its future."""
        try:
            self.pool.submit(self._prepare_and_queue)
        except RuntimeError:
            self.slot.add_pending(-1)
            if self.plain:
                self.batcher.release(1, self.call.lane)
            self._fail("the server is shutting down")
        return self.final

    def _fail(self, reason: str) -> None:
        if not self.final.done():
            self.final.set_exception(Failed(reason))

    def _prepare_and_queue(self) -> None:
        queued = False
        try:
            x = self._prepared()
            if x is None:
                return
            item, inputs = x
            if not self.plain:
                self._interactive(item, inputs)
                return
            if self.call.expired:
                self._fail(self.call.late)
                return
            bfut = self.batcher.put(inputs, self.call.lane)
            queued = True
            self.call.queued.append(bfut)
            bfut.add_done_callback(lambda f: self._forwarded(f, item))
        finally:
            if self.plain and not queued:
                self.batcher.release(1, self.call.lane)
            # only once the item is queued: the batcher waits for company while some are coming
            self.slot.add_pending(-1)

    def _prepared(self) -> tuple[Item, Any] | None:
        """Return the task's item and model inputs, or None once it has failed."""
        if self.call.expired:
            self._fail(self.call.late)
            return None
        try:
            task = self.call.tasks[self.i]
            # a tag with dynamic labels takes this task's list (prompts, label map) from here on
            self.targets = task_targets(self.targets, task)
            if not self.targets:  # only dynamic-label tags, and this task lists no label for them
                self.final.set_result([])
                return None
            return self.host._prepare(task, self.obj, self.slot.backend, self.call.context, self.targets)
        except InputError as exc:
            self._fail(str(exc))
        except Exception as exc:
            log.exception("preprocess failed for task #%d", self.i)
            self._fail(f"preprocess failed: {type(exc).__name__}: {exc}")
        return None

    def _forwarded(self, bfut: Future[Any], item: Item) -> None:
        if bfut.cancelled():
            self._fail(self.call.late)
            return
        exc = bfut.exception()
        if exc is not None:
            self.host.metrics.errors.labels(self.slot.spec.key, type(exc).__name__).inc()
            self._fail(f"model {self.slot.spec.key} failed: {type(exc).__name__}: {exc}")
            return
        try:
            self.pool.submit(self._post, bfut.result(), item)
        except RuntimeError:  # the pool shut down (server stopping)
            self._fail("the server is shutting down")

    def _post(self, output: Any, item: Item) -> None:
        try:
            self.final.set_result(postprocess(self.slot, output, self.targets, item))
        except InputError as exc:  # a bad prompt found on the model thread
            self._fail(str(exc))
        except Exception as exc:
            log.exception("postprocess failed for task #%d", self.i)
            self._fail(f"postprocess failed: {type(exc).__name__}: {exc}")

    def _interactive(self, item: Item, x: Any) -> None:
        """Answer one interactive item (its prompt) in the calling pool thread."""
        call = self.call
        assert call.context is not None
        try:
            self.final.set_result(
                self.host._interactive(self.slot, item, self.targets, call.context, x, call.deadline)
            )
        except InputError as exc:  # a bad prompt found by interactive() or on the model thread
            self._fail(str(exc))
        except Overloaded as exc:
            self._fail(exc.message)
        except TimeoutError:
            self._fail(call.late)
        except Exception as exc:
            log.exception("postprocess failed for task #%d", self.i)
            self._fail(f"postprocess failed: {type(exc).__name__}: {exc}")
