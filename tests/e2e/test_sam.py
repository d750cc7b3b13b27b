"""Interactive SAM against a real Label Studio 1.23.2: clicks on an uploaded image come back as brush masks.

Our server runs a small random SAM 2 saved to a folder (model_path in the config) and loaded by the
real code; Label Studio proxies the clicks (`POST /api/ml/{id}/interactive-annotating`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import requests

from tests.e2e.conftest import SAM_IMAGE_SIZE, SamSetup
from tests.e2e.ls_harness import LabelStudio, MLServer


def cache_counter(server: MLServer, name: str) -> float:
    """Return an embedding-cache counter of our server's /metrics, summed over models."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"lsml_embedding_cache_{name}_total{{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def keypoint(x: float, y: float, rid: str, positive: bool | None = None) -> dict[str, Any]:
    """Return a smart keypoint as Label Studio's labeling page serialises it (is_positive: Alt+click false)."""
    width, height = SAM_IMAGE_SIZE
    region: dict[str, Any] = {
        "id": rid,
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Cat"], "labels": ["Cat"]},
    }
    if positive is not None:
        region["is_positive"] = positive
    return region


def assert_brush_masks(config: str, data: dict[str, Any]) -> list[np.ndarray]:
    """Check an interactive answer: valid brush regions for the config (SDK), masks at the original size."""
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    result = data["result"]
    assert result, data
    assert isinstance(data["score"], int | float) and math.isfinite(data["score"])
    errors = LabelInterface(config).validate_prediction(
        {"result": result, "score": data["score"]}, return_errors=True
    )
    assert errors == [], errors
    masks = []
    for item in result:
        assert (item["type"], item["from_name"], item["to_name"]) == ("brushlabels", "mask", "image"), item
        assert item["value"]["brushlabels"] == ["Cat"]
        assert (item["original_width"], item["original_height"]) == SAM_IMAGE_SIZE
        width, height = SAM_IMAGE_SIZE
        mask = np.reshape(decode_rle(item["value"]["rle"]), (height, width, 4))[:, :, 3] > 0
        assert mask.any()
        masks.append(mask)
    return masks


def test_clicks_come_back_as_brush_masks_and_later_clicks_reuse_the_embedding(
    label_studio: LabelStudio, sam_setup: SamSetup
) -> None:
    """Open the task (encodes in the background, stores nothing), click, then click + Alt+click: no re-encode."""
    project = sam_setup.project
    (task_id,) = project.task_ids
    # Opening the task: Label Studio asks for a prediction; ours has no result (a click is the
    # input), so nothing is stored, and the image is encoded in the background for the first click.
    label_studio.task(task_id)
    deadline = time.monotonic() + 60
    while cache_counter(sam_setup.server, "misses") < 1:
        assert time.monotonic() < deadline, "the opened task's image was not encoded in the background"
        time.sleep(0.5)
    assert label_studio.predictions(task_id) == []

    first = label_studio.interactive(project.ml_id, task_id, [keypoint(50, 55, "p1", positive=True)])
    assert "errors" not in first, first
    assert_brush_masks(project.config, first["data"])
    assert cache_counter(sam_setup.server, "misses") == 1
    hits = cache_counter(sam_setup.server, "hits")
    assert hits >= 1  # the first click found the embedding the task's opening computed

    second = label_studio.interactive(
        project.ml_id,
        task_id,
        [keypoint(50, 55, "p1", positive=True), keypoint(20, 20, "n1", positive=False)],
    )
    assert "errors" not in second, second
    assert_brush_masks(project.config, second["data"])
    # the second click ran only the prompt encoder and mask decoder: no new encode, one more hit
    assert cache_counter(sam_setup.server, "misses") == 1
    assert cache_counter(sam_setup.server, "hits") == hits + 1
    # interactive answers go to the browser only; Label Studio stores nothing
    assert label_studio.predictions(task_id) == []


def test_a_click_outside_the_image_answers_no_region(label_studio: LabelStudio, sam_setup: SamSetup) -> None:
    """A bad prompt is a per-task answer (empty result), not a server error Label Studio would report."""
    project = sam_setup.project
    (task_id,) = project.task_ids
    answer = label_studio.interactive(project.ml_id, task_id, [keypoint(150, 50, "bad")])
    assert "errors" not in answer, answer
    assert answer["data"]["result"] == []
