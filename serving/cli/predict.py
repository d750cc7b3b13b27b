"""`python -m serving predict`: a resumable batch prediction of a file or folder into an import file or a project."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from serving.cli.common import EXIT_FAILED, EXIT_OK, UsageError, log, read_config
from serving.errors import (
    BadRequest,
    ConfigError,
    PayloadTooLarge,
    Unauthorized,
)
from serving.fetch.local import file_to_data_uri
from serving.inference.runtime import Runtime
from serving.jobs.output import iter_output, iter_result_text
from serving.jobs.runner import JobRunner
from serving.jobs.store import JobFailed, JobStore, create_store
from serving.settings import Settings


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


def build_ray_runner(args: argparse.Namespace, settings: Settings, folder: Path, chunk: int) -> Any:
    """Return the runner of --engine ray: the same runtime, built once on each actor of the cluster."""
    from serving.jobs.engines import RAY_MISSING, ray_installed

    if args.families is None:
        raise UsageError("no model families to run here: start the command line as `python -m serving`")
    if not ray_installed():
        raise UsageError(RAY_MISSING)
    from serving.jobs.engines.ray import RayJobRunner, RayOptions

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


def cmd_predict(args: argparse.Namespace) -> int:
    """Run a resumable batch prediction and write/push the results."""
    env = Settings.from_env()
    args.ls_url = args.ls_url or env.label_studio_url
    args.ls_key = args.ls_key or env.label_studio_api_key
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
    folder = input_path if input_path.is_dir() else input_path.parent
    settings = _settings(args, env, folder)
    if (
        input_path.is_dir()
        and not args.url_prefix
        and not _under(input_path, settings.local_files_document_root)
    ):
        log.warning(
            "images are written as file:// URIs, which Label Studio cannot show: pass --url-prefix (where the "
            "same files are served) or put the folder under LOCAL_FILES_DOCUMENT_ROOT"
        )
    _open_state(args, state, label_config, input_path)
    runner, runtime = _runner(args, settings, folder)
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
        _deliver(args, store, meta)
    finally:
        store.close()
    if not args.keep_state:
        remove_state(state)
    return EXIT_OK


def _settings(args: argparse.Namespace, settings: Settings, folder: Path) -> Settings:
    """Return the settings of a run: the environment's, Label Studio's from the flags, file:// under `folder`."""
    if args.ls_url:
        settings = settings.with_(label_studio_url=args.ls_url, label_studio_api_key=args.ls_key or "")
    return settings.with_(
        batch_input_root=str(folder), predict_timeout_s=max(settings.predict_timeout_s, 3600.0)
    )


def _open_state(args: argparse.Namespace, state: Path, label_config: str, input_path: Path) -> None:
    """Create the run's state (a job store), or check and reopen an earlier run's with --resume."""
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
        return
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


def _runner(args: argparse.Namespace, settings: Settings, folder: Path) -> tuple[JobRunner, Runtime | None]:
    """Return the runner of --engine (Ray, a --server, or the models in this process) and its runtime if any."""
    chunk = args.chunk_size or (16 if args.server else 32)
    if args.engine == "ray":
        return build_ray_runner(args, settings, folder, chunk), None
    if args.server:
        auth = tuple(args.basic_auth.split(":", 1)) if args.basic_auth else None
        return JobRunner(settings, HttpPredictor(args.server, auth=auth), chunk_size=chunk), None
    if args.families is None:
        raise UsageError("no model families to run here: start the command line as `python -m serving`")
    from serving.inference.build import build_runtime  # torch and models load only for `predict`

    runtime = build_runtime(settings, args.families, roots=[folder])
    return JobRunner(settings, runtime, chunk_size=chunk), runtime


def _deliver(args: argparse.Namespace, store: JobStore, meta: dict[str, Any]) -> None:
    """Log the failed tasks, write --output / --output-dir, and --push to Label Studio."""
    failed = int(meta.get("failed") or 0)
    if failed:
        for idx, task, _, error in iter_output(store):
            if error:
                log.warning("task #%d%s: %s", idx, f" (id {task.get('id')})" if "id" in task else "", error)
    if args.output:
        write_output(store, Path(args.output))
        log.info("wrote %s (%d tasks, %d failed)", args.output, meta.get("total"), failed)
    if args.output_dir:
        n = write_output_dir(store, Path(args.output_dir))
        log.info("wrote %d task files to %s", n, args.output_dir)
    if args.push:
        _push(args, store)


def _push(args: argparse.Namespace, store: JobStore) -> None:
    """Send the predictions to the Label Studio project (--push-mode)."""
    from serving.jobs.push import LabelStudioPusher

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


def _under(path: Path, root: str) -> bool:
    return bool(root) and path.resolve().is_relative_to(Path(root).resolve())


def _hash(label_config: str) -> str:
    from serving.results.schema import ConfigSchema

    return ConfigSchema.from_config(label_config).config_hash


def add_parser(sub: Any) -> None:
    """Add the `predict` subcommand to the command line's subparsers."""
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
    p.add_argument("--ls-url", default="", help="Label Studio URL (default LABEL_STUDIO_URL)")
    p.add_argument(
        "--ls-key",
        default="",
        help="legacy API token or personal access token (default LABEL_STUDIO_API_KEY)",
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
