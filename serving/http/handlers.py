"""What every request goes through: basic auth, metrics, and typed errors turned into JSON answers (never a traceback)."""

from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from serving.errors import ServingError
from serving.http.auth import OPEN_ROUTES, check_basic_auth
from serving.inference.metrics import Metrics
from serving.settings import Settings

log = logging.getLogger(__name__)


def install(app: Flask, settings: Settings, metrics: Metrics) -> None:
    """Add the request hooks (auth, latency and status metrics) and the error handlers to the app."""

    @app.before_request
    def _before() -> None:
        g.started = time.perf_counter()
        if request.path not in OPEN_ROUTES:
            check_basic_auth(settings)

    @app.after_request
    def _after(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(route, str(response.status_code)).inc()
        started = getattr(g, "started", None)
        if started is not None:
            metrics.latency.labels(route).observe(time.perf_counter() - started)
        if response.status_code >= 500:
            metrics.errors.labels(route, str(response.status_code)).inc()
        return response

    @app.errorhandler(ServingError)
    def _serving_error(exc: ServingError) -> Response:
        retry = getattr(exc, "retry_after_s", None)
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        else:
            log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        response = jsonify(exc.to_json())
        if retry is not None:
            response.headers["Retry-After"] = str(retry)
        # Label Studio shows only the HTTP status line of a failed /setup on its settings page, so
        # the message that says what to change travels in the reason phrase too (one latin-1 line).
        reason = " ".join(exc.message.split()).encode("latin-1", "replace").decode("latin-1")[:1000]
        response.status = f"{exc.status} {reason}"
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"request body larger than {settings.max_request_bytes} bytes (MAX_REQUEST_BYTES)"
        return jsonify(
            {"status": status, "error": exc.name.lower().replace(" ", "_"), "message": message}
        ), status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        incident = uuid.uuid4().hex[:8]
        log.exception("unexpected error %s on %s %s", incident, request.method, request.path)
        body = {
            "status": 500,
            "error": "internal_error",
            "message": f"internal error {incident}; see the server log",
        }
        return jsonify(body), 500
