"""Image geometry checks: original size, percent ranges, rotation, polygon points, brush RLE length."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.results.regions import rect_corners_px
from serving.results.schema import ControlInfo
from serving.results.validation.problems import (
    EPS_PCT,
    GEOMETRY_KEYS,
    GEOMETRY_TYPES,
    HI_PCT,
    CheckerBase,
    Problem,
    is_number,
)


class GeometryChecks(CheckerBase):
    """Checks of regions on an Image."""

    def image_geometry(
        self, item: Mapping[str, Any], control: ControlInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        type_ = str(item.get("type", ""))
        has_geometry = type_ in GEOMETRY_TYPES or any(k in value for k in GEOMETRY_KEYS)
        if not has_geometry:
            return []
        out: list[Problem] = []
        ow: Any = item.get("original_width")
        oh: Any = item.get("original_height")
        size_ok = is_number(ow) and is_number(oh) and ow > 0 and oh > 0
        if not size_ok:
            out.append(
                self.problem(
                    item,
                    "missing_original_size",
                    "image region without positive original_width/original_height; add the image's size in "
                    "pixels as Label Studio shows it (after EXIF rotation)",
                )
            )
        if "rle" in value or type_ in {"brush", "brushlabels"}:
            out.extend(self.brush(item, value, ow if size_ok else None, oh if size_ok else None))
            return out
        if "points" in value:
            out.extend(self.points(item, value.get("points")))
            return out
        coords = self._numbers(item, value, ("x", "y"), out)
        if coords is None:
            return out
        for key in ("x", "y"):
            if not -EPS_PCT <= coords[key] <= HI_PCT:
                out.append(self._range(item, f"value.{key}", coords[key]))
        if type_.startswith("keypoint") or "radiusX" in value:
            out.extend(self._point_extent(item, value, type_))
        else:
            out.extend(self._rectangle(item, value, coords, (float(ow), float(oh)) if size_ok else None))
        return out

    def _point_extent(self, item: Mapping[str, Any], value: Mapping[str, Any], type_: str) -> list[Problem]:
        """Check the size around a keypoint (its width) or an ellipse's centre (its radii)."""
        if type_.startswith("keypoint"):
            w = value.get("width")
            if w is not None and (not is_number(w) or float(w) < 0):
                return [self._range(item, "value.width", w)]
            return []
        out = []
        for key in ("radiusX", "radiusY"):  # an ellipse
            v = value.get(key)
            if not is_number(v) or not 0.0 <= float(v) <= HI_PCT:
                out.append(self._range(item, f"value.{key}", v))
        return out

    def _numbers(
        self, item: Mapping[str, Any], value: Mapping[str, Any], keys: tuple[str, ...], out: list[Problem]
    ) -> dict[str, float] | None:
        """Return the value's fields `keys` as floats; None (and a problem in `out`) at the first that is not a number."""
        found = {}
        for key in keys:
            v = value.get(key)
            if not is_number(v):
                out.append(
                    self.problem(
                        item, "bad_coordinates", f"value.{key} {v!r} is not a number (percent 0-100)"
                    )
                )
                return None
            found[key] = float(v)
        return found

    def _rectangle(
        self,
        item: Mapping[str, Any],
        value: Mapping[str, Any],
        coords: dict[str, float],
        size: tuple[float, float] | None,
    ) -> list[Problem]:
        """Check a rectangle's size and rotation, and that it stays inside the image (rotated: in pixels)."""
        out: list[Problem] = []
        dims: dict[str, float] = {}
        for key in ("width", "height"):
            found = self._numbers(item, value, (key,), out)
            if found is None:
                return out
            dims[key] = found[key]
            if not -EPS_PCT <= dims[key] <= HI_PCT:
                out.append(self._range(item, f"value.{key}", dims[key]))
        rotation = value.get("rotation", 0) or 0
        if not is_number(rotation):
            out.append(
                self.problem(
                    item, "bad_coordinates", f"value.rotation {rotation!r} is not a number (degrees)"
                )
            )
            return out
        if abs(float(rotation) % 360.0) < 1e-9:
            if coords["x"] + dims["width"] > HI_PCT:
                out.append(self._range(item, "value.x + value.width", coords["x"] + dims["width"]))
            if coords["y"] + dims["height"] > HI_PCT:
                out.append(self._range(item, "value.y + value.height", coords["y"] + dims["height"]))
        elif size is not None:
            out.extend(self._rotated(item, coords, dims, float(rotation), *size))
        return out

    def _rotated(
        self,
        item: Mapping[str, Any],
        coords: dict[str, float],
        dims: dict[str, float],
        rotation: float,
        ow: float,
        oh: float,
    ) -> list[Problem]:
        # Label Studio rotates clockwise about the top-left corner, in pixels (percent axes differ in scale).
        corners = rect_corners_px(coords["x"], coords["y"], dims["width"], dims["height"], rotation, (ow, oh))
        # one pixel of slack: rotated corners of boxes touching the border round either way
        for px, py in corners[1:]:
            if not (-1.0 <= px <= ow + 1.0 and -1.0 <= py <= oh + 1.0):
                return [
                    self.problem(
                        item,
                        "out_of_range",
                        f"a corner of the rotated rectangle lies outside the image ({px:.1f}, {py:.1f} px of "
                        f"{ow:.0f}x{oh:.0f}); shrink or move the box so every corner is inside",
                    )
                ]
        return []

    def points(self, item: Mapping[str, Any], points: Any) -> list[Problem]:
        bad = []
        if not isinstance(points, list):
            points = None
        else:
            for p in points:
                if type(p) not in (list, tuple) or len(p) != 2 or not (is_number(p[0]) and is_number(p[1])):
                    points = None
                    break
                if not (-EPS_PCT <= p[0] <= HI_PCT and -EPS_PCT <= p[1] <= HI_PCT):
                    bad.append(p)
        if points is None:
            return [
                self.problem(item, "bad_coordinates", "value.points must be a list of [x, y] percent pairs")
            ]
        out = []
        if len(points) < 3 and str(item.get("type", "")).startswith("polygon"):
            out.append(
                self.problem(item, "bad_coordinates", f"a polygon needs at least 3 points, got {len(points)}")
            )
        if bad:
            out.append(
                self.problem(
                    item,
                    "out_of_range",
                    f"{len(bad)} point(s) outside [0, 100], e.g. {list(bad[0])}; points are percent of the "
                    "image size: clamp them to [0, 100]",
                )
            )
        return out

    def brush(self, item: Mapping[str, Any], value: Mapping[str, Any], ow: Any, oh: Any) -> list[Problem]:
        rle = value.get("rle")
        fmt = value.get("format", "rle")
        if fmt != "rle" or not isinstance(rle, list) or len(rle) < 7:
            return [
                self.problem(
                    item,
                    "bad_rle",
                    "a brush item needs value.format='rle' and value.rle as a list of bytes; encode masks with "
                    "label_studio_sdk.converter.brush.mask2rle",
                )
            ]
        if ow is None or oh is None:
            return []
        expected = int(ow) * int(oh) * 4
        head = rle[:4]
        if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in head):
            return [self.problem(item, "bad_rle", "value.rle must hold integers 0..255")]
        num = (head[0] << 24) | (head[1] << 16) | (head[2] << 8) | head[3]
        if num != expected:
            return [
                self.problem(
                    item,
                    "bad_rle",
                    f"the brush RLE holds {num} values but original_width*original_height*4 = {expected}; "
                    "encode the mask at the original image size, or fix original_width/original_height",
                )
            ]
        if self.deep:
            return self._decode(item, rle, expected)
        return []

    def _decode(self, item: Mapping[str, Any], rle: list[Any], expected: int) -> list[Problem]:
        import numpy as np

        try:
            arr = np.asarray(rle)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
                raise ValueError("values must be integers 0..255")
            decoded = rle_value_count(arr.astype(np.uint8))
            if decoded != expected:
                raise ValueError(f"decoded {decoded} values, expected {expected}")
        except Exception as exc:
            return [
                self.problem(
                    item,
                    "bad_rle",
                    f"the brush RLE does not decode ({type(exc).__name__}: {str(exc)[:120]}); re-encode the mask "
                    "with label_studio_sdk.converter.brush.mask2rle",
                )
            ]
        return []


def rle_value_count(rle: Any) -> int:
    """Walk a brush RLE stream (as label_studio_sdk's decode_rle reads it) and return how many values it holds.

    Raises ValueError when the stream ends early. Only the run headers are read, so this costs one
    step per run, and it avoids importing the SDK's converter (seconds of pandas imports).
    """
    import numpy as np

    bits = (np.unpackbits(np.asarray(rle, dtype=np.uint8)) + ord("0")).tobytes().decode("ascii")
    n_bits = len(bits)
    pos = 0

    def read(size: int) -> int:
        nonlocal pos
        if pos + size > n_bits:
            raise ValueError(f"the stream ends after {n_bits} bits, in the middle of a run")
        value = int(bits[pos : pos + size], 2)
        pos += size
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    i = 0
    while i < num:
        series = read(1)
        length = 1 + read(sizes[read(2)])
        # a series stores one word for the whole run, otherwise one word per value
        read(word if series else word * length)
        i += length
    if i != num:
        raise ValueError(f"runs cover {i} values, the header says {num}")
    return num
