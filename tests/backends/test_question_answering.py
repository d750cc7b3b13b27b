"""Extractive QA for Label Studio's *Question answering* template: the answer span labelled "Answer".

A tiny random BERT question-answering model is built and saved by the test and loads through the
real loading code; its real forward runs and its start/end logits are planted: 8 at the passage's
"hawking" (start) and "radiation" (end) tokens, -8 elsewhere, and 12 at the first token ("no answer")
for a question with "cat" in it, so every answer is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from backends.ner import NerBackend
from backends.question_answering import QuestionAnsweringBackend
from backends.zero_shot_ner import ZeroShotNerBackend
from serving.cli import weights as weights_cli
from serving.contract import Backend
from serving.http.app import create_app
from serving.plan.planner import build_plan
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._open_vocab_support import bert_tokenizer
from tests.support.fakes import FakeResolver

# Label Studio 1.23.2's "Question Answering" template
CONFIG = """<View>
  <Header value="Please read the passage" />
  <Text name="text" value="$text" granularity="word"/>
  <Header value="Select a text span answering the following question:"/>
  <Text name="question" value="$question"/>
  <Labels name="answer" toName="text">
    <Label value="Answer" maxUsage="1" background="red"/>
  </Labels>
</View>"""
PASSAGE = "Black holes 😀 emit hawking radiation, so they can be detected."
WORDS = ("hawking", "radiation", "black", "holes", "emit", "detected", "how", "could", "be")


def save_qa(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random BERT for question answering (16 wide, 48 positions) with its tokenizer."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(extra=WORDS)
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=48,
    )
    BertForQuestionAnswering(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class PlantedQa(QuestionAnsweringBackend):
    """The real family; its loaded model's start/end logits are planted by token."""

    def load(self, device: str) -> None:
        super().load(device)
        real = self.model.forward
        vocab = self.tokenizer.get_vocab()
        hawking, radiation, cat = vocab["hawking"], vocab["radiation"], vocab["cat"]
        self.rows: list[int] = []

        def forward(input_ids: Any, **kwargs: Any) -> Any:
            out = real(input_ids=input_ids, **kwargs)
            self.rows.append(int(input_ids.shape[0]))
            start = torch.full_like(out.start_logits, -8.0)
            end = torch.full_like(out.end_logits, -8.0)
            start[input_ids == hawking] = 8.0
            end[input_ids == radiation] = 8.0
            no_answer = (input_ids == cat).any(dim=1)
            start[no_answer, 0] = 12.0
            end[no_answer, 0] = 12.0
            out.start_logits, out.end_logits = start, end
            return out

        self.model.forward = forward


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_qa(tmp_path_factory.mktemp("qa") / "tiny-qa")


def families() -> dict[str, type[Backend]]:
    return {"question_answering": PlantedQa, "zero_shot_ner": ZeroShotNerBackend, "ner": NerBackend}


def predict(tmp_path: Path, qa: Path, tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    from serving.inference.runtime import Runtime

    cfg = Settings(
        model_dir=str(tmp_path), max_wait_ms=20.0, load_wait_s=60.0, qa_model=str(qa), ner_engine="spacy"
    )
    runtime = Runtime(cfg, families=families(), resolver=FakeResolver())
    client = create_app(cfg, runtime=runtime).test_client()
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
    body = {"tasks": [{"id": i + 1, "data": d} for i, d in enumerate(tasks)], "label_config": CONFIG}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    schema = ConfigSchema.from_config(CONFIG)
    for prediction in results:
        valid, problems = filter_valid(schema, prediction["result"])
        assert valid == prediction["result"] and not problems
    return results, runtime


def test_the_qa_template_routes_to_question_answering(qa: Path) -> None:
    settings = Settings(qa_model=str(qa), ner_engine="spacy")
    plan = build_plan(CONFIG, settings, families())
    assert [(r.control, r.family, r.labels) for r in plan.routes] == [
        ("answer", "question_answering", ("Answer",))
    ]
    # no question beside the passage: GLiNER's labels, not QA
    plain = CONFIG.replace('<Text name="question" value="$question"/>', "")
    assert [r.family for r in build_plan(plain, settings, families()).routes] == ["zero_shot_ner"]
    missing = Settings(qa_model=str(qa / "nope"))
    spec = build_plan(CONFIG, missing, families()).targets[0].model
    reason = QuestionAnsweringBackend.availability(spec, missing)
    assert reason is not None and "python -m serving weights download --model question_answering" in reason
    assert weights_cli._owner("question_answering", families()) == "question_answering"


def test_answer_span_labelled_with_exact_offsets_and_no_answer_left_empty(tmp_path: Path, qa: Path) -> None:
    # a passage longer than one window (48 positions): the answer is in a later window
    long_passage = " ".join(["car"] * 60) + " " + PASSAGE
    results, runtime = predict(
        tmp_path,
        qa,
        [
            {"text": PASSAGE, "question": "How could black holes be detected?"},
            {"text": long_passage, "question": "How could black holes be detected?"},
            {"text": PASSAGE, "question": "Is it a cat?"},
        ],
    )
    for prediction, passage in zip(results[:2], (PASSAGE, long_passage), strict=True):
        (region,) = prediction["result"]
        start = passage.index("hawking")
        assert region["value"] == {
            "start": start,
            "end": start + len("hawking radiation"),
            "text": "hawking radiation",
            "labels": ["Answer"],
        }
        # start and end probabilities e^8 / (e^8 + n e^-8), n < 48 tokens
        assert region["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[2]["result"] == []  # the model's "no answer" wins
    backend = runtime.slot(runtime.plan(CONFIG).targets[0].model).backend
    assert sum(backend.rows) > 3  # the long passage took several windows
