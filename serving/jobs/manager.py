"""The jobs of a server: created under MODEL_DIR/jobs, run one at a time in a background thread, inspected, cancelled.

Every worker and replica sharing MODEL_DIR sees the same jobs; a job left queued or running by a process
that died is picked up by the next one that scans (the store's flock tells which are still held).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.errors import BadRequest, NotFound
from serving.inference.runtime import Runtime
from serving.jobs.inputs import normalize_task
from serving.jobs.output import iter_result_text, job_status, output_task
from serving.jobs.predictor import PredictFn, Predictor
from serving.jobs.runner import JobRunner
from serving.jobs.store import TERMINAL, JobFailed, JobNotReady, JobStore, create_store, now
from serving.settings import Settings
from serving.util.locks import FileLock

log = logging.getLogger(__name__)

SYNC_LIMIT = 50  # POST /batch answers inline up to this many tasks
_ID_RE = re.compile(r"^[0-9a-f]{12}$")


EngineFactory = Callable[[threading.Event], "JobRunner"]


def _by_mtime(root: Path) -> list[Path]:
    """Return the entries of a folder, oldest first; entries another process deletes meanwhile are skipped."""
    stamped = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            stamped.append((entry.stat().st_mtime, entry.name, entry))
        except OSError:
            continue
    return [entry for *_, entry in sorted(stamped)]


class JobManager:
    """Create, run (one at a time, in a background thread), inspect, cancel and stream jobs under MODEL_DIR/jobs."""

    def __init__(
        self,
        settings: Settings,
        predictor: Predictor | Runtime | PredictFn,
        *,
        root: str | Path | None = None,
        chunk_size: int | None = None,
        sync_limit: int = SYNC_LIMIT,
        rescan_s: float | None = None,
        autostart: bool = True,
        engines: Mapping[str, EngineFactory] | None = None,
    ) -> None:
        self.settings = settings
        self.root = Path(root) if root is not None else Path(settings.model_dir) / "jobs"
        self.sync_limit = sync_limit
        self.rescan_s = rescan_s if rescan_s is not None else getattr(settings, "job_rescan_s", 30.0)
        self._stop = threading.Event()
        self.runner = JobRunner(settings, predictor, chunk_size, stop=self._stop)
        # other engines (Ray) build their runner on first use, with the manager's stop event
        self._engine_factories: dict[str, EngineFactory] = dict(engines or {})
        self._runners: dict[str, JobRunner] = {"local": self.runner}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._autostart = autostart
        # Other kinds of job shown under /jobs (training): each has status(id) -> dict | None,
        # list() -> [dict] and cancel(id) -> dict | None.
        self.sources: list[Any] = []
        # Started even before any job exists: a replica sharing MODEL_DIR must pick up the jobs that
        # another replica created and left behind when it died, whether or not it ever created one.
        if autostart:
            self.start()

    @property
    def engines(self) -> tuple[str, ...]:
        """Return the engines jobs can run on here ("local", and "ray" when configured)."""
        return ("local", *self._engine_factories)

    def runner_for(self, engine: str) -> JobRunner:
        """Return the runner of an engine, built on first use; JobFailed when this server lacks it."""
        with self._lock:
            runner = self._runners.get(engine)
            if runner is None:
                factory = self._engine_factories.get(engine)
                if factory is None:
                    raise JobFailed(
                        f"this job runs on engine {engine!r}, which this server does not offer "
                        f"(engines here: {', '.join(self.engines)}); set RAY_ADDRESS on the server for 'ray'"
                    )
                runner = self._runners[engine] = factory(self._stop)
        return runner

    # ---- paths ----
    def db_path(self, job_id: str) -> Path:
        """Return the store of a job id; NotFound for malformed ids (no path tricks)."""
        if not isinstance(job_id, str) or not _ID_RE.match(job_id):
            raise NotFound(f"no job {str(job_id)[:40]!r}")
        return self.root / job_id / "job.sqlite"

    def _open(self, job_id: str) -> JobStore:
        path = self.db_path(job_id)
        if not path.exists():
            raise NotFound(f"no job {job_id!r}: it never existed or was deleted")
        return JobStore(path)

    # ---- lifecycle ----
    def start(self) -> None:
        """Start the runner thread and queue the jobs left queued or running by an earlier process."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
            self._thread.start()
        self.scan()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current chunk; running jobs stay resumable."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def scan(self) -> list[str]:
        """Queue jobs in state queued/running that no live process runs; return their ids."""
        found: list[str] = []
        if not self.root.is_dir():
            return found
        for entry in _by_mtime(self.root):
            db = entry / "job.sqlite"
            if not (_ID_RE.match(entry.name) and db.exists()):
                continue
            try:
                store = JobStore(db)
                try:
                    state = store.get("state")
                finally:
                    store.close()
            except sqlite3.Error as exc:
                log.warning("skipping unreadable job store %s: %s", db, exc)
                continue
            lock = FileLock(db.with_name(db.name + ".lock"))
            if state in ("queued", "running") and not lock.held_elsewhere() and self._enqueue(entry.name):
                found.append(entry.name)
        if found:
            log.info("queued unfinished jobs %s", ", ".join(found))
        return found

    def _enqueue(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._pending:
                return False
            self._pending.add(job_id)
        self._queue.put(job_id)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=self.rescan_s)
            except queue.Empty:
                try:
                    self.scan()
                except Exception:
                    log.exception("job rescan failed")
                continue
            if job_id is None:
                return
            try:
                self._run_job(job_id)
            except Exception:
                log.exception("job %s crashed the runner", job_id)
            finally:
                with self._lock:
                    self._pending.discard(job_id)

    def _run_job(self, job_id: str) -> None:
        path = self.db_path(job_id)
        if not path.exists():  # deleted through another replica meanwhile
            return
        store = JobStore(path)
        try:
            engine = store.get("engine") or "local"
        finally:
            store.close()
        try:
            runner = self.runner_for(engine)
        except JobFailed as exc:
            # another process that offers the engine may hold the job: only fail it when none does
            store = JobStore(path)
            lock = FileLock(store.lock_path)
            try:
                if lock.acquire():
                    if store.get("state") not in TERMINAL:
                        store.set(state="failed", error=str(exc), finished_at=now())
                        log.warning("job %s failed: %s", job_id, exc)
                    lock.release()
            finally:
                store.close()
            return
        runner.run(path)

    # ---- operations ----
    def validate_config(self, label_config: Any) -> None:
        """Raise ConfigError/ModelUnavailable now rather than in the job."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise BadRequest("'label_config' (the labeling config XML) is missing")
        from serving.results.schema import ConfigSchema

        ConfigSchema.from_config(label_config)
        self.runner.predictor.check(label_config)

    def create(
        self,
        label_config: str,
        tasks: Sequence[Any] | None = None,
        input_path: str | Path | None = None,
        url_prefix: str = "",
        engine: str = "local",
    ) -> str:
        """Create a job from inline tasks or a server-side path and queue it; return its id."""
        if engine not in self.engines:
            raise BadRequest(
                f"engine {engine!r} is not available on this server (engines: {', '.join(self.engines)}); "
                "'ray' needs RAY_ADDRESS set on the server and Ray installed (requirements-ray.txt)"
            )
        self.validate_config(label_config)
        if (tasks is None) == (input_path is None):
            raise BadRequest(
                "send either 'tasks' (a list) or 'input' (a path under BATCH_INPUT_ROOT), not both"
            )
        if self._autostart:
            self.start()  # before the job exists, so its start-up scan only finds earlier jobs
        job_id = uuid.uuid4().hex[:12]
        job_dir = self.root / job_id
        job_dir.mkdir(parents=True, exist_ok=False)
        try:
            store = create_store(
                job_dir / "job.sqlite",
                label_config,
                tasks=tasks,
                input_path=input_path,
                url_prefix=url_prefix,
                job_id=job_id,
                extra={"engine": engine},
            )
        except Exception:
            import shutil

            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        store.close()
        log.info("job %s created (%s)", job_id, "inline" if tasks is not None else f"input {input_path}")
        self._enqueue(job_id)
        return job_id

    def predict_now(self, label_config: str, tasks: Sequence[Any]) -> list[dict[str, Any]]:
        """Predict a small input synchronously; return the import JSON (tasks with predictions)."""
        self.validate_config(label_config)
        normalized = [normalize_task(t, f"task #{i}") for i, t in enumerate(tasks)]
        outcomes = self.runner.predict_chunk(label_config, normalized)
        out = []
        for task, (pred, err) in zip(normalized, outcomes, strict=True):
            out.append(output_task(json.dumps(task), json.dumps(pred) if pred is not None else None, err))
        return out

    def _other(self, job_id: str, action: str) -> dict[str, Any] | None:
        """Return what another job source answers for a job id that is not a batch job, or None."""
        if not self.db_path(job_id).exists():
            for source in self.sources:
                found: dict[str, Any] | None = getattr(source, action)(job_id)
                if found is not None:
                    return found
        return None

    def status(self, job_id: str) -> dict[str, Any]:
        """Return a job's status (a batch job, or a job of another source such as training)."""
        other = self._other(job_id, "status")
        if other is not None:
            return other
        store = self._open(job_id)
        try:
            return job_status(store)
        finally:
            store.close()

    def list(self) -> list[dict[str, Any]]:
        """Return the status of every job, newest first."""
        out = []
        if self.root.is_dir():
            for entry in reversed(_by_mtime(self.root)):
                if _ID_RE.match(entry.name) and (entry / "job.sqlite").exists():
                    with contextlib.suppress(NotFound, sqlite3.Error):
                        s = self.status(entry.name)
                        s.pop("failures", None)
                        out.append(s)
        for source in self.sources:
            out.extend(source.list())
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (it stops after the current chunk); delete a finished one."""
        other = self._other(job_id, "cancel")
        if other is not None:
            return other
        path = self.db_path(job_id)
        store = self._open(job_id)
        try:
            state = store.get("state")
            if state in TERMINAL:
                import shutil

                store.close()
                shutil.rmtree(path.parent, ignore_errors=True)
                return {"job_id": job_id, "state": "deleted"}
            store.set(cancel_requested=True)
            if state == "queued" and not FileLock(store.lock_path).held_elsewhere():
                store.set(state="cancelled", finished_at=now())
            return job_status(store)
        finally:
            with contextlib.suppress(sqlite3.Error):
                store.close()

    def result(self, job_id: str, fmt: str = "json") -> Iterator[str]:
        """Return a generator of the job's import JSON/JSONL (opens its own connection on first use)."""
        if fmt not in ("json", "jsonl"):
            raise BadRequest(f"unknown format {fmt!r}: use json or jsonl")
        store = self._open(job_id)
        try:
            state = store.get("state")
            if state not in TERMINAL:
                s = job_status(store)
                raise JobNotReady(
                    f"job {job_id} is {state} ({s['done']}/{s['total']}); poll GET /jobs/{job_id} until state is done"
                )
        finally:
            store.close()
        path = self.db_path(job_id)

        def generate() -> Iterator[str]:
            reader = JobStore(path)  # opened in the thread that iterates
            try:
                yield from iter_result_text(reader, fmt)
            finally:
                reader.close()

        return generate()

    def wait(self, job_id: str, timeout: float = 60.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Block until a job reaches a terminal state (tests, scripts); return its status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status["state"] in TERMINAL or time.monotonic() > deadline:
                return status
            time.sleep(poll_s)
