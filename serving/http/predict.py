"""The label_studio_ml protocol's model routes: /health, /setup, /predict; and /metrics, /openapi.json."""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, jsonify, request

from serving.errors import BadRequest, PayloadTooLarge
from serving.http.body import json_body
from serving.scale.replicas import FORWARDED_HEADER
from serving.service.model import ModelService


def predict_blueprint(model: ModelService) -> Blueprint:
    """Return the blueprint of the model routes over `model`."""
    bp = Blueprint("predict", __name__)
    settings = model.settings
    runtime = model.runtime

    def health() -> Response:
        # pid: which gunicorn worker (or replica) answered, for operators and the multi-worker tests
        return jsonify(
            {
                "status": "UP",
                "model_class": model.model_class,
                "backends": runtime.status(),
                "pid": os.getpid(),
            }
        )

    bp.add_url_rule("/", "index", health, methods=["GET"])
    bp.add_url_rule("/health", "health", health, methods=["GET"])

    @bp.post("/setup")
    def setup() -> Response:
        body = json_body()
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise BadRequest("'schema' (the project's labeling config XML) is missing")
        extra = body.get("extra_params")
        version = model.setup(
            project=body.get("project"),
            schema=schema,
            hostname=body.get("hostname") if isinstance(body.get("hostname"), str) else None,
            access_token=body.get("access_token") if isinstance(body.get("access_token"), str) else None,
            extra_params=extra if isinstance(extra, dict) else None,
        )
        # Which model serves which labels of each tag, and why (serving/plan/routing.py); Label
        # Studio reads only model_version, the rest is for people and scripts.
        routes = [r.as_dict() for r in model.runtime.plan(schema).routes]
        return jsonify({"model_version": version, "routes": routes})

    @bp.post("/predict")
    def predict() -> Response:
        body = json_body()
        tasks, label_config, params, context = _predict_body(body, settings.max_tasks_per_request)
        results = model.predict_request(
            tasks,
            context=context,
            label_config=label_config,
            project=body.get("project"),
            params=params,
            forwarded=bool(request.headers.get(FORWARDED_HEADER)),
            authorization=request.headers.get("Authorization"),
        )
        return jsonify({"results": results})

    @bp.get("/metrics")
    def metrics() -> Response:
        runtime.status()  # refresh queue-depth gauges
        return Response(runtime.metrics.render(), mimetype="text/plain; version=0.0.4")

    @bp.get("/openapi.json")
    def openapi() -> Response:
        from serving.http.openapi import spec

        return jsonify(spec())

    return bp


def _predict_body(
    body: dict[str, Any], max_tasks: int
) -> tuple[list[Any], str | None, Any, dict[str, Any] | None]:
    """Return a /predict body's tasks, label_config, params and context, or raise the 4xx that says what is wrong."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("'tasks' must be a list of Label Studio tasks")
    if not tasks:
        raise BadRequest("'tasks' is empty; send at least one task")
    if len(tasks) > max_tasks:
        raise PayloadTooLarge(
            f"{len(tasks)} tasks in one request; the limit is {max_tasks} "
            "(MAX_TASKS_PER_REQUEST). Use POST /batch for large imports"
        )
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise BadRequest("'label_config' must be the labeling config XML as a string")
    params = body.get("params")
    context = params.get("context") if isinstance(params, dict) else None
    if context is not None and not isinstance(context, dict):
        raise BadRequest("'params.context' must be an object or null")
    return tasks, label_config, params, context
