"""Training on a project's annotations: requests, the job store, trained versions and the export conversion.

The pieces, each usable alone (the trainer process, serving/trainer.py, puts them together):

- `TrainingStore`: every training job in one SQLite file (`MODEL_DIR/training/jobs.sqlite`, WAL), so
  that all gunicorn workers and the trainer process see one state. `request()` coalesces: while a job
  for (project, model) is queued, further requests join it; while one runs, they become one
  follow-up job. A job moves queued -> running -> done | skipped | failed | cancelled; a job whose
  trainer died (kill -9) is still "running" with no trainer holding its device lock, and the next
  trainer resumes it from its last epoch checkpoint.
- `VersionStore`: trained models under `MODEL_DIR/versions/<project>/<model>/<version>/` (moved there
  whole by one rename) and, per project, a `current.json` pointer replaced atomically. Workers stat
  the pointer on each /setup and /predict of the project and re-read it only when it changed.
- `examples_from_tasks`: a Label Studio JSON export (or /train's tasks) -> `Example`s for one model:
  cancelled and skipped annotations dropped, the latest annotation per task, every region checked
  against the config (labels in the config, span offsets inside the text and matching its text).
- `Run`: the `TrainingRun` a family's train() gets (progress, checkpoints, images in pixels).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
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
from typing import TYPE_CHECKING, Any

from serving import regions
from serving.contract import (
    BoxPct,
    Example,
    ModelSpec,
    Target,
    TrainCancelled,
    TrainingRun,
    weights_fingerprint,
)
from serving.errors import BadRequest, InputError, NotFound
from serving.settings import Settings
from serving.sqlitedb import connect_wal

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "skipped", "failed", "cancelled")
TERMINAL = frozenset({"done", "skipped", "failed", "cancelled"})
# A job whose trainer died this many times (killed, out of memory) fails instead of looping.
MAX_ATTEMPTS = 3
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VERSION_RE = re.compile(r"^v(\d+)-[0-9a-z]+$")
POINTER = "current.json"
MANIFEST = "version.json"
BASE_VERSION_NAMES = frozenset({"base", "pretrained", "untrained"})


# ---------------------------------------------------------------------------------------------- names


def project_key(raw: Any) -> str | None:
    """Return the project id as a folder name: "3" from "3.1795429160", 3, or {"id": 3}; None when absent.

    Label Studio names a project "<id>.<created timestamp>" in /setup and /predict, and by a
    project object in webhooks; the id part names the project. Anything else that is not a plain
    name (slashes, dots, ..) is refused, so a project can never name a path outside MODEL_DIR.
    """
    if isinstance(raw, Mapping):
        raw = raw.get("id")
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, int):
        return str(raw)
    if not isinstance(raw, str) or not raw.strip():
        return None
    text = raw.strip()
    head, dot, tail = text.partition(".")
    if dot and head.isdigit() and tail.isdigit():
        text = head
    return text if _PROJECT_RE.match(text) else None


def model_slug(key: str) -> str:
    """Return a folder name for a model key ("ner:dslim/bert-base-NER" -> "ner-dslim_bert-base-NER-1a2b3c")."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key.replace(":", "-")).strip("._")[:80]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def training_device(settings: Settings) -> str:
    """Return the device training jobs run on: TRAIN_DEVICE, else DEVICE, else cuda when available, else cpu."""
    from serving.runtime import pick_device

    return settings.train_device or pick_device(settings)


def device_slug(device: str) -> str:
    """Return a file-name form of a device ("cuda:1" -> "cuda-1")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", device) or "cpu"


def _now() -> float:
    return time.time()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync it, and rename it over `path` (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created) for the block: one writer across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- jobs


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


# ---------------------------------------------------------------------------------------------- versions


class VersionStore:
    """Trained models per project and model, and each project's `current.json` pointer."""

    def __init__(self, root: str | Path) -> None:
        """Use `root` (MODEL_DIR/versions); nothing is created until a version is published."""
        self.root = Path(root)

    @classmethod
    def for_settings(cls, settings: Settings) -> VersionStore:
        """Return the store under MODEL_DIR/versions."""
        return cls(Path(settings.model_dir) / "versions")

    def project_dir(self, project: str) -> Path:
        """Return a project's folder (refusing names that are not plain project ids)."""
        if not _PROJECT_RE.match(project):
            raise BadRequest(f"project {project[:40]!r} is not a Label Studio project id")
        return self.root / project

    def projects(self) -> list[str]:
        """Return the projects that have a folder here, sorted (other entries, e.g. lost+found, are skipped)."""
        try:
            entries = list(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            return []
        return sorted(p.name for p in entries if _PROJECT_RE.match(p.name) and p.is_dir())

    def pointer_path(self, project: str) -> Path:
        """Return the project's pointer file."""
        return self.project_dir(project) / POINTER

    def stat(self, project: str) -> tuple[int, int, int] | None:
        """Return (mtime_ns, inode, size) of the project's pointer, None when it has none: one stat() call."""
        try:
            st = os.stat(self.pointer_path(project))
        except (OSError, BadRequest):
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def pointer(self, project: str) -> dict[str, Any]:
        """Return the project's pointer: {"models": {model key: entry}, "updated_at": ...}."""
        try:
            data = json.loads(self.pointer_path(project).read_text(encoding="utf-8"))
        except (OSError, ValueError, BadRequest):
            return {"models": {}}
        return data if isinstance(data, dict) and isinstance(data.get("models"), dict) else {"models": {}}

    def spec_of(self, project: str, entry: Mapping[str, Any]) -> ModelSpec:
        """Return the trained ModelSpec a pointer entry names (absolute path, so loaders need no MODEL_DIR)."""
        folder = (self.project_dir(project) / str(entry["folder"])).resolve()
        rel = str(entry.get("model_path") or "")
        return ModelSpec(
            str(entry["family"]),
            str(entry["name"]),
            str(folder / rel) if rel else str(folder),
            trained=str(entry["version"]),
        )

    def current(self, project: str) -> dict[str, ModelSpec]:
        """Return {pretrained model key: trained spec} of the project's active versions."""
        out = {}
        for key, entry in self.pointer(project).get("models", {}).items():
            try:
                out[str(key)] = self.spec_of(project, entry)
            except (KeyError, TypeError) as exc:
                log.warning("project %s: bad pointer entry for %s: %s", project, key, exc)
        return out

    def model_dir(self, project: str, model_key: str) -> Path:
        """Return where the versions of one model of a project live."""
        return self.project_dir(project) / model_slug(model_key)

    def manifests(self, project: str, model_key: str | None = None) -> list[dict[str, Any]]:
        """Return the manifests of a project's versions (of one model or all), newest first."""
        base = self.project_dir(project)
        if not base.is_dir():
            return []
        folders = (
            [self.model_dir(project, model_key)] if model_key else [p for p in base.iterdir() if p.is_dir()]
        )
        found = []
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _VERSION_RE.match(entry.name)
                if not match or not (entry / MANIFEST).is_file():
                    continue
                try:
                    manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                manifest["folder"] = f"{folder.name}/{entry.name}"
                found.append(manifest)
        return sorted(
            found, key=lambda m: (float(m.get("created_at") or 0), str(m.get("version"))), reverse=True
        )

    def publish(
        self,
        project: str,
        spec: ModelSpec,
        output: Path,
        model_path: str,
        manifest: Mapping[str, Any],
        keep: int,
    ) -> dict[str, Any]:
        """Move a finished model into its version folder (one rename), point the project at it, prune old ones.

        `output` holds the model under model/ (model_path is relative to `output`); the manifest is
        written beside it. The folder appears complete or not at all; the pointer moves after it, in one rename; only
        then are versions beyond the last `keep` removed (never the active one).
        """
        folder = self.model_dir(project, spec.key)
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = weights_fingerprint(output / "model")
        with _flock(self.project_dir(project) / ".lock"):
            numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name))]
            version = f"v{max(numbers, default=0) + 1}-{fingerprint}"
            entry = {
                **dict(manifest),
                "version": version,
                "model": spec.key,
                "family": spec.family,
                "name": spec.name,
                "model_path": model_path,
                "project": project,
                "created_at": _now(),
            }
            (output / MANIFEST).write_text(json.dumps(entry, ensure_ascii=False, indent=1), encoding="utf-8")
            final = folder / version
            try:
                os.rename(output, final)
            except OSError:  # another file system (MODEL_DIR parts mounted apart): copy, then one rename
                staging = folder / f".{version}.{uuid.uuid4().hex[:6]}.tmp"
                shutil.copytree(output, staging)
                os.rename(staging, final)
                shutil.rmtree(output, ignore_errors=True)
            self._point(project, spec.key, entry, f"{folder.name}/{version}")
            self._prune(project, spec.key, keep)
        entry["folder"] = f"{folder.name}/{version}"
        return entry

    def _point(self, project: str, model_key: str, entry: Mapping[str, Any] | None, folder: str = "") -> None:
        """Set (or with entry None, remove) one model of the project's pointer; caller holds the lock."""
        pointer = self.pointer(project)
        models = dict(pointer.get("models", {}))
        previous = models.get(model_key)
        if entry is None:
            models.pop(model_key, None)
        else:
            models[model_key] = {
                "version": entry["version"],
                "family": entry["family"],
                "name": entry["name"],
                "model_path": entry.get("model_path", ""),
                "folder": folder,
            }
        write_json_atomic(
            self.pointer_path(project),
            {"models": models, "updated_at": _now(), "previous": {model_key: previous}},
        )

    def _prune(self, project: str, model_key: str, keep: int) -> None:
        active = self.pointer(project).get("models", {}).get(model_key, {}).get("version")
        folder = self.model_dir(project, model_key)
        versions = sorted(
            ((int(m.group(1)), p) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name))),
            reverse=True,
        )
        for rank, (_, path) in enumerate(versions):
            if rank >= max(1, keep) and path.name != active:
                shutil.rmtree(path, ignore_errors=True)
                log.info(
                    "project %s: removed old version %s (TRAIN_KEEP_VERSIONS=%d)", project, path.name, keep
                )

    def activate(self, project: str, model_key: str, version: str | None) -> None:
        """Point a project's model at one of its versions, or (version None) back at the pretrained model."""
        with _flock(self.project_dir(project) / ".lock"):
            if version is None:
                self._point(project, model_key, None)
                return
            folder = self.model_dir(project, model_key) / version
            try:
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise NotFound(f"project {project} has no version {version!r} of {model_key}") from None
            self._point(project, model_key, manifest, f"{folder.parent.name}/{version}")


# ---------------------------------------------------------------------------------------------- examples


@dataclass
class ExportStats:
    """What the conversion kept and dropped, and why (first reasons only)."""

    tasks: int = 0
    annotated: int = 0  # tasks with at least one usable annotation
    examples: int = 0
    regions: int = 0
    dropped_regions: int = 0
    cancelled: int = 0
    reasons: list[str] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        """Count a dropped region and keep its reason (the first 20)."""
        self.dropped_regions += 1
        if len(self.reasons) < 20:
            self.reasons.append(reason)

    def as_dict(self) -> dict[str, Any]:
        """Return the counts for the job's snapshot."""
        return {
            "tasks": self.tasks,
            "annotated": self.annotated,
            "examples": self.examples,
            "regions": self.regions,
            "dropped_regions": self.dropped_regions,
            "cancelled_annotations": self.cancelled,
            "drop_reasons": self.reasons,
        }


def _stamp(annotation: Mapping[str, Any]) -> tuple[str, int]:
    when = annotation.get("updated_at") or annotation.get("created_at") or ""
    ident = annotation.get("id")
    return str(when), ident if isinstance(ident, int) else 0


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return the newest annotation of a task that was neither cancelled nor skipped, or None."""
    usable = [
        a
        for a in task.get("annotations") or ()
        if isinstance(a, Mapping)
        and not a.get("was_cancelled")
        and not a.get("skipped")
        and isinstance(a.get("result"), list)
    ]
    return max(usable, key=_stamp) if usable else None


def _utf16_to_codepoints(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Convert UTF-16 offsets (Label Studio's editor) to code-point offsets, or None when out of range."""
    units = 0
    cp_start = cp_end = None
    for i, ch in enumerate(text):
        if units == start:
            cp_start = i
        if units == end:
            cp_end = i
        units += 2 if ord(ch) > 0xFFFF else 1
    if units == end:
        cp_end = len(text)
    if units == start:
        cp_start = len(text)
    if cp_start is None or cp_end is None:
        return None
    return cp_start, cp_end


def _span(value: Mapping[str, Any], text: str) -> tuple[int, int] | str:
    """Return the code-point (start, end) of a Labels value on text, or why it is not usable."""
    start, end = value.get("start"), value.get("end")
    if (
        not (isinstance(start, int) and isinstance(end, int))
        or isinstance(start, bool)
        or isinstance(end, bool)
    ):
        return f"span offsets {start!r}, {end!r} are not integers (an HTML/XPath span?)"
    if not 0 <= start < end:
        return f"span [{start}, {end}) is empty or negative"
    quoted = value.get("text")
    if end <= len(text) and (not isinstance(quoted, str) or text[start:end] == quoted):
        return start, end
    converted = _utf16_to_codepoints(text, start, end)
    if converted is not None and (not isinstance(quoted, str) or text[converted[0] : converted[1]] == quoted):
        return converted
    if end > len(text):
        return f"span [{start}, {end}) is outside the text ({len(text)} characters)"
    return f"span text {str(quoted)[:40]!r} is not the text at [{start}, {end}) ({text[start:end][:40]!r})"


def _finite(*values: Any) -> bool:
    return all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)) for v in values
    )


def _labels_in(value: Mapping[str, Any], key: str, allowed: frozenset[str]) -> list[str] | str:
    labels = value.get(key)
    if not isinstance(labels, list) or not labels:
        return f"no {key} on the region"
    bad = [str(x) for x in labels if x not in allowed]
    if bad:
        return f"label {bad[0]!r} is not in the config (has {', '.join(sorted(allowed))})"
    return [str(x) for x in labels]


def examples_from_tasks(
    tasks: Sequence[Any],
    targets: Sequence[Target],
    load_text: Callable[[str, Any], str] | None = None,
) -> tuple[list[Example], ExportStats]:
    """Turn exported tasks into training examples for the targets one model fills.

    One example per (task, target) from the task's latest usable annotation; a task whose latest
    annotation has no region for a target still teaches "nothing here" (an example without regions).
    Regions whose labels are not in the config, whose spans leave the text or disagree with it,
    or whose geometry is not finite are dropped and counted.
    """
    stats = ExportStats()
    examples: list[Example] = []
    for task in tasks:
        if not isinstance(task, Mapping):
            continue
        stats.tasks += 1
        stats.cancelled += sum(
            1 for a in task.get("annotations") or () if isinstance(a, Mapping) and a.get("was_cancelled")
        )
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        raw_data = task.get("data")
        data: Mapping[str, Any] = raw_data if isinstance(raw_data, Mapping) else {}
        made = 0
        for target in targets:
            example = _example(task, data, annotation["result"], target, stats, load_text)
            if example is not None:
                examples.append(example)
                made += 1
        if made:
            stats.annotated += 1
    stats.examples = len(examples)
    return examples, stats


def _example(
    task: Mapping[str, Any],
    data: Mapping[str, Any],
    result: Sequence[Any],
    target: Target,
    stats: ExportStats,
    load_text: Callable[[str, Any], str] | None,
) -> Example | None:
    control, obj = target.control, target.obj
    value = data.get(obj.value_key) if obj.value_key else None
    if value is None:
        return None
    allowed = frozenset(target.label_map.config_labels)
    items = [
        r
        for r in result
        if isinstance(r, Mapping) and r.get("to_name") == obj.name and isinstance(r.get("value"), Mapping)
    ]
    task_id = task.get("id")
    if control.tag == "Labels" and obj.tag == "Text":
        if not isinstance(value, str):
            return None
        text = value
        if str(obj.attrs.get("valueType", "")).lower() == "url" and load_text is not None:
            try:
                text = load_text(value, task_id)
            except InputError as exc:
                stats.drop(f"task {task_id}: text not readable: {exc}")
                return None
        spans: list[tuple[int, int, str]] = []
        for item in items:
            if item.get("from_name") != control.name:
                continue
            labels = _labels_in(item["value"], "labels", allowed)
            if isinstance(labels, str):
                stats.drop(f"task {task_id}: {labels}")
                continue
            where = _span(item["value"], text)
            if isinstance(where, str):
                stats.drop(f"task {task_id}: {where}")
                continue
            spans.append((where[0], where[1], labels[0]))
        stats.regions += len(spans)
        return Example(task_id, control.name, obj.name, text=text, spans=tuple(sorted(spans)))
    if not isinstance(value, str):
        return None
    if control.tag == "Choices":
        choices: tuple[str, ...] = ()
        for item in items:
            if item.get("from_name") != control.name:
                continue
            picked = _labels_in(item["value"], "choices", allowed)
            if isinstance(picked, str):
                stats.drop(f"task {task_id}: {picked}")
                continue
            choices = tuple(picked)
        stats.regions += 1 if choices else 0
        return Example(task_id, control.name, obj.name, image=value, choices=choices)
    boxes = _boxes(items, target, allowed, stats, task_id)
    if boxes is None:
        return None
    stats.regions += len(boxes)
    return Example(task_id, control.name, obj.name, image=value, boxes=tuple(boxes))


def _boxes(
    items: Sequence[Mapping[str, Any]],
    target: Target,
    allowed: frozenset[str],
    stats: ExportStats,
    task_id: Any,
) -> list[BoxPct] | None:
    """Return the rectangles of a RectangleLabels control, or of a Rectangle with its linked Labels."""
    control = target.control
    if control.tag not in ("RectangleLabels", "Rectangle"):
        return None
    linked = target.linked.get("labels")
    label_of: dict[str, list[Any]] = {}
    if linked is not None:
        for item in items:
            if item.get("from_name") == linked.name and isinstance(item["value"].get("labels"), list):
                label_of[str(item.get("id"))] = item["value"]["labels"]
    boxes: list[BoxPct] = []
    for item in items:
        if item.get("from_name") != control.name:
            continue
        value = item["value"]
        if control.tag == "RectangleLabels":
            labels = _labels_in(value, "rectanglelabels", allowed)
        else:
            labels = _labels_in({"labels": label_of.get(str(item.get("id")))}, "labels", allowed)
        if isinstance(labels, str):
            stats.drop(f"task {task_id}: {labels}")
            continue
        x, y, w, h = (value.get(k) for k in ("x", "y", "width", "height"))
        rotation = value.get("rotation") or 0.0
        if not _finite(x, y, w, h, rotation) or w <= 0 or h <= 0:
            stats.drop(f"task {task_id}: rectangle {x!r},{y!r},{w!r},{h!r} is not a finite positive box")
            continue
        boxes.append(BoxPct(float(x), float(y), float(w), float(h), float(rotation), labels[0]))
    return boxes


HOLDOUT_MIN_EXAMPLES = 50


def split_holdout(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """Return (train, held out): every 10th example is held out once there are at least 50 (for the metrics)."""
    if len(examples) < HOLDOUT_MIN_EXAMPLES:
        return list(examples), []
    train = [e for i, e in enumerate(examples) if i % 10 != 9]
    return train, [e for i, e in enumerate(examples) if i % 10 == 9]


def precision_recall_f1(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Return precision, recall and F1 (rounded) and the support of true/false positive and negative counts."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(float(precision), 4),
        "recall": round(float(recall), 4),
        "f1": round(float(f1), 4),
        "support": int(tp + fn),
    }


def export_sha1(tasks: Sequence[Any]) -> str:
    """Return a hash of the data a job trained on (recorded with the job and its version)."""
    return hashlib.sha1(json.dumps(tasks, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- the run


class Run(TrainingRun):
    """The TrainingRun of one job: progress to the store, checkpoints in the job folder, images resolved."""

    def __init__(
        self,
        *,
        job: TrainingJob,
        store: TrainingStore,
        settings: Settings,
        targets: Sequence[Target],
        examples: Sequence[Example],
        output_dir: Path,
        device: str,
        resolver: Any,
        stop: threading.Event | None = None,
    ) -> None:
        """Set up the run; the checkpoint to resume from is the newest complete epoch folder."""
        self.job = job
        self.store = store
        self.spec = job.spec
        self.settings = settings
        self.targets = tuple(targets)
        labels: list[str] = []
        for target in self.targets:
            labels.extend(label for label in target.label_map.config_labels if label not in labels)
        self.labels = tuple(labels)
        self.examples = list(examples)
        self.output_dir = output_dir
        self.device = device
        self.epochs = settings.train_epochs
        self.resolver = resolver
        self.stop = stop or threading.Event()
        self.checkpoints = store.job_dir(job.id) / "checkpoints"
        done = self.completed_epochs()
        self.start_epoch = (done[-1] if done else 0) + 1
        self.checkpoint = self.checkpoints / f"epoch-{done[-1]}" if done else None
        self._last_write = 0.0
        self._progress: dict[str, Any] = dict(job.progress or {})

    def completed_epochs(self) -> list[int]:
        """Return the epochs with a complete checkpoint folder, ascending."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for path in self.checkpoints.iterdir():
            match = re.fullmatch(r"epoch-(\d+)", path.name)
            if match and path.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def progress(
        self,
        epoch: int,
        step: int,
        loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        epochs: int | None = None,
        steps: int | None = None,
    ) -> None:
        """Record progress (written at most every 0.5 s, always with metrics); raise TrainCancelled to stop."""
        entry = self._progress
        entry.update({"epoch": int(epoch), "step": int(step)})
        if loss is not None and math.isfinite(float(loss)):
            entry["loss"] = round(float(loss), 6)
        if epochs is not None:
            entry["epochs"] = int(epochs)
        if steps is not None:
            entry["steps"] = int(steps)
        if metrics:
            entry["metrics"] = _jsonable(metrics)
        self._write(force=bool(metrics))

    def end_epoch(self, epoch: int, loss: float, metrics: Mapping[str, Any] | None = None) -> None:
        """Append the epoch's mean loss (and metrics) to the history; write it; raise TrainCancelled to stop."""
        entry = self._progress
        history = [h for h in entry.get("history", []) if int(h.get("epoch", 0)) < epoch]
        record: dict[str, Any] = {"epoch": int(epoch), "loss": _jsonable(float(loss))}
        if metrics:
            record["metrics"] = _jsonable(metrics)
            entry["metrics"] = record["metrics"]
        history.append(record)
        entry["history"] = history
        entry["epoch"] = int(epoch)
        log.info("job %s: epoch %d loss %.5f %s", self.job.id, epoch, loss, dict(metrics or {}))
        self._write(force=True)

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= 0.5:
            self._last_write = now
            self.store.update(self.job.id, progress=self._progress)
            if self.store.cancel_requested(self.job.id):
                raise TrainCancelled("cancelled")
        if self.stop.is_set():
            raise TrainCancelled("the trainer is stopping; the job resumes from its last checkpoint")

    def save_checkpoint(self, epoch: int, write: Callable[[Path], None]) -> None:
        """Fill a fresh folder with write(), rename it to epoch-<n> (atomic), then drop older epochs."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        staging = self.checkpoints / f".epoch-{epoch}.{uuid.uuid4().hex[:6]}.tmp"
        staging.mkdir()
        write(staging)
        final = self.checkpoints / f"epoch-{epoch}"
        if final.exists():  # a killed run may have saved this epoch before; the new one replaces it
            shutil.rmtree(final)
        os.rename(staging, final)
        self._progress["checkpoint_epoch"] = int(epoch)
        self.store.update(self.job.id, progress=self._progress)
        for old in self.completed_epochs():
            if old < epoch:
                shutil.rmtree(self.checkpoints / f"epoch-{old}", ignore_errors=True)
        log.info("job %s: checkpoint of epoch %d saved", self.job.id, epoch)

    def load_image(self, example: Example) -> tuple[Image.Image, np.ndarray, list[str]]:
        """Return the image as shown (RGB, EXIF applied) and its boxes in pixels (xyxy) with labels."""
        import numpy as np

        if example.image is None:
            raise InputError(f"task {example.task_id} has no image")
        task_id = example.task_id if isinstance(example.task_id, int) else None
        image = self.resolver.load_image(example.image, task_id)
        size = image.size  # the size Label Studio shows: percentages are of this
        boxes, labels = [], []
        for box in example.boxes:
            x0, y0, x1, y1 = regions.box_pct_to_xyxy_px(
                box.x, box.y, box.width, box.height, box.rotation, size
            )
            if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
                boxes.append((x0, y0, x1, y1))
                labels.append(box.label)
        array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return image, array, labels


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return round(number, 6) if math.isfinite(number) else None


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
