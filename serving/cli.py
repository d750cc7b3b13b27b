"""The command line: `python -m serving predict ...` (batch predictions for imports), `validate ...` and `train ...`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.errors import (
    BadRequest,
    ConfigError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)
from serving.jobs import (
    JobFailed,
    JobRunner,
    JobStore,
    create_store,
    file_to_data_uri,
    input_kind,
    iter_json_file,
    iter_jsonl_file,
    iter_output,
    iter_result_text,
)
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.contract import Backend

# The composition root (model.py) passes its family registry; called only when models run here.
Families = Callable[[], Mapping[str, "type[Backend]"]]

log = logging.getLogger("serving.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """The command line is wrong; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------- helpers


def read_config(path: str) -> str:
    """Return the labeling config XML from a file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file (give the project's labeling config XML)")
    return p.read_text(encoding="utf-8")


def state_files(state: Path) -> list[Path]:
    """Return the state file and its SQLite/lock companions."""
    return [state, *(state.with_name(state.name + s) for s in ("-wal", "-shm", ".lock"))]


def remove_state(state: Path) -> None:
    """Delete the state file, its companions and the Ray engine's staged inputs."""
    import shutil

    for f in state_files(state):
        f.unlink(missing_ok=True)
    shutil.rmtree(state.with_name(state.name + ".ray"), ignore_errors=True)


def default_state(args: argparse.Namespace) -> Path:
    """Return where the resume state lives: beside the output."""
    if args.state:
        return Path(args.state)
    if args.output:
        return Path(args.output + ".state")
    if args.output_dir:
        return Path(str(args.output_dir).rstrip("/") + ".state")
    return Path(f"lsml-push-project{args.project}.state")


class HttpPredictor:
    """predict_fn over a running server's POST /predict: retries, backoff, local images sent as data: URIs."""

    def __init__(
        self,
        server: str,
        auth: tuple[str, str] | None = None,
        timeout_s: float = 300.0,
        retries: int = 8,
        backoff_s: float = 0.5,
        http: Any = None,
    ) -> None:
        import requests

        self.url = server.rstrip("/") + "/predict"
        self.auth = auth
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.http = http if http is not None else requests.Session()

    @staticmethod
    def _inline_local(task: dict[str, Any]) -> dict[str, Any]:
        data = task.get("data")
        if not isinstance(data, dict) or not any(
            isinstance(v, str) and v.startswith("file://") for v in data.values()
        ):
            return task
        # the server cannot read this machine's files: send their bytes
        inlined = {
            k: file_to_data_uri(v) if isinstance(v, str) and v.startswith("file://") else v
            for k, v in data.items()
        }
        return {**task, "data": inlined}

    def __call__(self, label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """POST one chunk; return its predictions."""
        import requests

        body = {
            "tasks": [self._inline_local(t) for t in tasks],
            "label_config": label_config,
            "params": {"context": None},
        }
        problem = ""
        for attempt in range(self.retries + 1):
            delay = min(30.0, self.backoff_s * 2**attempt)
            try:
                resp = self.http.post(self.url, json=body, auth=self.auth, timeout=(10.0, self.timeout_s))
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if status == 200:
                    results = resp.json().get("results")
                    if not isinstance(results, list):
                        raise BadRequest(f"{self.url} answered without a 'results' list")
                    return results
                message = _server_message(resp)
                if status in (429, 503) or status >= 500:
                    problem = f"HTTP {status}: {message}"
                    retry_after = resp.headers.get("Retry-After", "")
                    if retry_after.isdigit():
                        delay = float(retry_after)
                elif status == 401:
                    raise Unauthorized(
                        f"{self.url} needs basic auth: pass --basic-auth user:password ({message})"
                    )
                elif status == 413:
                    raise PayloadTooLarge(f"{message}; lower --chunk-size")
                elif status == 422:
                    raise ConfigError(message)
                else:
                    raise BadRequest(f"{self.url} answered {status}: {message}")
            if attempt < self.retries:
                log.warning("predict request failed (%s); retrying in %.1f s", problem, delay)
                time.sleep(delay)
        raise JobFailed(f"{self.url} kept failing ({problem}); rerun with --resume when it is back")


def _server_message(resp: Any) -> str:
    try:
        body = resp.json()
        return str(body.get("message") or body)[:300]
    except ValueError:
        return resp.text[:300]


def build_runtime(settings: Settings, roots: Sequence[Path], families: Families | None) -> Any:
    """Build the in-process runtime (imported lazily: torch and models load only for `predict`)."""
    from serving.engines import build_runtime as build

    if families is None:
        raise UsageError("no model families to run here: start the command line as `python -m serving`")
    return build(settings, roots, families)


def build_ray_runner(args: argparse.Namespace, settings: Settings, folder: Path, chunk: int) -> Any:
    """Return the runner of --engine ray: the same runtime, built once on each actor of the cluster."""
    from serving.engines import RAY_MISSING, ray_installed

    if args.families is None:
        raise UsageError("no model families to run here: start the command line as `python -m serving`")
    if not ray_installed():
        raise UsageError(RAY_MISSING)
    from serving.engines.ray import RayJobRunner, RayOptions

    options = RayOptions.from_settings(
        settings,
        address=args.ray_address,
        actors=args.ray_actors,
        gpus_per_actor=args.ray_gpus_per_actor,
        cpus_per_actor=args.ray_cpus_per_actor,
        stage_dir=args.ray_stage_dir,
        quiet=args.quiet,
    )
    return RayJobRunner(settings, args.families, [folder], options=options, chunk_size=chunk)


class _Progress:
    """A tqdm bar on stderr (rate, ETA), fed by (done, total) callbacks."""

    def __init__(self, desc: str, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            desc=desc, unit="task", file=sys.stderr, disable=quiet, mininterval=0.5, dynamic_ncols=True
        )

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def write_output(store: JobStore, output: Path) -> None:
    """Write the import file atomically (JSONL for .jsonl/.ndjson, else a JSON list)."""
    fmt = "jsonl" if output.suffix.lower() in {".jsonl", ".ndjson"} else "json"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for piece in iter_result_text(store, fmt):
            fh.write(piece)
    os.replace(tmp, output)


def write_output_dir(store: JobStore, folder: Path) -> int:
    """Write one task per JSON file (the layout Label Studio's cloud storage sync reads); return the count."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for idx, task, _, _ in iter_output(store):
        path = folder / f"task_{idx:07d}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(task, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    """Run a resumable batch prediction and write/push the results."""
    if not (args.output or args.output_dir or args.push):
        raise UsageError("say where results go: --output FILE, --output-dir DIR, and/or --push")
    if args.engine == "ray" and args.server:
        raise UsageError("--engine ray runs the models on the Ray cluster; drop --server (or --engine ray)")
    if args.push and not (args.ls_url and args.ls_key and args.project is not None):
        raise UsageError(
            "--push needs --ls-url, --ls-key (API key or personal access token) and --project ID"
        )
    label_config = read_config(args.config)
    input_path = Path(args.input).resolve()
    if not input_path.exists():
        raise UsageError(f"--input {args.input}: no such file or folder")
    state = default_state(args)
    settings = Settings.from_env()
    if args.ls_url:
        settings = settings.with_(label_studio_url=args.ls_url, label_studio_api_key=args.ls_key or "")
    folder = input_path if input_path.is_dir() else input_path.parent
    settings = settings.with_(
        batch_input_root=str(folder), predict_timeout_s=max(settings.predict_timeout_s, 3600.0)
    )

    if (
        input_path.is_dir()
        and not args.url_prefix
        and not _under(input_path, settings.local_files_document_root)
    ):
        log.warning(
            "images are written as file:// URIs, which Label Studio cannot show: pass --url-prefix (where the "
            "same files are served) or put the folder under LOCAL_FILES_DOCUMENT_ROOT"
        )
    if state.exists() and args.force:
        remove_state(state)
    if state.exists():
        if not args.resume:
            raise UsageError(
                f"an earlier run's state is at {state}: pass --resume to continue it, or --force to start over"
            )
        store = JobStore(state)
        earlier = store.meta()
        if earlier.get("config_hash") != _hash(label_config) or earlier.get("cli_input") != str(input_path):
            store.close()
            raise UsageError(f"{state} belongs to another config or input; use --force to start over")
        if earlier.get("state") in ("failed", "cancelled"):
            store.set(state="queued", error=None, cancel_requested=False)
        store.close()
        log.info("resuming from %s", state)
    else:
        if args.resume:
            log.info("no earlier run at %s; starting", state)
        state.parent.mkdir(parents=True, exist_ok=True)
        create_store(
            state,
            label_config,
            input_path=input_path,
            url_prefix=args.url_prefix or "",
            job_id="cli",
            extra={"cli_input": str(input_path)},
        ).close()

    runtime = None
    chunk = args.chunk_size or (16 if args.server else 32)
    if args.engine == "ray":
        runner = build_ray_runner(args, settings, folder, chunk)
    else:
        if args.server:
            auth = tuple(args.basic_auth.split(":", 1)) if args.basic_auth else None
            predict_fn: Any = HttpPredictor(args.server, auth=auth)  # type: ignore[arg-type]
        else:
            runtime = build_runtime(settings, [folder], args.families)
            predict_fn = runtime.predict
        runner = JobRunner(settings, predict_fn, chunk_size=chunk)
    progress = _Progress("predict", args.quiet)
    try:
        meta = runner.run(state, progress=progress)
    finally:
        progress.close()
        if runtime is not None:
            runtime.close()
    if meta is None:
        log.error("another process is running this job (%s is locked)", state)
        return EXIT_FAILED
    if meta.get("state") != "done":
        log.error("prediction %s: %s; rerun with --resume to continue", meta.get("state"), meta.get("error"))
        return EXIT_FAILED

    store = JobStore(state)
    try:
        failed = int(meta.get("failed") or 0)
        if failed:
            for idx, task, _, error in iter_output(store):
                if error:
                    log.warning(
                        "task #%d%s: %s", idx, f" (id {task.get('id')})" if "id" in task else "", error
                    )
        if args.output:
            write_output(store, Path(args.output))
            log.info("wrote %s (%d tasks, %d failed)", args.output, meta.get("total"), failed)
        if args.output_dir:
            n = write_output_dir(store, Path(args.output_dir))
            log.info("wrote %d task files to %s", n, args.output_dir)
        if args.push:
            from serving.push import LabelStudioPusher

            pusher = LabelStudioPusher(
                args.ls_url,
                args.ls_key,
                args.project,
                chunk_size=args.push_chunk_size,
                import_interval_s=args.import_interval,
            )
            bar = _Progress("push", args.quiet)
            try:
                summary = pusher.push(store, args.push_mode, progress=bar)
            finally:
                bar.close()
            log.info(
                "pushed to project %d (%s): %d sent, %d already there, %d skipped",
                args.project,
                summary["mode"],
                summary["sent"],
                summary["already_sent"],
                summary["skipped"],
            )
    finally:
        store.close()
    if not args.keep_state:
        remove_state(state)
    return EXIT_OK


def _under(path: Path, root: str) -> bool:
    return bool(root) and path.resolve().is_relative_to(Path(root).resolve())


def _hash(label_config: str) -> str:
    from serving.validation import ConfigSchema

    return ConfigSchema.from_config(label_config).config_hash


# ---------------------------------------------------------------------------------------------- validate


def iter_file_tasks(path: Path) -> Iterator[Any]:
    """Yield the raw objects of a JSON list or JSONL file, streaming."""
    kind = input_kind(path)
    if kind == "images":
        raise UsageError(f"{path} is a folder; validate takes a JSON or JSONL pre-annotation file")
    return iter_jsonl_file(path) if kind == "jsonl" else iter_json_file(path)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a pre-annotation file against a config; print every problem; exit 1 when there are errors."""
    from serving.validation import ConfigSchema, iter_file_problems

    schema = ConfigSchema.from_config(read_config(args.config))
    path = Path(args.input)
    if not path.is_file():
        raise UsageError(f"--input {args.input}: no such file")
    counted = {"tasks": 0}

    def counting() -> Iterator[Any]:
        for obj in iter_file_tasks(path):
            counted["tasks"] += 1
            yield obj

    errors = warnings = shown = 0
    bad_tasks: set[int] = set()
    out = sys.stdout
    for problem in iter_file_problems(schema, counting(), deep=not args.fast):
        if problem.severity == "error":
            errors += 1
            if problem.task is not None:
                bad_tasks.add(problem.task)
        else:
            warnings += 1
        if shown < args.max_problems:
            out.write(str(problem) + "\n")
            shown += 1
    if shown < errors + warnings:
        out.write(f"... {errors + warnings - shown} more problems not shown (--max-problems)\n")
    summary = f"{path.name}: {counted['tasks']} tasks checked, {errors} errors in {len(bad_tasks)} tasks, {warnings} warnings"
    out.write(summary + "\n")
    out.flush()
    return EXIT_FAILED if errors else EXIT_OK


# ---------------------------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    """Train the config's trainable models on a Label Studio export file, as the server's trainer does.

    The job, its checkpoints and the new version live under MODEL_DIR like the server's (same
    store, same versions folder and pointer, under --project); rerunning the same command after an
    interruption resumes the unfinished job from its last epoch.
    """
    from serving.jobs import FileLock
    from serving.labeling import Planner
    from serving.trainer import default_resolver, lock_path, run_job
    from serving.training import TrainingStore, VersionStore, project_key, training_device, write_json_atomic

    if args.families is None:
        raise UsageError("no model families: start the command line as `python -m serving`")
    label_config = read_config(args.config)
    path = Path(args.input).resolve()
    if not path.is_file():
        raise UsageError(f"--input {args.input}: no such file (a Label Studio JSON export)")
    project = project_key(args.project)
    if project is None:
        raise UsageError(f"--project {args.project!r}: use a Label Studio project id or a plain name")
    settings = Settings.from_env()
    changes: dict[str, Any] = {}
    if args.model_dir:
        changes["model_dir"] = args.model_dir
    if args.epochs:
        changes["train_epochs"] = args.epochs
    if args.device:
        changes["train_device"] = args.device
    if args.allow_cpu:
        changes["train_allow_cpu"] = True
    settings = settings.with_(**changes)
    tasks = list(iter_file_tasks(path))
    families = args.families()
    plan = Planner(settings, families).plan(label_config)
    specs = [s for s in plan.specs if not args.model or args.model in (s.key, s.name)]
    if not specs:
        raise UsageError(f"--model {args.model}: the config uses {', '.join(s.key for s in plan.specs)}")
    device = training_device(settings)
    store = TrainingStore.for_settings(settings)
    versions = VersionStore.for_settings(settings)
    resolver = default_resolver(settings, roots=[path.parent])
    failed = 0
    for spec in specs:
        reason = families[spec.family].trainable(spec, settings)
        if reason:
            log.warning("%s is not trained: %s", spec.key, reason)
            failed += 1
            continue
        # The device's lock first: a server trainer on the same MODEL_DIR claims any queued job of
        # the device, and must not take this one before its data is written.
        lock = FileLock(lock_path(settings, device))
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while not lock.acquire():
            if not waited:
                log.info("waiting for the %s trainer to finish its job (%s)", device, lock.path)
                waited = True
            time.sleep(1.0)
        try:
            earlier = [
                j
                for j in store.jobs(project, states=("queued", "running"))
                if j.model_key == spec.key and j.source.get("path") == str(path)
            ]
            if earlier:
                job_id = earlier[0].id
                log.info("resuming job %s (%s)", job_id, spec.key)
            else:
                job_id, _ = store.request(
                    project,
                    spec,
                    device,
                    label_config,
                    {"kind": "file", "path": str(path)},
                    "CLI",
                    coalesce=False,
                )
                write_json_atomic(store.job_dir(job_id) / "data.json", tasks)
            job = run_job(
                store.start(job_id),
                store=store,
                versions=versions,
                families=families,
                settings=settings,
                resolver=resolver,
            )
        finally:
            lock.release()
        if job.state != "done":
            log.error("%s: %s (%s)", spec.key, job.state, job.error or job.reason)
            failed += 1
            continue
        trained = versions.current(project)[spec.key]
        log.info(
            "%s trained: version %s (model_version %s), metrics %s",
            spec.key,
            job.version,
            job.model_version,
            json.dumps(job.metrics)[:500],
        )
        sys.stdout.write(f"{spec.key}\t{job.version}\t{trained.path}\n")
        if args.output:
            import shutil

            target = Path(args.output) / (spec.family if len(specs) > 1 else "")
            source = Path(trained.path)
            folder = source if source.is_dir() else source.parent
            shutil.copytree(folder, target, dirs_exist_ok=True)
            log.info(
                'copied to %s: use it with model_path="%s" on the tag',
                target,
                target if source.is_dir() else target / source.name,
            )
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "predict", help="predict a JSON/JSONL file or a folder of images into a Label Studio import"
    )
    p.add_argument("--config", required=True, help="labeling config XML file")
    p.add_argument("--input", required=True, help="tasks.json (a list), tasks.jsonl, or a folder of images")
    p.add_argument("--output", help="import file to write (.json: a JSON list; .jsonl: one task per line)")
    p.add_argument("--output-dir", help="write one task per JSON file (for Label Studio cloud storage sync)")
    p.add_argument("--server", help="URL of a running server (default: run the models in this process)")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (or --server); ray: a pool of actors on a Ray cluster (requirements-ray.txt)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster: auto, ray://head:10001, head:6379 (default RAY_ADDRESS, else a local cluster)",
    )
    p.add_argument(
        "--ray-actors", type=int, default=None, help="predictor actors (default one per GPU of the cluster)"
    )
    p.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor (default 1 when the cluster has GPUs)",
    )
    p.add_argument("--ray-cpus-per-actor", type=float, default=None, help="CPUs per actor (default 1)")
    p.add_argument(
        "--ray-stage-dir",
        default=None,
        help="shared folder every Ray node reads the staged tasks from (default RAY_STAGE_DIR, else beside --state)",
    )
    p.add_argument("--basic-auth", help="user:password for --server")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="tasks per request/commit, or per actor batch with --engine ray (default 32; 16 with --server)",
    )
    p.add_argument(
        "--url-prefix", default="", help="for image folders: URL where Label Studio sees the same files"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its state file")
    p.add_argument("--force", action="store_true", help="discard an earlier run's state and start over")
    p.add_argument("--state", help="state file (default: beside the output, <output>.state)")
    p.add_argument("--keep-state", action="store_true", help="keep the state file after success")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--push", action="store_true", help="send the predictions to an existing Label Studio project"
    )
    p.add_argument("--ls-url", default=os.environ.get("LABEL_STUDIO_URL", ""), help="Label Studio URL")
    p.add_argument(
        "--ls-key",
        default=os.environ.get("LABEL_STUDIO_API_KEY", ""),
        help="legacy API token or personal access token",
    )
    p.add_argument("--project", type=int, help="Label Studio project id for --push")
    p.add_argument(
        "--push-mode",
        default="auto",
        choices=("auto", "predictions", "import"),
        help="predictions: add to existing tasks by id; import: new tasks with predictions (auto: by task ids)",
    )
    p.add_argument("--push-chunk-size", type=int, default=500, help="tasks per Label Studio request")
    p.add_argument(
        "--import-interval",
        type=float,
        default=30.0,
        help="seconds between task imports (Label Studio asks 30)",
    )
    p.set_defaults(func=cmd_predict)

    v = sub.add_parser("validate", help="check a pre-annotation file against a labeling config")
    v.add_argument("--config", required=True, help="labeling config XML file")
    v.add_argument("--input", required=True, help="pre-annotation file (JSON list or JSONL)")
    v.add_argument("--max-problems", type=int, default=1000, help="print at most this many problems")
    v.add_argument("--fast", action="store_true", help="skip the full brush RLE decode (header check only)")
    v.set_defaults(func=cmd_validate)

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

    w = sub.add_parser("weights", help="list or download model weights (where internet exists)")
    w.add_argument("action", choices=("download", "list"))
    w.add_argument("--family", action="append", default=[], help="only this family (repeatable)")
    w.add_argument("--model", action="append", default=[], help="only this model_name (repeatable)")
    w.set_defaults(func=cmd_weights)
    return parser


def cmd_weights(args: argparse.Namespace) -> int:
    """List or download the weights of every family (or of --family / --model)."""
    from serving import weights

    if args.families is None:
        raise UsageError("no model families: start the command line as `python -m serving`")
    return weights.run(args.action, Settings.from_env(), args.families(), args.family, args.model)


def main(argv: Sequence[str] | None = None, families: Families | None = None) -> int:
    """Run the command line with the model families of the composition root; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.families = families
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except UsageError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command with --resume to continue")
        return EXIT_INTERRUPTED
    except (ServingError, JobFailed, NotFound, Overloaded) as exc:
        log.error("%s", getattr(exc, "message", None) or exc)
        return EXIT_FAILED
    except Exception as exc:
        from serving.push import PushError

        if isinstance(exc, PushError):
            log.error("%s", exc)
            return EXIT_FAILED
        raise


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
