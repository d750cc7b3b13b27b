"""OCR through the whole server: POST /predict on create_app() with the guide's config, batch and interactive."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image

from backends.ocr import OCRBackend
from serving.contract import ModelSpec
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.backends._ocr_support import (
    GUIDE_CONFIG,
    HELLO,
    THREE_LINES,
    Rendered,
    drawn_rect,
    render,
    validate,
)

PAGES: dict[str, Rendered] = {
    "hello.png": render(HELLO, size=(400, 142)),
    "lines.png": render(THREE_LINES, size=(640, 300)),
}


class PageResolver:
    """Serve the rendered pages by URL name, as the data resolver would after a download."""

    def load_image(self, value: str, task_id: int | None = None, shrink: Any = None) -> Image.Image:
        """Return the rendered page named by the URL's last path part."""
        return PAGES[value.rsplit("/", 1)[-1]].image.copy()

    def load_text(self, value: str, task_id: int | None = None) -> str:
        """Text is not used by OCR."""
        raise AssertionError("OCR reads images only")


ENGINES = [
    pytest.param("easyocr", marks=pytest.mark.slow),
    pytest.param("tesseract"),
]


def _skip_unavailable(engine: str) -> None:
    reason = OCRBackend.availability(ModelSpec("ocr", engine), Settings())
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module", params=ENGINES)
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    """Build the app over the OCR family alone, with the engine picked by OCR_ENGINE."""
    engine = request.param
    _skip_unavailable(engine)
    settings = Settings(
        model_dir=str(tmp_path_factory.mktemp("model_dir")), ocr_engine=engine, max_wait_ms=2.0
    )
    runtime = Runtime(settings, families={"ocr": OCRBackend}, resolver=PageResolver())
    app = create_app(settings, runtime=runtime)
    with app.test_client() as test_client:
        yield test_client
    runtime.close()


def _predict(client: FlaskClient, tasks: list[dict[str, Any]], context: Any = None) -> list[dict[str, Any]]:
    body = {"tasks": tasks, "label_config": GUIDE_CONFIG, "project": "1.1", "params": {"context": context}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    return results


def test_predict_batch_fills_the_guide_config(client: FlaskClient) -> None:
    """Two tasks in one request get their lines as linked, config-valid regions, in task order."""
    tasks = [
        {"id": 1, "data": {"ocr": "/data/upload/1/lines.png"}},
        {"id": 2, "data": {"ocr": "/data/upload/1/hello.png"}},
    ]
    results = _predict(client, tasks)
    lines_result, hello_result = results[0]["result"], results[1]["result"]
    assert [i["value"]["text"][0] for i in lines_result if i["type"] == "textarea"] == list(THREE_LINES)
    assert [i["value"]["text"][0] for i in hello_result if i["type"] == "textarea"] == ["HELLO"]
    for prediction in results:
        assert validate(GUIDE_CONFIG, prediction["result"]) == []
        assert isinstance(prediction["score"], float) and 0 < prediction["score"] <= 1
        assert prediction["model_version"]
    assert {i["type"] for i in lines_result} == {"rectangle", "labels", "textarea"}
    assert len({i["id"] for i in lines_result}) == 3


def test_predict_interactive_reads_the_drawn_region(client: FlaskClient) -> None:
    """params.context.result with a drawn rectangle gets that line's text under the drawn id."""
    page = PAGES["lines.png"]
    drawn = drawn_rect(page.boxes[1], page.image.size)
    results = _predict(client, [{"id": 7, "data": {"ocr": "/data/upload/1/lines.png"}}], {"result": [drawn]})
    items = results[0]["result"]
    textareas = [i for i in items if i["type"] == "textarea"]
    assert [(t["id"], t["value"]["text"]) for t in textareas] == [("drawn_1", ["Total amount due"])]
    assert any(i["id"] == "drawn_1" and i["type"] == "rectangle" for i in items)
    assert validate(GUIDE_CONFIG, items) == []


def test_health_lists_the_loaded_engine(client: FlaskClient) -> None:
    """After a prediction the engine is ready and /health says so."""
    backends = client.get("/health").get_json()["backends"]
    assert any(key.startswith("ocr:") and state == "ready" for key, state in backends.items())
