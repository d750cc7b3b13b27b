"""Interactive video tracking: a box drawn on one frame (params.context) tracked forward by SAM 2 video.

A tiny random Sam2VideoModel is built and saved by the test and loads through the real code; its masks
are random, so one test checks what any model's answer must look like, and one plants the masks (the
clip's red square, found by colour) so that every keyframe is known exactly.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from serving.contract import Backend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results.schema import ConfigSchema
from serving.settings import Settings
from tests.backends._sam_support import build_sam2_video
from tests.backends.test_video_tracking import (
    RED,
    SHAPES,
    TEMPLATE,
    PlantedDetector,
    PlantedVideo,
    check_items,
    validate,
)
from tests.support.video import make_clip

CONFIG = TEMPLATE % "10"
# the annotator's box around the red square on editor frame 11 (decoded frame 10: x 80-120, y 60-100)
DRAWN = {
    "id": "drawn1",
    "from_name": "box",
    "to_name": "video",
    "type": "videorectangle",
    "value": {
        "framesCount": 40,
        "duration": 4.0,
        "sequence": [
            {
                "frame": 11,
                "time": 1.1,
                "x": 25.0,
                "y": 25.0,
                "width": 12.5,
                "height": 16.6667,
                "enabled": True,
            }
        ],
        "labels": ["Man"],
    },
}


class PlantedMasks(PlantedVideo):
    """SAM 2 video's masks replaced by the red square's pixels on each frame (what a perfect tracker sees)."""

    calls: list[int] = []

    def track_masks(self, frames: Sequence[Any], box_xyxy_px: Sequence[float]) -> list[Any]:
        type(self).calls.append(len(frames))
        out = []
        for frame in frames:
            pixels = np.asarray(frame).astype(np.int16)
            out.append((np.abs(pixels - np.array(RED)) <= 40).all(axis=2))
        return out


@pytest.fixture(scope="module")
def sam2_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sam2_video(tmp_path_factory.mktemp("sam2v") / "tiny-sam2-video")


@pytest.fixture(scope="module")
def clip_uri() -> str:
    return "data:video/mp4;base64," + base64.b64encode(make_clip(SHAPES, 40, fps=10)).decode()


@contextmanager
def _client(tmp_path: Path, video_cls: type[Backend], sam_model: str) -> Iterator[FlaskClient]:
    settings = Settings(
        model_dir=str(tmp_path), max_wait_ms=2.0, cache_max_bytes=0, sam_model=sam_model, video_track_frames=8
    )
    runtime = Runtime(settings, families={"video_tracking": video_cls, "planted": PlantedDetector})
    with create_app(settings, runtime=runtime).test_client() as client:
        yield client
    runtime.close()


def _interactive(client: FlaskClient, uri: str, context: dict[str, Any]) -> dict[str, Any]:
    body = {
        "tasks": [{"id": 1, "data": {"video": uri}}],
        "label_config": CONFIG,
        "project": "1.1",
        "params": {"context": context},
    }
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    (result,) = response.get_json()["results"]
    return dict(result)


def test_planted_masks_give_the_square_on_every_frame_from_the_drawn_one(
    tmp_path: Path, clip_uri: str
) -> None:
    """8 frames from frame 11: the drawn box first, then the red square's box on frames 12-18; no detector."""
    PlantedDetector.batches.clear()
    PlantedMasks.calls.clear()
    with _client(tmp_path, PlantedMasks, "unused") as client:
        result = _interactive(client, clip_uri, {"result": [DRAWN]})
    (item,) = result["result"]
    assert validate(CONFIG, result["result"]) == []
    assert check_items(ConfigSchema.from_config(CONFIG), result["result"]) == []
    assert item["id"] == "drawn1" and item["value"]["labels"] == ["Man"]
    seq = item["value"]["sequence"]
    assert [k["frame"] for k in seq] == list(range(11, 19))
    assert seq[0]["x"] == 25.0 and seq[0]["width"] == 12.5  # the annotator's own box stays as drawn
    # decoded frame i: the square at x = 8 i px of 320
    assert [k["x"] for k in seq[1:]] == pytest.approx([8 * i / 320 * 100 for i in range(11, 18)], abs=1.0)
    assert all(k["enabled"] for k in seq)
    assert PlantedMasks.calls == [8] and PlantedDetector.batches == []  # SAM 2 alone, no detector pass


@pytest.mark.slow
def test_a_tiny_sam2_video_answers_keyframes_from_the_drawn_frame(
    tmp_path: Path, clip_uri: str, sam2_video: Path
) -> None:
    """The real model (random weights): keyframes start at the drawn frame, go forward, within 8 frames."""
    with _client(tmp_path, PlantedVideo, str(sam2_video)) as client:
        result = _interactive(client, clip_uri, {"result": [DRAWN]})
    assert validate(CONFIG, result["result"]) == []
    (item,) = result["result"]
    frames = [k["frame"] for k in item["value"]["sequence"]]
    assert frames[0] == 11 and frames == sorted(set(frames)) and frames[-1] <= 18
    assert item["value"]["framesCount"] == 40


def test_missing_sam_weights_fail_the_task_with_the_command(tmp_path: Path, clip_uri: str) -> None:
    """No SAM 2 checkpoint on disk: the task answers no result and says how to fetch it."""
    with _client(tmp_path, PlantedVideo, str(tmp_path / "nope")) as client:
        result = _interactive(client, clip_uri, {"result": [DRAWN]})
    assert result["result"] == []
    assert "python -m serving weights download --model sam" in str(result.get("error", ""))


def test_without_a_drawn_box_the_detector_answers(tmp_path: Path, clip_uri: str) -> None:
    """A context with no videorectangle goes the normal way: the planted detector's tracks."""
    PlantedDetector.batches.clear()
    with _client(tmp_path, PlantedVideo, "unused") as client:
        result = _interactive(
            client, clip_uri, {"result": [{"type": "labels", "value": {"labels": ["Man"]}}]}
        )
    assert len(result["result"]) == 3 and PlantedDetector.batches


def test_drawn_box_helper_picks_the_last_keyframe() -> None:
    """The box is tracked from the latest keyframe the annotator set."""
    from backends.video_tracking import drawn_box

    region = {
        **DRAWN,
        "value": {
            "sequence": [{"frame": 3, "x": 1, "y": 1, "width": 1, "height": 1}, DRAWN["value"]["sequence"][0]]
        },
    }
    found = drawn_box({"result": [region]}, "video")
    assert found is not None and found[1]["frame"] == 11
    assert drawn_box({"result": [region]}, "other") is None
    assert drawn_box(None, "video") is None
