"""Every training job in one SQLite file (MODEL_DIR/training/jobs.sqlite, WAL) that all workers and trainers share.

`request()` coalesces: while a job for (project, model) is queued, further requests join it; while one
runs, they become one follow-up job. A job moves queued -> running -> done | skipped | failed | cancelled;
a job whose trainer died (kill -9) is still "running" with no trainer holding its device lock, and the
next trainer resumes it from its last epoch checkpoint. `TrainingJobs` shows them under /jobs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.contract import (
    ModelSpec,
)
from serving.errors import NotFound
from serving.settings import Settings
from serving.util.sqlite import connect_wal

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "skipped", "failed", "cancelled")
TERMINAL = frozenset({"done", "skipped", "failed", "cancelled"})
# A job whose trainer died this many times (killed, out of memory) fails instead of looping.
MAX_ATTEMPTS = 3
_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def _now() -> float:
    return time.time()


@dataclass
class TrainingJob:
    """One row of the training store."""

    id: str
    project: str
    model_key: str
    family: str
    model_name: str
    model_path: str
    device: str
    state: str
    config: str
    source: dict[str, Any]
    requests: int = 1
    events: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    cancel_requested: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    snapshot: dict[str, Any] | None = None
    version: str | None = None
    model_version: str | None = None
    error: str | None = None
    reason: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    not_before: float = 0.0  # a queued job waits for the burst of requests that made it to end

    @property
    def spec(self) -> ModelSpec:
        """Return the model this job trains from (the config's pretrained model)."""
        return ModelSpec(self.family, self.model_name, self.model_path)


_JSON_COLUMNS = ("source", "events", "progress", "metrics", "snapshot")
_COLUMNS = (
    "id",
    "project",
    "model_key",
    "family",
    "model_name",
    "model_path",
    "device",
    "state",
    "config",
    "source",
    "requests",
    "events",
    "attempts",
    "cancel_requested",
    "progress",
    "metrics",
    "snapshot",
    "version",
    "model_version",
    "error",
    "reason",
    "created_at",
    "started_at",
    "updated_at",
    "finished_at",
    "not_before",
)


class TrainingStore:
    """Every training job in one SQLite file; one connection per thread; safe across processes."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, project TEXT NOT NULL, model_key TEXT NOT NULL,"
        " family TEXT NOT NULL, model_name TEXT NOT NULL, model_path TEXT NOT NULL DEFAULT '',"
        " device TEXT NOT NULL, state TEXT NOT NULL, config TEXT NOT NULL, source TEXT NOT NULL,"
        " requests INTEGER NOT NULL DEFAULT 1, events TEXT NOT NULL DEFAULT '{}',"
        " attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,"
        " progress TEXT NOT NULL DEFAULT '{}', metrics TEXT NOT NULL DEFAULT '{}', snapshot TEXT,"
        " version TEXT, model_version TEXT, error TEXT, reason TEXT, created_at REAL NOT NULL,"
        " started_at REAL, updated_at REAL, finished_at REAL, not_before REAL NOT NULL DEFAULT 0)",
        "CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (project, model_key, state)",
        "CREATE INDEX IF NOT EXISTS jobs_by_device ON jobs (device, state, created_at)",
    )

    def __init__(self, root: str | Path) -> None:
        """Open (creating) the store under `root` (MODEL_DIR/training)."""
        self.root = Path(root)
        self.path = self.root / "jobs.sqlite"
        self._local = threading.local()
        self._ready = False

    @classmethod
    def for_settings(cls, settings: Settings) -> TrainingStore:
        """Return the store under MODEL_DIR/training."""
        return cls(Path(settings.model_dir) / "training")

    def exists(self) -> bool:
        """Return True once any job was ever recorded (nothing is created by reading)."""
        return self.path.exists()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.root.mkdir(parents=True, exist_ok=True)
            conn = connect_wal(self.path, 60.0)
            if not self._ready:
                for statement in self.SCHEMA:
                    conn.execute(statement)
                self._ready = True
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """Run statements in one write transaction (BEGIN IMMEDIATE: one writer at a time)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def job_dir(self, job_id: str) -> Path:
        """Return a job's folder (log, data snapshot, checkpoints, output)."""
        if not _ID_RE.match(job_id):
            raise NotFound(f"no training job {job_id[:40]!r}")
        return self.root / job_id

    @staticmethod
    def _row(row: sqlite3.Row | tuple[Any, ...]) -> TrainingJob:
        values = dict(zip(_COLUMNS, row, strict=True))
        for key in _JSON_COLUMNS:
            raw = values[key]
            values[key] = json.loads(raw) if raw else (None if key == "snapshot" else {})
        values["cancel_requested"] = bool(values["cancel_requested"])
        return TrainingJob(**values)

    def get(self, job_id: str) -> TrainingJob | None:
        """Return a job, or None."""
        if not self.exists() or not isinstance(job_id, str) or not _ID_RE.match(job_id):
            return None
        row = (
            self._conn().execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        return self._row(row) if row else None

    def jobs(
        self, project: str | None = None, states: Sequence[str] | None = None, limit: int = 200
    ) -> list[TrainingJob]:
        """Return jobs, newest first (optionally of one project / in some states)."""
        if not self.exists():
            return []
        where, args = [], []
        if project is not None:
            where.append("project = ?")
            args.append(project)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(states)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        rows = self._conn().execute(sql, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def request(
        self,
        project: str,
        spec: ModelSpec,
        device: str,
        config: str,
        source: Mapping[str, Any],
        event: str,
        debounce_s: float = 0.0,
        max_delay_s: float = 60.0,
        coalesce: bool = True,
        prepare: Callable[[str, bool], None] | None = None,
    ) -> tuple[str, bool]:
        """Record a training request for (project, model); return (job id, coalesced into a queued job).

        One transaction decides, so concurrent webhooks in several workers still make one job: a
        queued job takes the request (with the newest config and data source); otherwise (nothing
        queued, maybe one running) a new queued job is created: the running one's follow-up.
        A queued job starts `debounce_s` after the last request that joined it (so that a burst
        of annotation saves is one job), but never later than `max_delay_s` after it was created.
        `prepare(job id, coalesced)` runs inside the transaction (e.g. writes the job's data), so no
        trainer can claim the job before it is done.
        """
        now = _now()
        with self.tx() as conn:
            row = conn.execute(
                "SELECT id, events, created_at FROM jobs WHERE project = ? AND model_key = ? AND state = 'queued' "
                "ORDER BY created_at LIMIT 1",
                (project, spec.key),
            ).fetchone()
            if row is not None and coalesce:
                events = json.loads(row[1] or "{}")
                events[event] = events.get(event, 0) + 1
                not_before = min(now + debounce_s, float(row[2]) + max(max_delay_s, debounce_s))
                conn.execute(
                    "UPDATE jobs SET requests = requests + 1, events = ?, config = ?, source = ?, updated_at = ?,"
                    " not_before = ? WHERE id = ?",
                    (json.dumps(events), config, json.dumps(dict(source)), now, not_before, row[0]),
                )
                if prepare is not None:
                    prepare(str(row[0]), True)
                return str(row[0]), True
            job_id = uuid.uuid4().hex[:12]
            conn.execute(
                "INSERT INTO jobs (id, project, model_key, family, model_name, model_path, device, state, config,"
                " source, requests, events, created_at, updated_at, not_before) VALUES (?, ?, ?, ?, ?, ?, ?,"
                " 'queued', ?, ?, 1, ?, ?, ?, ?)",
                (
                    job_id,
                    project,
                    spec.key,
                    spec.family,
                    spec.name,
                    spec.path,
                    device,
                    config,
                    json.dumps(dict(source)),
                    json.dumps({event: 1}),
                    now,
                    now,
                    now + debounce_s,
                ),
            )
            if prepare is not None:
                prepare(job_id, False)
            return job_id, False

    def claim(self, device: str) -> TrainingJob | None:
        """Take the next job of a device for the trainer holding its lock: an orphan first, else the oldest queued.

        An orphan is a job left "running" by a trainer that died (only the lock holder runs jobs of a
        device, so a running job it did not start has no process); it resumes from its checkpoint,
        unless it already killed MAX_ATTEMPTS trainers.
        """
        if not self.exists():
            return None
        now = _now()
        with self.tx() as conn:
            row: Any = None
            while True:
                row = conn.execute(
                    "SELECT id, attempts FROM jobs WHERE device = ? AND state = 'running' ORDER BY started_at LIMIT 1",
                    (device,),
                ).fetchone()
                if row is not None and row[1] >= MAX_ATTEMPTS:
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                        (
                            f"the trainer died {row[1]} times running this job (killed, or out of memory?); "
                            "see the job's log and the server log",
                            now,
                            now,
                            row[0],
                        ),
                    )
                    continue
                break
            if row is None:
                row = conn.execute(
                    "SELECT id, attempts FROM jobs WHERE device = ? AND state = 'queued' AND not_before <= ?"
                    " ORDER BY created_at LIMIT 1",
                    (device, now),
                ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
                " updated_at = ?, error = NULL WHERE id = ?",
                (now, now, row[0]),
            )
        return self.get(str(row[0]))

    def start(self, job_id: str) -> TrainingJob:
        """Mark one queued (or orphaned running) job running for a caller holding its device's lock (the CLI)."""
        now = _now()
        with self.tx() as conn:
            changed = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, ?),"
                " updated_at = ?, error = NULL WHERE id = ? AND state IN ('queued', 'running')",
                (now, now, job_id),
            ).rowcount
        job = self.get(job_id)
        if not changed or job is None:
            raise NotFound(f"training job {job_id} is not waiting to run")
        return job

    def has_work(self) -> list[str]:
        """Return the devices that have queued or running jobs."""
        if not self.exists():
            return []
        rows = (
            self._conn()
            .execute("SELECT DISTINCT device FROM jobs WHERE state IN ('queued', 'running')")
            .fetchall()
        )
        return [str(r[0]) for r in rows]

    def update(self, job_id: str, **values: Any) -> None:
        """Write some columns of a job (JSON columns given as Python values)."""
        values.setdefault("updated_at", _now())
        cols, args = [], []
        for key, value in values.items():
            if key not in _COLUMNS or key == "id":
                raise ValueError(f"unknown job column {key!r}")
            cols.append(f"{key} = ?")
            args.append(json.dumps(value) if key in _JSON_COLUMNS and value is not None else value)
        with self.tx() as conn:
            conn.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*args, job_id))

    def finish(self, job_id: str, state: str, **values: Any) -> None:
        """Move a job to a terminal state (or back to queued when its trainer stops)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        extra = {"finished_at": _now()} if state in TERMINAL else {}
        self.update(job_id, state=state, **extra, **values)

    def cancel_requested(self, job_id: str) -> bool:
        """Return True when someone asked to cancel the job."""
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def cancel(self, job_id: str) -> TrainingJob:
        """Cancel a job: a queued one at once, a running one at its next progress report."""
        now = _now()
        with self.tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no training job {job_id!r}")
            if row[0] == "queued":
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ?, updated_at = ?,"
                    " reason = 'cancelled before it started' WHERE id = ?",
                    (now, now, job_id),
                )
            elif row[0] == "running":
                conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id)
                )
        job = self.get(job_id)
        assert job is not None
        return job

    def delete(self, job_id: str) -> None:
        """Forget a finished job and remove its folder (never its published version)."""
        with self.tx() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def status(self, job: TrainingJob, log_lines: int = 20) -> dict[str, Any]:
        """Return a job's public status (what GET /jobs/{id} answers for a training job)."""
        tail: list[str] = []
        log_path = self.job_dir(job.id) / "train.log"
        with contextlib.suppress(OSError), open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            tail = fh.read().decode("utf-8", "replace").splitlines()[-log_lines:]
        return {
            "job_id": job.id,
            "kind": "training",
            "state": job.state,
            "project": job.project,
            "model": job.model_key,
            "family": job.family,
            "device": job.device,
            "requests": job.requests,
            "events": job.events,
            "attempts": job.attempts,
            "progress": job.progress,
            "metrics": job.metrics,
            "snapshot": job.snapshot,
            "version": job.version,
            "model_version": job.model_version,
            "error": job.error,
            "reason": job.reason,
            "cancel_requested": job.cancel_requested,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "updated_at": job.updated_at,
            "finished_at": job.finished_at,
            "starts_after": job.not_before if job.state == "queued" else None,
            "log": str(log_path),
            "log_tail": tail,
        }


class TrainingJobs:
    """Training jobs as /jobs shows them beside batch jobs (status, list, cancel/delete)."""

    def __init__(self, store: TrainingStore) -> None:
        """Serve the jobs of `store`."""
        self.store = store

    def status(self, job_id: str) -> dict[str, Any] | None:
        """Return a training job's status, or None when the id is not one."""
        job = self.store.get(job_id)
        return self.store.status(job) if job is not None else None

    def list(self) -> list[dict[str, Any]]:
        """Return every training job's status, newest first (without log lines)."""
        out = []
        for job in self.store.jobs():
            status = self.store.status(job, log_lines=0)
            status.pop("log_tail", None)
            out.append(status)
        return out

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running training job; delete a finished one (its version stays)."""
        job = self.store.get(job_id)
        if job is None:
            return None
        if job.state in TERMINAL:
            self.store.delete(job_id)
            return {"job_id": job_id, "kind": "training", "state": "deleted"}
        return self.store.status(self.store.cancel(job_id))
