"""create_app(settings, model) -> Flask: the label_studio_ml 2.x wire protocol; the routes live in blueprints."""

from __future__ import annotations

import logging
import time

from flask import Flask

from serving.http import handlers
from serving.http.jobs import jobs_blueprint
from serving.http.jsonio import FastJSONProvider
from serving.http.predict import predict_blueprint
from serving.http.training import training_blueprint
from serving.http.versions import versions_blueprint
from serving.inference.runtime import Runtime
from serving.jobs.engines import server_engines
from serving.jobs.manager import JobManager
from serving.service.model import ModelService
from serving.settings import Settings

log = logging.getLogger(__name__)


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
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # orjson, keys unsorted: key order is irrelevant to Label Studio; encoding thousands of region
    # dicts with the standard library cost a tenth of a big /predict (issue #29)
    app.json = FastJSONProvider(app)
    handlers.install(app, settings, runtime.metrics)

    # classes pickle by reference: each Ray actor imports backends/ itself
    engines = server_engines(settings, dict(runtime.families))
    jobs = JobManager(settings, runtime, chunk_size=settings.job_chunk_size, engines=engines)
    jobs.sources.append(model.training_jobs)  # GET /jobs/{id} shows training jobs too
    app.extensions.update(lsml_model=model, lsml_settings=settings, lsml_jobs=jobs)

    app.register_blueprint(predict_blueprint(model))
    app.register_blueprint(training_blueprint(model))
    app.register_blueprint(versions_blueprint(model))
    app.register_blueprint(jobs_blueprint(jobs))

    runtime.warmup()
    log.info("app ready; settings: %s", settings.redacted())
    return app


def shutdown(app: Flask, timeout: float = 20.0) -> None:
    """Stop batch jobs after their current chunk, then the model threads; wait up to `timeout` s in all."""
    deadline = time.monotonic() + timeout
    manager = app.extensions.get("lsml_jobs")
    if manager is not None:
        manager.close(timeout)
    model = app.extensions.get("lsml_model")
    if model is not None:
        model.close(max(0.0, deadline - time.monotonic()) / 2)
        model.runtime.close(max(0.0, deadline - time.monotonic()))
