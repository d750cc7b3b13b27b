"""Video region checks: a tracked box's keyframes (frames, percent box) and labels, timeline ranges."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.results.schema import ControlInfo, ObjectInfo
from serving.results.validation.problems import EPS_PCT, HI_PCT, CheckerBase, Problem, is_number

BOX_KEYS = ("x", "y", "width", "height")


class VideoChecks(CheckerBase):
    """Checks of regions on a Video."""

    def video_region(
        self, item: Mapping[str, Any], control: ControlInfo, obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check a VideoRectangle's keyframes and its labels, or a TimelineLabels range."""
        if control.tag == "TimelineLabels":
            return self._ranges(item, value)
        if control.tag != "VideoRectangle":
            return []
        out = self._video_labels(item, obj, value)
        count = value.get("framesCount")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return [*out, self.problem(item, "bad_value", "a videorectangle needs value.framesCount >= 1")]
        sequence = value.get("sequence")
        if not isinstance(sequence, list) or not sequence:
            return [
                *out,
                self.problem(item, "bad_value", "a videorectangle needs a non-empty value.sequence"),
            ]
        for key in sequence:
            out.extend(self._keyframe(item, key, count))
        return out

    def _keyframe(self, item: Mapping[str, Any], key: Any, count: int) -> list[Problem]:
        if not isinstance(key, Mapping):
            return [self.problem(item, "bad_value", "each keyframe of value.sequence must be an object")]
        frame = key.get("frame")
        if isinstance(frame, bool) or not isinstance(frame, int) or not 1 <= frame <= count:
            return [
                self.problem(
                    item,
                    "out_of_range",
                    f"keyframe frame {frame!r} is outside [1, framesCount={count}]; frames count from 1 "
                    "as the editor shows them",
                )
            ]
        out = []
        for name in BOX_KEYS:
            number = key.get(name)
            if not is_number(number) or not -EPS_PCT <= number <= HI_PCT:
                out.append(self._range(item, f"sequence frame {frame} {name}", number))
        return out

    def _video_labels(
        self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check value.labels against the Labels tags on the same video (Label Studio merges them in)."""
        raw = value.get("labels")
        if raw is None:
            return []
        allowed: set[str] = set()
        for other in self.schema.controls.values():
            if other.tag == "Labels" and obj.name in other.to_names and other.labels is not None:
                allowed |= other.labels
        bad = [label for label in raw if label not in allowed] if isinstance(raw, list) else [raw]
        if not bad:
            return []
        return [
            self.problem(
                item,
                "unknown_label",
                f"labels {bad!r} of a videorectangle are not in the <Labels> tags on {obj.name!r} "
                f"({', '.join(sorted(allowed)) or 'none'}); add them or map the model's labels",
            )
        ]

    def _ranges(self, item: Mapping[str, Any], value: Mapping[str, Any]) -> list[Problem]:
        ranges = value.get("ranges")
        if not isinstance(ranges, list) or not ranges:
            return [self.problem(item, "bad_value", "a timelinelabels item needs a non-empty value.ranges")]
        for span in ranges:
            start = span.get("start") if isinstance(span, Mapping) else None
            end = span.get("end") if isinstance(span, Mapping) else None
            if not (is_number(start) and is_number(end) and 1 <= start <= end):
                return [
                    self.problem(
                        item,
                        "bad_span",
                        f"timeline range {span!r} must have 1 <= start <= end (frames, counted from 1)",
                    )
                ]
        return []
