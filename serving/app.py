"""create_app(settings, model) -> Flask: the label_studio_ml 2.x wire protocol, routes only."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from serving.errors import BadRequest, PayloadTooLarge, ServingError, Unauthorized
from serving.runtime import Runtime
from serving.service import ModelService
from serving.settings import Settings

log = logging.getLogger(__name__)

# Routes that answer without basic auth: Label Studio's health probe, and project webhooks,
# which Label Studio sends without credentials (protected by WEBHOOK_SECRET instead).
OPEN_ROUTES = {"/health", "/webhook"}


def _json_body() -> dict[str, Any]:
    """Return the request's JSON object or raise a 400 that says what is wrong."""
    raw = request.get_data(cache=True)
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_basic_auth(settings: Settings) -> None:
    if not (settings.basic_auth_user and settings.basic_auth_pass):
        return
    header = request.headers.get("Authorization", "")
    user, password = "", ""
    if header.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except Exception:
            user, password = "", ""
    # compare both fields in constant time, and always both, so timing tells nothing
    ok_user = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
    ok_pass = hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
    if not (ok_user and ok_pass):
        raise Unauthorized("basic auth required: set the user and password in Label Studio's model settings")


def create_app(
    settings: Settings | None = None, runtime: Runtime | None = None, model: ModelService | None = None
) -> Flask:
    """Build the Flask app over a model (model.MLModel) or a runtime; models load in the background."""
    if model is None:
        if runtime is None:
            raise TypeError("create_app needs model= (model.MLModel) or runtime= (with its model families)")
        model = ModelService(settings or runtime.settings, runtime)
    settings = settings or model.settings
    runtime = model.runtime
    metrics = runtime.metrics
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # key order is irrelevant to Label Studio; sorting thousands of region dicts is not free
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["lsml_model"] = model
    app.extensions["lsml_settings"] = settings
    from serving.replicas import Splitter

    splitter = Splitter(settings, metrics)  # a no-op unless REPLICA_URLS is set
    app.extensions["lsml_splitter"] = splitter

    @app.before_request
    def _before() -> None:
        g.started = time.perf_counter()
        if request.path not in OPEN_ROUTES:
            _check_basic_auth(settings)

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

    def _health() -> Response:
        # pid: which gunicorn worker (or replica) answered, for operators and the multi-worker tests
        return jsonify(
            {
                "status": "UP",
                "model_class": model.model_class,
                "backends": runtime.status(),
                "pid": os.getpid(),
            }
        )

    app.add_url_rule("/", "index", _health, methods=["GET"])
    app.add_url_rule("/health", "health", _health, methods=["GET"])

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
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
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict() -> Response:
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("'tasks' must be a list of Label Studio tasks")
        if not tasks:
            raise BadRequest("'tasks' is empty; send at least one task")
        if len(tasks) > settings.max_tasks_per_request:
            raise PayloadTooLarge(
                f"{len(tasks)} tasks in one request; the limit is {settings.max_tasks_per_request} "
                "(MAX_TASKS_PER_REQUEST). Use POST /batch for large imports"
            )
        label_config = body.get("label_config")
        if label_config is not None and not isinstance(label_config, str):
            raise BadRequest("'label_config' must be the labeling config XML as a string")
        params = body.get("params")
        context = params.get("context") if isinstance(params, dict) else None
        if context is not None and not isinstance(context, dict):
            raise BadRequest("'params.context' must be an object or null")
        project = body.get("project")
        if splitter.applies(len(tasks), request.headers, context):
            config = model.config_for(label_config, str(project) if project else None)
            # the plan this project is served with (its trained models in): a bad config is refused
            # here, not once per chunk, and a failed chunk's entries carry the version /setup gave
            plan = model.serving_plan(str(project) if project else None, config)
            version = runtime.model_version(plan)
            results = splitter.predict(
                tasks,
                label_config=config,
                version=version,
                params=params,
                project=project,
                authorization=request.headers.get("Authorization"),
                local=lambda chunk: model.predict(
                    chunk, context=context, label_config=config, project=str(project) if project else None
                ),
            )
            model.seen.add(config)
            return jsonify({"results": results})
        results = model.predict(
            tasks, context=context, label_config=label_config, project=str(project) if project else None
        )
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        if settings.webhook_secret and not hmac.compare_digest(
            request.args.get("secret", "").encode(), settings.webhook_secret.encode()
        ):
            # Label Studio's own START_TRAINING goes to <model URL>/webhook (a query string in the
            # model URL is dropped) with the model's basic auth: that credential is accepted instead.
            if not (settings.basic_auth_user and request.authorization is not None):
                raise Unauthorized(
                    "webhook secret missing or wrong: add ?secret=<WEBHOOK_SECRET> to the webhook URL"
                )
            _check_basic_auth(settings)
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("webhook body has no 'action'")
        # Records a training request at most (the trainer process trains): answers in milliseconds.
        result = model.fit(action, body)
        log.debug("webhook %s: %s", action, result)
        return jsonify({**result, "status": "ok", "action": action}), 201

    @app.post("/train")
    def train() -> tuple[Response, int]:
        body = _json_body()
        result = model.fit("START_TRAINING", body)
        return jsonify(result), 201

    def _project_arg() -> Any:
        project = request.args.get("project")
        if project is None and request.content_length:
            body = request.get_json(silent=True)
            project = body.get("project") if isinstance(body, dict) else None
        return project

    @app.get("/versions")
    def versions() -> Response:
        project = _project_arg()
        if project is not None and project != "":
            return jsonify(model.project_versions(project))
        return jsonify({"versions": model.versions()})

    @app.post("/versions/<version>/activate")
    def activate(version: str) -> Response:
        project = _project_arg()
        if project is None or project == "":
            raise BadRequest('say which project: {"project": <id>} (or ?project=<id>)')
        return jsonify(model.activate(version, project))

    @app.post("/job_status")
    def job_status() -> Response:
        body = _json_body()
        job = body.get("job")
        if not isinstance(job, str):
            raise BadRequest("'job' (a training job id) is missing")
        return jsonify(model.job_status(job))

    @app.get("/metrics")
    def metrics_route() -> Response:
        runtime.status()  # refresh queue-depth gauges
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    def openapi() -> Response:
        from serving.openapi import spec

        return jsonify(spec())

    try:
        from serving.jobs import JobManager, register_job_routes
    except ImportError:  # pragma: no cover - jobs are part of the package
        log.warning("batch jobs unavailable: serving.jobs missing")
    else:
        if settings.batch_input_root:
            # jobs over a server-side image folder reference files as file:// URIs under that root
            from serving.jobs import LocalFileResolver

            inner = runtime.resolver
            runtime.set_resolver(LocalFileResolver([settings.batch_input_root], lambda: inner, settings))
        manager = JobManager(
            settings,
            runtime.predict,
            chunk_size=settings.job_chunk_size,
            engines=_job_engines(settings, runtime),
        )
        manager.sources.append(model.training_jobs)  # GET /jobs/{id} shows training jobs too
        app.extensions["lsml_jobs"] = manager
        register_job_routes(app, manager)

    runtime.warmup()
    log.info("app ready; settings: %s", settings.redacted())
    return app


def _job_engines(settings: Settings, runtime: Runtime) -> dict[str, Any]:
    """Return the engines POST /batch may ask for besides "local": "ray" when RAY_ADDRESS is set."""
    if not settings.ray_address:
        return {}
    from serving.engines import RAY_MISSING, ray_installed

    if not ray_installed():
        log.warning("RAY_ADDRESS is set but %s", RAY_MISSING)
        return {}
    roots = [settings.batch_input_root] if settings.batch_input_root else []
    families = dict(runtime.families)  # classes pickle by reference: each actor imports backends/ itself

    def ray_runner(stop: Any) -> Any:
        from serving.engines.ray import RayJobRunner, RayOptions

        # progress goes to GET /jobs/{id}, not as Ray's progress lines into the server log
        options = RayOptions.from_settings(settings, quiet=True)
        return RayJobRunner(settings, families, roots, options=options, stop=stop)

    return {"ray": ray_runner}


def shutdown(app: Flask, timeout: float = 20.0) -> None:
    """Stop batch jobs after their current chunk, then the model threads; wait up to `timeout` s in all."""
    deadline = time.monotonic() + timeout
    manager = app.extensions.get("lsml_jobs")
    if manager is not None:
        manager.close(timeout)
    splitter = app.extensions.get("lsml_splitter")
    if splitter is not None:
        splitter.close()
    model = app.extensions.get("lsml_model")
    if model is not None:
        model.close(max(0.0, deadline - time.monotonic()) / 2)
        model.runtime.close(max(0.0, deadline - time.monotonic()))
