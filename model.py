"""The composition root: the model families of backends/ wired into the serving runtime.

Dependencies point one way: `_wsgi.py` and the CLI (`python -m serving`) start here; this module
builds the runtime with `backends.registry()` and hands it to the app; backends/ import serving/;
serving/ imports neither backends/ nor this module (import-linter checks it in `make test`).
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from backends import registry
from serving.contract import Backend
from serving.http.app import create_app as _create_app
from serving.inference.build import build_runtime as _build_runtime
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings


def families() -> dict[str, type[Backend]]:
    """Return every model family this server can serve, by planning priority."""
    return registry()


def build_runtime(settings: Settings, **kwargs: Any) -> Runtime:
    """Return a runtime over every model family (kwargs: roots, resolver, metrics; see serving.inference.build)."""
    return _build_runtime(settings, families, **kwargs)


class MLModel(ModelService):
    """The LabelStudioMLBase-style model (setup, predict, fit) over every family of backends/."""

    def __init__(self, settings: Settings | None = None, runtime: Runtime | None = None) -> None:
        """Build the runtime over the registry unless one is given (tests pass their own).

        The trainer process imports the same families by reference ("model:families").
        """
        settings = settings or Settings.from_env()
        super().__init__(settings, runtime or build_runtime(settings), families_ref="model:families")


def create_app(settings: Settings | None = None) -> Flask:
    """Return the Flask app serving every family (what `_wsgi.py` runs under gunicorn)."""
    settings = settings or Settings.from_env()
    return _create_app(settings, model=MLModel(settings))
