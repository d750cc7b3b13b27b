"""Ultralytics YOLO checkpoints (detect, obb, segment, pose, classify): built from the YAMLs, planted answers.

The checkpoints are the real YOLO11n architectures with random weights (tests/backends/_yolo_support.py),
loaded by the family's own code; the real predictor runs and its Results are replaced by known ones, so
rectangles, rotated rectangles, polygons, brush masks, keypoints and choices come back exact and valid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from label_studio_sdk.label_interface import LabelInterface

pytest.importorskip("ultralytics")

from backends import yolo
from serving.contract import Backend, ControlTag, ObjectTag
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results import regions
from serving.results.rle import rle_to_mask
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._yolo_support import Plant, planted_family, save_yolo
from tests.support.fakes import FakeResolver


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per task, named like a user's training output."""
    root = tmp_path_factory.mktemp("yolo")
    return {task: save_yolo(root / task / "best.pt", task) for task in yolo.TASK_TAGS}


def app_for(tmp_path: Path, family: type[Backend], **settings: Any) -> Flask:
    """Return an app over one planted yolo family (blank images sized by the URL)."""
    knobs: dict[str, Any] = {"max_wait_ms": 2.0, "load_wait_s": 60.0, **settings}
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), **knobs)
    return create_app(cfg, runtime=Runtime(cfg, families={"yolo": family}, resolver=FakeResolver()))


def predict(app: Flask, config: str, images: list[str]) -> list[dict[str, Any]]:
    """POST /setup then /predict; return the per-task predictions (each checked valid for the config)."""
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(images)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    assert len(results) == len(tasks)
    for prediction in results:
        sdk_result = [r for r in prediction["result"] if r["type"] != "labels"]
        errors = LabelInterface(config).validate_prediction(
            {"result": sdk_result, "score": prediction["score"]}, return_errors=True
        )
        assert errors == []
        kept, problems = filter_valid(
            ConfigSchema.from_config(config), prediction["result"], {"image": "x"}, 0
        )
        assert problems == [] and len(kept) == len(prediction["result"])
        assert prediction["model_version"]
    return results


def config(tag: str, path: Path, labels: str, extra: str = "") -> str:
    """Return a one-tag config on an image whose tag loads a checkpoint by model_path."""
    return (
        f'<View><Image name="image" value="$image"/><{tag} name="t" toName="image" model_path="{path}"{extra}>'
        f"{labels}</{tag}></View>"
    )


LABELS = '<Label value="Car"/><Label value="People"/>'


def test_detect_boxes_map_names_and_leave_unwanted_classes_out_of_nms(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    family = planted_family(
        [
            Plant(0, 0.9, (0.1, 0.2, 0.5, 0.6)),
            Plant(1, 0.6, (0.5, 0.5, 1.0, 1.0)),
            Plant(0, 0.2, (0, 0, 0.1, 0.1)),
        ]
    )
    cfg = config("RectangleLabels", checkpoints["detect"], LABELS)
    # 1280 x 640 shrinks to 64 x 32 (imgsz 64): boxes come back in the original's percent
    preds = predict(app_for(tmp_path, family), cfg, ["http://x/1280x640.png", "http://x/200x100.png"])
    for pred in preds:
        found = [
            (
                r["value"]["rectanglelabels"][0],
                *(round(r["value"][k], 6) for k in ("x", "y", "width", "height")),
                round(r["score"], 6),
            )
            for r in pred["result"]
        ]
        assert [f[0] for f in found] == ["Car", "People"]  # the planted 0.2 car is under the 0.25 default
        assert found[0][1:] == pytest.approx((10.0, 20.0, 40.0, 40.0, 0.9), abs=1e-4)
        assert found[1][1:] == pytest.approx((50.0, 50.0, 50.0, 50.0, 0.6), abs=1e-4)
    assert all(c["classes"] == [0, 1] for c in family.calls)  # no dog in the config: not in NMS
    assert (32, 64, 3) in [s for c in family.calls for s in c["shapes"]]


def test_obb_rotated_boxes_round_trip_corners(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    angle = math.radians(30.0)
    family = planted_family([Plant(0, 0.8, (0.5, 0.5, 0.3, 0.2), angle)])
    cfg = config("RectangleLabels", checkpoints["obb"], LABELS)
    (pred,) = predict(app_for(tmp_path, family), cfg, ["http://x/200x100.png"])
    (region,) = pred["result"]
    v = region["value"]
    assert v["rotation"] == pytest.approx(30.0, abs=1e-5)  # planted in float32
    # pixels -> Label Studio -> pixels: the corners Label Studio draws are the box's own
    expected = regions.rotated_box_corners_px(100.0, 50.0, 60.0, 20.0, angle)
    drawn = regions.rect_corners_px(v["x"], v["y"], v["width"], v["height"], v["rotation"], (200, 100))
    for (ex, ey), (dx, dy) in zip(expected, drawn, strict=True):
        assert abs(ex - dx) < 0.01 and abs(ey - dy) < 0.01


def test_rotated_box_crossing_the_border_is_shrunk_inside_about_its_centre() -> None:
    size = (200, 100)
    fitted = regions.fit_rotated_box(20.0, 50.0, 80.0, 20.0, math.radians(10.0), size)
    assert fitted is not None
    corners = regions.rotated_box_corners_px(20.0, 50.0, *fitted, math.radians(10.0))
    assert min(c[0] for c in corners) == pytest.approx(0.0, abs=1e-9)
    assert fitted[0] / fitted[1] == pytest.approx(4.0)
    assert regions.fit_rotated_box(-5.0, 50.0, 10.0, 10.0, 0.0, size) is None


@pytest.mark.parametrize("tag", ["PolygonLabels", "BrushLabels"])
def test_segment_masks_as_polygons_and_brush(tag: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    family = planted_family([Plant(0, 0.7, (0.25, 0.25, 0.75, 0.5))])
    cfg = config(tag, checkpoints["segment"], LABELS)
    (pred,) = predict(app_for(tmp_path, family), cfg, ["http://x/64x64.png"])
    (region,) = pred["result"]
    assert region["value"][tag.lower()] == ["Car"]
    if tag == "BrushLabels":
        mask = rle_to_mask(region["value"]["rle"], 64, 64)
        expected = np.zeros((64, 64), dtype=bool)
        expected[16:32, 16:48] = True
        assert np.array_equal(mask > 0, expected)
    else:
        points = np.array(region["value"]["points"])  # the mask's outline: pixel centres of its border
        assert points[:, 0].min() == pytest.approx(16 / 64 * 100) and points[:, 0].max() == pytest.approx(
            47 / 64 * 100
        )
        assert points[:, 1].min() == pytest.approx(16 / 64 * 100) and points[:, 1].max() == pytest.approx(
            31 / 64 * 100
        )


def test_pose_keypoints_by_coco_names(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    points = tuple((0.1 + 0.05 * j, 0.2 + 0.01 * j) for j in range(17))
    family = planted_family([Plant(1, 0.9, (0.1, 0.1, 0.9, 0.9), keypoints=points)])
    labels = '<Label value="nose"/><Label value="Left Eye"/>'
    cfg = config("KeyPointLabels", checkpoints["pose"], labels)
    (pred,) = predict(app_for(tmp_path, family), cfg, ["http://x/200x100.png"])
    found = {r["value"]["keypointlabels"][0]: (r["value"]["x"], r["value"]["y"]) for r in pred["result"]}
    assert found == {"nose": pytest.approx((10.0, 20.0)), "Left Eye": pytest.approx((15.0, 21.0))}
    (prefix,) = {r["id"].split("-")[0] for r in pred["result"]}
    assert prefix


def test_classify_choices(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    family = planted_family([], probs=[0.1, 0.2, 0.7])
    labels = '<Choice value="Car"/><Choice value="Dog"/>'
    cfg = (
        '<View><Image name="image" value="$image"/>'
        f'<Choices name="t" toName="image" model_path="{checkpoints["classify"]}">{labels}</Choices></View>'
    )
    (pred,) = predict(app_for(tmp_path, family), cfg, ["http://x/64x64.png"])
    (region,) = pred["result"]
    assert region["value"]["choices"] == ["Dog"] and region["score"] == pytest.approx(0.7, abs=1e-6)


def claim(settings: Settings, tag: str, **attrs: str) -> list[str]:
    control = ControlTag("t", tag, "image", ("Car",), dict(attrs))
    return [
        c.model_name
        for c in yolo.YoloBackend.claim(ObjectTag("image", "Image", "image"), [control], settings)
    ]


def test_claims_by_checkpoint_task_and_name(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path))
    assert yolo.sniff_task(checkpoints["segment"]) == "segment"
    assert yolo.sniff_task(checkpoints["obb"]) == "obb"
    assert claim(settings, "RectangleLabels", model_path=str(checkpoints["detect"])) == ["best"]
    assert (
        claim(settings, "PolygonLabels", model_path=str(checkpoints["detect"])) == []
    )  # a detector has no masks
    assert claim(settings, "BrushLabels", model_path=str(checkpoints["segment"])) == ["best"]
    assert claim(settings, "KeyPointLabels", model_path=str(checkpoints["pose"])) == ["best"]
    assert claim(settings, "Choices", model_path=str(checkpoints["classify"])) == ["best"]
    assert claim(settings, "RectangleLabels", model_name="yolo11n") == ["yolo11n"]
    assert claim(settings, "PolygonLabels", model_name="yolov8s-seg") == ["yolov8s-seg"]
    assert claim(settings, "RectangleLabels", model_name="yolov8s-seg") == ["yolov8s-seg"]
    assert claim(settings, "Choices", model_name="yolo11n") == []
    assert claim(settings, "RectangleLabels", model_name="fasterrcnn_resnet50_fpn_v2") == []
    assert claim(settings, "RectangleLabels") == []
    assert claim(Settings(model_dir=str(tmp_path), detector="yolo11n"), "RectangleLabels") == ["yolo11n"]
    # a torchvision state_dict is a zip of tensors without Ultralytics classes: not ours
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "ships.pt")
    assert yolo.sniff_task(tmp_path / "ships.pt") == ""
    assert claim(settings, "RectangleLabels", model_path=str(tmp_path / "ships.pt")) == []


def test_missing_checkpoint_answers_setup_with_the_download_command(tmp_path: Path) -> None:
    app = app_for(tmp_path, yolo.YoloBackend)
    cfg = '<View><Image name="image" value="$image"/><RectangleLabels name="t" toName="image" model_name="yolo11n"><Label value="Car"/></RectangleLabels></View>'
    resp = app.test_client().post("/setup", json={"project": "1.1", "schema": cfg})
    assert resp.status_code == 422
    assert "python -m serving weights download --model yolo11n" in str(resp.get_json())


def test_planning_never_imports_ultralytics(checkpoints: dict[str, Path]) -> None:
    import subprocess
    import sys

    code = (
        "import sys; import backends; from backends import yolo; from pathlib import Path; "
        f"assert yolo.sniff_task(Path({str(checkpoints['pose'])!r})) == 'pose'; backends.registry(); "
        "assert 'ultralytics' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
