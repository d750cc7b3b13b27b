"""What a job predicts with: the in-process runtime, or any function of (label_config, tasks) (a server over HTTP).

`JobRunner` sees only the small `Predictor` protocol: predict one chunk (collecting per-task
failures, within a chunk's own deadline), wait until a config's models are loaded, refuse a config
that cannot be served before a job is created.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from serving.inference.runtime import Runtime, TaskFailure
from serving.jobs.store import JobFailed

# A plain predict function: (label_config, tasks) -> one prediction per task, in order.
PredictFn = Callable[[str, list[dict[str, Any]]], list[dict[str, Any]]]


@runtime_checkable
class Predictor(Protocol):
    """What a job runner predicts with."""

    def predict(
        self, label_config: str, tasks: list[dict[str, Any]], failures: list[TaskFailure], timeout_s: float
    ) -> list[dict[str, Any]]:
        """Return one prediction per task, in order; append the reason of each failed task to `failures`."""
        ...

    def ready(self, label_config: str, timeout_s: float, stop: threading.Event) -> None:
        """Return once the config's models can answer; raise JobFailed when they cannot (or `stop` is set)."""
        ...

    def check(self, label_config: str) -> None:
        """Raise ConfigError/ModelUnavailable when the config cannot be served here."""
        ...


class RuntimePredictor:
    """A Predictor over the in-process runtime (the server's jobs, the CLI, each Ray actor)."""

    def __init__(self, runtime: Runtime) -> None:
        """Predict with `runtime`."""
        self.runtime = runtime

    def predict(
        self, label_config: str, tasks: list[dict[str, Any]], failures: list[TaskFailure], timeout_s: float
    ) -> list[dict[str, Any]]:
        """Predict a chunk with its own deadline (not Label Studio's 100 s /predict timeout)."""
        return self.runtime.predict(label_config, tasks, failures=failures, timeout_s=timeout_s)

    def ready(self, label_config: str, timeout_s: float, stop: threading.Event) -> None:
        """Wait for the config's models (a job must not fail while a model still loads)."""
        plan = self.runtime.plan(label_config)
        self.runtime.check(plan)
        deadline = time.monotonic() + timeout_s
        for spec in plan.specs:
            slot = self.runtime.slot(spec)
            while not slot.ready.wait(0.5):
                if stop.is_set() or time.monotonic() > deadline:
                    raise JobFailed(f"model {spec.key} did not finish loading in {timeout_s:.0f} s")
            if slot.failed:
                raise JobFailed(f"model {spec.key} is {slot.state}")

    def check(self, label_config: str) -> None:
        """Plan the config and start loading its models; raise when one cannot load."""
        self.runtime.check(self.runtime.plan(label_config))


class FunctionPredictor:
    """A Predictor over a plain predict function: failures come back as entries without "result"."""

    def __init__(self, fn: PredictFn) -> None:
        """Predict with `fn(label_config, tasks)`."""
        self.fn = fn

    def predict(
        self, label_config: str, tasks: list[dict[str, Any]], failures: list[TaskFailure], timeout_s: float
    ) -> list[dict[str, Any]]:
        """Call the function (it has its own deadline, e.g. an HTTP timeout)."""
        return self.fn(label_config, tasks)

    def ready(self, label_config: str, timeout_s: float, stop: threading.Event) -> None:
        """Nothing to wait for here (a server loads its own models)."""

    def check(self, label_config: str) -> None:
        """Nothing to check here (the config itself is parsed by the job manager)."""


def as_predictor(source: Predictor | Runtime | PredictFn) -> Predictor:
    """Return a Predictor for a runtime, a Predictor, or a plain predict function."""
    if isinstance(source, Runtime):
        return RuntimePredictor(source)
    if isinstance(source, Predictor):
        return source
    return FunctionPredictor(source)
