"""Training over HTTP: webhooks queue (and coalesce) jobs in milliseconds, /jobs, /versions, rollback."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from tests.support.app import fixture_request
from tests.support.fakes import FakeResolver
from tests.support.training_fakes import CONFIG, REF, export_tasks, families

# The captured requests carry a PER/ORG NER config; the memo family fills Labels on Text.
PROJECT = 2


def make_app(tmp_path: Path, **kw: Any) -> tuple[Flask, ModelService, list[str]]:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"),
        max_wait_ms=1.0,
        train_min_examples=3,
        train_debounce_s=0.0,
        label_studio_url="http://ls.invalid",
        label_studio_api_key="legacy-token",
    ).with_(**kw)
    runtime = Runtime(cfg, families(), resolver=FakeResolver())
    model = ModelService(cfg, runtime, families_ref=REF)
    spawned: list[str] = []
    if model.supervisor is not None:
        # record trainer starts instead of starting processes (the process is test_training_process.py's)
        model.supervisor._spawn = lambda settings, ref, device: spawned.append(device) or _Alive()
    return create_app(cfg, model=model), model, spawned


class _Alive:
    """Stands in for a trainer process that is running."""

    pid = 0

    def poll(self) -> None:
        return None

    def send_signal(self, sig: int) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def replay(client: Any, name: str, **kw: Any) -> Any:
    request = fixture_request(name)
    return client.post(request["path"], json=request["body"], **kw)


def test_start_training_answers_at_once_with_the_job_id(tmp_path: Path) -> None:
    app, model, spawned = make_app(tmp_path)
    client = app.test_client()
    # Label Studio connects first (/setup): the config parser is imported by then
    config = fixture_request("webhook_START_TRAINING")["body"]["project"]["label_config"]
    assert client.post("/setup", json={"project": "2.1", "schema": config}).status_code == 200
    started = time.perf_counter()
    response = replay(client, "webhook_START_TRAINING")
    elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.json
    body = response.json
    assert elapsed < 1.0
    assert body["action"] == "START_TRAINING" and body["status"] == "ok"
    job_id = body["job"]  # Label Studio keeps this as the MLBackendTrainJob id
    assert body["jobs"] == [{"job_id": job_id, "model": "memo_ner:memo", "coalesced": False}]
    status = client.get(f"/jobs/{job_id}").json
    assert status["kind"] == "training" and status["state"] == "queued" and status["project"] == "2"
    assert status["model"] == "memo_ner:memo" and status["events"] == {"START_TRAINING": 1}
    assert client.post("/job_status", json={"job": job_id}).json["job_status"] == "queued"
    assert any(j["job_id"] == job_id for j in client.get("/jobs").json["jobs"])
    deadline = time.monotonic() + 5
    while not spawned and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spawned == ["cpu"]  # the supervisor asked for a trainer (the request thread did not train)
    model.close()


def test_a_burst_of_annotation_events_is_one_job_and_every_answer_is_fast(tmp_path: Path) -> None:
    app, model, _ = make_app(tmp_path, train_events=("START_TRAINING", "ANNOTATION_CREATED"))
    client = app.test_client()
    config = fixture_request("webhook_ANNOTATION_CREATED")["body"]["project"]["label_config"]
    assert client.post("/setup", json={"project": "2.1", "schema": config}).status_code == 200
    times, ids = [], set()
    for _ in range(30):
        started = time.perf_counter()
        response = replay(client, "webhook_ANNOTATION_CREATED")
        times.append(time.perf_counter() - started)
        assert response.status_code == 201
        ids.add(response.json["job"])
    assert len(ids) == 1 and max(times) < 1.0
    (job_id,) = ids
    assert client.get(f"/jobs/{job_id}").json["requests"] == 30
    # while that job runs, more saves make exactly one follow-up job
    store = model.training_store
    assert store.claim("cpu").id == job_id  # type: ignore[union-attr]
    follow = {replay(client, "webhook_ANNOTATION_CREATED").json["job"] for _ in range(5)}
    assert len(follow) == 1 and job_id not in follow
    assert sorted(j.state for j in store.jobs()) == ["queued", "running"]
    model.close()


def test_the_webhook_secret_guards_training(tmp_path: Path) -> None:
    app, model, _ = make_app(tmp_path, webhook_secret="s3cret")
    client = app.test_client()
    assert replay(client, "webhook_START_TRAINING").status_code == 401
    assert model.training_store.jobs() == []
    assert replay(client, "webhook_START_TRAINING", query_string={"secret": "s3cret"}).status_code == 201
    model.close()
    # Label Studio's "Start Training" has no query string, but the model's basic auth
    app, model, _ = make_app(
        tmp_path / "auth", webhook_secret="s3cret", basic_auth_user="u", basic_auth_pass="p"
    )
    client = app.test_client()
    good = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"u:x").decode()}
    assert replay(client, "webhook_START_TRAINING", headers=bad).status_code == 401
    assert replay(client, "webhook_START_TRAINING").status_code == 401
    assert replay(client, "webhook_START_TRAINING", headers=good).status_code == 201
    model.close()


def test_training_off_or_impossible(tmp_path: Path) -> None:
    app, model, _ = make_app(tmp_path / "off", training=False)
    body = replay(app.test_client(), "webhook_START_TRAINING").json
    assert body["trained"] is False and "job" not in body and model.training_store.jobs() == []

    app, model, _ = make_app(
        tmp_path / "no-ls",
        label_studio_url="",
        label_studio_api_key="",
        train_events=("START_TRAINING", "ANNOTATION_CREATED"),
    )
    client = app.test_client()
    refused = replay(client, "webhook_START_TRAINING")
    assert refused.status_code == 422 and "LABEL_STUDIO_API_KEY" in refused.json["message"]
    quiet = replay(client, "webhook_ANNOTATION_CREATED")  # a project webhook: acknowledged, never an error
    assert quiet.status_code == 201 and quiet.json["trained"] is False
    assert "LABEL_STUDIO_URL" in quiet.json["reason"]

    app, model, _ = make_app(tmp_path / "events")  # the default: only START_TRAINING trains
    client = app.test_client()
    assert replay(client, "webhook_ANNOTATION_CREATED").json["trained"] is False
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 201
    assert model.training_store.jobs() == []


def test_nothing_trainable_is_refused_with_the_reason(tmp_path: Path) -> None:
    from tests.support.app import fake_app

    app = fake_app(tmp_path)  # fake families without train(): and no trainer reference either
    assert replay(app.test_client(), "webhook_START_TRAINING").status_code == 201
    cfg = Settings(model_dir=str(tmp_path / "m2"), label_studio_url="http://x", label_studio_api_key="k")
    from tests.support.fakes import FAMILIES

    model = ModelService(cfg, Runtime(cfg, FAMILIES, resolver=FakeResolver()), families_ref=REF)
    refused = replay(create_app(cfg, model=model).test_client(), "webhook_START_TRAINING")
    assert refused.status_code == 422
    assert "fake_ner:fake-ner-1: the fake_ner family is not trained on annotations" in refused.json["message"]
    model.close()


def test_legacy_train_call_queues_its_inline_tasks(tmp_path: Path) -> None:
    app, model, _ = make_app(tmp_path, label_studio_url="", label_studio_api_key="")
    request = fixture_request("train_legacy_ff_off")
    response = app.test_client().post("/train", json=request["body"])
    assert response.status_code == 201
    job_id = response.json["job"]
    data = json.loads((model.training_store.job_dir(job_id) / "data.json").read_text())
    assert data == request["body"]["annotations"]
    model.close()


def test_cancel_and_delete_a_training_job(tmp_path: Path) -> None:
    app, model, _ = make_app(tmp_path)
    client = app.test_client()
    job_id = replay(client, "webhook_START_TRAINING").json["job"]
    cancelled = client.delete(f"/jobs/{job_id}").json
    assert cancelled["state"] == "cancelled" and cancelled["kind"] == "training"
    assert client.delete(f"/jobs/{job_id}").json == {"job_id": job_id, "kind": "training", "state": "deleted"}
    assert client.get(f"/jobs/{job_id}").status_code == 404
    model.close()


def train_now(model: ModelService, tasks: list[Any]) -> Any:
    """Queue a job with inline tasks for project 2 and run it in-process (what the trainer does)."""
    reply = model.request_training("2", CONFIG, "START_TRAINING", tasks=tasks)
    store = model.training_store
    job = store.claim("cpu")
    assert job is not None and job.id == reply["job"]
    return run_job(
        job,
        store=store,
        versions=VersionStore.for_settings(model.settings),
        families=families(),
        settings=model.settings,
        resolver=FakeResolver(),
    )


def test_versions_of_a_project_and_rollback(tmp_path: Path) -> None:
    app, model, _ = make_app(tmp_path)
    client = app.test_client()
    setup = {"project": "2.1795429160", "schema": CONFIG}
    base = client.post("/setup", json=setup).json["model_version"]
    first = train_now(model, export_tasks(4, people=("Ann",)))
    second = train_now(model, export_tasks(4, people=("Ben",)))
    assert len({base, first.model_version, second.model_version}) == 3

    def served() -> str:
        deadline = time.monotonic() + 5
        version = client.post("/setup", json=setup).json["model_version"]
        while time.monotonic() < deadline:
            time.sleep(0.02)
            again = client.post("/setup", json=setup).json["model_version"]
            if again == version:
                return str(version)
            version = again
        return str(version)

    assert served() == second.model_version
    info = client.get("/versions", query_string={"project": "2"}).json
    assert info["current"] == second.model_version and info["base"] == base
    assert info["versions"] == [second.model_version, first.model_version, base]
    assert [(t["version"], t["active"]) for t in info["trained"]] == [
        (second.version, True),
        (first.version, False),
    ]
    assert second.model_version in client.get("/versions").json["versions"]

    # roll back to the first trained version, by its model_version
    back = client.post(f"/versions/{first.model_version}/activate", json={"project": 2})
    assert back.status_code == 200 and back.json["current"] == first.model_version
    assert served() == first.model_version
    # and to the pretrained model
    assert client.post("/versions/base/activate", query_string={"project": "2"}).json["current"] == base
    assert served() == base
    assert VersionStore.for_settings(model.settings).current("2") == {}
    # by version id
    assert client.post(f"/versions/{second.version}/activate", json={"project": "2"}).json["current"] == (
        second.model_version
    )
    assert client.post("/versions/v99-nope/activate", json={"project": "2"}).status_code == 404
    assert client.post("/versions/base/activate", json={}).status_code == 400
    model.close()


@pytest.mark.parametrize("project", ["2", "2.1795429160"])
def test_a_trained_project_predicts_with_its_own_model(tmp_path: Path, project: str) -> None:
    app, model, _ = make_app(tmp_path)
    client = app.test_client()
    job = train_now(model, export_tasks(4))
    tasks = [{"id": 1, "data": {"text": "Chen takes Bravocel daily."}}]
    answer = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": project}).json
    (prediction,) = answer["results"]
    assert prediction["model_version"] == job.model_version
    assert {(r["value"]["text"], r["value"]["labels"][0]) for r in prediction["result"]} == {
        ("Chen", "Person"),
        ("Bravocel", "Drug"),
    }
    other = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "3.17"}).json
    assert other["results"][0]["result"] == []  # another project keeps the pretrained model
    assert TrainingStore.for_settings(model.settings).get(job.id).state == "done"  # type: ignore[union-attr]
    model.close()


def test_a_folder_under_versions_that_is_not_a_project_does_not_break_versions(tmp_path: Path) -> None:
    """MODEL_DIR on a mounted volume may hold lost+found or an NFS .snapshot beside the project folders."""
    app, model, _ = make_app(tmp_path)
    client = app.test_client()
    client.post("/setup", json={"project": "2.1795429160", "schema": CONFIG})
    job = train_now(model, export_tasks(4))
    for stray in ("lost+found", ".snapshot", "tmp.old"):
        (VersionStore.for_settings(model.settings).root / stray).mkdir()
    answer = client.get("/versions")
    assert answer.status_code == 200, answer.json
    assert job.model_version in answer.json["versions"]
    model.close()


def test_a_split_request_of_a_trained_project_answers_its_trained_version(tmp_path: Path) -> None:
    """A big /predict split over a dead replica: every entry carries the version /setup gave (the trained one).

    The replica that splits answers the first chunk itself; the chunk it forwards fails (nothing
    listens there) and comes back as per-task errors, of that same version.
    """
    port = _free_port()  # nothing listens: every chunk fails
    app, model, _ = make_app(
        tmp_path, replica_urls=(f"http://127.0.0.1:{port}",), split_ways=2, split_min_tasks=4
    )
    client = app.test_client()
    job = train_now(model, export_tasks(4))
    setup = {"project": "2.1795429160", "schema": CONFIG}
    deadline = time.monotonic() + 10
    while client.post("/setup", json=setup).json["model_version"] != job.model_version:
        assert time.monotonic() < deadline, "the trained version never swapped in"
        time.sleep(0.02)
    tasks = [{"id": i, "data": {"text": "Ann takes Bravocel."}} for i in range(6)]
    body = {"tasks": tasks, "label_config": CONFIG, "project": "2.1795429160"}
    results = client.post("/predict", json=body).json["results"]
    assert len(results) == 6
    assert all("result" in r for r in results[:3])  # answered here, by the trained model
    assert all("result" not in r and "failed on the replicas" in r["error"] for r in results[3:])
    assert {r["model_version"] for r in results} == {job.model_version}
    model.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_inline_tasks_are_written_before_a_waiting_trainer_can_claim_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRAIN_DEBOUNCE_S=0 and a trainer polling for work: /train's inline data must exist when it claims."""
    import threading

    import serving.service.model as service_module
    from serving.training.process import serve

    app, model, _ = make_app(tmp_path)
    stop = threading.Event()
    trainer = threading.Thread(
        target=serve, args=(model.settings, families(), "cpu"), kwargs={"stop": stop, "idle_s": 30.0}
    )
    trainer.start()
    lock = Path(model.settings.model_dir) / "training" / "trainer-cpu.lock"
    while not lock.exists():  # the trainer holds its device lock and polls for jobs
        assert trainer.is_alive()
    written = service_module.write_json_atomic

    def slow_write(path: Path, value: Any) -> None:
        time.sleep(1.5)  # many inline tasks take a while to write
        written(path, value)

    monkeypatch.setattr(service_module, "write_json_atomic", slow_write)
    try:
        job_id = (
            app.test_client()
            .post("/train", json={"project": 2, "label_config": CONFIG, "annotations": export_tasks(4)})
            .json["job"]
        )
        deadline = time.monotonic() + 30
        job = model.training_store.get(job_id)
        while job is not None and job.state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
            job = model.training_store.get(job_id)
    finally:
        stop.set()
        trainer.join(10)
    assert job is not None and job.state == "done", (job.state, job.error) if job else None
    model.close()


def test_ner_on_hypertext_is_refused_with_the_reason_not_skipped_later(tmp_path: Path) -> None:
    """NER learns from Labels on Text only: a HyperText project gets a 422 that says so, no job."""
    from backends.ner import NerBackend

    cfg = Settings(model_dir=str(tmp_path / "md"), label_studio_url="http://x", label_studio_api_key="k")
    model = ModelService(cfg, Runtime(cfg, {"ner": NerBackend}, resolver=FakeResolver()), families_ref=REF)
    request = fixture_request("webhook_START_TRAINING")
    request["body"]["project"]["label_config"] = """<View>
      <HyperText name="page" value="$html"/>
      <HyperTextLabels name="ents" toName="page"><Label value="Person"/></HyperTextLabels>
    </View>"""
    refused = create_app(cfg, model=model).test_client().post("/webhook", json=request["body"])
    assert refused.status_code == 422
    assert "<HyperTextLabels> on <HyperText> is not trained" in refused.json["message"]
    assert model.training_jobs.list() == []
    model.close()
