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
import fcntl
import inspect
import json
import logging
import mimetypes
import os
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from serving.errors import BadRequest, ConfigError, InputError, NotFound, Overloaded, ServingError
from serving.settings import Settings
from serving.sqlitedb import connect_wal

if TYPE_CHECKING:
    from serving.data import Shrink

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL = frozenset({"done", "failed", "cancelled"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_CHUNK = 32
SYNC_LIMIT = 50  # POST /batch answers inline up to this many tasks
INGEST_BATCH = 1000
MAX_LISTED_FAILURES = 100
_ID_RE = re.compile(r"^[0-9a-f]{12}$")

PredictFn = Callable[..., list[dict[str, Any]]]
ProgressFn = Callable[[int, int | None], None]


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


class FileLock:
    """An exclusive, non-blocking flock; released by the OS when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def acquire(self) -> bool:
        """Take the lock; return False when another process (or handle) holds it."""
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        """Drop the lock."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def held_elsewhere(self) -> bool:
        """Return True when some process holds the lock now."""
        if not self.path.exists():
            return False
        if self.acquire():
            self.release()
            return False
        return True


# ---------------------------------------------------------------------------------------------- inputs


def normalize_task(obj: Any, where: str = "task") -> dict[str, Any]:
    """Return a Label Studio task: a task object as is, a bare data dict wrapped as {"data": ...}."""
    if not isinstance(obj, dict):
        raise BadRequest(
            f"{where} is a {type(obj).__name__}; each task must be an object (a task or its data)"
        )
    if isinstance(obj.get("data"), dict):
        return obj
    return {"data": obj}


def input_kind(path: Path) -> str:
    """Return "images", "jsonl" or "json" for an input path."""
    if path.is_dir():
        return "images"
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return "jsonl"
    return "json"


def iter_json_file(path: Path) -> Iterator[Any]:
    import ijson

    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
        fh.seek(0)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
            fh.read(3)
        if head[:1] == b"[":
            try:
                yield from ijson.items(fh, "item", use_float=True)
            except ijson.JSONError as exc:
                raise BadRequest(f"{path.name} is not valid JSON: {exc}") from None
            return
        if head[:1] == b"{":
            try:
                yield json.loads(fh.read())
            except ValueError as exc:
                raise BadRequest(f"{path.name} is not valid JSON: {exc}") from None
            return
    raise BadRequest(
        f"{path.name} must hold a JSON list of tasks (or one task object); use .jsonl for JSON lines"
    )


def iter_jsonl_file(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise BadRequest(f"{path.name} line {lineno} is not valid JSON: {exc}") from None


def iter_image_files(folder: Path) -> Iterator[Path]:
    """Yield the image files under a folder, recursively, in a stable (sorted) order; symlinks are skipped."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_symlink() and path.is_file():
                yield path


def image_value(path: Path, folder: Path, settings: Settings, url_prefix: str = "") -> tuple[str, str | None]:
    """Return (data value Label Studio will show, local URI to predict from or None when the same).

    Under LOCAL_FILES_DOCUMENT_ROOT the value is a local-files URL that Label Studio serves and the
    resolver reads from disk; with a URL prefix (where the same files are published) it is prefix +
    relative path; otherwise a file:// URI.
    """
    real = path.resolve()
    root = settings.local_files_document_root
    if root:
        root_real = Path(root).resolve()
        if real.is_relative_to(root_real):
            return "/data/local-files/?d=" + quote(real.relative_to(root_real).as_posix(), safe="/"), None
    local = real.as_uri()
    if url_prefix:
        rel = path.relative_to(folder).as_posix()
        return url_prefix.rstrip("/") + "/" + quote(rel, safe="/"), local
    return local, None


def iter_source(
    path: Path, settings: Settings, image_key: str | None, url_prefix: str = ""
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Yield (task, local URI or None) from a JSON list, a JSONL file or a folder of images."""
    kind = input_kind(path)
    if kind == "images":
        if not image_key:
            raise ConfigError(
                'a folder of images needs an <Image name=... value="$image"/> in the labeling config'
            )
        for file in iter_image_files(path):
            value, local = image_value(file, path, settings, url_prefix)
            yield {"data": {image_key: value}}, local
        return
    items = iter_jsonl_file(path) if kind == "jsonl" else iter_json_file(path)
    for i, obj in enumerate(items):
        yield normalize_task(obj, f"task #{i} of {path.name}"), None


def resolve_input_path(settings: Settings, raw: Any) -> Path:
    """Return a server-side input path under BATCH_INPUT_ROOT; refuse anything outside it."""
    root = getattr(settings, "batch_input_root", "")
    if not root:
        raise BadRequest(
            "server-side inputs are off: set BATCH_INPUT_ROOT on the server, or send 'tasks' inline"
        )
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise BadRequest(
            "'input' must be a path (relative to BATCH_INPUT_ROOT) of a .json/.jsonl file or a folder"
        )
    root_real = Path(root).resolve()
    candidate = Path(raw)
    real = (candidate if candidate.is_absolute() else root_real / candidate).resolve()
    if not real.is_relative_to(root_real):
        raise BadRequest(f"input {raw!r} is outside BATCH_INPUT_ROOT; give a path under it")
    if not real.exists():
        raise NotFound(f"input {raw!r} does not exist under BATCH_INPUT_ROOT")
    return real


# ---------------------------------------------------------------------------------------------- local files


class LocalFileResolver:
    """Read file:// images and texts under allowed roots; pass every other value to the normal resolver."""

    def __init__(
        self, roots: Sequence[str | Path], fallback: Callable[[], Any], settings: Settings | None = None
    ) -> None:
        self.roots = [Path(r).resolve() for r in roots if str(r)]
        self._fallback_factory = fallback
        self._fallback: Any = None
        self._lock = threading.Lock()
        self._max_pixels = settings.max_image_pixels if settings is not None else 0

    def _inner(self) -> Any:
        with self._lock:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
            return self._fallback

    def local_path(self, value: str) -> Path:
        """Return the path of a file:// URI under an allowed root; raise InputError otherwise."""
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"file URI {value[:200]!r} names a remote host")
        path = Path(unquote(parts.path)).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise InputError(f"{path} is outside the input folder; refused")
        if not path.is_file():
            raise InputError(f"{path} is not a file")
        return path

    def load_image(self, value: str, task_id: int | None = None, shrink: Shrink | None = None) -> Any:
        """Return an RGB, EXIF-transposed image (a JPEG maybe decoded smaller: see draft_for_model)."""
        if not (isinstance(value, str) and value.startswith("file://")):
            return self._inner().load_image(value, task_id, shrink=shrink)
        from PIL import Image, ImageOps

        from serving.data import ORIGINAL_SIZE, draft_for_model, to_rgb

        path = self.local_path(value)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if self._max_pixels > 0 and w * h > self._max_pixels:
                    raise InputError(
                        f"{path.name} is {w}x{h} pixels, over MAX_IMAGE_PIXELS={self._max_pixels}"
                    )
                original = draft_for_model(im, shrink)
                im.load()
                out = to_rgb(ImageOps.exif_transpose(im) or im)
                if original is not None:
                    out.info[ORIGINAL_SIZE] = original
                return out
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot decode image {path.name}: {type(exc).__name__}: {exc}") from None

    def load_text(self, value: Any, task_id: int | None = None, **kwargs: Any) -> str:
        """Return text (file:// read as UTF-8)."""
        if isinstance(value, str) and value.startswith("file://"):
            return self.local_path(value).read_text(encoding="utf-8", errors="replace")
        return str(self._inner().load_text(value, task_id, **kwargs))


def file_to_data_uri(value: str) -> str:
    """Return a data: URI with the bytes of a file:// URI (to send local images to a remote server)."""
    path = Path(unquote(urlsplit(value).path))
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    import base64

    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------- runner


def _now() -> float:
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
    from serving.validation import ConfigSchema

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
            created_at=_now(),
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


def _runtime_of(predict_fn: Any) -> Any:
    """Return the Runtime behind a bound Runtime.predict, or None (fakes, HTTP clients)."""
    owner = getattr(predict_fn, "__self__", None)
    if owner is not None and all(hasattr(owner, a) for a in ("plan", "check", "slot")):
        return owner
    return None


class _Session:
    """Progress of one run of a job: committed count, tasks predicted by this run, its start time."""

    def __init__(self, done: int, total: int | None, progress: ProgressFn | None) -> None:
        self.done = done
        self.total = total
        self.progress = progress
        self.predicted = 0
        self.started = time.monotonic()


def _accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    """Return True when fn takes a keyword argument `name` (optional extras of Runtime.predict)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class JobRunner:
    """Run one job store to completion, chunk by chunk, committing each chunk with the progress."""

    def __init__(
        self,
        settings: Settings,
        predict_fn: PredictFn,
        chunk_size: int | None = None,
        stop: threading.Event | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        ready_timeout_s: float = 600.0,
        chunk_timeout_s: float = 3600.0,
    ) -> None:
        self.settings = settings
        self.predict_fn = predict_fn
        self.chunk_size = max(1, int(chunk_size or getattr(settings, "job_chunk_size", 0) or DEFAULT_CHUNK))
        self.stop = stop or threading.Event()
        self.retries = retries
        self.backoff_s = backoff_s
        self.ready_timeout_s = ready_timeout_s
        self._with_failures = _accepts_kwarg(predict_fn, "failures")
        self._with_timeout = _accepts_kwarg(predict_fn, "timeout_s")
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
            store.set(state="cancelled", finished_at=_now())
            return store.meta()
        resumed = meta.get("state") == "running"
        store.set(state="running", started_at=meta.get("started_at") or _now(), error=None)
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
            session = _Session(done=done, total=total, progress=progress)
            outcome = self._predict_pending(store, label_config, session)
            if outcome == "cancelled":
                store.set(state="cancelled", finished_at=_now())
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
            store.set(state="done", finished_at=_now())
            log.info("job %s done: %d tasks, %d failed", job, session.done, store.get("failed", 0))
        except (JobFailed, ServingError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            store.set(state="failed", error=message, finished_at=_now())
            log.warning("job %s failed: %s", job, message)
        except Exception as exc:
            log.exception("job %s failed", job)
            store.set(state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=_now())
        return store.meta()

    def _predict_pending(self, store: JobStore, label_config: str, session: _Session) -> str:
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
        store: JobStore, session: _Session, outcomes: Sequence[tuple[int, dict[str, Any] | None, str | None]]
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
                "updated_at": _now(),
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
        from serving.validation import ConfigSchema

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
        """Wait for the runtime's models of this config (a job must not fail while a model still loads)."""
        runtime = _runtime_of(self.predict_fn)
        if runtime is None:
            return
        plan = runtime.plan(label_config)
        runtime.check(plan)
        deadline = time.monotonic() + self.ready_timeout_s
        for spec in plan.specs:
            slot = runtime.slot(spec)
            while not slot.ready.wait(0.5):
                if self.stop.is_set() or time.monotonic() > deadline:
                    raise JobFailed(
                        f"model {spec.key} did not finish loading in {self.ready_timeout_s:.0f} s"
                    )
            if slot.failed:
                raise JobFailed(f"model {spec.key} is {slot.state}")

    def _call(
        self, label_config: str, tasks: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any] | None, str | None]]:
        failures: list[Any] = []
        kwargs: dict[str, Any] = {}
        if self._with_failures:
            kwargs["failures"] = failures
        if self._with_timeout:
            # a job chunk is not bound by Label Studio's 100 s /predict timeout
            kwargs["timeout_s"] = self.chunk_timeout_s
        predictions = self.predict_fn(label_config, tasks, **kwargs)
        if not isinstance(predictions, list) or len(predictions) != len(tasks):
            got = len(predictions) if isinstance(predictions, list) else type(predictions).__name__
            raise RuntimeError(f"predict returned {got} predictions for {len(tasks)} tasks")
        reasons = {int(f.index): str(f.reason) for f in failures if getattr(f, "index", None) is not None}
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


# ---------------------------------------------------------------------------------------------- reading a job


def _output_task(task_json: str, prediction: str | None, error: str | None) -> dict[str, Any]:
    """Return the import task: the input task with our prediction appended (none when the task failed)."""
    task = json.loads(task_json)
    if prediction is not None:
        pred = json.loads(prediction)
        if error is None or pred.get("result"):
            existing = task.get("predictions")
            task["predictions"] = [*(existing if isinstance(existing, list) else []), pred]
    return task


def iter_output(
    store: JobStore, first: int = 0, last: int | None = None
) -> Iterator[tuple[int, dict[str, Any], dict[str, Any] | None, str | None]]:
    """Yield (index, output task, our prediction or None, error) in input order, streaming from the store."""
    sql = (
        "SELECT i.idx, i.task, r.prediction, r.error FROM inputs i LEFT JOIN results r ON r.idx = i.idx "
        "WHERE i.idx >= ? AND i.idx <= ? ORDER BY i.idx"
    )
    cursor = store.conn.execute(sql, (first, last if last is not None else 2**62))
    while True:
        rows = cursor.fetchmany(500)
        if not rows:
            return
        for idx, task_json, prediction, error in rows:
            pred = json.loads(prediction) if prediction is not None else None
            yield idx, _output_task(task_json, prediction, error), pred, error


def iter_result_text(store: JobStore, fmt: str = "json", buffer_bytes: int = 1 << 16) -> Iterator[str]:
    """Yield Label Studio import JSON (a list) or JSONL text, in buffered pieces."""
    if fmt not in ("json", "jsonl"):
        raise BadRequest(f"unknown format {fmt!r}: use json or jsonl")
    parts: list[str] = []
    size = 0
    first = True
    if fmt == "json":
        parts.append("[")
    for _, task, _, _ in iter_output(store):
        text = json.dumps(task, ensure_ascii=False)
        if fmt == "json":
            text = ("\n" if first else ",\n") + text
        else:
            text += "\n"
        first = False
        parts.append(text)
        size += len(text)
        if size >= buffer_bytes:
            yield "".join(parts)
            parts, size = [], 0
    if fmt == "json":
        parts.append("\n]\n")
    if parts:
        yield "".join(parts)


def job_status(store: JobStore) -> dict[str, Any]:
    """Return a job's public status: state, progress, failures, rate and ETA."""
    meta = store.meta()
    done = int(meta.get("done") or 0)
    total = meta.get("total")
    rate = meta.get("rate")
    running = meta.get("state") == "running"
    eta = (total - done) / rate if running and rate and total is not None else None
    failures = [
        {"index": idx, "task_id": _task_id(task), "reason": error}
        for idx, task, error in store.conn.execute(
            "SELECT r.idx, i.task, r.error FROM results r JOIN inputs i ON i.idx = r.idx WHERE r.error IS NOT NULL "
            "ORDER BY r.idx LIMIT ?",
            (MAX_LISTED_FAILURES,),
        )
    ]
    job_id = meta.get("job_id")
    return {
        "job_id": job_id,
        "state": meta.get("state"),
        "done": done,
        "total": total,
        "progress": round(done / total, 4) if total else (1.0 if total == 0 else 0.0),
        "failed": int(meta.get("failed") or 0),
        "failures": failures,
        "rate_per_s": round(rate, 2) if rate else None,
        "eta_s": round(eta, 1) if eta is not None else None,
        "model_version": meta.get("model_version"),
        "engine": meta.get("engine") or "local",
        "error": meta.get("error"),
        "cancel_requested": bool(meta.get("cancel_requested")),
        "created_at": meta.get("created_at"),
        "started_at": meta.get("started_at"),
        "updated_at": meta.get("updated_at"),
        "finished_at": meta.get("finished_at"),
        "result_url": f"/jobs/{job_id}/result",
    }


def _task_id(task_json: str) -> Any:
    try:
        return json.loads(task_json).get("id")
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------- manager

# Builds the runner of another engine (Ray) with the manager's stop event.
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
        predict_fn: PredictFn,
        *,
        root: str | Path | None = None,
        chunk_size: int | None = None,
        sync_limit: int = SYNC_LIMIT,
        rescan_s: float | None = None,
        autostart: bool = True,
        engines: Mapping[str, EngineFactory] | None = None,
    ) -> None:
        self.settings = settings
        self.predict_fn = predict_fn
        self.root = Path(root) if root is not None else Path(settings.model_dir) / "jobs"
        self.sync_limit = sync_limit
        self.rescan_s = rescan_s if rescan_s is not None else getattr(settings, "job_rescan_s", 30.0)
        self._stop = threading.Event()
        self.runner = JobRunner(settings, predict_fn, chunk_size, stop=self._stop)
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
                        store.set(state="failed", error=str(exc), finished_at=_now())
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
        from serving.validation import ConfigSchema

        ConfigSchema.from_config(label_config)
        runtime = _runtime_of(self.predict_fn)
        if runtime is not None:
            runtime.check(runtime.plan(label_config))

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
            out.append(_output_task(json.dumps(task), json.dumps(pred) if pred is not None else None, err))
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
                store.set(state="cancelled", finished_at=_now())
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


# ---------------------------------------------------------------------------------------------- HTTP


def register_job_routes(app: Any, manager: JobManager) -> None:
    """Add POST /batch, GET /jobs, GET /jobs/<id>, GET /jobs/<id>/result and DELETE /jobs/<id> to a Flask app."""
    from flask import Response, jsonify, request

    def body() -> dict[str, Any]:
        raw = request.get_data(cache=True)
        if not raw:
            raise BadRequest(
                "the request body is empty; send a JSON object with label_config and tasks or input"
            )
        try:
            parsed = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise BadRequest(f"the request body must be a JSON object, got {type(parsed).__name__}")
        return parsed

    @app.post("/batch")
    def batch() -> Any:
        data = body()
        label_config = data.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise BadRequest("'label_config' (the labeling config XML, as a string) is missing")
        tasks = data.get("tasks")
        raw_input = data.get("input")
        url_prefix = data.get("url_prefix") or ""
        if not isinstance(url_prefix, str):
            raise BadRequest("'url_prefix' must be a string")
        engine = data.get("engine") or "local"
        if not isinstance(engine, str) or engine not in ("local", "ray"):
            raise BadRequest("'engine' must be 'local' or 'ray'")
        if tasks is not None and raw_input is not None:
            raise BadRequest("send either 'tasks' or 'input', not both")
        if tasks is None and raw_input is None:
            raise BadRequest(
                "send 'tasks' (a list of tasks or data objects) or 'input' (a path under BATCH_INPUT_ROOT)"
            )
        if tasks is not None:
            if not isinstance(tasks, list):
                raise BadRequest("'tasks' must be a list of Label Studio tasks or data objects")
            if not tasks:
                raise BadRequest("'tasks' is empty; send at least one task")
            if len(tasks) <= manager.sync_limit and not data.get("job") and engine == "local":
                return jsonify(manager.predict_now(label_config, tasks))
            job_id = manager.create(label_config, tasks=tasks, url_prefix=url_prefix, engine=engine)
        else:
            path = resolve_input_path(manager.settings, raw_input)
            job_id = manager.create(label_config, input_path=path, url_prefix=url_prefix, engine=engine)
        status = manager.status(job_id)
        headers = {"Location": f"/jobs/{job_id}"}
        return jsonify(status), 202, headers

    @app.get("/jobs")
    def jobs_list() -> Any:
        return jsonify({"jobs": manager.list()})

    @app.get("/jobs/<job_id>")
    def job_get(job_id: str) -> Any:
        return jsonify(manager.status(job_id))

    @app.get("/jobs/<job_id>/result")
    def job_result(job_id: str) -> Any:
        fmt = request.args.get("format", "json")
        generator = manager.result(job_id, fmt)
        mimetype = "application/json" if fmt == "json" else "application/x-ndjson"
        ext = "json" if fmt == "json" else "jsonl"
        headers = {"Content-Disposition": f'attachment; filename="predictions-{job_id}.{ext}"'}
        return Response(generator, mimetype=mimetype, headers=headers)

    @app.delete("/jobs/<job_id>")
    def job_delete(job_id: str) -> Any:
        return jsonify(manager.cancel(job_id))
