"""Our server against a real Label Studio 1.23.2: connect, batch, open, interactive, PAT auth, errors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import (
    NER_CONFIG,
    NER_OPEN_TEXT,
    NER_TEXTS,
    OCR_CONFIG,
    RATING_CONFIG,
    Project,
    connect,
    drawn_rectangle,
    start_ml_server,
    text_box_pct,
    text_image,
)
from tests.e2e.ls_harness import LabelStudio, MLServer, group_alive, port_open

# What the server answers on /setup when it cannot fill a config (serving/plan/planner.py).
CANNOT_FILL = "cannot fill any control tag"


def our_version(server: MLServer, config: str) -> str:
    """Return the model_version our server reports for a config (what Label Studio must store)."""
    resp = requests.post(f"{server.url}/setup", json={"project": "probe.1", "schema": config}, timeout=30)
    resp.raise_for_status()
    return str(resp.json()["model_version"])


def assert_valid_prediction(config: str, prediction: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """Check a stored prediction: numeric score, config-valid regions (SDK and our own validator)."""
    from label_studio_sdk.label_interface import LabelInterface

    from serving.results.schema import ConfigSchema
    from serving.results.validation.files import check_prediction

    score = prediction["score"]
    assert isinstance(score, int | float) and math.isfinite(score), prediction
    for item in prediction["result"]:
        assert isinstance(item.get("score", 0.0), int | float), item
    errors = LabelInterface(config).validate_prediction({"result": prediction["result"]}, return_errors=True)
    assert errors == [], errors
    problems = check_prediction(ConfigSchema.from_config(config), prediction, data, deep=True)
    assert problems == [], [str(p) for p in problems]


def only_prediction(ls: LabelStudio, task_id: int, version: str) -> dict[str, Any]:
    """Return the task's single stored prediction, asserting there is exactly one and it is ours."""
    predictions = ls.predictions(task_id)
    assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions: {predictions}"
    assert predictions[0]["model_version"] == version
    return predictions[0]


def spans(prediction: Mapping[str, Any], text: str) -> set[tuple[str, str]]:
    """Return {(span text, label)} of an NER prediction, checking offsets against the text."""
    found: set[tuple[str, str]] = set()
    for item in prediction["result"]:
        value = item["value"]
        assert text[value["start"] : value["end"]] == value["text"], item
        assert item["from_name"] == "label" and item["to_name"] == "text" and item["type"] == "labels"
        found.update((value["text"], label) for label in value["labels"])
    return found


def ocr_lines(prediction: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return one {id, label, text, box} per OCR region, checking that each id has all three items."""
    by_id: dict[str, dict[str, Any]] = {}
    for item in prediction["result"]:
        entry = by_id.setdefault(item["id"], {"id": item["id"]})
        value = item["value"]
        if item["type"] == "textarea":
            entry["text"] = " ".join(value["text"])
        elif item["type"] == "labels":
            entry["label"] = value["labels"]
        elif item["type"] == "rectangle":
            entry["box"] = {k: value[k] for k in ("x", "y", "width", "height")}
    for entry in by_id.values():
        assert {"label", "text", "box"} <= set(entry), f"region {entry['id']} lacks an item: {entry}"
    return list(by_id.values())


def overlap(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Return the intersection over union of two percent rectangles."""
    ix = max(0.0, min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]))
    iy = max(0.0, min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]))
    inter = ix * iy
    return inter / (a["width"] * a["height"] + b["width"] * b["height"] - inter)


# ---------------------------------------------------------------- connection


def test_connected_with_our_model_version(
    label_studio: LabelStudio, ml_server: MLServer, ner_project: Project, ocr_project: Project
) -> None:
    """Label Studio shows our server as Connected with the model_version our /setup reports."""
    for project in (ner_project, ocr_project):
        backend = label_studio.ml_backend(project.ml_id)
        assert backend["state"] == "CO", backend
        assert backend["model_version"] == our_version(ml_server, project.config)
        assert backend["url"] == ml_server.url
    versions = requests.get(f"{ml_server.url}/versions", timeout=10).json()["versions"]
    assert our_version(ml_server, NER_CONFIG) in versions
    assert our_version(ml_server, NER_CONFIG) != our_version(ml_server, OCR_CONFIG)


# ---------------------------------------------------------------- NER


def test_ner_retrieve_predictions_action(
    label_studio: LabelStudio, ml_server: MLServer, ner_project: Project
) -> None:
    """The Data Manager action stores one valid prediction per task with the expected entities."""
    version = our_version(ml_server, NER_CONFIG)
    label_studio.retrieve_predictions(ner_project.id)
    found = {}
    for task_id, text in zip(ner_project.task_ids, NER_TEXTS, strict=True):
        prediction = only_prediction(label_studio, task_id, version)
        assert_valid_prediction(NER_CONFIG, prediction, {"text": text})
        found[text] = spans(prediction, text)
    assert found[NER_TEXTS[0]] == {("Barack Obama", "Person"), ("Hawaii", "Location")}
    # spaCy finds "yesterday" (DATE); the config has no such label, so nothing is stored for it.
    assert found[NER_TEXTS[2]] == set()
    # Running the action again asks for nothing new: every task already has our model_version.
    label_studio.retrieve_predictions(ner_project.id)
    for task_id in ner_project.task_ids:
        only_prediction(label_studio, task_id, version)


def test_ner_opening_a_task_predicts_it(
    label_studio: LabelStudio, ml_server: MLServer, ner_project: Project
) -> None:
    """Opening a task without predictions makes Label Studio call /predict and store ours."""
    (task_id,) = label_studio.import_json(ner_project.id, [{"data": {"text": NER_OPEN_TEXT}}])
    assert label_studio.predictions(task_id) == []
    label_studio.task(task_id)
    prediction = only_prediction(label_studio, task_id, our_version(ml_server, NER_CONFIG))
    assert_valid_prediction(NER_CONFIG, prediction, {"text": NER_OPEN_TEXT})
    assert spans(prediction, NER_OPEN_TEXT) == {("Barack Obama", "Person"), ("London", "Location")}


# ---------------------------------------------------------------- OCR


def test_ocr_retrieve_predictions_fetches_the_upload(
    label_studio: LabelStudio, ml_server: MLServer, ocr_project: Project
) -> None:
    """An image uploaded to Label Studio is fetched from /data/upload with the token and read as HELLO."""
    (task_id,) = ocr_project.task_ids
    data = label_studio.task_data(ocr_project.id, task_id)
    assert str(data["ocr"]).startswith("/data/upload/"), data
    label_studio.retrieve_predictions(ocr_project.id)
    prediction = only_prediction(label_studio, task_id, our_version(ml_server, OCR_CONFIG))
    assert_valid_prediction(OCR_CONFIG, prediction, data)
    lines = ocr_lines(prediction)
    assert [line["text"] for line in lines] == ["HELLO"], lines
    assert lines[0]["label"] == ["Text"]
    assert overlap(lines[0]["box"], text_box_pct("HELLO", pad_px=0)) > 0.5, lines[0]["box"]


def test_ocr_opening_a_task_predicts_it(
    label_studio: LabelStudio, ml_server: MLServer, ocr_project: Project
) -> None:
    """Opening an uploaded image task without predictions stores our OCR prediction."""
    (task_id,) = label_studio.import_file(ocr_project.id, "world.png", text_image("WORLD"), "image/png")
    assert label_studio.predictions(task_id) == []
    label_studio.task(task_id)
    prediction = only_prediction(label_studio, task_id, our_version(ml_server, OCR_CONFIG))
    assert_valid_prediction(OCR_CONFIG, prediction, label_studio.task_data(ocr_project.id, task_id))
    assert [line["text"] for line in ocr_lines(prediction)] == ["WORLD"]


def test_ocr_interactive_region_gets_its_text(
    label_studio: LabelStudio, ml_server: MLServer, ocr_project: Project
) -> None:
    """A rectangle the annotator draws comes back with a textarea of the same id holding its text."""
    (task_id,) = ocr_project.task_ids[:1]
    before = len(label_studio.predictions(task_id))
    box = text_box_pct("HELLO")
    drawn = drawn_rectangle("drawn01", box)
    answer = label_studio.interactive(ocr_project.ml_id, task_id, [drawn])
    assert "errors" not in answer, answer
    result = answer["data"]["result"]
    texts = [r for r in result if r["type"] == "textarea"]
    assert [(r["id"], r["from_name"], r["value"]["text"]) for r in texts] == [
        ("drawn01", "transcription", ["HELLO"])
    ], result
    assert texts[0]["value"]["x"] == pytest.approx(box["x"])
    assert isinstance(answer["data"]["score"], int | float)
    assert answer["data"]["model_version"] == our_version(ml_server, OCR_CONFIG)
    # Interactive answers go to the browser only; Label Studio stores nothing.
    assert len(label_studio.predictions(task_id)) == before


# ---------------------------------------------------------------- errors


def test_connecting_a_config_we_cannot_fill_shows_our_reason(
    label_studio: LabelStudio, ml_server: MLServer
) -> None:
    """Connecting our server to a Rating-only project is refused, and Label Studio quotes our reason."""
    project = label_studio.create_project("e2e rating", RATING_CONFIG)
    refused = label_studio.session.post(
        f"{label_studio.url}/api/ml", json={"url": ml_server.url, "project": project["id"]}, timeout=60
    )
    assert refused.status_code == 400, refused.text
    # Label Studio keeps only str(requests.HTTPError) of a failed /setup: "<status> Client Error: <reason
    # phrase> for url: ...". Our message reaches the user only through the HTTP reason phrase.
    assert CANNOT_FILL in refused.text, refused.text


def test_project_changed_to_a_config_we_cannot_fill_shows_error(
    label_studio: LabelStudio, ml_server: MLServer
) -> None:
    """A connected backend whose project config changes to one we cannot fill turns to Error, with our reason."""
    project = label_studio.create_project("e2e NER then rating", NER_CONFIG)
    ml_id = connect(label_studio, ml_server, int(project["id"]))
    label_studio.api("PATCH", f"/api/projects/{project['id']}", json={"label_config": RATING_CONFIG})
    backend = label_studio.ml_backend(ml_id)
    assert backend["state"] == "ER", backend
    assert CANNOT_FILL in (backend.get("error_message") or ""), backend


# ---------------------------------------------------------------- personal access token


def test_personal_access_token_fetches_uploads(label_studio: LabelStudio, e2e_root: Path) -> None:
    """With legacy tokens off for the organization, a server given a PAT still fetches uploads."""
    pat = label_studio.api("POST", "/api/token/")["token"]
    server: MLServer | None = None
    try:
        label_studio.api(
            "POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False}
        )
        label_studio.use_personal_access_token(pat)
        project = label_studio.create_project("e2e OCR with PAT", OCR_CONFIG)
        (task_id,) = label_studio.import_file(int(project["id"]), "pat.png", text_image("HELLO"), "image/png")
        upload = label_studio.task_data(int(project["id"]), task_id)["ocr"]
        # The legacy token no longer opens uploads: a prediction now proves the PAT exchange worked.
        assert (
            label_studio.download(upload, {"Authorization": f"Token {label_studio.token}"}).status_code == 401
        )
        assert label_studio.download(upload, {"Authorization": f"Bearer {pat}"}).status_code == 401

        server = start_ml_server(e2e_root / "ml-server-pat", label_studio, pat, warmup="ocr")
        connect(label_studio, server, int(project["id"]))
        label_studio.retrieve_predictions(int(project["id"]))
        prediction = only_prediction(label_studio, task_id, our_version(server, OCR_CONFIG))
        assert [line["text"] for line in ocr_lines(prediction)] == ["HELLO"]
        # Stopped by PID: the whole process group is gone and the port is free again.
        server.stop()
        assert server.proc is not None and not group_alive(server.proc.pid)
        assert not port_open(server.port)
    finally:
        if server is not None:
            server.stop()
        label_studio.api(
            "POST", "/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}
        )
        label_studio.use_legacy_token()
