"""What the video families share: the frame rate Label Studio's player counts frames at."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.contract import ObjectTag
from serving.results import video as video_regions


def frame_rate_of(obj: ObjectTag, task: Mapping[str, Any]) -> float:
    """Return the Video tag's frameRate (a number, or "$key" read from the task's data)."""
    raw = next((str(v) for k, v in obj.attrs.items() if str(k).lower() == "framerate"), "")
    if raw.startswith("$"):
        data = task.get("data")
        raw = str(data.get(raw[1:], "")) if isinstance(data, Mapping) else ""
    return video_regions.video_frame_rate(raw)
