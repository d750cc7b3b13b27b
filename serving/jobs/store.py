"""Persistent batch prediction jobs: chunked, resumable after a crash, streamed in and out.

Store: one SQLite file per job (WAL mode). A chunk's predictions and the job's progress are
committed in one transaction, and `results.idx` is the primary key, so a process killed at any
point resumes from the last committed chunk with no task lost and none written twice. WAL lets
/jobs readers in other gunicorn workers see progress while the runner writes; a `flock` on a
side file makes exactly one process run a job (the OS drops it when the process dies, so a
restarted server picks the job up). Inputs are copied into the store as they are streamed
(JSON via ijson, JSONL line by line, image folders by walking), so memory stays bounded and a
resumed job reads exactly the inputs it started with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from serving.errors import ConfigError, NotFound, ServingError
from serving.jobs.inputs import input_kind, normalize_task
from serving.util.sqlite import connect_wal

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = frozenset({"done", "failed", "cancelled"})
INGEST_BATCH = 1000


class JobNotReady(ServingError):
    """The job's result is asked for while it still runs."""

    status = 409
    code = "job_not_ready"


class JobFailed(Exception):
    """A job cannot go on (bad config, model unavailable, unreadable input); the message says why."""


# ---------------------------------------------------------------------------------------------- store


class JobStore:
    """One job's SQLite file: meta (key -> JSON), inputs, results; one connection per thread."""

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS inputs (idx INTEGER PRIMARY KEY, task TEXT NOT NULL, local TEXT)",
        "CREATE TABLE IF NOT EXISTS results (idx INTEGER PRIMARY KEY, prediction TEXT, error TEXT)",
        "CREATE TABLE IF NOT EXISTS push (chunk INTEGER PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL,"
        " state TEXT NOT NULL, before_count INTEGER)",
    )

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise NotFound(f"no job store at {self.path}")
        self.conn = connect_wal(self.path, 60.0, check_same_thread=False)
        if create:
            for statement in self.SCHEMA:
                self.conn.execute(statement)

    @property
    def lock_path(self) -> Path:
        """Return the side file whose flock marks the process that runs this job."""
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """Run statements in one write transaction."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def meta(self) -> dict[str, Any]:
        """Return every meta value."""
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def get(self, key: str, default: Any = None) -> Any:
        """Return one meta value."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, conn: sqlite3.Connection | None = None, **values: Any) -> None:
        """Write meta values (inside the caller's transaction when conn is given)."""
        rows = [(k, json.dumps(v)) for k, v in values.items()]
        if conn is not None:
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)
            return
        with self.tx() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

    def done_count(self) -> int:
        """Return how many tasks have a committed result."""
        return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def now() -> float:
    return round(time.time(), 3)


def create_store(
    path: str | Path,
    label_config: str,
    *,
    tasks: Iterable[Any] | None = None,
    input_path: str | Path | None = None,
    url_prefix: str = "",
    job_id: str = "",
    extra: Mapping[str, Any] | None = None,
) -> JobStore:
    """Create a job store: inline tasks are written now, a path input is read by the runner."""
    from serving.results.schema import ConfigSchema

    schema = ConfigSchema.from_config(label_config)
    store = JobStore(path, create=True)
    source: dict[str, Any]
    if input_path is not None:
        p = Path(input_path)
        source = {"kind": input_kind(p), "path": str(p)}
        if source["kind"] == "images" and not schema.image_keys():
            store.close()
            raise ConfigError(
                'a folder of images needs an <Image name=... value="$image"/> in the labeling config'
            )
    else:
        source = {"kind": "inline"}
    with store.tx() as conn:
        store.set(
            conn,
            job_id=job_id or path_id(store.path),
            state="queued",
            label_config=label_config,
            config_hash=schema.config_hash,
            source=source,
            url_prefix=url_prefix,
            total=None,
            done=0,
            failed=0,
            ingested=False,
            cancel_requested=False,
            created_at=now(),
            **dict(extra or {}),
        )
        if tasks is not None:
            n = 0
            batch: list[tuple[int, str, None]] = []
            for i, task in enumerate(tasks):
                batch.append((i, json.dumps(normalize_task(task, f"task #{i}")), None))
                n = i + 1
                if len(batch) >= INGEST_BATCH:
                    conn.executemany("INSERT INTO inputs (idx, task, local) VALUES (?, ?, ?)", batch)
                    batch = []
            if batch:
                conn.executemany("INSERT INTO inputs (idx, task, local) VALUES (?, ?, ?)", batch)
            store.set(conn, total=n, ingested=True)
    return store


def path_id(path: Path) -> str:
    """Return a job id from a store path (the folder name under jobs/, else the file stem)."""
    return path.parent.name if path.name == "job.sqlite" else path.stem
