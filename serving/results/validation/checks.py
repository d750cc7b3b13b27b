"""Check Label Studio result items against a labeling config: every region before it leaves the server.

The runtime calls `filter_valid` on every prediction, so the config is parsed once into a `ConfigSchema`
(cached by config text) and each item costs a few dict look-ups. The checks follow Label Studio's
pre-annotation troubleshooting list: names and types, labels, linked per-region items, image sizes,
coordinate ranges, brush RLE length, span offsets, scores and model_version (files.py checks whole
predictions and import files).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from serving.results.schema import IMAGE_OBJECTS, ConfigSchema, ControlInfo, ObjectInfo
from serving.results.validation.geometry import GeometryChecks
from serving.results.validation.problems import (
    GEOMETRY_TYPES,
    SPAN_TEXT_OBJECTS,
    Problem,
    is_number,
)
from serving.results.validation.spans import SpanChecks
from serving.results.validation.video import VideoChecks

log = logging.getLogger(__name__)


class _Checker(GeometryChecks, SpanChecks, VideoChecks):
    """Collect the problems of one list of items (one prediction or annotation)."""

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
        out = self.identity(item, control)
        to_name, type_ = item.get("to_name"), item.get("type")
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
        if type_ == "rating" or control.tag == "Rating":
            rating = value.get("rating")
            top = control.max_rating or 5
            if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= top:
                out.append(
                    self.problem(
                        item,
                        "bad_value",
                        f"a rating item needs value.rating as a whole number from 1 to {top}",
                    )
                )
        needs_region = control.per_region or (
            control.tag == "Labels" and obj is not None and obj.tag in IMAGE_OBJECTS
        )
        if needs_region:
            out.extend(self.linked(item, control, region_items))
        if obj is not None:
            out.extend(self.where(item, control, obj, value))
        return out

    def item_index(self, item: Mapping[str, Any], obj: ObjectInfo) -> list[Problem]:
        """Check the page of an item on a valueList object (<Image valueList="$pages">): item_index."""
        index = item.get("item_index")
        pages = self.task_data.get(obj.value_key) if self.task_data is not None else None
        count = len(pages) if isinstance(pages, list) else None
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or index < 0
            or (count is not None and index >= count)
        ):
            where = f"0 to {count - 1}" if count else "a page index from 0"
            return [
                self.problem(
                    item,
                    "bad_item_index",
                    f'<{obj.tag} name="{obj.name}"> shows a list of {obj.value_key!r}: its items need '
                    f"item_index, the page ({where}), got {index!r}",
                )
            ]
        return []

    def where(
        self, item: Mapping[str, Any], control: ControlInfo, obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check where the item lies in its object: its page, geometry on an image, a span on a text."""
        pages = self.item_index(item, obj) if obj.attrs.get("valuelist") else []
        return pages + self._where_in(item, control, obj, value)

    def _where_in(
        self, item: Mapping[str, Any], control: ControlInfo, obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        if obj.tag in IMAGE_OBJECTS:
            return self.image_geometry(item, control, value)
        if obj.tag == "Video":
            return self.video_region(item, control, obj, value)
        if not control.tag.endswith("Labels"):
            return []
        if obj.tag in SPAN_TEXT_OBJECTS:
            return self.span(item, obj, value)
        if obj.tag == "HyperText":
            return self.hypertext_span(item, obj, value)
        if obj.tag == "Paragraphs":
            return self.paragraph_span(item, obj, value)
        return []

    def identity(self, item: Mapping[str, Any], control: ControlInfo) -> list[Problem]:
        """Check what names the item's tags and kind: to_name, type, and a numeric score."""
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
        if "score" in item and not is_number(item["score"]):
            out.append(
                self.problem(
                    item, "bad_score", f"score {item['score']!r} is not a number; use a float in [0, 1]"
                )
            )
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
