"""Geometry: pixel units in, percent of the original image out, linked items sharing one id."""

from __future__ import annotations

import pytest

from serving.contract import ControlTag, LabelMap, ModelSpec, ObjectTag, Target
from serving.results import regions

IMAGE = ObjectTag("img", "Image", "image")


def target(tag: str, labels=(), linked=None, **kw) -> Target:
    control = ControlTag("ctl", tag, "img", tuple(labels))
    return Target(control, IMAGE, ModelSpec("f", "m"), LabelMap(labels), linked=linked or {}, **kw)


def test_box_to_percent_exact_values() -> None:
    assert regions.box_xyxy_px_to_pct((64, 48, 320, 240), (640, 480)) == {
        "x": 10.0,
        "y": 10.0,
        "width": 40.0,
        "height": 40.0,
    }


def test_box_partly_outside_is_clamped() -> None:
    assert regions.box_xyxy_px_to_pct((-10, 400, 700, 500), (640, 480)) == pytest.approx(
        {"x": 0.0, "y": 400 / 4.8, "width": 100.0, "height": 100 - 400 / 4.8}
    )


def test_rectanglelabels_item_carries_label_size_and_score() -> None:
    (item,) = regions.rectangle_items(
        target("RectangleLabels", ["Car"]), (0, 0, 320, 240), (640, 480), 0.75, "Car"
    )
    assert item["type"] == "rectanglelabels"
    assert item["value"] == {
        "x": 0.0,
        "y": 0.0,
        "width": 50.0,
        "height": 50.0,
        "rotation": 0,
        "rectanglelabels": ["Car"],
    }
    assert (item["original_width"], item["original_height"], item["image_rotation"]) == (640, 480, 0)
    assert item["score"] == 0.75 and item["from_name"] == "ctl" and item["to_name"] == "img"


def test_labeled_control_without_a_label_emits_nothing() -> None:
    assert (
        regions.rectangle_items(target("RectangleLabels", ["Car"]), (0, 0, 1, 1), (10, 10), 0.9, None) == []
    )


def test_plain_rectangle_with_labels_and_textarea_shares_one_id() -> None:
    labels = ControlTag("lab", "Labels", "img", ("Text",))
    text = ControlTag("txt", "TextArea", "img")
    items = regions.rectangle_items(
        target("Rectangle", linked={"labels": labels, "textarea": text}),
        (10, 20, 110, 70),
        (200, 100),
        0.9,
        "Text",
        "HELLO",
    )
    assert [i["type"] for i in items] == ["rectangle", "labels", "textarea"]
    assert len({i["id"] for i in items}) == 1
    geometry = {"x": 5.0, "y": 20.0, "width": 50.0, "height": 50.0, "rotation": 0}
    assert items[0]["value"] == geometry
    assert items[1]["value"] == {**geometry, "labels": ["Text"]}
    assert items[2]["value"] == {**geometry, "text": ["HELLO"]}
    assert [i["from_name"] for i in items] == ["ctl", "lab", "txt"]


def test_rect_corners_rotate_clockwise_about_the_top_left_in_pixels() -> None:
    # 25% of 200 px = 50 px wide, 10% of 200 px = 20 px high, turned 90 degrees clockwise about (50, 10)
    corners = regions.rect_corners_px(25.0, 5.0, 50.0, 10.0, 90.0, (200, 200))
    assert [c for xy in corners for c in xy] == pytest.approx([50, 10, 50, 110, 30, 110, 30, 10])
    # the percent->pixel inverse of rotated_rect_px_to_pct, and the unrotated box needs no trigonometry
    value = regions.rotated_rect_px_to_pct(corners, (200, 200))
    assert value == pytest.approx({"x": 25.0, "y": 5.0, "width": 50.0, "height": 10.0, "rotation": 90.0})
    assert regions.rect_corners_px(10, 20, 30, 40, 360.0, (100, 50)) == [
        (10, 10),
        (40, 10),
        (40, 30),
        (10, 30),
    ]


def test_rotated_quad_becomes_rotation_about_top_left() -> None:
    # a 100x20 px box rotated 90 degrees clockwise about (50, 10)
    value = regions.rotated_rect_px_to_pct([(50, 10), (50, 110), (30, 110), (30, 10)], (200, 200))
    assert value == pytest.approx({"x": 25.0, "y": 5.0, "width": 50.0, "height": 10.0, "rotation": 90.0})


def test_polygon_points_in_percent() -> None:
    (item,) = regions.polygon_items(
        target("PolygonLabels", ["Cat"]), [(0, 0), (50, 0), (50, 25)], (100, 50), 0.5, "Cat"
    )
    assert item["value"]["points"] == [[0.0, 0.0], [50.0, 0.0], [50.0, 50.0]]
    assert item["value"]["polygonlabels"] == ["Cat"]


def test_ellipse_and_keypoint_in_percent() -> None:
    (e,) = regions.ellipse_items(target("Ellipse"), (50, 25), (10, 5), 30, (100, 50), 0.5)
    assert e["value"] == {"x": 50.0, "y": 50.0, "radiusX": 10.0, "radiusY": 10.0, "rotation": 30.0}
    (k,) = regions.keypoint_items(target("KeyPointLabels", ["nose"]), (25, 10), (100, 50), 0.5, "nose")
    assert k["value"] == {"x": 25.0, "y": 20.0, "width": 0.5, "keypointlabels": ["nose"]}


def test_readonly_hidden_flags() -> None:
    (item,) = regions.rectangle_items(
        target("Rectangle", readonly=True, hidden=True), (0, 0, 1, 1), (2, 2), 0.5
    )
    assert item["readonly"] is True and item["hidden"] is True


def test_prediction_score_is_mean_over_regions_not_items() -> None:
    items = [{"id": "a", "score": 0.9}, {"id": "a", "score": 0.9}, {"id": "b", "score": 0.5}]
    assert regions.prediction_score(items) == pytest.approx(0.7)
    assert regions.prediction_score([]) == 0.0


def test_region_ids_are_unique() -> None:
    assert len({regions.new_id() for _ in range(10000)}) == 10000


def test_drawn_points_and_boxes_convert_to_pixels() -> None:
    """A drawn point's percentages are of the shown image; a rotated box gives the box around its corners."""
    assert regions.point_pct_to_px(25.0, 50.0, (640, 480)) == (160.0, 240.0)
    assert regions.rect_pct_to_box_xyxy_px({"x": 10, "y": 20, "width": 50, "height": 25}, (200, 100)) == (
        20.0,
        20.0,
        120.0,
        45.0,
    )
    # 100 x 50 px turned 90 degrees clockwise about its top-left corner (20, 20)
    box = regions.rect_pct_to_box_xyxy_px(
        {"x": 10, "y": 20, "width": 50, "height": 50, "rotation": 90}, (200, 100)
    )
    assert box == pytest.approx((-30.0, 20.0, 20.0, 120.0))
