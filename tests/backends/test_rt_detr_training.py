"""Fine-tuning a real-time DETR through the training job path: a new class head for the config's labels.

A tiny random D-FINE (COCO-like class names) is trained on exported tasks with a red Car and a blue Tree
box (tests/backends/test_training_vision.py's synthetic tasks); the version it makes is a save_pretrained
folder whose id2label are the config's labels, served by the rt_detr family under the trained version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.rt_detr import RtDetrBackend
from serving.contract import Backend, ModelSpec
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from serving.util.files import write_json_atomic
from tests.backends._rt_detr_support import save_detr
from tests.backends.test_training_vision import COLORS, box_tasks

pytestmark = pytest.mark.slow

FAMILIES: dict[str, type[Backend]] = {"rt_detr": RtDetrBackend}


@pytest.fixture(autouse=True)
def _flush_denormals() -> Any:
    """Random weights produce denormal floats that make CPU runs crawl."""
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


def config(folder: Path) -> str:
    return f"""<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" model_path="{folder}">
    <Label value="Car"/><Label value="Tree"/>
  </RectangleLabels>
</View>"""


def test_cpu_training_needs_to_be_allowed(tmp_path: Path) -> None:
    folder = save_detr(tmp_path / "dfine", "d_fine")
    spec = ModelSpec("rt_detr", "d_fine", str(folder))
    reason = RtDetrBackend.trainable(spec, Settings(device="cpu"))
    assert reason is not None and "TRAIN_ALLOW_CPU=true" in reason
    assert RtDetrBackend.trainable(spec, Settings(device="cpu", train_allow_cpu=True)) is None
    missing = RtDetrBackend.trainable(ModelSpec("rt_detr", "dfine_s"), Settings(train_allow_cpu=True))
    assert missing is not None and "weights download --model dfine_s" in missing


def test_tiny_dfine_learns_new_labels_through_the_job_path(tmp_path: Path) -> None:
    folder = save_detr(tmp_path / "dfine", "d_fine", classes=("person", "bicycle", "car", "dog"))
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"),
        device="cpu",
        train_allow_cpu=True,
        train_epochs=6,
        train_min_examples=4,
        train_learning_rate=1e-3,
    )
    spec = ModelSpec("rt_detr", "d_fine", str(folder))
    xml = config(folder)
    store = TrainingStore.for_settings(cfg)
    job_id, _ = store.request("5", spec, "cpu", xml, {"kind": "inline"}, "START_TRAINING")
    write_json_atomic(store.job_dir(job_id) / "data.json", box_tasks(6))
    job = store.claim("cpu")
    assert job is not None
    job = run_job(job, store=store, versions=VersionStore.for_settings(cfg), families=FAMILIES, settings=cfg)
    assert job.state == "done", job.error
    losses = [h["loss"] for h in job.progress["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert job.metrics["on"] == "train" and set(job.metrics["per_label"]) == {"Car", "Tree"}
    # the version is a checkpoint folder with the config's labels as its classes (a new head)
    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    (trained,) = service.trained_models("5").values()
    saved = json.loads((Path(trained.path) / "config.json").read_text())
    assert saved["id2label"] == {"0": "Car", "1": "Tree"} and saved["model_type"] == "d_fine"
    backend = RtDetrBackend(trained, cfg)
    backend.load("cpu")
    assert backend.labels() == ["Car", "Tree"] and backend.input_size == (64, 64)
    tasks = [{"id": 1, "data": {"image": box_tasks(1, seed=99)[0]["data"]["image"]}}]
    (prediction,) = service.predict(tasks, label_config=xml, project="5.1")
    assert "result" in prediction and prediction["model_version"] == job.model_version
    assert all(r["value"]["rectanglelabels"][0] in COLORS for r in prediction["result"])
