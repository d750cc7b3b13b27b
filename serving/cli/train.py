"""`python -m serving train`: fine-tune the config's models on a Label Studio export, as the server's trainer does."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.cli.common import EXIT_FAILED, EXIT_OK, UsageError, iter_file_tasks, log, read_config
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.contract import ModelSpec
    from serving.training.store import TrainingJob, TrainingStore


def cmd_train(args: argparse.Namespace) -> int:
    """Train the config's trainable models on a Label Studio export file, as the server's trainer does.

    The job, its checkpoints and the new version live under MODEL_DIR like the server's (same
    store, same versions folder and pointer, under --project); rerunning the same command after an
    interruption resumes the unfinished job from its last epoch.
    """
    from serving.fetch.local import build_resolver
    from serving.plan.planner import Planner
    from serving.training.job import run_job
    from serving.training.names import project_key, training_device
    from serving.training.store import TrainingStore
    from serving.training.versions import VersionStore

    if args.families is None:
        raise UsageError("no model families: start the command line as `python -m serving`")
    label_config = read_config(args.config)
    path = Path(args.input).resolve()
    if not path.is_file():
        raise UsageError(f"--input {args.input}: no such file (a Label Studio JSON export)")
    project = project_key(args.project)
    if project is None:
        raise UsageError(f"--project {args.project!r}: use a Label Studio project id or a plain name")
    settings = _settings(args)
    tasks = list(iter_file_tasks(path))
    families = args.families()
    plan = Planner(settings, families).plan(label_config)
    specs = [s for s in plan.specs if not args.model or args.model in (s.key, s.name)]
    if not specs:
        raise UsageError(f"--model {args.model}: the config uses {', '.join(s.key for s in plan.specs)}")
    device = training_device(settings)
    store = TrainingStore.for_settings(settings)
    versions = VersionStore.for_settings(settings)
    resolver = build_resolver(settings, roots=[path.parent])
    failed = 0
    for spec in specs:
        reason = families[spec.family].trainable(spec, settings)
        if reason:
            log.warning("%s is not trained: %s", spec.key, reason)
            failed += 1
            continue
        # The device's lock first: a server trainer on the same MODEL_DIR claims any queued job of
        # the device, and must not take this one before its data is written.
        with _trainer_lock(settings, device):
            job_id = _job_id(store, project, spec, device, label_config, path, tasks)
            job = run_job(
                store.start(job_id),
                store=store,
                versions=versions,
                families=families,
                settings=settings,
                resolver=resolver,
            )
        if job.state != "done":
            log.error("%s: %s (%s)", spec.key, job.state, job.error or job.reason)
            failed += 1
            continue
        _report(job, Path(versions.current(project)[spec.key].path), args.output, len(specs) > 1)
    return EXIT_FAILED if failed else EXIT_OK


def _settings(args: argparse.Namespace) -> Settings:
    """Return the environment's settings with the command line's overrides."""
    changes: dict[str, Any] = {}
    if args.model_dir:
        changes["model_dir"] = args.model_dir
    if args.epochs:
        changes["train_epochs"] = args.epochs
    if args.device:
        changes["train_device"] = args.device
    if args.allow_cpu:
        changes["train_allow_cpu"] = True
    return Settings.from_env().with_(**changes)


@contextlib.contextmanager
def _trainer_lock(settings: Settings, device: str) -> Iterator[None]:
    """Hold the device's trainer lock (waiting for a server trainer's job to end)."""
    from serving.training.process import lock_path
    from serving.util.locks import FileLock

    lock = FileLock(lock_path(settings, device))
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while not lock.acquire():
        if not waited:
            log.info("waiting for the %s trainer to finish its job (%s)", device, lock.path)
            waited = True
        time.sleep(1.0)
    try:
        yield
    finally:
        lock.release()


def _job_id(
    store: TrainingStore,
    project: str,
    spec: ModelSpec,
    device: str,
    label_config: str,
    path: Path,
    tasks: list[Any],
) -> str:
    """Return the unfinished job of this model and file (an interrupted run resumes), else a new one."""
    from serving.util.files import write_json_atomic

    earlier = [
        j
        for j in store.jobs(project, states=("queued", "running"))
        if j.model_key == spec.key and j.source.get("path") == str(path)
    ]
    if earlier:
        log.info("resuming job %s (%s)", earlier[0].id, spec.key)
        return earlier[0].id
    job_id, _ = store.request(
        project, spec, device, label_config, {"kind": "file", "path": str(path)}, "CLI", coalesce=False
    )
    write_json_atomic(store.job_dir(job_id) / "data.json", tasks)
    return job_id


def _report(job: TrainingJob, trained: Path, output: str | None, per_family: bool) -> None:
    """Log and print the new version; copy its folder to --output (one folder per family for several)."""
    log.info(
        "%s trained: version %s (model_version %s), metrics %s",
        job.model_key,
        job.version,
        job.model_version,
        json.dumps(job.metrics)[:500],
    )
    sys.stdout.write(f"{job.model_key}\t{job.version}\t{trained}\n")
    if not output:
        return
    target = Path(output) / (job.family if per_family else "")
    folder = trained if trained.is_dir() else trained.parent
    shutil.copytree(folder, target, dirs_exist_ok=True)
    log.info(
        'copied to %s: use it with model_path="%s" on the tag',
        target,
        target if trained.is_dir() else target / trained.name,
    )


def add_parser(sub: Any) -> None:
    """Add the `train` subcommand to the command line's subparsers."""
    t = sub.add_parser("train", help="fine-tune the config's models on a Label Studio export (JSON)")
    t.add_argument("--config", required=True, help="labeling config XML file")
    t.add_argument("--input", required=True, help="Label Studio export: JSON (a list of tasks) or JSONL")
    t.add_argument("--project", default="cli", help="project id or name the versions are kept under")
    t.add_argument("--model", default="", help="only this model (its key or model_name)")
    t.add_argument("--output", help="also copy the trained model folder here (to use as model_path)")
    t.add_argument("--epochs", type=int, default=0, help="epochs (default: TRAIN_EPOCHS or the family's)")
    t.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: TRAIN_DEVICE / DEVICE / auto)")
    t.add_argument("--allow-cpu", action="store_true", help="let detection train on the CPU (slow)")
    t.add_argument("--model-dir", default="", help="MODEL_DIR for jobs and versions (default: MODEL_DIR)")
    t.set_defaults(func=cmd_train)
