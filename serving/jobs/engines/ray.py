"""The Ray engine: a job's tasks predicted by a pool of Ray actors that each hold the /predict runtime.

    staged {idx, task_json} lines --read_json--> map_batches(RayPredictor, ActorPoolStrategy(size=N),
    num_gpus=1 per actor, batch_size=B) --iter_batches--> the driver commits each block to the job store

Each task is wrapped as {idx, task_json} before Ray sees it: Ray would otherwise merge the differing
`data` schemas of Label Studio tasks into one table. Each actor builds the same runtime as /predict
once (plan, backends, batchers, data resolver, validation) and answers every task of its block:
a task that fails gets its error on its own output row, the others of the block keep their results,
and no block is ever dropped (Ray's `max_errored_blocks` drops whole blocks; it is not used).

Resume uses this project's job store, not Ray Data's checkpointing: the driver is the only writer of
the SQLite store and commits each block's results with the progress in one transaction (the task
index is the primary key), so a killed driver or a lost node resumes with every finished task kept
and none predicted twice, and the status, failures, import file, one-file-per-task output and push
are the local engine's own. Ray Data's checkpoints (beta) would only dedupe rows written to a sink,
in files with no input order, no per-task errors and no progress for GET /jobs. The job store and
the staged inputs live beside each other (the CLI's state file, MODEL_DIR/jobs/<id>/): on a cluster
of several hosts that folder, and any image folder given as input, must be on storage every node
mounts at the same path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.errors import ConfigError, ModelUnavailable, ServingError
from serving.inference.build import build_runtime
from serving.jobs.engines import RAY_MISSING, ray_installed
from serving.jobs.runner import JobRunner, RunProgress
from serving.jobs.store import JobFailed, JobStore
from serving.plan.families import FamiliesSource, load_families
from serving.settings import Settings

log = logging.getLogger(__name__)

STAGE_SHARD_BATCHES = 8  # actor batches per staged input file (Ray reads files in parallel)


class RayUnavailable(ServingError):
    """Ray is not installed here or the cluster cannot be reached."""

    status = 503
    code = "ray_unavailable"


def require_ray() -> None:
    """Raise RayUnavailable with the install command when ray[data] is missing."""
    if not ray_installed():
        raise RayUnavailable(RAY_MISSING)


@dataclass(frozen=True)
class RuntimeFactory:
    """What an actor needs to build the /predict runtime in its own process (pickled to the actor)."""

    settings: Settings
    families: FamiliesSource
    roots: tuple[str, ...] = field(default_factory=tuple)

    def build(self) -> Any:
        """Return the runtime (build_runtime, as the local engine and /predict build it)."""
        return build_runtime(self.settings, self.families, roots=self.roots)


class RayPredictor:
    """The Ray Data callable class: one runtime per actor, built once; one output row per input row."""

    def __init__(self, factory: RuntimeFactory, label_config: str, ready_timeout_s: float = 600.0) -> None:
        """Build the runtime and wait until the config's models are loaded on this actor's device."""
        started = time.monotonic()
        self.label_config = label_config
        self.runtime = factory.build()
        self.runner = JobRunner(factory.settings, self.runtime, ready_timeout_s=ready_timeout_s)
        self.runner.wait_ready(label_config)
        log.info("Ray predictor ready on %s in %.1f s", self.runtime.device, time.monotonic() - started)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Predict a batch of wrapped tasks; a failed task gets its error, never a dropped row."""
        indices = [int(i) for i in batch["idx"]]
        tasks = [json.loads(str(t)) for t in batch["task_json"]]
        outcomes = self.runner.predict_chunk(self.label_config, tasks)
        # "" stands for none: a column of nulls comes back from Arrow as floats (NaN)
        return {
            "idx": indices,
            "prediction": [json.dumps(p) if p is not None else "" for p, _ in outcomes],
            "error": [e or "" for _, e in outcomes],
        }


@dataclass(frozen=True)
class RayOptions:
    """How a job runs on the cluster (CLI flags, else the RAY_* settings)."""

    address: str | None = None  # None: RAY_ADDRESS, else a local cluster on this machine
    actors: int = 0  # 0 = one per GPU of the cluster (1 without GPUs)
    gpus_per_actor: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    stall_timeout_s: float = 1800.0
    stage_dir: str = ""  # where pending tasks are staged for Ray to read; "" = beside the job's store
    quiet: bool = False  # no Ray progress bars

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RayOptions:
        """Return the options of the RAY_* settings, with the non-None overrides applied."""
        base = cls(
            address=settings.ray_address or None,
            actors=settings.ray_actors,
            gpus_per_actor=settings.ray_gpus_per_actor,
            cpus_per_actor=settings.ray_cpus_per_actor,
            stall_timeout_s=settings.ray_stall_timeout_s,
            stage_dir=settings.ray_stage_dir,
        )
        changes = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**base.__dict__, **changes})


class RayJobRunner(JobRunner):
    """Run a job store on a Ray cluster; everything but the prediction loop is the local runner's."""

    def __init__(
        self,
        settings: Settings,
        families: FamiliesSource,
        roots: Sequence[str | Path] = (),
        options: RayOptions | None = None,
        chunk_size: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        require_ray()
        batch = chunk_size or settings.ray_batch_size or settings.job_chunk_size
        super().__init__(settings, _no_local_predict, chunk_size=batch, stop=stop)
        self.families = families
        self.roots = tuple(str(r) for r in roots)
        self.options = options or RayOptions.from_settings(settings)

    # ---- driver-side checks (nothing loads here: the models load on the actors) ----
    def wait_ready(self, label_config: str) -> None:
        """Plan the config and check every model can load (weights present) before any actor starts."""
        from serving.plan.planner import Planner

        plan = Planner(self.settings, load_families(self.families)).plan(label_config)
        problems = []
        for spec in plan.specs:
            try:
                reason = plan.families[spec.family].availability(spec, self.settings)
            except Exception as exc:
                reason = f"availability check failed: {exc}"
            if reason:
                problems.append(f"{spec.key}: {reason}")
        if problems:
            raise ModelUnavailable("cannot serve this labeling config: " + "; ".join(problems))

    def _predict_pending(self, store: JobStore, label_config: str, session: RunProgress) -> str:
        """Stage the tasks without a result, run them through the actor pool, commit blocks as they come."""
        if store.get("cancel_requested"):
            return "cancelled"
        stage = stage_dir(store.path, self.options.stage_dir)
        owned = False
        try:
            staged = self._stage(store, stage)
            if staged == 0:
                return "done"
            owned = _connect(self.options.address)
            actors, gpus = self._pool_size()
            log.info(
                "ray: %d tasks pending, %d actors (%g GPU, %g CPU each), batches of %d",
                staged, actors, gpus, self.options.cpus_per_actor, self.chunk_size,
            )  # fmt: skip
            dataset = self._dataset(stage, label_config, actors, gpus)
            seen: set[int] = set()
            for outcomes in self._stream(dataset):
                fresh = [o for o in outcomes if o[0] not in seen]
                if len(fresh) < len(outcomes):
                    log.warning("ray returned %d results twice; kept the first", len(outcomes) - len(fresh))
                seen.update(o[0] for o in fresh)
                self._commit(store, session, fresh)
                if self.stop.is_set():
                    return "stopped"
                if store.get("cancel_requested"):
                    return "cancelled"
            missing = staged - len(seen)
            if missing:
                raise JobFailed(
                    f"the Ray cluster returned no result for {missing} tasks; rerun to finish them"
                )
            return "done"
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            if owned:
                _disconnect()

    # ---- steps ----
    def _stage(self, store: JobStore, stage: Path) -> int:
        """Write the pending tasks as {idx, task_json} JSON lines, a few batches a file; return the count."""
        shutil.rmtree(stage, ignore_errors=True)  # a killed run's files
        stage.mkdir(parents=True)
        image_key = store.get("image_key")
        per_file = max(1, self.chunk_size * STAGE_SHARD_BATCHES)
        cursor = store.conn.execute(
            "SELECT i.idx, i.task, i.local FROM inputs i WHERE NOT EXISTS "
            "(SELECT 1 FROM results r WHERE r.idx = i.idx) ORDER BY i.idx"
        )
        count = 0
        lines: list[str] = []
        files: list[Path] = []

        def flush() -> None:
            files.append(stage / f"part-{len(files):06d}.jsonl")
            files[-1].write_text("".join(lines), encoding="utf-8")
            lines.clear()

        for idx, task, local in cursor:
            # the stored task keeps the URL Label Studio shows; the actor reads the local file
            wrapped = {"idx": idx, "task_json": json.dumps(self._predict_task(task, local, image_key))}
            lines.append(json.dumps(wrapped) + "\n")
            if len(lines) == per_file:
                flush()
            count += 1
        if lines:
            flush()
        return count

    def _pool_size(self) -> tuple[int, float]:
        """Return (actors, GPUs per actor) from the options and the cluster's resources."""
        import ray

        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0.0))
        gpus = self.options.gpus_per_actor
        if gpus < 0:
            gpus = 1.0 if cluster_gpus >= 1 else 0.0
        actors = self.options.actors
        if actors <= 0:
            actors = max(1, math.floor(cluster_gpus / gpus)) if gpus > 0 else 1
        if gpus * actors > cluster_gpus or self.options.cpus_per_actor * actors > resources.get("CPU", 0.0):
            log.warning(
                "ray: %d actors need %g GPU and %g CPU; the cluster has %g GPU and %g CPU now (an autoscaler "
                "may add nodes; RAY_STALL_TIMEOUT_S=%g fails the job if nothing finishes)",
                actors, gpus * actors, self.options.cpus_per_actor * actors, cluster_gpus,
                resources.get("CPU", 0.0), self.options.stall_timeout_s,
            )  # fmt: skip
        return actors, gpus

    def _dataset(self, stage: Path, label_config: str, actors: int, gpus: float) -> Any:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not self.options.quiet
        if self.options.quiet:  # Ray Data's per-dataset INFO lines too (the job's own log says enough)
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        # the device follows what Ray granted: the actor's GPU (CUDA_VISIBLE_DEVICES), or the CPU
        device = "cpu" if gpus <= 0 or self.settings.device == "cpu" else ""
        factory = RuntimeFactory(self.settings.with_(device=device), self.families, self.roots)
        # absolute: Ray's read tasks run in worker processes with their own working directory
        files = sorted(str(p.resolve()) for p in stage.glob("part-*.jsonl"))
        return ray.data.read_json(files, lines=True).map_batches(
            RayPredictor,
            fn_constructor_kwargs={
                "factory": factory,
                "label_config": label_config,
                "ready_timeout_s": self.ready_timeout_s,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=self.options.cpus_per_actor,
            batch_size=self.chunk_size,
            batch_format="numpy",
            runtime_env=actor_runtime_env(self.families),
        )

    def _stream(self, dataset: Any) -> Iterator[list[tuple[int, dict[str, Any] | None, str | None]]]:
        """Yield each finished block's (idx, prediction, error) rows; JobFailed after a stall or a Ray error."""
        results: queue.Queue[tuple[str, Any]] = queue.Queue()
        halt = threading.Event()

        def produce() -> None:
            batches = dataset.iter_batches(batch_size=None, batch_format="numpy")
            try:
                for batch in batches:
                    results.put(("batch", batch))
                    if halt.is_set():
                        break
                results.put(("end", None))
            except BaseException as exc:
                results.put(("error", exc))
            finally:
                with contextlib.suppress(Exception):
                    batches.close()

        threading.Thread(target=produce, name="ray-results", daemon=True).start()
        timeout = self.options.stall_timeout_s
        try:
            while True:
                try:
                    kind, value = results.get(timeout=timeout)
                except queue.Empty:
                    raise JobFailed(
                        f"no task finished on the Ray cluster for {timeout:g} s (RAY_STALL_TIMEOUT_S): check that "
                        "it has the GPUs/CPUs the actors ask for and that the actors start (their logs)"
                    ) from None
                if kind == "end":
                    return
                if kind == "error":
                    raise JobFailed(f"the Ray job failed: {explain(value)}") from None
                yield [
                    (int(i), json.loads(p) if p else None, str(e) if e else None)
                    for i, p, e in zip(value["idx"], value["prediction"], value["error"], strict=True)
                ]
        finally:
            halt.set()


def code_roots(families: FamiliesSource) -> list[str]:
    """Return the folders the actors must import from: serving/'s and the families' (the driver's paths)."""
    names = {__name__}
    if isinstance(families, str):
        names.add(families.partition(":")[0])
    elif isinstance(families, Mapping):
        names.update(getattr(cls, "__module__", "") for cls in families.values())
    else:
        names.add(getattr(families, "__module__", "") or "")
    roots: list[str] = []
    for name in sorted(n for n in names if n):
        top = sys.modules.get(name.split(".")[0])
        origin = getattr(top, "__file__", None)
        if not origin:
            continue
        root = Path(origin).resolve().parent
        if hasattr(top, "__path__"):  # a package: its folder's parent is what goes on sys.path
            root = root.parent
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def actor_runtime_env(families: FamiliesSource) -> dict[str, Any]:
    """Return the actors' runtime env: the code on PYTHONPATH at the driver's paths (same image, same paths).

    A worker that Ray starts does not inherit the driver's sys.path, and a worker node of the same image
    has the code at the same place; ${PYTHONPATH} keeps what the node itself sets.
    """
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([*code_roots(families), "${PYTHONPATH}"])}}


def stage_dir(store_path: Path, root: str = "") -> Path:
    """Return where a job's pending tasks are staged for Ray to read (every node must see the folder).

    Beside the job's store by default; under `root` (RAY_STAGE_DIR, --ray-stage-dir) when the store lives
    on the driver's own disk and only `root` is shared, in a folder named after the store's path.
    """
    if not root:
        return store_path.with_name(store_path.name + ".ray")
    key = hashlib.sha1(str(store_path.resolve()).encode()).hexdigest()[:16]
    return Path(root) / f"lsml-stage-{key}"


def explain(exc: BaseException) -> str:
    """Return the message of the error behind a Ray exception (a ServingError's own text when there is one)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ServingError, JobFailed, ConfigError)):
            return getattr(current, "message", None) or str(current)
        current = getattr(current, "cause", None) or current.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def _no_local_predict(label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raise RuntimeError("the Ray engine predicts on its actors, not in the driver")


_connect_lock = threading.Lock()


def _connect(address: str | None) -> bool:
    """Connect this process to Ray (RAY_ADDRESS or a local cluster); return True when this call did."""
    import ray

    with _connect_lock:
        if ray.is_initialized():
            return False  # a caller's own connection (a script, a test): leave it as it is
        try:
            ray.init(address=address or None, logging_level=logging.WARNING)
        except Exception as exc:
            raise RayUnavailable(
                f"cannot reach the Ray cluster at {address or 'RAY_ADDRESS/local'}: {exc}"
            ) from None
        return True


def _disconnect() -> None:
    """End this driver's Ray session: the cluster stops its actors (a local cluster stops altogether)."""
    import ray

    with _connect_lock, contextlib.suppress(Exception):
        ray.shutdown()
