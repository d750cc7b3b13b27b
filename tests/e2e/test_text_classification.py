"""Text classification against a real Label Studio 1.23.2: its Text Classification template.

Our server runs as a real process with TEXT_CLASSIFICATION_MODEL pointing at a tiny BERT sequence
classifier whose head was planted to answer "Positive" for any text (zero weights, biases 3, 0, -3):
"Retrieve predictions" must store exactly one valid prediction per task, that choice, with its score.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.backends._text_cls_support import save_model
from tests.e2e.conftest import connect
from tests.e2e.ls_harness import LabelStudio, MLServer
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version

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
