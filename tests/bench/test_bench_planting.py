"""The detection benchmark's planted head gives post-processing a realistic, fixed number of regions."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from PIL import Image

from backends.detection import DetectionBackend
from bench.bench_vision import PLANTED_THRESHOLD, config_for, fill_random_weights, make_jpegs
from model import create_app
from serving.contract import Item, ModelSpec, ObjectTag
from serving.settings import Settings

MODEL = "ssdlite320_mobilenet_v3_large"


def test_planted_random_detector_gives_max_detections_person_and_car_boxes(isolated_env: Path) -> None:
    """Every image gets exactly MAX_DETECTIONS boxes, all person/car, all above the planted threshold."""
    fill_random_weights(MODEL, isolated_env / "torch_home", plant=True)
    backend = DetectionBackend(
        ModelSpec("detection", MODEL), Settings(model_dir=str(isolated_env), max_detections=7)
    )
    backend.load("cpu")
    obj = ObjectTag("image", "Image", "image")
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in make_jpegs(2, (200, 150))]
    with torch.inference_mode():
        outs = backend.forward([backend.preprocess(Item(task={}, obj=obj, image=im)) for im in images])
    for det in outs:
        assert det.scores.shape[0] == 7
        assert {backend.category(int(k)) for k in det.labels} <= {"person", "car"}
        assert float(det.scores.min()) > PLANTED_THRESHOLD


def test_unplanted_random_detector_finds_nothing(isolated_env: Path) -> None:
    """Without planting, random weights score under the model's floor: why the benchmark plants."""
    fill_random_weights(MODEL, isolated_env / "torch_home")
    backend = DetectionBackend(ModelSpec("detection", MODEL), Settings(model_dir=str(isolated_env)))
    backend.load("cpu")
    image = Image.open(io.BytesIO(make_jpegs(1, (200, 150))[0])).convert("RGB")
    with torch.inference_mode():
        (det,) = backend.forward(
            [backend.preprocess(Item(task={}, obj=ObjectTag("image", "Image", "image"), image=image))]
        )
    assert det.scores.shape[0] == 0


def test_planted_benchmark_config_returns_that_many_valid_regions(isolated_env: Path) -> None:
    """Through /predict, the benchmark's config and MAX_DETECTIONS give N config-valid rectangles per task."""
    fill_random_weights(MODEL, isolated_env / "torch_home", plant=True)
    app = create_app(Settings(model_dir=str(isolated_env / "model_dir"), max_detections=5))
    config = config_for("detection", MODEL, PLANTED_THRESHOLD)
    tasks = [
        {"id": i + 1, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(b).decode()}}
        for i, b in enumerate(make_jpegs(2, (200, 150)))
    ]
    body = app.test_client().post("/predict", json={"tasks": tasks, "label_config": config}).get_json()
    assert [len(p["result"]) for p in body["results"]] == [5, 5]
    labels = {r["value"]["rectanglelabels"][0] for p in body["results"] for r in p["result"]}
    assert labels <= {"Person", "Car"}
