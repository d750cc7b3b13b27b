"""Which family fills which tag once generation is in the registry: OCR, classification and NER keep theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends import registry
from backends.generation import TextGenerationBackend, VisionGenerationBackend
from serving.plan.planner import build_plan
from serving.settings import Settings

OCR_TEMPLATE = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>
  <Rectangle name="bbox" toName="image"/>
  <Polygon name="poly" toName="image"/>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"/>
</View>"""
CAPTION = """<View><Image name="image" value="$captioning"/>
  <TextArea name="caption" toName="image" placeholder="Enter description here..."/></View>"""
BOXES_AND_COMMENT = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels>
  <TextArea name="comment" toName="image"/></View>"""
PAGE_TRANSCRIPTION = """<View><Image name="image" value="$image"/>
  <TextArea name="transcription" toName="image"/></View>"""
IMAGE_CHOICES = """<View><Image name="image" value="$image"/>
  <Choices name="kind" toName="image"><Choice value="Cat"/><Choice value="Dog"/></Choices>
  <Choices name="mood" toName="image" model_name="vlm"><Choice value="Calm"/><Choice value="Wild"/></Choices>
</View>"""
TEXT_WITH_SPANS = """<View><Text name="text" value="$text"/>
  <Labels name="ner" toName="text"><Label value="PER"/></Labels>
  <Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices>
  <TextArea name="notes" toName="text"/></View>"""


def _owners(config: str, settings: Settings) -> dict[str, str]:
    plan = build_plan(config, settings, registry())
    return {t.control.name: t.model.family for t in plan.targets}


@pytest.fixture
def bare(tmp_path: Path) -> Settings:
    """No generation model present (the test's HF cache is empty)."""
    return Settings(
        model_dir=str(tmp_path),
        llm_text_model=str(tmp_path / "none"),
        llm_vision_model=str(tmp_path / "none"),
    )


def _with_models(settings: Settings, tmp_path: Path) -> Settings:
    """Settings whose generation checkpoints look present (config + weights files), nothing loads."""
    for name in ("lm", "vlm"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x")
    return settings.with_(llm_text_model=str(tmp_path / "lm"), llm_vision_model=str(tmp_path / "vlm"))


def test_ocr_template_stays_ocr(bare: Settings, tmp_path: Path) -> None:
    for settings in (bare, _with_models(bare, tmp_path)):
        owners = _owners(OCR_TEMPLATE, settings)
        assert owners == {"bbox": "ocr"}


def test_captioning_template_is_generation_even_without_weights(bare: Settings) -> None:
    """A pure captioning config is ours (its /setup then says how to fetch the model), never OCR's."""
    assert _owners(CAPTION, bare) == {"caption": "vision_generation"}
    # a TextArea named as a transcription stays OCR's page text
    assert _owners(PAGE_TRANSCRIPTION, bare) == {"transcription": "ocr"}


def test_comment_box_beside_boxes_is_ours_only_when_the_model_is_here(bare: Settings, tmp_path: Path) -> None:
    """Without a model the config keeps working as before (OCR fills the comment), no new 422."""
    assert _owners(BOXES_AND_COMMENT, bare) == {"box": "detection", "comment": "ocr"}
    ready = _with_models(bare, tmp_path)
    assert _owners(BOXES_AND_COMMENT, ready) == {"box": "detection", "comment": "vision_generation"}


def test_image_choices_stay_the_classifiers_unless_named(bare: Settings) -> None:
    assert _owners(IMAGE_CHOICES, bare) == {"kind": "image_classification", "mood": "vision_generation"}


def test_text_choices_and_notes_only_with_a_model(bare: Settings, tmp_path: Path) -> None:
    """NER keeps Labels; a TextArea beside them is generated only where a model can answer.

    Choices naming no model are text classification's (zero-shot), with or without a language model.
    """
    assert _owners(TEXT_WITH_SPANS, bare) == {"ner": "ner", "sentiment": "text_classification"}
    ready = _with_models(bare, tmp_path)
    assert _owners(TEXT_WITH_SPANS, ready) == {
        "ner": "ner",
        "sentiment": "text_classification",
        "notes": "text_generation",
    }
    # a server configured counts as a model that can answer; tags then name it
    remote = bare.with_(llm_base_url="http://127.0.0.1:1/v1", llm_model="m")
    plan = build_plan(TEXT_WITH_SPANS, remote, registry())
    assert {t.control.name: t.model.name for t in plan.targets if t.model.family == "text_generation"} == {
        "notes": "openai",
    }


def test_registry_order_puts_text_generation_last() -> None:
    families = list(registry())
    assert families[-1] == "text_generation"
    assert families.index("vision_generation") < families.index("ocr")
    assert registry()["text_generation"] is TextGenerationBackend
    assert registry()["vision_generation"] is VisionGenerationBackend


def test_weights_download_names_route_to_the_families(caplog: pytest.LogCaptureFixture) -> None:
    """`--model vlm` / `--model llm` reach their family; a plain download fetches neither (several GB)."""
    import logging

    from serving.cli.weights import _owner

    assert _owner("vlm", registry()) == "vision_generation"
    assert _owner("llm", registry()) == "text_generation"
    with caplog.at_level(logging.INFO, logger="backends.generation"):
        assert TextGenerationBackend.download_weights([], Settings()) == []
    assert "fetch it with --model llm" in caplog.text
