"""Label Studio geometry in one place: pixel units in, percent-of-original-image items out.

Every backend builds its result items here so that coordinate conventions, linked items
(geometry + labels + per-region textarea sharing one id) and clamping live in one module.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from serving.contract import Target
    from serving.results.hypertext import HtmlRange

# Control tags whose value carries the label list under the lower-cased tag name.
LABELED_GEOMETRY = {
    "RectangleLabels": "rectangle",
    "PolygonLabels": "polygon",
    "EllipseLabels": "ellipse",
    "KeyPointLabels": "keypoint",
    "BrushLabels": "brush",
}
PLAIN_GEOMETRY = {"Rectangle", "Polygon", "Ellipse", "KeyPoint", "Brush"}


# Region ids: a per-process random start and a counter (next() on itertools.count is atomic under
# the GIL). uuid4 read os.urandom once per region: a quarter of a big NER /predict (issue #29).
_IDS = itertools.count(int.from_bytes(os.urandom(5), "big"))


def new_id() -> str:
    """Return a fresh region id (10 hex digits), unique within a process for 16**10 regions."""
    return f"{next(_IDS) & 0xFFFFFFFFFF:010x}"


def clamp_pct(value: float) -> float:
    """Clamp a percentage to [0, 100] (regions partly outside the image stay valid)."""
    if math.isnan(value):
        return 0.0
    return min(100.0, max(0.0, float(value)))


def box_xyxy_px_to_pct(box_xyxy_px: Sequence[float], size: tuple[int, int]) -> dict[str, float]:
    """Convert a pixel box (x0, y0, x1, y1) to LS percent x/y/width/height, clamped."""
    width_px, height_px = size
    x0, y0, x1, y1 = (float(v) for v in box_xyxy_px)
    # clamp in pixels first, then divide once: keeps exact values exact (64/640 -> 10.0)
    x0, x1 = (min(max(v, 0.0), width_px) for v in (x0, x1))
    y0, y1 = (min(max(v, 0.0), height_px) for v in (y0, y1))
    return {
        "x": clamp_pct(x0 / width_px * 100.0),
        "y": clamp_pct(y0 / height_px * 100.0),
        "width": clamp_pct(max(0.0, x1 - x0) / width_px * 100.0),
        "height": clamp_pct(max(0.0, y1 - y0) / height_px * 100.0),
    }


def rect_corners_px(
    x: float, y: float, width: float, height: float, rotation: float, size: tuple[float, float]
) -> list[tuple[float, float]]:
    """Return the pixel corners (tl, tr, br, bl) of a Label Studio rectangle given in percent.

    Percent of the image as shown (EXIF applied, `size` its width and height), rotated `rotation`
    degrees clockwise about its top-left corner (x, y) in pixel space: percent axes differ in scale,
    so the rotation happens in pixels (y points down).
    """
    width_px, height_px = size
    x0 = float(x) / 100.0 * width_px
    y0 = float(y) / 100.0 * height_px
    w = float(width) / 100.0 * width_px
    h = float(height) / 100.0 * height_px
    angle = math.radians(float(rotation or 0.0) % 360.0)
    if angle == 0.0:
        return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [
        (x0 + u * cos - v * sin, y0 + u * sin + v * cos) for u, v in ((0.0, 0.0), (w, 0.0), (w, h), (0.0, h))
    ]


def box_pct_to_xyxy_px(
    x: float, y: float, width: float, height: float, rotation: float, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Return the pixel box (x0, y0, x1, y1) around a Label Studio rectangle, clipped to the image.

    The inverse of rectangle_items for training data; a rotated rectangle becomes the axis-aligned
    box around its 4 corners (see rect_corners_px).
    """
    width_px, height_px = size
    corners = rect_corners_px(x, y, width, height, rotation, size)
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return (
        min(max(min(xs), 0.0), float(width_px)),
        min(max(min(ys), 0.0), float(height_px)),
        min(max(max(xs), 0.0), float(width_px)),
        min(max(max(ys), 0.0), float(height_px)),
    )


def points_px_to_pct(points_px: Iterable[Sequence[float]], size: tuple[int, int]) -> list[list[float]]:
    """Convert pixel points [(x, y), ...] to LS percent points, clamped."""
    width_px, height_px = size
    return [
        [clamp_pct(float(x) / width_px * 100.0), clamp_pct(float(y) / height_px * 100.0)]
        for x, y in points_px
    ]


def point_pct_to_px(x_pct: float, y_pct: float, size: tuple[int, int]) -> tuple[float, float]:
    """Convert a Label Studio percent point (a drawn region's value) to pixels of the image.

    Percentages are of the image as Label Studio shows it (EXIF orientation applied, as the
    resolver decodes it). `image_rotation` in a drawn region needs no handling: Label Studio
    rotates the whole stage for display and keeps region coordinates in the unrotated image.
    """
    width_px, height_px = size
    return float(x_pct) / 100.0 * width_px, float(y_pct) / 100.0 * height_px


def rect_pct_to_box_xyxy_px(value: Mapping[str, Any], size: tuple[int, int]) -> tuple[float, ...]:
    """Return the axis-aligned pixel box (x0, y0, x1, y1) of a drawn rectangle value (x/y/width/height %).

    A rotated rectangle (clockwise `rotation` degrees about its top-left corner x/y, as Label
    Studio draws it) gives the box around its four corners; not clipped to the image.
    """
    corners = rect_corners_px(
        value["x"], value["y"], value["width"], value["height"], value.get("rotation", 0.0) or 0.0, size
    )
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return min(xs), min(ys), max(xs), max(ys)


def rotated_rect_px_to_pct(corners_px: Sequence[Sequence[float]], size: tuple[int, int]) -> dict[str, float]:
    """Convert a rotated quad (tl, tr, br, bl in pixels) to LS x/y/width/height/rotation.

    Label Studio rotates a rectangle clockwise (degrees) about its top-left corner (x, y).
    """
    (x0, y0), (x1, y1), _, (x3, y3) = [(float(x), float(y)) for x, y in corners_px[:4]]
    width_px, height_px = size
    w = math.hypot(x1 - x0, y1 - y0)
    h = math.hypot(x3 - x0, y3 - y0)
    angle = math.degrees(math.atan2(y1 - y0, x1 - x0)) % 360.0
    if abs(angle) < 1e-6 or abs(angle - 360.0) < 1e-6:
        angle = 0.0
    return {
        "x": clamp_pct(x0 / width_px * 100.0),
        "y": clamp_pct(y0 / height_px * 100.0),
        "width": w / width_px * 100.0,
        "height": h / height_px * 100.0,
        "rotation": angle,
    }


def rotated_box_corners_px(
    cx: float, cy: float, width: float, height: float, angle_rad: float
) -> list[tuple[float, float]]:
    """Return the pixel corners (tl, tr, br, bl) of a box given by its centre, size and clockwise angle.

    "Top-left" is the corner Label Studio rotates about: the width runs from it along the angle
    (y points down, so a positive angle turns clockwise on screen), the height at a right angle to it.
    """
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    ux, uy = width * cos, width * sin
    vx, vy = -height * sin, height * cos
    x0, y0 = cx - (ux + vx) / 2.0, cy - (uy + vy) / 2.0
    return [(x0, y0), (x0 + ux, y0 + uy), (x0 + ux + vx, y0 + uy + vy), (x0 + vx, y0 + vy)]


def fit_rotated_box(
    cx: float, cy: float, width: float, height: float, angle_rad: float, size: tuple[int, int]
) -> tuple[float, float] | None:
    """Return (width, height) shrunk about the centre so every corner is inside the image; None if it cannot be.

    Label Studio (and the validator) want every corner of a rotated rectangle inside the image; a box
    that crosses the border keeps its centre and angle and loses only what lies outside, proportionally.
    """
    width_px, height_px = float(size[0]), float(size[1])
    if not (0.0 < cx < width_px and 0.0 < cy < height_px) or width <= 0.0 or height <= 0.0:
        return None
    scale = 1.0
    for px, py in rotated_box_corners_px(cx, cy, width, height, angle_rad):
        for offset, centre, limit in ((px - cx, cx, width_px), (py - cy, cy, height_px)):
            if offset > 0 and centre + offset > limit:
                scale = min(scale, (limit - centre) / offset)
            elif offset < 0 and centre + offset < 0.0:
                scale = min(scale, centre / -offset)
    return width * scale, height * scale


def _base_item(
    target: Target,
    from_name: str,
    type_: str,
    value: dict[str, Any],
    region_id: str,
    score: float,
    size: tuple[int, int] | None,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": region_id,
        "from_name": from_name,
        "to_name": target.obj.name,
        "type": type_,
        "value": value,
        "score": float(score),
    }
    if size is not None:
        item["original_width"] = int(size[0])
        item["original_height"] = int(size[1])
        item["image_rotation"] = 0
    if target.readonly:
        item["readonly"] = True
    if target.hidden:
        item["hidden"] = True
    return item


def geometry_items(
    target: Target,
    geometry: dict[str, Any],
    size: tuple[int, int],
    score: float,
    label: str | None = None,
    text: str | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the linked items of one image region: geometry, labels, per-region textarea.

    `geometry` is the percent value (x/y/width/height[/rotation], points, rle...). A labeled
    control (RectangleLabels...) needs a label: without one nothing is emitted. A plain
    control (Rectangle...) with a linked Labels tag gets a separate `labels` item with the
    same id and geometry, and a linked per-region TextArea gets a `textarea` item.
    """
    control = target.control
    region_id = region_id or new_id()
    items: list[dict[str, Any]] = []
    if control.tag in LABELED_GEOMETRY:
        if label is None:
            return []
        value = dict(geometry)
        value[control.tag.lower()] = [label]
        items.append(_base_item(target, control.name, control.tag.lower(), value, region_id, score, size))
    else:
        items.append(
            _base_item(target, control.name, control.tag.lower(), dict(geometry), region_id, score, size)
        )
        labels_control = target.linked.get("labels")
        if labels_control is not None and label is not None:
            value = dict(geometry)
            value["labels"] = [label]
            items.append(_base_item(target, labels_control.name, "labels", value, region_id, score, size))
    textarea = target.linked.get("textarea")
    if textarea is not None and text is not None:
        value = dict(geometry)
        value["text"] = [text]
        items.append(_base_item(target, textarea.name, "textarea", value, region_id, score, size))
    return items


def rectangle_items(
    target: Target,
    box_xyxy_px: Sequence[float],
    size: tuple[int, int],
    score: float,
    label: str | None = None,
    text: str | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of an axis-aligned pixel box."""
    geometry: dict[str, Any] = box_xyxy_px_to_pct(box_xyxy_px, size)
    geometry["rotation"] = 0
    return geometry_items(target, geometry, size, score, label, text, region_id)


def rotated_box_items(
    target: Target,
    box_xywhr_px: Sequence[float],
    size: tuple[int, int],
    score: float,
    label: str | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of a rotated pixel box (centre x, centre y, width, height, clockwise radians).

    Label Studio keeps x/y at the top-left corner and rotates clockwise about it (rect_corners_px is
    the inverse); a box crossing the border is shrunk about its centre to fit (fit_rotated_box), and
    one whose centre is outside the image gives nothing.
    """
    cx, cy, width, height, angle = (float(v) for v in box_xywhr_px[:5])
    fitted = fit_rotated_box(cx, cy, width, height, angle, size)
    if fitted is None:
        return []
    corners = rotated_box_corners_px(cx, cy, fitted[0], fitted[1], angle)
    geometry: dict[str, Any] = rotated_rect_px_to_pct(corners, size)
    return geometry_items(target, geometry, size, score, label, None, region_id)


def polygon_items(
    target: Target,
    points_px: Iterable[Sequence[float]],
    size: tuple[int, int],
    score: float,
    label: str | None = None,
    text: str | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of a pixel polygon."""
    geometry = {"points": points_px_to_pct(points_px, size), "closed": True}
    return geometry_items(target, geometry, size, score, label, text, region_id)


def ellipse_items(
    target: Target,
    center_px: Sequence[float],
    radii_px: Sequence[float],
    rotation_deg: float,
    size: tuple[int, int],
    score: float,
    label: str | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of a pixel ellipse (center, radii, clockwise rotation in degrees)."""
    width_px, height_px = size
    geometry = {
        "x": clamp_pct(center_px[0] / width_px * 100.0),
        "y": clamp_pct(center_px[1] / height_px * 100.0),
        "radiusX": float(radii_px[0]) / width_px * 100.0,
        "radiusY": float(radii_px[1]) / height_px * 100.0,
        "rotation": float(rotation_deg) % 360.0,
    }
    return geometry_items(target, geometry, size, score, label, None, region_id)


def keypoint_items(
    target: Target,
    point_px: Sequence[float],
    size: tuple[int, int],
    score: float,
    label: str | None = None,
    width_pct: float = 0.5,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of one pixel keypoint."""
    width_px, height_px = size
    geometry = {
        "x": clamp_pct(point_px[0] / width_px * 100.0),
        "y": clamp_pct(point_px[1] / height_px * 100.0),
        "width": float(width_pct),
    }
    return geometry_items(target, geometry, size, score, label, None, region_id)


def brush_items(
    target: Target,
    mask_hw: np.ndarray,
    score: float,
    label: str | None = None,
    region_id: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of a binary mask at the original resolution (Label Studio brush RLE)."""
    from serving.results.rle import mask_to_rle

    height_px, width_px = mask_hw.shape[:2]
    geometry = {"format": "rle", "rle": mask_to_rle(mask_hw)}
    return geometry_items(target, geometry, (width_px, height_px), score, label, None, region_id)


def span_item(
    target: Target,
    start: int,
    end: int,
    text: str,
    label: str,
    score: float,
    region_id: str | None = None,
) -> dict[str, Any]:
    """Build a text span item (character offsets into the task text)."""
    value = {"start": int(start), "end": int(end), "text": text, target.control.tag.lower(): [label]}
    return _base_item(
        target, target.control.name, target.control.tag.lower(), value, region_id or new_id(), score, None
    )


def hypertext_span_item(
    target: Target, span: HtmlRange, label: str, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """Build a HyperText span item: start/end XPaths, UTF-16 offsets in those nodes, globalOffsets, text."""
    value = span.value()
    value[target.control.tag.lower()] = [label]
    return _base_item(
        target, target.control.name, target.control.tag.lower(), value, region_id or new_id(), score, None
    )


def paragraph_span_item(
    target: Target,
    paragraph: int,
    paragraph_text: str,
    start: int,
    end: int,
    label: str,
    score: float,
    region_id: str | None = None,
) -> dict[str, Any]:
    """Build a Paragraphs span item inside one paragraph (start/end are code point offsets into its text).

    Label Studio addresses it by paragraph index as a string ("2"), as its editor stores it, and offsets
    in UTF-16 code units inside the paragraph's text.
    """
    from serving.results.utf16 import utf16_offset

    value = {
        "start": str(int(paragraph)),
        "end": str(int(paragraph)),
        "startOffset": utf16_offset(paragraph_text, start),
        "endOffset": utf16_offset(paragraph_text, end),
        "text": paragraph_text[start:end],
        target.control.tag.lower(): [label],
    }
    return _base_item(
        target, target.control.name, target.control.tag.lower(), value, region_id or new_id(), score, None
    )


def choices_item(
    target: Target, choices: Sequence[str], score: float, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Build a classification item."""
    return _base_item(
        target, target.control.name, "choices", {"choices": list(choices)}, new_id(), score, None
    )


def taxonomy_item(target: Target, paths: Sequence[Sequence[str]], score: float) -> dict[str, Any]:
    """Build a Taxonomy item: each chosen node as its path from the root."""
    value = {"taxonomy": [list(path) for path in paths]}
    return _base_item(target, target.control.name, "taxonomy", value, new_id(), score, None)


def rating_item(target: Target, rating: int, score: float) -> dict[str, Any]:
    """Build a whole-object rating item (1..maxRating)."""
    return _base_item(target, target.control.name, "rating", {"rating": int(rating)}, new_id(), score, None)


def textarea_item(target: Target, texts: Sequence[str], score: float) -> dict[str, Any]:
    """Build a whole-object textarea item (not per region)."""
    return _base_item(target, target.control.name, "textarea", {"text": list(texts)}, new_id(), score, None)


def region_textarea_item(
    target: Target, geometry: dict[str, Any], size: tuple[int, int], score: float, text: str, region_id: str
) -> dict[str, Any] | None:
    """Build the per-region textarea item of an existing region (same id, same geometry); None without one."""
    textarea = target.linked.get("textarea")
    if textarea is None:
        return None
    value = dict(geometry)
    value["text"] = [text]
    return _base_item(target, textarea.name, "textarea", value, region_id, score, size)


def audio_segment_items(
    target: Target,
    start: float,
    end: float,
    duration: float,
    score: float,
    label: str,
    text: str | None = None,
    region_id: str | None = None,
    choices: Sequence[str] | None = None,
    choice_score: float | None = None,
) -> list[dict[str, Any]]:
    """Build the items of one audio region: the labeled segment (seconds), its per-region text and choices.

    Times are clamped into [0, duration] (what Label Studio's player can show); `original_length`
    carries the duration so that validation can check the region against it.
    """
    region_id = region_id or new_id()
    start = min(max(float(start), 0.0), float(duration))
    end = min(max(float(end), start), float(duration))
    geometry: dict[str, Any] = {"start": round(start, 3), "end": round(end, 3), "channel": 0}
    value = dict(geometry)
    value[target.control.tag.lower()] = [label]
    items = [
        _base_item(target, target.control.name, target.control.tag.lower(), value, region_id, score, None)
    ]
    textarea = target.linked.get("textarea")
    if textarea is not None and text is not None:
        items.append(
            _base_item(
                target, textarea.name, "textarea", {**geometry, "text": [text]}, region_id, score, None
            )
        )
    linked_choices = target.linked.get("choices")
    if linked_choices is not None and choices:
        value = {**geometry, "choices": list(choices)}
        own = score if choice_score is None else choice_score
        items.append(_base_item(target, linked_choices.name, "choices", value, region_id, own, None))
    for item in items:
        item["original_length"] = round(float(duration), 3)
    return items


def prediction_score(items: Sequence[dict[str, Any]]) -> float:
    """Return the mean score over regions (one score per region id), 0.0 when empty."""
    by_region: dict[str, float] = {}
    for item in items:
        by_region.setdefault(str(item.get("id")), float(item.get("score", 0.0)))
    if not by_region:
        return 0.0
    return float(sum(by_region.values()) / len(by_region))
