"""Video results as Label Studio's editor stores them: frame numbers, keyframes, tracked boxes, timeline ranges."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from serving.contract import Target
from serving.results.regions import _base_item, clamp_pct, new_id

# Label Studio's Video tag plays at its frameRate attribute (24 when absent), whatever the file's rate.
DEFAULT_VIDEO_FRAME_RATE = 24.0


def video_frame_rate(raw: str | float | None) -> float:
    """Return the frame rate Label Studio's player counts frames at, from the Video tag's frameRate value.

    The editor's normalisation: a missing or non-numeric value is 24, a value below 1 is a frame
    duration (0.04 means 25 fps).
    """
    try:
        rate = float(raw) if raw not in (None, "") else DEFAULT_VIDEO_FRAME_RATE
    except (TypeError, ValueError):
        return DEFAULT_VIDEO_FRAME_RATE
    if not math.isfinite(rate) or rate <= 0:
        return DEFAULT_VIDEO_FRAME_RATE
    return 1.0 / rate if rate < 1 else rate


def video_frames_count(duration_s: float, frame_rate: float) -> int:
    """Return the frame count Label Studio's player shows for a video of this length (at least 1)."""
    return max(1, round(float(duration_s) * frame_rate))


# Label Studio seeks 2 ms past a frame's start (browsers keep currentTime to about 2 ms).
_SEEK_PAST_S = 0.002


def video_frame(index: int, stream_fps: float, frame_rate: float, frames_count: int) -> int:
    """Return the first 1-based frame number on which the editor shows decoded frame `index` (0-based).

    Label Studio 1.23.2 (its frame-seek-precision flag is on) seeks frame N to (N - 1) / frameRate + 2 ms,
    where the browser shows the decoded frame that starts at or before that time; the frame decoded at
    t = index / stream_fps is first shown on N = ceil((t - 2 ms) * frameRate) + 1 (index + 1 when the
    rates agree), clamped to [1, framesCount].
    """
    if stream_fps <= 0:
        return min(max(1, index + 1), frames_count)
    start = index / stream_fps
    number = math.ceil((start - _SEEK_PAST_S) * frame_rate - 1e-9) + 1
    return min(max(1, number), frames_count)


def video_keyframe(
    frame: int, frame_rate: float, box_pct: Mapping[str, float], enabled: bool
) -> dict[str, Any]:
    """Return one keyframe of a video region as the editor serializes it (time = frame / frameRate)."""
    return {
        "frame": int(frame),
        "time": float(frame) / frame_rate,
        "x": clamp_pct(box_pct["x"]),
        "y": clamp_pct(box_pct["y"]),
        "width": clamp_pct(box_pct["width"]),
        "height": clamp_pct(box_pct["height"]),
        "rotation": 0,
        "enabled": bool(enabled),
    }


def video_rectangle_item(
    target: Target,
    sequence: Sequence[Mapping[str, Any]],
    frames_count: int,
    duration_s: float,
    score: float,
    label: str | None = None,
    region_id: str | None = None,
) -> dict[str, Any]:
    """Build one tracked box (a VideoRectangle region): its keyframes, framesCount and duration.

    Label Studio keeps the linked Labels tag's label inside the region's own value (`labels`), not in a
    second item: the Video tag merges labels and results.
    """
    value: dict[str, Any] = {
        "framesCount": int(frames_count),
        "duration": float(duration_s),
        "sequence": [dict(k) for k in sequence],
    }
    if label is not None:
        value["labels"] = [label]
    return _base_item(
        target, target.control.name, "videorectangle", value, region_id or new_id(), score, None
    )


def timeline_item(
    target: Target, start: int, end: int, label: str, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """Build a TimelineLabels region: one range of editor frames [start, end] (1-based, inclusive)."""
    value = {"ranges": [{"start": int(start), "end": int(end)}], "timelinelabels": [label]}
    return _base_item(
        target, target.control.name, "timelinelabels", value, region_id or new_id(), score, None
    )
