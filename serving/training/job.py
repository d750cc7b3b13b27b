"""One training job, start to end: its data (the snapshot, or the project's export), the family's train(), the version.

done: a new version is published and the project's pointer moved to it. skipped: too few annotated
tasks (TRAIN_MIN_EXAMPLES). failed / cancelled: nothing published, pointer untouched. A trainer that
is stopping puts the job back to queued (it resumes from its checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from serving.contract import Backend, Example, Target, TrainCancelled
from serving.fetch.local import build_resolver
from serving.fetch.resolver import Resolver
from serving.plan.families import Registry
from serving.plan.planner import Plan, build_plan, unrouted_plan
from serving.plan.version import plan_version
from serving.settings import Settings
from serving.training.examples import ExportStats, examples_from_tasks, export_sha1
from serving.training.store import TrainingJob, TrainingStore
from serving.training.versions import VersionStore
from serving.util.files import write_json_atomic

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 600.0


class TrainingFailed(Exception):
    """A job cannot train; the message says why and what to change."""


def fetch_export(settings: Settings, project_id: Any, http: Any = None) -> list[Any]:
    """Return every annotated task of a Label Studio project through its export API (JSON).

    Authenticates like the data fetcher: a legacy token, or a personal access token exchanged for
    short-lived access tokens (refreshed, and once more after a 401).
    """
    import requests

    from serving.errors import InputError
    from serving.fetch.lsclient import LabelStudioClient

    client = LabelStudioClient(settings)
    base = client.base_url
    if not base or client.token_kind == "none":
        raise TrainingFailed(
            "training reads the project's annotations from Label Studio: set LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY (a legacy token or a personal access token) on the server"
        )
    url = f"{base}/api/projects/{project_id}/export"
    session = http or requests.Session()
    rejected: str | None = None
    for attempt in range(2):
        try:
            headers = client.auth_headers(force_refresh=attempt > 0, rejected=rejected)
        except InputError as exc:
            raise TrainingFailed(str(exc)) from None
        try:
            resp = session.get(
                url,
                params={"exportType": "JSON", "download_all_tasks": "false"},
                headers=headers,
                timeout=(10.0, EXPORT_TIMEOUT_S),
            )
        except requests.RequestException as exc:
            raise TrainingFailed(
                f"cannot reach Label Studio at {base} ({type(exc).__name__}): {exc}"
            ) from None
        if resp.status_code == 401 and attempt == 0:
            rejected = headers.get("Authorization")
            continue
        if resp.status_code != 200:
            raise TrainingFailed(
                f"Label Studio's export API answered {resp.status_code} for project {project_id}: "
                f"{resp.text[:300]} (does LABEL_STUDIO_API_KEY belong to a member of the project?)"
            )
        try:
            tasks = resp.json()
        except ValueError:
            raise TrainingFailed("Label Studio's export API did not answer JSON") from None
        if not isinstance(tasks, list):
            raise TrainingFailed("Label Studio's export API answered something other than a list of tasks")
        return tasks
    raise TrainingFailed("Label Studio refused the API key twice (HTTP 401): check LABEL_STUDIO_API_KEY")


def load_tasks(job: TrainingJob, store: TrainingStore, settings: Settings, http: Any = None) -> list[Any]:
    """Return the job's data: its snapshot when it has one (inline data, or a resumed job), else the export."""
    path = store.job_dir(job.id) / "data.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise TrainingFailed(f"{path} does not hold a list of tasks")
        return data
    source = job.source or {}
    if source.get("kind") != "label_studio":
        raise TrainingFailed(f"the job's data ({path}) is missing")
    tasks = fetch_export(settings, source.get("project_id", job.project), http=http)
    write_json_atomic(path, tasks)  # a resumed job trains on exactly these tasks
    return tasks


def run_job(
    job: TrainingJob,
    *,
    store: TrainingStore,
    versions: VersionStore,
    families: Registry,
    settings: Settings,
    stop: threading.Event | None = None,
    resolver: Resolver | None = None,
    http: Any = None,
) -> TrainingJob:
    """Run one claimed job to its end state; return the job as stored afterwards.

    done: a new version is published and the project's pointer moved to it. skipped: too few
    annotated tasks (TRAIN_MIN_EXAMPLES). failed / cancelled: nothing published, pointer untouched.
    A trainer that is stopping puts the job back to queued (it resumes from its checkpoint).
    """
    job_dir = store.job_dir(job.id)
    job_dir.mkdir(parents=True, exist_ok=True)
    output = job_dir / "output"
    with _job_log(job_dir / "train.log"):
        try:
            log.info(
                "job %s: training %s for project %s on %s (attempt %d)",
                job.id,
                job.model_key,
                job.project,
                job.device,
                job.attempts,
            )
            _train(job, store, versions, families, settings, stop or threading.Event(), resolver, http)
        except TrainCancelled:
            if store.cancel_requested(job.id):
                log.info("job %s: cancelled", job.id)
                store.finish(job.id, "cancelled", reason="cancelled while running")
            else:
                log.info(
                    "job %s: interrupted (the trainer is stopping); it resumes from its checkpoint", job.id
                )
                store.update(job.id, state="queued")
            shutil.rmtree(output, ignore_errors=True)
        except TrainingFailed as exc:
            log.error("job %s: failed: %s", job.id, exc)
            store.finish(job.id, "failed", error=str(exc))
            shutil.rmtree(output, ignore_errors=True)
        except Exception as exc:
            log.exception("job %s: failed", job.id)
            store.finish(
                job.id, "failed", error=f"{type(exc).__name__}: {str(exc)[:500]} (see the job's log)"
            )
            shutil.rmtree(output, ignore_errors=True)
    return _reload(store, job)


@contextlib.contextmanager
def _job_log(path: Path) -> Iterator[None]:
    """Copy every log record at INFO and above into the job's own log file while the job runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    if level > logging.INFO or level == logging.NOTSET:
        root.setLevel(logging.INFO)  # the job's log keeps its progress whatever LOG_LEVEL says
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _trainable(
    job: TrainingJob, families: Registry, settings: Settings
) -> tuple[type[Backend], Plan, tuple[Target, ...]]:
    """Return the job's family, the plan of its config and the targets its model fills; raise why it cannot train."""
    cls = families.get(job.family)
    if cls is None:
        raise TrainingFailed(f"no model family {job.family!r} on this server")
    reason = cls.trainable(job.spec, settings)
    if reason:
        raise TrainingFailed(reason)
    # Fine-tuning teaches the model every label of its tags, the ones no pretrained class knows first
    # of all (label routing hands those to a zero-shot model until the trained version serves them).
    plan = build_plan(job.config, settings, families)
    targets = plan.whole_tags(job.model_key)
    if not targets:  # routing gave all its tags to other models: the tags that family claims
        unrouted = unrouted_plan(job.config, settings, families)
        targets = unrouted.whole_tags(job.model_key) if unrouted is not None else ()
    if not targets:
        raise TrainingFailed(f"the labeling config no longer uses {job.model_key}")
    return cls, plan, targets


def _gather(
    job: TrainingJob,
    store: TrainingStore,
    settings: Settings,
    targets: Sequence[Target],
    resolver: Resolver,
    http: Any,
) -> tuple[list[Example], ExportStats, dict[str, Any]] | None:
    """Return the job's examples, their stats and the snapshot stored with the job; None when too few (skipped)."""
    tasks = load_tasks(job, store, settings, http=http)
    examples, stats = examples_from_tasks(tasks, targets, load_text=resolver.load_text)
    snapshot = {
        **stats.as_dict(),
        "sha1": export_sha1(tasks),
        "task_ids": [t.get("id") for t in tasks if isinstance(t, dict)][:10000],
    }
    store.update(job.id, snapshot=snapshot)
    for why in stats.reasons[:5]:
        log.warning("job %s: region dropped: %s", job.id, why)
    if stats.annotated < settings.train_min_examples:
        reason = (
            f"{stats.annotated} annotated task(s) usable for {job.model_key}; training needs at least "
            f"{settings.train_min_examples} (TRAIN_MIN_EXAMPLES)"
        )
        log.info("job %s: skipped: %s", job.id, reason)
        store.finish(job.id, "skipped", reason=reason)
        return None
    return examples, stats, snapshot


def _train(
    job: TrainingJob,
    store: TrainingStore,
    versions: VersionStore,
    families: Registry,
    settings: Settings,
    stop: threading.Event,
    resolver: Resolver | None,
    http: Any,
) -> None:
    """Train the job's model and publish the version, or finish the job skipped; raise why it cannot."""
    from serving.training.run import Run

    started = time.monotonic()
    cls, plan, targets = _trainable(job, families, settings)
    resolver = resolver or build_resolver(settings)
    gathered = _gather(job, store, settings, targets, resolver, http)
    if gathered is None:
        return
    examples, stats, snapshot = gathered
    output = store.job_dir(job.id) / "output"
    if output.exists():
        shutil.rmtree(output)
    # the version folder-to-be: the model in model/, the manifest beside it (so it never
    # changes the weights' fingerprint)
    (output / "model").mkdir(parents=True)
    run = Run(
        job=job,
        store=store,
        settings=settings,
        targets=targets,
        examples=examples,
        output_dir=output / "model",
        device=job.device,
        resolver=resolver,
        stop=stop,
    )
    if run.checkpoint is not None:
        log.info("job %s: resuming at epoch %d from %s", job.id, run.start_epoch, run.checkpoint)
    result = cls.train(run)
    if store.cancel_requested(job.id):
        raise TrainCancelled("cancelled")
    model_path = "/".join(p for p in ("model", str(result.model_path or "").strip("/")) if p)
    if not (output / model_path).exists() or not any((output / "model").iterdir()):
        raise TrainingFailed(f"{cls.family}.train() wrote no {model_path} into its output folder")
    trained_spec = dataclasses.replace(job.spec, path=str(output / model_path), trained="new")
    # the version the project is then served with: its routed plan, this model serving all its tags' labels
    served = plan.with_trained({job.model_key: trained_spec}, unrouted_plan(job.config, settings, families))
    model_version = plan_version(served, families, settings)
    manifest = {
        "job_id": job.id,
        "model_version": model_version,
        "labels": list(run.labels),
        "metrics": dict(result.metrics),
        "examples": stats.examples,
        "snapshot_sha1": snapshot["sha1"],
        "config": job.config,
        "seconds": round(time.monotonic() - started, 1),
    }
    entry = versions.publish(
        job.project, job.spec, output, model_path, manifest, keep=settings.train_keep_versions
    )
    store.finish(
        job.id,
        "done",
        version=entry["version"],
        model_version=model_version,
        metrics=dict(result.metrics),
        reason=None,
    )
    shutil.rmtree(store.job_dir(job.id) / "checkpoints", ignore_errors=True)
    log.info(
        "job %s: done in %.1f s: version %s, model_version %s, metrics %s",
        job.id,
        time.monotonic() - started,
        entry["version"],
        model_version,
        dict(result.metrics),
    )


def _reload(store: TrainingStore, job: TrainingJob) -> TrainingJob:
    fresh = store.get(job.id)
    return fresh if fresh is not None else job
