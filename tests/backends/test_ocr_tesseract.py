"""Tesseract engine (tesserocr + Debian's tesseract-ocr-eng): the same assertions as EasyOCR, where installed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from backends.ocr import OCRBackend
from serving.contract import ModelSpec
from serving.settings import Settings
from tests.backends._ocr_support import (
    GUIDE_CONFIG,
    HELLO,
    PAGE_CONFIG,
    THREE_LINES,
    Rendered,
    by_id,
    drawn_rect,
    iou,
    item_for,
    rect_px,
    region_texts,
    render,
    targets_for,
    validate,
)

pytest.importorskip("tesserocr")
SPEC = ModelSpec("ocr", "tesseract")
_missing = OCRBackend.availability(SPEC, Settings())
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"Tesseract not installed: {_missing}")


@pytest.fixture(scope="module")
def backend() -> Iterator[OCRBackend]:
    """Load Tesseract once for the module, with two page threads."""
    ocr = OCRBackend(SPEC, Settings())
    before = ocr.version()
    ocr.load("cpu")
    assert ocr.version() == before and "missing" not in before
    yield ocr
    ocr.close()


@pytest.fixture(scope="module")
def pages() -> dict[str, Rendered]:
    """Render the test pages."""
    return {"hello": render(HELLO, size=(400, 142)), "wide": render(THREE_LINES, size=(640, 300))}


@pytest.fixture(scope="module")
def outputs(backend: OCRBackend, pages: dict[str, Rendered]) -> dict[str, Any]:
    """Run one batch through preprocess + forward."""
    names = list(pages)
    out = backend.forward([backend.preprocess(item_for(pages[name])) for name in names])
    assert len(out) == len(names)
    return dict(zip(names, out, strict=True))


def test_hello_and_three_lines(outputs: dict[str, Any]) -> None:
    """ "HELLO" reads exactly; three lines come back in reading order with their exact strings."""
    assert [line.text for line in outputs["hello"]] == ["HELLO"]
    assert [line.text for line in outputs["wide"]] == list(THREE_LINES)
    assert all(0.5 < line.score <= 1.0 for line in outputs["wide"])


def test_linked_regions_match_rendered_boxes(
    backend: OCRBackend, outputs: dict[str, Any], pages: dict[str, Rendered]
) -> None:
    """One id per line links rectangle, label and text; rectangles sit on the rendered pixel boxes."""
    (target,) = targets_for(GUIDE_CONFIG)
    page = pages["wide"]
    items = backend.postprocess(outputs["wide"], target, item_for(page))
    groups = by_id(items)
    assert len(groups) == 3 and region_texts(items) == list(THREE_LINES)
    for group, truth in zip(groups.values(), page.boxes, strict=True):
        assert sorted(i["type"] for i in group) == ["labels", "rectangle", "textarea"]
        values = [i["value"] for i in group]
        assert all(
            {k: v[k] for k in ("x", "y", "width", "height")}
            == {k: values[0][k] for k in ("x", "y", "width", "height")}
            for v in values
        )
        got = rect_px(values[0], page.image.size)
        assert np.allclose(got, truth, atol=0.35 * (truth[3] - truth[1])), (got, truth)
        assert iou(got, truth) > 0.7
    assert validate(GUIDE_CONFIG, items) == []


def test_polygons_and_page_text(
    backend: OCRBackend, outputs: dict[str, Any], pages: dict[str, Rendered]
) -> None:
    """Polygon output is config-valid; a page-level TextArea gets the page text in order."""
    (target,) = targets_for(GUIDE_CONFIG, Settings(ocr_shape="polygon"))
    items = backend.postprocess(outputs["wide"], target, item_for(pages["wide"]))
    assert [len(i["value"]["points"]) for i in items if i["type"] == "polygon"] == [4, 4, 4]
    assert validate(GUIDE_CONFIG, items) == []
    (page_target,) = targets_for(PAGE_CONFIG)
    page_items = backend.postprocess(outputs["wide"], page_target, item_for(pages["wide"]))
    assert [i["value"]["text"] for i in page_items] == [["\n".join(THREE_LINES)]]


def test_interactive_rectangle_reads_that_line(backend: OCRBackend, pages: dict[str, Rendered]) -> None:
    """A drawn rectangle around the last line answers its text under the drawn id, well under a second."""
    page = pages["wide"]
    drawn = drawn_rect(page.boxes[2], page.image.size)
    context = {"result": [drawn]}
    targets = targets_for(GUIDE_CONFIG)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        out = backend.interactive(item_for(page, context), targets, context)
        timings.append(time.perf_counter() - started)
    assert out is not None and drawn in out
    (textarea,) = [i for i in out if i["type"] == "textarea"]
    assert textarea["id"] == "drawn_1" and textarea["value"]["text"] == ["Thank you"]
    assert validate(GUIDE_CONFIG, out) == []
    assert min(timings) < 1.0
