"""Real-time DETRs (RT-DETRv2, D-FINE, DEIMv2, RF-DETR): tiny random checkpoints, planted answers, exact boxes.

Each tiny checkpoint is saved with save_pretrained and loaded by the family's own code; the real model
runs and its logits and boxes are then replaced (tests/backends/_rt_detr_support.py), so the config's
labels must come back as exact rectangles, valid for the config, through /setup and /predict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from label_studio_sdk.label_interface import LabelInterface

from backends import rt_detr
from backends.detection import DetectionBackend
from serving.contract import Backend, ControlTag, ObjectTag
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._rt_detr_support import KINDS, Plant, planted_family, save_detr
from tests.support.fakes import FakeResolver

# cx, cy, w, h relative to the input: on a 200 x 100 image car is (40, 20)-(80, 60) px = x 20 y 20 w 20 h 40 %
PLANTS = [
    Plant(0, "car", 2.0, (0.3, 0.4, 0.2, 0.4)),
    Plant(1, "dog", 4.0, (0.5, 0.5, 0.2, 0.2)),  # the best score, but no config below has dogs
    Plant(2, "person", -1.0, (0.75, 0.5, 0.1, 0.6)),  # 0.269: under the default threshold 0.5
    Plant(3, "car", 1.0, (0.1, 0.1, 0.1, 0.1)),  # 0.731: a second car
]
CAR, PERSON, CAR2 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-1.0))


@pytest.fixture(autouse=True)
def _flush_denormals() -> Any:
    """Random weights produce denormal floats that make CPU runs crawl."""
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per architecture."""
    root = tmp_path_factory.mktemp("rt_detr")
    return {kind: save_detr(root / kind, kind, side=56 if kind == "rf_detr" else 64) for kind in KINDS}


def families(plants: list[Plant] = PLANTS) -> dict[str, type[Backend]]:
    """The planted real-time DETR family beside the real torchvision detection family."""
    return {"rt_detr": planted_family(plants), "detection": DetectionBackend}


def app_for(tmp_path: Path, plants: list[Plant] = PLANTS, **settings: Any) -> tuple[Flask, Runtime]:
    """Return an app over the planted families (blank images sized by the URL)."""
    knobs: dict[str, Any] = {"max_wait_ms": 2.0, "load_wait_s": 60.0, **settings}
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), **knobs)
    runtime = Runtime(cfg, families=families(plants), resolver=FakeResolver())
    return create_app(cfg, runtime=runtime), runtime


LABELS = '<Label value="Car"/><Label value="People"/>'


def rect_config(folder: Path, labels: str = LABELS, extra: str = "", tag: str = "RectangleLabels") -> str:
    """Return a config whose rectangle tag loads a local checkpoint folder."""
    return (
        '<View><Image name="image" value="$image"/>'
        f'<{tag} name="label" toName="image" model_path="{folder}"{extra}>{labels}</{tag}></View>'
    )


def predict(app: Flask, config: str, images: list[str]) -> list[dict[str, Any]]:
    """POST /setup then /predict; return the per-task predictions."""
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(images)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    assert len(results) == len(tasks)
    return results


def rects(prediction: dict[str, Any]) -> list[tuple[str, float, float, float, float, float]]:
    """Return (label, x, y, width, height, score) of a prediction's rectanglelabels, best first."""
    out = []
    for region in prediction["result"]:
        if region["type"] == "rectanglelabels":
            (label,) = region["value"]["rectanglelabels"]
            v = region["value"]
            out.append((label, v["x"], v["y"], v["width"], v["height"], region["score"]))
    return out


def assert_valid(config: str, prediction: dict[str, Any]) -> None:
    """Check a prediction with the SDK's validator and the server's own (nothing may be dropped)."""
    interface = LabelInterface(config)
    sdk_result = [r for r in prediction["result"] if r["type"] != "labels"]
    assert (
        interface.validate_prediction(
            {"result": sdk_result, "score": prediction["score"]}, return_errors=True
        )
        == []
    )
    kept, problems = filter_valid(ConfigSchema.from_config(config), prediction["result"], {"image": "x"}, 0)
    assert problems == [] and len(kept) == len(prediction["result"])


@pytest.mark.parametrize("kind", KINDS)
def test_planted_boxes_come_back_exact_for_every_architecture(
    kind: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    app, _ = app_for(tmp_path)
    config = rect_config(checkpoints[kind])
    (pred,) = predict(app, config, ["http://x/200x100.png"])
    assert_valid(config, pred)
    found = rects(pred)
    assert [r[0] for r in found] == ["Car", "Car"]  # no dog in the config, the person under 0.5
    assert found[0][1:5] == pytest.approx((20.0, 20.0, 20.0, 40.0), abs=1e-4)
    assert found[0][5] == pytest.approx(CAR, abs=1e-5)
    assert found[1][1:5] == pytest.approx((5.0, 5.0, 10.0, 10.0), abs=1e-4)
    assert pred["model_version"].startswith("rt_detr-")


def test_threshold_alias_and_max_det(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    app, _ = app_for(tmp_path)
    config = rect_config(checkpoints["d_fine"], extra=' model_score_threshold="0.2" max_det="2"')
    (pred,) = predict(app, config, ["http://x/200x100.png"])
    assert_valid(config, pred)
    # "person" reaches "People" through the vision aliases; max_det keeps the two best of three
    assert [(r[0], round(r[5], 4)) for r in rects(pred)] == [("Car", round(CAR, 4)), ("Car", round(CAR2, 4))]
    config = rect_config(checkpoints["d_fine"], extra=' model_score_threshold="0.2"')
    (pred,) = predict(app, config, ["http://x/200x100.png"])
    people = [r for r in rects(pred) if r[0] == "People"]
    assert len(people) == 1 and people[0][5] == pytest.approx(PERSON, abs=1e-5)
    assert people[0][1:5] == pytest.approx((70.0, 20.0, 10.0, 60.0), abs=1e-4)


def test_classes_the_config_lacks_are_dropped_before_the_top_k() -> None:
    logits = torch.full((2, 3, 2), -10.0)
    logits[:, 0, 1] = 5.0  # class 1 (not allowed) is the best everywhere
    logits[0, 1, 0] = 1.0
    logits[1, 2, 0] = 0.0  # 0.5: kept by image 1's floor 0.4 only
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]).repeat(2, 1, 1)
    allowed = torch.tensor([[True, False], [True, False]])
    floors = torch.tensor([0.6, 0.4])
    scale = torch.tensor([[100.0, 50.0, 100.0, 50.0], [10.0, 10.0, 10.0, 10.0]])
    picked, scores, labels, kept = rt_detr.select_detections(logits, boxes, allowed, floors, scale, k=1)
    assert labels.tolist() == [[0], [0]]
    assert kept.tolist() == [[True], [True]]
    assert picked[0, 0].tolist() == pytest.approx([0.0, 0.0, 50.0, 25.0])
    assert picked[1, 0].tolist() == pytest.approx([0.0, 0.0, 10.0, 10.0])
    assert scores[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_one_model_call_per_batch_answers_each_image_in_order(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    app, runtime = app_for(tmp_path, max_batch_size=8, max_wait_ms=50.0)
    config = rect_config(checkpoints["rt_detr_v2"])
    images = ["http://x/200x100.png", "http://x/100x200.png", "http://x/400x400.png"]
    preds = predict(app, config, images)
    sizes = [(p["result"][0]["original_width"], p["result"][0]["original_height"]) for p in preds]
    assert sizes == [(200, 100), (100, 200), (400, 400)]
    # car at (0.2, 0.2)-(0.4, 0.6) of every image whatever its size
    for p in preds:
        assert rects(p)[0][1:5] == pytest.approx((20.0, 20.0, 20.0, 40.0), abs=1e-4)
    (slot,) = [s for s in runtime._slots.values() if s.spec.family == "rt_detr"]
    assert sum(slot.backend.model.calls) == 3 and len(slot.backend.model.calls) <= 2


def test_plain_rectangle_with_labels_and_without(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    app, _ = app_for(tmp_path)
    folder = checkpoints["d_fine"]
    config = (
        '<View><Image name="image" value="$image"/>'
        f'<Rectangle name="box" toName="image" model_path="{folder}"/>'
        '<Labels name="kind" toName="image"><Label value="Car"/></Labels></View>'
    )
    (pred,) = predict(app, config, ["http://x/200x100.png"])
    assert_valid(config, pred)
    labels = [r["value"]["labels"] for r in pred["result"] if r["type"] == "labels"]
    assert labels == [["Car"], ["Car"]]


def claims(settings: Settings, *attrs: tuple[str, str]) -> list[Any]:
    control = ControlTag("label", "RectangleLabels", "image", ("Car",), dict(attrs))
    return rt_detr.RtDetrBackend.claim(ObjectTag("image", "Image", "image"), [control], settings)


def test_claims_by_name_id_folder_detector_and_cached_default(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    settings = Settings(model_dir=str(tmp_path))
    assert [c.model_name for c in claims(settings, ("model_name", "dfine_m"))] == ["dfine_m"]
    assert [c.model_name for c in claims(settings, ("model_name", "PekingU/rtdetr_v2_r50vd"))] == [
        "PekingU/rtdetr_v2_r50vd"
    ]
    assert [c.model_name for c in claims(settings, ("model_name", "someone/my-dfine-ships"))] == [
        "someone/my-dfine-ships"
    ]
    assert claims(settings, ("model_name", "fasterrcnn_resnet50_fpn_v2")) == []
    assert claims(settings, ("model_name", "grounding_dino")) == []
    (claim,) = claims(settings, ("model_path", str(checkpoints["deimv2"])))
    assert claim.model_name == "deimv2" and claim.model_path == str(checkpoints["deimv2"])
    # a tag naming no model: DETECTOR when it names one of ours, else the default only when it is cached
    assert claims(settings) == []
    assert [c.model_name for c in claims(Settings(model_dir=str(tmp_path), detector="rtdetr_v2_r18"))] == [
        "rtdetr_v2_r18"
    ]
    assert claims(Settings(model_dir=str(tmp_path), detector="owlv2")) == []
    (tmp_path / "dfine-large-coco").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "dfine-large-coco" / name).write_bytes((checkpoints["d_fine"] / name).read_bytes())
    assert [c.model_name for c in claims(settings)] == ["dfine_l"]


def test_missing_weights_answer_setup_with_the_download_command(tmp_path: Path) -> None:
    app, _ = app_for(tmp_path)
    config = (
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="label" toName="image" model_name="dfine_s"><Label value="Car"/></RectangleLabels></View>'
    )
    resp = app.test_client().post("/setup", json={"project": "1.1", "schema": config})
    assert resp.status_code == 422
    assert "python -m serving weights download --model dfine_s" in str(resp.get_json())
