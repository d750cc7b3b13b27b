"""`python -m serving train`: the server's training job run from a Label Studio export file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from serving.cli import main as cli
from serving.training.run import Run
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from tests.support.training_fakes import CONFIG, export_tasks, families


def files(tmp_path: Path, tasks: list[Any]) -> tuple[Path, Path]:
    config = tmp_path / "labeling.xml"
    config.write_text(CONFIG)
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    return config, export


def test_train_from_an_export_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, export = files(tmp_path, export_tasks(12))
    model_dir, out = tmp_path / "model_dir", tmp_path / "trained"
    argv = ["train", "--config", str(config), "--input", str(export), "--model-dir", str(model_dir)]
    assert cli.main([*argv, "--project", "42", "--output", str(out)], families=families) == cli.EXIT_OK
    key, version, path = capsys.readouterr().out.strip().split("\t")
    assert key == "memo_ner:memo" and version.startswith("v1-")
    spec = VersionStore(model_dir / "versions").current("42")[key]
    assert spec.path == path and spec.trained == version
    assert json.loads((out / "memo.json").read_text())["table"]["Zolvarex"] == "Drug"
    (job,) = TrainingStore(model_dir / "training").jobs()
    assert job.state == "done" and job.source == {"kind": "file", "path": str(export)}
    assert job.events == {"CLI": 1} and job.snapshot is not None and job.snapshot["examples"] == 12


def test_too_few_examples_and_bad_arguments(tmp_path: Path) -> None:
    config, export = files(tmp_path, export_tasks(3))
    argv = ["train", "--config", str(config), "--input", str(export), "--model-dir", str(tmp_path / "m")]
    assert cli.main(argv, families=families) == cli.EXIT_FAILED  # 3 < TRAIN_MIN_EXAMPLES (10)
    assert cli.main([*argv, "--project", "../x"], families=families) == cli.EXIT_USAGE
    assert cli.main([*argv, "--model", "nope"], families=families) == cli.EXIT_USAGE
    assert (
        cli.main(
            ["train", "--config", str(config), "--input", str(tmp_path / "none.json")], families=families
        )
        == 2
    )


def test_an_interrupted_run_resumes_from_its_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, export = files(tmp_path, export_tasks(12))
    argv = ["train", "--config", str(config), "--input", str(export), "--model-dir", str(tmp_path / "m")]
    original = Run.save_checkpoint

    def interrupted(self: Run, epoch: int, write: Any) -> None:
        original(self, epoch, write)
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C right after epoch 2's checkpoint

    monkeypatch.setattr(Run, "save_checkpoint", interrupted)
    assert cli.main(argv, families=families) == cli.EXIT_INTERRUPTED
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert cli.main(argv, families=families) == cli.EXIT_OK
    (job,) = TrainingStore(tmp_path / "m" / "training").jobs()
    assert job.state == "done" and job.attempts == 2
    spec = VersionStore(tmp_path / "m" / "versions").current("cli")["memo_ner:memo"]
    assert [epoch for epoch, _ in json.loads(Path(spec.path).read_text())["ran"]] == [1, 2, 3]


def test_a_server_trainer_on_the_same_model_dir_never_takes_the_cli_job_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's trainer (idle, holding the device lock) must not claim the job before its data is written."""
    import threading

    import serving.util.files as util_files
    from serving.settings import Settings
    from serving.training.process import serve

    config, export = files(tmp_path, export_tasks(12))
    model_dir = tmp_path / "m"
    stop = threading.Event()
    server_trainer = threading.Thread(
        target=serve,
        args=(Settings(model_dir=str(model_dir)), families(), "cpu"),
        kwargs={"stop": stop, "idle_s": 2.0},
    )
    server_trainer.start()
    lock = model_dir / "training" / "trainer-cpu.lock"
    while not lock.exists():  # the server's trainer holds the device lock, polling for jobs
        assert server_trainer.is_alive()
    written = util_files.write_json_atomic

    def slow_write(path: Path, value: Any) -> None:
        time.sleep(1.5)  # a large export takes a while to write
        written(path, value)

    monkeypatch.setattr(util_files, "write_json_atomic", slow_write)
    argv = ["train", "--config", str(config), "--input", str(export), "--model-dir", str(model_dir)]
    try:
        assert cli.main([*argv, "--device", "cpu"], families=families) == cli.EXIT_OK
    finally:
        stop.set()
        server_trainer.join(10)
    (job,) = TrainingStore(model_dir / "training").jobs()
    assert job.state == "done" and job.error is None and job.snapshot is not None
    assert job.snapshot["examples"] == 12
