"""The OpenAPI 3 document of every route (served at /openapi.json, fuzzed by schemathesis in CI)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "Error with a message that says how to fix it",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["status", "error", "message"],
                "properties": {
                    "status": {"type": "integer"},
                    "error": {"type": "string"},
                    "message": {"type": "string"},
                },
            }
        }
    },
}

_TASK = {
    "type": "object",
    "description": "A Label Studio task (id, data, annotations...) or a bare {data: {...}}",
    "properties": {"id": {"type": "integer"}, "data": {"type": "object"}},
    "additionalProperties": True,
}

_PREDICTION = {
    "anyOf": [
        {
            "type": "object",
            "description": "The models ran on the task (an empty result: they found nothing)",
            "required": ["result", "score", "model_version"],
            "properties": {
                "result": {"type": "array", "items": {"type": "object"}},
                "score": {"type": "number"},
                "model_version": {"type": "string"},
                "error": {"type": "string", "description": "interactive calls only: why result is empty"},
            },
        },
        {
            "type": "object",
            "description": "The task failed: no result, so Label Studio stores nothing and asks again later",
            "required": ["model_version", "error"],
            "properties": {"model_version": {"type": "string"}, "error": {"type": "string"}},
        },
    ]
}


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _responses(ok: dict[str, Any], *errors: int, ok_status: str = "200") -> dict[str, Any]:
    out: dict[str, Any] = {ok_status: ok}
    for status in errors:
        out[str(status)] = _ERROR
    return out


def _json_ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def spec() -> dict[str, Any]:
    """Return the OpenAPI document."""
    health = _json_ok(
        {
            "type": "object",
            "required": ["status", "model_class", "backends"],
            "properties": {
                "status": {"type": "string", "enum": ["UP"]},
                "model_class": {"type": "string"},
                "backends": {"type": "object", "additionalProperties": {"type": "string"}},
                "pid": {"type": "integer", "description": "the worker process that answered"},
            },
        }
    )
    job_status = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string"},
            "done": {"type": "integer"},
            "total": {"type": ["integer", "null"]},
            "failures": {"type": "integer"},
        },
        "additionalProperties": True,
    }
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Label Studio ML backend",
            "version": "1.0",
            "description": "label_studio_ml 2.x wire protocol plus batch prediction jobs. "
            "Basic auth (when configured) on every route but /health and /webhook.",
        },
        "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
        "security": [{"basic": []}],
        "paths": {
            "/": {"get": {"summary": "Health (alias)", "responses": _responses(health, 401)}},
            "/health": {
                "get": {
                    "summary": "Health and backend states",
                    "security": [],
                    "responses": _responses(health),
                }
            },
            "/setup": {
                "post": {
                    "summary": "Plan a project's labeling config and return its model_version",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["schema"],
                            "properties": {
                                "project": {"type": "string"},
                                "schema": {"type": "string"},
                                "hostname": {"type": "string"},
                                "access_token": {"type": "string"},
                                "extra_params": {"type": ["object", "null"]},
                            },
                        }
                    ),
                    "responses": _responses(
                        _json_ok(
                            {
                                "type": "object",
                                "properties": {
                                    "model_version": {"type": "string"},
                                    "routes": {
                                        "type": "array",
                                        "description": "per control tag: which model serves which labels, and why",
                                        "items": {"type": "object"},
                                    },
                                },
                            }
                        ),
                        400,
                        401,
                        413,
                        422,
                    ),
                }
            },
            "/predict": {
                "post": {
                    "summary": "One prediction per task, in task order",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["tasks"],
                            "properties": {
                                "tasks": {"type": "array", "items": _TASK},
                                "label_config": {"type": "string"},
                                "project": {"type": "string"},
                                "params": {
                                    "type": "object",
                                    "properties": {"context": {"type": ["object", "null"]}},
                                },
                            },
                        }
                    ),
                    "responses": _responses(
                        _json_ok(
                            {
                                "type": "object",
                                "required": ["results"],
                                "properties": {"results": {"type": "array", "items": _PREDICTION}},
                            }
                        ),
                        400,
                        401,
                        413,
                        422,
                        503,
                    ),
                }
            },
            "/webhook": {
                "post": {
                    "summary": "Label Studio events: START_TRAINING and TRAIN_EVENTS queue (or join) a training "
                    "job and answer its id as `job`; others are acknowledged (?secret= when WEBHOOK_SECRET is set)",
                    "security": [],
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["action"],
                            "properties": {"action": {"type": "string"}},
                        }
                    ),
                    "responses": _responses(
                        _json_ok({"type": "object"}, "Acknowledged"), 400, 401, 413, 422, ok_status="201"
                    ),
                }
            },
            "/train": {
                "post": {
                    "summary": "Legacy training call with the annotated tasks inline: queues a training job",
                    "requestBody": _json_body({"type": "object"}),
                    "responses": _responses(
                        _json_ok({"type": "object"}), 400, 401, 413, 422, ok_status="201"
                    ),
                }
            },
            "/versions": {
                "get": {
                    "summary": "Model versions this server serves; with ?project=<id> that project's versions",
                    "parameters": [
                        {"name": "project", "in": "query", "required": False, "schema": {"type": "string"}}
                    ],
                    "responses": _responses(
                        _json_ok(
                            {
                                "type": "object",
                                "properties": {"versions": {"type": "array", "items": {"type": "string"}}},
                            }
                        ),
                        400,
                        401,
                    ),
                }
            },
            "/versions/{version}/activate": {
                "post": {
                    "summary": "Point a project at one of its trained versions, or 'base' (rollback)",
                    "parameters": [
                        {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "project", "in": "query", "required": False, "schema": {"type": "string"}},
                    ],
                    "requestBody": _json_body(
                        {"type": "object", "properties": {"project": {"type": ["string", "integer"]}}},
                        required=False,
                    ),
                    "responses": _responses(_json_ok({"type": "object"}), 400, 401, 404),
                }
            },
            "/job_status": {
                "post": {
                    "summary": "A training job's state in Label Studio's form ({job_status: ...})",
                    "requestBody": _json_body(
                        {"type": "object", "required": ["job"], "properties": {"job": {"type": "string"}}}
                    ),
                    "responses": _responses(_json_ok({"type": "object"}), 400, 401, 404, 413),
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": _responses(
                        {
                            "description": "Prometheus text",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        401,
                    ),
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": _responses(_json_ok({"type": "object"}), 401),
                }
            },
            "/batch": {
                "post": {
                    "summary": "Batch predictions for imports: small inputs answer at once, large ones start a job",
                    "requestBody": _json_body(
                        {
                            "type": "object",
                            "required": ["label_config"],
                            "properties": {
                                "label_config": {"type": "string"},
                                "tasks": {"type": "array", "items": _TASK},
                                "input": {
                                    "type": "string",
                                    "description": "a JSON/JSONL file or image folder under BATCH_INPUT_ROOT",
                                },
                                "format": {"type": "string", "enum": ["json", "jsonl"]},
                                "job": {"type": "boolean", "description": "always run as a job"},
                                "engine": {
                                    "type": "string",
                                    "enum": ["local", "ray"],
                                    "description": "where the job runs; 'ray' needs RAY_ADDRESS on the server",
                                },
                            },
                        }
                    ),
                    "responses": {
                        **_responses(
                            _json_ok(
                                {"type": "array", "items": {"type": "object"}}, "Tasks with predictions"
                            ),
                            400,
                            401,
                            404,
                            413,
                            422,
                        ),
                        "202": _json_ok(
                            {"type": "object", "properties": {"job_id": {"type": "string"}}}, "Job created"
                        ),
                    },
                }
            },
            "/jobs": {
                "get": {"summary": "List jobs", "responses": _responses(_json_ok({"type": "object"}), 401)}
            },
            "/jobs/{job_id}": {
                "get": {
                    "summary": "Job progress",
                    "parameters": job_id,
                    "responses": _responses(_json_ok(job_status), 401, 404),
                },
                "delete": {
                    "summary": "Cancel a job",
                    "parameters": job_id,
                    "responses": _responses(_json_ok(job_status), 401, 404),
                },
            },
            "/jobs/{job_id}/result": {
                "get": {
                    "summary": "Stream the job's Label Studio import file (JSON) or JSONL",
                    "parameters": [
                        *job_id,
                        {
                            "name": "format",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["json", "jsonl"]},
                        },
                    ],
                    "responses": _responses(
                        _json_ok({"type": "array", "items": {"type": "object"}}), 401, 404, 409
                    ),
                }
            },
        },
    }
