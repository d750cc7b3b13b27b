"""Open-vocabulary detection through the app, POST /batch and the command line, with planted answers.

The tiny random checkpoints load through the real loading code; on top of the real model run, known
boxes are planted for known prompt phrases (tests/backends/_open_vocab_support.py), so a config's
labels must come back as the right `rectanglelabels` at the right place, valid for the config.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

import model
from backends.detection import DetectionBackend
from serving.cli import main as cli
from serving.contract import Backend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._open_vocab_support import Plant, planted_family, save_dino, save_owl
from tests.support.fakes import FakeResolver

PLANTS = [
    Plant("car", (0.1, 0.2, 0.5, 0.6)),
    Plant("hi-vis jacket", (0.6, 0.6, 0.9, 0.9), logit=3.0),
    Plant("truck", (0.0, 0.0, 0.2, 0.2)),  # not in any config: never prompted, never emitted
]
SCORE_CAR, SCORE_VEST = 1 / (1 + math.exp(-6.0)), 1 / (1 + math.exp(-3.0))


@pytest.fixture(autouse=True)
def _flush_denormals() -> Any:
    """Random weights produce denormal floats that make CPU runs crawl."""
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints; this Grounding DINO takes the real 256-token prompts."""
    root = tmp_path_factory.mktemp("ov_app")
    return {"dino": save_dino(root / "dino", max_text_len=256), "owl": save_owl(root / "owl")}


def families() -> dict[str, type[Backend]]:
    """The planted open-vocabulary family beside the real torchvision detection family."""
    return {"open_vocab": planted_family(PLANTS), "detection": DetectionBackend}


def app_for(tmp_path: Path, resolver: Any = None, **settings: Any) -> Flask:
    """Return an app over the planted families (blank images sized by the URL unless a resolver is given)."""
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0, load_wait_s=60.0, **settings)
    runtime = Runtime(cfg, families=families(), resolver=resolver or FakeResolver())
    return create_app(cfg, runtime=runtime)


def rect_config(folder: Path, labels: str, model_name: str = "grounding_dino", extra: str = "") -> str:
    """Return a RectangleLabels config whose model loads from a local checkpoint folder."""
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image" model_name="{model_name}" model_path="{folder}"{extra}>'
        f"{labels}</RectangleLabels></View>"
    )


LABELS = '<Label value="Car"/><Label value="Vest" predicted_values="safety vest,hi-vis jacket"/><Label value="Forklift"/>'


def predict(app: Flask, config: str, images: list[str]) -> list[dict[str, Any]]:
    """POST /setup then /predict; return the per-task predictions."""
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(images)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    assert len(results) == len(tasks)
    return results


def boxes(prediction: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    """Return {label: (x, y, width, height, score)} of a prediction's rectanglelabels (one per label)."""
    out = {}
    for region in prediction["result"]:
        if region["type"] == "rectanglelabels":
            (label,) = region["value"]["rectanglelabels"]
            assert label not in out
            v = region["value"]
            out[label] = (v["x"], v["y"], v["width"], v["height"], region["score"])
    return out


def assert_valid(config: str, prediction: dict[str, Any]) -> None:
    """Check a prediction with the SDK's validator and the server's own (nothing may be dropped)."""
    interface = LabelInterface(config)
    sdk_result = [r for r in prediction["result"] if r["type"] != "labels"]
    assert (
        interface.validate_prediction(
            {"result": sdk_result, "score": prediction["score"]}, return_errors=True
        )
        == []
    )
    kept, problems = filter_valid(ConfigSchema.from_config(config), prediction["result"], {"image": "x"}, 0)
    assert problems == [] and len(kept) == len(prediction["result"])


def test_known_boxes_come_back_under_the_labels_that_prompted_them(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = rect_config(checkpoints["dino"], LABELS)
    app = app_for(tmp_path)
    predictions = predict(app, config, ["http://x/600x400.jpg", "http://x/300x500.png"])
    for prediction, (w, h) in zip(predictions, [(600, 400), (300, 500)], strict=True):
        assert_valid(config, prediction)
        found = boxes(prediction)
        assert set(found) == {"Car", "Vest"}  # Forklift was prompted but nothing grounded it
        assert found["Car"] == pytest.approx((10.0, 20.0, 40.0, 40.0, SCORE_CAR), abs=1e-3)
        assert found["Vest"] == pytest.approx((60.0, 60.0, 30.0, 30.0, SCORE_VEST), abs=1e-3)
        for region in prediction["result"]:
            assert (region["original_width"], region["original_height"]) == (w, h)
        assert prediction["score"] == pytest.approx((SCORE_CAR + SCORE_VEST) / 2, abs=1e-4)
        assert prediction["model_version"].startswith("open_vocab-")


def test_model_score_threshold_per_tag(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    config = rect_config(checkpoints["dino"], LABELS, extra=' model_score_threshold="0.96"')
    (prediction,) = predict(app_for(tmp_path), config, ["http://x/600x400.jpg"])
    assert set(boxes(prediction)) == {"Car"}  # Vest scores 0.953


def test_three_hundred_labels_run_as_chunks_and_map_back(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    many = "".join(f'<Label value="Part {i}" predicted_values="part{i}"/>' for i in range(298))
    # Car first, Vest last: their phrases land in the first and the last prompt chunk
    labels = '<Label value="Car"/>' + many + '<Label value="Vest" predicted_values="hi-vis jacket"/>'
    config = rect_config(checkpoints["dino"], labels)
    app = app_for(tmp_path)
    (prediction,) = predict(app, config, ["http://x/640x480.jpg"])
    assert_valid(config, prediction)
    found = boxes(prediction)
    assert set(found) == {"Car", "Vest"}
    assert found["Car"][:4] == pytest.approx((10.0, 20.0, 40.0, 40.0), abs=1e-3)
    assert found["Vest"][:4] == pytest.approx((60.0, 60.0, 30.0, 30.0), abs=1e-3)
    rows = _backend(app).model.calls
    assert len(rows) == 1 and rows[0][0] > 1, "one model call holds every prompt chunk of the image"
    assert rows[0][1] <= 256


def _backend(app: Flask) -> Any:
    """Return the loaded open-vocabulary backend of the app's runtime."""
    runtime: Runtime = app.extensions["lsml_model"].runtime
    (slot,) = [s for s in runtime._slots.values() if s.spec.family == "open_vocab"]
    return slot.backend


def test_plain_rectangle_with_labels_and_owlv2(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    config = (
        '<View><Image name="image" value="$image"/>'
        f'<Rectangle name="box" toName="image" model_name="owlv2" model_path="{checkpoints["owl"]}"/>'
        '<Labels name="kind" toName="image"><Label value="Car"/><Label value="Safety vest" '
        'predicted_values="hi-vis jacket"/></Labels></View>'
    )
    (prediction,) = predict(app_for(tmp_path), config, ["http://x/600x400.jpg"])
    assert_valid(config, prediction)
    rects = {r["id"]: r for r in prediction["result"] if r["type"] == "rectangle"}
    labels = {r["id"]: r for r in prediction["result"] if r["type"] == "labels"}
    assert rects.keys() == labels.keys() and len(rects) == 2
    by_label = {labels[i]["value"]["labels"][0]: rects[i]["value"] for i in rects}
    # OWLv2 boxes are relative to the image padded to a square of its longer side (600)
    car = by_label["Car"]
    assert (car["x"], car["y"], car["width"], car["height"]) == pytest.approx(
        (10.0, 30.0, 40.0, 60.0), abs=1e-3
    )
    vest = by_label["Safety vest"]
    assert (vest["x"], vest["y"], vest["width"]) == pytest.approx((60.0, 90.0, 30.0), abs=1e-3)
    assert vest["height"] == pytest.approx(10.0, abs=1e-3)  # clamped at the image's bottom edge


def test_setup_answers_422_with_the_fetch_command_when_weights_are_missing(tmp_path: Path) -> None:
    config = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image" model_name="owlv2">'
        '<Label value="Car"/></RectangleLabels></View>'
    )
    client = app_for(tmp_path).test_client()
    resp = client.post("/setup", json={"project": "1.1", "schema": config})
    assert resp.status_code == 422
    assert "python -m serving weights download --model owlv2" in json.dumps(resp.get_json())


def write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    """Write images of the given sizes into a folder."""
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (90, 120, 30)).save(folder / name)


def test_batch_job_over_an_image_folder(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    sizes = {"a.png": (64, 48), "b.jpg": (90, 120)}
    write_images(root / "shots", sizes)
    cfg = Settings(model_dir=str(tmp_path / "md"), batch_input_root=str(root), max_wait_ms=1.0)
    client = create_app(cfg, runtime=Runtime(cfg, families=families())).test_client()
    config = rect_config(checkpoints["dino"], LABELS)
    response = client.post("/batch", json={"label_config": config, "input": str(root / "shots")})
    assert response.status_code == 202, response.json
    job_id = response.json.get("job_id") or response.json["id"]
    deadline = time.time() + 60
    while client.get(f"/jobs/{job_id}").json["state"] not in {"done", "failed"} and time.time() < deadline:
        time.sleep(0.05)
    assert client.get(f"/jobs/{job_id}").json["state"] == "done"
    tasks = json.loads(client.get(f"/jobs/{job_id}/result").get_data(as_text=True))
    assert len(tasks) == 2
    for task in tasks:
        (prediction,) = task["predictions"]
        found = boxes(prediction)
        assert set(found) == {"Car", "Vest"}
        assert found["Car"][:4] == pytest.approx((10.0, 20.0, 40.0, 40.0), abs=1e-3)
        region = prediction["result"][0]
        assert (region["original_width"], region["original_height"]) == sizes[
            Path(task["data"]["image"]).name
        ]


def test_command_line_predict(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "md"))
    write_images(tmp_path / "images", {"one.png": (200, 100), "two.png": (100, 200)})
    config_file = tmp_path / "labeling.xml"
    config = rect_config(checkpoints["owl"], LABELS, model_name="owlv2")
    config_file.write_text(config)
    out = tmp_path / "out.json"
    argv = [
        "predict",
        "--config",
        str(config_file),
        "--input",
        str(tmp_path / "images"),
        "--output",
        str(out),
    ]
    assert cli.main([*argv, "--quiet"], families=families) == 0
    tasks = json.loads(out.read_text())
    assert len(tasks) == 2
    for task in tasks:
        (prediction,) = task["predictions"]
        assert_valid(config, prediction)
        assert set(boxes(prediction)) == {"Car", "Vest"}
    # the importable file passes the validate command too
    assert (
        cli.main(["validate", "--config", str(config_file), "--input", str(out)], families=model.families)
        == 0
    )
