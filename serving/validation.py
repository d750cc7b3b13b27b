"""Check Label Studio result items against a labeling config: every region before it leaves, and import files.

The runtime calls `filter_valid` on every prediction, so the config is parsed once into a `ConfigSchema`
(cached by config text) and each item costs a few dict look-ups. The checks follow Label Studio's
pre-annotation troubleshooting list: names and types, labels, linked per-region items, image sizes,
coordinate ranges, brush RLE length, span offsets, scores and model_version.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from serving.errors import ConfigError

log = logging.getLogger(__name__)

# Slack on percent coordinates: float noise from pixel -> percent conversion must not drop a region.
EPS_PCT = 1e-3
HI_PCT = 100.0 + EPS_PCT
IMAGE_OBJECTS = frozenset({"Image"})
# Objects whose Labels items are regions themselves (spans, segments) rather than labels of a geometry.
SPAN_TEXT_OBJECTS = frozenset({"Text"})
GEOMETRY_TYPES = frozenset(
    {
        "rectangle",
        "rectanglelabels",
        "polygon",
        "polygonlabels",
        "ellipse",
        "ellipselabels",
        "keypoint",
        "keypointlabels",
        "brush",
        "brushlabels",
        "bitmask",
        "bitmasklabels",
        "videorectangle",
    }
)
# Controls whose value carries a label list under the lower-cased tag name (Choices under "choices").
_NOT_LABELED = frozenset({"Taxonomy"})
_GEOMETRY_KEYS = ("x", "y", "width", "height", "points", "rle", "radiusX", "radiusY")


@dataclass(frozen=True)
class Problem:
    """One problem in a result item or prediction, with a message that says how to fix it."""

    task: int | None
    region_id: str | None
    from_name: str | None
    code: str
    message: str
    severity: str = "error"  # "error" | "warning"
    task_id: Any = None  # the Label Studio task id, when the task had one

    def __str__(self) -> str:
        """Return a one-line description: where, code, message."""
        where = []
        if self.task is not None:
            where.append(f"task #{self.task}" + (f" (id {self.task_id})" if self.task_id is not None else ""))
        if self.region_id is not None:
            where.append(f"region {self.region_id!r}")
        if self.from_name is not None:
            where.append(f"[{self.from_name}]")
        prefix = " ".join(where)
        return f"{prefix + ': ' if prefix else ''}{self.severity} {self.code}: {self.message}"


@dataclass(frozen=True)
class ObjectInfo:
    """An object tag of the config (Image, Text...)."""

    name: str
    tag: str
    value_key: str  # the task data key ($image -> "image"); "" when the value is not a variable
    is_url: bool  # valueType="url": the data value is a link, not inline text
    attrs: Mapping[str, str] = field(default_factory=dict)  # the tag's attributes, keys lower-cased


@dataclass(frozen=True)
class ControlInfo:
    """A control tag of the config, with what its items must look like."""

    name: str
    tag: str
    to_names: tuple[str, ...]
    types: frozenset[str]
    label_key: str | None  # the value key holding labels ("rectanglelabels", "labels", "choices")
    labels: frozenset[str] | None  # allowed labels (values and aliases); None = not checked
    labels_text: str  # for messages
    dynamic_key: str | None  # value="$options": labels come from task data
    per_region: bool
    single_choice: bool

    @property
    def expected_type(self) -> str:
        """Return the result type Label Studio uses for this control."""
        return self.tag.lower()


@dataclass(frozen=True)
class ConfigSchema:
    """What a labeling config allows, pre-computed once per config."""

    controls: Mapping[str, ControlInfo]
    objects: Mapping[str, ObjectInfo]
    config_hash: str = ""
    control_list: str = field(default="", compare=False)

    @classmethod
    def from_config(cls, label_config: str) -> ConfigSchema:
        """Parse a labeling config (cached by its text); raise ConfigError on invalid XML."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise ConfigError(
                "the labeling config is empty: pass the project's XML config (<View>...</View>)"
            )
        return _schema_cached(label_config)

    def image_keys(self) -> list[str]:
        """Return the task data keys of the config's Image objects, in config order."""
        return [o.value_key for o in self.objects.values() if o.tag in IMAGE_OBJECTS and o.value_key]

    def data_keys(self) -> list[tuple[str, str]]:
        """Return (object name, data key) of every object a control points to."""
        used = {n for c in self.controls.values() for n in c.to_names}
        return [(o.name, o.value_key) for o in self.objects.values() if o.name in used and o.value_key]


@functools.lru_cache(maxsize=64)
def sdk_tags(label_config: str) -> tuple[list[Any], list[Any]]:
    """Parse a config once with the SDK's LabelInterface; return its object and control tags (read-only)."""
    try:
        from label_studio_sdk.label_interface import LabelInterface

        interface = LabelInterface(label_config)
        return list(interface.objects), list(interface.controls)
    except Exception as exc:  # the SDK raises several types for bad XML
        raise ConfigError(f"the labeling config is not valid XML: {str(exc)[:300]}") from exc


@functools.lru_cache(maxsize=64)
def _schema_cached(label_config: str) -> ConfigSchema:
    import hashlib

    sdk_objects, sdk_controls = sdk_tags(label_config)

    objects: dict[str, ObjectInfo] = {}
    for obj in sdk_objects:
        value = str(obj.value or "")
        attrs = dict(obj.attr or {})
        objects[obj.name] = ObjectInfo(
            name=obj.name,
            tag=obj.tag,
            value_key=value[1:] if value.startswith("$") else "",
            is_url=str(attrs.get("valueType", "")).lower() == "url",
            attrs={str(k).lower(): str(v) for k, v in attrs.items()},
        )

    controls: dict[str, ControlInfo] = {}
    for ctrl in sdk_controls:
        attrs = {k.lower(): str(v) for k, v in (ctrl.attr or {}).items()}
        tag = ctrl.tag
        label_key: str | None = None
        labels: frozenset[str] | None = None
        if (tag.endswith("Labels") or tag == "Choices") and tag not in _NOT_LABELED:
            label_key = tag.lower()
            allowed: set[str] = set()
            for alias, label_tag in (getattr(ctrl, "labels_attrs", None) or {}).items():
                allowed.add(str(alias))
                original = (label_tag.attr or {}).get("value")
                if original is not None:
                    allowed.add(str(original))
            labels = frozenset(allowed)
        value_attr = attrs.get("value", "")
        dynamic_key = value_attr[1:] if value_attr.startswith("$") else None
        if dynamic_key:
            labels = labels or None
        controls[ctrl.name] = ControlInfo(
            name=ctrl.name,
            tag=tag,
            to_names=tuple(ctrl.to_name or ()),
            types=frozenset({tag.lower()}),
            label_key=label_key,
            labels=labels,
            labels_text=", ".join(sorted(labels)) if labels else "none",
            dynamic_key=dynamic_key,
            per_region=attrs.get("perregion", "").lower() in {"true", "1", "yes"},
            single_choice=tag == "Choices"
            and attrs.get("choice", "single").lower() in {"single", "single-radio"},
        )
    digest = hashlib.sha1(label_config.encode("utf-8", "replace")).hexdigest()[:16]
    listing = ", ".join(f"{c.name} ({c.tag})" for c in controls.values()) or "none"
    return ConfigSchema(controls=controls, objects=objects, config_hash=digest, control_list=listing)


def _is_number(value: Any) -> TypeGuard[int | float]:
    """Return True for a finite int/float (not bool, NaN or inf)."""
    t = type(value)
    if t is float:
        return value - value == 0.0  # False for NaN and inf
    if t is int:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Checker:
    """Collect the problems of one list of items (one prediction or annotation)."""

    def __init__(
        self,
        schema: ConfigSchema,
        task_data: Mapping[str, Any] | None,
        task: int | None,
        task_id: Any,
        deep: bool,
    ) -> None:
        self.schema = schema
        self.task_data = task_data
        self.task = task
        self.task_id = task_id
        self.deep = deep

    def problem(
        self, item: Mapping[str, Any] | None, code: str, message: str, severity: str = "error"
    ) -> Problem:
        region = item.get("id") if isinstance(item, dict) else None
        from_name = item.get("from_name") if isinstance(item, dict) else None
        return Problem(
            task=self.task,
            region_id=None if region is None else str(region),
            from_name=from_name if isinstance(from_name, str) else None,
            code=code,
            message=message,
            severity=severity,
            task_id=self.task_id,
        )

    # ---- one item ----
    def item(self, item: Any, region_items: Mapping[str, set[str]], ids: set[str]) -> list[Problem]:
        if not isinstance(item, dict):
            return [
                self.problem(None, "bad_item", f"a result item must be an object, got {type(item).__name__}")
            ]
        if item.get("type") == "relation":
            return self.relation(item, ids)
        from_name = item.get("from_name")
        control = self.schema.controls.get(from_name) if isinstance(from_name, str) else None
        if control is None:
            return [
                self.problem(
                    item,
                    "unknown_from_name",
                    f"from_name {from_name!r} is not a control tag of the labeling config "
                    f"(controls: {self.schema.control_list}); set from_name to one of them",
                )
            ]
        out: list[Problem] = []
        to_name = item.get("to_name")
        if to_name not in control.to_names:
            targets = " or ".join(repr(n) for n in control.to_names) or "nothing"
            out.append(
                self.problem(
                    item,
                    "wrong_to_name",
                    f'to_name {to_name!r} is not the object <{control.tag} name="{control.name}"> points to '
                    f"(toName={targets}); set to_name to {targets}",
                )
            )
        type_ = item.get("type")
        if type_ not in control.types:
            out.append(
                self.problem(
                    item,
                    "wrong_type",
                    f'type {type_!r} does not match <{control.tag} name="{control.name}">; '
                    f"set type to {control.expected_type!r}",
                )
            )
        if "score" in item and not _is_number(item["score"]):
            out.append(
                self.problem(
                    item, "bad_score", f"score {item['score']!r} is not a number; use a float in [0, 1]"
                )
            )
        value = item.get("value")
        if not isinstance(value, dict):
            out.append(self.problem(item, "missing_value", "the item has no 'value' object; add value={...}"))
            return out
        obj = self.schema.objects.get(to_name) if isinstance(to_name, str) else None
        if obj is None and control.to_names:
            obj = self.schema.objects.get(control.to_names[0])
        out.extend(self.labels(item, control, value))
        if type_ == "textarea" or control.tag == "TextArea":
            text = value.get("text")
            if not (
                isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
            ):
                out.append(
                    self.problem(item, "bad_value", "a textarea item needs value.text as a list of strings")
                )
        needs_region = control.per_region or (
            control.tag == "Labels" and obj is not None and obj.tag in IMAGE_OBJECTS
        )
        if needs_region:
            out.extend(self.linked(item, control, region_items))
        if obj is not None and obj.tag in IMAGE_OBJECTS:
            out.extend(self.image_geometry(item, control, value))
        elif obj is not None and obj.tag in SPAN_TEXT_OBJECTS and control.tag.endswith("Labels"):
            out.extend(self.span(item, obj, value))
        elif obj is not None and obj.tag == "HyperText" and control.tag.endswith("Labels"):
            out.extend(self.hypertext_span(item, obj, value))
        elif obj is not None and obj.tag == "Paragraphs" and control.tag.endswith("Labels"):
            out.extend(self.paragraph_span(item, obj, value))
        return out

    def relation(self, item: Mapping[str, Any], ids: set[str]) -> list[Problem]:
        out = []
        for key in ("from_id", "to_id"):
            ref = item.get(key)
            if ref is None or str(ref) not in ids:
                out.append(
                    self.problem(
                        item,
                        "bad_relation",
                        f"relation {key} {ref!r} is not the id of a region in this result; "
                        "point it at an existing region id",
                    )
                )
        return out

    def labels(
        self, item: Mapping[str, Any], control: ControlInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        key = control.label_key
        if key is None:
            return []
        raw = value.get(key)
        if raw is None:
            example = next(iter(sorted(control.labels or ())), "Label")
            return [
                self.problem(
                    item,
                    "missing_label",
                    f'value has no {key!r} list for <{control.tag} name="{control.name}">; '
                    f"add value[{key!r}] = [{example!r}]",
                )
            ]
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            return [
                self.problem(
                    item, "bad_label", f"value[{key!r}] must be a list of strings, got {raw!r}"[:300]
                )
            ]
        out = []
        if not raw:
            out.append(
                self.problem(item, "missing_label", f"value[{key!r}] is empty; give at least one label")
            )
        allowed = control.labels
        if control.dynamic_key and self.task_data is not None:
            allowed = _dynamic_labels(self.task_data.get(control.dynamic_key))
        if allowed is not None:
            child = "Choice" if control.tag == "Choices" else "Label"
            for label in raw:
                if label not in allowed:
                    out.append(
                        self.problem(
                            item,
                            "unknown_label",
                            f"label {label!r} is not in {control.tag} {control.name!r} "
                            f"(labels: {control.labels_text if allowed is control.labels else ', '.join(sorted(allowed))}); "
                            f'add <{child} value="{label}"/> or map the model\'s label to an existing one '
                            "with predicted_values",
                        )
                    )
        if control.single_choice and len(raw) > 1:
            out.append(
                self.problem(
                    item,
                    "too_many_choices",
                    f'{len(raw)} choices on single-choice <Choices name="{control.name}">; keep one, '
                    'or set choice="multiple" on the tag',
                )
            )
        return out

    def linked(
        self, item: Mapping[str, Any], control: ControlInfo, region_items: Mapping[str, set[str]]
    ) -> list[Problem]:
        region_id = item.get("id")
        if region_id is None:
            return [
                self.problem(
                    item,
                    "missing_geometry",
                    f"a per-region {item.get('type')!r} item has no id; give it the id of the region it describes",
                )
            ]
        if not region_items.get(str(region_id)):
            return [
                self.problem(
                    item,
                    "missing_geometry",
                    f'{item.get("type")!r} item {str(region_id)!r} of <{control.tag} name="{control.name}"> has no '
                    "region (rectangle/polygon/... or span) with the same id; add the geometry item with this id, "
                    "or give this item the id of its region",
                )
            ]
        return []

    def image_geometry(
        self, item: Mapping[str, Any], control: ControlInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        type_ = str(item.get("type", ""))
        has_geometry = type_ in GEOMETRY_TYPES or any(k in value for k in _GEOMETRY_KEYS)
        if not has_geometry:
            return []
        out: list[Problem] = []
        ow: Any = item.get("original_width")
        oh: Any = item.get("original_height")
        size_ok = _is_number(ow) and _is_number(oh) and ow > 0 and oh > 0
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
        kind = "keypoint" if type_.startswith("keypoint") else "ellipse" if "radiusX" in value else "rect"
        coords = {}
        for key in ("x", "y"):
            v = value.get(key)
            if not _is_number(v):
                out.append(
                    self.problem(
                        item, "bad_coordinates", f"value.{key} {v!r} is not a number (percent 0-100)"
                    )
                )
                return out
            coords[key] = float(v)
        for key in ("x", "y"):
            if not -EPS_PCT <= coords[key] <= HI_PCT:
                out.append(self._range(item, f"value.{key}", coords[key]))
        if kind == "ellipse":
            for key in ("radiusX", "radiusY"):
                v = value.get(key)
                if not _is_number(v) or not 0.0 <= float(v) <= HI_PCT:
                    out.append(self._range(item, f"value.{key}", v))
            return out
        if kind == "keypoint":
            w = value.get("width")
            if w is not None and (not _is_number(w) or float(w) < 0):
                out.append(self._range(item, "value.width", w))
            return out
        dims = {}
        for key in ("width", "height"):
            v = value.get(key)
            if not _is_number(v):
                out.append(
                    self.problem(
                        item, "bad_coordinates", f"value.{key} {v!r} is not a number (percent 0-100)"
                    )
                )
                return out
            dims[key] = float(v)
            if not -EPS_PCT <= dims[key] <= HI_PCT:
                out.append(self._range(item, f"value.{key}", dims[key]))
        rotation = value.get("rotation", 0) or 0
        if not _is_number(rotation):
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
        elif size_ok:
            out.extend(self._rotated(item, coords, dims, float(rotation), float(ow), float(oh)))
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
        rad = math.radians(rotation)
        cos, sin = math.cos(rad), math.sin(rad)
        x0, y0 = coords["x"] * ow / 100.0, coords["y"] * oh / 100.0
        w, h = dims["width"] * ow / 100.0, dims["height"] * oh / 100.0
        # one pixel of slack: rotated corners of boxes touching the border round either way
        for dx, dy in ((w, 0.0), (w, h), (0.0, h)):
            px = x0 + dx * cos - dy * sin
            py = y0 + dx * sin + dy * cos
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
                if type(p) not in (list, tuple) or len(p) != 2 or not (_is_number(p[0]) and _is_number(p[1])):
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

    def span(self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]) -> list[Problem]:
        start, end = value.get("start"), value.get("end")
        if (
            not (isinstance(start, int) and isinstance(end, int))
            or isinstance(start, bool)
            or isinstance(end, bool)
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    f"a text span needs integer value.start and value.end (character offsets), got {start!r}, {end!r}",
                )
            ]
        if not 0 <= start < end:
            return [
                self.problem(
                    item, "bad_span", f"span [{start}, {end}) is empty or negative; need 0 <= start < end"
                )
            ]
        text = None
        if self.task_data is not None and obj.value_key and not obj.is_url:
            raw = self.task_data.get(obj.value_key)
            if isinstance(raw, str) and not raw.startswith(
                ("http://", "https://", "/data/", "s3://", "gs://")
            ):
                text = raw
        if text is None:
            return []
        if end > len(text) and end > _utf16_len(text):
            return [
                self.problem(
                    item,
                    "bad_span",
                    f"span end {end} is past the end of the task text ({len(text)} characters)",
                )
            ]
        span_text = value.get("text")
        if span_text is None:
            return []
        if span_text != text[start:end] and span_text != _utf16_slice(text, start, end):
            return [
                self.problem(
                    item,
                    "span_mismatch",
                    f"value.text {str(span_text)[:60]!r} is not text[{start}:{end}] = {text[start:end][:60]!r}; "
                    "fix start/end, or set value.text to the text at those offsets",
                )
            ]
        return []

    def hypertext_span(
        self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check an XPath range: both paths resolve in the document as shown, offsets inside their nodes, text."""
        from serving import hypertext

        start, end = value.get("start"), value.get("end")
        soff, eoff = value.get("startOffset"), value.get("endOffset")
        if not (isinstance(start, str) and isinstance(end, str)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (soff, eoff)
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    'a HyperText span needs value.start/value.end as XPaths of text nodes ("/p[1]/text()[1]") '
                    f"and integer value.startOffset/value.endOffset, got {start!r}, {soff!r}, {end!r}, {eoff!r}"[
                        :400
                    ],
                )
            ]
        offsets = value.get("globalOffsets")
        if offsets is not None and not (
            isinstance(offsets, Mapping)
            and all(
                isinstance(offsets.get(k), int) and not isinstance(offsets.get(k), bool)
                for k in ("start", "end")
            )
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    f"value.globalOffsets must be {{'start': int, 'end': int}}, got {offsets!r}"[:300],
                )
            ]
        html = self._object_text(obj)
        if html is None:
            return []
        inline, encoding, _ = hypertext.object_options(obj.attrs)
        try:
            doc = hypertext.parse_html(hypertext.decode_value(html, encoding), inline)
        except ValueError as exc:
            return [
                self.problem(
                    item, "bad_data", f"the task's HyperText value does not decode as {encoding}: {exc}"
                )
            ]
        out: list[Problem] = []
        points = []
        for path, offset in ((start, soff), (end, eoff)):
            if doc.node_index(path) is None:
                out.append(
                    self.problem(
                        item,
                        "xpath_not_found",
                        f"XPath {path!r} does not resolve to a text node of the document as Label Studio shows it "
                        "(after dropping scripts, iframes and comments; inside <body>, or the <div> with "
                        'inline="true"); compute XPaths on the task\'s HTML exactly as stored',
                    )
                )
                continue
            try:
                points.append(doc.global_offset(path, offset))
            except ValueError as exc:
                out.append(
                    self.problem(item, "offset_outside_node", f"{exc}; offsets count UTF-16 code units")
                )
        if out:
            return out
        g0, g1 = points
        if g0 >= g1:
            return [
                self.problem(
                    item, "bad_span", f"the range is empty or reversed (global offsets {g0} to {g1})"
                )
            ]
        if offsets is not None and (offsets["start"], offsets["end"]) != (g0, g1):
            out.append(
                self.problem(
                    item,
                    "global_offsets_mismatch",
                    f"globalOffsets {offsets['start']}..{offsets['end']} differ from the XPath range's {g0}..{g1} "
                    "(code points over every text node, <br> counting 1); Label Studio uses the XPaths",
                    "warning",
                )
            )
        text = value.get("text")
        if isinstance(text, str):
            shown = doc.text_between(g0, g1)
            if not hypertext.same_text(text, shown):
                out.append(
                    self.problem(
                        item,
                        "span_mismatch",
                        f"value.text {text[:60]!r} is not the text of the range, {shown[:60]!r}; the offsets point "
                        "elsewhere (HTML changed, e.g. minified, or offsets counted in code points, not UTF-16)",
                    )
                )
        return out

    def paragraph_span(
        self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check a Paragraphs range: paragraph indices, UTF-16 offsets inside them, and the text."""
        from serving import hypertext

        raw_index = {k: value.get(k) for k in ("start", "end")}
        soff, eoff = value.get("startOffset"), value.get("endOffset")
        index: dict[str, int] = {}
        for key, raw in raw_index.items():
            if isinstance(raw, str) and raw.strip().isdigit():
                index[key] = int(raw)
            elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
                index[key] = raw
        if len(index) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in (soff, eoff)):
            return [
                self.problem(
                    item,
                    "bad_span",
                    'a Paragraphs span needs value.start/value.end as paragraph indices ("2") and integer '
                    f"value.startOffset/value.endOffset, got {raw_index['start']!r}, {soff!r}, "
                    f"{raw_index['end']!r}, {eoff!r}"[:400],
                )
            ]
        out: list[Problem] = []
        if not all(isinstance(v, str) for v in raw_index.values()):
            out.append(
                self.problem(
                    item,
                    "paragraph_index_type",
                    'Label Studio\'s editor stores paragraph indices as strings ("2"); use strings',
                    "warning",
                )
            )
        i0, i1 = index["start"], index["end"]
        assert isinstance(soff, int) and isinstance(eoff, int)
        if (i1, eoff) <= (i0, soff):
            return [*out, self.problem(item, "bad_span", "the range is empty or reversed")]
        if self.task_data is None or not obj.value_key or obj.is_url:
            return out
        data = self.task_data.get(obj.value_key)
        if not isinstance(data, list):
            return out
        try:
            texts = hypertext.paragraph_texts(data, obj.attrs.get("textkey") or "text")
        except ValueError as exc:
            return [*out, self.problem(item, "bad_data", str(exc))]
        for i in (i0, i1):
            if i >= len(texts):
                return [
                    *out,
                    self.problem(
                        item,
                        "paragraph_out_of_range",
                        f"paragraph {i} does not exist: the task has {len(texts)} paragraphs (indices from 0)",
                    ),
                ]
        for i, offset in ((i0, soff), (i1, eoff)):
            size = hypertext.utf16_len(texts[i])
            if not 0 <= offset <= size:
                out.append(
                    self.problem(
                        item,
                        "offset_outside_node",
                        f"offset {offset} is outside paragraph {i} ({size} UTF-16 code units: {texts[i][:40]!r})",
                    )
                )
        if out and any(p.severity == "error" for p in out):
            return out
        text = value.get("text")
        if isinstance(text, str):
            if i0 == i1:
                shown = _utf16_slice(texts[i0], soff, eoff)
            else:
                shown = "".join(
                    [
                        _utf16_slice(texts[i0], soff, None),
                        *texts[i0 + 1 : i1],
                        _utf16_slice(texts[i1], 0, eoff),
                    ]
                )
            if not hypertext.same_text(text, shown):
                out.append(
                    self.problem(
                        item,
                        "span_mismatch",
                        f"value.text {text[:60]!r} is not the text of the range, {shown[:60]!r}; offsets count "
                        "UTF-16 code units inside the paragraph's text",
                    )
                )
        return out

    def _object_text(self, obj: ObjectInfo) -> str | None:
        """Return the object's inline task value (None when unknown here: a URL, or no task data)."""
        if self.task_data is None or not obj.value_key or obj.is_url:
            return None
        raw = self.task_data.get(obj.value_key)
        return raw if isinstance(raw, str) else None

    def _range(self, item: Mapping[str, Any], what: str, value: Any) -> Problem:
        return self.problem(
            item,
            "out_of_range",
            f"{what} = {value!r} is outside [0, 100]; coordinates are percent of the original image: "
            "divide pixels by original_width/original_height and multiply by 100, clamped to the image",
        )


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


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _utf16_slice(text: str, start: int, end: int | None) -> str:
    """Return text[start:end] in UTF-16 code units (the offsets Label Studio's browser editor uses)."""
    stop = None if end is None else 2 * end
    return text.encode("utf-16-le")[2 * start : stop].decode("utf-16-le", errors="replace")


def _dynamic_labels(raw: Any) -> frozenset[str] | None:
    """Return the labels of a dynamic value="$options" list ([{"value": ...}, ...]), or None when unknown."""
    if not isinstance(raw, list):
        return None
    out = set()
    for entry in raw:
        if isinstance(entry, Mapping) and "value" in entry:
            out.add(str(entry["value"]))
            if "alias" in entry:
                out.add(str(entry["alias"]))
        elif isinstance(entry, str):
            out.add(entry)
    return frozenset(out)


def _region_index(schema: ConfigSchema, items: list[Any]) -> tuple[dict[str, set[str]], set[str]]:
    """Return {id: types of region-defining items with that id} and every id present."""
    regions: dict[str, set[str]] = {}
    ids: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or item.get("id") is None:
            continue
        rid = str(item["id"])
        ids.add(rid)
        type_ = item.get("type")
        if type_ in GEOMETRY_TYPES:
            regions.setdefault(rid, set()).add(type_)
            continue
        control = schema.controls.get(str(item.get("from_name")))
        obj = schema.objects.get(str(item.get("to_name")))
        # a Labels span on text/audio/... is itself a region
        spans = control is not None and control.tag.endswith("Labels") and not control.per_region
        if spans and (obj is None or obj.tag not in IMAGE_OBJECTS):
            regions.setdefault(rid, set()).add(str(type_))
    return regions, ids


def _check(
    schema: ConfigSchema,
    items: Any,
    task_data: Mapping[str, Any] | None,
    task: int | None,
    task_id: Any = None,
    deep: bool = False,
) -> list[list[Problem]]:
    """Return the problems of each item, aligned with items."""
    checker = _Checker(schema, task_data, task, task_id, deep)
    regions, ids = _region_index(schema, items)
    per_item = [checker.item(item, regions, ids) for item in items]
    seen: dict[tuple[Any, str], int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("id") is None or item.get("type") == "relation":
            continue
        key = (item.get("from_name"), str(item["id"]))
        if key in seen:
            per_item[i].append(
                checker.problem(
                    item,
                    "duplicate_id",
                    f"two items of {item.get('from_name')!r} share id {str(item['id'])!r}; give each region its own id",
                )
            )
        else:
            seen[key] = i
    return per_item


def check_items(
    schema: ConfigSchema,
    items: list[dict[str, Any]],
    task_data: Mapping[str, Any] | None = None,
    task: int | None = None,
    *,
    task_id: Any = None,
    deep: bool = False,
) -> list[Problem]:
    """Return every problem of a result list (one prediction's or annotation's items)."""
    if not isinstance(items, list):
        return [
            Problem(
                task, None, None, "bad_result", "'result' must be a list of region items", task_id=task_id
            )
        ]
    return [p for problems in _check(schema, items, task_data, task, task_id, deep) for p in problems]


def filter_valid(
    schema: ConfigSchema,
    items: list[dict[str, Any]],
    task_data: Mapping[str, Any] | None = None,
    task: int | None = None,
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Drop invalid items (and the items linked to a dropped region); log a warning per problem."""
    per_item = _check(schema, items, task_data, task)
    problems = [p for ps in per_item for p in ps]
    if not problems:
        return items, []
    bad = {i for i, ps in enumerate(per_item) if any(p.severity == "error" for p in ps)}
    regions, _ = _region_index(schema, items)
    dropped_regions = {
        str(items[i]["id"])
        for i in bad
        if isinstance(items[i], dict)
        and items[i].get("id") is not None
        and str(items[i]["id"]) in regions
        and (items[i].get("type") in GEOMETRY_TYPES or items[i].get("type") in regions[str(items[i]["id"])])
    }
    kept = []
    for i, item in enumerate(items):
        if i in bad:
            continue
        if isinstance(item, dict) and item.get("id") is not None and str(item["id"]) in dropped_regions:
            problems.append(
                Problem(
                    task,
                    str(item["id"]),
                    item.get("from_name") if isinstance(item.get("from_name"), str) else None,
                    "linked_region_dropped",
                    "dropped with its region, which was invalid",
                    "warning",
                )
            )
            continue
        kept.append(item)
    for p in problems:
        log.warning("dropping invalid region: %s", p)
    return kept, problems


def check_prediction(
    schema: ConfigSchema,
    prediction: Mapping[str, Any],
    task_data: Mapping[str, Any] | None = None,
    task: int | None = None,
    *,
    task_id: Any = None,
    deep: bool = False,
    require_version: bool = True,
) -> list[Problem]:
    """Return the problems of one prediction: its items, model_version, and a numeric score."""
    if not isinstance(prediction, Mapping):
        return [
            Problem(
                task,
                None,
                None,
                "bad_prediction",
                "a prediction must be an object with 'result'",
                task_id=task_id,
            )
        ]
    out: list[Problem] = []
    if require_version:
        version = prediction.get("model_version")
        if not isinstance(version, str) or not version:
            out.append(
                Problem(
                    task,
                    None,
                    None,
                    "missing_model_version",
                    'the prediction has no model_version; add "model_version": "<name-of-your-model>" so Label '
                    "Studio can tell model versions apart",
                    task_id=task_id,
                )
            )
        if "score" not in prediction:
            out.append(
                Problem(
                    task,
                    None,
                    None,
                    "missing_score",
                    "the prediction has no score; add a numeric score (e.g. the mean of its region scores) so the "
                    "Data Manager can sort by confidence",
                    "warning",
                    task_id=task_id,
                )
            )
    if "score" in prediction and not _is_number(prediction["score"]):
        out.append(
            Problem(
                task,
                None,
                None,
                "bad_score",
                f"score {prediction['score']!r} is not a number; Label Studio answers 400 and the task can no longer "
                "be opened: use a float",
                task_id=task_id,
            )
        )
    result = prediction.get("result")
    if result is None:
        out.append(
            Problem(
                task, None, None, "missing_result", "the prediction has no 'result' list", task_id=task_id
            )
        )
        return out
    out.extend(check_items(schema, result, task_data, task, task_id=task_id, deep=deep))
    return out


def iter_file_problems(schema: ConfigSchema, tasks: Iterable[Any], deep: bool = True) -> Iterator[Problem]:
    """Yield the problems of an import file's tasks (data + predictions and/or annotations), task by task."""
    data_keys = schema.data_keys()
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            yield Problem(
                index, None, None, "bad_task", f"a task must be an object, got {type(task).__name__}"
            )
            continue
        task_id = task.get("id")
        data = task.get("data")
        if not isinstance(data, Mapping):
            yield Problem(
                index,
                None,
                None,
                "missing_data",
                "the task has no 'data' object; wrap the task's fields in "
                '{"data": {...}, "predictions": [...]}',
                task_id=task_id,
            )
            continue
        for obj_name, key in data_keys:
            if key not in data:
                present = ", ".join(sorted(map(str, data))[:10]) or "none"
                yield Problem(
                    index,
                    None,
                    None,
                    "missing_data_key",
                    f'task data has no key {key!r} for object {obj_name!r} (the config\'s value="${key}"); '
                    f"keys present: {present}",
                    task_id=task_id,
                )
        for field_name, is_prediction in (("predictions", True), ("annotations", False)):
            entries = task.get(field_name)
            if entries is None:
                continue
            if not isinstance(entries, list):
                yield Problem(
                    index, None, None, f"bad_{field_name}", f"'{field_name}' must be a list", task_id=task_id
                )
                continue
            for entry in entries:
                if is_prediction:
                    yield from check_prediction(schema, entry, data, index, task_id=task_id, deep=deep)
                elif isinstance(entry, Mapping):
                    yield from check_items(
                        schema, entry.get("result", []), data, index, task_id=task_id, deep=deep
                    )
                else:
                    yield Problem(
                        index,
                        None,
                        None,
                        "bad_annotation",
                        "an annotation must be an object",
                        task_id=task_id,
                    )


def validate_file(schema: ConfigSchema, tasks: list[dict[str, Any]]) -> list[Problem]:
    """Return every problem of a pre-annotation import file (tasks with data + predictions or annotations)."""
    return list(iter_file_problems(schema, tasks))
