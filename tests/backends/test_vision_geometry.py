"""Exact geometry of the vision backends, with planted model outputs (no weights needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backends import _torchvision as tv
from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from backends.keypoints import COCO_KEYPOINT_NAMES, KeypointsBackend
from backends.segmentation import (
    InstanceSegmentationBackend,
    SemanticSegmentationBackend,
    mask_ellipse_px,
    mask_polygon_px,
)
from serving.contract import ModelSpec
from serving.results.rle import rle_to_mask
from tests.backends._vision_support import (
    IMAGE,
    PlantedClassifier,
    PlantedDetector,
    PlantedSemantic,
    Transform,
    coco_categories,
    control,
    ellipse_mask,
    image_item,
    imagenet_categories,
    settings,
    target,
    voc_categories,
)

W, H = 160, 120
COCO = coco_categories()
CAR, PERSON, DOG = COCO.index("car"), COCO.index("person"), COCO.index("dog")


def boxes_make(h: int, w: int) -> dict[str, torch.Tensor]:
    """Car at (10%, 10%)-(50%, 60%), a weak person, a confident dog; in input pixels."""
    return {
        "boxes": torch.tensor(
            [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.0, 0.0, 0.05 * w, 0.05 * h], [0.6 * w, 0.5 * h, w, h]]
        ),
        "scores": torch.tensor([0.9, 0.3, 0.95]),
        "labels": torch.tensor([CAR, PERSON, DOG]),
    }


def detector(tmp_path: Path, make: Any = boxes_make, transform: Any = None) -> DetectionBackend:
    """Return a detection backend whose model is planted."""
    backend = DetectionBackend(ModelSpec("detection", "fasterrcnn_resnet50_fpn_v2"), settings(tmp_path))
    backend.model = PlantedDetector(make, transform)
    backend.categories = COCO
    return backend


def run(backend: Any, items: list[Any]) -> list[Any]:
    """Preprocess and forward a batch like the runtime does."""
    with torch.inference_mode():
        return backend.forward([backend.preprocess(it) for it in items])


def value_of(items: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    """Return the values of the items of one type."""
    return [it["value"] for it in items if it["type"] == type_]


# ---------------------------------------------------------------- detection


def test_rectanglelabels_percent_sizes_labels_and_threshold(tmp_path: Path) -> None:
    """Boxes become percent of the original image; only config labels; the tag's threshold applies."""
    backend = detector(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    ctrl = control("RectangleLabels", labels=["Car", "Person"])
    items = backend.postprocess(out, target(ctrl, "detection", "x", DetectionBackend.aliases), item)
    assert len(items) == 1
    (it,) = items
    assert it["type"] == "rectanglelabels" and it["from_name"] == "tag" and it["to_name"] == "image"
    assert (it["original_width"], it["original_height"]) == (W, H)
    assert it["value"]["rectanglelabels"] == ["Car"]
    assert it["value"]["x"] == pytest.approx(10.0)
    assert it["value"]["y"] == pytest.approx(10.0)
    assert it["value"]["width"] == pytest.approx(40.0)
    assert it["value"]["height"] == pytest.approx(50.0)
    assert it["score"] == pytest.approx(0.9)
    low = backend.postprocess(
        out, target(ctrl, "detection", "x", DetectionBackend.aliases, threshold=0.2), item
    )
    assert sorted(v["rectanglelabels"][0] for v in value_of(low, "rectanglelabels")) == ["Car", "Person"]


def test_aliases_and_predicted_values_map_model_labels(tmp_path: Path) -> None:
    """'car' fills "Automobile" by alias; predicted_values route 'dog' to "Pet"."""
    backend = detector(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    ctrl = control("RectangleLabels", labels=["Automobile", "Pet"], predicted_values={"Pet": ("dog", "cat")})
    items = backend.postprocess(out, target(ctrl, "detection", "x", DetectionBackend.aliases), item)
    assert sorted(v["rectanglelabels"][0] for v in value_of(items, "rectanglelabels")) == [
        "Automobile",
        "Pet",
    ]


def test_plain_rectangle_with_linked_labels_shares_ids(tmp_path: Path) -> None:
    """Rectangle + sibling Labels: a rectangle and a labels item per region, same id and geometry."""
    backend = detector(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    labels = control("Labels", name="labels", labels=["Car", "Building"])
    t = target(
        control("Rectangle", name="rect"),
        "detection",
        "x",
        DetectionBackend.aliases,
        linked={"labels": labels},
    )
    items = backend.postprocess(out, t, item)
    # The Labels tag maps 'car', so the unmapped dog is not emitted.
    assert [i["type"] for i in items] == ["rectangle", "labels"]
    rect, lab = items
    assert rect["id"] == lab["id"] and rect["from_name"] == "rect" and lab["from_name"] == "labels"
    assert lab["value"]["labels"] == ["Car"]
    assert {k: lab["value"][k] for k in ("x", "y", "width", "height")} == {
        k: rect["value"][k] for k in ("x", "y", "width", "height")
    }


def test_plain_rectangle_with_unrelated_labels_emits_unlabeled_regions(tmp_path: Path) -> None:
    """A Labels tag mapping none of COCO (the guide's Vehicle/Building/Pavement): every box, unlabeled."""
    backend = detector(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    labels = control("Labels", name="labels", labels=["Vehicle", "Building", "Pavement"])
    t = target(
        control("Rectangle", name="rect"),
        "detection",
        "x",
        DetectionBackend.aliases,
        linked={"labels": labels},
    )
    items = backend.postprocess(out, t, item)
    assert [i["type"] for i in items] == ["rectangle", "rectangle"]  # car 0.9 and dog 0.95; person below 0.5
    bare = backend.postprocess(out, target(control("Rectangle"), "detection", "x"), item)
    assert len(bare) == 2 and all(i["type"] == "rectangle" for i in bare)


def test_large_images_are_shrunk_before_the_model_and_boxes_scaled_back(tmp_path: Path) -> None:
    """An image above the model's working size is downscaled on the CPU; boxes come back in original %."""
    backend = detector(tmp_path, transform=Transform(min_size=40, max_size=80))
    items = [image_item(W, H), image_item(90, 45)]
    outs = run(backend, items)
    # One model call for the batch; the first image shrank to its short side 40 (53x40), the second
    # (short side 45, long 90) to the long-side cap... min(40/45, 80/90) = 0.889 -> 80x40.
    assert backend.model.inputs == [[(3, 40, 53), (3, 40, 80)]]
    ctrl = control("RectangleLabels", labels=["Car"])
    for item, out in zip(items, outs, strict=True):
        (it,) = backend.postprocess(out, target(ctrl, "detection", "x"), item)
        assert (it["original_width"], it["original_height"]) == item.size
        assert it["value"]["x"] == pytest.approx(10.0)
        assert it["value"]["width"] == pytest.approx(40.0)
        assert it["value"]["height"] == pytest.approx(50.0)


def test_detector_claims_link_sibling_labels_and_respect_model_name(tmp_path: Path) -> None:
    """Rectangle gets the sibling Labels linked; a tag naming another family's model is left alone."""
    s = settings(tmp_path)
    labels = control("Labels", name="labels", labels=["Car"])
    rect = control("Rectangle", name="rect", attrs={"model_name": "retinanet_resnet50_fpn_v2"})
    rl = control("RectangleLabels", name="rl", labels=["Car"])
    foreign = control("RectangleLabels", name="ocr", attrs={"model_name": "easyocr"})
    claims = DetectionBackend.claim(IMAGE, [labels, rect, rl, foreign], s)
    assert [(c.control.name, c.model_name, dict(c.linked)) for c in claims] == [
        ("rect", "retinanet_resnet50_fpn_v2", {"labels": labels}),
        ("rl", "fasterrcnn_resnet50_fpn_v2", {}),
    ]


# ---------------------------------------------------------------- instance segmentation

ELLIPSE = {"cx": 80.0, "cy": 60.0, "rx": 40.0, "ry": 20.0, "angle_deg": 30.0}


def masks_make(h: int, w: int) -> dict[str, torch.Tensor]:
    """One person as a rotated ellipse mask (scaled to the input size) and one weak car."""
    sx, sy = w / W, h / H
    person = ellipse_mask(h, w, ELLIPSE["cx"] * sx, ELLIPSE["cy"] * sy, 40 * sx, 20 * sy, 30.0)
    weak = np.zeros((h, w), bool)
    weak[: h // 4, : w // 4] = True
    masks = torch.from_numpy(np.stack([person, weak])).float()[:, None]
    return {
        "boxes": torch.tensor([[40.0 * sx, 30.0 * sy, 120.0 * sx, 90.0 * sy], [0, 0, w / 4, h / 4]]),
        "scores": torch.tensor([0.95, 0.2]),
        "labels": torch.tensor([PERSON, CAR]),
        "masks": masks,
    }


def segmenter(tmp_path: Path, transform: Any = None) -> InstanceSegmentationBackend:
    """Return an instance segmentation backend with a planted Mask R-CNN."""
    backend = InstanceSegmentationBackend(
        ModelSpec("instance_segmentation", "maskrcnn_resnet50_fpn_v2"), settings(tmp_path)
    )
    backend.model = PlantedDetector(masks_make, transform)
    backend.categories = COCO
    return backend


def test_brush_rle_is_the_mask_at_original_resolution(tmp_path: Path) -> None:
    """BrushLabels: the RLE decodes to exactly the planted mask, at the original size."""
    backend = segmenter(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    t = target(control("BrushLabels", labels=["Person", "Car"]), "instance_segmentation", "x")
    (it,) = backend.postprocess(out, t, item)
    assert it["type"] == "brushlabels" and it["value"]["brushlabels"] == ["Person"]
    assert it["value"]["format"] == "rle"
    assert (it["original_width"], it["original_height"]) == (W, H)
    decoded = rle_to_mask(it["value"]["rle"], H, W)
    expected = ellipse_mask(H, W, **ELLIPSE)
    np.testing.assert_array_equal(decoded, expected.astype(np.uint8) * 255)
    low = backend.postprocess(out, target(t.control, "instance_segmentation", "x", threshold=0.1), item)
    assert sorted(i["value"]["brushlabels"][0] for i in low) == ["Car", "Person"]


def test_polygon_follows_the_outer_contour_with_tag_tolerance(tmp_path: Path) -> None:
    """PolygonLabels: boundary pixel centers in percent; model_polygon_tolerance simplifies."""
    backend = segmenter(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    expected = ellipse_mask(H, W, **ELLIPSE)
    counts = {}
    for tol in ("0", "1", "4"):
        ctrl = control("PolygonLabels", labels=["Person"], attrs={"model_polygon_tolerance": tol})
        (it,) = backend.postprocess(out, target(ctrl, "instance_segmentation", "x"), item)
        assert it["value"]["closed"] is True and it["value"]["polygonlabels"] == ["Person"]
        pts = np.array(it["value"]["points"]) / 100.0 * np.array([W, H])
        counts[tol] = len(pts)
        # Every vertex is the center of a mask pixel on the boundary.
        px = np.floor(pts).astype(int)
        assert expected[px[:, 1], px[:, 0]].all()
        np.testing.assert_allclose(pts - px, 0.5)
        # Shoelace area of the polygon through boundary centers: the mask minus up to a pixel-wide rim.
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        assert 0.85 * expected.sum() < area <= expected.sum()
    assert counts["0"] > counts["1"] > counts["4"] >= 4


def test_ellipse_has_the_mask_moments(tmp_path: Path) -> None:
    """EllipseLabels: center, radii (percent of width / height) and clockwise rotation of the planted ellipse."""
    backend = segmenter(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    (it,) = backend.postprocess(
        out, target(control("EllipseLabels", labels=["Person"]), "instance_segmentation", "x"), item
    )
    v = it["value"]
    assert v["x"] == pytest.approx(50.0, abs=0.2)
    assert v["y"] == pytest.approx(50.0, abs=0.2)
    assert v["radiusX"] == pytest.approx(40 / W * 100, rel=0.02)
    assert v["radiusY"] == pytest.approx(20 / H * 100, rel=0.03)
    assert v["rotation"] == pytest.approx(30.0, abs=1.0)


def test_ellipse_fit_prefers_zero_rotation_for_upright_shapes() -> None:
    """A tall axis-aligned ellipse: rotation 0, radiusX the horizontal (minor) radius."""
    mask = ellipse_mask(100, 100, 50, 50, 10, 30)
    center, radii, rotation = mask_ellipse_px(mask, (0, 0))  # type: ignore[misc]
    assert center == pytest.approx((50.0, 50.0), abs=1e-6)
    assert radii[0] == pytest.approx(10.0, rel=0.03) and radii[1] == pytest.approx(30.0, rel=0.02)
    assert rotation == pytest.approx(0.0, abs=1e-6)
    assert mask_polygon_px(np.ones((1, 2), bool), (0, 0), 1.0) is None  # a 2-pixel blob is no polygon


def test_masks_are_upsampled_on_the_device_when_the_input_was_shrunk(tmp_path: Path) -> None:
    """Input shrunk to 53x40: the mask comes back at 160x120 and matches the true ellipse closely."""
    backend = segmenter(tmp_path, transform=Transform(min_size=40, max_size=80))
    item = image_item(W, H)
    (out,) = run(backend, [item])
    assert backend.model.inputs == [[(3, 40, 53)]]
    mask = out.full_mask(0)
    assert mask.shape == (H, W)
    expected = ellipse_mask(H, W, **ELLIPSE)
    got = mask > 0
    iou = (got & expected).sum() / (got | expected).sum()
    assert iou > 0.9
    t = target(control("BrushLabels", labels=["Person"]), "instance_segmentation", "x")
    (it,) = backend.postprocess(out, t, item)
    np.testing.assert_array_equal(rle_to_mask(it["value"]["rle"], H, W), mask)


def test_plain_polygon_and_ellipse_with_unrelated_labels(tmp_path: Path) -> None:
    """The guide's Polygon / Ellipse + Labels(Vehicle, Building, Pavement): unlabeled regions."""
    backend = segmenter(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    labels = control("Labels", name="labels", labels=["Vehicle", "Building", "Pavement"])
    for tag in ("Polygon", "Ellipse", "Brush"):
        t = target(control(tag, name=tag.lower()), "instance_segmentation", "x", linked={"labels": labels})
        items = backend.postprocess(out, t, item)
        assert [i["type"] for i in items] == [tag.lower()]


# ---------------------------------------------------------------- semantic segmentation

VOC = voc_categories()


def quadrants(h: int, w: int) -> torch.Tensor:
    """Background on the left, car top-right, person bottom-right."""
    cls = torch.zeros((h, w), dtype=torch.int64)
    cls[: h // 2, w // 2 :] = VOC.index("car")
    cls[h // 2 :, w // 2 :] = VOC.index("person")
    return cls


def test_semantic_one_brush_region_per_class_present(tmp_path: Path) -> None:
    """Each class present becomes one BrushLabels region at the original size, scored by mean confidence."""
    backend = SemanticSegmentationBackend(
        ModelSpec("semantic_segmentation", "deeplabv3_resnet50"), settings(tmp_path)
    )
    backend.model = PlantedSemantic(len(VOC), quadrants)
    backend.categories = VOC
    backend.short_side = 60  # the model's scale (520 for the real weights), small for the test
    item = image_item(W, H)
    (out,) = run(backend, [item])
    assert backend.model.inputs == [(1, 3, 60, 80)]
    ctrl = control("BrushLabels", labels=["Car", "Person", "Dog"], attrs={"model_name": "deeplabv3_resnet50"})
    items = backend.postprocess(out, target(ctrl, "semantic_segmentation", "x", backend.aliases), item)
    assert [i["value"]["brushlabels"] for i in items] == [["Car"], ["Person"]]
    expected_conf = np.exp(6.0) / (np.exp(6.0) + len(VOC) - 1)
    for it, cls in zip(items, ("car", "person"), strict=True):
        assert it["score"] == pytest.approx(expected_conf, rel=1e-5)
        assert (it["original_width"], it["original_height"]) == (W, H)
        want = (quadrants(H, W) == VOC.index(cls)).numpy().astype(np.uint8) * 255
        np.testing.assert_array_equal(rle_to_mask(it["value"]["rle"], H, W), want)
    assert backend.postprocess(out, target(ctrl, "semantic_segmentation", "x", threshold=0.99), item) == []


def test_semantic_batch_of_different_sizes(tmp_path: Path) -> None:
    """Images of different sizes share one padded forward; each class map has its own original size."""
    backend = SemanticSegmentationBackend(
        ModelSpec("semantic_segmentation", "fcn_resnet50"), settings(tmp_path)
    )
    backend.model = PlantedSemantic(len(VOC), lambda h, w: torch.full((h, w), VOC.index("cat")))
    backend.categories = VOC
    backend.short_side = 40
    outs = run(backend, [image_item(W, H), image_item(50, 100)])
    assert backend.model.inputs == [(2, 3, 80, 53)]
    assert [o.class_map.shape for o in outs] == [(H, W), (100, 50)]
    assert all(set(o.class_scores) == {VOC.index("cat")} for o in outs)


def test_brush_routing_between_instance_and_semantic(tmp_path: Path) -> None:
    """A brush tag goes to semantic segmentation only when its model_name is a semantic model."""
    s = settings(tmp_path)
    plain = control("BrushLabels", name="a", labels=["Car"])
    semantic = control(
        "BrushLabels", name="b", labels=["Car"], attrs={"model_name": "deeplabv3_mobilenet_v3_large"}
    )
    assert [c.control.name for c in InstanceSegmentationBackend.claim(IMAGE, [plain, semantic], s)] == ["a"]
    claims = SemanticSegmentationBackend.claim(IMAGE, [plain, semantic], s)
    assert [(c.control.name, c.model_name) for c in claims] == [("b", "deeplabv3_mobilenet_v3_large")]


# ---------------------------------------------------------------- keypoints


def keypoints_make(h: int, w: int) -> dict[str, torch.Tensor]:
    """Two people; person 0's keypoint j sits at ((10 + 5j)%, (20 + 3j)%); its ear scores are negative."""
    sx, sy = w / 100.0, h / 100.0
    j = torch.arange(17, dtype=torch.float32)
    kp = torch.stack([(10 + 5 * j) * sx, (20 + 3 * j) * sy, torch.ones(17)], dim=1)
    scores0 = torch.full((17,), 5.0)
    scores0[3:5] = -1.0
    return {
        "boxes": torch.tensor([[0.0, 0.0, w / 2, h / 2], [0.0, 0.0, w / 4, h / 4]]),
        "scores": torch.tensor([0.9, 0.4]),
        "labels": torch.tensor([1, 1]),
        "keypoints": torch.stack([kp, kp]),
        "keypoints_scores": torch.stack([scores0, scores0]),
    }


def keypointer(tmp_path: Path, transform: Any = None) -> KeypointsBackend:
    """Return a keypoints backend with a planted Keypoint R-CNN."""
    backend = KeypointsBackend(ModelSpec("keypoints", "keypointrcnn_resnet50_fpn"), settings(tmp_path))
    backend.model = PlantedDetector(keypoints_make, transform)
    backend.categories = ["__background__", "person"]
    return backend


@pytest.mark.parametrize("transform", [None, Transform(min_size=40, max_size=80)])
def test_keypointlabels_positions_names_and_person_ids(tmp_path: Path, transform: Any) -> None:
    """Config keypoint names map (any spelling); points in percent; one shared id prefix per person."""
    backend = keypointer(tmp_path, transform)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    ctrl = control("KeyPointLabels", labels=["Nose", "Left Eye", "left-ear", "right_ankle"])
    items = backend.postprocess(out, target(ctrl, "keypoints", "x", backend.aliases), item)
    # Person 1 is under the 0.5 threshold; the left ear (index 3) scores below 0.
    assert [i["value"]["keypointlabels"] for i in items] == [["Nose"], ["Left Eye"], ["right_ankle"]]
    for it, j in zip(items, (0, 1, 16), strict=True):
        assert it["value"]["x"] == pytest.approx(10 + 5 * j, abs=1e-4)
        assert it["value"]["y"] == pytest.approx(20 + 3 * j, abs=1e-4)
        assert it["value"]["width"] == pytest.approx(0.5)
        assert it["score"] == pytest.approx(0.9)
        assert it["id"].endswith("-" + COCO_KEYPOINT_NAMES[j])
    assert len({i["id"].rsplit("-", 1)[0] for i in items}) == 1


def test_plain_keypoints_all_points_per_person_with_point_size(tmp_path: Path) -> None:
    """KeyPoint (guide config): every point above model_point_threshold, unlabeled, grouped per person."""
    backend = keypointer(tmp_path)
    item = image_item(W, H)
    (out,) = run(backend, [item])
    labels = control("Labels", name="labels", labels=["Vehicle", "Building"])
    ctrl = control("KeyPoint", name="kp", attrs={"model_point_size": "8"})
    items = backend.postprocess(
        out, target(ctrl, "keypoints", "x", threshold=0.3, linked={"labels": labels}), item
    )
    assert all(i["type"] == "keypoint" for i in items)
    assert len(items) == 2 * 15  # two people, ears below the 0.0 point threshold
    assert len({i["id"].rsplit("-", 1)[0] for i in items}) == 2
    assert all(i["value"]["width"] == pytest.approx(8 / W * 100) for i in items)
    strict = control("KeyPoint", name="kp", attrs={"model_point_threshold": "6"})
    assert backend.postprocess(out, target(strict, "keypoints", "x"), item) == []


# ---------------------------------------------------------------- classification

IMAGENET = imagenet_categories()


def classifier(tmp_path: Path, logits: dict[str, float]) -> ClassificationBackend:
    """Return a classifier planting the given logits (others 0)."""
    backend = ClassificationBackend(ModelSpec("image_classification", "resnet50"), settings(tmp_path))
    raw = torch.zeros(1000)
    for name, value in logits.items():
        raw[IMAGENET.index(name)] = value
    backend.model = PlantedClassifier(raw)
    backend.categories = IMAGENET
    return backend


def probs(logits: dict[str, float]) -> dict[str, float]:
    """Return the softmax probabilities of the planted classes."""
    raw = torch.zeros(1000)
    for name, value in logits.items():
        raw[IMAGENET.index(name)] = value
    p = raw.softmax(0)
    return {name: float(p[IMAGENET.index(name)]) for name in logits}


def test_choices_single_sums_mapped_classes_and_takes_the_best(tmp_path: Path) -> None:
    """ "Car" collects sports car + cab; single choice = argmax over config choices, score = its probability."""
    planted = {"sports car": 9.0, "cab": 8.0, "airliner": 8.5}
    backend = classifier(tmp_path, planted)
    item = image_item(300, 200)
    x = backend.preprocess(item)
    assert tuple(x.shape) == (3, 224, 224) and x.dtype == torch.uint8
    (out,) = run(backend, [item])
    p = probs(planted)
    ctrl = control("Choices", labels=["Airplane", "Car"])
    (it,) = backend.postprocess(out, target(ctrl, "image_classification", "x", backend.aliases), item)
    assert it["type"] == "choices" and it["value"] == {"choices": ["Car"]}
    # Every ImageNet class of the car alias group feeds "Car" (the unplanted ones at logit 0 too).
    car_group = next(g for g in backend.aliases if "car" in g)
    members = [n for n in IMAGENET if n.casefold() in car_group]
    assert {"sports car", "cab", "convertible", "jeep", "limousine", "minivan"} <= set(members)
    z = float(torch.exp(torch.tensor(list(planted.values()))).sum()) + (1000 - len(planted))
    expected = p["sports car"] + p["cab"] + (len(members) - 2) / z
    assert it["score"] == pytest.approx(expected, rel=1e-5)
    multi = control("Choices", labels=["Airplane", "Car"], attrs={"choice": "multiple"})
    (it,) = backend.postprocess(
        out, target(multi, "image_classification", "x", backend.aliases, threshold=0.2), item
    )
    assert it["value"] == {"choices": ["Car", "Airplane"]}
    high = target(ctrl, "image_classification", "x", backend.aliases, threshold=0.9)
    assert backend.postprocess(out, high, item) == []


def test_choices_guide_config_and_coarse_imagenet_classes(tmp_path: Path) -> None:
    """Boeing/Airbus map to nothing unless predicted_values say so; "Dog" collects dog breeds."""
    backend = classifier(tmp_path, {"airliner": 12.0})
    item = image_item(64, 64)
    (out,) = run(backend, [item])
    guide = control("Choices", name="choice", labels=["Boeing", "Airbus"])
    assert backend.postprocess(out, target(guide, "image_classification", "x", backend.aliases), item) == []
    mapped = control(
        "Choices", name="choice", labels=["Boeing", "Airbus"], predicted_values={"Boeing": ("airliner",)}
    )
    (it,) = backend.postprocess(out, target(mapped, "image_classification", "x", backend.aliases), item)
    assert it["value"] == {"choices": ["Boeing"]}
    dogs = classifier(tmp_path, {"golden retriever": 6.0, "beagle": 6.0})
    (out,) = run(dogs, [item])
    pets = control("Choices", labels=["Cat", "Dog"])
    (it,) = dogs.postprocess(out, target(pets, "image_classification", "x", dogs.aliases), item)
    assert it["value"] == {"choices": ["Dog"]}


def test_float_option_falls_back_on_garbage(tmp_path: Path) -> None:
    """A non-numeric knob is logged and ignored."""
    t = target(control("Polygon", attrs={"model_polygon_tolerance": "abc"}), "instance_segmentation", "x")
    assert tv.float_option(t, "model_polygon_tolerance", 1.5) == 1.5
