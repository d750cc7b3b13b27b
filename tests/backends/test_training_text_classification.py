"""Text classification training through the job path: the CPU baseline and a fine-tuned tiny BERT.

The export is templated (spaCy-style separable data): each choice has its own keywords, mixed with
shared filler words. The zero-shot model knows none of these choices (its planted logits need the
choice's name in the text), so before training nothing passes the threshold (F1 0); after, the
held-out texts get their choice.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from serving.contract import ModelSpec
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from serving.util.files import write_json_atomic
from tests.backends._ocr_support import validate
from tests.backends._text_cls_support import PlantedText, save_model

FAMILIES = {"text_classification": PlantedText}
KEYWORDS = {
    "Billing": ("invoice", "charged", "refund", "payment"),
    "Delivery": ("parcel", "courier", "late", "shipping"),
    "Login": ("password", "account", "locked", "reset"),
}
FILLER = ("hello", "please", "help", "today", "again", "thanks", "my", "the")
CONFIG = """<View><Text name="text" value="$text"/>
  <Choices name="topic" toName="text" model_score_threshold="0.5">
    <Choice value="Billing"/><Choice value="Delivery"/><Choice value="Login"/>
  </Choices></View>"""


def corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """Return n (text, choice) pairs: two keywords of the choice among filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = list(KEYWORDS)[i % 3]
        words = [*rng.sample(KEYWORDS[label], 2), *rng.sample(FILLER, 4)]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def export(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Return a Label Studio JSON export of the pairs (one annotation per task)."""
    return [
        {
            "id": i + 1,
            "data": {"text": text},
            "annotations": [
                {
                    "id": i + 1,
                    "result": [
                        {
                            "from_name": "topic",
                            "to_name": "text",
                            "type": "choices",
                            "value": {"choices": [label]},
                        }
                    ],
                }
            ],
        }
        for i, (text, label) in enumerate(pairs)
    ]


def train_job(cfg: Settings, config: str, tasks: list[Any]) -> Any:
    store = TrainingStore.for_settings(cfg)
    spec = ModelSpec("text_classification", cfg.text_classification_model)
    job_id, _ = store.request("1", spec, "cpu", config, {"kind": "inline"}, "START_TRAINING")
    write_json_atomic(store.job_dir(job_id) / "data.json", tasks)
    job = store.claim("cpu")
    assert job is not None
    return run_job(job, store=store, versions=VersionStore.for_settings(cfg), families=FAMILIES, settings=cfg)


def served(cfg: Settings, config: str, texts: list[str]) -> list[list[str]]:
    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    answers = service.predict(
        [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)], label_config=config, project="1.1"
    )
    out = []
    for answer in answers:
        assert validate(config, answer["result"]) == []
        out.append([c for r in answer["result"] for c in r["value"]["choices"]])
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    words = tuple(w for ws in KEYWORDS.values() for w in ws) + FILLER
    nli = save_model(tmp_path / "nli", extra=words)
    return Settings(
        model_dir=str(tmp_path / "model_dir"), text_classification_model=str(nli), train_min_examples=10
    )


def test_the_cpu_baseline_learns_new_choices_in_seconds(settings: Settings) -> None:
    job = train_job(settings, CONFIG, export(corpus(60, seed=1)))
    assert job.state == "done", job.error
    metrics = job.metrics
    assert metrics["engine"] == "hashed-ngram baseline" and metrics["on"] == "held_out"
    assert metrics["before"]["f1"] == 0.0  # the zero-shot model knows none of these choices
    assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0
    fresh = corpus(9, seed=99)
    assert served(settings, CONFIG, [t for t, _ in fresh]) == [[label] for _, label in fresh]


@pytest.mark.slow
def test_a_transformer_is_fine_tuned_with_a_new_head(settings: Settings) -> None:
    # a 1-layer random BERT learns at a larger rate than the 3e-5 meant for pretrained ones
    cfg = settings.with_(train_allow_cpu=True, train_epochs=12, train_learning_rate=2e-2)
    job = train_job(cfg, CONFIG, export(corpus(60, seed=2)))
    assert job.state == "done", job.error
    assert job.metrics["engine"] == "fine-tuned transformer"
    assert job.metrics["before"]["f1"] == 0.0
    assert job.metrics["f1"] >= 0.5, job.metrics  # 12 small steps of a random 1-layer BERT
    losses = [h["loss"] for h in job.progress["history"]]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0], losses
    # the saved folder is a sequence classifier with the config's choices as its classes
    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    (spec,) = service.trained_models("1").values()
    backend = PlantedText(spec, cfg)
    backend.load("cpu")
    assert backend.labels() == ["Billing", "Delivery", "Login"] and not backend.zero_shot_model
