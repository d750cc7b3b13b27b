"""Video object tracking against a real Label Studio 1.23.2: its Video Object Tracking template, an uploaded mp4.

The detector is torchvision's ssdlite at its real size with random weights whose classifier is planted
(bench_vision.fill_random_weights: boxes of person and car on every frame), so the clip gets tracks
to store; the template's labels reach it through predicted_values.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Project, connect
from tests.e2e.ls_harness import LabelStudio, MLServer, wait_until
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version

MODEL = "ssdlite320_mobilenet_v3_large"
# LS 1.23.2's Video Object Tracking template (annotation_templates/videos/video-object-tracking), with
# the detector named and the model's COCO classes mapped to its labels
CONFIG = """<View>
   <Labels name="videoLabels" toName="video" allowEmpty="true">
     <Label value="Man" background="blue" predicted_values="person"/>
     <Label value="Woman" background="red" predicted_values="car"/>
     <Label value="Other" background="green"/>
   </Labels>
   <Video name="video" value="$video" framerate="25.0"/>
   <VideoRectangle name="box" toName="video" model_name="detection:%s" model_score_threshold="%s"/>
</View>"""


@dataclass
class VideoSetup:
    server: MLServer
    project: Project


@pytest.fixture(scope="module")
def video_setup(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[VideoSetup]:
    """Start a server of ours with the planted ssdlite; a project from the template with an uploaded mp4."""
    from bench.bench_video import make_video
    from bench.bench_vision import PLANTED_THRESHOLD, fill_random_weights

    root = e2e_root / "ml-server-video"
    fill_random_weights(MODEL, root / "torch", plant=True)
    # no WARMUP: loading a torchvision model at start races the runtime's background `import torch`
    # (KeyError 'torch' in the availability check); connecting the project loads it instead
    server = MLServer(
        root, {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
    )
    try:
        server.start(wait_models=False)
        config = CONFIG % (MODEL, PLANTED_THRESHOLD)
        # plan the config and load the model before Label Studio's /setup (3 s timeout) asks
        our_version(server, config)
        wait_until(server._models_ready, 180, "the video model", server.proc, every=1.0)
        created = label_studio.create_project("e2e video tracking", config)
        ml_id = connect(label_studio, server, int(created["id"]))
        ids = label_studio.import_file(
            int(created["id"]), "clip.mp4", make_video(4, 25, (320, 180)), "video/mp4"
        )
        assert len(ids) == 1
        yield VideoSetup(server, Project(int(created["id"]), ml_id, config, ids))
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-server-video.log")


def test_video_object_tracking_template_gets_one_valid_prediction(
    label_studio: LabelStudio, video_setup: VideoSetup
) -> None:
    """Retrieve predictions: the uploaded mp4 is fetched from /data/upload; one prediction of tracked boxes."""
    project = video_setup.project
    (task_id,) = project.task_ids
    data = label_studio.task_data(project.id, task_id)
    assert str(data["video"]).startswith("/data/upload/"), data
    label_studio.retrieve_predictions(project.id)
    prediction = only_prediction(label_studio, task_id, our_version(video_setup.server, project.config))
    assert_valid_prediction(project.config, prediction, data)
    items = prediction["result"]
    assert items and {i["type"] for i in items} == {"videorectangle"}
    for item in items:
        value = item["value"]
        assert value["framesCount"] == 100 and value["labels"][0] in {"Man", "Woman"}
        frames = [k["frame"] for k in value["sequence"]]
        # 5 fps sampled of 25: decoded frames 0, 5, 10, ... are editor frames 1, 6, 11, ...
        assert all((f - 1) % 5 == 0 and 1 <= f <= 100 for f in frames), frames
