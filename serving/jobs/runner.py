"""Running one job store to completion: chunk by chunk, each chunk's results committed with the progress.

A crash at any point resumes from the last committed chunk with no task lost and none predicted twice
(`results.idx` is the primary key); a flock on the store's side file makes one process run a job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from serving.errors import Overloaded, ServingError
from serving.inference.runtime import Runtime, TaskFailure
from serving.jobs.inputs import iter_source
from serving.jobs.predictor import PredictFn, Predictor, as_predictor
from serving.jobs.store import INGEST_BATCH, TERMINAL, JobFailed, JobStore, now
from serving.settings import Settings
from serving.util.locks import FileLock

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 32

ProgressFn = Callable[[int, int | None], None]


class RunProgress:
    """Progress of one run of a job: committed count, tasks predicted by this run, its start time."""

    def __init__(self, done: int, total: int | None, progress: ProgressFn | None) -> None:
        self.done = done
        self.total = total
        self.progress = progress
        self.predicted = 0
        self.started = time.monotonic()


class JobRunner:
    """Run one job store to completion, chunk by chunk, committing each chunk with the progress."""

    def __init__(
        self,
        settings: Settings,
        predictor: Predictor | Runtime | PredictFn,
        chunk_size: int | None = None,
        stop: threading.Event | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        ready_timeout_s: float = 600.0,
        chunk_timeout_s: float = 3600.0,
    ) -> None:
        self.settings = settings
        self.predictor = as_predictor(predictor)
        self.chunk_size = max(1, int(chunk_size or getattr(settings, "job_chunk_size", 0) or DEFAULT_CHUNK))
        self.stop = stop or threading.Event()
        self.retries = retries
        self.backoff_s = backoff_s
        self.ready_timeout_s = ready_timeout_s
        self.chunk_timeout_s = chunk_timeout_s

    # ---- public ----
    def run(self, path: str | Path, progress: ProgressFn | None = None) -> dict[str, Any] | None:
        """Run (or resume) the job; return its final meta, or None when another process runs it."""
        store = JobStore(path)
        lock = FileLock(store.lock_path)
        if not lock.acquire():
            store.close()
            log.info("job %s is run by another process", path)
            return None
        try:
            return self._run(store, progress)
        finally:
            lock.release()
            store.close()

    def _run(self, store: JobStore, progress: ProgressFn | None) -> dict[str, Any]:
        meta = store.meta()
        job = meta.get("job_id", store.path)
        if meta.get("state") in TERMINAL:
            return meta
        if meta.get("cancel_requested"):
            store.set(state="cancelled", finished_at=now())
            return store.meta()
        resumed = meta.get("state") == "running"
        store.set(state="running", started_at=meta.get("started_at") or now(), error=None)
        try:
            if not meta.get("ingested"):
                self._ingest(store, meta)
            label_config = meta["label_config"]
            self.wait_ready(label_config)
            total = store.get("total")
            done = store.done_count()
            if resumed:
                log.info("job %s resumes at %d/%s", job, done, total)
            if progress:
                progress(done, total)
            session = RunProgress(done=done, total=total, progress=progress)
            outcome = self._predict_pending(store, label_config, session)
            if outcome == "cancelled":
                store.set(state="cancelled", finished_at=now())
                log.info("job %s cancelled at %d/%s", job, session.done, total)
                return store.meta()
            if outcome == "stopped":
                log.info(
                    "job %s paused at %d/%s (server stopping); it resumes on restart",
                    job,
                    session.done,
                    total,
                )
                return store.meta()
            store.set(state="done", finished_at=now())
            log.info("job %s done: %d tasks, %d failed", job, session.done, store.get("failed", 0))
        except (JobFailed, ServingError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            store.set(state="failed", error=message, finished_at=now())
            log.warning("job %s failed: %s", job, message)
        except Exception as exc:
            log.exception("job %s failed", job)
            store.set(state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=now())
        return store.meta()

    def _predict_pending(self, store: JobStore, label_config: str, session: RunProgress) -> str:
        """Predict every task without a committed result, chunk by chunk; return done, stopped or cancelled."""
        image_key = store.get("image_key")
        last = -1
        while not self.stop.is_set():
            if store.get("cancel_requested"):
                return "cancelled"
            # tasks without a result, in order: another engine may have left gaps (Ray commits out of order)
            rows = store.conn.execute(
                "SELECT i.idx, i.task, i.local FROM inputs i WHERE i.idx > ? AND NOT EXISTS "
                "(SELECT 1 FROM results r WHERE r.idx = i.idx) ORDER BY i.idx LIMIT ?",
                (last, self.chunk_size),
            ).fetchall()
            if not rows:
                return "done"
            tasks = [self._predict_task(task, local, image_key) for _, task, local in rows]
            outcomes = self.predict_chunk(label_config, tasks)
            self._commit(
                store,
                session,
                [(idx, pred, err) for (idx, _, _), (pred, err) in zip(rows, outcomes, strict=True)],
            )
            last = rows[-1][0]
        return "stopped"

    @staticmethod
    def _commit(
        store: JobStore,
        session: RunProgress,
        outcomes: Sequence[tuple[int, dict[str, Any] | None, str | None]],
    ) -> None:
        """Commit results and the job's progress in one transaction (the idx key refuses a second result)."""
        if not outcomes:
            return
        failed = sum(1 for _, _, err in outcomes if err is not None)
        version = next((p.get("model_version") for _, p, _ in outcomes if p), None)
        session.predicted += len(outcomes)
        elapsed = max(time.monotonic() - session.started, 1e-6)
        with store.tx() as conn:
            conn.executemany(
                "INSERT INTO results (idx, prediction, error) VALUES (?, ?, ?)",
                [
                    (int(idx), json.dumps(pred) if pred is not None else None, err)
                    for idx, pred, err in outcomes
                ],
            )
            updates: dict[str, Any] = {
                "done": session.done + len(outcomes),
                "failed": int(store.get("failed", 0)) + failed,
                "rate": session.predicted / elapsed,
                "updated_at": now(),
            }
            if version:
                updates["model_version"] = version
            store.set(conn, **updates)
        session.done += len(outcomes)
        if session.progress:
            session.progress(session.done, session.total)

    @staticmethod
    def _predict_task(task_json: str, local: str | None, image_key: str | None) -> dict[str, Any]:
        task = json.loads(task_json)
        if local and image_key:
            # predict from the local file; the stored task keeps the URL Label Studio will show
            task["data"] = {**task["data"], image_key: local}
        return task

    def _ingest(self, store: JobStore, meta: Mapping[str, Any]) -> None:
        """Copy a path input into the store (one transaction: a crash mid-way re-reads it from scratch)."""
        from serving.results.schema import ConfigSchema

        source = meta.get("source") or {}
        path = Path(source.get("path", ""))
        if not path.exists():
            raise JobFailed(f"input {path} no longer exists")
        keys = ConfigSchema.from_config(meta["label_config"]).image_keys()
        image_key = keys[0] if keys else None
        started = time.monotonic()
        with store.tx() as conn:
            conn.execute("DELETE FROM inputs")
            n = 0
            batch: list[tuple[int, str, str | None]] = []
            for i, (task, local) in enumerate(
                iter_source(path, self.settings, image_key, meta.get("url_prefix", ""))
            ):
                batch.append((i, json.dumps(task), local))
                n = i + 1
                if len(batch) >= INGEST_BATCH:
                    conn.executemany("INSERT INTO inputs (idx, task, local) VALUES (?, ?, ?)", batch)
                    batch = []
            if batch:
                conn.executemany("INSERT INTO inputs (idx, task, local) VALUES (?, ?, ?)", batch)
            store.set(conn, total=n, ingested=True, image_key=image_key)
        log.info(
            "job %s: read %d tasks from %s in %.1f s", meta.get("job_id"), n, path, time.monotonic() - started
        )

    def wait_ready(self, label_config: str) -> None:
        """Wait for the predictor's models of this config (a job must not fail while a model still loads)."""
        self.predictor.ready(label_config, self.ready_timeout_s, self.stop)

    def _call(
        self, label_config: str, tasks: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any] | None, str | None]]:
        failures: list[TaskFailure] = []
        # a job chunk is not bound by Label Studio's 100 s /predict timeout
        predictions = self.predictor.predict(label_config, tasks, failures, self.chunk_timeout_s)
        if not isinstance(predictions, list) or len(predictions) != len(tasks):
            got = len(predictions) if isinstance(predictions, list) else type(predictions).__name__
            raise RuntimeError(f"predict returned {got} predictions for {len(tasks)} tasks")
        reasons = {f.index: f.reason for f in failures}
        out: list[tuple[dict[str, Any] | None, str | None]] = []
        for i, p in enumerate(predictions):
            pred = p if isinstance(p, dict) else None
            reason = reasons.get(i)
            if pred is not None and "result" not in pred:
                # a failed task answers without "result" (so Label Studio retries it): an error here
                reason = reason or str(pred.get("error") or "the server returned no result for this task")
            out.append((pred, reason))
        return out

    def predict_chunk(
        self, label_config: str, tasks: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any] | None, str | None]]:
        """Return (prediction, failure reason) per task; retry overloads, isolate a failing task."""
        for attempt in range(self.retries + 1):
            try:
                return self._call(label_config, tasks)
            except Overloaded as exc:
                if attempt == self.retries:
                    break
                delay = min(30.0, max(float(getattr(exc, "retry_after_s", 1)), self.backoff_s * 2**attempt))
                log.info("predict overloaded; retrying in %.1f s", delay)
                if self.stop.wait(delay):
                    raise JobFailed("stopped while the server was overloaded") from None
            except (ServingError, JobFailed):
                raise  # bad config, model unavailable, auth, server gone: no task can succeed
            except Exception as exc:
                if len(tasks) > 1:
                    log.warning(
                        "predict failed for a chunk of %d (%s); retrying task by task", len(tasks), exc
                    )
                    return [self.predict_chunk(label_config, [t])[0] for t in tasks]
                return [(None, f"{type(exc).__name__}: {exc}")]
        return [(None, "the server stayed overloaded; retry the job later")] * len(tasks)
