"""The trainer process: runs training jobs one at a time per device, outside the gunicorn workers.

`python -m serving.training.process --device cpu --families model:families` (settings as JSON on stdin) is
started by a worker's `TrainerSupervisor` as a fresh interpreter (spawn semantics: nothing of the
worker is inherited, so CUDA initialises cleanly) whenever jobs wait and no trainer holds the
device's lock (`MODEL_DIR/training/trainer-<device>.lock`, an flock the OS drops when the process
dies). The families come as an importable reference because serving/ never imports the
composition root. On SIGTERM the running job stops at its next progress report and goes back to
"queued"; after a kill -9 it is still "running" with no lock holder, and the next trainer resumes
it from its last epoch checkpoint. The trainer exits after TRAIN_IDLE_S without work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from serving.plan.families import Registry, load_families
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.names import device_slug
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from serving.util.locks import FileLock

log = logging.getLogger("serving.training.process")  # also when run as __main__


def lock_path(settings: Settings, device: str) -> Path:
    """Return the flock file that marks the trainer of a device."""
    return Path(settings.model_dir) / "training" / f"trainer-{device_slug(device)}.lock"


def settings_to_json(settings: Settings) -> str:
    """Return the settings as JSON (sent to the trainer on its stdin: secrets never touch disk or argv)."""
    return json.dumps({f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}, default=list)


def settings_from_json(text: str) -> Settings:
    """Rebuild Settings from settings_to_json()'s output."""
    raw = json.loads(text)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name not in raw:
            continue
        value = raw[f.name]
        values[f.name] = tuple(value) if isinstance(f.default, tuple) and isinstance(value, list) else value
    return Settings(**values)


def serve(
    settings: Settings,
    families: Registry,
    device: str,
    stop: threading.Event | None = None,
    idle_s: float | None = None,
    lock_wait_s: float = 3.0,
) -> int:
    """Hold the device's trainer lock and run its jobs until idle; return how many ran (0: another trainer has it)."""
    stop = stop or threading.Event()
    lock = FileLock(lock_path(settings, device))
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_wait_s
    while not lock.acquire():
        if time.monotonic() > deadline or stop.is_set():
            log.info("another trainer runs %s jobs; exiting", device)
            return 0
        time.sleep(0.1)
    store = TrainingStore.for_settings(settings)
    versions = VersionStore.for_settings(settings)
    idle = settings.train_idle_s if idle_s is None else idle_s
    ran = 0
    try:
        log.info("trainer for %s started (pid %d)", device, os.getpid())
        idle_since = time.monotonic()
        while not stop.is_set():
            job = store.claim(device)
            if job is None:
                if device in store.has_work():
                    idle_since = time.monotonic()  # a queued job waits for its burst to end: not idle
                elif time.monotonic() - idle_since >= idle:
                    break
                stop.wait(0.5)
                continue
            run_job(job, store=store, versions=versions, families=families, settings=settings, stop=stop)
            ran += 1
            idle_since = time.monotonic()
    finally:
        lock.release()
        store.close()
        log.info("trainer for %s exits after %d job(s)", device, ran)
    return ran


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of `python -m serving.training.process`: settings JSON on stdin, device and families in argv."""
    parser = argparse.ArgumentParser(description="run training jobs of one device (started by the server)")
    parser.add_argument("--device", required=True)
    parser.add_argument("--families", required=True, help="module:attribute of the family registry")
    parser.add_argument("--idle-s", type=float, default=None)
    args = parser.parse_args(argv)
    settings = settings_from_json(sys.stdin.read())
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        stream=sys.stderr,
        format="[%(asctime)s] [%(levelname)s] [trainer %(process)d] [%(name)s] %(message)s",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    families = load_families(args.families)
    serve(settings, families, args.device, stop=stop, idle_s=args.idle_s)
    return 0


def spawn_trainer(settings: Settings, families_ref: str, device: str, idle_s: float | None = None) -> Any:
    """Start `python -m serving.training.process` as a fresh interpreter (never a fork); return its Popen."""
    import serving

    root = Path(serving.__file__).resolve().parent.parent  # where `serving` and the families import from
    argv = [sys.executable, "-m", "serving.training.process", "--device", device, "--families", families_ref]
    if idle_s is not None:
        argv += ["--idle-s", str(idle_s)]
    proc = subprocess.Popen(argv, cwd=str(root), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(settings_to_json(settings).encode())
    proc.stdin.close()
    log.info("started the %s trainer (pid %d)", device, proc.pid)
    return proc


class TrainerSupervisor:
    """In each worker: start a trainer for every device with waiting jobs and no live trainer."""

    def __init__(
        self,
        settings: Settings,
        families_ref: str,
        store: TrainingStore | None = None,
        poll_s: float = 5.0,
        spawn: Callable[..., Any] = spawn_trainer,
    ) -> None:
        """Remember how to start trainers; the watcher thread starts on the first kick()."""
        self.settings = settings
        self.families_ref = families_ref
        self.store = store or TrainingStore.for_settings(settings)
        self.poll_s = poll_s
        self._spawn = spawn
        self._procs: dict[str, Any] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> None:
        """Look for work now (after a request), off the caller's thread."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="trainer-supervisor", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.ensure()
            except Exception:
                log.exception("trainer supervisor check failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def ensure(self) -> list[str]:
        """Start a trainer for each device with queued or orphaned jobs and no trainer; return those devices."""
        started = []
        for device in self.store.has_work():
            proc = self._procs.get(device)
            if proc is not None and proc.poll() is None:
                continue
            if FileLock(lock_path(self.settings, device)).held_elsewhere():
                continue
            self._procs[device] = self._spawn(self.settings, self.families_ref, device)
            started.append(device)
        return started

    def close(self, timeout: float = 10.0) -> None:
        """Stop watching; ask our trainers to stop (their jobs go back to queued) and wait up to `timeout` s."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for device, proc in self._procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("the %s trainer (pid %d) did not stop in %.0f s", device, proc.pid, timeout)


if __name__ == "__main__":  # pragma: no cover - the trainer process
    sys.exit(main())
