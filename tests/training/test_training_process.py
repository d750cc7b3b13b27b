"""The trainer as a real process (python -m serving.training.process): one per device, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from serving.settings import Settings
from serving.training.process import (
    TrainerSupervisor,
    lock_path,
    settings_from_json,
    settings_to_json,
    spawn_trainer,
)
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from serving.util.locks import FileLock
from tests.support.training_fakes import REF, export_tasks
from tests.training.test_training_jobs import inline_job

pytestmark = pytest.mark.slow


def wait_for(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_settings_travel_to_the_trainer_intact() -> None:
    cfg = Settings(
        model_dir="/m", train_events=("START_TRAINING",), label_studio_api_key="k", extra={"a": "1"}
    )
    assert settings_from_json(settings_to_json(cfg)) == cfg


def test_kill_9_mid_job_then_a_new_trainer_resumes_from_the_last_epoch(tmp_path: Path) -> None:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"), train_epochs=3, train_min_examples=2, extra={"epoch_s": "1.5"}
    )
    store = TrainingStore.for_settings(cfg)
    job_id = inline_job(store, export_tasks(6))
    first = spawn_trainer(cfg, REF, "cpu", idle_s=1.0)
    try:
        wait_for(
            lambda: (store.get(job_id).progress or {}).get("checkpoint_epoch") == 1,
            60,
            "epoch 1's checkpoint",
        )  # type: ignore[union-attr]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    job = store.get(job_id)
    assert job is not None and job.state == "running"  # nobody runs it: an orphan
    assert not FileLock(lock_path(cfg, "cpu")).held_elsewhere()  # the OS dropped the dead trainer's lock
    assert VersionStore.for_settings(cfg).current("7") == {}

    second = spawn_trainer(cfg, REF, "cpu", idle_s=1.0)
    try:
        done = wait_for(
            lambda: (j := store.get(job_id)) is not None and j.state not in ("running", "queued") and j,
            90,
            "the job",
        )
        second.wait(30)
    finally:
        if second.poll() is None:
            second.kill()
    assert done.state == "done", done.error
    assert done.attempts == 2
    spec = VersionStore.for_settings(cfg).current("7")["memo_ner:memo"]
    ran = json.loads(Path(spec.path).read_text())["ran"]
    assert [epoch for epoch, _ in ran] == [1, 2, 3]  # epoch 1 restored from its checkpoint, not rerun
    assert ran[0][1] == first.pid and {pid for _, pid in ran[1:]} == {second.pid}
    assert "resuming at epoch 2" in (store.job_dir(job_id) / "train.log").read_text()


def test_two_trainers_for_one_device_never_run_two_jobs_at_once(tmp_path: Path) -> None:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"), train_epochs=2, train_min_examples=2, extra={"epoch_s": "1.0"}
    )
    store = TrainingStore.for_settings(cfg)
    a = inline_job(store, export_tasks(4), project="1")
    b = inline_job(store, export_tasks(4, people=("Zed",)), project="2")
    procs = [spawn_trainer(cfg, REF, "cpu", idle_s=1.0) for _ in range(2)]
    try:
        wait_for(
            lambda: all((j := store.get(x)) is not None and j.state == "done" for x in (a, b)),
            120,
            "both jobs",
        )
        for proc in procs:
            assert proc.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    ja, jb = store.get(a), store.get(b)
    assert ja is not None and jb is not None
    first, second = sorted((ja, jb), key=lambda j: j.started_at or 0)
    assert (second.started_at or 0) >= (first.finished_at or 0)  # one after the other


def test_the_supervisor_starts_a_trainer_and_restarts_it_after_a_kill(tmp_path: Path) -> None:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"), train_epochs=3, train_min_examples=2, extra={"epoch_s": "1.0"}
    )
    store = TrainingStore.for_settings(cfg)
    job_id = inline_job(store, export_tasks(4))
    spawned: list[Any] = []

    def spawn(*args: Any) -> Any:
        proc = spawn_trainer(*args, idle_s=1.0)
        spawned.append(proc)
        return proc

    supervisor = TrainerSupervisor(cfg, REF, store, poll_s=0.3, spawn=spawn)
    try:
        supervisor.kick()
        wait_for(lambda: (store.get(job_id).progress or {}).get("checkpoint_epoch") == 1, 60, "epoch 1")  # type: ignore[union-attr]
        os.kill(spawned[0].pid, signal.SIGKILL)
        done = wait_for(
            lambda: (j := store.get(job_id)) is not None and j.state == "done" and j, 90, "the job"
        )
    finally:
        supervisor.close(10)
        for proc in spawned:
            if proc.poll() is None:
                proc.kill()
    assert len(spawned) == 2 and done.attempts == 2
