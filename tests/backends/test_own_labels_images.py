"""Label Studio's *Multi-page documents* (valueList pages) and *Visual genome* (dynamic labels) on images.

The planted tiny Grounding DINO of tests/backends/_open_vocab_support.py answers known boxes for known
prompt phrases through the real loading code; every prediction is checked by the server's validator
against the task's own data (its pages, its label list).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.detection import DetectionBackend
from serving.contract import Backend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._open_vocab_support import Plant, planted_family, save_dino
from tests.support.fakes import FakeResolver

PLANTS = [Plant("car", (0.1, 0.2, 0.5, 0.6)), Plant("truck", (0.0, 0.0, 0.2, 0.2), logit=3.0)]
SCORE_CAR, SCORE_TRUCK = 1 / (1 + math.exp(-6.0)), 1 / (1 + math.exp(-3.0))


@pytest.fixture(autouse=True)
def _flush_denormals() -> Any:
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


@pytest.fixture(scope="module")
def dino(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dino(tmp_path_factory.mktemp("own_images") / "dino", max_text_len=256)


def families() -> dict[str, type[Backend]]:
    return {"open_vocab": planted_family(PLANTS), "detection": DetectionBackend}


def predict(tmp_path: Path, dino: Path, config: str, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cfg = Settings(model_dir=str(tmp_path), max_wait_ms=2.0, load_wait_s=60.0, detector=str(dino))
    runtime = Runtime(cfg, families=families(), resolver=FakeResolver())
    client = create_app(cfg, runtime=runtime).test_client()
    assert client.post("/setup", json={"project": "1.1", "schema": config}).status_code == 200
    tasks = [{"id": i + 1, "data": d} for i, d in enumerate(data)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    schema = ConfigSchema.from_config(config)
    for prediction, task in zip(results, tasks, strict=True):
        kept, problems = filter_valid(schema, prediction["result"], task["data"], 0)
        assert problems == [] and kept == prediction["result"]
    return results


def found(prediction: dict[str, Any]) -> list[tuple[Any, ...]]:
    out = []
    for r in prediction["result"]:
        v = r["value"]
        out.append((r.get("item_index"), v["rectanglelabels"][0], r["original_width"], round(v["x"], 3)))
    return sorted(out)


def test_every_page_of_a_multi_page_document_is_predicted_with_its_item_index(
    tmp_path: Path, dino: Path
) -> None:
    # Label Studio 1.23.2's "Multi-page document annotation" template, with a label the detector finds
    config = (
        '<View><RectangleLabels name="rectangles" toName="pdf" showInline="true">'
        '<Label value="Title" background="green"/><Label value="Car" background="blue"/></RectangleLabels>'
        '<Image valueList="$pages" name="pdf"/></View>'
    )
    pages = ["http://x/600x400.jpg", "http://x/300x500.jpg", "http://x/200x200.jpg"]
    doc, single = predict(tmp_path, dino, config, [{"pages": pages}, {"pages": ["http://x/100x100.jpg"]}])
    assert found(doc) == [(0, "Car", 600, 10.0), (1, "Car", 300, 10.0), (2, "Car", 200, 10.0)]
    assert found(single) == [(0, "Car", 100, 10.0)]
    assert doc["score"] == pytest.approx(SCORE_CAR, abs=1e-4)
    # a page index the task does not have is refused
    bad = [{**doc["result"][0], "item_index": 3}]
    _, problems = filter_valid(ConfigSchema.from_config(config), bad, {"pages": pages}, 0)
    assert [p.code for p in problems] == ["bad_item_index"]


def test_visual_genome_dynamic_labels_prompt_each_task_with_its_list(tmp_path: Path, dino: Path) -> None:
    config = (
        '<View><RectangleLabels name="regions" toName="image" value="$regions"/>'
        '<Image name="image" value="$image"/></View>'
    )
    # with no DETECTOR named, the torchvision detector's tag goes to the open-vocabulary family
    (route,) = build_plan(config, Settings(), families()).routes
    assert route.family == "open_vocab" and "labels from each task's $regions" in route.reason
    first, second, empty = predict(
        tmp_path,
        dino,
        config,
        [
            {"image": "http://x/600x400.jpg", "regions": [{"value": "car"}, {"value": "bus"}]},
            {"image": "http://x/600x400.jpg", "regions": [{"value": "truck"}]},
            {"image": "http://x/600x400.jpg", "regions": []},
        ],
    )
    # a task that lists no label: nothing to predict, an empty result (not an error LS would retry)
    assert empty["result"] == [] and "error" not in empty
    assert found(first) == [(None, "car", 600, 10.0)]
    assert found(second) == [(None, "truck", 600, 0.0)]
    assert second["score"] == pytest.approx(SCORE_TRUCK, abs=1e-4)
