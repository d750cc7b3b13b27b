"""Replay the requests a real Label Studio 1.23.2 sent, against the app with fake backends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.app import fake_app, fixture_request
from tests.support.fakes import FakeNER, reset_fakes

ALL_FIXTURES = sorted(
    p.stem for p in (Path(__file__).parent.parent / "fixtures" / "ls_requests").glob("*.json")
)


@pytest.fixture(autouse=True)
def _reset() -> None:
    reset_fakes()


@pytest.fixture
def client(tmp_path: Path):
    return fake_app(tmp_path).test_client()


def replay(client, name: str):
    req = fixture_request(name)
    headers = {k: v for k, v in req["headers"].items() if k in {"Authorization", "Content-Type"}}
    if req["method"] == "GET":
        return client.get(req["path"], headers=headers)
    return client.post(req["path"], json=req["body"], headers=headers)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_every_captured_request_gets_the_status_label_studio_accepted(client, name: str) -> None:
    expected = fixture_request(name)["response_status"]
    response = replay(client, name)
    assert response.status_code // 100 == expected // 100, response.json


def test_health_lists_backends_and_answers_in_milliseconds(client) -> None:
    started = time.perf_counter()
    body = replay(client, "health").json
    assert time.perf_counter() - started < 0.1
    assert body["status"] == "UP"
    assert body["model_class"] == "LabelStudioMLServer"
    assert isinstance(body["backends"], dict)


def test_setup_answers_model_version_without_waiting_for_a_slow_load(client) -> None:
    FakeNER.load_delay_s = 2.0
    started = time.perf_counter()
    response = replay(client, "setup_with_extra_params")
    assert time.perf_counter() - started < 0.5
    assert response.status_code == 200
    assert response.json["model_version"].startswith("fake_ner-")
    assert client.get("/health").json["backends"]["fake_ner:fake-ner-1"] == "loading"
    # /setup also says which model serves which labels of each tag (serving/plan/routing.py)
    routes = response.json["routes"]
    assert routes and {r["family"] for r in routes} == {"fake_ner"}
    assert all(set(r) == {"control", "tag", "object", "family", "model", "labels", "reason"} for r in routes)


def test_model_version_changes_when_weights_change(tmp_path: Path) -> None:
    first = replay(fake_app(tmp_path).test_client(), "setup_with_extra_params").json["model_version"]
    FakeNER.weights_version = "w2"
    second = replay(fake_app(tmp_path).test_client(), "setup_with_extra_params").json["model_version"]
    assert first != second


def test_model_version_override_per_deployment(tmp_path: Path) -> None:
    client = fake_app(tmp_path, model_version="prod-7").test_client()
    assert replay(client, "setup_with_extra_params").json["model_version"] == "prod-7"
    assert client.get("/versions").json == {"versions": ["prod-7"]}


def test_single_task_prediction_has_mapped_spans_scores_and_version(client) -> None:
    body = replay(client, "predict_single_open_task").json
    assert len(body["results"]) == 1
    prediction = body["results"][0]
    spans = [
        (r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"])
        for r in prediction["result"]
    ]
    # PERSON (the fake model's label) maps to the config's PER through the alias table; ORG stays ORG
    assert spans == [
        (0, 5, "Alice", ["PER"]),
        (15, 19, "Acme", ["PER"]),
        (20, 24, "Corp", ["ORG"]),
        (28, 33, "Paris", ["PER"]),
    ]
    assert prediction["score"] == pytest.approx((0.9 * 3 + 0.6) / 4)
    assert isinstance(prediction["model_version"], str) and prediction["model_version"]
    assert all(isinstance(r["score"], float) for r in prediction["result"])
    assert len({r["id"] for r in prediction["result"]}) == 4


def test_batch_prediction_one_result_per_task_in_order_with_failures_kept(client) -> None:
    body = fixture_request("predict_batch_dm_action")["body"]
    body["tasks"][1]["data"]["image"] = "http://127.0.0.1:8000/missing.png"
    body["tasks"][2]["data"] = {"other": 1}
    response = client.post("/predict", json=body)
    results = response.json["results"]
    assert response.status_code == 200
    assert len(results) == len(body["tasks"]) == 3
    # the two failed tasks answer their reason without "result": Label Studio stores nothing for
    # them and asks again next time, instead of keeping an empty prediction of this version for good
    assert ["result" in r for r in results] == [True, False, False]
    assert results[0]["score"] == 0.8
    assert "missing.png" in results[1]["error"] and "'image'" in results[2]["error"]
    assert len({r["model_version"] for r in results}) == 1
    car = results[0]["result"][0]
    assert car["value"] == {
        "x": 10.0,
        "y": 20.0,
        "width": 40.0,
        "height": 40.0,
        "rotation": 0,
        "rectanglelabels": ["Car"],
    }
    assert (car["original_width"], car["original_height"]) == (640, 480)


def test_task_order_is_kept_for_many_tasks(client) -> None:
    config = fixture_request("predict_single_open_task")["body"]["label_config"]
    names = [f"Name{i} went home" for i in range(300)]
    tasks = [{"id": i, "data": {"text": text}} for i, text in enumerate(names)]
    results = client.post("/predict", json={"tasks": tasks, "label_config": config}).json["results"]
    assert [r["result"][0]["value"]["text"] for r in results] == [f"Name{i}" for i in range(300)]


def test_tasks_of_one_request_share_forward_calls(client) -> None:
    config = fixture_request("predict_single_open_task")["body"]["label_config"]
    tasks = [{"id": i, "data": {"text": f"Bob {i}"}} for i in range(64)]
    client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert sum(FakeNER.batch_sizes) == 64
    assert max(FakeNER.batch_sizes) > 1
    assert len(FakeNER.batch_sizes) < 64


def test_a_request_past_its_deadline_says_so_and_leaves_no_queued_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PREDICT_TIMEOUT_S: tasks not done answer the reason (no result); their queued batches never run."""
    FakeNER.forward_delay_s = 0.2
    client = fake_app(tmp_path, predict_timeout_s=0.5, max_batch_size=1).test_client()
    config = fixture_request("predict_single_open_task")["body"]["label_config"]
    client.post("/setup", json={"project": "1.1", "schema": config})  # starts the load
    waited = time.monotonic() + 30
    while (
        client.get("/health").json["backends"]["fake_ner:fake-ner-1"] != "ready" and time.monotonic() < waited
    ):
        time.sleep(0.05)
    FakeNER.batch_sizes.clear()
    tasks = [{"id": i, "data": {"text": f"Name{i} went home"}} for i in range(8)]
    started = time.monotonic()
    response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert time.monotonic() - started < 2.0
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 8
    # About two forwards (0.2 s each, one task each) fit in the 0.5 s deadline: those tasks are answered.
    answered = [i for i, r in enumerate(results) if "result" in r]
    assert 1 <= len(answered) <= 3
    assert all("PREDICT_TIMEOUT_S" in results[i]["error"] for i in set(range(8)) - set(answered))
    assert all(results[i]["result"][0]["value"]["text"] == f"Name{i}" for i in answered)
    for i in set(range(8)) - set(answered):
        reason = f"task {i} (#{i}): prediction did not finish within its deadline (0.5 s, PREDICT_TIMEOUT_S)"
        assert reason in caplog.text
    time.sleep(1.0)  # what was still queued is skipped, not run for nobody (it would be 7 forwards by now)
    assert len(FakeNER.batch_sizes) <= len(answered) + 1


def test_closing_the_runtime_waits_for_its_model_threads(tmp_path: Path) -> None:
    """Runtime.close joins every model thread, so a process can exit without killing a running forward."""
    app = fake_app(tmp_path)
    client = app.test_client()
    config = fixture_request("predict_single_open_task")["body"]["label_config"]
    assert client.post(
        "/predict", json={"tasks": [{"id": 1, "data": {"text": "Bob ran"}}], "label_config": config}
    ).json["results"][0]["result"]
    runtime = app.extensions["lsml_model"].runtime
    batchers = [slot.batcher for slot in runtime._slots.values() if slot.batcher is not None]
    assert batchers and all(b.alive for b in batchers)
    runtime.close(timeout=5)
    assert not any(b.alive for b in batchers)


def test_interactive_call_with_context_is_answered(client) -> None:
    body = replay(client, "predict_interactive_with_context").json
    assert len(body["results"]) == 1
    assert [r["value"]["text"] for r in body["results"][0]["result"]] == ["Bob", "Globex"]


def test_basic_auth_protects_every_route_but_health(tmp_path: Path) -> None:
    client = fake_app(tmp_path, basic_auth_user="mluser", basic_auth_pass="mlpass").test_client()
    assert replay(client, "predict_basic_auth").status_code == 200
    assert replay(client, "versions").status_code == 200
    assert client.get("/health").status_code == 200
    for method, path in [
        ("post", "/predict"),
        ("post", "/setup"),
        ("get", "/versions"),
        ("get", "/metrics"),
        ("get", "/"),
    ]:
        response = getattr(client, method)(path, json={}, headers={"Authorization": "Basic bWx1c2VyOndyb25n"})
        assert response.status_code == 401, path
        assert "mlpass" not in response.get_data(as_text=True)
        assert getattr(client, method)(path, json={}).status_code == 401


def test_webhooks_are_acknowledged_including_unknown_events(client) -> None:
    for name in ("webhook_ANNOTATION_CREATED", "webhook_TASKS_CREATED", "webhook_START_TRAINING"):
        started = time.perf_counter()
        assert replay(client, name).status_code // 100 == 2
        assert time.perf_counter() - started < 0.1
    assert client.post("/webhook", json={"action": "SOMETHING_NEW", "x": 1}).status_code == 201


def test_webhook_secret_is_required_when_configured(tmp_path: Path) -> None:
    client = fake_app(tmp_path, webhook_secret="s3cret").test_client()
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 401
    assert client.post("/webhook?secret=s3cret", json={"action": "PROJECT_UPDATED"}).status_code == 201


def test_setup_with_no_fillable_control_says_what_to_change(client) -> None:
    schema = '<View><Text name="t" value="$t"/><Rating name="r" toName="t"/></View>'
    response = client.post("/setup", json={"project": "1.1", "schema": schema})
    assert response.status_code == 422
    assert "cannot fill any control tag" in response.json["message"]
    assert "Rating" in response.json["message"]


def test_setup_reports_a_model_that_failed_to_load(client) -> None:
    FakeNER.load_error = "bad weights file /w/model.pt"
    replay(client, "setup_with_extra_params")
    deadline = time.time() + 5
    while (
        client.get("/health").json["backends"].get("fake_ner:fake-ner-1") == "loading"
        and time.time() < deadline
    ):
        time.sleep(0.02)
    assert (
        client.get("/health")
        .json["backends"]["fake_ner:fake-ner-1"]
        .startswith("unavailable: load failed: bad weights")
    )
    response = replay(client, "setup_with_extra_params")
    assert response.status_code == 422
    assert "bad weights file" in response.json["message"]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'{"tasks": "x", "label_config": "<View/>"}', 400),
        (b'{"tasks": []}', 400),
        (b'{"tasks": [{"data": {"text": "a"}}], "label_config": "<View><broken"}', 422),
        (b'{"tasks": [{"data": {"text": "a"}}]}', 400),
    ],
)
def test_malformed_predict_requests_get_clear_4xx(client, data: bytes, status: int) -> None:
    response = client.post("/predict", data=data, content_type="application/json")
    assert response.status_code == status
    assert response.json["message"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_predict_falls_back_to_the_config_sent_to_setup(client) -> None:
    replay(client, "setup_with_extra_params")
    body = fixture_request("setup_with_extra_params")["body"]
    response = client.post(
        "/predict", json={"tasks": [{"id": 1, "data": {"text": "Eve came"}}], "project": body["project"]}
    )
    assert response.status_code == 200
    assert response.json["results"][0]["result"][0]["value"]["text"] == "Eve"


def test_metrics_expose_requests_batches_and_queue_depth(client) -> None:
    replay(client, "predict_single_open_task")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'lsml_requests_total{route="/predict",status="200"} 1.0' in text
    assert 'lsml_batch_size_count{backend="fake_ner:fake-ner-1"} 1.0' in text
    assert 'lsml_queue_depth{backend="fake_ner:fake-ner-1"} 0.0' in text


def test_gunicorn_worker_exit_shuts_the_app_down(tmp_path: Path) -> None:
    """gunicorn.conf.py's worker_exit hook closes the runtime of the app the worker served."""
    import runpy
    import types

    app = fake_app(tmp_path)
    client = app.test_client()
    config = fixture_request("predict_single_open_task")["body"]["label_config"]
    client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "Bob ran"}}], "label_config": config})
    runtime = app.extensions["lsml_model"].runtime
    batchers = [slot.batcher for slot in runtime._slots.values() if slot.batcher is not None]
    assert batchers and all(b.alive for b in batchers)
    hooks = runpy.run_path(str(Path(__file__).resolve().parents[2] / "gunicorn.conf.py"))
    hooks["worker_exit"](None, types.SimpleNamespace(wsgi=app))
    assert not any(b.alive for b in batchers)


def test_predict_entries_match_the_documented_schema(client) -> None:
    """Predicted, found-nothing and failed entries all validate against /openapi.json's prediction schema."""
    import jsonschema

    config = fixture_request("predict_single_open_task")["body"]["label_config"]
    tasks = [{"id": 1, "data": {"text": "Bob went home"}}, {"id": 2, "data": {"text": "nothing"}}, {"id": 3}]
    results = client.post("/predict", json={"tasks": tasks, "label_config": config}).json["results"]
    assert [bool(r.get("result")) for r in results] == [True, False, False]
    assert results[1]["result"] == [] and "result" not in results[2]
    doc = client.get("/openapi.json").json
    body = doc["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate({"results": results}, body)
    with pytest.raises(jsonschema.ValidationError):  # the schema does tell them apart
        jsonschema.validate({"results": [{"model_version": "v", "result": [], "error": 5}]}, body)
