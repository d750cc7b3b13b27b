"""Model versions routes: /versions (every servable version, or one project's) and activating one (rollback)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from serving.errors import BadRequest
from serving.service.model import ModelService


def _project_arg() -> Any:
    """Return the project of ?project=<id>, else of a JSON body's "project" (None when neither)."""
    project = request.args.get("project")
    if project is None and request.content_length:
        body = request.get_json(silent=True)
        project = body.get("project") if isinstance(body, dict) else None
    return project


def versions_blueprint(model: ModelService) -> Blueprint:
    """Return the blueprint of the versions routes over `model`."""
    bp = Blueprint("versions", __name__)

    @bp.get("/versions")
    def versions() -> Response:
        project = _project_arg()
        if project is not None and project != "":
            return jsonify(model.project_versions(project))
        return jsonify({"versions": model.versions()})

    @bp.post("/versions/<version>/activate")
    def activate(version: str) -> Response:
        project = _project_arg()
        if project is None or project == "":
            raise BadRequest('say which project: {"project": <id>} (or ?project=<id>)')
        return jsonify(model.activate(version, project))

    return bp
