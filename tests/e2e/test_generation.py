"""Generated text against a real Label Studio 1.23.2: its Image Captioning and Text Summarization templates.

Our server runs as a real process on tiny Qwen3-VL and Qwen2 checkpoints whose weights were set to write
a fixed answer for any prompt (tests/backends/_llm_support.plant_bigram_answer): "Retrieve predictions"
must store one valid prediction per task holding that text, and the labeling page must show it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends._llm_support import build_text_model, build_vision_model, plant_bigram_answer
from tests.e2e.conftest import Project, connect, text_image
from tests.e2e.ls_harness import Chromium, LabelStudio, MLServer
from tests.e2e.test_browser import PAGE_STATE, open_task, save_screenshot
from tests.e2e.test_browser import browser as browser  # the fixture, for this module
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Label Studio 1.23.2's templates, as its template gallery creates them.
CAPTIONING = """<View>
  <Image name="image" value="$captioning"/>
  <Header value="Describe the image:"/>
  <TextArea name="caption" toName="image" placeholder="Enter description here..."
            rows="5" maxSubmissions="1"/>
</View>"""
SUMMARIZATION = """<View>
  <Header value="Please read the text" />
  <Text name="text" value="$text" />

  <Header value="Provide one sentence summary" />
  <TextArea name="answer" toName="text"
            showSubmitButton="true" maxSubmissions="1" editable="true"
            required="true" />
</View>"""
CAPTION = "Red box."
SUMMARY = "Cat nips."
TEXTS = [
    "There are two general approaches to automatic summarization: extraction and abstraction.",
    "The committee met on Tuesday and approved the budget for next year.",
    "A storm closed the harbour for two days.",
]


@pytest.fixture(scope="module")
def gen_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Start our server with the planted generation models (its own process, beside the session's)."""
    models = e2e_root / "llm"
    text = plant_bigram_answer(build_text_model(models / "lm", hidden=288, tied=False), SUMMARY)
    vision = plant_bigram_answer(build_vision_model(models / "vlm", hidden=288, tied=False), CAPTION)
    root = e2e_root / "ml-generation"
    server = MLServer(
        root,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "WARMUP": "vision_generation,text_generation",
            "LLM_TEXT_MODEL": str(text),
            "LLM_VISION_MODEL": str(vision),
        },
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-generation.log")


def _texts(prediction: dict[str, Any], from_name: str, to_name: str) -> list[str]:
    out = []
    for item in prediction["result"]:
        assert item["type"] == "textarea" and item["from_name"] == from_name and item["to_name"] == to_name
        out.extend(item["value"]["text"])
    return out


def test_image_captioning_template(label_studio: LabelStudio, gen_server: MLServer) -> None:
    """Two uploaded images: one stored prediction each, the caption in the TextArea, valid for the config."""
    project = label_studio.create_project("e2e captioning", CAPTIONING)
    connect(label_studio, gen_server, int(project["id"]))
    ids = []
    for name, words in (("one.png", "ONE"), ("two.png", "TWO")):
        ids += label_studio.import_file(int(project["id"]), name, text_image(words), "image/png")
    label_studio.retrieve_predictions(int(project["id"]))
    version = our_version(gen_server, CAPTIONING)
    for task_id in ids:
        prediction = only_prediction(label_studio, task_id, version)
        assert _texts(prediction, "caption", "image") == [CAPTION]
        assert_valid_prediction(CAPTIONING, prediction, label_studio.task(task_id)["data"])


def test_text_summarization_template(label_studio: LabelStudio, gen_server: MLServer) -> None:
    """Three texts: one stored summary each; a second "Retrieve predictions" adds none."""
    project = label_studio.create_project("e2e summarization", SUMMARIZATION)
    connect(label_studio, gen_server, int(project["id"]))
    ids = label_studio.import_json(int(project["id"]), [{"data": {"text": t}} for t in TEXTS])
    version = our_version(gen_server, SUMMARIZATION)
    for _ in range(2):
        label_studio.retrieve_predictions(int(project["id"]))
    for task_id in ids:
        prediction = only_prediction(label_studio, task_id, version)
        assert _texts(prediction, "answer", "text") == [SUMMARY]
        assert_valid_prediction(SUMMARIZATION, prediction, label_studio.task(task_id)["data"])


def test_labeling_page_shows_the_caption(
    browser: Chromium, label_studio: LabelStudio, gen_server: MLServer, artifacts_dir: Path
) -> None:
    """The captioning task opens with our prediction: the caption is shown under the TextArea."""
    project = label_studio.create_project("e2e captioning page", CAPTIONING)
    ml_id = connect(label_studio, gen_server, int(project["id"]))
    (task_id,) = label_studio.import_file(int(project["id"]), "cap.png", text_image("CAP"), "image/png")
    label_studio.retrieve_predictions(int(project["id"]))
    version = our_version(gen_server, CAPTIONING)
    only_prediction(label_studio, task_id, version)
    open_task(browser, label_studio, Project(int(project["id"]), ml_id, CAPTIONING, [task_id]), task_id)

    def rendered(state: Any) -> bool:
        # the page shortens the version ("vision_g...575f34"): its end names our prediction
        return isinstance(state, dict) and version[-6:] in state["text"] and CAPTION in state["text"]

    browser.wait_for(PAGE_STATE, rendered, "our caption in the labeling page")
    save_screenshot(browser, artifacts_dir, "labeling-caption", rendered)
