"""Send a finished job's predictions to an existing Label Studio project: paced, retried, never twice.

Two modes. `predictions`: tasks that already exist in the project (the input carried Label Studio
task ids) get predictions through the bulk `POST /api/projects/{id}/import/predictions` (falling back
to `POST /api/predictions` per task on servers without it). `import`: new tasks are imported with their
predictions through `POST /api/projects/{id}/import`, in large chunks, at most one import every
`import_interval_s` (Label Studio's guide asks for 30 s).

Every chunk is recorded in the job store before it is sent ("sending") and after ("sent"). A chunk
found "sending" on resume is checked against Label Studio before anything is re-sent: predictions
mode looks for our model_version on each task; import mode compares the project's task count
with the count recorded before the import. A timeout or 5xx on a POST is checked the same way.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import requests

from serving.errors import InputError
from serving.fetch.lsclient import LabelStudioClient, mask_secret
from serving.jobs.output import iter_output
from serving.jobs.store import JobStore
from serving.settings import Settings

log = logging.getLogger(__name__)

MODES = ("auto", "predictions", "import")


class PushError(Exception):
    """Label Studio refused the data or stayed unreachable; the message says what to do."""


class _Unsupported(Exception):
    """The endpoint does not exist on this Label Studio (404/405)."""


class LabelStudioPusher:
    """Push the predictions of a job store to one Label Studio project."""

    def __init__(
        self,
        url: str,
        api_key: str,
        project: int,
        *,
        http: requests.Session | None = None,
        chunk_size: int = 500,
        import_interval_s: float = 30.0,
        retries: int = 6,
        backoff_s: float = 1.0,
        timeout_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url or not api_key:
            raise PushError(
                "--push needs the Label Studio URL (--ls-url) and an API key or personal access token (--ls-key)"
            )
        self.base = url.rstrip("/")
        self.project = int(project)
        self.http = http if http is not None else requests.Session()
        self.client = LabelStudioClient(
            Settings(label_studio_url=self.base, label_studio_api_key=api_key), self.http
        )
        self.chunk_size = max(1, int(chunk_size))
        self.import_interval_s = max(0.0, float(import_interval_s))
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.requests_sent = 0
        log.info("pushing to %s project %d with key %s", self.base, self.project, mask_secret(api_key))

    # ---- HTTP ----
    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        verify: Callable[[], bool] | None = None,
    ) -> requests.Response | None:
        """Send with retries; return None when `verify` says an ambiguous earlier attempt already landed."""
        url = self.base + path
        refreshed = False
        attempt = 0
        while True:
            headers = self._auth_headers()
            ambiguous = False
            retry_after: float | None = None
            try:
                self.requests_sent += 1
                resp = self.http.request(
                    method,
                    url,
                    json=json_body,
                    params=params,
                    headers=headers,
                    timeout=(10.0, self.timeout_s),
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                ambiguous = method != "GET"
                problem = f"{type(exc).__name__}"
            else:
                if resp.status_code < 300:
                    return resp
                if resp.status_code == 401 and not refreshed:
                    refreshed = True
                    self._auth_headers(refresh=True, rejected=headers.get("Authorization"))
                    continue
                ambiguous, problem, retry_after = self._retryable(resp, method, path)
            if attempt >= self.retries:
                raise PushError(
                    f"{method} {path} kept failing ({problem}) after {attempt + 1} tries; rerun with --resume "
                    "later: nothing already sent is sent again"
                )
            delay = retry_after if retry_after is not None else min(60.0, self.backoff_s * 2**attempt)
            log.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
            self.sleep(delay)
            attempt += 1
            if ambiguous and verify is not None and verify():
                log.info("%s %s had landed before the error; not sending it again", method, path)
                return None

    def _auth_headers(self, refresh: bool = False, rejected: str | None = None) -> dict[str, str]:
        """Return the auth headers (exchanged again after a 401 on `rejected`); failures as a PushError."""
        try:
            if not refresh:
                return self.client.auth_headers()
            return self.client.auth_headers(force_refresh=True, rejected=rejected)
        except InputError as exc:
            raise PushError(str(exc)) from None

    @staticmethod
    def _retryable(resp: requests.Response, method: str, path: str) -> tuple[bool, str, float | None]:
        """Raise for an answer no retry fixes; else return (ambiguous, the problem, Retry-After seconds)."""
        status = resp.status_code
        if status in (404, 405) and path.endswith("/import/predictions"):
            raise _Unsupported(path)
        text = resp.text[:300]
        if status == 401:
            raise PushError(f"Label Studio refused the API key (401 on {path}): check --ls-key")
        if status != 429 and status < 500:
            raise PushError(f"Label Studio answered {status} to {method} {path}: {text}")
        header = resp.headers.get("Retry-After")
        retry_after = float(header) if header and header.isdigit() else None
        return status >= 500 and method != "GET", f"HTTP {status}: {text[:120]}", retry_after

    def _json(self, resp: requests.Response | None) -> Any:
        if resp is None:
            return None
        try:
            return resp.json()
        except ValueError:
            return None

    def task_number(self) -> int | None:
        """Return the number of tasks in the project, or None when Label Studio does not say."""
        data = self._json(self._request("GET", f"/api/projects/{self.project}"))
        value = data.get("task_number") if isinstance(data, dict) else None
        return int(value) if isinstance(value, int) else None

    def has_prediction(self, task_id: int, model_version: str) -> bool:
        """Return True when the task already has a prediction of this model_version."""
        data = self._json(self._request("GET", "/api/predictions", params={"task": task_id}))
        items = data.get("results", []) if isinstance(data, dict) else data if isinstance(data, list) else []
        return any(isinstance(p, dict) and p.get("model_version") == model_version for p in items)

    # ---- push ----
    def push(
        self, store: JobStore, mode: str = "auto", progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Send every chunk not yet sent; return counts."""
        if mode not in MODES:
            raise PushError(f"unknown push mode {mode!r}: use {', '.join(MODES)}")
        meta = store.meta()
        if meta.get("state") != "done":
            raise PushError(f"the predictions are not complete (job {meta.get('state')}); finish them first")
        total = int(meta.get("total") or 0)
        info = meta.get("push")
        if info:
            if int(info["project"]) != self.project:
                raise PushError(
                    f"this run already pushed to project {info['project']}; use --force to start a new run for "
                    f"project {self.project}"
                )
            mode, chunk = info["mode"], int(info["chunk"])
        else:
            mode = self._pick_mode(store) if mode == "auto" else mode
            chunk = self.chunk_size
            info = {"project": self.project, "mode": mode, "chunk": chunk, "last_import_at": 0.0}
            store.set(push=info)
        summary: dict[str, Any] = {
            "mode": mode,
            "project": self.project,
            "sent": 0,
            "already_sent": 0,
            "skipped": 0,
            "chunks": 0,
        }
        n_chunks = math.ceil(total / chunk) if total else 0
        done_tasks = 0
        for k in range(n_chunks):
            first, last = k * chunk, min(total, (k + 1) * chunk) - 1
            row = store.conn.execute("SELECT state, before_count FROM push WHERE chunk = ?", (k,)).fetchone()
            if row and row[0] == "sent":
                summary["already_sent"] += last - first + 1
            else:
                rows = list(iter_output(store, first, last))
                if mode == "predictions":
                    self._push_predictions(
                        store, k, first, last, rows, uncertain=row is not None, summary=summary
                    )
                else:
                    self._push_import(store, k, first, last, rows, row, summary=summary)
                summary["chunks"] += 1
            done_tasks = last + 1
            if progress:
                progress(done_tasks, total)
        return summary

    def _pick_mode(self, store: JobStore) -> str:
        row = store.conn.execute("SELECT task FROM inputs ORDER BY idx LIMIT 1").fetchone()
        task = json.loads(row[0]) if row else {}
        mode = (
            "predictions"
            if isinstance(task.get("id"), int) and not isinstance(task.get("id"), bool)
            else "import"
        )
        log.info(
            "push mode: %s (%s)",
            mode,
            "tasks carry Label Studio ids" if mode == "predictions" else "new tasks",
        )
        return mode

    def _mark(
        self, store: JobStore, k: int, first: int, last: int, state: str, before: int | None = None
    ) -> None:
        with store.tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO push (chunk, first, last, state, before_count) VALUES (?, ?, ?, ?, ?)",
                (k, first, last, state, before),
            )

    def _push_predictions(
        self,
        store: JobStore,
        k: int,
        first: int,
        last: int,
        rows: list[tuple[int, dict[str, Any], dict[str, Any] | None, str | None]],
        uncertain: bool,
        summary: dict[str, Any],
    ) -> None:
        payload = []
        for idx, task, pred, error in rows:
            task_id = task.get("id")
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                log.warning(
                    "task #%d has no Label Studio id: not pushed (use --push-mode import for new tasks)", idx
                )
                summary["skipped"] += 1
                continue
            if pred is None or (error is not None and not pred.get("result")):
                summary["skipped"] += 1
                continue
            payload.append(
                {
                    "task": task_id,
                    "result": pred.get("result", []),
                    "score": pred.get("score", 0.0),
                    "model_version": pred.get("model_version", ""),
                }
            )
        if uncertain:
            before = len(payload)
            payload = [p for p in payload if not self.has_prediction(p["task"], p["model_version"])]
            summary["already_sent"] += before - len(payload)
        self._mark(store, k, first, last, "sending")
        if payload:
            self._send_predictions(payload)
            summary["sent"] += len(payload)
        self._mark(store, k, first, last, "sent")

    def _send_predictions(self, payload: list[dict[str, Any]]) -> None:
        path = f"/api/projects/{self.project}/import/predictions"
        remaining = payload

        def verify() -> bool:
            # after a timeout/5xx: drop what landed; True stops the retry of the old body
            nonlocal remaining
            count = len(remaining)
            remaining = [p for p in remaining if not self.has_prediction(p["task"], p["model_version"])]
            return len(remaining) < count

        try:
            while remaining:
                if self._request("POST", path, json_body=remaining, verify=verify) is not None:
                    return
        except _Unsupported:
            log.info("this Label Studio has no bulk prediction import; sending one prediction per task")
        for p in list(remaining):

            def landed(p: dict[str, Any] = p) -> bool:
                return self.has_prediction(p["task"], p["model_version"])

            self._request("POST", "/api/predictions", json_body=p, verify=landed)

    def _push_import(
        self,
        store: JobStore,
        k: int,
        first: int,
        last: int,
        rows: list[tuple[int, dict[str, Any], dict[str, Any] | None, str | None]],
        row: tuple[str, int | None] | None,
        summary: dict[str, Any],
    ) -> None:
        tasks = [task for _, task, _, _ in rows]
        n = len(tasks)
        if row is not None and row[1] is not None:
            now = self.task_number()
            if now is not None and now >= row[1] + n:
                log.info("import chunk %d had landed before the interruption; not sending it again", k)
                self._mark(store, k, first, last, "sent", row[1])
                summary["already_sent"] += n
                return
        info = dict(store.get("push") or {})
        wait = float(info.get("last_import_at", 0.0)) + self.import_interval_s - time.time()
        if wait > 0:
            log.info("waiting %.0f s between imports (--import-interval)", wait)
            self.sleep(wait)
        before = self.task_number()
        if before is None:
            log.warning(
                "Label Studio did not report the project's task count: an interrupted import cannot be checked"
            )
        self._mark(store, k, first, last, "sending", before)

        def verify() -> bool:
            now = self.task_number()
            return before is not None and now is not None and now >= before + n

        self._request("POST", f"/api/projects/{self.project}/import", json_body=tasks, verify=verify)
        info["last_import_at"] = time.time()
        with store.tx() as conn:
            store.set(conn, push=info)
            conn.execute("UPDATE push SET state = 'sent' WHERE chunk = ?", (k,))
        summary["sent"] += n
