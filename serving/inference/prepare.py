"""Preparing one task for one model: its value found in task.data, resolved (image, text, paragraphs, audio), preprocessed.

Runs on the runtime's CPU pool; every problem with one task's input raises InputError with what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from serving.contract import Backend, ControlTag, Item, LabelMap, ObjectTag, Target
from serving.errors import InputError
from serving.fetch.decode import ORIGINAL_SIZE
from serving.fetch.resolver import Resolver


def prepare(
    task: Any,
    obj: ObjectTag,
    backend: Backend,
    context: Mapping[str, Any] | None,
    targets: Sequence[Target],
    resolver: Resolver,
) -> tuple[Item, Any]:
    """Return the task's Item for `obj` (its image or text resolved) and the backend's preprocessed input."""
    value = _task_value(task, obj)
    task_id = task.get("id") if isinstance(task.get("id"), int) else None
    item = Item(task=task, obj=obj, context=context, targets=tuple(targets))
    kind = type(backend).input_kind
    if kind == "image":
        if not isinstance(value, str):
            raise InputError(
                f"data['{obj.value_key}'] must be an image URL or path, got {type(value).__name__}"
            )
        if context is not None:
            # an interactive call on an image the backend already holds (its embedding): no fetch
            cached = backend.preprocess_cached(item, value)
            if cached is not None:
                return item, cached
        item.image = resolver.load_image(value, task_id, shrink=backend.input_scale)
        item.original_size = item.image.info.get(ORIGINAL_SIZE)
    elif kind == "audio":
        _load_audio(item, value, task_id, backend, resolver)
    elif kind == "video":
        _load_video(item, value, task_id, backend, resolver)
    elif kind == "text" and obj.tag == "Paragraphs":
        item.value = _paragraphs(value, obj, task_id, resolver)
    elif kind == "text" and obj.tag == "Table" and isinstance(value, (Mapping, list)):
        item.value = value  # a Table shows an object's keys and values: the backend reads them
    elif kind == "text":
        if not isinstance(value, str):
            raise InputError(f"data['{obj.value_key}'] must be text or a URL, got {type(value).__name__}")
        if obj.tag == "HyperText":
            # the editor fetches the value only with valueType="url"; otherwise it shows it as HTML
            as_url = attr(obj, "valueType").lower() == "url"
            item.text = resolver.load_text(value, task_id, as_url=as_url)
        else:
            item.text = resolver.load_text(value, task_id)
    return item, backend.preprocess(item)


def task_targets(targets: Sequence[Target], task: Any) -> list[Target]:
    """Return the targets with dynamic labels (value="$key" on the tag) filled from this task's list.

    Label Studio shows such a tag with the labels of the task's data[key] (`[{"value": ...}, ...]`):
    the model is prompted with those, and only those leave (validation checks the same list). A
    target whose task list is empty or missing is left out: the task has nothing to label for it.
    """
    out = []
    data = task.get("data") if isinstance(task, Mapping) else None
    for target in targets:
        role, control = _label_control(target)
        key = control.attr("value")[1:] if control.attr("value").startswith("$") else ""
        if control.labels or not key or not isinstance(data, Mapping):
            out.append(target)
            continue
        labels = _dynamic_labels(data.get(key))
        if not labels:
            continue  # the task offers no label for this tag: nothing to predict
        filled = replace(control, labels=labels)
        if role:
            target = replace(target, linked={**target.linked, role: filled})
        else:
            target = replace(target, control=filled)
        out.append(replace(target, label_map=LabelMap(labels)))
    return out


def _label_control(target: Target) -> tuple[str, ControlTag]:
    """Return ("" or the linked role, the control whose labels a target emits)."""
    if not target.control.labels and "labels" in target.linked:
        return "labels", target.linked["labels"]
    return "", target.control


def _dynamic_labels(raw: Any) -> tuple[str, ...]:
    """Return the labels of a task's dynamic list: each entry's "value" (or the entry, a string)."""
    if not isinstance(raw, list):
        return ()
    values = (e.get("value") if isinstance(e, Mapping) else e for e in raw)
    return tuple(dict.fromkeys(str(v).strip() for v in values if isinstance(v, str | int) and str(v).strip()))


def _task_value(task: Any, obj: ObjectTag) -> Any:
    """Return the task's data value for `obj` (InputError when the task or the key is missing)."""
    if not isinstance(task, Mapping):
        raise InputError(f"task is a {type(task).__name__}, not an object with 'data'")
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise InputError("task has no 'data' object")
    if obj.value_key not in data:
        keys = ", ".join(sorted(map(str, data))[:10]) or "none"
        raise InputError(
            f"task data has no key '{obj.value_key}' (the config's <{obj.tag} value=\"${obj.value_key}\">); "
            f"keys present: {keys}"
        )
    return data[obj.value_key]


def _load_audio(item: Item, value: Any, task_id: int | None, backend: Backend, resolver: Resolver) -> None:
    """Decode the task's audio into the item at the backend's rate (InputError for a value that is no URL)."""
    if not isinstance(value, str):
        raise InputError(
            f"data['{item.obj.value_key}'] must be an audio URL or path, got {type(value).__name__}"
        )
    audio = resolver.load_audio(value, task_id, sample_rate=backend.audio_rate())
    item.audio, item.sample_rate = audio.samples, audio.sample_rate


def _load_video(item: Item, value: Any, task_id: int | None, backend: Backend, resolver: Resolver) -> None:
    """Decode the task's sampled video frames into the item (InputError for a value that is no URL)."""
    if not isinstance(value, str):
        raise InputError(
            f"data['{item.obj.value_key}'] must be a video URL or path, got {type(value).__name__}"
        )
    video = resolver.load_video(value, task_id, sampling=backend.video_sampling(item))
    item.frames, item.frame_indices = video.frames, video.indices
    item.fps, item.frame_count, item.video_duration = video.fps, video.frame_count, video.duration
    item.video_size = video.size


def _paragraphs(value: Any, obj: ObjectTag, task_id: int | None, resolver: Resolver) -> list[Any]:
    """Return a Paragraphs value: the list in the task, or the JSON list its URL serves (valueType="url")."""
    if isinstance(value, str) and attr(obj, "valueType").lower() == "url":
        raw = resolver.load_text(value, task_id, as_url=True)
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise InputError(f"the Paragraphs URL did not return JSON: {exc}") from None
    if not isinstance(value, list):
        raise InputError(
            f"data['{obj.value_key}'] must be a list of paragraph objects for <Paragraphs>, "
            f"got {type(value).__name__}"
        )
    return value


def attr(obj: ObjectTag, key: str) -> str:
    """Return an object tag attribute, looked up case-insensitively."""
    lowered = key.lower()
    for name, value in obj.attrs.items():
        if str(name).lower() == lowered:
            return str(value)
    return ""
