"""One model_version per model state, and failed tasks that stay retryable, against a real Label Studio 1.23.2.

The bug these pin: a server connected while spaCy was still loading answered /setup with one
version and, once loaded, predictions with another; Label Studio then re-predicted tasks and the
labeling page showed two prediction tabs. And a task answered with an empty result after a failure
was marked as predicted for good.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import NER_CONFIG, OCR_CONFIG, drawn_rectangle, text_image
from tests.e2e.ls_harness import LabelStudio, MLServer, wait_until
from tests.support.httpserver import LocalServer, static

TEXTS = [
    "Barack Obama was born in Hawaii.",
    "Angela Merkel met Emmanuel Macron in Paris.",
    "Apple hired Tim Cook in California.",
    "Marie Curie worked in Paris.",
    "Nelson Mandela was freed in South Africa.",
]


@pytest.fixture
def cold_server(tmp_path: Path, label_studio: LabelStudio) -> Iterator[MLServer]:
    """Our server with nothing loaded at start (no WARMUP) and no waiting for a loading model."""
    server = MLServer(
        tmp_path / "cold",
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "WARMUP": "",
            # a task that arrives while its model loads fails at once (and is answered without a result)
            "LOAD_WAIT_S": "0",
        },
    )
    server.root.mkdir(parents=True, exist_ok=True)
    try:
        server.start(wait_models=False)
        yield server
    finally:
        server.stop()


def test_connecting_while_the_model_loads_gives_one_version_and_one_prediction_per_task(
    label_studio: LabelStudio, cold_server: MLServer
) -> None:
    """Retrieve while spaCy loads, open a task, retrieve all: one prediction per task, one version."""
    assert cold_server.health()["backends"] == {}  # cold: nothing loaded or loading
    project = int(label_studio.create_project("e2e versions", NER_CONFIG)["id"])
    ids = label_studio.import_json(project, [{"data": {"text": t}} for t in TEXTS])
    ml_id = int(label_studio.connect_ml(project, cold_server.url)["id"])  # /setup starts the load
    states = cold_server.health()["backends"]
    assert set(states.values()) == {"loading"}, states

    # "Retrieve predictions" on the first two tasks while the model is still loading
    label_studio.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": False, "included": ids[:2]}},
    )
    still_loading = set(cold_server.health()["backends"].values()) == {"loading"}
    stored_early = {i: len(label_studio.predictions(i)) for i in ids[:2]}
    # Open a third task (Label Studio predicts a task without predictions when it is opened).
    label_studio.task(ids[2])

    wait_until(
        lambda: set(cold_server.health()["backends"].values()) == {"ready"},
        120,
        "spaCy to load",
        cold_server.proc,
    )
    label_studio.retrieve_predictions(project)
    label_studio.retrieve_predictions(project)  # a second press finds nothing left to do

    recorded = label_studio.ml_backend(ml_id)["model_version"]
    setup = requests.post(f"{cold_server.url}/setup", json={"project": f"{project}.1", "schema": NER_CONFIG})
    assert setup.json()["model_version"] == recorded
    for task_id in ids:
        predictions = label_studio.predictions(task_id)
        assert len(predictions) == 1, (task_id, predictions)
        assert predictions[0]["model_version"] == recorded
    assert recorded in requests.get(f"{cold_server.url}/versions", timeout=10).json()["versions"]
    # The scenario really happened: the first press arrived while the model loaded, and the tasks it
    # could not predict were not stored (so a later press predicted them), not stored empty for good.
    assert still_loading, "spaCy finished loading before the first press: the race this pins did not happen"
    assert stored_early == {ids[0]: 0, ids[1]: 0}
    log = cold_server.proc.tail(200_000) if cold_server.proc else ""
    assert "is still loading; retry in a moment" in log


@pytest.fixture
def image_host() -> Iterator[LocalServer]:
    """An image host on loopback with no routes yet: every path answers 404 until a test adds it."""
    server = LocalServer({})
    yield server
    server.close()


def test_a_task_whose_image_cannot_be_fetched_is_predicted_once_it_can(
    label_studio: LabelStudio, ml_server: MLServer, image_host: LocalServer
) -> None:
    """The unreachable task holds no prediction (not an empty one) and the next press predicts it."""
    project = int(label_studio.create_project("e2e retry", OCR_CONFIG)["id"])
    ok = [
        label_studio.import_file(project, f"{w}.png", text_image(w), "image/png")[0]
        for w in ("HELLO", "WORLD")
    ]
    (late,) = label_studio.import_json(project, [{"data": {"ocr": f"{image_host.url}/late.png"}}])
    ml_id = int(label_studio.connect_ml(project, ml_server.url)["id"])
    assert label_studio.ml_backend(ml_id)["state"] == "CO"

    label_studio.retrieve_predictions(project)
    assert [len(label_studio.predictions(i)) for i in ok] == [1, 1]
    assert label_studio.predictions(late) == []
    # Opening it (the single-task path) opens fine and stores nothing either.
    assert label_studio.task(late)["id"] == late
    assert label_studio.predictions(late) == []
    # An interactive call on it answers an empty result with the reason (never stored by Label Studio).
    drawn = drawn_rectangle("drawn02", {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0})
    answer = label_studio.interactive(ml_id, late, [drawn])["data"]
    assert answer["result"] == [] and "404" in answer["error"], answer

    image_host.routes["/late.png"] = static(text_image("AGAIN"), "image/png")  # the image is back
    label_studio.retrieve_predictions(project)
    version = label_studio.ml_backend(ml_id)["model_version"]
    for task_id in (*ok, late):
        predictions = label_studio.predictions(task_id)
        assert len(predictions) == 1 and predictions[0]["model_version"] == version, predictions
    texts = [
        " ".join(r["value"]["text"])
        for r in label_studio.predictions(late)[0]["result"]
        if r["type"] == "textarea"
    ]
    assert texts == ["AGAIN"]
