"""The runtime: loads each model once per process, owns devices and batchers, runs predictions."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from serving.contract import Backend, Item, ModelSpec, ObjectTag, Target
from serving.errors import ConfigError, ModelUnavailable, Overloaded
from serving.fetch.local import build_resolver
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import Resolver
from serving.inference import pages
from serving.inference.batching import BULK, URGENT, Ticket
from serving.inference.call import Call, TaskFailure, answer, config_schema
from serving.inference.device import pick_device
from serving.inference.metrics import Metrics
from serving.inference.prepare import prepare
from serving.inference.residency import Residency
from serving.inference.slot import ModelSlot
from serving.inference.task import TaskRun, postprocess
from serving.plan.planner import Plan, Planner
from serving.plan.version import plan_version
from serving.settings import Settings
from serving.util.embeddings import EmbeddingCache

log = logging.getLogger(__name__)


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
        self._unrouted: Planner | None = None  # plans without label routing: what trained models serve
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
        # Which loaded models stay on the device under the GPU memory budget (LRU offload of idle ones).
        self.residency = Residency(self.settings, self.metrics)
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

    def unrouted_plan(self, label_config: str) -> Plan | None:
        """Return the config's plan without label routing (what trained models take tags from), or None."""
        if not self.settings.auto_route:
            return self.planner.plan(label_config)
        if self._unrouted is None:
            self._unrouted = Planner(self.settings.with_(auto_route=False), self.families)
        try:
            return self._unrouted.plan(label_config)
        except ConfigError:  # only zero-shot families serve it
            return None

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
        slot.load(self.device, self.settings, self.metrics, self.residency)

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
            self.residency.forget(spec.key)
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
        # a multi-page object (valueList): each page is predicted as a task of its own, then merged
        paged = pages.page_objects(plan.objects)
        run_tasks, split = pages.split(tasks, paged) if paged else (list(tasks), None)
        call = Call(run_tasks, context if interactive else None, time.monotonic() + timeout, timeout)
        # interactive calls and small requests (an annotator opening a task) go ahead of big ones
        small = interactive or len(tasks) <= self.settings.small_request_tasks
        call.lane = URGENT if small else BULK
        groups = self._ready_groups(plan, call)
        if groups:
            self._run(call, groups)
        if split is not None:
            call = pages.merge(call, tasks, split)
        schema = config_schema(label_config)
        version = self.model_version(plan)
        return [answer(call, i, schema, version, failures, self.metrics) for i in range(len(tasks))]

    def _ready_groups(self, plan: Plan, call: Call) -> list[tuple[ModelSlot, ObjectTag, list[Target]]]:
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
                self._reserve(slot, call)
                groups.append((slot, obj, targets))
        return groups

    def _reserve(self, slot: ModelSlot, call: Call) -> None:
        """Bring the model onto its device now, within the budget, or refuse the request (503).

        Waits a few seconds at most for models in use to finish their batch: longer means the device
        is held by other work, and Label Studio retries a 503 later.
        """
        wait = max(0.0, min(self.settings.memory_wait_s, call.deadline - time.monotonic()))
        try:
            self.residency.reserve(slot.spec.key, wait)
        except Overloaded:
            self.metrics.admission_rejected.labels(slot.spec.key).inc()
            raise

    def _run(self, call: Call, groups: list[tuple[ModelSlot, ObjectTag, list[Target]]]) -> None:
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
        call.collect(finals)

    def _admit(
        self,
        call: Call,
        groups: list[tuple[ModelSlot, ObjectTag, list[Target]]],
        tickets: list[Ticket | None],
        pool: ThreadPoolExecutor,
    ) -> list[tuple[int, Future[list[dict[str, Any]]]]]:
        """Start each task of each group as its model gives room, in task order, until the deadline."""
        finals: list[tuple[int, Future[list[dict[str, Any]]]]] = []
        starts = [0] * len(groups)
        # While this loop hands items out, more are coming to each model: the first items decoded must
        # not end the batcher's wait for company before the other tags' items of the same tasks are
        # counted (one forward per model for the request, not one per tag). The wait stays bounded
        # by MAX_WAIT_MS.
        slots = list({id(slot): slot for slot, _, _ in groups}.values())
        for slot in slots:
            slot.add_pending(1)
        try:
            self._hand_out(call, groups, tickets, pool, starts, finals)
        finally:
            for slot in slots:
                slot.add_pending(-1)
        return finals

    def _hand_out(
        self,
        call: Call,
        groups: list[tuple[ModelSlot, ObjectTag, list[Target]]],
        tickets: list[Ticket | None],
        pool: ThreadPoolExecutor,
        starts: list[int],
        finals: list[tuple[int, Future[list[dict[str, Any]]]]],
    ) -> None:
        """Start tasks group by group as each model gives room, in task order, until the deadline."""
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
                # counted as coming before any is submitted: the first one decoded must not find the
                # count at zero while its siblings are still being handed to the pool (a split batch)
                slot.add_pending(room)
                for i in range(starts[g], starts[g] + room):
                    finals.append((i, TaskRun(self, call, slot, obj, targets, i, pool).start()))
                starts[g] += room

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
        with self.residency.using(slot.spec.key):
            items = slot.backend.interactive(item, targets, context)
        if items is not None:
            return items
        assert slot.batcher is not None
        if deadline is None:
            deadline = time.monotonic() + self.settings.predict_timeout_s
        output = slot.batcher.submit(x, URGENT, deadline).result(
            timeout=max(0.1, deadline - time.monotonic())
        )
        return postprocess(slot, output, targets, item)

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
