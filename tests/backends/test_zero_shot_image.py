"""Zero-shot image classification (SigLIP) with the config's own choices, routed automatically.

A tiny random SigLIP is built and saved by the test and loads through the real loading code; on top
of the real model run, the image and text embeddings are planted (one-hot by the image's colour and by
the choice named in the prompt), so logits are exactly 10 * cos + (-5): 5 for the right choice, -5 else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from PIL import Image

from backends.classification import ClassificationBackend
from backends.zero_shot_image import ZeroShotImageBackend
from serving.contract import Backend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._open_vocab_support import bert_tokenizer
from tests.support.fakes import FakeResolver

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
# which choice word each colour's image is planted to match
PLANTED = {"weapons": 0, "violence": 1, "adult content": 2}
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="c" toName="image"{attrs}><Choice value="Adult content"/><Choice value="Weapons"/>'
    '<Choice value="Violence"/></Choices></View>'
)
P_SINGLE = math.exp(5) / (math.exp(5) + 2 * math.exp(-5))
P_SIGMOID = 1 / (1 + math.exp(-5))


def save_siglip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random SigLIP (16-dim towers, 32 px images) with a BERT tokenizer and SigLIP image processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    config = SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer.get_vocab()),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "image_size": 32,
            "patch_size": 8,
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    SiglipModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


class PlantedSiglip:
    """The loaded SigLIP; its real towers run, their embeddings are replaced by planted one-hots."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_calls = 0
        self.image_batches: list[int] = []
        self.logit_scale = torch.nn.Parameter(torch.tensor([math.log(10.0)]))
        self.logit_bias = torch.nn.Parameter(torch.tensor([-5.0]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def get_image_features(self, **kwargs: Any) -> Any:
        real = self.model.get_image_features(**kwargs).pooler_output
        pixels = kwargs["pixel_values"]
        self.image_batches.append(pixels.shape[0])
        planted = torch.zeros(pixels.shape[0], real.shape[-1])
        planted[torch.arange(pixels.shape[0]), pixels.mean(dim=(2, 3)).argmax(dim=1)] = 1.0
        return planted

    def get_text_features(self, **kwargs: Any) -> Any:
        real = self.model.get_text_features(**kwargs).pooler_output
        self.text_calls += 1
        planted = torch.zeros(real.shape[0], real.shape[-1])
        # the prompts the tokenizer was last called with, row by row (the tiny vocabulary has no such words)
        for row, text in enumerate(self.tokenizer.texts):
            for word, dim in PLANTED.items():
                if word in text.lower():
                    planted[row, dim] = 1.0
        return planted


class RecordingTokenizer:
    """The loaded tokenizer, remembering the texts of its last call."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts: list[str] = []

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.texts = list(texts)
        return self.tokenizer(texts, **kwargs)


class PlantedZeroShot(ZeroShotImageBackend):
    """The real family, its loaded model wrapped with planted embeddings."""

    def load(self, device: str) -> None:
        super().load(device)
        self.tokenizer = RecordingTokenizer(self.tokenizer)
        self.model = PlantedSiglip(self.model, self.tokenizer)


class ColourResolver(FakeResolver):
    """Images one colour, named in the URL (red.png, green.png, blue.png)."""

    def load_image(self, value: str, task_id: int | None = None, shrink: Any = None) -> Image.Image:
        self.calls.append(value)
        colour = next(c for c in COLOURS if c in value)
        return Image.new("RGB", (64, 48), COLOURS[colour])


@pytest.fixture(scope="module")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_siglip(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


def families() -> dict[str, type[Backend]]:
    return {"image_classification": ClassificationBackend, "zero_shot_image": PlantedZeroShot}


def app_for(tmp_path: Path, siglip: Path, **settings: Any) -> tuple[Flask, Runtime]:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"),
        max_wait_ms=20.0,
        load_wait_s=60.0,
        zero_shot_image_model=str(siglip),
        **settings,
    )
    runtime = Runtime(cfg, families=families(), resolver=ColourResolver())
    return create_app(cfg, runtime=runtime), runtime


def predict(app: Flask, config: str, images: list[str]) -> list[dict[str, Any]]:
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(images)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    assert len(results) == len(tasks)
    schema = ConfigSchema.from_config(config)
    for prediction in results:
        valid, problems = filter_valid(schema, prediction["result"])
        assert valid == prediction["result"] and not problems
    return results


def choices(prediction: dict[str, Any]) -> list[tuple[list[str], float]]:
    return [(r["value"]["choices"], r["score"]) for r in prediction["result"]]


def test_routing_sends_choices_imagenet_does_not_know_to_siglip(siglip: Path) -> None:
    settings = Settings(zero_shot_image_model=str(siglip))
    plan = build_plan(CONFIG.format(attrs=""), settings, families())
    assert [(r.family, r.model) for r in plan.routes] == [("zero_shot_image", str(siglip))]
    assert "Weapons" in plan.routes[0].reason
    # without the weights the route still names the family, so /setup answers 422 with the command
    missing = build_plan(
        CONFIG.format(attrs=""), Settings(zero_shot_image_model=str(siglip / "nope")), families()
    )
    spec = missing.targets[0].model
    assert spec.family == "zero_shot_image"
    reason = ZeroShotImageBackend.availability(spec, settings)
    assert reason is not None and "python -m serving weights download --model" in reason


def test_single_choice_per_image_colour_scored_by_softmax_over_the_choices(
    tmp_path: Path, siglip: Path
) -> None:
    app, runtime = app_for(tmp_path, siglip)
    config = CONFIG.format(attrs="")
    results = predict(app, config, ["http://x/red.png", "http://x/green.png", "http://x/blue.png"])
    assert [choices(r) for r in results] == [
        [(["Weapons"], pytest.approx(P_SINGLE))],
        [(["Violence"], pytest.approx(P_SINGLE))],
        [(["Adult content"], pytest.approx(P_SINGLE))],
    ]
    assert all(r["model_version"] and r["score"] == pytest.approx(P_SINGLE) for r in results)
    backend = runtime.slot(runtime.plan(config).targets[0].model).backend
    # the images went through in one batch; the prompts' text was embedded once and then reused
    assert sum(backend.model.image_batches) == 3
    predict(app, config, ["http://x/red.png"])
    assert backend.model.text_calls == 1


def test_multiple_choices_use_sigmoid_scores_and_the_threshold(tmp_path: Path, siglip: Path) -> None:
    app, _ = app_for(tmp_path, siglip)
    config = CONFIG.format(attrs=' choice="multiple" model_score_threshold="0.5"')
    (red,) = predict(app, config, ["http://x/red.png"])
    assert choices(red) == [(["Weapons"], pytest.approx(P_SIGMOID))]
    low = CONFIG.format(attrs=' choice="multiple" model_score_threshold="0.001"')
    (red,) = predict(app, low, ["http://x/red.png"])
    # every choice passes: the matching one first, the others at sigmoid(-5)
    assert choices(red) == [(["Weapons", "Adult content", "Violence"], pytest.approx(P_SIGMOID))]


def test_prompt_template_and_predicted_values_are_the_prompts(tmp_path: Path, siglip: Path) -> None:
    app, _ = app_for(tmp_path, siglip)
    config = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image" model_prompt="an image showing {label}">'
        '<Choice value="Guns" predicted_values="weapons,firearms"/><Choice value="Fight" predicted_values="violence"/>'
        "</Choices></View>"
    )
    results = predict(app, config, ["http://x/red.png", "http://x/green.png"])
    two = math.exp(5) / (math.exp(5) + math.exp(-5))
    assert [choices(r) for r in results] == [
        [(["Guns"], pytest.approx(two))],
        [(["Fight"], pytest.approx(two))],
    ]


def test_threshold_above_the_best_score_leaves_the_task_empty(tmp_path: Path, siglip: Path) -> None:
    app, _ = app_for(tmp_path, siglip)
    config = CONFIG.format(attrs=' model_score_threshold="1.0"')
    (red,) = predict(app, config, ["http://x/red.png"])
    assert red["result"] == []


def test_imagenet_choices_stay_with_the_classifier(siglip: Path) -> None:
    config = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image"><Choice value="Dog"/><Choice value="Cat"/></Choices></View>'
    )
    plan = build_plan(config, Settings(zero_shot_image_model=str(siglip)), families())
    assert [r.family for r in plan.routes] == ["image_classification"]
    named = config.replace('toName="image">', 'toName="image" model_name="siglip2">')
    plan = build_plan(named, Settings(), families())
    assert [(r.family, r.model) for r in plan.routes] == [("zero_shot_image", "siglip2")]
