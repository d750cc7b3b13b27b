"""Batch jobs: streaming inputs, chunked commits, progress, failures, cancel, kill-and-resume, HTTP routes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from serving.errors import BadRequest, ConfigError, NotFound
from serving.fetch.local import LocalFileResolver
from serving.jobs.inputs import resolve_input_path
from serving.jobs.manager import JobManager
from serving.jobs.output import iter_result_text
from serving.jobs.runner import JobRunner
from serving.jobs.store import JobNotReady, JobStore, create_store
from serving.results.schema import ConfigSchema
from serving.results.validation.files import validate_file
from serving.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TEXT_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="parity" toName="text"><Choice value="even"/><Choice value="odd"/></Choices>
</View>"""
IMAGE_CONFIG = """<View>
  <Image name="img" value="$picture"/>
  <Choices name="shape" toName="img"><Choice value="wide"/><Choice value="tall"/></Choices>
</View>"""


def parity_prediction(task: dict[str, Any]) -> dict[str, Any]:
    n = int(task["data"]["text"].split()[-1])
    choice = "even" if n % 2 == 0 else "odd"
    item = {
        "id": f"r{n}",
        "from_name": "parity",
        "to_name": "text",
        "type": "choices",
        "value": {"choices": [choice]},
    }
    return {"result": [{**item, "score": 0.9}], "score": 0.9, "model_version": "parity-1"}


class FakePredict:
    """A fake runtime.predict: records calls, optional delay per chunk, raises on 'BOOM' tasks."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.lock:
            self.calls.append(len(tasks))
        if self.delay_s:
            time.sleep(self.delay_s)
        if any("BOOM" in t["data"]["text"] for t in tasks):
            raise ValueError("model exploded")
        return [parity_prediction(t) for t in tasks]


def text_tasks(n: int) -> list[dict[str, Any]]:
    return [{"text": f"task number {i}"} for i in range(n)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(model_dir=str(tmp_path / "model_dir"))


def test_job_of_2000_tasks_moves_progress_and_returns_every_task_once_in_order(settings: Settings) -> None:
    predict = FakePredict(delay_s=0.01)
    manager = JobManager(settings, predict, chunk_size=50)
    try:
        job_id = manager.create(TEXT_CONFIG, tasks=text_tasks(2000))
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = manager.status(job_id)
            seen.append(status)
            if status["state"] == "done":
                break
            time.sleep(0.02)
        final = seen[-1]
        assert final["state"] == "done"
        assert (final["done"], final["total"], final["failed"]) == (2000, 2000, 0)
        dones = [s["done"] for s in seen]
        assert dones == sorted(dones)  # progress never goes back
        running = [s for s in seen if s["state"] == "running" and 0 < s["done"] < 2000]
        assert len({s["done"] for s in running}) >= 3
        assert all(s["rate_per_s"] > 0 and s["eta_s"] is not None and s["eta_s"] >= 0 for s in running)
        assert final["model_version"] == "parity-1"
        assert sum(predict.calls) == 2000 and max(predict.calls) == 50

        body = "".join(manager.result(job_id, "json"))
        tasks = json.loads(body)
        assert [t["data"]["text"] for t in tasks] == [f"task number {i}" for i in range(2000)]
        assert all(len(t["predictions"]) == 1 for t in tasks)
        assert tasks[7]["predictions"][0]["result"][0]["value"]["choices"] == ["odd"]
        assert validate_file(ConfigSchema.from_config(TEXT_CONFIG), tasks) == []

        lines = "".join(manager.result(job_id, "jsonl")).splitlines()
        assert len(lines) == 2000
        assert json.loads(lines[1999])["data"]["text"] == "task number 1999"
    finally:
        manager.close()


def test_a_failing_task_is_isolated_recorded_and_still_in_the_output(settings: Settings) -> None:
    predict = FakePredict()
    manager = JobManager(settings, predict, chunk_size=10)
    tasks = text_tasks(30)
    tasks[13] = {"data": {"text": "BOOM 13"}, "id": 1013}
    try:
        job_id = manager.create(TEXT_CONFIG, tasks=tasks)
        status = manager.wait(job_id, 30)
        assert status["state"] == "done"
        assert status["failed"] == 1
        assert status["failures"] == [{"index": 13, "task_id": 1013, "reason": "ValueError: model exploded"}]
        out = json.loads("".join(manager.result(job_id)))
        assert len(out) == 30
        assert out[13] == {"data": {"text": "BOOM 13"}, "id": 1013}  # kept, without a prediction
        assert all(len(t["predictions"]) == 1 for i, t in enumerate(out) if i != 13)
        # the chunk holding the bad task was retried one task at a time
        assert predict.calls.count(1) == 10
    finally:
        manager.close()


def test_runtime_failures_are_recorded_per_task(settings: Settings, tmp_path: Path) -> None:
    from serving.inference.runtime import TaskFailure

    def predict(
        label_config: str, tasks: list[dict[str, Any]], failures: list[Any] | None = None
    ) -> list[Any]:
        out = []
        for i, task in enumerate(tasks):
            if task["data"]["text"].endswith(" 2"):
                assert failures is not None
                failures.append(TaskFailure(i, None, "image 404"))
                out.append({"result": [], "score": 0.0, "model_version": "parity-1"})
            else:
                out.append(parity_prediction(task))
        return out

    store = create_store(tmp_path / "j.sqlite", TEXT_CONFIG, tasks=text_tasks(5))
    store.close()
    meta = JobRunner(settings, predict, chunk_size=2).run(tmp_path / "j.sqlite")
    assert meta is not None and meta["state"] == "done" and meta["failed"] == 1
    store = JobStore(tmp_path / "j.sqlite")
    out = json.loads("".join(iter_result_text(store)))
    assert "predictions" not in out[2] and len(out[3]["predictions"]) == 1


def test_existing_predictions_are_kept_and_ours_appended(settings: Settings) -> None:
    manager = JobManager(settings, FakePredict(), autostart=False)
    old = {"result": [], "score": 0.1, "model_version": "old"}
    out = manager.predict_now(TEXT_CONFIG, [{"data": {"text": "n 4"}, "predictions": [old]}, {"text": "n 5"}])
    assert [p["model_version"] for p in out[0]["predictions"]] == ["old", "parity-1"]
    assert out[1]["data"] == {"text": "n 5"} and len(out[1]["predictions"]) == 1


def test_cancel_stops_a_running_job_and_delete_removes_a_finished_one(settings: Settings) -> None:
    manager = JobManager(settings, FakePredict(delay_s=0.05), chunk_size=5)
    try:
        job_id = manager.create(TEXT_CONFIG, tasks=text_tasks(500))
        while manager.status(job_id)["done"] < 10:
            time.sleep(0.01)
        with pytest.raises(JobNotReady):
            manager.result(job_id)
        assert manager.cancel(job_id)["cancel_requested"] is True
        status = manager.wait(job_id, 10)
        assert status["state"] == "cancelled"
        assert 10 <= status["done"] < 500
        assert manager.cancel(job_id) == {"job_id": job_id, "state": "deleted"}
        with pytest.raises(NotFound):
            manager.status(job_id)
    finally:
        manager.close()


def test_a_stopped_manager_leaves_the_job_resumable_by_the_next_one(settings: Settings) -> None:
    first = JobManager(settings, FakePredict(delay_s=0.02), chunk_size=10)
    job_id = first.create(TEXT_CONFIG, tasks=text_tasks(300))
    while first.status(job_id)["done"] < 30:
        time.sleep(0.01)
    first.close()
    paused = first.status(job_id)
    assert paused["state"] == "running" and 30 <= paused["done"] < 300
    predict = FakePredict()
    second = JobManager(settings, predict, chunk_size=10)  # picks the job up on start
    try:
        status = second.wait(job_id, 30)
        assert status["state"] == "done"
        assert sum(predict.calls) == 300 - paused["done"]
        out = json.loads("".join(second.result(job_id)))
        assert [t["data"]["text"] for t in out] == [f"task number {i}" for i in range(300)]
        assert all(len(t["predictions"]) == 1 for t in out)
    finally:
        second.close()


def test_job_ids_are_checked_and_unknown_jobs_are_not_found(settings: Settings) -> None:
    manager = JobManager(settings, FakePredict(), autostart=False)
    for bad in ("../../etc", "ABC", "0123456789ab/.."):
        with pytest.raises(NotFound):
            manager.status(bad)
    with pytest.raises(NotFound):
        manager.status("0123456789ab")


def test_invalid_config_fails_at_creation(settings: Settings) -> None:
    manager = JobManager(settings, FakePredict(), autostart=False)
    with pytest.raises(ConfigError):
        manager.create("<View><oops", tasks=text_tasks(3))
    with pytest.raises(BadRequest):
        manager.create(TEXT_CONFIG, tasks=[["not", "an", "object"]])


# ---------------------------------------------------------------------------------------------- inputs


def test_json_and_jsonl_inputs_are_streamed_from_disk(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    root.mkdir()
    tasks = [{"data": {"text": f"n {i}"}, "id": i} if i % 2 else {"text": f"n {i}"} for i in range(120)]
    (root / "tasks.json").write_text(json.dumps(tasks))
    (root / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in tasks) + "\n\n")
    cfg = settings.with_(batch_input_root=str(root))
    manager = JobManager(cfg, FakePredict(), chunk_size=25)
    try:
        for name in ("tasks.json", "tasks.jsonl"):
            job_id = manager.create(TEXT_CONFIG, input_path=resolve_input_path(cfg, name))
            assert manager.wait(job_id, 30)["state"] == "done"
            out = json.loads("".join(manager.result(job_id)))
            assert [t["data"]["text"] for t in out] == [f"n {i}" for i in range(120)]
            assert out[3]["id"] == 3 and "id" not in out[4]
    finally:
        manager.close()


def test_broken_input_file_fails_the_job_with_the_line(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "n 1"}\n{"text": oops}\n')
    store = create_store(tmp_path / "j.sqlite", TEXT_CONFIG, input_path=path)
    store.close()
    meta = JobRunner(settings, FakePredict()).run(tmp_path / "j.sqlite")
    assert meta is not None and meta["state"] == "failed"
    assert "bad.jsonl line 2" in meta["error"]


def test_input_paths_must_stay_under_the_batch_root(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.json").write_text("[]")
    with pytest.raises(BadRequest, match="BATCH_INPUT_ROOT"):
        resolve_input_path(settings, "sub")
    cfg = settings.with_(batch_input_root=str(root))
    assert resolve_input_path(cfg, "sub") == (root / "sub").resolve()
    for bad in ("../secret.json", str(tmp_path / "secret.json"), "sub/../../secret.json"):
        with pytest.raises(BadRequest, match="outside"):
            resolve_input_path(cfg, bad)
    os.symlink(tmp_path / "secret.json", root / "link.json")
    with pytest.raises(BadRequest, match="outside"):
        resolve_input_path(cfg, "link.json")
    with pytest.raises(NotFound):
        resolve_input_path(cfg, "missing.json")


def _write_images(folder: Path) -> None:
    (folder / "b").mkdir(parents=True)
    Image.new("RGB", (40, 20), "red").save(folder / "a.png")
    Image.new("RGB", (10, 30), "blue").save(folder / "b" / "c d.jpg")
    (folder / "readme.txt").write_text("not an image")


def shape_predict(resolver: LocalFileResolver) -> Any:
    def predict(label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for task in tasks:
            w, h = resolver.load_image(task["data"]["picture"]).size
            choice = "wide" if w > h else "tall"
            item = {
                "id": "s",
                "from_name": "shape",
                "to_name": "img",
                "type": "choices",
                "value": {"choices": [choice]},
            }
            out.append({"result": [item], "score": 1.0, "model_version": "shape"})
        return out

    return predict


def test_image_folder_becomes_tasks_read_from_local_files(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    _write_images(folder)
    resolver = LocalFileResolver([folder], fallback=lambda: None)
    cfg = settings.with_(batch_input_root=str(folder))
    store = create_store(
        tmp_path / "j.sqlite", IMAGE_CONFIG, input_path=folder, url_prefix="https://cdn.example/x/"
    )
    store.close()
    meta = JobRunner(cfg, shape_predict(resolver)).run(tmp_path / "j.sqlite")
    assert meta is not None and meta["state"] == "done", meta.get("error")
    out = json.loads("".join(iter_result_text(JobStore(tmp_path / "j.sqlite"))))
    # the output shows Label Studio the published URL; prediction read the local file
    assert [t["data"]["picture"] for t in out] == [
        "https://cdn.example/x/a.png",
        "https://cdn.example/x/b/c%20d.jpg",
    ]
    assert [t["predictions"][0]["result"][0]["value"]["choices"] for t in out] == [["wide"], ["tall"]]


def test_images_under_local_files_root_use_label_studio_local_files_urls(
    settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "docroot" / "images"
    _write_images(folder)
    cfg = settings.with_(local_files_document_root=str(tmp_path / "docroot"))
    store = create_store(tmp_path / "j.sqlite", IMAGE_CONFIG, input_path=folder)
    store.close()
    seen: list[str] = []

    def predict(label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen.extend(t["data"]["picture"] for t in tasks)
        return [{"result": [], "score": 0.0, "model_version": "v"} for _ in tasks]

    JobRunner(cfg, predict).run(tmp_path / "j.sqlite")
    assert seen == ["/data/local-files/?d=images/a.png", "/data/local-files/?d=images/b/c%20d.jpg"]


def test_image_folder_needs_an_image_tag(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    _write_images(folder)
    with pytest.raises(ConfigError, match="Image"):
        create_store(tmp_path / "j.sqlite", TEXT_CONFIG, input_path=folder)


def test_local_file_resolver_refuses_files_outside_its_roots(tmp_path: Path) -> None:
    from serving.errors import InputError

    folder = tmp_path / "images"
    _write_images(folder)
    Image.new("RGB", (5, 5)).save(tmp_path / "outside.png")
    calls: list[str] = []

    class Inner:
        def load_image(self, value: str, task_id: int | None = None, shrink: Any = None) -> str:
            calls.append(value)
            return "inner"

    resolver = LocalFileResolver([folder], fallback=Inner)
    assert resolver.load_image((folder / "a.png").as_uri()).size == (40, 20)
    with pytest.raises(InputError, match="outside"):
        resolver.load_image((tmp_path / "outside.png").as_uri())
    with pytest.raises(InputError, match="outside"):
        resolver.load_image((folder / ".." / "outside.png").as_uri())
    assert resolver.load_image("https://example.com/x.png") == "inner"
    assert calls == ["https://example.com/x.png"]


def test_local_file_resolver_decodes_a_big_jpeg_smaller_for_a_small_model(tmp_path: Path) -> None:
    """Batch-folder JPEGs take the same reduced decode as downloads; the shown size is kept."""
    from serving.fetch.decode import ORIGINAL_SIZE

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(folder / "big.jpg", quality=90)
    resolver = LocalFileResolver([folder], fallback=lambda: None)
    im = resolver.load_image((folder / "big.jpg").as_uri(), shrink=lambda size: 0.25)
    assert im.size == (400, 300) and im.info[ORIGINAL_SIZE] == (1600, 1200)
    assert resolver.load_image((folder / "big.jpg").as_uri()).size == (1600, 1200)


# ---------------------------------------------------------------------------------------------- kill and resume

WORKER = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
from serving.jobs.runner import JobRunner
from serving.settings import Settings

log = open(sys.argv[2], "a")

def predict(label_config, tasks):
    time.sleep(0.05)
    for t in tasks:
        log.write(t["data"]["text"] + "\n")
    log.flush()
    out = []
    for t in tasks:
        n = int(t["data"]["text"].split()[-1])
        item = {{"id": "r", "from_name": "parity", "to_name": "text", "type": "choices",
                "value": {{"choices": ["even" if n % 2 == 0 else "odd"]}}}}
        out.append({{"result": [item], "score": 0.5, "model_version": "slow"}})
    return out

meta = JobRunner(Settings(), predict, chunk_size=10).run(sys.argv[1])
print(json.dumps({{"state": meta and meta["state"], "done": meta and meta["done"]}}))
"""


def _done(db: Path) -> int:
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    finally:
        conn.close()


def test_a_job_process_killed_mid_way_resumes_with_every_task_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "job.sqlite"
    store = create_store(db, TEXT_CONFIG, tasks=text_tasks(400))
    store.close()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    log = tmp_path / "predicted.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    proc = subprocess.Popen([sys.executable, str(script), str(db), str(log)], env=env, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _done(db) < 60 and time.monotonic() < deadline:
        assert proc.poll() is None, "worker ended before it was killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed_at = _done(db)
    assert 60 <= killed_at < 400
    meta = JobStore(db).meta()
    assert meta["state"] == "running" and meta["done"] == killed_at  # progress committed with the results

    second = subprocess.run(
        [sys.executable, str(script), str(db), str(log)], env=env, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"state": "done", "done": 400}

    out = json.loads("".join(iter_result_text(JobStore(db))))
    assert [t["data"]["text"] for t in out] == [f"task number {i}" for i in range(400)]
    assert all(len(t["predictions"]) == 1 for t in out)
    predicted = log.read_text().split("\n")[:-1]
    # at most the chunk in flight at the kill was predicted twice; the output still holds it once
    assert 400 <= len(predicted) <= 410
    assert set(predicted) == {f"task number {i}" for i in range(400)}


def test_only_one_process_runs_a_job_at_a_time(settings: Settings, tmp_path: Path) -> None:
    db = tmp_path / "job.sqlite"
    create_store(db, TEXT_CONFIG, tasks=text_tasks(50)).close()
    started = threading.Event()

    def slow(label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        started.set()
        time.sleep(0.05)
        return [parity_prediction(t) for t in tasks]

    runner = JobRunner(settings, slow, chunk_size=5)
    thread = threading.Thread(target=runner.run, args=(db,))
    thread.start()
    started.wait(10)
    assert JobRunner(settings, slow).run(db) is None  # locked: not run twice
    thread.join(30)
    assert _done(db) == 50


# ---------------------------------------------------------------------------------------------- HTTP


NER_CONFIG = """<View>
  <Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/></Labels>
  <Text name="text" value="$text"/>
</View>"""


@pytest.fixture
def client(tmp_path: Path) -> Any:
    from tests.support.app import fake_app
    from tests.support.fakes import reset_fakes

    reset_fakes()
    app = fake_app(tmp_path)
    yield app.test_client()
    app.extensions["lsml_jobs"].close()


def test_batch_route_answers_small_inputs_inline(client: Any) -> None:
    tasks = [{"text": "Alice met Bob"}, {"data": {"text": "nobody here"}, "id": 7}]
    resp = client.post("/batch", json={"label_config": NER_CONFIG, "tasks": tasks})
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert [t["data"]["text"] for t in body] == ["Alice met Bob", "nobody here"]
    spans = [r["value"]["text"] for r in body[0]["predictions"][0]["result"]]
    assert spans == ["Alice", "Bob"]
    assert body[1]["id"] == 7 and body[1]["predictions"][0]["result"] == []
    assert validate_file(ConfigSchema.from_config(NER_CONFIG), body) == []


def test_batch_route_runs_large_inputs_as_a_job(client: Any) -> None:
    tasks = [{"text": f"Person{i} works at Acme{i}Corp"} for i in range(120)]
    resp = client.post("/batch", json={"label_config": NER_CONFIG, "tasks": tasks})
    assert resp.status_code == 202, resp.json
    job_id = resp.json["job_id"]
    assert resp.headers["Location"] == f"/jobs/{job_id}"
    deadline = time.monotonic() + 60
    while True:
        status = client.get(f"/jobs/{job_id}").json
        if status["state"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (status["state"], status["done"], status["total"], status["failed"]) == ("done", 120, 120, 0)
    assert any(j["job_id"] == job_id for j in client.get("/jobs").json["jobs"])
    result = client.get(f"/jobs/{job_id}/result")
    assert result.status_code == 200 and result.mimetype == "application/json"
    out = json.loads(result.data)
    assert [t["data"]["text"] for t in out] == [t["text"] for t in tasks]
    labels = [[r["value"]["labels"][0] for r in t["predictions"][0]["result"]] for t in out]
    assert labels[0] == ["Person", "Organization"]
    lines = client.get(f"/jobs/{job_id}/result?format=jsonl").data.decode().splitlines()
    assert len(lines) == 120
    assert client.get(f"/jobs/{job_id}/result?format=xml").status_code == 400
    assert client.delete(f"/jobs/{job_id}").json["state"] == "deleted"
    assert client.get(f"/jobs/{job_id}").status_code == 404


def test_batch_route_errors(client: Any, tmp_path: Path) -> None:
    assert client.post("/batch", data="not json", content_type="application/json").status_code == 400
    assert client.post("/batch", json={"tasks": [{"text": "x"}]}).status_code == 400
    assert client.post("/batch", json={"label_config": NER_CONFIG}).status_code == 400
    assert client.post("/batch", json={"label_config": NER_CONFIG, "tasks": "x"}).status_code == 400
    assert (
        client.post("/batch", json={"label_config": "<View><oops", "tasks": [{"text": "x"}]}).status_code
        == 422
    )
    resp = client.post("/batch", json={"label_config": NER_CONFIG, "input": "tasks.json"})
    assert resp.status_code == 400 and "BATCH_INPUT_ROOT" in resp.json["message"]
    assert client.get("/jobs/nope").status_code == 404
    assert client.delete("/jobs/0123456789ab").status_code == 404


def test_batch_route_reads_a_server_side_file(tmp_path: Path) -> None:
    from tests.support.app import fake_app

    root = tmp_path / "inputs"
    root.mkdir()
    (root / "tasks.jsonl").write_text("\n".join(json.dumps({"text": f"Name{i} here"}) for i in range(10)))
    app = fake_app(tmp_path, batch_input_root=str(root))
    client = app.test_client()
    try:
        resp = client.post("/batch", json={"label_config": NER_CONFIG, "input": "tasks.jsonl"})
        assert resp.status_code == 202, resp.json
        job_id = resp.json["job_id"]
        status = app.extensions["lsml_jobs"].wait(job_id, 60)
        assert status["state"] == "done" and status["total"] == 10
        out = json.loads(client.get(f"/jobs/{job_id}/result").data)
        assert out[9]["predictions"][0]["result"][0]["value"]["text"] == "Name9"
        assert (
            client.post("/batch", json={"label_config": NER_CONFIG, "input": "../x.json"}).status_code == 400
        )
    finally:
        app.extensions["lsml_jobs"].close()


MEMORY_SCRIPT = r"""
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {repo!r})
from serving.jobs.output import iter_result_text
from serving.jobs.runner import JobRunner
from serving.jobs.store import JobStore, create_store
from serving.settings import Settings

n, folder = int(sys.argv[1]), Path(sys.argv[2])
with open(folder / "t.jsonl", "w") as f:
    for i in range(n):
        f.write(json.dumps({{"text": f"task number {{i}} " + "x" * 200}}) + "\n")
config = ('<View><Text name="text" value="$text"/><Choices name="parity" toName="text">'
          '<Choice value="even"/><Choice value="odd"/></Choices></View>')

def predict(cfg, tasks):
    item = {{"id": "r", "from_name": "parity", "to_name": "text", "type": "choices", "value": {{"choices": ["odd"]}}}}
    return [{{"result": [item], "score": 0.5, "model_version": "v"}} for _ in tasks]

create_store(folder / "j.sqlite", config, input_path=folder / "t.jsonl").close()
meta = JobRunner(Settings(), predict, chunk_size=64).run(folder / "j.sqlite")
count = sum(piece.count('"predictions"') for piece in iter_result_text(JobStore(folder / "j.sqlite")))
print(json.dumps({{"state": meta["state"], "count": count,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


@pytest.mark.slow
def test_memory_stays_flat_from_5k_to_50k_tasks(tmp_path: Path) -> None:
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT.format(repo=str(REPO)))
    peaks = {}
    for n in (5_000, 50_000):
        folder = tmp_path / str(n)
        folder.mkdir()
        run = subprocess.run(
            [sys.executable, str(script), str(n), str(folder)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert (out["state"], out["count"]) == ("done", n)
        peaks[n] = out["rss_mb"]
    # ten times the tasks (12 MB of input) must not cost ten times the memory
    assert peaks[50_000] - peaks[5_000] < 10, peaks
