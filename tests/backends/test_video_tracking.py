"""Video object tracking: a planted detector on generated clips, tracks linked by ByteTrack, through /predict."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
from flask.testing import FlaskClient

from backends._tracking import ByteTracker, Detection
from backends.video_tracking import VideoTrackingBackend
from serving.contract import Backend, ControlTag, Item, ModelSpec, Target
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results import regions
from serving.results import video as video_regions
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import check_items
from serving.settings import Settings
from tests.backends._ocr_support import validate
from tests.support.video import Shape, color_boxes, make_clip, moving

RED, BLUE, GREEN = (230, 30, 30), (30, 30, 230), (30, 200, 30)
COLORS = [RED, BLUE, GREEN]
MODEL_LABELS = ["Man", "Man", "Woman"]  # what the planted detector calls each colour

# LS 1.23.2's Video Object Tracking template, at the clip's 10 fps
TEMPLATE = """<View>
   <Labels name="videoLabels" toName="video" allowEmpty="true">
     <Label value="Man" background="blue"/>
     <Label value="Woman" background="red"/>
     <Label value="Other" background="green"/>
   </Labels>
   <Video name="video" value="$video" framerate="%s"/>
   <VideoRectangle name="box" toName="video" />
</View>"""

# A (red) moves right, B (blue, drawn over A) moves left: they cross around frame 17; C (green) is there on
# frames 10-25. Sampled at 5 fps, a square moves 16 px between samples: matching by IoU with the last box
# alone swaps A and B at the crossing; the tracker's constant-velocity prediction keeps them apart.
SHAPES = [
    Shape(RED, 0, 39, moving(0, 60, 40, 40, 8.0)),
    Shape(BLUE, 0, 39, moving(280, 70, 40, 40, -8.0)),
    Shape(GREEN, 10, 25, moving(150, 180, 40, 40, 2.0)),
]


class PlantedDetector(Backend):
    """Finds the clip's coloured squares exactly (colour thresholds): the boxes a perfect detector gives."""

    family = "planted"
    control_tags = ("RectangleLabels", "Rectangle")
    object_tags = ("Image",)
    max_batch_size = 8
    default_model = "planted"
    batches: ClassVar[list[int]] = []

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Settings) -> set[str]:
        """Return the config labels the planted vocabulary maps to."""
        return {label for label in control.labels if label in MODEL_LABELS}

    def load(self, device: str) -> None:
        """Nothing to load."""

    def preprocess(self, item: Item) -> Any:
        """Return the frame's pixels and its size."""
        assert item.image is not None
        return np.asarray(item.image), item.size

    def forward(self, batch: list[Any]) -> list[Any]:
        """Return each frame's colour boxes (pixels), recording the batch size."""
        type(self).batches.append(len(batch))
        return [(color_boxes(pixels, COLORS), size) for pixels, size in batch]

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one rectangle per colour found, labeled through the tag's label map."""
        boxes, size = output
        out = []
        for k, box in sorted(boxes.items()):
            label = target.label_map(MODEL_LABELS[k])
            if label is not None:
                out.extend(regions.rectangle_items(target, box, size, 0.9, label))
        return out


class PlantedVideo(VideoTrackingBackend):
    """The video family over the planted detector alone."""

    detector_families: ClassVar[dict[str, type[Backend]]] = {"planted": PlantedDetector}


FAMILIES: dict[str, type[Backend]] = {"video_tracking": PlantedVideo, "planted": PlantedDetector}


@pytest.fixture(scope="module")
def clip_uri() -> str:
    """Return the 40-frame 10 fps clip as a data: URI (what the resolver downloads)."""
    return "data:video/mp4;base64," + base64.b64encode(make_clip(SHAPES, 40, fps=10)).decode()


@pytest.fixture
def client(tmp_path: Any) -> Iterator[FlaskClient]:
    """Serve the planted video family; 5 frames sampled per second (every other frame)."""
    settings = Settings(model_dir=str(tmp_path), max_wait_ms=2.0, video_sample_fps=5.0, cache_max_bytes=0)
    runtime = Runtime(settings, families=FAMILIES)
    app = create_app(settings, runtime=runtime)
    with app.test_client() as test_client:
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


def _x_px(keyframe: dict[str, Any]) -> float:
    return float(keyframe["x"]) / 100.0 * 320


def test_tracks_through_predict_keep_ids_end_and_sit_on_editor_frames(
    client: FlaskClient, clip_uri: str
) -> None:
    """Three tracks: the two crossing squares keep their own ids; the one that leaves ends enabled: false."""
    PlantedDetector.batches.clear()
    items = _predict(client, TEMPLATE % "10", clip_uri)
    assert [i["type"] for i in items] == ["videorectangle"] * 3
    assert {i["from_name"] for i in items} == {"box"} and {i["to_name"] for i in items} == {"video"}
    assert PlantedDetector.batches == [8, 8, 4]  # 20 sampled frames, batched as the detector batches images
    by_label: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        value = item["value"]
        assert value["framesCount"] == 40 and value["duration"] == pytest.approx(4.0, abs=0.1)
        for key in value["sequence"]:
            assert key["time"] == pytest.approx(key["frame"] / 10.0)
        by_label.setdefault(value["labels"][0], []).append(value)
    men = sorted(by_label["Man"], key=lambda v: _x_px(v["sequence"][0]))
    assert len(men) == 2
    right, left = men  # starts at x=0 and moves right; starts at x=280 and moves left
    sampled = range(0, 40, 2)
    for value, start, dx in ((right, 0.0, 8.0), (left, 280.0, -8.0)):
        seq = value["sequence"]
        assert [k["frame"] for k in seq] == [i + 1 for i in sampled]  # decoded frame i is editor frame i + 1
        # its own square on every sampled frame, through the crossing
        assert [_x_px(k) for k in seq] == pytest.approx([max(start + dx * i, 0.0) for i in sampled], abs=3.0)
        assert all(k["enabled"] for k in seq)  # there until the clip's last sampled frame
    (woman,) = by_label["Woman"]
    seq = woman["sequence"]
    assert [k["frame"] for k in seq] == [i + 1 for i in range(10, 26, 2)]  # sampled frames 10-24 of 10-25
    assert [k["enabled"] for k in seq] == [True] * 7 + [False]  # hidden after its last frame
    assert seq[0]["x"] == pytest.approx((150 + 2 * 10) / 320 * 100, abs=1.0)
    assert seq[0]["width"] == pytest.approx(40 / 320 * 100, abs=1.0)


def test_keyframes_follow_the_configs_frame_rate(tmp_path: Any, clip_uri: str) -> None:
    """frameRate 25 on a 10 fps clip, every frame sampled: decoded frame i is first shown on frame ceil(2.5 i) + 1.

    (The player seeks frame N to (N - 1) / 25 s + 2 ms; decoded frame 23 starts at 2.3 s: frame 58 is at
    2.282 s and still shows frame 22, frame 59 at 2.322 s shows 23.)
    """
    settings = Settings(model_dir=str(tmp_path), max_wait_ms=2.0, video_sample_fps=0.0, cache_max_bytes=0)
    runtime = Runtime(settings, families=FAMILIES)
    try:
        with create_app(settings, runtime=runtime).test_client() as test_client:
            items = _predict(test_client, TEMPLATE % "25", clip_uri)
    finally:
        runtime.close()
    (woman,) = [i["value"] for i in items if i["value"]["labels"] == ["Woman"]]
    assert woman["framesCount"] == 100
    assert [k["frame"] for k in woman["sequence"]] == [math.ceil(2.5 * i) + 1 for i in range(10, 26)]
    assert woman["sequence"][-1]["enabled"] is False
    assert all(k["time"] == pytest.approx(k["frame"] / 25.0) for k in woman["sequence"])


def test_video_frame_numbers_match_the_players_count() -> None:
    """The editor's rules: frame N is at (N - 1) / frameRate, clamped to [1, framesCount]; 24 by default."""
    assert video_regions.video_frame_rate(None) == 24.0 and video_regions.video_frame_rate("x") == 24.0
    assert video_regions.video_frame_rate("0.04") == pytest.approx(25.0)
    assert video_regions.video_frames_count(4.0, 10.0) == 40
    assert [video_regions.video_frame(i, 10.0, 10.0, 40) for i in (0, 1, 39, 45)] == [1, 2, 40, 40]
    assert (
        video_regions.video_frame(23, 10.0, 25.0, 100) == 59
    )  # 2.3 s: frame 58 (2.282 s) still shows frame 22
    assert video_regions.video_frame(12, 30.0, 24.0, 100) == math.ceil(12 / 30 * 24 - 0.048) + 1 == 11


def _det(x: float, score: float = 0.9, label: str = "a") -> Detection:
    return Detection((x, 10.0, x + 10.0, 20.0), score, label)


def test_tracker_links_weak_boxes_and_ends_lost_tracks() -> None:
    """A weak box continues a track (ByteTrack's second stage) but starts none; a lost track ends."""
    tracker = ByteTracker(high=0.5, low=0.1, max_lost=2, min_hits=2)
    frames: Sequence[Sequence[Detection]] = [
        [_det(0)],
        [_det(2, 0.2)],  # occluded: weak, still the same object
        [_det(4), _det(60, 0.3)],  # a weak box far away starts nothing
        [],
        [],
        [],
        [_det(12)],  # too late: a new object
        [_det(14)],
    ]
    for position, dets in enumerate(frames):
        tracker.update(position, dets)
    first, second = tracker.tracks()
    assert [p for p, _b, _s in first.seen] == [0, 1, 2]
    assert first.score == pytest.approx((0.9 + 0.2 + 0.9) / 3)
    assert [p for p, _b, _s in second.seen] == [6, 7] and second.track_id > first.track_id


def test_tracker_never_joins_boxes_of_another_label() -> None:
    """Two labels on the same spot are two tracks."""
    tracker = ByteTracker(min_hits=1)
    for position in range(3):
        tracker.update(position, [_det(position, label="a"), _det(position, label="b")])
    assert sorted(t.label for t in tracker.tracks()) == ["a", "b"]
    assert all(len(t.seen) == 3 for t in tracker.tracks())


def test_validation_drops_bad_video_regions() -> None:
    """A label no Labels tag has, a frame past framesCount, a box out of range: each is a problem."""
    config = TEMPLATE % "10"
    schema = ConfigSchema.from_config(config)
    key = {
        "frame": 1,
        "time": 0.1,
        "x": 1.0,
        "y": 2.0,
        "width": 3.0,
        "height": 4.0,
        "rotation": 0,
        "enabled": True,
    }

    def item(labels: list[str], **change: Any) -> dict[str, Any]:
        value = {"framesCount": 40, "duration": 4.0, "sequence": [{**key, **change}], "labels": labels}
        return {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle", "value": value}

    assert check_items(schema, [item(["Man"])]) == []
    assert [p.code for p in check_items(schema, [item(["Dog"])])] == ["unknown_label"]
    assert [p.code for p in check_items(schema, [item(["Man"], frame=41)])] == ["out_of_range"]
    assert [p.code for p in check_items(schema, [item(["Man"], frame=0)])] == ["out_of_range"]
    assert [p.code for p in check_items(schema, [item(["Man"], x=130.0)])] == ["out_of_range"]


def test_planning_picks_the_image_detector_the_routing_would() -> None:
    """COCO labels: torchvision's detector; the template's Man/Woman/Other: the open-vocabulary family;
    model_name="family:model" on the tag: that model."""
    from backends import registry
    from serving.plan.planner import build_plan

    families = registry()
    settings = Settings(detector="fasterrcnn_resnet50_fpn_v2")
    coco = (
        TEMPLATE.replace('"Man"', '"person"').replace('"Woman"', '"car"').replace('"Other"', '"dog"') % "25"
    )
    (spec,) = build_plan(coco, settings, families).specs
    assert (spec.family, spec.name) == ("video_tracking", "detection:fasterrcnn_resnet50_fpn_v2")
    (spec,) = build_plan(TEMPLATE % "25", settings, families).specs
    assert spec.family == "video_tracking" and spec.name.startswith("open_vocab:")
    named = (TEMPLATE % "25").replace(
        '<VideoRectangle name="box"', '<VideoRectangle name="box" model_name="planted:planted"'
    )
    (spec,) = build_plan(named, settings, FAMILIES).specs
    assert spec.name == "planted:planted"
