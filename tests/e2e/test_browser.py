"""What annotators see: headless chromium opens Label Studio's labeling page with our predictions."""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NER_CONFIG, NER_TEXTS, OCR_CONFIG, Project, SamSetup
from tests.e2e.ls_harness import REPO, Chromium, LabelStudio, MLServer

log = logging.getLogger(__name__)

# The page's visible text plus the values of its text fields (innerText leaves those out: the
# OCR transcription lives in the region list's textarea).
PAGE_STATE = """(() => ({
  text: document.body ? document.body.innerText : '',
  fields: Array.from(document.querySelectorAll('textarea, input[type=text]')).map(e => e.value),
}))()"""
README_IMAGES = REPO / "docs" / "img"
MAX_README_PNG_BYTES = 300 * 1024


@pytest.fixture(scope="module")
def browser(browser_ready: str, label_studio: LabelStudio, e2e_root: Path) -> Iterator[Chromium]:
    """Start chromium logged in to Label Studio through a session cookie; stop it afterwards."""
    chromium = Chromium(e2e_root / "chromium")
    chromium.root.mkdir(parents=True, exist_ok=True)
    try:
        chromium.start()
        chromium.set_cookie(label_studio.url, "sessionid", label_studio.login_session())
        yield chromium
    finally:
        chromium.stop()


def regions_panel(text: str) -> list[str]:
    """Return the lines of the Regions panel (the page text after its Regions/Relations tabs)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i in range(len(lines) - 1, 0, -1):
        if lines[i - 1] == "Regions" and lines[i] == "Relations":
            return lines[i + 1 :]
    return []


def open_task(browser: Chromium, ls: LabelStudio, project: Project, task_id: int) -> None:
    """Open a task's labeling page in the Data Manager."""
    browser.navigate(f"{ls.url}/projects/{project.id}/data?task={task_id}")


def save_screenshot(
    browser: Chromium, artifacts_dir: Path, name: str, rendered: Callable[[Any], bool]
) -> Path:
    """Save a screenshot of the rendered page under the artifacts (and docs/img with UPDATE_SCREENSHOTS=1)."""
    path = artifacts_dir / f"{name}.png"
    for _ in range(3):
        browser.screenshot(path)
        # Still rendered after the capture: the picture shows the regions, not a re-mount spinner.
        if rendered(browser.evaluate(PAGE_STATE)):
            break
        browser.wait_for(PAGE_STATE, rendered, f"{name} to render again")
    else:
        raise AssertionError(f"the page kept re-rendering while capturing {name}")
    assert path.stat().st_size > 10_000, "the screenshot is nearly empty"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        target = README_IMAGES / f"{name}.png"
        shutil.copyfile(path, target)
        if target.stat().st_size > MAX_README_PNG_BYTES:
            _shrink_png(target)
        log.info("updated %s (%d bytes)", target, target.stat().st_size)
    return path


def _shrink_png(path: Path) -> None:
    """Re-encode a PNG with a 256-colour palette (UI screenshots lose nothing visible)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())


def _ours(ls: LabelStudio, ml_server: MLServer, project: Project, task_id: int) -> str:
    """Make sure the task holds our prediction (the action is idempotent) and return its model_version."""
    ls.retrieve_predictions(project.id)
    predictions = ls.predictions(task_id)
    assert len(predictions) == 1 and predictions[0]["result"], predictions
    return str(predictions[0]["model_version"])


def test_ocr_labeling_page_shows_our_regions(
    browser: Chromium,
    label_studio: LabelStudio,
    ml_server: MLServer,
    ocr_project: Project,
    artifacts_dir: Path,
) -> None:
    """The OCR task opens with our prediction: a "Text" region whose transcription reads HELLO."""
    assert ocr_project.config == OCR_CONFIG
    task_id = ocr_project.task_ids[0]
    version = _ours(label_studio, ml_server, ocr_project, task_id)
    open_task(browser, label_studio, ocr_project, task_id)

    def rendered(state: Any) -> bool:
        return (
            isinstance(state, dict)
            and version in state["text"]
            and "Text" in regions_panel(state["text"])
            and "HELLO" in state["fields"]
        )

    state = browser.wait_for(PAGE_STATE, rendered, "our OCR region in the labeling page")
    # One region: its label, then its score; the transcription is the only filled text field.
    panel = regions_panel(state["text"])
    assert panel.count("Text") == 1, panel
    assert [f for f in state["fields"] if f.strip()] == ["HELLO"], state["fields"]
    save_screenshot(browser, artifacts_dir, "labeling-ocr", rendered)


def test_ner_labeling_page_shows_our_spans(
    browser: Chromium,
    label_studio: LabelStudio,
    ml_server: MLServer,
    ner_project: Project,
    artifacts_dir: Path,
) -> None:
    """The NER task opens with our prediction: Person "Barack Obama" and Location "Hawaii" in the region list."""
    assert ner_project.config == NER_CONFIG
    task_id = ner_project.task_ids[NER_TEXTS.index("Barack Obama was born in Hawaii.")]
    version = _ours(label_studio, ml_server, ner_project, task_id)
    open_task(browser, label_studio, ner_project, task_id)

    def rendered(state: Any) -> bool:
        return (
            isinstance(state, dict) and version in state["text"] and "Hawaii" in regions_panel(state["text"])
        )

    state = browser.wait_for(PAGE_STATE, rendered, "our NER spans in the labeling page")
    panel = regions_panel(state["text"])
    entries = [
        (panel[i - 1], panel[i]) for i in range(1, len(panel)) if panel[i] in {"Barack Obama", "Hawaii"}
    ]
    assert entries == [("Person", "Barack Obama"), ("Location", "Hawaii")], panel
    save_screenshot(browser, artifacts_dir, "labeling-ner", rendered)


# Clicks on the labeling page, as an annotator does them (DevTools mouse events on the page).
ELEMENT_RECT = """(() => {{
  const e = {query};
  if (!e) return null;
  const r = e.getBoundingClientRect();
  return [r.x, r.y, r.width, r.height];
}})()"""
AUTO_ANNOTATION = "Array.from(document.querySelectorAll('label')).find(l => l.innerText.trim() === '{text}')"
SMART_TOOLS = "document.querySelector('button.lsf-tool_smart:not([aria-label])')"
LABEL_BUTTON = "Array.from(document.querySelectorAll('.lsf-label')).find(l => l.innerText.replace(/\\s+/g, ' ').trim() === '{text}')"
# The image stage: Konva's canvases lie over the image.
STAGE = "document.querySelector('.konvajs-content canvas')"
# The regions of the annotation being edited, from the editor's store (window.Htx): [type, label,
# RLE length]. The region list shows the click's own keypoint with the same label while the answer
# is on its way; only the store tells a brush mask from it.
REGIONS = """(() => {
  const a = window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected;
  if (!a) return null;
  return a.regionStore.regions.map(r => [r.type, r.labelName || '', r.rle ? r.rle.length : 0]);
})()"""


def _rect(browser: Chromium, query: str, what: str) -> list[float]:
    rect = browser.wait_for(ELEMENT_RECT.format(query=query), lambda r: bool(r) and r[2] > 0, what, stable=2)
    return list(rect)


def _click(browser: Chromium, x: float, y: float) -> None:
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.send(
            "Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
        )


def test_sam_click_on_the_labeling_page_shows_a_mask(
    browser: Chromium, label_studio: LabelStudio, sam_setup: SamSetup, artifacts_dir: Path
) -> None:
    """Auto-Annotation on, the smart keypoint tool, a click on the disk: Label Studio shows our brush mask."""
    from tests.e2e.test_sam import cache_counter

    project = sam_setup.project
    (task_id,) = project.task_ids
    open_task(browser, label_studio, project, task_id)
    for toggle in ("Auto-Annotation", "Auto-Accept Suggestions"):
        x, y, _, h = _rect(browser, AUTO_ANNOTATION.format(text=toggle), f"the {toggle} toggle")
        _click(browser, x + 21, y + h / 2)
    x, y, w, h = _rect(browser, SMART_TOOLS, "the smart tools button")
    _click(browser, x + w / 2, y + h / 2)
    x, y, w, h = _rect(browser, LABEL_BUTTON.format(text="Cat 1"), "the keypoint label Cat")
    _click(browser, x + w / 2, y + h / 2)
    hits = cache_counter(sam_setup.server, "hits")
    x, y, w, h = _rect(browser, STAGE, "the image stage")
    _click(browser, x + 0.5 * w, y + 0.52 * h)  # the middle of the orange disk

    def rendered(state: Any) -> bool:
        return isinstance(state, dict) and "Cat" in regions_panel(state["text"])

    # Auto-Accept keeps the suggested mask and deletes the click: one brush region labelled Cat
    # whose RLE came from our server.
    (region,) = browser.wait_for(
        REGIONS,
        lambda r: isinstance(r, list) and [t for t, *_ in r] == ["brushregion"],
        "the brush mask from our server in the annotation",
    )
    assert region[1] == "Cat" and region[2] > 0, region
    browser.wait_for(PAGE_STATE, rendered, "the mask from our server in the region list")
    # the click went to our server and was answered from the cached embedding
    assert cache_counter(sam_setup.server, "hits") > hits
    assert cache_counter(sam_setup.server, "misses") == 1
    save_screenshot(browser, artifacts_dir, "labeling-sam", rendered)
