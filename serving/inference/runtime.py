"""The runtime: loads each model once per process, owns devices and batchers, runs predictions."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from serving.contract import Backend, Item, ModelSpec, ObjectTag, Target
from serving.errors import InputError, ModelUnavailable, Overloaded
from serving.fetch.local import build_resolver
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import Resolver
from serving.inference.device import pick_device
from serving.inference.metrics import Metrics
from serving.inference.prepare import prepare
from serving.inference.slot import ModelSlot
from serving.plan.planner import Plan, Planner
from serving.plan.version import plan_version
from serving.results.regions import prediction_score
from serving.settings import Settings
from serving.util.embeddings import EmbeddingCache

log = logging.getLogger(__name__)


@dataclass
class TaskFailure:
    """Why one task got an empty (or partial) result."""

    index: int
    task_id: Any
    reason: str


@dataclass
class _Call:
    """One predict call: its tasks, the interactive context (None for a plain call), per-task results and reasons."""

    tasks: Sequence[Any]
    context: Mapping[str, Any] | None
    deadline: float
    timeout_s: float
    results: list[list[dict[str, Any]]] = field(init=False)
    reasons: dict[int, str] = field(default_factory=dict)
    prompt_needed: set[int] = field(default_factory=set)  # answered without a result: a click is the input

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


# (task index, model slot, its targets, the preparation's future) and the later stages' tuples
_Preparing = tuple[int, ModelSlot, list[Target], Future[tuple[Item, Any]]]
_Forwarded = tuple[int, ModelSlot, list[Target], Item, Future[Any]]
_Posting = tuple[int, Future[list[dict[str, Any]]]]


class Runtime:
    """Plan configs, load models in the background, and predict tasks in order."""

    def __init__(
        self,
        settings: Settings,
        families: Mapping[str, type[Backend]],
        resolver: Resolver | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.planner = Planner(self.settings, families)
        self.families = self.planner.families
        self.metrics = metrics or Metrics()
        self._resolver = resolver
        self._slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        self._device: str | None = None
        self._pool = ThreadPoolExecutor(max(1, self.settings.preprocess_threads), thread_name_prefix="prep")
        # Warms the embedding of a task Label Studio just opened (interactive-only families): two
        # threads, so a model still loading holds at most these, never the request pool.
        self._prefetch_pool = ThreadPoolExecutor(2, thread_name_prefix="prefetch")
        self._prefetching = 0
        # Image embeddings of promptable models, shared by every model of this process (one bound).
        self.embeddings = EmbeddingCache(self.settings.embedding_cache_bytes, self.metrics)
        # The SDK's config parser takes ~1.5 s to import: do it off the request path so the
        # first /setup (Label Studio waits 3 s) answers in milliseconds.
        threading.Thread(target=_preimport, name="preimport", daemon=True).start()

    # ---- set-up ----
    @property
    def resolver(self) -> Resolver:
        """Return the data resolver, set once: the one given, else built on first use (start-up stays fast).

        The built one reads file:// task data under BATCH_INPUT_ROOT (batch jobs over a server-side folder).
        """
        if self._resolver is None:
            # under the lock: concurrent first calls must share one client (one token exchange)
            with self._lock:
                if self._resolver is None:
                    root = self.settings.batch_input_root
                    self._resolver = build_resolver(self.settings, [root] if root else [])
        return self._resolver

    @property
    def client(self) -> LabelStudioClient | None:
        """Return the Label Studio client the resolver fetches with (None for resolvers without one)."""
        return getattr(self.resolver, "client", None)

    @property
    def device(self) -> str:
        """Return the device models run on (decided on first load, in a background thread)."""
        if self._device is None:
            self._device = pick_device(self.settings)
        return self._device

    def plan(self, label_config: str) -> Plan:
        """Return the cached plan of a labeling config."""
        return self.planner.plan(label_config)

    def family(self, spec: ModelSpec) -> type[Backend]:
        """Return the Backend class of a spec's family."""
        return self.families[spec.family]

    def slot(self, spec: ModelSpec, start: bool = True) -> ModelSlot:
        """Return the slot of a model, creating it and starting its background load once."""
        with self._lock:
            slot = self._slots.get(spec.key)
            if slot is None:
                cls = self.family(spec)
                slot = ModelSlot(spec=spec, backend=cls(spec, self.settings))
                slot.backend.embeddings = self.embeddings
                reason = None
                try:
                    reason = cls.availability(spec, self.settings)
                except Exception as exc:
                    reason = f"availability check failed: {exc}"
                if reason:
                    slot.state = f"unavailable: {reason}"
                    slot.ready.set()
                self._slots[spec.key] = slot
            if start and slot.state == "idle":
                slot.state = "loading"
                threading.Thread(
                    target=self._load, args=(slot,), name=f"load-{spec.key}", daemon=True
                ).start()
        return slot

    def _load(self, slot: ModelSlot) -> None:
        slot.load(self.device, self.settings, self.metrics)

    def release(self, spec: ModelSpec, grace_s: float | None = None) -> None:
        """Forget a model no plan uses any more (a replaced trained version); free it after `grace_s`.

        Requests that already hold its slot finish on it: its thread stops only after the grace period
        (the prediction deadline by default) and after the items queued by then.
        """
        with self._lock:
            slot = self._slots.pop(spec.key, None)
        if slot is None:
            return
        delay = self.settings.predict_timeout_s + 5.0 if grace_s is None else grace_s

        def close() -> None:
            if slot.batcher is not None:
                slot.batcher.close()
            log.info("model %s released", spec.key)

        timer = threading.Timer(delay, close)
        timer.daemon = True
        timer.start()

    def warmup(self, keys: Sequence[str] | None = None) -> None:
        """Start loading models named "family:name[@path]" (non-blocking)."""
        for key in keys if keys is not None else self.settings.warmup:
            family, _, rest = key.partition(":")
            name, _, path = rest.partition("@")
            if family not in self.families:
                log.warning(
                    "warm-up: unknown family %r in %r (known: %s)", family, key, ", ".join(self.families)
                )
                continue
            cls = self.families[family]
            self.slot(ModelSpec(family, name or cls.default_model_for(self.settings), path))

    def status(self) -> dict[str, str]:
        """Return {model key: state} for every model this process knows of."""
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            if slot.batcher is not None:
                self.metrics.queue_depth.labels(slot.spec.key).set(slot.batcher.depth)
        return {slot.spec.key: slot.state for slot in slots}

    def check(self, plan: Plan) -> None:
        """Start loading the plan's models; raise ModelUnavailable when one cannot load."""
        problems = []
        for spec in plan.specs:
            slot = self.slot(spec)
            if slot.failed:
                problems.append(f"{spec.key}: {slot.state.removeprefix('unavailable: ')}")
        if problems:
            raise ModelUnavailable("cannot serve this labeling config: " + "; ".join(problems))

    def servable(self, plan: Plan) -> bool:
        """Return True when every model of a plan can load here (cheap checks only, nothing loads)."""
        for spec in plan.specs:
            try:
                if self.family(spec).availability(spec, self.settings) is not None:
                    return False
            except Exception:
                return False
        return True

    def model_version(self, plan: Plan) -> str:
        """Return the version of a plan's models: a pure function of their identities and weights.

        Computed from each family's version_of() (names, weights fingerprints), never from load state,
        so every worker, a restarted server and a model still loading give the same string, and it
        changes only when a model or its weights change (MODEL_VERSION overrides it).
        """
        return plan_version(plan, self.families, self.settings)

    # ---- prediction ----
    def _prepare(
        self,
        task: Any,
        obj: ObjectTag,
        backend: Backend,
        context: Mapping[str, Any] | None,
        targets: Sequence[Target] = (),
    ) -> tuple[Item, Any]:
        return prepare(task, obj, backend, context, targets, self.resolver)

    def predict(
        self,
        label_config: str,
        tasks: Sequence[Any],
        context: Mapping[str, Any] | None = None,
        failures: list[TaskFailure] | None = None,
        timeout_s: float | None = None,
        plan: Plan | None = None,
    ) -> list[dict[str, Any]]:
        """Return exactly one entry per task, in task order (`plan`: the config's, with a project's trained models).

        A task the models ran on gets {"result": [...], "score", "model_version"} (an empty result
        when they found nothing). A task that failed (model loading, deadline, download, bad input)
        gets {"model_version", "error"} and no "result": Label Studio stores only entries with a
        result, so "Retrieve predictions" asks for that task again instead of keeping an empty
        prediction of the current version for good. Interactive calls are never stored, so their
        failures answer an empty result (with the error) that the labeling page can show as nothing.
        """
        plan = plan or self.plan(label_config)
        timeout = self.settings.predict_timeout_s if timeout_s is None else timeout_s
        interactive = bool(context and isinstance(context, Mapping) and context.get("result"))
        call = _Call(tasks, context if interactive else None, time.monotonic() + timeout, timeout)
        groups = self._ready_groups(plan, call)
        window = 256  # tasks in preparation at once: bounds the decoded images held in memory
        for start in range(0, len(tasks), window):
            self._drain(
                self._submit_prepare(call, groups, range(start, min(len(tasks), start + window))), call
            )
        schema = _schema(label_config)
        version = self.model_version(plan)
        return [self._answer(call, i, schema, version, failures) for i in range(len(tasks))]

    def _ready_groups(self, plan: Plan, call: _Call) -> list[tuple[ModelSlot, ObjectTag, list[Target]]]:
        """Return the plan's groups whose model is ready; give every task the reason of any that is not."""
        groups = []
        for spec, obj, targets in self._groups(plan, call.context):
            slot = self.slot(spec)
            hint = self.family(spec).interactive_only
            if hint and call.context is None:
                # A prompt is this model's input: nothing to predict, and nothing to wait for. The
                # task is answered without "result" (Label Studio stores nothing and asks again next
                # time it opens the task); a task being opened warms the model for the first click.
                if len(call.tasks) == 1:
                    self._start_prefetch(slot, call.tasks[0], obj)
                if not any(not self.family(t.model).interactive_only for t in plan.targets):
                    call.fail_all(
                        hint if not slot.failed else f"model {spec.key} is {slot.state}", prompt=True
                    )
                continue
            wait = max(0.0, min(self.settings.load_wait_s, call.deadline - time.monotonic()))
            if not slot.ready.wait(wait):
                call.fail_all(f"model {spec.key} is still loading; retry in a moment")
            elif slot.failed or slot.batcher is None:
                call.fail_all(f"model {spec.key} is {slot.state}")
            else:
                groups.append((slot, obj, targets))
        return groups

    def _submit_prepare(
        self, call: _Call, groups: list[tuple[ModelSlot, ObjectTag, list[Target]]], indices: range
    ) -> list[_Preparing]:
        """Start preparing (fetch, decode) each task of `indices` for each group, in the pool."""
        pending = []
        for i in indices:
            for slot, obj, targets in groups:
                slot.add_pending(1)
                fut = self._pool.submit(
                    self._prepare, call.tasks[i], obj, slot.backend, call.context, targets
                )
                pending.append((i, slot, targets, fut))
        return pending

    def _answer(
        self, call: _Call, i: int, schema: Any, version: str, failures: list[TaskFailure] | None
    ) -> dict[str, Any]:
        """Return task i's prediction: its regions that pass the config's checks, or its failure."""
        task = call.tasks[i] if isinstance(call.tasks[i], Mapping) else {}
        items = call.results[i]
        if schema is not None and items:
            items, problems = _filter_valid(schema, items, task.get("data"), i)
            if problems:
                self.metrics.regions_dropped.labels("all").inc(len(problems))
        reason = call.reasons.get(i)
        if reason is None:
            self.metrics.tasks.labels("ok").inc()
            return {"result": items, "score": prediction_score(items), "model_version": version}
        task_id = task.get("id")
        if failures is not None:
            failures.append(TaskFailure(i, task_id, reason))
        if i in call.prompt_needed:  # expected (a Data Manager page lists many): not a failure
            log.debug("task %s (#%d): %s", task_id, i, reason)
            self.metrics.tasks.labels("prompt_needed").inc()
        else:
            log.warning("task %s (#%d): %s", task_id, i, reason)
            self.metrics.tasks.labels("failed" if not items else "partial").inc()
        if call.context is not None:
            return {"result": [], "score": 0.0, "model_version": version, "error": reason}
        # a partial result is not kept either: stored, it would never be completed
        return {"model_version": version, "error": reason}

    def _groups(
        self, plan: Plan, context: Mapping[str, Any] | None
    ) -> list[tuple[ModelSpec, ObjectTag, list[Target]]]:
        """Return the plan's groups an interactive call runs (all of them for a plain call).

        When the plan has an interactive-only family (a click is its input), a click runs only the
        models whose tags the drawn regions name: the other families answered when the task was
        opened, and re-running them on every click would send their regions again each time.
        """
        groups = plan.groups()
        if context is None or not any(self.family(spec).interactive_only for spec in plan.specs):
            return groups
        named = {r.get("from_name") for r in (context.get("result") or []) if isinstance(r, Mapping)} - {None}
        chosen = [
            g
            for g in groups
            if any(({t.control.name} | {c.name for c in t.linked.values()}) & named for t in g[2])
        ]
        return chosen or groups

    def _drain(self, pending: list[_Preparing], call: _Call) -> None:
        """Feed prepared items to the batchers as they become ready, then post-process in the pool."""
        unprepared = {id(fut): slot for _, slot, _, fut in pending}
        try:
            forwarded, post = self._forward_prepared(pending, unprepared, call)
            post += self._await_forwarded(forwarded, call)
            self._await_post(post, call)
        except TimeoutError:  # preparation (download, decode) itself ran past the deadline
            for i, *_ in pending:
                if not call.results[i]:
                    call.reasons.setdefault(i, call.late)
        finally:
            for slot in unprepared.values():  # never queued (deadline, 503): stop counting them
                slot.add_pending(-1)

    def _forward_prepared(
        self, pending: list[_Preparing], unprepared: dict[int, ModelSlot], call: _Call
    ) -> tuple[list[_Forwarded], list[_Posting]]:
        """Queue each item on its model's batcher as its preparation ends (interactive ones go to the pool).

        Raises TimeoutError when preparation runs past the deadline; `unprepared` keeps the rest.
        """
        index = {id(fut): (i, slot, targets) for i, slot, targets, fut in pending}
        forwarded: list[_Forwarded] = []
        post: list[_Posting] = []
        timeout = max(0.1, call.deadline - time.monotonic())
        for fut in as_completed([p[3] for p in pending], timeout=timeout):
            i, slot, targets = index[id(fut)]
            del unprepared[id(fut)]
            try:
                item, x = fut.result()
            except InputError as exc:
                slot.add_pending(-1)
                call.reasons.setdefault(i, str(exc))
                continue
            except Exception as exc:
                slot.add_pending(-1)
                log.exception("preprocess failed for task #%d", i)
                call.reasons.setdefault(i, f"preprocess failed: {type(exc).__name__}: {exc}")
                continue
            if call.context is not None:
                slot.add_pending(-1)
                post.append((i, self._pool.submit(self._interactive, slot, item, targets, call.context, x)))
                continue
            assert slot.batcher is not None
            try:
                forwarded.append((i, slot, targets, item, slot.batcher.submit(x)))
            finally:
                # only once the item is queued: the batcher waits for company while some are coming
                slot.add_pending(-1)
        return forwarded, post

    def _await_forwarded(self, forwarded: list[_Forwarded], call: _Call) -> list[_Posting]:
        """Wait for each model output until the deadline; post-process the ones that came, in the pool."""
        post: list[_Posting] = []
        for i, slot, targets, item, bfut in forwarded:
            try:
                output = bfut.result(timeout=max(0.1, call.deadline - time.monotonic()))
            except Overloaded:
                raise
            except (TimeoutError, CancelledError):
                # Past the deadline: what is done is still answered; what is queued is skipped by
                # the batcher (cancelled), not run for a request that stopped waiting.
                for *_, later in forwarded:
                    later.cancel()
                call.reasons.setdefault(i, call.late)
                continue
            except Exception as exc:
                self.metrics.errors.labels(slot.spec.key, type(exc).__name__).inc()
                call.reasons.setdefault(i, f"model {slot.spec.key} failed: {type(exc).__name__}: {exc}")
                continue
            post.append((i, self._pool.submit(self._postprocess, slot, output, targets, item)))
        return post

    @staticmethod
    def _await_post(post: list[_Posting], call: _Call) -> None:
        """Collect each task's regions from post-processing, until the deadline."""
        for i, pfut in post:
            try:
                call.results[i].extend(pfut.result(timeout=max(0.1, call.deadline - time.monotonic())))
            except TimeoutError:
                call.reasons.setdefault(i, call.late)
            except InputError as exc:  # a bad prompt found by interactive() or on the model thread
                call.reasons.setdefault(i, str(exc))
            except Exception as exc:
                log.exception("postprocess failed for task #%d", i)
                call.reasons.setdefault(i, f"postprocess failed: {type(exc).__name__}: {exc}")

    def _start_prefetch(self, slot: ModelSlot, task: Any, obj: ObjectTag) -> None:
        """Warm a model for a task being opened, unless two warm-ups are already waiting.

        Bounded: an annotator paging through tasks faster than the model encodes them would
        otherwise queue encodes ahead of the clicks of everyone on the same model.
        """
        with self._lock:
            if self._prefetching >= 2:
                return
            self._prefetching += 1

        def run() -> None:
            try:
                self._prefetch(slot, task, obj)
            finally:
                with self._lock:
                    self._prefetching -= 1

        try:
            self._prefetch_pool.submit(run)
        except RuntimeError:  # shutting down
            with self._lock:
                self._prefetching -= 1

    def _prefetch(self, slot: ModelSlot, task: Any, obj: ObjectTag) -> None:
        """Load the model and run it on a task with no prompt (an interactive-only family warms its cache)."""
        try:
            if not slot.ready.wait(self.settings.load_wait_s) or slot.failed or slot.batcher is None:
                return
            data = task.get("data") if isinstance(task, Mapping) else None
            value = data.get(obj.value_key) if isinstance(data, Mapping) else None
            item = Item(task=task, obj=obj)
            if not isinstance(value, str) or slot.backend.preprocess_cached(item, value) is not None:
                return  # nothing to fetch, or already warm
            _, x = self._prepare(task, obj, slot.backend, None)
            slot.batcher.submit(x).result(timeout=self.settings.predict_timeout_s)
        except Exception as exc:  # a warm-up only: the first click will say what is wrong
            log.info(
                "prefetch for task %s skipped: %s", task.get("id") if isinstance(task, Mapping) else None, exc
            )

    def _interactive(
        self, slot: ModelSlot, item: Item, targets: list[Target], context: Mapping[str, Any], x: Any
    ) -> list[dict[str, Any]]:
        items = slot.backend.interactive(item, targets, context)
        if items is not None:
            return items
        assert slot.batcher is not None
        output = slot.batcher.submit(x).result(timeout=self.settings.predict_timeout_s)
        return self._postprocess(slot, output, targets, item)

    @staticmethod
    def _postprocess(slot: ModelSlot, output: Any, targets: list[Target], item: Item) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for target in targets:
            items.extend(slot.backend.postprocess(output, target, item))
        return items

    def close(self, timeout: float = 10.0) -> None:
        """Stop the model threads and the pool; wait up to `timeout` s in all for the model threads.

        Waiting lets a forward in progress end before the interpreter does: a process exiting under
        a running torch thread aborts with "terminate called without an active exception".
        """
        batchers = [slot.batcher for slot in list(self._slots.values()) if slot.batcher is not None]
        for batcher in batchers:
            batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for batcher in batchers:
            batcher.close(max(0.0, deadline - time.monotonic()))
            if batcher.alive:
                log.warning("model thread %s still running after %.0f s at close", batcher.name, timeout)


def _preimport() -> None:
    try:
        import label_studio_sdk.label_interface  # noqa: F401
    except Exception as exc:  # reported again, with context, when a config is parsed
        log.warning("label_studio_sdk import failed: %s", exc)


def _schema(label_config: str) -> Any:
    try:
        from serving.results.schema import ConfigSchema
    except ImportError:  # pragma: no cover - validation module is part of the package
        return None
    return ConfigSchema.from_config(label_config)


def _filter_valid(
    schema: Any, items: list[dict[str, Any]], data: Any, index: int
) -> tuple[list[dict[str, Any]], list[Any]]:
    from serving.results.validation.checks import filter_valid

    return filter_valid(schema, items, data if isinstance(data, Mapping) else None, index)
