"""Whole predictions and import files checked against a config (the CLI's `validate`, tests)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from serving.results.schema import ConfigSchema
from serving.results.validation.checks import check_items
from serving.results.validation.problems import (
    Problem,
    is_number,
)


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
    if "score" in prediction and not is_number(prediction["score"]):
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
