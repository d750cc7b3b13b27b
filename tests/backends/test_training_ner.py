"""NER training through the job path: spaCy (the real en_core_web_sm) and a tiny random BERT."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends._ner_train import bio_tags, span_f1, token_labels
from backends.ner import SPACY_DEFAULT, NerBackend
from serving.contract import ModelSpec
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from serving.util.files import write_json_atomic
from tests.support import ner_corpus as nc

FAMILIES = {"ner": NerBackend}
UNSEEN_DRUGS = ("Nexoprin", "Palvitrol", "Gravelox", "Tenuvant", "Orbicel", "Wexamine")


def train_job(cfg: Settings, spec: ModelSpec, config: str, tasks: list[Any]) -> Any:
    store = TrainingStore.for_settings(cfg)
    job_id, _ = store.request("1", spec, "cpu", config, {"kind": "inline"}, "START_TRAINING")
    write_json_atomic(store.job_dir(job_id) / "data.json", tasks)
    job = store.claim("cpu")
    assert job is not None
    return run_job(job, store=store, versions=VersionStore.for_settings(cfg), families=FAMILIES, settings=cfg)


def predicted(
    service: ModelService, project: str, config: str, texts: list[str]
) -> list[set[tuple[int, int, str]]]:
    answers = service.predict([{"data": {"text": t}} for t in texts], label_config=config, project=project)
    out = []
    for text, answer in zip(texts, answers, strict=True):
        spans = set()
        for item in answer["result"]:
            value = item["value"]
            assert text[value["start"] : value["end"]] == value["text"]
            spans.add((value["start"], value["end"], value["labels"][0]))
        out.append(spans)
    return out


def test_token_labels_follow_character_spans() -> None:
    tags = bio_tags(["Person", "Drug"])
    assert tags == ["O", "B-Person", "I-Person", "B-Drug", "I-Drug"]
    tag_id = {t: i for i, t in enumerate(tags)}
    # "[CLS] john smith takes zol ##va ##rex . [SEP]" over "John Smith takes Zolvarex."
    offsets = np.array([[0, 0], [0, 4], [5, 10], [11, 16], [17, 20], [20, 22], [22, 25], [25, 26], [0, 0]])
    special = np.array([True, False, False, False, False, False, False, False, True])
    labels = token_labels(offsets, special, [(0, 10, "Person"), (17, 25, "Drug")], tag_id)
    assert [tags[i] if i >= 0 else "-" for i in labels] == [
        "-", "B-Person", "I-Person", "O", "B-Drug", "I-Drug", "I-Drug", "O", "-",
    ]  # fmt: skip


def test_span_f1() -> None:
    gold = [[(0, 4, "A"), (5, 9, "B")], [(0, 3, "A")]]
    found = [[(0, 4, "A"), (5, 8, "B")], [(0, 3, "A"), (4, 6, "A")]]
    scores = span_f1(gold, found)
    assert scores["per_label"]["A"]["f1"] == pytest.approx(0.8)
    assert scores["per_label"]["B"]["f1"] == 0.0
    assert scores["f1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3), abs=1e-4)


@pytest.mark.slow
def test_spacy_learns_a_new_label_and_keeps_what_it_knew(tmp_path: Path) -> None:
    cfg = Settings(model_dir=str(tmp_path), ner_engine="spacy", train_epochs=6, train_min_examples=10)
    job = train_job(cfg, ModelSpec("ner", SPACY_DEFAULT), nc.CONFIG, nc.export(nc.corpus(40, seed=1)))
    assert job.state == "done", job.error
    losses = [h["loss"] for h in job.progress["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] / 2
    assert job.metrics["on"] == "train" and job.metrics["per_label"]["Drug"]["f1"] > 0.9

    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    test = nc.corpus(24, seed=2, drugs=UNSEEN_DRUGS)  # drug names it never saw, in new sentences
    gold = [set(spans) for _, spans in test]
    texts = [t for t, _ in test]
    before = predicted(service, "2.1", nc.CONFIG, texts)  # another project: the pretrained model
    after = predicted(service, "1.1", nc.CONFIG, texts)
    f1_before = {label: nc.f1(gold, before, label) for label in nc.LABELS}
    f1_after = {label: nc.f1(gold, after, label) for label in nc.LABELS}
    assert f1_before["Drug"] == 0.0 and f1_after["Drug"] > 0.8, (f1_before, f1_after)
    for label in ("Person", "Location", "Organization"):
        assert f1_after[label] >= f1_before[label] - 0.1, (label, f1_before, f1_after)
    # entity types the config does not ask for are rehearsed, not forgotten
    trained = next(iter(service.trained_models("1").values()))
    backend = NerBackend(trained, cfg)
    backend.load("cpu")
    text = "Barack Obama was born in Hawaii on August 4, 1961 and paid $200."
    (spans,) = backend.forward([text])
    assert {(text[s.start : s.end], s.label) for s in spans} >= {
        ("Barack Obama", "PERSON"),
        ("Hawaii", "GPE"),
        ("August 4, 1961", "DATE"),
    }
    assert "Drug" in backend.labels()


@pytest.mark.slow
def test_transformers_token_classifier_trains_through_the_job_path(tmp_path: Path) -> None:
    import torch
    import transformers

    from tests.backends.test_ner_transformers import _config, _tokenizer, _vocab

    base = tmp_path / "bert"
    base.mkdir()
    torch.manual_seed(0)
    transformers.BertForTokenClassification(_config(len(_vocab()), 64)).save_pretrained(base)
    _tokenizer(base, 64).save_pretrained(base)
    config = nc.CONFIG.replace('<Labels name="label"', f'<Labels name="label" model_name="{base}"')
    # a 2-layer random BERT learns at a larger rate than the 5e-5 meant for pretrained ones
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"), train_epochs=10, train_min_examples=4, train_learning_rate=5e-3
    )
    texts = nc.corpus(24, seed=3)  # two batches an epoch
    job = train_job(cfg, ModelSpec("ner", str(base)), config, nc.export(texts))
    assert job.state == "done", job.error
    losses = [h["loss"] for h in job.progress["history"]]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # every epoch lower
    # the saved model serves through the same decoder: the config's labels, exact offsets
    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    (spec,) = service.trained_models("1").values()
    backend = NerBackend(spec, cfg)
    backend.load("cpu")
    assert set(backend.labels()) == set(nc.LABELS)
    found = predicted(service, "1.1", config, [t for t, _ in texts])  # offsets checked in predicted()
    # ten small steps already find part of the training spans (the job's own metric agrees)
    assert nc.f1([set(s) for _, s in texts], found, None) == pytest.approx(job.metrics["f1"], abs=1e-3)
    assert job.metrics["f1"] > 0.2
