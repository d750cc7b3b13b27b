"""A user's YOLO checkpoint against a real Label Studio 1.23.2, with its *Object Detection with Bounding Boxes* template.

The template is used as Label Studio's gallery creates it (no model named on the tag): our server's
DETECTOR names the checkpoint, as a user who trained `best.pt` would configure it. The checkpoint is a
YOLO11n built by the test from its YAML (random weights, no hub) whose class head is set to answer
"car" for every anchor, so every task must get boxes labelled Car from the checkpoint's own class names.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import _required, connect
from tests.e2e.ls_harness import LabelStudio, MLServer
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Label Studio 1.23.2's template (annotation_templates/computer-vision/object-detection-with-bounding-boxes).
OBJECT_DETECTION = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Airplane" background="green"/>
    <Label value="Car" background="blue"/>
  </RectangleLabels>
</View>"""
IMAGE_SIZES = ((320, 240), (200, 300), (640, 360))


def photo(size: tuple[int, int], shade: int) -> bytes:
    """Return a JPEG of a grey road with a dark rectangle (what the project uploads)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (shade, shade, shade + 20))
    w, h = size
    ImageDraw.Draw(image).rectangle((w // 4, h // 3, w // 2, h * 2 // 3), fill=(30, 30, 90))
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def yolo_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Start our server with DETECTOR naming a YOLO11n checkpoint built here (its own process)."""
    if importlib.util.find_spec("ultralytics") is None:
        _required("ultralytics (the optional YOLO extra)", "make setup-yolo")
    from tests.backends._yolo_support import make_sure_of, save_yolo

    checkpoint = save_yolo(e2e_root / "yolo" / "best.pt", "detect", ("airplane", "car", "dog"), imgsz=320)
    make_sure_of(checkpoint, 1)
    root = e2e_root / "ml-yolo"
    server = MLServer(
        root,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "DETECTOR": f"yolo:{checkpoint}",
            "WARMUP": f"yolo:{checkpoint}",
            "YOLO_OFFLINE": "1",
            "YOLO_CONFIG_DIR": str(root / "yolo-settings"),
        },
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-yolo.log")


def test_object_detection_template_with_a_yolo_checkpoint(
    label_studio: LabelStudio, yolo_server: MLServer
) -> None:
    """Three uploads of different sizes: one stored prediction each, boxes labelled Car, valid for the config."""
    project = int(label_studio.create_project("e2e YOLO", OBJECT_DETECTION)["id"])
    connect(label_studio, yolo_server, project)
    ids: list[int] = []
    for k, size in enumerate(IMAGE_SIZES):
        ids += label_studio.import_file(project, f"road{k}.jpg", photo(size, 100 + 40 * k), "image/jpeg")
    version = our_version(yolo_server, OBJECT_DETECTION)
    assert version.startswith("yolo-"), version
    for _ in range(2):  # a second "Retrieve predictions" must add none
        label_studio.retrieve_predictions(project)
    for task_id, size in zip(ids, IMAGE_SIZES, strict=True):
        prediction = only_prediction(label_studio, task_id, version)
        result = prediction["result"]
        assert result, prediction
        for item in result:
            assert (item["type"], item["from_name"], item["to_name"]) == ("rectanglelabels", "label", "image")
            assert item["value"]["rectanglelabels"] == ["Car"]
            assert item["score"] > 0.99
            assert (item["original_width"], item["original_height"]) == size
        assert_valid_prediction(OBJECT_DETECTION, prediction, label_studio.task(task_id)["data"])
