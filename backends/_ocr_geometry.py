"""Pure geometry of OCR lines: reading order, fragment merging, crops of drawn regions, line bands.

Pixel units throughout; percent conversion happens only in serving/results/regions.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from serving.results.regions import rect_corners_px


@dataclass(frozen=True)
class Line:
    """One recognised text line: its quad (tl, tr, br, bl in pixels), text and confidence in [0, 1]."""

    quad_px: np.ndarray
    text: str
    score: float

    @property
    def top(self) -> float:
        """Return the smallest y of the quad."""
        return float(self.quad_px[:, 1].min())

    @property
    def bottom(self) -> float:
        """Return the largest y of the quad."""
        return float(self.quad_px[:, 1].max())

    @property
    def left(self) -> float:
        """Return the smallest x of the quad."""
        return float(self.quad_px[:, 0].min())

    @property
    def right(self) -> float:
        """Return the largest x of the quad."""
        return float(self.quad_px[:, 0].max())

    @property
    def height(self) -> float:
        """Return the height of the quad's bounding box."""
        return self.bottom - self.top

    @property
    def angle_deg(self) -> float:
        """Return the angle of the top edge (tl -> tr), clockwise positive, in (-180, 180]."""
        (x0, y0), (x1, y1) = self.quad_px[0], self.quad_px[1]
        return math.degrees(math.atan2(y1 - y0, x1 - x0))


def box_quad(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Return the quad (tl, tr, br, bl) of an axis-aligned pixel box."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def is_axis_aligned(quad_px: np.ndarray, tol_px: float = 0.5) -> bool:
    """Return True when the quad is an axis-aligned rectangle."""
    q = np.asarray(quad_px, dtype=np.float64)
    return bool(
        abs(q[0, 1] - q[1, 1]) <= tol_px
        and abs(q[3, 1] - q[2, 1]) <= tol_px
        and abs(q[0, 0] - q[3, 0]) <= tol_px
        and abs(q[1, 0] - q[2, 0]) <= tol_px
    )


def clip_quad(quad_px: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Clip an axis-aligned quad to the image (rotated quads are left alone: clipping would skew them)."""
    if not is_axis_aligned(quad_px):
        return np.asarray(quad_px, dtype=np.float64)
    width, height = size
    q = np.asarray(quad_px, dtype=np.float64).copy()
    q[:, 0] = np.clip(q[:, 0], 0, width)
    q[:, 1] = np.clip(q[:, 1], 0, height)
    return q


def group_rows(lines: Sequence[Line], min_overlap: float = 0.5) -> list[list[Line]]:
    """Group lines into rows by vertical overlap; rows top to bottom, lines left to right."""
    rows: list[tuple[float, float, list[Line]]] = []  # (row top, row bottom, members)
    for line in sorted(lines, key=lambda ln: (ln.top, ln.left)):
        placed = False
        for index, (top, bottom, members) in enumerate(rows):
            overlap = min(bottom, line.bottom) - max(top, line.top)
            # Compare with the smaller height so that a tall word does not swallow the next row.
            if overlap >= min_overlap * max(1.0, min(bottom - top, line.height)):
                members.append(line)
                # The row's band is the mean of its members, so chained drift cannot merge two rows.
                tops = [m.top for m in members]
                bottoms = [m.bottom for m in members]
                rows[index] = (float(np.mean(tops)), float(np.mean(bottoms)), members)
                placed = True
                break
        if not placed:
            rows.append((line.top, line.bottom, [line]))
    rows.sort(key=lambda row: row[0])
    return [sorted(members, key=lambda ln: ln.left) for _, _, members in rows]


def reading_order(lines: Sequence[Line]) -> list[Line]:
    """Return lines top-to-bottom, then left-to-right within a row."""
    return [line for row in group_rows(lines) for line in row]


def merge_fragments(lines: Sequence[Line], max_gap: float = 1.0, max_angle_deg: float = 15.0) -> list[Line]:
    """Merge near-horizontal fragments of one row whose gap is under max_gap line heights; keep reading order.

    EasyOCR splits a line where one word's box comes out slanted (descenders); annotators want lines.
    """
    merged: list[Line] = []
    for row in group_rows(lines):
        current = row[0]
        for line in row[1:]:
            gap = line.left - current.right
            flat = abs(current.angle_deg) <= max_angle_deg and abs(line.angle_deg) <= max_angle_deg
            if flat and gap <= max_gap * max(current.height, line.height):
                weight_a, weight_b = max(1, len(current.text)), max(1, len(line.text))
                score = (current.score * weight_a + line.score * weight_b) / (weight_a + weight_b)
                quad = box_quad(
                    min(current.left, line.left),
                    min(current.top, line.top),
                    max(current.right, line.right),
                    max(current.bottom, line.bottom),
                )
                current = Line(quad, f"{current.text} {line.text}", float(score))
            else:
                merged.append(current)
                current = line
        merged.append(current)
    return merged


def rect_pct_to_quad_px(value: Mapping[str, Any], size: tuple[int, int]) -> np.ndarray:
    """Return the pixel quad of a Label Studio rectangle value (percent, rotated clockwise about x/y)."""
    corners = rect_corners_px(
        value["x"], value["y"], value["width"], value["height"], value.get("rotation", 0.0) or 0.0, size
    )
    return np.array(corners, dtype=np.float64)


def points_pct_to_px(points: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Return pixel points of Label Studio percent points."""
    width_px, height_px = size
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts * np.array([width_px / 100.0, height_px / 100.0])


def _tilt_deg(edge: np.ndarray) -> float:
    """Return the angle between an edge and the horizontal, in [0, 90]."""
    angle = abs(math.degrees(math.atan2(float(edge[1]), float(edge[0])))) % 180.0
    return min(angle, 180.0 - angle)


def oriented_quad(points_px: np.ndarray) -> np.ndarray:
    """Return the minimum-area quad (tl, tr, br, bl) around points, its width along the edge nearest horizontal."""
    pts = np.asarray(points_px, dtype=np.float32).reshape(-1, 2)
    box = cv2.boxPoints(cv2.minAreaRect(pts)).astype(np.float64)
    edges = [box[1] - box[0], box[2] - box[1]]
    # The edge closest to horizontal carries the text; text rotated past 45 degrees is rare in OCR work.
    u = min(edges, key=_tilt_deg)
    if u[0] < 0 or (u[0] == 0 and u[1] < 0):
        u = -u
    norm = float(np.hypot(u[0], u[1]))
    if norm == 0:
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        return box_quad(x0, y0, x1, y1)
    u = u / norm
    v = np.array([-u[1], u[0]])
    center = pts.astype(np.float64).mean(axis=0)
    proj_u = (pts - center) @ u
    proj_v = (pts - center) @ v
    u0, u1, v0, v1 = proj_u.min(), proj_u.max(), proj_v.min(), proj_v.max()
    return np.array(
        [
            center + u0 * u + v0 * v,
            center + u1 * u + v0 * v,
            center + u1 * u + v1 * v,
            center + u0 * u + v1 * v,
        ]
    )


def crop_quad(image: np.ndarray, quad_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp the quad (tl, tr, br, bl) to an upright crop; return the crop and the 2x3 affine used."""
    q = np.asarray(quad_px, dtype=np.float64)
    width = max(1, round(float(np.hypot(*(q[1] - q[0])))))
    height = max(1, round(float(np.hypot(*(q[3] - q[0])))))
    src = q[[0, 1, 3]].astype(np.float32)
    dst = np.array([[0, 0], [width, 0], [0, height]], dtype=np.float32)
    matrix = cv2.getAffineTransform(src, dst)
    crop = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return crop, matrix


def crop_polygon(image: np.ndarray, points_px: np.ndarray) -> np.ndarray:
    """Crop the oriented box around a polygon, painting pixels outside the polygon with its background."""
    crop, matrix = crop_quad(image, oriented_quad(points_px))
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    warped = pts @ matrix[:, :2].T + matrix[:, 2]
    mask = np.zeros(crop.shape[:2], dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(warped).astype(np.int32)], 255)
    inside = mask > 0
    if inside.any() and not inside.all():
        # The median inside the polygon is the paper colour for text regions; it hides neighbouring text.
        fill = np.median(crop[inside], axis=0).astype(crop.dtype)
        crop = crop.copy()
        crop[~inside] = fill
    return crop


def pad_border(image: np.ndarray, pad_px: int) -> np.ndarray:
    """Pad an image on all sides with its median border colour (recognisers like some margin)."""
    if pad_px <= 0:
        return image
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    fill = np.median(border, axis=0)
    value = [float(v) for v in np.atleast_1d(fill)]
    return cv2.copyMakeBorder(image, pad_px, pad_px, pad_px, pad_px, cv2.BORDER_CONSTANT, value=value)


def ink_mask(grey: np.ndarray) -> np.ndarray | None:
    """Return the text pixels of a grey crop (Otsu, ink is the minority class), or None when it is blank."""
    if grey.size == 0 or float(grey.std()) < 2.0:
        return None
    _, binary = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = binary == 0
    # Ink is the minority class, whatever the polarity of the text.
    return dark if dark.mean() <= 0.5 else ~dark


def text_bands(grey: np.ndarray, min_ratio: float = 0.35, join_gap: float = 0.15) -> list[tuple[int, int]]:
    """Return the row ranges [y0, y1) of the text lines in a grey crop, by horizontal projection."""
    ink = ink_mask(grey)
    if ink is None:
        return []
    rows = ink.sum(axis=1) > max(1, int(0.002 * grey.shape[1]))
    edges = np.diff(np.concatenate([[0], rows.astype(np.int8), [0]]))
    runs = list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))
    if not runs:
        return []
    # Re-attach i-dots and accents: a gap that is small next to the line height is inside one line.
    joined = [runs[0]]
    for start, end in runs[1:]:
        prev_start, prev_end = joined[-1]
        if start - prev_end <= join_gap * max(prev_end - prev_start, end - start):
            joined[-1] = (prev_start, end)
        else:
            joined.append((start, end))
    tallest = max(end - start for start, end in joined)
    # Drop specks, underlines and the clipped edge of a neighbouring line.
    return [(s, e) for s, e in joined if e - s >= min_ratio * tallest]


def tighten(grey: np.ndarray, margin_ratio: float = 0.1) -> np.ndarray:
    """Crop a one-line grey image to its ink with a margin of margin_ratio x the ink height, padding with paper.

    Recognisers are sensitive to how loosely a box was drawn; a fixed margin makes a drawn box
    read like the detector's own line crops.
    """
    ink = ink_mask(grey)
    if ink is None:
        return grey
    ys = np.flatnonzero(ink.any(axis=1))
    xs = np.flatnonzero(ink.any(axis=0))
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    margin = max(2, round(margin_ratio * (y1 - y0)))
    paper = float(np.median(grey[~ink])) if (~ink).any() else 255.0
    padded = cv2.copyMakeBorder(grey, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=paper)
    return np.ascontiguousarray(padded[y0 : y1 + 2 * margin, x0 : x1 + 2 * margin])


def plan_detection_groups(
    shapes: Sequence[tuple[int, int]], max_waste: float = 0.3, max_side: int = 2560
) -> list[list[int]]:
    """Group image indices so that padding each group to its largest size wastes under max_waste of the area.

    Padding keeps the detector's scale (top-left anchored, no resize below max_side), so one
    batched detector call serves several images of nearly the same size.
    """
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], shapes[i]))
    groups: list[list[int]] = []
    for index in order:
        h, w = shapes[index]
        if groups:
            group = groups[-1]
            gh = max(h, *(shapes[i][0] for i in group))
            gw = max(w, *(shapes[i][1] for i in group))
            real = h * w + sum(shapes[i][0] * shapes[i][1] for i in group)
            padded = gh * gw * (len(group) + 1)
            if max(gh, gw) <= max_side and real >= (1.0 - max_waste) * padded:
                group.append(index)
                continue
        groups.append([index])
    return groups


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad an image at the bottom and right to (height, width) with its median border colour."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    border = np.concatenate([image[-1], image[:, -1]], axis=0)
    value = [float(v) for v in np.atleast_1d(np.median(border, axis=0))]
    return cv2.copyMakeBorder(image, 0, height - h, 0, width - w, cv2.BORDER_CONSTANT, value=value)
