"""Training routes: Label Studio's webhooks (/webhook), the legacy /train, and /job_status."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from serving.errors import BadRequest
from serving.http.auth import check_webhook_secret
from serving.http.body import json_body
from serving.service.model import ModelService

log = logging.getLogger(__name__)


def training_blueprint(model: ModelService) -> Blueprint:
    """Return the blueprint of the training routes over `model`."""
    bp = Blueprint("training", __name__)
    settings = model.settings

    @bp.post("/webhook")
    def webhook() -> tuple[Response, int]:
        check_webhook_secret(settings)
        body = json_body()
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("webhook body has no 'action'")
        # Records a training request at most (the trainer process trains): answers in milliseconds.
        result = model.fit(action, body)
        log.debug("webhook %s: %s", action, result)
        return jsonify({**result, "status": "ok", "action": action}), 201

    @bp.post("/train")
    def train() -> tuple[Response, int]:
        body = json_body()
        result = model.fit("START_TRAINING", body)
        return jsonify(result), 201

    @bp.post("/job_status")
    def job_status() -> Response:
        body = json_body()
        job = body.get("job")
        if not isinstance(job, str):
            raise BadRequest("'job' (a training job id) is missing")
        return jsonify(model.job_status(job))

    return bp
