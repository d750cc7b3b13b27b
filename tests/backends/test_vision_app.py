"""The vision families through the app: POST /setup and /predict with the pre-annotation guide's configs.

Models are planted (known boxes, masks, keypoints, logits) so regions actually appear; the
predictions must be valid for the config (label_studio_sdk's LabelInterface) and survive the
server's own validation untouched.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flask import Flask
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from backends.keypoints import KeypointsBackend
from backends.segmentation import InstanceSegmentationBackend, SemanticSegmentationBackend
from serving.contract import Backend, ModelSpec
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.backends._vision_support import (
    PlantedClassifier,
    PlantedDetector,
    Transform,
    coco_categories,
    ellipse_mask,
    imagenet_categories,
)
from tests.support.fakes import FakeResolver

COCO = coco_categories()
IMAGENET = imagenet_categories()

GUIDE_BBOX_AND_CHOICES = """<View>
  <Choices name="choice" toName="image" showInLine="true">
    <Choice value="Boeing" background="blue"/>
    <Choice value="Airbus" background="green" />
  </Choices>
  <RectangleLabels name="label" toName="image">
    <Label value="Airplane" background="green"/>
    <Label value="Car" background="blue"/>
  </RectangleLabels>
  <Image name="image" value="$image"/>
</View>"""

GUIDE_UNLABELED_REGIONS = """<View>
  <Image name="image" value="$image" zoom="true" zoomControl="true" rotateControl="false"/>
  <Rectangle name="rect" toName="image" showInline="false"/>
  <Polygon name="polygon" toName="image"/>
  <Ellipse name="ellipse" toName="image"/>
  <KeyPoint name="kp" toName="image"/>
  <Labels name="labels" toName="image" fillOpacity="0.5" strokeWidth="5">
    <Label value="Vehicle" background="green"/>
    <Label value="Building" background="blue"/>
    <Label value="Pavement" background="red"/>
  </Labels>
</View>"""


def planted_boxes(h: int, w: int) -> dict[str, torch.Tensor]:
    """An airplane and a car (input pixels, relative to the input size), plus masks and keypoints."""
    mask = torch.from_numpy(ellipse_mask(h, w, 0.5 * w, 0.5 * h, 0.25 * w, 0.2 * h, 20.0)).float()
    j = torch.arange(17, dtype=torch.float32)
    kp = torch.stack([(0.1 + 0.04 * j) * w, (0.2 + 0.03 * j) * h, torch.ones(17)], dim=1)
    return {
        "boxes": torch.tensor([[0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h], [0.6 * w, 0.6 * h, 0.9 * w, 0.9 * h]]),
        "scores": torch.tensor([0.92, 0.81]),
        "labels": torch.tensor([COCO.index("airplane"), COCO.index("car")]),
        "masks": torch.stack([mask, mask.flip(1)])[:, None],
        "keypoints": torch.stack([kp, kp]),
        "keypoints_scores": torch.full((2, 17), 3.0),
    }


def _planted(base: type[Backend]) -> type[Backend]:
    """Return a subclass of a real family whose load() plants a model instead of reading weights."""

    class Planted(base):  # type: ignore[valid-type,misc]
        @classmethod
        def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
            return None

        def load(self, device: str) -> None:
            self.device = device
            if isinstance(self, ClassificationBackend):
                logits = torch.zeros(1000)
                logits[IMAGENET.index("airliner")] = 12.0
                self.model: Any = PlantedClassifier(logits)
                self.categories = IMAGENET
                return
            self.model = PlantedDetector(planted_boxes)
            self.categories = ["__background__", "person"] if isinstance(self, KeypointsBackend) else COCO

    Planted.__name__ = f"Planted{base.__name__}"
    return Planted


_REAL: list[type[Backend]] = [
    InstanceSegmentationBackend,
    KeypointsBackend,
    DetectionBackend,
    ClassificationBackend,
]
PLANTED: dict[str, type[Backend]] = {
    cls.family: _planted(cls) for cls in sorted(_REAL, key=lambda c: (c.priority, c.family))
}


def app_with(tmp_path: Path, families: Mapping[str, type[Backend]], real_resolver: bool = False) -> Flask:
    """Return an app over the given families (blank images sized by the URL, or the real data resolver)."""
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0, load_wait_s=60.0)
    runtime = Runtime(cfg, families=families, resolver=None if real_resolver else FakeResolver())
    return create_app(cfg, runtime=runtime)


def predict(app: Flask, config: str, images: list[str]) -> list[dict[str, Any]]:
    """POST /predict and return the per-task predictions."""
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(images)]
    resp = app.test_client().post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert len(results) == len(tasks)
    return results


def sdk_errors(config: str, prediction: dict[str, Any]) -> list[str]:
    """Validate with label_studio_sdk (it cannot read image-linked `labels` items, so those are skipped)."""
    interface = LabelInterface(config)
    result = [r for r in prediction["result"] if r["type"] != "labels"]
    return interface.validate_prediction({"result": result, "score": prediction["score"]}, return_errors=True)


def test_guide_bbox_and_choices_config(tmp_path: Path) -> None:
    """Guide config 1: labeled rectangles in percent; Boeing/Airbus only once predicted_values map them."""
    app = app_with(tmp_path, PLANTED)
    (pred,) = predict(app, GUIDE_BBOX_AND_CHOICES, ["http://x/600x400.jpg"])
    assert sdk_errors(GUIDE_BBOX_AND_CHOICES, pred) == []
    rects = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
    assert sorted(r["value"]["rectanglelabels"][0] for r in rects) == ["Airplane", "Car"]
    plane = next(r for r in rects if r["value"]["rectanglelabels"] == ["Airplane"])
    assert (plane["original_width"], plane["original_height"]) == (600, 400)
    assert [plane["value"][k] for k in ("x", "y", "width", "height")] == pytest.approx([10, 20, 40, 40])
    assert not [r for r in pred["result"] if r["type"] == "choices"]  # ImageNet has no Boeing / Airbus
    assert pred["score"] == pytest.approx((0.92 + 0.81) / 2, rel=1e-5)

    mapped = GUIDE_BBOX_AND_CHOICES.replace('value="Boeing"', 'value="Boeing" predicted_values="airliner"')
    (pred,) = predict(app, mapped, ["http://x/600x400.jpg"])
    assert sdk_errors(mapped, pred) == []
    (choice,) = [r for r in pred["result"] if r["type"] == "choices"]
    assert choice["value"] == {"choices": ["Boeing"]} and choice["score"] > 0.9
    # Plain airplane / car choices need no mapping at all.
    plain = (
        mapped.replace("Boeing", "Airplane")
        .replace("Airbus", "Car")
        .replace(' predicted_values="airliner"', "")
    )
    (pred,) = predict(app, plain, ["http://x/600x400.jpg"])
    assert [r["value"] for r in pred["result"] if r["type"] == "choices"] == [{"choices": ["Airplane"]}]


def test_guide_unlabeled_regions_config(tmp_path: Path) -> None:
    """Guide config 2: rectangle, polygon, ellipse and keypoint regions, all valid and unlabeled."""
    app = app_with(tmp_path, PLANTED)
    preds = predict(app, GUIDE_UNLABELED_REGIONS, ["http://x/a/800x450.jpg", "http://x/b/320x240.jpg"])
    for pred, size in zip(preds, [(800, 450), (320, 240)], strict=True):
        assert sdk_errors(GUIDE_UNLABELED_REGIONS, pred) == []
        types = [r["type"] for r in pred["result"]]
        assert types.count("rectangle") == 2
        assert types.count("polygon") == 2
        assert types.count("ellipse") == 2
        assert types.count("keypoint") == 2 * 17
        assert "labels" not in types  # Vehicle / Building / Pavement map to no model label
        assert {(r["original_width"], r["original_height"]) for r in pred["result"]} == {size}
        assert len({r["id"] for r in pred["result"]}) == len(pred["result"])
        ellipse = next(r for r in pred["result"] if r["type"] == "ellipse")
        assert ellipse["value"]["x"] == pytest.approx(50.0, abs=0.5)
        assert ellipse["value"]["radiusX"] == pytest.approx(25.0, rel=0.05)


def test_brush_and_semantic_routing_through_the_app(tmp_path: Path) -> None:
    """BrushLabels without model_name -> Mask R-CNN masks; model_skip leaves a tag out."""
    app = app_with(tmp_path, PLANTED)
    config = """<View><Image name="image" value="$image"/>
      <BrushLabels name="brush" toName="image"><Label value="Airplane"/><Label value="Car"/></BrushLabels>
      <RectangleLabels name="skipme" toName="image" model_skip="true"><Label value="Car"/></RectangleLabels>
    </View>"""
    (pred,) = predict(app, config, ["http://x/64x48.png"])
    assert sdk_errors(config, pred) == []
    assert sorted(r["value"]["brushlabels"][0] for r in pred["result"]) == ["Airplane", "Car"]
    assert all(r["type"] == "brushlabels" and r["from_name"] == "brush" for r in pred["result"])


def test_exif_rotated_image_uses_the_displayed_size(tmp_path: Path) -> None:
    """A JPEG with EXIF orientation 6 is predicted on as Label Studio shows it (rotated: 120x160)."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (160, 120), (200, 30, 30)).save(buf, format="JPEG", exif=exif)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    families = {"detection": PLANTED["detection"]}
    app = app_with(tmp_path, families, real_resolver=True)
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="Car"/></RectangleLabels></View>'
    (pred,) = predict(app, config, [url])
    (rect,) = pred["result"]
    assert (rect["original_width"], rect["original_height"]) == (120, 160)
    assert [rect["value"][k] for k in ("x", "y", "width", "height")] == pytest.approx([60, 60, 30, 30])


def big_photo() -> Image.Image:
    """Return a 1600x1200 stored photo-like image (gradients, so JPEG scaling has detail to keep)."""
    yy, xx = np.mgrid[:1200, :1600]
    rgb = np.stack([xx * 255 // 1600, yy * 255 // 1200, (xx + yy) * 127 // 2800], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_a_big_jpeg_decoded_at_reduced_scale_gives_the_regions_of_the_full_image(tmp_path: Path) -> None:
    """A 1600x1200 EXIF-rotated JPEG for a ~130-pixel model decodes at 1/8 and answers like its PNG."""

    class SmallInput(PLANTED["instance_segmentation"]):  # type: ignore[valid-type,misc]
        def load(self, device: str) -> None:
            super().load(device)
            self.model.transform = Transform(min_size=100, max_size=200)

    stored = big_photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 1200x1600
    jpeg, png = io.BytesIO(), io.BytesIO()
    stored.save(jpeg, format="JPEG", exif=exif, quality=90)
    stored.transpose(Image.Transpose.ROTATE_270).save(png, format="PNG")  # the same picture, as shown
    urls = [
        "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(),
        "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
    ]
    app = app_with(tmp_path, {"instance_segmentation": SmallInput}, real_resolver=True)
    config = (
        '<View><Image name="image" value="$image"/><BrushLabels name="b" toName="image">'
        '<Label value="Car"/><Label value="Airplane"/></BrushLabels></View>'
    )
    from_jpeg, from_png = predict(app, config, urls)
    assert len(from_jpeg["result"]) == 2
    for a, b in zip(from_jpeg["result"], from_png["result"], strict=True):
        assert (
            (a["original_width"], a["original_height"])
            == (b["original_width"], b["original_height"])
            == (
                1200,
                1600,
            )
        )
        assert a["value"] == b["value"]  # the same RLE at the original resolution
        assert a["score"] == b["score"]


def test_setup_reports_missing_weights_with_the_fix(isolated_env: Path, tmp_path: Path) -> None:
    """Real families, empty TORCH_HOME: /setup answers 4xx naming the file and the download command."""
    families = {
        cls.family: cls
        for cls in (
            InstanceSegmentationBackend,
            KeypointsBackend,
            SemanticSegmentationBackend,
            DetectionBackend,
        )
    }
    app = app_with(tmp_path, families)
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="Car"/></RectangleLabels></View>'
    resp = app.test_client().post("/setup", json={"project": "1.1", "schema": config})
    assert 400 <= resp.status_code < 500
    message = resp.get_json()["message"]
    assert "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth" in message
    assert "python -m serving weights download --model fasterrcnn_resnet50_fpn_v2" in message
    health = app.test_client().get("/health").get_json()
    assert health["backends"]["detection:fasterrcnn_resnet50_fpn_v2"].startswith(
        "unavailable: weights missing"
    )


def test_batch_of_many_images_keeps_order_and_sizes(tmp_path: Path) -> None:
    """Twelve images of different sizes in one request: one prediction each, in order, own sizes."""
    app = app_with(tmp_path, {"detection": PLANTED["detection"]})
    sizes = [(40 + 8 * i, 30 + 5 * i) for i in range(12)]
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="Car"/></RectangleLabels></View>'
    preds = predict(app, config, [f"http://x/{w}x{h}.png" for w, h in sizes])
    for pred, size in zip(preds, sizes, strict=True):
        (rect,) = pred["result"]
        assert (rect["original_width"], rect["original_height"]) == size
        assert np.isclose(rect["value"]["x"], 60.0)
