"""Reading a job: the import file (input tasks with our predictions appended) and the status GET /jobs shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from serving.errors import BadRequest
from serving.jobs.store import JobStore

MAX_LISTED_FAILURES = 100


def output_task(task_json: str, prediction: str | None, error: str | None) -> dict[str, Any]:
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
            yield idx, output_task(task_json, prediction, error), pred, error


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
