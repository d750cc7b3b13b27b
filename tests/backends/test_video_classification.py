"""Video classification (Choices) and frame classification (TimelineLabels) with a tiny SigLIP on a generated clip.

The SigLIP is the tiny random one of test_zero_shot_image.py, loaded through the real code, with its
embeddings planted (a frame's by its colour, a prompt's by its choice word): logit 5 for the frame's own
choice, -5 for the others, so every per-frame probability and every range is known exactly.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from backends.video_classification import VideoClassificationBackend, smooth
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import check_items
from serving.settings import Settings
from tests.backends._ocr_support import validate
from tests.backends.test_zero_shot_image import PlantedSiglip, RecordingTokenizer, save_siglip
from tests.support.video import Shape, make_clip

RED, GREEN, BLUE = (230, 30, 30), (30, 200, 30), (30, 30, 230)  # planted: weapons, violence, adult content


def _full(color: tuple[int, int, int], first: int, last: int) -> Shape:
    return Shape(color, first, last, lambda _i: (0, 0, 64, 48))


# frames 0-9 red, 10-24 green, 25-39 blue but for a 2-frame red blip at 31-32
SHAPES = [_full(RED, 0, 9), _full(GREEN, 10, 24), _full(BLUE, 25, 39), _full(RED, 31, 32)]
CHOICES = (
    '<View><Video name="video" value="$video" framerate="10"/>'
    '<Choices name="c" toName="video"{attrs}><Choice value="Adult content"/><Choice value="Weapons"/>'
    '<Choice value="Violence"/></Choices></View>'
)
TIMELINE = (
    '<View><TimelineLabels name="t" toName="video"><Label value="Weapons"/><Label value="Violence"/>'
    '<Label value="Adult content"/></TimelineLabels><Video name="video" value="$video" framerate="10"/></View>'
)
P_RIGHT = math.exp(5) / (math.exp(5) + 2 * math.exp(-5))
P_WRONG = math.exp(-5) / (math.exp(5) + 2 * math.exp(-5))


class PlantedVideoSiglip(VideoClassificationBackend):
    """The real family, its loaded model wrapped with planted embeddings."""

    def load(self, device: str) -> None:
        super().load(device)
        self.tokenizer = RecordingTokenizer(self.tokenizer)
        self.model = PlantedSiglip(self.model, self.tokenizer)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_siglip(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


@pytest.fixture(scope="module")
def clip_uri() -> str:
    body = make_clip(SHAPES, 40, fps=10, size=(64, 48))
    return "data:video/mp4;base64," + base64.b64encode(body).decode()


@pytest.fixture
def client(tmp_path: Path, siglip: Path) -> Iterator[FlaskClient]:
    settings = Settings(
        model_dir=str(tmp_path),
        max_wait_ms=2.0,
        load_wait_s=60.0,
        zero_shot_image_model=str(siglip),
        video_sample_fps=0.0,
        cache_max_bytes=0,
    )
    runtime = Runtime(settings, families={"video_classification": PlantedVideoSiglip})
    with create_app(settings, runtime=runtime).test_client() as test_client:
        yield test_client
    runtime.close()


def _predict(client: FlaskClient, config: str, uri: str) -> list[dict[str, Any]]:
    response = client.post(
        "/predict",
        json={"tasks": [{"id": 1, "data": {"video": uri}}], "label_config": config, "project": "1.1"},
    )
    assert response.status_code == 200, response.get_json()
    (result,) = response.get_json()["results"]
    assert validate(config, result["result"]) == []
    assert check_items(ConfigSchema.from_config(config), result["result"], {"video": uri}) == []
    return list(result["result"])


def test_choices_on_video_average_the_frames_probabilities(client: FlaskClient, clip_uri: str) -> None:
    """Violence on 15 of 40 frames, Weapons on 12, Adult content on 13: Violence, scored by its mean."""
    (item,) = _predict(client, CHOICES.format(attrs=""), clip_uri)
    assert item["type"] == "choices" and item["value"] == {"choices": ["Violence"]}
    assert item["score"] == pytest.approx((15 * P_RIGHT + 25 * P_WRONG) / 40)


def test_multiple_choices_keep_those_whose_mean_sigmoid_reaches_the_threshold(
    client: FlaskClient, clip_uri: str
) -> None:
    """Mean sigmoid: a choice's frame share x sigmoid(5) + the rest x sigmoid(-5); 0.32 keeps two of three."""
    config = CHOICES.format(attrs=' choice="multiple" model_score_threshold="0.32"')
    (item,) = _predict(client, config, clip_uri)
    sig = 1 / (1 + math.exp(-5))
    assert item["value"] == {"choices": ["Violence", "Adult content"]}
    assert item["score"] == pytest.approx((15 * sig + 25 * (1 - sig)) / 40)


def test_timeline_ranges_follow_the_frames_and_smooth_a_blip_away(client: FlaskClient, clip_uri: str) -> None:
    """Three ranges in editor frames (1-based), the 2-frame red blip inside the blue run absorbed."""
    items = _predict(client, TIMELINE, clip_uri)
    got = [(i["value"]["timelinelabels"], i["value"]["ranges"]) for i in items]
    assert got == [
        (["Weapons"], [{"start": 1, "end": 10}]),
        (["Violence"], [{"start": 11, "end": 25}]),
        (["Adult content"], [{"start": 26, "end": 40}]),
    ]
    assert all(i["type"] == "timelinelabels" and 0.5 < i["score"] <= 1.0 for i in items)


def test_timeline_without_smoothing_keeps_the_blip(tmp_path: Path, siglip: Path, clip_uri: str) -> None:
    """VIDEO_TIMELINE_SMOOTH_S=0: the blip is its own Weapons range, frames 32-33."""
    settings = Settings(
        model_dir=str(tmp_path),
        max_wait_ms=2.0,
        zero_shot_image_model=str(siglip),
        video_sample_fps=0.0,
        video_timeline_smooth_s=0.0,
        cache_max_bytes=0,
    )
    runtime = Runtime(settings, families={"video_classification": PlantedVideoSiglip})
    try:
        with create_app(settings, runtime=runtime).test_client() as test_client:
            items = _predict(test_client, TIMELINE, clip_uri)
    finally:
        runtime.close()
    ranges = [
        (i["value"]["timelinelabels"][0], i["value"]["ranges"][0]["start"], i["value"]["ranges"][0]["end"])
        for i in items
    ]
    assert ranges == [
        ("Weapons", 1, 10),
        ("Violence", 11, 25),
        ("Adult content", 26, 31),
        ("Weapons", 32, 33),
        ("Adult content", 34, 40),
    ]


def test_smooth_is_a_centred_moving_average() -> None:
    """Window 3: each row the mean of itself and its neighbours (edges: what they have)."""
    probs = np.array([[1.0], [0.0], [0.0], [1.0]])
    assert smooth(probs, 3)[:, 0] == pytest.approx([0.5, 1 / 3, 1 / 3, 0.5])
