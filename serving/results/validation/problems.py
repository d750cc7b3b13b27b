"""What validation reports (`Problem`), the constants the checks share, and the checker's base."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from serving.results.schema import ConfigSchema

# Slack on percent coordinates: float noise from pixel -> percent conversion must not drop a region.
EPS_PCT = 1e-3
HI_PCT = 100.0 + EPS_PCT
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
GEOMETRY_KEYS = ("x", "y", "width", "height", "points", "rle", "radiusX", "radiusY")


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


def is_number(value: Any) -> TypeGuard[int | float]:
    """Return True for a finite int/float (not bool, NaN or inf)."""
    t = type(value)
    if t is float:
        return value - value == 0.0  # False for NaN and inf
    if t is int:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class CheckerBase:
    """State of one check (schema, the task's data, where) and how problems are reported."""

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

    def _range(self, item: Mapping[str, Any], what: str, value: Any) -> Problem:
        return self.problem(
            item,
            "out_of_range",
            f"{what} = {value!r} is outside [0, 100]; coordinates are percent of the original image: "
            "divide pixels by original_width/original_height and multiply by 100, clamped to the image",
        )
