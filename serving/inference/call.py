"""One predict call's state, and the answer each of its tasks gets (its valid regions or its failure)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from serving.inference.batching import BULK
from serving.inference.metrics import Metrics
from serving.results.regions import prediction_score

log = logging.getLogger("serving.inference.runtime")  # the runtime's log, as before the split


@dataclass
class TaskFailure:
    """Why one task got an empty (or partial) result."""

    index: int
    task_id: Any
    reason: str


@dataclass
class Call:
    """One predict call: its tasks, the interactive context (None for a plain call), per-task results and reasons."""

    tasks: Sequence[Any]
    context: Mapping[str, Any] | None
    deadline: float
    timeout_s: float
    results: list[list[dict[str, Any]]] = field(init=False)
    reasons: dict[int, str] = field(default_factory=dict)
    prompt_needed: set[int] = field(default_factory=set)  # answered without a result: a click is the input
    lane: int = BULK  # the batchers' lane: URGENT for interactive calls and small requests
    expired: bool = False  # the deadline passed: items not yet queued are dropped
    queued: list[Future[Any]] = field(default_factory=list)  # batcher futures, cancelled at the deadline

    def __post_init__(self) -> None:
        self.results = [[] for _ in self.tasks]

    @property
    def late(self) -> str:
        """Return the reason of a task whose prediction missed the deadline."""
        return f"prediction did not finish within its deadline ({self.timeout_s:g} s, PREDICT_TIMEOUT_S)"

    def fail_all(self, reason: str, prompt: bool = False) -> None:
        """Give every task this reason unless it has one already."""
        for i in range(len(self.tasks)):
            self.reasons.setdefault(i, reason)
            if prompt:
                self.prompt_needed.add(i)

    def collect(self, finals: list[tuple[int, Future[list[dict[str, Any]]]]]) -> None:
        """Collect each task's regions until the deadline; past it, what is done is still answered."""
        for i, final in finals:
            wait = 0.0 if self.expired else max(0.1, self.deadline - time.monotonic())
            try:
                self.results[i].extend(final.result(timeout=wait))
            except TimeoutError:
                if not self.expired:
                    # Past the deadline: what is queued is skipped by the batcher (cancelled), not
                    # run for a request that stopped waiting; what is not yet prepared is dropped.
                    self.expired = True
                    for bfut in list(self.queued):
                        bfut.cancel()
                self.reasons.setdefault(i, self.late)
            except Failed as exc:
                self.reasons.setdefault(i, exc.reason)


class Failed(Exception):
    """A task's item got no regions: the reason its entry carries."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def answer(
    call: Call, i: int, schema: Any, version: str, failures: list[TaskFailure] | None, metrics: Metrics
) -> dict[str, Any]:
    """Return task i's prediction: its regions that pass the config's checks, or its failure."""
    task = call.tasks[i] if isinstance(call.tasks[i], Mapping) else {}
    items = call.results[i]
    if schema is not None and items:
        items, problems = _filter_valid(schema, items, task.get("data"), i)
        if problems:
            metrics.regions_dropped.labels("all").inc(len(problems))
    reason = call.reasons.get(i)
    if reason is None:
        metrics.tasks.labels("ok").inc()
        return {"result": items, "score": prediction_score(items), "model_version": version}
    task_id = task.get("id")
    if failures is not None:
        failures.append(TaskFailure(i, task_id, reason))
    if i in call.prompt_needed:  # expected (a Data Manager page lists many): not a failure
        log.debug("task %s (#%d): %s", task_id, i, reason)
        metrics.tasks.labels("prompt_needed").inc()
    else:
        log.warning("task %s (#%d): %s", task_id, i, reason)
        metrics.tasks.labels("failed" if not items else "partial").inc()
    if call.context is not None:
        return {"result": [], "score": 0.0, "model_version": version, "error": reason}
    # a partial result is not kept either: stored, it would never be completed
    return {"model_version": version, "error": reason}


def config_schema(label_config: str) -> Any:
    """Return the config's schema (parsed once per config by the SDK) the answers are checked against."""
    from serving.results.schema import ConfigSchema

    return ConfigSchema.from_config(label_config)


def _filter_valid(
    schema: Any, items: list[dict[str, Any]], data: Any, index: int
) -> tuple[list[dict[str, Any]], list[Any]]:
    from serving.results.validation.checks import filter_valid

    return filter_valid(schema, items, data if isinstance(data, Mapping) else None, index)
