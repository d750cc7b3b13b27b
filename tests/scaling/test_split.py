"""A big /predict split over replicas: order kept, one entry per task, failed chunks as per-task errors,
forwarded chunks never split again (real apps over the fake backends, served on loopback)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from werkzeug.serving import make_server

from serving.scale.replicas import FORWARDED_HEADER, chunk_bounds
from tests.support.app import fake_app
from tests.support.fakes import reset_fakes

CONFIG = """<View>
  <Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/></Labels>
  <Text name="text" value="$text"/>
</View>"""


class Replica:
    """An app served on a free loopback port, counting the /predict requests it answered."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.calls: list[tuple[int, str | None, str | None]] = []
        app.before_request(self._record)
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _record(self) -> None:
        if request.path == "/predict":
            body = request.get_json(silent=True) or {}
            self.calls.append(
                (
                    len(body.get("tasks") or []),
                    request.headers.get(FORWARDED_HEADER),
                    request.headers.get("Authorization"),
                )
            )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.extensions["lsml_jobs"].close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tasks(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "data": {"text": f"Person{i} joined Acme{i}Corp"}} for i in range(n)]


def spans(prediction: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["value"]["text"], r["value"]["labels"][0]) for r in prediction["result"]]


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    reset_fakes()
    made = [Replica(fake_app(tmp_path / f"r{i}")) for i in range(2)]
    yield made
    for r in made:
        r.close()


def front(tmp_path: Path, urls: list[str], **settings: Any) -> Any:
    app = fake_app(tmp_path / "front", replica_urls=tuple(urls), split_min_tasks=10, **settings)
    return app


@pytest.mark.parametrize(("n", "ways"), [(1, 2), (2, 2), (10, 3), (11, 4), (100, 7), (5, 9)])
def test_chunk_bounds_cover_every_task_once_in_order(n: int, ways: int) -> None:
    bounds = chunk_bounds(n, ways)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert len(bounds) == min(n, ways) and max(sizes) - min(sizes) <= 1


def test_a_big_request_is_split_over_the_replicas_and_merged_in_order(
    replicas: list[Replica], tmp_path: Path
) -> None:
    app = front(tmp_path, [r.url for r in replicas], split_ways=4)
    client = app.test_client()
    headers = {"Authorization": "Basic dTpw"}
    body = {"tasks": tasks(101), "label_config": CONFIG, "project": "7", "params": {"context": None}}
    split = client.post("/predict", json=body, headers=headers).get_json()["results"]
    # the same request answered by one replica alone (a forwarded request is never split)
    alone = client.post("/predict", json=body, headers={FORWARDED_HEADER: "1"}).get_json()["results"]
    assert len(split) == 101
    assert [spans(p) for p in split] == [spans(p) for p in alone]
    assert [spans(p)[0][0] for p in split] == [f"Person{i}" for i in range(101)]
    assert {p["model_version"] for p in split} == {alone[0]["model_version"]}
    # four chunks of 25-26 tasks: the first answered here, the other three forwarded (chunk k starts at
    # REPLICA_URLS[k % 2]), each marked as forwarded, basic auth passed on
    calls = sorted(c for r in replicas for c in r.calls)
    assert [c[0] for c in calls] == [25, 25, 26]
    assert [len(r.calls) for r in replicas] == [1, 2]
    assert {(c[1], c[2]) for c in calls} == {("1", "Basic dTpw")}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'lsml_split_chunks_total{outcome="local"} 1.0' in metrics
    assert 'lsml_split_chunks_total{outcome="ok"} 3.0' in metrics
    assert client.get("/versions").get_json()["versions"] == [alone[0]["model_version"]]
    app.extensions["lsml_jobs"].close()


def test_small_interactive_and_forwarded_requests_are_answered_here(
    replicas: list[Replica], tmp_path: Path
) -> None:
    app = front(tmp_path, [r.url for r in replicas])
    client = app.test_client()
    small = client.post("/predict", json={"tasks": tasks(10), "label_config": CONFIG}).get_json()["results"]
    assert len(small) == 10
    context = {"result": [{"type": "labels", "value": {"start": 0, "end": 3}}]}
    body = {"tasks": tasks(20), "label_config": CONFIG, "params": {"context": context}}
    assert len(client.post("/predict", json=body).get_json()["results"]) == 20
    assert all(not r.calls for r in replicas)
    app.extensions["lsml_jobs"].close()


def test_a_replica_that_forwards_to_itself_does_not_loop(tmp_path: Path) -> None:
    reset_fakes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = fake_app(tmp_path, replica_urls=(url, url), split_min_tasks=5)
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import requests

        resp = requests.post(url + "/predict", json={"tasks": tasks(30), "label_config": CONFIG}, timeout=30)
        results = resp.json()["results"]
        assert [spans(p)[0][0] for p in results] == [f"Person{i}" for i in range(30)]
    finally:
        server.shutdown()
        server.server_close()
        app.extensions["lsml_jobs"].close()


def test_a_dead_replica_s_chunks_go_to_the_live_one(replicas: list[Replica], tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app = front(tmp_path, [replicas[0].url, dead], split_ways=2)
    results = (
        app.test_client()
        .post("/predict", json={"tasks": tasks(40), "label_config": CONFIG})
        .get_json()["results"]
    )
    assert [spans(p)[0][0] for p in results] == [f"Person{i}" for i in range(40)]
    # chunk 0 is answered here; chunk 1 tries the dead replica, then the live one
    assert [c[0] for c in replicas[0].calls] == [20]
    app.extensions["lsml_jobs"].close()


def test_a_chunk_no_replica_answers_becomes_per_task_errors_without_result(tmp_path: Path) -> None:
    reset_fakes()
    live = Replica(fake_app(tmp_path / "live"))
    # a replica that answers a wrong count, and one that is gone: chunk 1 has nowhere to go
    liar = Flask("liar")
    liar.post("/predict")(lambda: {"results": [{"result": [], "model_version": "x"}]})
    liar_server = make_server("127.0.0.1", 0, liar, threaded=True)
    threading.Thread(target=liar_server.serve_forever, daemon=True).start()
    liar_url = f"http://127.0.0.1:{liar_server.server_port}"
    app = front(tmp_path, [live.url, liar_url, f"http://127.0.0.1:{free_port()}"], split_ways=3)
    # chunk 0 is answered here; chunk k starts at REPLICA_URLS[k]: chunk 1 -> liar, the dead one, live
    try:
        results = (
            app.test_client()
            .post("/predict", json={"tasks": tasks(30), "label_config": CONFIG})
            .get_json()["results"]
        )
        assert len(results) == 30
        assert all("result" in p for p in results[:20])  # chunk 0 here, chunk 1 live on its third try
        # chunk 2: the dead one, then live (so it succeeds too) -- every chunk found a live replica
        assert all("result" in p for p in results[20:])
        assert [spans(p)[0][0] for p in results] == [f"Person{i}" for i in range(30)]

        # with the live replica gone as well, the chunk that only reaches the liar and the dead end fails
        app2 = front(tmp_path / "b", [liar_url, f"http://127.0.0.1:{free_port()}"], split_ways=2)
        answered = (
            app2.test_client()
            .post("/predict", json={"tasks": tasks(30), "label_config": CONFIG})
            .get_json()["results"]
        )
        assert len(answered) == 30
        assert [spans(p)[0][0] for p in answered[:15]] == [f"Person{i}" for i in range(15)]  # here
        failed = answered[15:]
        assert all("result" not in p and p["model_version"] for p in failed)
        assert "answered 1 predictions for 15 tasks" in failed[0]["error"]
        assert "ConnectionError" in failed[0]["error"]
        metrics = app2.test_client().get("/metrics").get_data(as_text=True)
        assert 'lsml_split_chunks_total{outcome="failed"} 1.0' in metrics
        app2.extensions["lsml_jobs"].close()
    finally:
        live.close()
        liar_server.shutdown()
        liar_server.server_close()
        app.extensions["lsml_jobs"].close()


def test_a_chunk_a_replica_refuses_is_not_sent_elsewhere(replicas: list[Replica], tmp_path: Path) -> None:
    app = front(tmp_path, [r.url for r in replicas], split_ways=2)
    client = app.test_client()
    # a config this server cannot fill is refused here (422) before any chunk leaves
    bad = client.post(
        "/predict", json={"tasks": tasks(30), "label_config": "<View><Text name='t' value='$text'/></View>"}
    )
    assert bad.status_code == 422
    assert all(not r.calls for r in replicas)
    app.extensions["lsml_jobs"].close()

    refuser = Flask("refuser")
    refused: list[int] = []

    @refuser.post("/predict")
    def _refuse() -> Any:
        refused.append(1)
        return {"status": 422, "message": "model detection unavailable: weights missing"}, 422

    server = make_server("127.0.0.1", 0, refuser, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # chunk 0 is answered here; chunk 1 goes to REPLICA_URLS[1], the refuser
        app = front(tmp_path / "b", [replicas[0].url, f"http://127.0.0.1:{server.server_port}"], split_ways=2)
        results = (
            app.test_client()
            .post("/predict", json={"tasks": tasks(30), "label_config": CONFIG})
            .get_json()["results"]
        )
        assert len(refused) == 1  # a 4xx is the same answer on every replica: not retried
        assert [spans(p)[0][0] for p in results[:15]] == [f"Person{i}" for i in range(15)]
        assert all("result" not in p and "weights missing" in p["error"] for p in results[15:])
        assert not replicas[0].calls
        app.extensions["lsml_jobs"].close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_chunk_this_replica_cannot_answer_is_forwarded(
    replicas: list[Replica], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first chunk is answered in place; when that fails here (overloaded), a replica answers it."""
    from serving.errors import Overloaded

    app = front(tmp_path, [r.url for r in replicas], split_ways=2)
    model = app.extensions["lsml_model"]

    def overloaded(*args: Any, **kwargs: Any) -> Any:
        raise Overloaded("queue full", retry_after_s=1)

    monkeypatch.setattr(model, "predict", overloaded)
    results = (
        app.test_client()
        .post("/predict", json={"tasks": tasks(30), "label_config": CONFIG})
        .get_json()["results"]
    )
    assert [spans(p)[0][0] for p in results] == [f"Person{i}" for i in range(30)]
    assert sorted(c[0] for r in replicas for c in r.calls) == [15, 15]
    app.extensions["lsml_jobs"].close()
