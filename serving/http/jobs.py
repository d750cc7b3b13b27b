"""Batch job routes: POST /batch, GET /jobs, GET /jobs/<id>, GET /jobs/<id>/result, DELETE /jobs/<id>."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from serving.errors import BadRequest
from serving.http.body import json_body
from serving.jobs.inputs import resolve_input_path
from serving.jobs.manager import JobManager

EMPTY = "the request body is empty; send a JSON object with label_config and tasks or input"


def jobs_blueprint(manager: JobManager) -> Blueprint:  # noqa: C901 (a blueprint factory: mccabe adds up its five small route functions)
    """Return the blueprint of the batch job routes over `manager` (training jobs show up in /jobs too)."""
    bp = Blueprint("jobs", __name__)

    @bp.post("/batch")
    def batch() -> Any:
        data = json_body(EMPTY)
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

    @bp.get("/jobs")
    def jobs_list() -> Any:
        return jsonify({"jobs": manager.list()})

    @bp.get("/jobs/<job_id>")
    def job_get(job_id: str) -> Any:
        return jsonify(manager.status(job_id))

    @bp.get("/jobs/<job_id>/result")
    def job_result(job_id: str) -> Any:
        fmt = request.args.get("format", "json")
        generator = manager.result(job_id, fmt)
        mimetype = "application/json" if fmt == "json" else "application/x-ndjson"
        ext = "json" if fmt == "json" else "jsonl"
        headers = {"Content-Disposition": f'attachment; filename="predictions-{job_id}.{ext}"'}
        return Response(generator, mimetype=mimetype, headers=headers)

    @bp.delete("/jobs/<job_id>")
    def job_delete(job_id: str) -> Any:
        return jsonify(manager.cancel(job_id))

    return bp
