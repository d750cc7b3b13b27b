"""OCR planning: which controls the OCR family claims, links and consumes (no model loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.ocr import OCRBackend
from serving.contract import ModelSpec
from serving.plan.planner import build_plan, parse_config
from serving.settings import Settings
from tests.backends._ocr_support import GUIDE_CONFIG, PAGE_CONFIG


def plan(config: str, settings: Settings | None = None):  # type: ignore[no-untyped-def]
    """Plan with the OCR family alone."""
    return build_plan(config, settings or Settings(), {"ocr": OCRBackend})


def linked_names(target) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Return {role: control name} of a target's links."""
    return {role: control.name for role, control in target.linked.items()}


def test_guide_config_claims_rectangle_and_links_the_rest() -> None:
    """Rectangle is primary; Labels, per-region TextArea and the Polygon are linked and consumed."""
    result = plan(GUIDE_CONFIG)
    assert [t.control.name for t in result.targets] == ["bbox"]
    (target,) = result.targets
    assert linked_names(target) == {"labels": "label", "textarea": "transcription", "alternate_shape": "poly"}
    assert target.model == ModelSpec("ocr", "easyocr")
    assert target.label_map("text") == "Text"
    assert result.unfilled == ()


def test_polygon_when_asked_by_setting_or_tag() -> None:
    """OCR_SHAPE=polygon, or ocr_shape="polygon" on a tag, makes the Polygon primary."""
    by_setting = plan(GUIDE_CONFIG, Settings(ocr_shape="polygon")).targets
    assert [t.control.name for t in by_setting] == ["poly"]
    assert linked_names(by_setting[0])["alternate_shape"] == "bbox"
    by_tag = plan(
        GUIDE_CONFIG.replace('<Polygon name="poly"', '<Polygon name="poly" ocr_shape="polygon"')
    ).targets
    assert [t.control.name for t in by_tag] == ["poly"]


def test_only_polygon_is_primary_when_alone() -> None:
    """A config with only a PolygonLabels gets polygons, its own labels, no separate labels link."""
    config = """<View><Image name="img" value="$image"/>
      <PolygonLabels name="lines" toName="img"><Label value="Printed"/></PolygonLabels>
      <TextArea name="txt" toName="img" perRegion="true"/></View>"""
    (target,) = plan(config).targets
    assert target.control.name == "lines"
    assert linked_names(target) == {"textarea": "txt"}
    assert target.label_map("text") == "Printed"  # through the family's aliases


def test_page_textarea_alone_leaves_rectangles_to_others() -> None:
    """A page-level TextArea (often a comment box) is claimed, RectangleLabels is not."""
    config = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="objects" toName="image"><Label value="Car"/></RectangleLabels>
      <TextArea name="comment" toName="image"/></View>"""
    result = plan(config)
    assert [t.control.name for t in result.targets] == ["comment"]
    assert result.unfilled == ("objects (RectangleLabels)",)


def test_page_textarea_is_its_own_target() -> None:
    """The page-level TextArea of PAGE_CONFIG is a target of its own."""
    (target,) = plan(PAGE_CONFIG).targets
    assert target.control.tag == "TextArea" and not target.linked


def test_model_names_pick_engine_and_languages() -> None:
    """model_name on any OCR tag picks the engine; languages follow a colon; settings give defaults."""
    tess = GUIDE_CONFIG.replace(
        '<TextArea name="transcription"', '<TextArea name="transcription" model_name="tesseract"'
    )
    assert plan(tess).targets[0].model.name == "tesseract"
    multi = GUIDE_CONFIG.replace(
        '<Rectangle name="bbox"', '<Rectangle name="bbox" model_name="easyocr:en,fr"'
    )
    assert plan(multi).targets[0].model.name == "easyocr:en,fr"
    assert plan(GUIDE_CONFIG, Settings(ocr_languages=("en", "de"))).targets[0].model.name == "easyocr:en,de"
    assert (
        plan(GUIDE_CONFIG, Settings(ocr_engine="tesseract", ocr_languages=("en", "de"))).targets[0].model.name
        == "tesseract:eng+deu"
    )
    assert OCRBackend.accepts_model("Tesseract:deu") and not OCRBackend.accepts_model("yolov8n")


def test_foreign_model_name_and_no_text_are_not_claimed() -> None:
    """A geometry tag naming another family's model, or an image with no text controls, is left alone."""
    foreign = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="objects" toName="image" model_name="yolov8n"><Label value="Car"/></RectangleLabels>
      <TextArea name="txt" toName="image" perRegion="true"/></View>"""
    objects, controls = parse_config(foreign)
    claims = OCRBackend.claim(objects["image"], controls, Settings())
    assert [c.control.name for c in claims] == []  # per-region TextArea without an OCR shape: nothing to fill
    plain = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="objects" toName="image"><Label value="Car"/></RectangleLabels></View>"""
    objects, controls = parse_config(plain)
    assert OCRBackend.claim(objects["image"], controls, Settings()) == []


def test_availability_explains_missing_weights(tmp_path: Path) -> None:
    """Missing EasyOCR weights or Tesseract data give a message that says what to install."""
    pytest.importorskip("easyocr")
    message = OCRBackend.availability(ModelSpec("ocr", "easyocr", str(tmp_path)), Settings())
    assert message is not None and "craft_mlt_25k.pth" in message and str(tmp_path) in message
    message = OCRBackend.availability(ModelSpec("ocr", "tesseract:xyz"), Settings())
    assert message is not None and "apt-get install" in message


def test_version_changes_with_engine() -> None:
    """The version names the engine and fingerprints its weights (no load needed)."""
    easy = OCRBackend(ModelSpec("ocr", "easyocr"), Settings()).version()
    tess = OCRBackend(ModelSpec("ocr", "tesseract"), Settings()).version()
    assert easy.startswith("easyocr-") and tess.startswith("tesseract-") and easy != tess
