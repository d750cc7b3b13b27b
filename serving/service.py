"""The model API Label Studio talks to (setup, predict, fit, versions), over a runtime it is handed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from serving.errors import BadRequest
from serving.runtime import Runtime, TaskFailure
from serving.settings import Settings
from serving.versions import SeenConfigs

log = logging.getLogger(__name__)


class ModelService:
    """Label Studio ML backend: every model family behind one object, models shared per process.

    Mirrors label_studio_ml 2.x's LabelStudioMLBase surface (setup, predict(tasks, context),
    fit(event, data)) without its per-request model re-creation: the runtime loads each model once.
    The composition root (model.py) builds the runtime with the model families and hands it in.
    """

    model_class = "LabelStudioMLServer"

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        """Keep the settings and the runtime (built by the composition root)."""
        self.settings = settings
        self.runtime = runtime
        self.seen = SeenConfigs(settings.model_path / "configs")
        self._projects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def setup(
        self,
        project: str | None,
        schema: str,
        hostname: str | None = None,
        access_token: str | None = None,
        extra_params: Mapping[str, Any] | None = None,
    ) -> str:
        """Plan the project's config, start loading its models, and return its model_version."""
        plan = self.runtime.plan(schema)
        self.runtime.check(plan)
        if hostname and access_token:
            self._configure_fallback(hostname, access_token)
        with self._lock:
            self._projects[str(project)] = {"schema": schema, "extra_params": dict(extra_params or {})}
        self.seen.add(schema)
        return self.runtime.model_version(plan)

    def _configure_fallback(self, hostname: str, access_token: str) -> None:
        if self.settings.label_studio_url and self.settings.label_studio_api_key:
            return
        try:
            resolver = self.runtime.resolver
            client = getattr(resolver, "client", None) or self.runtime.client
            if client is not None:
                client.configure_fallback(hostname, access_token)
        except Exception as exc:
            log.warning("could not use /setup's hostname for data fetching: %s", exc)

    def schema_for(self, project: str | None) -> str | None:
        """Return the config a project sent to /setup (fallback when /predict has no label_config)."""
        with self._lock:
            entry = self._projects.get(str(project))
        return entry["schema"] if entry else None

    def config_for(self, label_config: str | None, project: str | None) -> str:
        """Return the request's labeling config, else the one /setup saw for the project; 400 when none."""
        config = label_config or self.schema_for(project)
        if not config:
            raise BadRequest(
                "no label_config in the request and no /setup seen for this project; "
                "send 'label_config' with the tasks"
            )
        return config

    def predict(
        self,
        tasks: Sequence[Any],
        context: Mapping[str, Any] | None = None,
        label_config: str | None = None,
        project: str | None = None,
        failures: list[TaskFailure] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Return one prediction per task, in order."""
        config = self.config_for(label_config, project)
        predictions = self.runtime.predict(config, tasks, context=context, failures=failures)
        self.seen.add(config)  # planned without error: a config this server serves
        return predictions

    def fit(self, event: str, data: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Acknowledge Label Studio events; these pretrained models do not train on annotations."""
        log.info("event %s acknowledged (training is not supported by pretrained backends)", event)
        return {"status": "ok", "event": event, "trained": False}

    def versions(self) -> list[str]:
        """Return the versions this server can serve now for every config it has seen (newest first).

        Recomputed from the configs kept under MODEL_DIR, so every worker, replica and restart
        answers the same list, and a version whose models can no longer load is not offered.
        """
        versions: list[str] = []
        for config in self.seen.configs():
            try:
                plan = self.runtime.plan(config)
                if not self.runtime.servable(plan):
                    continue
                version = self.runtime.model_version(plan)
            except Exception as exc:  # a config this server no longer plans (a family removed)
                log.debug("config %s not listed in /versions: %s", self.seen.key(config), exc)
                continue
            if version not in versions:
                versions.append(version)
        return versions
