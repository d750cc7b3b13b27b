"""The model API Label Studio talks to (setup, predict, fit, versions), over a runtime it is handed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from serving.contract import ModelSpec
from serving.errors import BadRequest, ConfigError, NotFound, TrainingUnavailable
from serving.inference.runtime import Runtime, TaskFailure
from serving.plan.planner import Plan
from serving.scale.replicas import Splitter
from serving.service.configs import SeenConfigs
from serving.settings import Settings
from serving.training.names import project_key, training_device
from serving.training.store import TrainingJobs, TrainingStore
from serving.training.versions import BASE_VERSION_NAMES, VersionStore
from serving.util.files import write_json_atomic

log = logging.getLogger(__name__)


class ModelService:
    """Label Studio ML backend: every model family behind one object, models shared per process.

    Mirrors label_studio_ml 2.x's LabelStudioMLBase surface (setup, predict(tasks, context),
    fit(event, data)) without its per-request model re-creation: the runtime loads each model once.
    The composition root (model.py) builds the runtime with the model families and hands it in.
    """

    model_class = "LabelStudioMLServer"

    def __init__(self, settings: Settings, runtime: Runtime, families_ref: str | None = None) -> None:
        """Keep the settings and the runtime (built by the composition root).

        `families_ref` ("module:attribute" of the family registry, e.g. "model:families") lets the
        trainer process import the families: without it, webhooks only acknowledge events.
        """
        self.settings = settings
        self.runtime = runtime
        self.seen = SeenConfigs(settings.model_path / "configs")
        self.splitter = Splitter(settings, runtime.metrics)  # a no-op unless REPLICA_URLS is set
        self._projects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.families_ref = families_ref
        self.training_store = TrainingStore.for_settings(settings)
        self.version_store = VersionStore.for_settings(settings)
        self.training_jobs = TrainingJobs(self.training_store)
        # project -> (pointer stat, {pretrained key: trained spec}); (project, config hash) -> plan served
        self._pointers: dict[str, tuple[Any, dict[str, ModelSpec]]] = {}
        self._active: dict[tuple[str, str], Plan] = {}
        self._unloadable: set[str] = set()
        self.supervisor: Any = None
        if settings.training and families_ref:
            from serving.training.process import TrainerSupervisor

            self.supervisor = TrainerSupervisor(settings, families_ref, self.training_store)
            if self.training_store.exists():
                self.supervisor.kick()  # jobs left queued or running by an earlier server resume now
        # Deciding the training device may import torch (seconds): not on a webhook's request path.
        self._training_device: str | None = None
        self._device_thread = threading.Thread(target=self._decide_device, name="train-device", daemon=True)
        if self.supervisor is not None:
            self._device_thread.start()

    def _decide_device(self) -> None:
        self._training_device = training_device(self.settings)

    def training_device(self) -> str:
        """Return the device this server's training jobs run on (decided once, in the background)."""
        if self._training_device is None:
            if self._device_thread.is_alive():
                self._device_thread.join()
            if self._training_device is None:
                self._decide_device()
        assert self._training_device is not None
        return self._training_device

    def setup(
        self,
        project: str | None,
        schema: str,
        hostname: str | None = None,
        access_token: str | None = None,
        extra_params: Mapping[str, Any] | None = None,
    ) -> str:
        """Plan the project's config (with its trained models), start loading them, return its model_version."""
        plan = self.serving_plan(project, schema)
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
            client = self.runtime.client
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
        plan = self.serving_plan(project, config)
        predictions = self.runtime.predict(config, tasks, context=context, failures=failures, plan=plan)
        self.seen.add(config)  # planned without error: a config this server serves
        return predictions

    def predict_request(
        self,
        tasks: Sequence[Any],
        *,
        context: Mapping[str, Any] | None = None,
        label_config: str | None = None,
        project: Any = None,
        params: Any = None,
        forwarded: bool = False,
        authorization: str | None = None,
    ) -> list[dict[str, Any]]:
        """Answer a /predict request: one prediction per task, in order; a big one split over the replicas.

        `forwarded`: the request is a chunk another replica split off (never split again);
        `authorization`: the request's header, which the forwarded chunks carry on.
        """
        key = str(project) if project else None
        if not self.splitter.applies(len(tasks), forwarded, context):
            return self.predict(tasks, context=context, label_config=label_config, project=key)
        config = self.config_for(label_config, key)
        # the plan this project is served with (its trained models in): a bad config is refused
        # here, not once per chunk, and a failed chunk's entries carry the version /setup gave
        version = self.runtime.model_version(self.serving_plan(key, config))
        results = self.splitter.predict(
            tasks,
            label_config=config,
            version=version,
            params=params,
            project=project,
            authorization=authorization,
            local=lambda chunk: self.predict(chunk, context=context, label_config=config, project=key),
        )
        self.seen.add(config)
        return results

    # ---- trained models: which plan a project is served with ----
    def trained_models(self, project: str) -> dict[str, ModelSpec]:
        """Return the project's active trained models; re-read only when its pointer file changed (one stat)."""
        stat = self.version_store.stat(project)
        with self._lock:
            cached = self._pointers.get(project)
        if cached is not None and cached[0] == stat:
            return cached[1]
        specs = self.version_store.current(project) if stat is not None else {}
        with self._lock:
            self._pointers[project] = (stat, specs)
        return specs

    def serving_plan(self, project: Any, label_config: str) -> Plan:
        """Return the plan to serve a project with: the config's, with the project's trained models in.

        A new trained version loads in the background (the runtime's model slot) while this worker
        keeps answering with the plan it served before; the swap happens on the first call that
        finds it loaded. Requests already running finish on the old weights (their slot stays
        alive until the prediction deadline has passed). A fresh worker serves the new one at once.
        """
        base = self.runtime.plan(label_config)
        key = project_key(project)
        if key is None:
            return base
        trained = self.trained_models(key)
        # a trained model whose tags routing gave to other models entirely comes from the unrouted plan
        unrouted = self.runtime.unrouted_plan(label_config) if trained else None
        base_keys = {spec.key for plan in (base, unrouted) if plan is not None for spec in plan.specs}
        relevant = {k: spec for k, spec in trained.items() if k in base_keys}
        slot_key = (key, base.config_hash)
        with self._lock:
            active = self._active.get(slot_key)
        if not relevant:
            if active is None or active is not base:
                self._swap(slot_key, base)  # remembered: a later trained version swaps in once loaded
            return base
        wanted = base.with_trained(relevant, unrouted)
        wanted_keys = [spec.key for spec in wanted.specs]
        if active is not None and [spec.key for spec in active.specs] == wanted_keys:
            if not self._failed(active):
                return active
            self._swap(slot_key, base)  # the trained model cannot load here: serve the pretrained one
            return base
        active_keys = {spec.key for spec in active.specs} if active is not None else set()
        slots = [
            self.runtime.slot(spec) for spec in wanted.specs if spec.trained and spec.key not in active_keys
        ]
        if any(slot.failed for slot in slots):
            for slot in slots:
                if slot.failed and slot.spec.key not in self._unloadable:
                    self._unloadable.add(slot.spec.key)
                    log.warning(
                        "project %s: trained model %s cannot serve: %s", key, slot.spec.key, slot.state
                    )
            return active if active is not None else base
        if active is not None and not all(slot.ready.is_set() for slot in slots):
            return active  # the old weights answer until the new ones are loaded
        self._swap(slot_key, wanted)
        if active is not None:
            log.info("project %s now served by %s", key, self.runtime.model_version(wanted))
        return wanted

    def _failed(self, plan: Plan) -> bool:
        return any(self.runtime.slot(spec, start=False).failed for spec in plan.specs if spec.trained)

    def _swap(self, slot_key: tuple[str, str], plan: Plan | None) -> None:
        """Make `plan` the one served for (project, config); release trained models nothing serves now."""
        with self._lock:
            old = self._active.pop(slot_key, None)
            if plan is not None:
                self._active[slot_key] = plan
            in_use = {spec.key for p in self._active.values() for spec in p.specs}
        for spec in old.specs if old is not None else ():
            if spec.trained and spec.key not in in_use:
                self.runtime.release(spec)

    # ---- training ----
    @property
    def training_enabled(self) -> bool:
        """Return True when webhooks start training jobs (TRAINING on, and a trainer can be started)."""
        return bool(self.settings.training and self.supervisor is not None)

    def fit(self, event: str, data: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Record a training request for each trainable model of the project (answers in milliseconds).

        Nothing trains here: the trainer process runs the job. Label Studio's "Start Training"
        (START_TRAINING) gets the job id, as `job`; events that are not in TRAIN_EVENTS, or any event
        while training is off, are only acknowledged. The legacy /train call carries its tasks inline.
        """
        if not self.training_enabled or event not in self.settings.train_events:
            return {"status": "ok", "event": event, "trained": False}
        strict = event == "START_TRAINING"
        raw_project = data.get("project")
        key = project_key(raw_project)
        if key is None:
            if strict:
                raise BadRequest(
                    "START_TRAINING without a project id ('project': {'id': ...} or '<id>.<ts>')"
                )
            return {"status": "ok", "event": event, "trained": False, "reason": "no project in the event"}
        config = raw_project.get("label_config") if isinstance(raw_project, Mapping) else None
        config = config or data.get("label_config") or self.schema_for(str(raw_project))
        if not isinstance(config, str) or not config.strip():
            if strict:
                raise BadRequest(
                    "no labeling config: the event has no project.label_config and no /setup was seen"
                )
            return {"status": "ok", "event": event, "trained": False, "reason": "no labeling config"}
        inline = data.get("annotations") if isinstance(data.get("annotations"), list) else None
        try:
            return self.request_training(key, config, event, tasks=inline)
        except (TrainingUnavailable, ConfigError) as exc:
            if strict or inline is not None:
                raise
            return {"status": "ok", "event": event, "trained": False, "reason": exc.message}

    def request_training(
        self, project: str, config: str, event: str, tasks: list[Any] | None = None
    ) -> dict[str, Any]:
        """Queue (or join) a training job per trainable model of the config; raise when none can train."""
        plan = self.runtime.plan(config)
        if tasks is None and not (self.settings.label_studio_url and self.settings.label_studio_api_key):
            raise TrainingUnavailable(
                "training reads the project's annotations from Label Studio: set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY (a legacy token or a personal access token) on the ML server"
            )
        device = self.training_device()
        jobs, refused = [], {}
        for spec in plan.specs:
            family = self.runtime.family(spec)
            reason = family.trainable(spec, self.settings)
            if not reason:
                # a model trains only on the tags its family learns from (NER: Labels on Text)
                why_not = [family.trains_target(t) for t in plan.targets_of(spec.key)]
                if why_not and all(why_not):
                    reason = "; ".join(dict.fromkeys(str(w) for w in why_not))
            if reason:
                refused[spec.key] = reason
                continue
            source = (
                {"kind": "inline"} if tasks is not None else {"kind": "label_studio", "project_id": project}
            )

            def prepare(job_id: str, coalesced: bool) -> None:
                # in the request's transaction: a waiting trainer cannot claim the job before this
                data_file = self.training_store.job_dir(job_id) / "data.json"
                if tasks is not None:
                    write_json_atomic(data_file, tasks)
                elif coalesced:
                    data_file.unlink(missing_ok=True)  # the queued job reads the newest export when it starts

            job_id, coalesced = self.training_store.request(
                project,
                spec,
                device,
                config,
                source,
                event,
                debounce_s=self.settings.train_debounce_s,
                prepare=prepare,
            )
            jobs.append({"job_id": job_id, "model": spec.key, "coalesced": coalesced})
        if not jobs:
            raise TrainingUnavailable(
                "nothing in this labeling config can be trained here: "
                + "; ".join(f"{k}: {why}" for k, why in refused.items())
            )
        log.info(
            "training requested for project %s by %s: %s",
            project,
            event,
            ", ".join(f"{j['job_id']} ({j['model']}{', joined' if j['coalesced'] else ''})" for j in jobs),
        )
        if self.supervisor is not None:
            self.supervisor.kick()
        return {
            "status": "ok",
            "event": event,
            "job": jobs[0]["job_id"],
            "jobs": jobs,
            "not_trainable": refused,
        }

    def job_status(self, job_id: str) -> dict[str, Any]:
        """Return a training job's status in Label Studio's job_status form ({"job_status": ...})."""
        job = self.training_store.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id[:40]!r}")
        state = {"running": "started", "done": "finished"}.get(job.state, job.state)
        return {"job_status": state, "job": self.training_store.status(job, log_lines=0)}

    def close(self, timeout: float = 10.0) -> None:
        """Stop forwarding split chunks, and the trainer this worker started (its job resumes later)."""
        self.splitter.close()
        if self.supervisor is not None:
            self.supervisor.close(timeout)

    # ---- versions ----
    def versions(self, project: Any = None) -> list[str]:
        """Return the versions this server can serve now for every config it has seen (newest first).

        Recomputed from the configs kept under MODEL_DIR, so every worker, replica and restart
        answers the same list, and a version whose models can no longer load is not offered.
        Trained versions follow (every project's, or with `project` only that project's).
        """
        if project is not None:
            return list(self.project_versions(project)["versions"])
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
        for name in self.version_store.projects():
            for manifest in self.version_store.manifests(name):
                trained = manifest.get("model_version")
                if isinstance(trained, str) and trained not in versions:
                    versions.append(trained)
        return versions

    def project_versions(self, project: Any) -> dict[str, Any]:
        """Return a project's versions: the one it is pointed at, the pretrained one, and each trained one."""
        key = project_key(project)
        if key is None:
            raise BadRequest(f"project {str(project)[:40]!r} is not a Label Studio project id")
        manifests = self.version_store.manifests(key)
        config = (
            self.schema_for(str(project))
            or self._config_of(key)
            or (manifests[0].get("config") if manifests else None)
        )
        pointer = self.version_store.pointer(key).get("models", {})
        trained = [
            {
                "version": m.get("version"),
                "model": m.get("model"),
                "model_version": m.get("model_version"),
                "active": pointer.get(m.get("model"), {}).get("version") == m.get("version"),
                "created_at": m.get("created_at"),
                "job_id": m.get("job_id"),
                "examples": m.get("examples"),
                "metrics": m.get("metrics"),
            }
            for m in manifests
        ]
        current = base = None
        if isinstance(config, str):
            plan = self.runtime.plan(config)
            base = self.runtime.model_version(plan)
            unrouted = self.runtime.unrouted_plan(config)
            current = self.runtime.model_version(plan.with_trained(self.trained_models(key), unrouted))
        versions: list[str] = []
        for version in (current, *(t["model_version"] for t in trained), base):
            if isinstance(version, str) and version not in versions:
                versions.append(version)
        return {"project": key, "versions": versions, "current": current, "base": base, "trained": trained}

    def _config_of(self, project: str) -> str | None:
        with self._lock:
            for name, entry in self._projects.items():
                if project_key(name) == project:
                    return str(entry["schema"])
        return None

    def activate(self, version: str, project: Any) -> dict[str, Any]:
        """Point a project at one of its trained versions, or back at the pretrained model (rollback).

        `version` is a version id ("v3-1a2b3c4d"), a model_version /versions listed, or "base"
        (also the project's pretrained model_version). Every worker swaps on its next call.
        """
        info = self.project_versions(project)
        key = info["project"]
        if version in BASE_VERSION_NAMES or (info["base"] is not None and version == info["base"]):
            for model in list(self.version_store.pointer(key).get("models", {})):
                self.version_store.activate(key, model, None)
        else:
            matches = [t for t in info["trained"] if version in (t["version"], t["model_version"])]
            if not matches:
                known = ", ".join(str(t["version"]) for t in info["trained"]) or "none"
                raise NotFound(
                    f"project {key} has no version {version!r} (trained versions: {known}; or 'base')"
                )
            chosen = matches[0]
            self.version_store.activate(key, str(chosen["model"]), str(chosen["version"]))
        log.info("project %s: version %s activated", key, version)
        return self.project_versions(project)
