"""Pure OCR geometry: reading order, fragment merging, drawn-region crops, line bands, batch grouping."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from backends._ocr_geometry import (
    Line,
    box_quad,
    clip_quad,
    crop_polygon,
    crop_quad,
    merge_fragments,
    oriented_quad,
    pad_to,
    plan_detection_groups,
    reading_order,
    rect_pct_to_quad_px,
    text_bands,
    tighten,
)
from serving.results.regions import rotated_rect_px_to_pct


def line(x0: float, y0: float, x1: float, y1: float, text: str, score: float = 0.9) -> Line:
    """Build an axis-aligned line."""
    return Line(box_quad(x0, y0, x1, y1), text, score)


def test_reading_order_rows_then_columns() -> None:
    """Lines sort top to bottom; lines overlapping vertically form a row read left to right."""
    lines = [
        line(300, 12, 400, 40, "right"),
        line(10, 100, 200, 130, "second"),
        line(10, 10, 200, 38, "left"),
        line(10, 200, 90, 230, "third"),
    ]
    assert [ln.text for ln in reading_order(lines)] == ["left", "right", "second", "third"]


def test_reading_order_does_not_chain_rows() -> None:
    """A slightly lower line joins the row; a line below the row's band starts a new one."""
    lines = [line(0, 0, 50, 20, "a"), line(60, 6, 110, 26, "b"), line(0, 22, 50, 42, "c")]
    assert [ln.text for ln in reading_order(lines)] == ["a", "b", "c"]


def test_merge_fragments_joins_words_of_one_line() -> None:
    """Close fragments of one row merge into one line (union box, length-weighted score); far ones stay."""
    slanted = Line(np.array([[128, 40], [261, 29], [262, 87], [129, 97]], dtype=float), "quick", 0.5)
    lines = [line(36, 36, 132, 88, "The", 1.0), slanted, line(700, 36, 800, 88, "far")]
    merged = merge_fragments(lines)
    assert [m.text for m in merged] == ["The quick", "far"]
    np.testing.assert_allclose(merged[0].quad_px, box_quad(36, 29, 262, 97))
    assert merged[0].score == pytest.approx((1.0 * 3 + 0.5 * 5) / 8)


def test_merge_fragments_keeps_rotated_lines() -> None:
    """Steeply rotated fragments are not merged into axis-aligned boxes."""
    rotated = Line(np.array([[100, 0], [150, 40], [130, 60], [80, 20]], dtype=float), "tilted", 0.9)
    merged = merge_fragments([line(0, 0, 90, 40, "flat"), rotated])
    assert [m.text for m in merged] == ["flat", "tilted"]


def test_rect_pct_round_trips_through_regions() -> None:
    """A rotated LS rectangle -> pixel quad -> LS value gives the same value back."""
    size = (640, 300)
    value = {"x": 10.0, "y": 20.0, "width": 30.0, "height": 10.0, "rotation": 15.0}
    quad = rect_pct_to_quad_px(value, size)
    back = rotated_rect_px_to_pct(quad.tolist(), size)
    for key, expected in value.items():
        assert back[key] == pytest.approx(expected, abs=1e-6)


def test_crop_quad_derotates() -> None:
    """Cropping a rotated quad gives the upright content: a bar drawn rotated comes out horizontal."""
    image = np.full((200, 300), 255, np.uint8)
    quad = rect_pct_to_quad_px({"x": 20, "y": 30, "width": 50, "height": 10, "rotation": 20}, (300, 200))
    cv2.fillPoly(image, [np.round(quad).astype(np.int32)], 0)
    crop, _ = crop_quad(image, quad)
    assert crop.shape == (20, 150)
    assert crop[2:-2, 2:-2].mean() < 10  # all bar, no background


def test_crop_polygon_masks_outside() -> None:
    """Pixels of the oriented box outside the polygon take the paper colour."""
    image = np.zeros((100, 100, 3), np.uint8)  # black everywhere: any kept pixel outside would be black
    cv2.rectangle(image, (20, 20), (80, 60), (255, 255, 255), -1)
    triangle = np.array([[20, 20], [80, 20], [20, 60]], dtype=float)
    crop = crop_polygon(image, triangle)
    assert crop.shape[:2] == (40, 60)
    assert (crop == 255).mean() > 0.95


def test_oriented_quad_prefers_horizontal_width() -> None:
    """The oriented quad of a rotated rectangle's corners has its width along the text, left to right."""
    quad = rect_pct_to_quad_px({"x": 10, "y": 10, "width": 50, "height": 10, "rotation": 10}, (100, 100))
    got = oriented_quad(quad[[2, 0, 3, 1]])  # any point order
    angle = math.degrees(math.atan2(got[1, 1] - got[0, 1], got[1, 0] - got[0, 0]))
    assert angle == pytest.approx(10, abs=0.5)
    np.testing.assert_allclose(got, quad, atol=0.6)


def test_clip_quad_only_clips_axis_aligned() -> None:
    """Axis-aligned quads clip to the image; rotated ones are kept (clipping would skew them)."""
    np.testing.assert_allclose(clip_quad(box_quad(-5, -3, 120, 50), (100, 40)), box_quad(0, 0, 100, 40))
    rotated = np.array([[0, -5], [50, 5], [45, 30], [-5, 20]], dtype=float)
    np.testing.assert_allclose(clip_quad(rotated, (40, 40)), rotated)


def test_text_bands_split_lines_and_keep_dots() -> None:
    """Two lines give two bands; an i-dot just above a line stays with it; specks are dropped."""
    grey = np.full((120, 200), 255, np.uint8)
    grey[10:40, 10:190] = 0  # line 1
    grey[60:64, 20:24] = 0  # a dot 2 px above line 2
    grey[66:96, 10:150] = 0  # line 2
    grey[110:112, 100:102] = 0  # a speck
    assert text_bands(grey) == [(10, 40), (60, 96)]
    assert text_bands(np.full((20, 20), 200, np.uint8)) == []


def test_tighten_sets_a_fixed_margin() -> None:
    """However loose the crop, the result is the ink plus 10% of its height on every side."""
    for pad in (0, 5, 30):
        grey = np.full((40 + 2 * pad, 100 + 2 * pad), 250, np.uint8)
        grey[pad : pad + 40, pad : pad + 100 : 4] = 10  # strokes: ink is the minority, as in text
        out = tighten(grey)
        assert out.shape == (48, 105)
        assert out[:4].min() == 250 and out[:, :4].min() == 250
        assert (out[4:44, 4:101:4] == 10).all()


def test_plan_detection_groups_pads_only_similar_sizes() -> None:
    """Near-equal sizes share a group; a much smaller image is not padded up to a big one."""
    shapes = [(300, 640), (142, 400), (300, 620), (2000, 3000)]
    groups = plan_detection_groups(shapes)
    assert sorted(map(sorted, groups)) == [[0, 2], [1], [3]]
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]


def test_pad_to_keeps_pixels_top_left() -> None:
    """Padding adds paper at the bottom and right only."""
    image = np.full((10, 20, 3), 200, np.uint8)
    image[0, 0] = 0
    out = pad_to(image, 16, 25)
    assert out.shape == (16, 25, 3)
    assert (out[:10, :20] == image).all() and (out[10:] == 200).all()
