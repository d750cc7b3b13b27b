"""Where a batch job runs: in this process (jobs/runner.py's JobRunner, "local") or on a Ray cluster (ray.py).

Both engines predict with the same runtime (`serving.inference.build.build_runtime`): the model
families of the composition root, the data resolver with file:// access under the input folders,
the micro-batchers and the config validation, so a task gets the same regions whichever engine
predicts it.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Mapping

from serving.jobs.manager import EngineFactory
from serving.jobs.runner import JobRunner
from serving.plan.families import FamiliesSource
from serving.settings import Settings

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")

RAY_MISSING = (
    "the Ray engine needs Ray: `.venv/bin/pip install -r requirements-ray.txt` (the pinned ray[data]), "
    "or run without --engine ray"
)


def ray_installed() -> bool:
    """Return True when `ray.data` can be imported (the optional extra, requirements-ray.txt)."""
    try:
        return (
            importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
        )
    except (ImportError, ValueError):
        return False


def server_engines(settings: Settings, families: FamiliesSource) -> Mapping[str, EngineFactory]:
    """Return the engines POST /batch may ask for besides "local": "ray" when RAY_ADDRESS is set."""
    if not settings.ray_address:
        return {}
    if not ray_installed():
        log.warning("RAY_ADDRESS is set but %s", RAY_MISSING)
        return {}
    roots = [settings.batch_input_root] if settings.batch_input_root else []

    def ray_runner(stop: threading.Event) -> JobRunner:
        from serving.jobs.engines.ray import RayJobRunner, RayOptions

        # progress goes to GET /jobs/{id}, not as Ray's progress lines into the server log
        options = RayOptions.from_settings(settings, quiet=True)
        return RayJobRunner(settings, families, roots, options=options, stop=stop)

    return {"ray": ray_runner}
