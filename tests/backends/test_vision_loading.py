"""Each vision family loads through the REAL loading code from a temp TORCH_HOME of random weights.

The state_dicts are randomly initialised and saved under the file name torchvision's weight enum
expects, so torchvision's own builder (weights=enum) reads them from the hub cache, as it would
after `python -m serving weights download`. Random weights give arbitrary regions: these tests
check loading, shapes and region types; exact geometry is in test_vision_geometry.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backends import _torchvision as tv
from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from backends.keypoints import KeypointsBackend
from backends.segmentation import InstanceSegmentationBackend, SemanticSegmentationBackend
from serving.contract import ModelSpec
from tests.backends._vision_support import control, image_item, save_random_weights, settings, target


def shrink(backend: Any, min_size: int = 96, max_size: int = 128) -> None:
    """Make the loaded detector work at a small size, so a CPU forward takes well under a second."""
    backend.model.transform.min_size = (min_size,)
    backend.model.transform.max_size = max_size


def loaded(cls: Any, family: str, name: str, tmp_path: Path, path: str = "") -> Any:
    """Return a backend of `cls` after availability() passed and load('cpu') ran.

    Every family's version is the same before and after load (model_version must not flip while a
    model loads) and names a real weights fingerprint.
    """
    spec = ModelSpec(family, name, path)
    s = settings(tmp_path)
    assert cls.availability(spec, s) is None
    backend = cls(spec, s)
    before = backend.version()
    backend.score_floor = 0.0  # random weights score ~1/num_classes: let some boxes through
    backend.detections_per_img = 3
    backend.load("cpu")
    assert backend.device == "cpu"
    assert backend.version() == before == cls.version_of(spec, settings(tmp_path))
    assert "missing" not in before
    return backend


def forward(backend: Any, sizes: list[tuple[int, int]]) -> list[Any]:
    """Preprocess images of the given sizes and run one batch."""
    items = [image_item(w, h, color=(30 * i + 20, 90, 200)) for i, (w, h) in enumerate(sizes)]
    with torch.inference_mode():
        outs = backend.forward([backend.preprocess(it) for it in items])
    assert len(outs) == len(items)
    return list(zip(items, outs, strict=True))


def test_detection_ssdlite_loads_from_the_hub_cache(isolated_env: Path, tmp_path: Path) -> None:
    """SSDlite: missing -> unavailable with the fix; present -> loads, batched boxes in original pixels."""
    spec = ModelSpec("detection", "ssdlite320_mobilenet_v3_large")
    assert "weights missing" in (DetectionBackend.availability(spec, settings(tmp_path)) or "")
    save_random_weights("ssdlite320_mobilenet_v3_large", isolated_env / "torch_home", num_classes=91)
    backend = loaded(DetectionBackend, "detection", "ssdlite320_mobilenet_v3_large", tmp_path)
    assert len(backend.labels()) == 80 and "car" in backend.labels()
    assert backend.version().startswith("ssdlite320_mobilenet_v3_large:")
    pairs = forward(backend, [(96, 64), (64, 80)])
    t = target(control("Rectangle", name="rect"), "detection", "x", threshold=0.0)
    for item, det in pairs:
        assert det.boxes_xyxy_px.shape[1] == 4 and det.size == item.size
        assert det.boxes_xyxy_px.shape[0] <= 3
        items = backend.postprocess(det, t, item)
        assert len(items) == det.boxes_xyxy_px.shape[0] >= 1
        for it in items:
            assert it["type"] == "rectangle"
            v = it["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["width"] <= 100 - v["x"] + 1e-6


def test_max_detections_setting_caps_boxes_per_image(isolated_env: Path, tmp_path: Path) -> None:
    """MAX_DETECTIONS replaces the family's cap of 100 in the loaded model, and outputs respect it."""
    save_random_weights("ssdlite320_mobilenet_v3_large", isolated_env / "torch_home", num_classes=91)
    spec = ModelSpec("detection", "ssdlite320_mobilenet_v3_large")
    capped = DetectionBackend(spec, settings(tmp_path).with_(max_detections=2))
    capped.score_floor = 0.0
    capped.load("cpu")
    assert capped.model.detections_per_img == 2
    default = DetectionBackend(spec, settings(tmp_path))
    default.load("cpu")
    assert default.model.detections_per_img == 100
    for _, det in forward(capped, [(96, 64), (64, 80)]):
        assert det.boxes_xyxy_px.shape[0] == 2


@pytest.mark.slow
def test_detection_default_faster_rcnn_loads(isolated_env: Path, tmp_path: Path) -> None:
    """The default detector (Faster R-CNN R50-FPN v2) loads and predicts rectangles."""
    save_random_weights("fasterrcnn_resnet50_fpn_v2", isolated_env / "torch_home", num_classes=91)
    backend = loaded(DetectionBackend, "detection", "fasterrcnn_resnet50_fpn_v2", tmp_path)
    shrink(backend)
    ((item, det),) = forward(backend, [(80, 60)])
    ctrl = control("RectangleLabels", labels=backend.labels())
    items = backend.postprocess(det, target(ctrl, "detection", "x", threshold=0.0), item)
    assert all(
        i["type"] == "rectanglelabels" and i["value"]["rectanglelabels"][0] in backend.labels() for i in items
    )


def test_user_checkpoint_with_its_own_classes(isolated_env: Path, tmp_path: Path) -> None:
    """model_path: a state_dict + ships.classes.txt -> the detector has those classes (plus background)."""
    import torchvision.models as tvm

    s = settings(tmp_path)
    folder = Path(s.model_dir) / "ships"
    folder.mkdir(parents=True)
    model = tvm.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3)
    torch.save({"model": model.state_dict(), "epoch": 7}, folder / "ships.pt")
    (folder / "ships.classes.txt").write_text("ship\nbuoy\n")
    backend = loaded(
        DetectionBackend, "detection", "ssdlite320_mobilenet_v3_large", tmp_path, "ships/ships.pt"
    )
    assert backend.labels() == ["ship", "buoy"]
    assert "@ships.pt:" in backend.version()
    ((item, det),) = forward(backend, [(64, 64)])
    ctrl = control("RectangleLabels", labels=["Ship", "Buoy"])
    items = backend.postprocess(det, target(ctrl, "detection", "x", threshold=0.0), item)
    assert items and {i["value"]["rectanglelabels"][0] for i in items} <= {"Ship", "Buoy"}
    # A class list of the wrong length does not fit the state_dict: a clear load error.
    (folder / "ships.classes.txt").write_text("ship\n")
    with pytest.raises(ValueError, match="does not fit"):
        loaded(DetectionBackend, "detection", "ssdlite320_mobilenet_v3_large", tmp_path, "ships/ships.pt")


@pytest.mark.slow
def test_instance_segmentation_mask_rcnn_loads(isolated_env: Path, tmp_path: Path) -> None:
    """Mask R-CNN R50-FPN v2 loads; masks come back as crops inside the original image."""
    save_random_weights("maskrcnn_resnet50_fpn_v2", isolated_env / "torch_home", num_classes=91)
    backend = loaded(
        InstanceSegmentationBackend, "instance_segmentation", "maskrcnn_resnet50_fpn_v2", tmp_path
    )
    shrink(backend, 64, 96)
    pairs = forward(backend, [(96, 72), (160, 120)])  # the second is shrunk: masks upsampled back
    for item, det in pairs:
        assert det.masks is not None and len(det.masks) == det.scores.shape[0]
        for k, crop in enumerate(det.masks):
            if crop is None:
                continue
            x0, y0, m = crop
            assert m.dtype == bool and x0 + m.shape[1] <= item.size[0] and y0 + m.shape[0] <= item.size[1]
            assert det.full_mask(k).shape == (item.size[1], item.size[0])
        for tag in ("BrushLabels", "Polygon", "Ellipse"):
            ctrl = control(tag, labels=backend.labels() if tag.endswith("Labels") else ())
            items = backend.postprocess(det, target(ctrl, "instance_segmentation", "x", threshold=0.0), item)
            assert all(i["type"] == tag.lower() for i in items)


@pytest.mark.slow
def test_keypoints_keypoint_rcnn_loads(isolated_env: Path, tmp_path: Path) -> None:
    """Keypoint R-CNN loads with the 17 COCO keypoint names as its vocabulary."""
    save_random_weights("keypointrcnn_resnet50_fpn", isolated_env / "torch_home", num_classes=2)
    backend = loaded(KeypointsBackend, "keypoints", "keypointrcnn_resnet50_fpn", tmp_path)
    assert backend.labels()[:3] == ["nose", "left_eye", "right_eye"] and len(backend.labels()) == 17
    shrink(backend, 64, 96)
    ((item, det),) = forward(backend, [(96, 72)])
    assert det.keypoints_px is not None and det.keypoints_px.shape[1:] == (17, 2)
    t = target(control("KeyPoint", attrs={"model_point_threshold": "-1000"}), "keypoints", "x", threshold=0.0)
    items = backend.postprocess(det, t, item)
    assert len(items) == 17 * det.scores.shape[0]
    assert all(i["type"] == "keypoint" for i in items)


def test_semantic_deeplab_mobilenet_loads(isolated_env: Path, tmp_path: Path) -> None:
    """DeepLabV3 MobileNetV3 loads; a batch of two sizes gives class maps at each original size."""
    save_random_weights(
        "deeplabv3_mobilenet_v3_large", isolated_env / "torch_home", num_classes=21, aux_loss=True
    )
    backend = loaded(
        SemanticSegmentationBackend, "semantic_segmentation", "deeplabv3_mobilenet_v3_large", tmp_path
    )
    assert "person" in backend.labels() and "__background__" not in backend.labels()
    backend.short_side = 64
    pairs = forward(backend, [(96, 72), (50, 80)])
    ctrl = control(
        "BrushLabels", labels=backend.labels(), attrs={"model_name": "deeplabv3_mobilenet_v3_large"}
    )
    for item, seg in pairs:
        assert seg.class_map.shape == (item.size[1], item.size[0])
        assert set(np.unique(seg.class_map)) <= set(seg.class_scores)
        items = backend.postprocess(seg, target(ctrl, "semantic_segmentation", "x", threshold=0.0), item)
        assert all(i["type"] == "brushlabels" for i in items)
        assert len(items) == len([c for c in seg.class_scores if c != 0])


def test_classification_efficientnet_loads(isolated_env: Path, tmp_path: Path) -> None:
    """EfficientNet-B0 loads with the ImageNet names; choices single gives one mapped choice."""
    save_random_weights("efficientnet_b0", isolated_env / "torch_home", num_classes=1000)
    backend = loaded(ClassificationBackend, "image_classification", "efficientnet_b0", tmp_path)
    assert len(backend.labels()) == 1000 and backend.labels()[0] == "tench"
    pairs = forward(backend, [(300, 200), (120, 160)])
    ctrl = control("Choices", labels=["Dog", "Cat", "Car"])
    for item, p in pairs:
        assert p.shape == (1000,) and p.sum() == pytest.approx(1.0, abs=1e-4)
        (it,) = backend.postprocess(
            p, target(ctrl, "image_classification", "x", backend.aliases, threshold=0.0), item
        )
        assert it["type"] == "choices" and it["value"]["choices"][0] in {"Dog", "Cat", "Car"}


def test_missing_file_at_load_time_names_the_fix(isolated_env: Path, tmp_path: Path) -> None:
    """If the weights vanish between the check and load(), the error still says how to get them."""
    backend = ClassificationBackend(ModelSpec("image_classification", "resnet50"), settings(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"serving weights download --model resnet50"):
        backend.load("cpu")
    assert tv.weights_file("resnet50").name == "resnet50-11ad3fa6.pth"
