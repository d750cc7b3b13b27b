"""Split a big /predict over the replicas (REPLICA_URLS) and merge the answers back in task order.

Label Studio's Data Manager "Retrieve predictions" sends every selected task in one request, which a
load balancer cannot split: one replica would answer it alone while the others idle. A replica that
receives more than SPLIT_MIN_TASKS tasks cuts them into SPLIT_WAYS contiguous chunks, answers the
first chunk itself and posts the others to REPLICA_URLS in parallel (the nginx in front of the
replicas, or each replica's own URL), and merges the answers in order: exactly one entry per task,
whatever happens. Answering one chunk in place keeps this replica busy instead of waiting, and with
nginx's least_conn the forwarded chunks go to the other replicas (this one already holds a
connection: the big request). A chunk that fails on every
replica it is tried on becomes one error entry per task, without "result" (Label Studio then asks for
those tasks again, as for any failed task). Forwarded chunks carry the X-LSML-Forwarded header and
are never split again, so a replica that forwards to itself or to the load balancer cannot loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from serving.inference.metrics import Metrics
from serving.settings import Settings

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-LSML-Forwarded"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def chunk_bounds(n: int, ways: int) -> list[tuple[int, int]]:
    """Return `ways` contiguous [start, end) ranges covering 0..n, sizes differing by at most one."""
    ways = max(1, min(ways, n))
    edges = [n * k // ways for k in range(ways + 1)]
    return [(edges[k], edges[k + 1]) for k in range(ways)]


class Splitter:
    """Answer a big /predict with the replicas in parallel; one entry per task, in order, always."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, http: Any = None) -> None:
        """Read REPLICA_URLS, SPLIT_MIN_TASKS and SPLIT_WAYS; nothing is contacted until a request comes."""
        self.urls = [u.rstrip("/") for u in settings.replica_urls if u.strip()]
        self.min_tasks = max(1, settings.split_min_tasks)
        self.ways = settings.split_ways or len(self.urls)
        # a replica answers within its own PREDICT_TIMEOUT_S (partial answers carry per-task errors)
        self.timeout_s = settings.predict_timeout_s + 2.0
        self.metrics = metrics
        self._http = http
        self._pool = (
            ThreadPoolExecutor(max(1, self.ways), thread_name_prefix="split") if self.enabled else None
        )

    @property
    def enabled(self) -> bool:
        """Return True when there are replicas to split over."""
        return bool(self.urls) and self.ways >= 2

    def applies(self, n_tasks: int, forwarded: bool, context: Any) -> bool:
        """Return True for a big, non-interactive request that is not itself a forwarded chunk (FORWARDED_HEADER)."""
        if not self.enabled or n_tasks <= self.min_tasks or forwarded:
            return False
        return not (isinstance(context, Mapping) and context.get("result"))

    def predict(
        self,
        tasks: Sequence[Any],
        *,
        label_config: str,
        version: str,
        params: Any = None,
        project: Any = None,
        authorization: str | None = None,
        local: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
    ) -> list[dict[str, Any]]:
        """Return one entry per task, in order: the first chunk from `local` (this replica), the rest forwarded."""
        assert self._pool is not None, "Splitter.predict needs REPLICA_URLS"
        deadline = time.monotonic() + self.timeout_s
        headers = {FORWARDED_HEADER: "1"}
        if authorization:
            headers["Authorization"] = authorization  # the replicas share the basic auth credentials
        base = {"label_config": label_config, "params": params, "project": project}
        bounds = chunk_bounds(len(tasks), self.ways)
        remote = bounds[1:] if local is not None else bounds
        offset = len(bounds) - len(remote)
        futures = [
            self._pool.submit(self._chunk, k, list(tasks[a:b]), base, headers, deadline, version)
            for k, (a, b) in enumerate(remote, start=offset)
        ]
        merged: list[dict[str, Any]] = []
        if local is not None:
            a, b = bounds[0]
            try:
                first = local(list(tasks[a:b]))
                if len(first) != b - a:
                    raise RuntimeError(f"{len(first)} predictions for {b - a} tasks")
                self._count("local")
            except Exception as exc:  # overloaded here (503), or a bug: another replica may still answer
                log.warning("split chunk 0 (%d tasks) failed here (%s); forwarding it", b - a, exc)
                first = self._chunk(0, list(tasks[a:b]), base, headers, deadline, version)
            merged.extend(first)
        for fut in futures:
            merged.extend(fut.result())
        log.info("split %d tasks into %d chunks over %s", len(tasks), len(bounds), ", ".join(self.urls))
        return merged

    def _post(self, url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> Any:
        import requests

        http = self._http or requests
        return http.post(url + "/predict", json=body, headers=headers, timeout=(min(5.0, timeout), timeout))

    def _chunk(
        self,
        k: int,
        chunk: list[Any],
        base: dict[str, Any],
        headers: dict[str, str],
        deadline: float,
        version: str,
    ) -> list[dict[str, Any]]:
        """Answer one chunk: its replica first, then the next ones; per-task errors when all fail."""
        import requests

        problems: list[str] = []
        # one URL is a load balancer that picks a live replica itself: still worth a second try
        attempts = max(2, len(self.urls))
        for attempt in range(attempts):
            url = self.urls[(k + attempt) % len(self.urls)]
            remaining = deadline - time.monotonic()
            if remaining < 1.0:
                problems.append("no time left before Label Studio's timeout")
                break
            try:
                resp = self._post(url, {**base, "tasks": chunk}, headers, remaining)
            except requests.RequestException as exc:
                problems.append(f"{url}: {type(exc).__name__}")
                continue
            if resp.status_code == 200:
                try:
                    results = resp.json().get("results")
                except (ValueError, AttributeError):
                    results = None
                if (
                    isinstance(results, list)
                    and len(results) == len(chunk)
                    and all(isinstance(r, dict) for r in results)
                ):
                    self._count("ok")
                    return results
                got = len(results) if isinstance(results, list) else "no"
                problems.append(f"{url} answered {got} predictions for {len(chunk)} tasks")
                continue
            problems.append(f"{url} answered {resp.status_code}: {_message(resp)}")
            if resp.status_code not in RETRY_STATUSES:
                break  # a bad request or config is refused the same way by every replica
        self._count("failed")
        reason = "this task's chunk failed on the replicas: " + "; ".join(problems)
        log.warning("split chunk %d (%d tasks) failed: %s", k, len(chunk), "; ".join(problems))
        return [{"model_version": version, "error": reason} for _ in chunk]

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.split_chunks.labels(outcome).inc()

    def close(self) -> None:
        """Stop the forwarding threads (requests in flight finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _message(resp: Any) -> str:
    try:
        body = resp.json()
        return str(body.get("message") or body)[:200]
    except (ValueError, AttributeError):
        return str(getattr(resp, "text", ""))[:200]
