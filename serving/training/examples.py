"""A Label Studio JSON export (or /train's tasks) -> `Example`s for one model, and the metrics training reports.

Cancelled and skipped annotations are dropped, the latest annotation per task kept, and every region
checked against the config (labels in the config, span offsets inside the text and matching its text).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.contract import (
    BoxPct,
    Example,
    Target,
)
from serving.errors import InputError


@dataclass
class ExportStats:
    """What the conversion kept and dropped, and why (first reasons only)."""

    tasks: int = 0
    annotated: int = 0  # tasks with at least one usable annotation
    examples: int = 0
    regions: int = 0
    dropped_regions: int = 0
    cancelled: int = 0
    reasons: list[str] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        """Count a dropped region and keep its reason (the first 20)."""
        self.dropped_regions += 1
        if len(self.reasons) < 20:
            self.reasons.append(reason)

    def as_dict(self) -> dict[str, Any]:
        """Return the counts for the job's snapshot."""
        return {
            "tasks": self.tasks,
            "annotated": self.annotated,
            "examples": self.examples,
            "regions": self.regions,
            "dropped_regions": self.dropped_regions,
            "cancelled_annotations": self.cancelled,
            "drop_reasons": self.reasons,
        }


def _stamp(annotation: Mapping[str, Any]) -> tuple[str, int]:
    when = annotation.get("updated_at") or annotation.get("created_at") or ""
    ident = annotation.get("id")
    return str(when), ident if isinstance(ident, int) else 0


def latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Return the newest annotation of a task that was neither cancelled nor skipped, or None."""
    usable = [
        a
        for a in task.get("annotations") or ()
        if isinstance(a, Mapping)
        and not a.get("was_cancelled")
        and not a.get("skipped")
        and isinstance(a.get("result"), list)
    ]
    return max(usable, key=_stamp) if usable else None


def _utf16_to_codepoints(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Convert UTF-16 offsets (Label Studio's editor) to code-point offsets, or None when out of range."""
    units = 0
    cp_start = cp_end = None
    for i, ch in enumerate(text):
        if units == start:
            cp_start = i
        if units == end:
            cp_end = i
        units += 2 if ord(ch) > 0xFFFF else 1
    if units == end:
        cp_end = len(text)
    if units == start:
        cp_start = len(text)
    if cp_start is None or cp_end is None:
        return None
    return cp_start, cp_end


def _span(value: Mapping[str, Any], text: str) -> tuple[int, int] | str:
    """Return the code-point (start, end) of a Labels value on text, or why it is not usable."""
    start, end = value.get("start"), value.get("end")
    if (
        not (isinstance(start, int) and isinstance(end, int))
        or isinstance(start, bool)
        or isinstance(end, bool)
    ):
        return f"span offsets {start!r}, {end!r} are not integers (an HTML/XPath span?)"
    if not 0 <= start < end:
        return f"span [{start}, {end}) is empty or negative"
    quoted = value.get("text")
    if end <= len(text) and (not isinstance(quoted, str) or text[start:end] == quoted):
        return start, end
    converted = _utf16_to_codepoints(text, start, end)
    if converted is not None and (not isinstance(quoted, str) or text[converted[0] : converted[1]] == quoted):
        return converted
    if end > len(text):
        return f"span [{start}, {end}) is outside the text ({len(text)} characters)"
    return f"span text {str(quoted)[:40]!r} is not the text at [{start}, {end}) ({text[start:end][:40]!r})"


def _finite(*values: Any) -> bool:
    return all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)) for v in values
    )


def _labels_in(value: Mapping[str, Any], key: str, allowed: frozenset[str]) -> list[str] | str:
    labels = value.get(key)
    if not isinstance(labels, list) or not labels:
        return f"no {key} on the region"
    bad = [str(x) for x in labels if x not in allowed]
    if bad:
        return f"label {bad[0]!r} is not in the config (has {', '.join(sorted(allowed))})"
    return [str(x) for x in labels]


def examples_from_tasks(
    tasks: Sequence[Any],
    targets: Sequence[Target],
    load_text: Callable[[str, Any], str] | None = None,
) -> tuple[list[Example], ExportStats]:
    """Turn exported tasks into training examples for the targets one model fills.

    One example per (task, target) from the task's latest usable annotation; a task whose latest
    annotation has no region for a target still teaches "nothing here" (an example without regions).
    Regions whose labels are not in the config, whose spans leave the text or disagree with it,
    or whose geometry is not finite are dropped and counted.
    """
    stats = ExportStats()
    examples: list[Example] = []
    for task in tasks:
        if not isinstance(task, Mapping):
            continue
        stats.tasks += 1
        stats.cancelled += sum(
            1 for a in task.get("annotations") or () if isinstance(a, Mapping) and a.get("was_cancelled")
        )
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        raw_data = task.get("data")
        data: Mapping[str, Any] = raw_data if isinstance(raw_data, Mapping) else {}
        made = 0
        for target in targets:
            example = _example(task, data, annotation["result"], target, stats, load_text)
            if example is not None:
                examples.append(example)
                made += 1
        if made:
            stats.annotated += 1
    stats.examples = len(examples)
    return examples, stats


def _example(
    task: Mapping[str, Any],
    data: Mapping[str, Any],
    result: Sequence[Any],
    target: Target,
    stats: ExportStats,
    load_text: Callable[[str, Any], str] | None,
) -> Example | None:
    control, obj = target.control, target.obj
    value = data.get(obj.value_key) if obj.value_key else None
    if value is None:
        return None
    allowed = frozenset(target.label_map.config_labels)
    items = [
        r
        for r in result
        if isinstance(r, Mapping) and r.get("to_name") == obj.name and isinstance(r.get("value"), Mapping)
    ]
    task_id = task.get("id")
    if control.tag == "Labels" and obj.tag == "Text":
        return _text_example(task_id, value, items, target, allowed, stats, load_text)
    if control.tag in ("Choices", "Taxonomy") and obj.tag in TEXT_OBJECTS:
        return _text_choices_example(task_id, value, items, target, allowed, stats, load_text)
    if not isinstance(value, str):
        return None
    if control.tag == "Choices":
        choices: tuple[str, ...] = ()
        for item in items:
            if item.get("from_name") != control.name:
                continue
            picked = _labels_in(item["value"], "choices", allowed)
            if isinstance(picked, str):
                stats.drop(f"task {task_id}: {picked}")
                continue
            choices = tuple(picked)
        stats.regions += 1 if choices else 0
        return Example(task_id, control.name, obj.name, image=value, choices=choices)
    boxes = _boxes(items, target, allowed, stats, task_id)
    if boxes is None:
        return None
    stats.regions += len(boxes)
    return Example(task_id, control.name, obj.name, image=value, boxes=tuple(boxes))


TEXT_OBJECTS = frozenset({"Text", "HyperText", "Paragraphs", "Table"})


def _text_choices_example(
    task_id: Any,
    value: Any,
    items: Sequence[Mapping[str, Any]],
    target: Target,
    allowed: frozenset[str],
    stats: ExportStats,
    load_text: Callable[[str, Any], str] | None,
) -> Example | None:
    """Return the choices of a Choices / Taxonomy tag on a text object (a Taxonomy path as its last node).

    `text` is the object's value: the text (read from its URL when valueType="url"), or the JSON of a
    Paragraphs list / Table object, which the family turns into what the annotator saw.
    """
    control, obj = target.control, target.obj
    if isinstance(value, str) and str(obj.attrs.get("valueType", "")).lower() == "url" and load_text:
        try:
            value = load_text(value, task_id)
        except InputError as exc:
            stats.drop(f"task {task_id}: text not readable: {exc}")
            return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    key = "taxonomy" if control.tag == "Taxonomy" else "choices"
    choices: tuple[str, ...] = ()
    for item in items:
        if item.get("from_name") != control.name:
            continue
        raw = item["value"].get(key)
        if key == "taxonomy":
            paths = raw if isinstance(raw, list) else []
            raw = [p[-1] for p in paths if isinstance(p, list) and p]
        picked = _labels_in({key: raw}, key, allowed)
        if isinstance(picked, str):
            stats.drop(f"task {task_id}: {picked}")
            continue
        choices = tuple(picked)
    stats.regions += 1 if choices else 0
    return Example(task_id, control.name, obj.name, text=text, choices=choices)


def _text_example(
    task_id: Any,
    value: Any,
    items: Sequence[Mapping[str, Any]],
    target: Target,
    allowed: frozenset[str],
    stats: ExportStats,
    load_text: Callable[[str, Any], str] | None,
) -> Example | None:
    """Return the labelled spans of a Labels control on a Text (its text read from a URL when valueType="url")."""
    control, obj = target.control, target.obj
    if not isinstance(value, str):
        return None
    text = value
    if str(obj.attrs.get("valueType", "")).lower() == "url" and load_text is not None:
        try:
            text = load_text(value, task_id)
        except InputError as exc:
            stats.drop(f"task {task_id}: text not readable: {exc}")
            return None
    spans: list[tuple[int, int, str]] = []
    for item in items:
        if item.get("from_name") != control.name:
            continue
        labels = _labels_in(item["value"], "labels", allowed)
        if isinstance(labels, str):
            stats.drop(f"task {task_id}: {labels}")
            continue
        where = _span(item["value"], text)
        if isinstance(where, str):
            stats.drop(f"task {task_id}: {where}")
            continue
        spans.append((where[0], where[1], labels[0]))
    stats.regions += len(spans)
    return Example(task_id, control.name, obj.name, text=text, spans=tuple(sorted(spans)))


def _boxes(
    items: Sequence[Mapping[str, Any]],
    target: Target,
    allowed: frozenset[str],
    stats: ExportStats,
    task_id: Any,
) -> list[BoxPct] | None:
    """Return the rectangles of a RectangleLabels control, or of a Rectangle with its linked Labels."""
    control = target.control
    if control.tag not in ("RectangleLabels", "Rectangle"):
        return None
    linked = target.linked.get("labels")
    label_of: dict[str, list[Any]] = {}
    if linked is not None:
        for item in items:
            if item.get("from_name") == linked.name and isinstance(item["value"].get("labels"), list):
                label_of[str(item.get("id"))] = item["value"]["labels"]
    boxes: list[BoxPct] = []
    for item in items:
        if item.get("from_name") != control.name:
            continue
        value = item["value"]
        if control.tag == "RectangleLabels":
            labels = _labels_in(value, "rectanglelabels", allowed)
        else:
            labels = _labels_in({"labels": label_of.get(str(item.get("id")))}, "labels", allowed)
        if isinstance(labels, str):
            stats.drop(f"task {task_id}: {labels}")
            continue
        x, y, w, h = (value.get(k) for k in ("x", "y", "width", "height"))
        rotation = value.get("rotation") or 0.0
        if not _finite(x, y, w, h, rotation) or w <= 0 or h <= 0:
            stats.drop(f"task {task_id}: rectangle {x!r},{y!r},{w!r},{h!r} is not a finite positive box")
            continue
        boxes.append(BoxPct(float(x), float(y), float(w), float(h), float(rotation), labels[0]))
    return boxes


HOLDOUT_MIN_EXAMPLES = 50


def split_holdout(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """Return (train, held out): every 10th example is held out once there are at least 50 (for the metrics)."""
    if len(examples) < HOLDOUT_MIN_EXAMPLES:
        return list(examples), []
    train = [e for i, e in enumerate(examples) if i % 10 != 9]
    return train, [e for i, e in enumerate(examples) if i % 10 == 9]


def precision_recall_f1(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Return precision, recall and F1 (rounded) and the support of true/false positive and negative counts."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(float(precision), 4),
        "recall": round(float(recall), 4),
        "f1": round(float(f1), 4),
        "support": int(tp + fn),
    }


def export_sha1(tasks: Sequence[Any]) -> str:
    """Return a hash of the data a job trained on (recorded with the job and its version)."""
    return hashlib.sha1(json.dumps(tasks, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
