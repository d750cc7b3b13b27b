"""The trainer process: runs training jobs one at a time per device, outside the gunicorn workers.

`python -m serving.trainer --device cpu --families model:families` (settings as JSON on stdin) is
started by a worker's `TrainerSupervisor` as a fresh interpreter (spawn semantics: nothing of the
worker is inherited, so CUDA initialises cleanly) whenever jobs wait and no trainer holds the
device's lock (`MODEL_DIR/training/trainer-<device>.lock`, an flock the OS drops when the process
dies). The families come as an importable reference because serving/ never imports the
composition root. On SIGTERM the running job stops at its next progress report and goes back to
"queued"; after a kill -9 it is still "running" with no lock holder, and the next trainer resumes
it from its last epoch checkpoint. The trainer exits after TRAIN_IDLE_S without work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.contract import Backend, TrainCancelled
from serving.engines import load_families
from serving.jobs import FileLock
from serving.labeling import build_plan
from serving.runtime import plan_version
from serving.settings import Settings
from serving.training import (
    TrainingJob,
    TrainingStore,
    VersionStore,
    device_slug,
    examples_from_tasks,
    export_sha1,
    write_json_atomic,
)

log = logging.getLogger("serving.trainer")  # also when run as __main__

Families = Mapping[str, type[Backend]]
EXPORT_TIMEOUT_S = 600.0


class TrainingFailed(Exception):
    """A job cannot train; the message says why and what to change."""


def lock_path(settings: Settings, device: str) -> Path:
    """Return the flock file that marks the trainer of a device."""
    return Path(settings.model_dir) / "training" / f"trainer-{device_slug(device)}.lock"


def settings_to_json(settings: Settings) -> str:
    """Return the settings as JSON (sent to the trainer on its stdin: secrets never touch disk or argv)."""
    return json.dumps({f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}, default=list)


def settings_from_json(text: str) -> Settings:
    """Rebuild Settings from settings_to_json()'s output."""
    raw = json.loads(text)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name not in raw:
            continue
        value = raw[f.name]
        values[f.name] = tuple(value) if isinstance(f.default, tuple) and isinstance(value, list) else value
    return Settings(**values)


# ---------------------------------------------------------------------------------------------- data


def fetch_export(settings: Settings, project_id: Any, http: Any = None) -> list[Any]:
    """Return every annotated task of a Label Studio project through its export API (JSON).

    Authenticates like the data fetcher: a legacy token, or a personal access token exchanged for
    short-lived access tokens (refreshed, and once more after a 401).
    """
    import requests

    from serving.errors import InputError
    from serving.lsclient import LabelStudioClient

    client = LabelStudioClient(settings)
    base = client.base_url
    if not base or client.token_kind == "none":
        raise TrainingFailed(
            "training reads the project's annotations from Label Studio: set LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY (a legacy token or a personal access token) on the server"
        )
    url = f"{base}/api/projects/{project_id}/export"
    session = http or requests.Session()
    rejected: str | None = None
    for attempt in range(2):
        try:
            headers = client.auth_headers(force_refresh=attempt > 0, rejected=rejected)
        except InputError as exc:
            raise TrainingFailed(str(exc)) from None
        try:
            resp = session.get(
                url,
                params={"exportType": "JSON", "download_all_tasks": "false"},
                headers=headers,
                timeout=(10.0, EXPORT_TIMEOUT_S),
            )
        except requests.RequestException as exc:
            raise TrainingFailed(
                f"cannot reach Label Studio at {base} ({type(exc).__name__}): {exc}"
            ) from None
        if resp.status_code == 401 and attempt == 0:
            rejected = headers.get("Authorization")
            continue
        if resp.status_code != 200:
            raise TrainingFailed(
                f"Label Studio's export API answered {resp.status_code} for project {project_id}: "
                f"{resp.text[:300]} (does LABEL_STUDIO_API_KEY belong to a member of the project?)"
            )
        try:
            tasks = resp.json()
        except ValueError:
            raise TrainingFailed("Label Studio's export API did not answer JSON") from None
        if not isinstance(tasks, list):
            raise TrainingFailed("Label Studio's export API answered something other than a list of tasks")
        return tasks
    raise TrainingFailed("Label Studio refused the API key twice (HTTP 401): check LABEL_STUDIO_API_KEY")


def load_tasks(job: TrainingJob, store: TrainingStore, settings: Settings, http: Any = None) -> list[Any]:
    """Return the job's data: its snapshot when it has one (inline data, or a resumed job), else the export."""
    path = store.job_dir(job.id) / "data.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise TrainingFailed(f"{path} does not hold a list of tasks")
        return data
    source = job.source or {}
    if source.get("kind") != "label_studio":
        raise TrainingFailed(f"the job's data ({path}) is missing")
    tasks = fetch_export(settings, source.get("project_id", job.project), http=http)
    write_json_atomic(path, tasks)  # a resumed job trains on exactly these tasks
    return tasks


def default_resolver(settings: Settings, roots: Sequence[Path] = ()) -> Any:
    """Return the data resolver training uses (Label Studio uploads with the key; file:// under roots)."""
    from serving.data import DataResolver
    from serving.jobs import LocalFileResolver
    from serving.lsclient import LabelStudioClient

    inner = DataResolver(settings, LabelStudioClient(settings))
    return LocalFileResolver(list(roots), lambda: inner, settings) if roots else inner


# ---------------------------------------------------------------------------------------------- one job


def run_job(
    job: TrainingJob,
    *,
    store: TrainingStore,
    versions: VersionStore,
    families: Families,
    settings: Settings,
    stop: threading.Event | None = None,
    resolver: Any = None,
    http: Any = None,
) -> TrainingJob:
    """Run one claimed job to its end state; return the job as stored afterwards.

    done: a new version is published and the project's pointer moved to it. skipped: too few
    annotated tasks (TRAIN_MIN_EXAMPLES). failed / cancelled: nothing published, pointer untouched.
    A trainer that is stopping puts the job back to queued (it resumes from its checkpoint).
    """
    from serving.training import Run

    stop = stop or threading.Event()
    job_dir = store.job_dir(job.id)
    job_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(job_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    if level > logging.INFO or level == logging.NOTSET:
        root.setLevel(logging.INFO)  # the job's log keeps its progress whatever LOG_LEVEL says
    output = job_dir / "output"
    started = time.monotonic()
    try:
        log.info(
            "job %s: training %s for project %s on %s (attempt %d)",
            job.id,
            job.model_key,
            job.project,
            job.device,
            job.attempts,
        )
        cls = families.get(job.family)
        if cls is None:
            raise TrainingFailed(f"no model family {job.family!r} on this server")
        reason = cls.trainable(job.spec, settings)
        if reason:
            raise TrainingFailed(reason)
        plan = build_plan(job.config, settings, families)
        targets = plan.targets_of(job.model_key)
        if not targets:
            raise TrainingFailed(f"the labeling config no longer uses {job.model_key}")
        tasks = load_tasks(job, store, settings, http=http)
        if resolver is None:
            resolver = default_resolver(settings)
        examples, stats = examples_from_tasks(tasks, targets, load_text=resolver.load_text)
        snapshot = {
            **stats.as_dict(),
            "sha1": export_sha1(tasks),
            "task_ids": [t.get("id") for t in tasks if isinstance(t, dict)][:10000],
        }
        store.update(job.id, snapshot=snapshot)
        for why in stats.reasons[:5]:
            log.warning("job %s: region dropped: %s", job.id, why)
        if stats.annotated < settings.train_min_examples:
            reason = (
                f"{stats.annotated} annotated task(s) usable for {job.model_key}; training needs at least "
                f"{settings.train_min_examples} (TRAIN_MIN_EXAMPLES)"
            )
            log.info("job %s: skipped: %s", job.id, reason)
            store.finish(job.id, "skipped", reason=reason)
            return _reload(store, job)
        if output.exists():
            shutil.rmtree(output)
        # the version folder-to-be: the model in model/, the manifest beside it (so it never
        # changes the weights' fingerprint)
        (output / "model").mkdir(parents=True)
        run = Run(
            job=job,
            store=store,
            settings=settings,
            targets=targets,
            examples=examples,
            output_dir=output / "model",
            device=job.device,
            resolver=resolver,
            stop=stop,
        )
        if run.checkpoint is not None:
            log.info("job %s: resuming at epoch %d from %s", job.id, run.start_epoch, run.checkpoint)
        result = cls.train(run)
        if store.cancel_requested(job.id):
            raise TrainCancelled("cancelled")
        model_path = "/".join(p for p in ("model", str(result.model_path or "").strip("/")) if p)
        if not (output / model_path).exists() or not any((output / "model").iterdir()):
            raise TrainingFailed(f"{cls.family}.train() wrote no {model_path} into its output folder")
        trained_spec = dataclasses.replace(job.spec, path=str(output / model_path), trained="new")
        model_version = plan_version(plan.with_models({job.model_key: trained_spec}), families, settings)
        entry = versions.publish(
            job.project,
            job.spec,
            output,
            model_path,
            {
                "job_id": job.id,
                "model_version": model_version,
                "labels": list(run.labels),
                "metrics": dict(result.metrics),
                "examples": stats.examples,
                "snapshot_sha1": snapshot["sha1"],
                "config": job.config,
                "seconds": round(time.monotonic() - started, 1),
            },
            keep=settings.train_keep_versions,
        )
        store.finish(
            job.id,
            "done",
            version=entry["version"],
            model_version=model_version,
            metrics=dict(result.metrics),
            reason=None,
        )
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
        log.info(
            "job %s: done in %.1f s: version %s, model_version %s, metrics %s",
            job.id,
            time.monotonic() - started,
            entry["version"],
            model_version,
            dict(result.metrics),
        )
    except TrainCancelled:
        if store.cancel_requested(job.id):
            log.info("job %s: cancelled", job.id)
            store.finish(job.id, "cancelled", reason="cancelled while running")
        else:
            log.info("job %s: interrupted (the trainer is stopping); it resumes from its checkpoint", job.id)
            store.update(job.id, state="queued")
        shutil.rmtree(output, ignore_errors=True)
    except TrainingFailed as exc:
        log.error("job %s: failed: %s", job.id, exc)
        store.finish(job.id, "failed", error=str(exc))
        shutil.rmtree(output, ignore_errors=True)
    except Exception as exc:
        log.exception("job %s: failed", job.id)
        store.finish(job.id, "failed", error=f"{type(exc).__name__}: {str(exc)[:500]} (see the job's log)")
        shutil.rmtree(output, ignore_errors=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    return _reload(store, job)


def _reload(store: TrainingStore, job: TrainingJob) -> TrainingJob:
    fresh = store.get(job.id)
    return fresh if fresh is not None else job


# ---------------------------------------------------------------------------------------------- the process


def serve(
    settings: Settings,
    families: Families,
    device: str,
    stop: threading.Event | None = None,
    idle_s: float | None = None,
    lock_wait_s: float = 3.0,
) -> int:
    """Hold the device's trainer lock and run its jobs until idle; return how many ran (0: another trainer has it)."""
    stop = stop or threading.Event()
    lock = FileLock(lock_path(settings, device))
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_wait_s
    while not lock.acquire():
        if time.monotonic() > deadline or stop.is_set():
            log.info("another trainer runs %s jobs; exiting", device)
            return 0
        time.sleep(0.1)
    store = TrainingStore.for_settings(settings)
    versions = VersionStore.for_settings(settings)
    idle = settings.train_idle_s if idle_s is None else idle_s
    ran = 0
    try:
        log.info("trainer for %s started (pid %d)", device, os.getpid())
        idle_since = time.monotonic()
        while not stop.is_set():
            job = store.claim(device)
            if job is None:
                if device in store.has_work():
                    idle_since = time.monotonic()  # a queued job waits for its burst to end: not idle
                elif time.monotonic() - idle_since >= idle:
                    break
                stop.wait(0.5)
                continue
            run_job(job, store=store, versions=versions, families=families, settings=settings, stop=stop)
            ran += 1
            idle_since = time.monotonic()
    finally:
        lock.release()
        store.close()
        log.info("trainer for %s exits after %d job(s)", device, ran)
    return ran


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m serving.trainer`: settings JSON on stdin, device and families in argv."""
    parser = argparse.ArgumentParser(description="run training jobs of one device (started by the server)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--families", required=True, help="module:attribute of the family registry")
    parser.add_argument("--idle-s", type=float, default=None)
    args = parser.parse_args(argv)
    settings = settings_from_json(sys.stdin.read())
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        stream=sys.stderr,
        format="[%(asctime)s] [%(levelname)s] [trainer %(process)d] [%(name)s] %(message)s",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    families = load_families(args.families)
    serve(settings, families, args.device, stop=stop, idle_s=args.idle_s)
    return 0


def spawn_trainer(settings: Settings, families_ref: str, device: str, idle_s: float | None = None) -> Any:
    """Start `python -m serving.trainer` as a fresh interpreter (never a fork); return its Popen."""
    import serving

    root = Path(serving.__file__).resolve().parent.parent  # where `serving` and the families import from
    argv = [sys.executable, "-m", "serving.trainer", "--device", device, "--families", families_ref]
    if idle_s is not None:
        argv += ["--idle-s", str(idle_s)]
    proc = subprocess.Popen(argv, cwd=str(root), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(settings_to_json(settings).encode())
    proc.stdin.close()
    log.info("started the %s trainer (pid %d)", device, proc.pid)
    return proc


class TrainerSupervisor:
    """In each worker: start a trainer for every device with waiting jobs and no live trainer."""

    def __init__(
        self,
        settings: Settings,
        families_ref: str,
        store: TrainingStore | None = None,
        poll_s: float = 5.0,
        spawn: Callable[..., Any] = spawn_trainer,
    ) -> None:
        """Remember how to start trainers; the watcher thread starts on the first kick()."""
        self.settings = settings
        self.families_ref = families_ref
        self.store = store or TrainingStore.for_settings(settings)
        self.poll_s = poll_s
        self._spawn = spawn
        self._procs: dict[str, Any] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> None:
        """Look for work now (after a request), off the caller's thread."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="trainer-supervisor", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.ensure()
            except Exception:
                log.exception("trainer supervisor check failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def ensure(self) -> list[str]:
        """Start a trainer for each device with queued or orphaned jobs and no trainer; return those devices."""
        started = []
        for device in self.store.has_work():
            proc = self._procs.get(device)
            if proc is not None and proc.poll() is None:
                continue
            if FileLock(lock_path(self.settings, device)).held_elsewhere():
                continue
            self._procs[device] = self._spawn(self.settings, self.families_ref, device)
            started.append(device)
        return started

    def close(self, timeout: float = 10.0) -> None:
        """Stop watching; ask our trainers to stop (their jobs go back to queued) and wait up to `timeout` s."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for device, proc in self._procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("the %s trainer (pid %d) did not stop in %.0f s", device, proc.pid, timeout)


if __name__ == "__main__":  # pragma: no cover - the trainer process
    sys.exit(main())
