"""Text classification against a real Label Studio 1.23.2: its Text Classification template, and training.

Our server runs as a real process with TEXT_CLASSIFICATION_MODEL pointing at a tiny BERT sequence
classifier whose head was planted to answer "Positive" for any text (zero weights, biases 3, 0, -3):
"Retrieve predictions" must store exactly one valid prediction per task, that choice, with its score.
Training: 60 templated texts annotated through the API, "Start Training", the job fits the CPU
baseline in the trainer process, Label Studio shows the new version, and "Retrieve predictions" on
held-out texts stores predictions of that version with their own choices.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.backends._text_cls_support import save_model
from tests.backends.test_training_text_classification import CONFIG as TOPICS
from tests.backends.test_training_text_classification import FILLER, KEYWORDS, corpus
from tests.e2e.conftest import connect
from tests.e2e.ls_harness import LabelStudio, MLServer, wait_until
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version
from tests.e2e.test_training import retrieve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Label Studio 1.23.2's template, as its template gallery creates it.
TEXT_CLASSIFICATION = """<View>
  <Text name="text" value="$text"/>
  <View style="box-shadow: 2px 2px 5px #999;
               padding: 20px; margin-top: 2em;
               border-radius: 5px;">
    <Header value="Choose text sentiment"/>
    <Choices name="sentiment" toName="text"
             choice="single" showInLine="true">
      <Choice value="Positive"/>
      <Choice value="Negative"/>
      <Choice value="Neutral"/>
    </Choices>
  </View>
</View>"""
TEXTS = [
    "This is a great 3D movie that delivers everything almost right in your face.",
    "The plot was thin and the ending dragged.",
    "It is a film.",
]
SCORE = math.exp(3) / (math.exp(3) + 1 + math.exp(-3))


def planted_classifier(folder: Path) -> Path:
    """Save a tiny BERT classifier that answers Positive for any text (only its head's biases speak)."""
    from transformers import AutoModelForSequenceClassification

    save_model(folder, {0: "Positive", 1: "Negative", 2: "Neutral"})
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([3.0, 0.0, -3.0]))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cls_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Start our server with the planted classifier as the default text classification model."""
    model = planted_classifier(e2e_root / "text-cls" / "planted")
    root = e2e_root / "ml-text-cls"
    server = MLServer(
        root,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "WARMUP": "text_classification",
            "TEXT_CLASSIFICATION_MODEL": str(model),
        },
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-text-cls.log")


def test_text_classification_template(label_studio: LabelStudio, cls_server: MLServer) -> None:
    """Three texts: one stored prediction each, the planted choice; a second "Retrieve predictions" adds none."""
    project = label_studio.create_project("e2e text classification", TEXT_CLASSIFICATION)
    connect(label_studio, cls_server, int(project["id"]))
    ids = label_studio.import_json(int(project["id"]), [{"data": {"text": t}} for t in TEXTS])
    version = our_version(cls_server, TEXT_CLASSIFICATION)
    assert "text_classification" in version
    for _ in range(2):
        label_studio.retrieve_predictions(int(project["id"]))
    for task_id in ids:
        prediction = only_prediction(label_studio, task_id, version)
        (item,) = prediction["result"]
        assert (item["from_name"], item["to_name"], item["type"]) == ("sentiment", "text", "choices")
        assert item["value"]["choices"] == ["Positive"]
        assert item["score"] == pytest.approx(SCORE, abs=1e-4)
        assert_valid_prediction(TEXT_CLASSIFICATION, prediction, label_studio.task(task_id)["data"])


@pytest.fixture(scope="module")
def train_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Our server with training on and a tiny random NLI model as the zero-shot default."""
    words = tuple(w for ws in KEYWORDS.values() for w in ws) + FILLER
    model = save_model(e2e_root / "text-cls" / "random-nli", extra=words)
    root = e2e_root / "ml-text-cls-train"
    server = MLServer(
        root,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "WARMUP": "text_classification",
            "TEXT_CLASSIFICATION_MODEL": str(model),
            "TRAIN_IDLE_S": "20",
        },
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-text-cls-train.log")


def _choice(ls: LabelStudio, task_id: int, version: str) -> list[str]:
    mine = [p for p in ls.predictions(task_id) if p["model_version"] == version]
    assert len(mine) == 1, (task_id, version, [p["model_version"] for p in ls.predictions(task_id)])
    return [c for item in mine[0]["result"] for c in item["value"]["choices"]]


def test_start_training_and_the_new_version_predicts(
    label_studio: LabelStudio, train_server: MLServer
) -> None:
    ls, server = label_studio, train_server
    train_items, held_items = corpus(60, seed=21), corpus(30, seed=22)
    project = int(ls.create_project("e2e text classification training", TOPICS)["id"])
    ml_id = connect(ls, server, project)
    base_version = ls.ml_backend(ml_id)["model_version"]
    train_ids = ls.import_json(project, [{"data": {"text": t}} for t, _ in train_items])
    held_ids = ls.import_json(project, [{"data": {"text": t}} for t, _ in held_items])
    for task_id, (_, label) in zip(train_ids, train_items, strict=True):
        result = [{"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
        ls.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})
    ls.api("POST", f"/api/ml/{ml_id}/train", json={})

    def settled() -> dict[str, Any] | None:
        jobs = [
            j
            for j in requests.get(f"{server.url}/jobs", timeout=10).json()["jobs"]
            if j.get("kind") == "training"
        ]
        mine = [j for j in jobs if j["project"] == str(project)]
        if not mine or any(j["state"] in ("queued", "running") for j in mine):
            return None
        return max(mine, key=lambda j: j["created_at"])

    last = wait_until(settled, 600, "the training job to finish", server.proc, every=1.0)
    job = requests.get(f"{server.url}/jobs/{last['job_id']}", timeout=10).json()
    assert job["state"] == "done", job
    assert job["metrics"]["engine"] == "hashed-ngram baseline" and job["metrics"]["f1"] >= 0.9, job["metrics"]
    new_version = job["model_version"]
    assert new_version and new_version != base_version
    wait_until(
        lambda: ls.ml_backend(ml_id)["model_version"] == new_version, 120, "Label Studio's new version"
    )
    retrieve(ls, project, held_ids)
    found = [_choice(ls, task_id, new_version) for task_id in held_ids]
    right = sum(f == [label] for f, (_, label) in zip(found, held_items, strict=True))
    assert right >= 27, (right, found)
