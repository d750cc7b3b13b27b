"""The runtime: loads each model once per process, owns devices and batchers, runs predictions."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from serving.contract import Backend, Item, ModelSpec, ObjectTag, Target
from serving.errors import InputError, ModelUnavailable, Overloaded
from serving.fetch.local import build_resolver
from serving.fetch.resolver import Resolver
from serving.inference.batching import Batcher
from serving.inference.device import pick_device, torch_context
from serving.inference.metrics import Metrics
from serving.inference.prepare import prepare
from serving.plan.planner import Plan, Planner
from serving.plan.version import plan_version
from serving.results.regions import prediction_score
from serving.settings import Settings
from serving.util.embeddings import EmbeddingCache

log = logging.getLogger(__name__)

# One model loads at a time in a process: transformers' from_pretrained patches torch globally while
# it builds a model (default dtype, meta-device construction, init functions), so two loads in
# parallel threads corrupt each other ("Cannot copy out of meta tensor"; seen with Grounded-SAM's
# detector and the interactive SAM family of one config loading at once).
_LOAD_LOCK = threading.Lock()


@dataclass
class ModelSlot:
    """One loaded (or loading, or failed) model and the batcher that owns it."""

    spec: ModelSpec
    backend: Backend
    state: str = "idle"  # idle | loading | ready | unavailable: <why>
    ready: threading.Event = field(default_factory=threading.Event)
    batcher: Batcher | None = None
    load_seconds: float = 0.0
    pending: int = 0  # items being decoded for this model, across requests
    pending_lock: threading.Lock = field(default_factory=threading.Lock)

    def add_pending(self, delta: int) -> None:
        """Count items in preparation (the batcher waits for company only while some are)."""
        with self.pending_lock:
            self.pending += delta

    def expecting(self) -> bool:
        """Return True while items for this model are still being prepared."""
        return self.pending > 0

    @property
    def failed(self) -> bool:
        """Return True when the model cannot serve."""
        return self.state.startswith("unavailable")


@dataclass
class TaskFailure:
    """Why one task got an empty (or partial) result."""

    index: int
    task_id: Any
    reason: str


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
    def client(self) -> Any:
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
        started = time.perf_counter()
        backend = slot.backend
        try:
            with _LOAD_LOCK:
                backend.load(self.device)
            backend.device = getattr(backend, "device", None) or self.device
            max_batch = self.settings.max_batch_size or type(backend).max_batch_size
            slot.batcher = Batcher(
                slot.spec.key,
                self._forward_fn(backend),
                max_batch_size=max_batch,
                max_wait_ms=self.settings.max_wait_ms,
                queue_size=self.settings.queue_size,
                on_batch=self.metrics.observe_batch,
                expecting=slot.expecting,
            )
            slot.state = "ready"
            slot.load_seconds = time.perf_counter() - started
            log.info("model %s ready on %s in %.1f s", slot.spec.key, self.device, slot.load_seconds)
        except Exception as exc:
            slot.state = f"unavailable: load failed: {str(exc)[:300]}"
            self.metrics.errors.labels(slot.spec.key, "load").inc()
            log.exception("model %s failed to load", slot.spec.key)
        finally:
            slot.ready.set()

    def _forward_fn(self, backend: Backend) -> Callable[[list[Any]], list[Any]]:
        fp16 = self.settings.fp16 and type(backend).fp16

        def run(batch: list[Any]) -> list[Any]:
            with backend.lock, torch_context(self.device, fp16):
                return backend.forward(batch)

        return run

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
        version = self.model_version(plan)
        timeout = self.settings.predict_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        n = len(tasks)
        results: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        reasons: dict[int, str] = {}
        interactive = bool(context and isinstance(context, Mapping) and context.get("result"))

        groups = []
        prompt_needed: set[int] = set()
        for spec, obj, targets in self._groups(plan, context if interactive else None):
            slot = self.slot(spec)
            hint = self.family(spec).interactive_only
            if hint and not interactive:
                # A prompt is this model's input: nothing to predict, and nothing to wait for. The
                # task is answered without "result" (Label Studio stores nothing and asks again next
                # time it opens the task); a task being opened warms the model for the first click.
                reason = hint if not slot.failed else f"model {spec.key} is {slot.state}"
                if n == 1:
                    self._start_prefetch(slot, tasks[0], obj)
                if not any(not self.family(t.model).interactive_only for t in plan.targets):
                    for i in range(n):
                        reasons.setdefault(i, reason)
                        prompt_needed.add(i)
                continue
            wait = max(0.0, min(self.settings.load_wait_s, deadline - time.monotonic()))
            if not slot.ready.wait(wait):
                for i in range(n):
                    reasons.setdefault(i, f"model {spec.key} is still loading; retry in a moment")
                continue
            if slot.failed or slot.batcher is None:
                for i in range(n):
                    reasons.setdefault(i, f"model {spec.key} is {slot.state}")
                continue
            groups.append((slot, obj, targets))

        window = 256
        pending_prep: list[tuple[int, ModelSlot, list[Target], Future[tuple[Item, Any]]]] = []
        for start in range(0, n, window):
            for i in range(start, min(n, start + window)):
                for slot, obj, targets in groups:
                    slot.add_pending(1)
                    fut = self._pool.submit(
                        self._prepare,
                        tasks[i],
                        obj,
                        slot.backend,
                        context if interactive else None,
                        targets,
                    )
                    pending_prep.append((i, slot, targets, fut))
            self._drain(pending_prep, results, reasons, interactive, context, deadline, timeout)
            pending_prep = []

        schema = _schema(label_config)
        predictions = []
        for i in range(n):
            items = results[i]
            if schema is not None and items:
                task = tasks[i] if isinstance(tasks[i], Mapping) else {}
                items, problems = _filter_valid(schema, items, task.get("data"), i)
                if problems:
                    self.metrics.regions_dropped.labels("all").inc(len(problems))
            if i in reasons:
                task_id = tasks[i].get("id") if isinstance(tasks[i], Mapping) else None
                if failures is not None:
                    failures.append(TaskFailure(i, task_id, reasons[i]))
                if i in prompt_needed:  # expected (a Data Manager page lists many): not a failure
                    log.debug("task %s (#%d): %s", task_id, i, reasons[i])
                    self.metrics.tasks.labels("prompt_needed").inc()
                else:
                    log.warning("task %s (#%d): %s", task_id, i, reasons[i])
                    self.metrics.tasks.labels("failed" if not items else "partial").inc()
                if interactive:
                    predictions.append(
                        {"result": [], "score": 0.0, "model_version": version, "error": reasons[i]}
                    )
                else:
                    # a partial result is not kept either: stored, it would never be completed
                    predictions.append({"model_version": version, "error": reasons[i]})
                continue
            self.metrics.tasks.labels("ok").inc()
            predictions.append({"result": items, "score": prediction_score(items), "model_version": version})
        return predictions

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

    def _drain(
        self,
        pending: list[tuple[int, ModelSlot, list[Target], Future[tuple[Item, Any]]]],
        results: list[list[dict[str, Any]]],
        reasons: dict[int, str],
        interactive: bool,
        context: Mapping[str, Any] | None,
        deadline: float,
        timeout_s: float,
    ) -> None:
        """Feed prepared items to the batchers as they become ready, then post-process in the pool."""
        index = {id(fut): (i, slot, targets) for i, slot, targets, fut in pending}
        forwarded: list[tuple[int, ModelSlot, list[Target], Item, Future[Any]]] = []
        post: list[tuple[int, Future[list[dict[str, Any]]]]] = []
        unprepared = {id(fut): slot for _, slot, _, fut in pending}
        try:
            timeout = max(0.1, deadline - time.monotonic())
            for fut in as_completed([p[3] for p in pending], timeout=timeout):
                i, slot, targets = index[id(fut)]
                del unprepared[id(fut)]
                try:
                    item, x = fut.result()
                except InputError as exc:
                    slot.add_pending(-1)
                    reasons.setdefault(i, str(exc))
                    continue
                except Exception as exc:
                    slot.add_pending(-1)
                    log.exception("preprocess failed for task #%d", i)
                    reasons.setdefault(i, f"preprocess failed: {type(exc).__name__}: {exc}")
                    continue
                if interactive and context is not None:
                    slot.add_pending(-1)
                    post.append((i, self._pool.submit(self._interactive, slot, item, targets, context, x)))
                    continue
                assert slot.batcher is not None
                try:
                    forwarded.append((i, slot, targets, item, slot.batcher.submit(x)))
                finally:
                    # only once the item is queued: the batcher waits for company while some are coming
                    slot.add_pending(-1)
            late = f"prediction did not finish within its deadline ({timeout_s:g} s, PREDICT_TIMEOUT_S)"
            for i, slot, targets, item, bfut in forwarded:
                try:
                    output = bfut.result(timeout=max(0.1, deadline - time.monotonic()))
                except Overloaded:
                    raise
                except (TimeoutError, CancelledError):
                    # Past the deadline: what is done is still answered; what is queued is skipped by
                    # the batcher (cancelled), not run for a request that stopped waiting.
                    for *_, later in forwarded:
                        later.cancel()
                    reasons.setdefault(i, late)
                    continue
                except Exception as exc:
                    self.metrics.errors.labels(slot.spec.key, type(exc).__name__).inc()
                    reasons.setdefault(i, f"model {slot.spec.key} failed: {type(exc).__name__}: {exc}")
                    continue
                post.append((i, self._pool.submit(self._postprocess, slot, output, targets, item)))
            for i, pfut in post:
                try:
                    results[i].extend(pfut.result(timeout=max(0.1, deadline - time.monotonic())))
                except TimeoutError:
                    reasons.setdefault(i, late)
                except InputError as exc:  # a bad prompt found by interactive() or on the model thread
                    reasons.setdefault(i, str(exc))
                except Exception as exc:
                    log.exception("postprocess failed for task #%d", i)
                    reasons.setdefault(i, f"postprocess failed: {type(exc).__name__}: {exc}")
        except TimeoutError:  # preparation (download, decode) itself ran past the deadline
            for i, *_ in pending:
                if not results[i]:
                    reasons.setdefault(
                        i,
                        f"prediction did not finish within its deadline ({timeout_s:g} s, PREDICT_TIMEOUT_S)",
                    )
        finally:
            for slot in unprepared.values():  # never queued (deadline, 503): stop counting them
                slot.add_pending(-1)

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
