"""The runtime: loads each model once per process, owns devices and batchers, runs predictions."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serving.contract import Backend, Item, ModelSpec, ObjectTag, Target
from serving.errors import InputError, ModelUnavailable, Overloaded
from serving.fetch.local import build_resolver
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import Resolver
from serving.inference.batching import BULK, URGENT, Ticket
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


class _Failed(Exception):
    """A task's item got no regions: the reason its entry carries."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
        # Interactive calls and small requests are prepared and post-processed here, so they never
        # wait behind the decodes of a big request queued in the main pool.
        self._urgent_pool = ThreadPoolExecutor(
            max(2, self.settings.preprocess_threads), thread_name_prefix="prep-urgent"
        )
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
                self.metrics.admission_waiting.labels(slot.spec.key).set(slot.batcher.waiting)
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
        Raises Overloaded (503 + Retry-After) when a model's queue cannot take the tasks in time.
        """
        plan = plan or self.plan(label_config)
        timeout = self.settings.predict_timeout_s if timeout_s is None else timeout_s
        interactive = bool(context and isinstance(context, Mapping) and context.get("result"))
        call = _Call(tasks, context if interactive else None, time.monotonic() + timeout, timeout)
        # interactive calls and small requests (an annotator opening a task) go ahead of big ones
        small = interactive or len(tasks) <= self.settings.small_request_tasks
        call.lane = URGENT if small else BULK
        groups = self._ready_groups(plan, call)
        if groups:
            self._run(call, groups)
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

    def _run(self, call: _Call, groups: list[tuple[ModelSlot, ObjectTag, list[Target]]]) -> None:
        """Run every task through every group: room in each model's queue first, then fetch and decode.

        Items are prepared only once their model has room for them, so the decoded images held are
        bounded by QUEUE_SIZE per model, whatever the number and size of requests waiting in line.
        """
        pool = self._urgent_pool if call.lane == URGENT else self._pool
        tickets: list[Ticket | None] = []
        try:
            for slot, _, _ in groups:
                if call.context is not None:  # interactive: each item waits for room itself
                    tickets.append(None)
                    continue
                assert slot.batcher is not None
                try:
                    tickets.append(slot.batcher.enter(call.lane, len(call.tasks), call.deadline))
                except Overloaded:
                    self.metrics.admission_rejected.labels(slot.spec.key).inc()
                    raise
            finals = self._admit(call, groups, tickets, pool)
        finally:
            for ticket in tickets:
                if ticket is not None:
                    ticket.leave()
        self._collect(call, finals)

    def _admit(
        self,
        call: _Call,
        groups: list[tuple[ModelSlot, ObjectTag, list[Target]]],
        tickets: list[Ticket | None],
        pool: ThreadPoolExecutor,
    ) -> list[tuple[int, Future[list[dict[str, Any]]]]]:
        """Start each task of each group as its model gives room, in task order, until the deadline."""
        finals: list[tuple[int, Future[list[dict[str, Any]]]]] = []
        starts = [0] * len(groups)
        n = len(call.tasks)
        while any(s < n for s in starts):
            for g, (slot, obj, targets) in enumerate(groups):
                if starts[g] >= n:
                    continue
                ticket = tickets[g]
                room = n - starts[g] if ticket is None else ticket.take(call.deadline)
                if not room:  # the deadline passed in line: the tasks left are late
                    for i in range(starts[g], n):
                        call.reasons.setdefault(i, call.late)
                    starts[g] = n
                    continue
                for i in range(starts[g], starts[g] + room):
                    finals.append((i, self._start(call, slot, obj, targets, i, pool)))
                starts[g] += room
        return finals

    def _start(
        self,
        call: _Call,
        slot: ModelSlot,
        obj: ObjectTag,
        targets: list[Target],
        i: int,
        pool: ThreadPoolExecutor,
    ) -> Future[list[dict[str, Any]]]:
        """Prepare task i in the pool, queue it on its model, post-process its output in the pool.

        The returned future holds the task's regions, or a _Failed with the reason it has none.
        The item's room (taken by the caller for a plain call) is given back if it is never queued.
        """
        final: Future[list[dict[str, Any]]] = Future()
        batcher = slot.batcher
        assert batcher is not None
        plain = call.context is None

        def fail(reason: str) -> None:
            if not final.done():
                final.set_exception(_Failed(reason))

        def post(output: Any, item: Item) -> None:
            try:
                final.set_result(self._postprocess(slot, output, targets, item))
            except InputError as exc:  # a bad prompt found on the model thread
                fail(str(exc))
            except Exception as exc:
                log.exception("postprocess failed for task #%d", i)
                fail(f"postprocess failed: {type(exc).__name__}: {exc}")

        def forwarded(bfut: Future[Any], item: Item) -> None:
            if bfut.cancelled():
                fail(call.late)
                return
            exc = bfut.exception()
            if exc is not None:
                self.metrics.errors.labels(slot.spec.key, type(exc).__name__).inc()
                fail(f"model {slot.spec.key} failed: {type(exc).__name__}: {exc}")
                return
            try:
                pool.submit(post, bfut.result(), item)
            except RuntimeError:  # the pool shut down (server stopping)
                fail("the server is shutting down")

        def prepare_and_queue() -> None:
            queued = False
            try:
                if call.expired:
                    fail(call.late)
                    return
                try:
                    item, x = self._prepare(call.tasks[i], obj, slot.backend, call.context, targets)
                except InputError as exc:
                    fail(str(exc))
                    return
                except Exception as exc:
                    log.exception("preprocess failed for task #%d", i)
                    fail(f"preprocess failed: {type(exc).__name__}: {exc}")
                    return
                if not plain:
                    self._interactive_task(call, i, slot, item, targets, x, final)
                    return
                if call.expired:
                    fail(call.late)
                    return
                bfut = batcher.put(x, call.lane)
                queued = True
                call.queued.append(bfut)
                bfut.add_done_callback(lambda f: forwarded(f, item))
            finally:
                if plain and not queued:
                    batcher.release(1)
                # only once the item is queued: the batcher waits for company while some are coming
                slot.add_pending(-1)

        slot.add_pending(1)
        try:
            pool.submit(prepare_and_queue)
        except RuntimeError:
            slot.add_pending(-1)
            if plain:
                batcher.release(1)
            fail("the server is shutting down")
        return final

    def _interactive_task(
        self,
        call: _Call,
        i: int,
        slot: ModelSlot,
        item: Item,
        targets: list[Target],
        x: Any,
        final: Future[list[dict[str, Any]]],
    ) -> None:
        """Answer one interactive item (its prompt) in the calling pool thread, into `final`."""
        assert call.context is not None
        try:
            final.set_result(self._interactive(slot, item, targets, call.context, x, call.deadline))
        except InputError as exc:  # a bad prompt found by interactive() or on the model thread
            final.set_exception(_Failed(str(exc)))
        except Overloaded as exc:
            final.set_exception(_Failed(exc.message))
        except TimeoutError:
            final.set_exception(_Failed(call.late))
        except Exception as exc:
            log.exception("postprocess failed for task #%d", i)
            final.set_exception(_Failed(f"postprocess failed: {type(exc).__name__}: {exc}"))

    def _collect(self, call: _Call, finals: list[tuple[int, Future[list[dict[str, Any]]]]]) -> None:
        """Collect each task's regions until the deadline; past it, what is done is still answered."""
        for i, final in finals:
            wait = 0.0 if call.expired else max(0.1, call.deadline - time.monotonic())
            try:
                call.results[i].extend(final.result(timeout=wait))
            except TimeoutError:
                if not call.expired:
                    # Past the deadline: what is queued is skipped by the batcher (cancelled), not
                    # run for a request that stopped waiting; what is not yet prepared is dropped.
                    call.expired = True
                    for bfut in list(call.queued):
                        bfut.cancel()
                call.reasons.setdefault(i, call.late)
            except _Failed as exc:
                call.reasons.setdefault(i, exc.reason)

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
        self,
        slot: ModelSlot,
        item: Item,
        targets: list[Target],
        context: Mapping[str, Any],
        x: Any,
        deadline: float | None = None,
    ) -> list[dict[str, Any]]:
        items = slot.backend.interactive(item, targets, context)
        if items is not None:
            return items
        assert slot.batcher is not None
        if deadline is None:
            deadline = time.monotonic() + self.settings.predict_timeout_s
        output = slot.batcher.submit(x, URGENT, deadline).result(
            timeout=max(0.1, deadline - time.monotonic())
        )
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
        self._urgent_pool.shutdown(wait=False, cancel_futures=True)
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
