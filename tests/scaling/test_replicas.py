"""nginx (deploy/nginx.conf, Debian's nginx) in front of two gunicorn replicas sharing MODEL_DIR, all on
loopback: requests spread over both, one replica killed mid-run loses no task, a big request is split
over both and merged in order, /setup and /versions agree, and a batch job moves to the live replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from serving.scale.replicas import FORWARDED_HEADER
from tests.scaling._replica_support import Nginx, Replica, free_port, ls_predict_body, ls_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class Stack:
    """Two replicas (a, b) sharing MODEL_DIR, and nginx in front; big requests split through nginx."""

    def __init__(self, tmp: Path) -> None:
        nginx_port = free_port()
        model_dir = tmp / "model_dir"
        split = {"REPLICA_URLS": f"http://127.0.0.1:{nginx_port}", "SPLIT_WAYS": "2", "SPLIT_MIN_TASKS": "16"}
        self.a = Replica("a", model_dir, tmp, JOB_CHUNK_SIZE="8", **split)
        self.b = Replica("b", model_dir, tmp, JOB_CHUNK_SIZE="8", **split)
        self.nginx: Nginx | None = None
        try:
            self.a.wait_ready()
            self.b.wait_ready()
            self.nginx = Nginx(nginx_port, [f"127.0.0.1:{self.a.port}", f"127.0.0.1:{self.b.port}"])
        except BaseException:
            self.close()  # no replica outlives a failed start
            raise

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.a.stop()
        self.b.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    made = Stack(tmp_path)
    try:
        yield made
    finally:
        made.close()


def people(prediction: dict[str, Any]) -> set[str]:
    return {r["value"]["text"] for r in prediction["result"]}


def test_requests_spread_split_and_survive_a_replica_killed_mid_run(stack: Stack) -> None:
    assert stack.nginx is not None
    url = stack.nginx.url
    # a Data Manager "Retrieve predictions" of 120 tasks: split in two chunks answered by both replicas
    big = ls_predict_body(0, 120)
    split = requests.post(url + "/predict", json=big, timeout=100).json()["results"]
    alone = requests.post(url + "/predict", json=big, headers={FORWARDED_HEADER: "1"}, timeout=100).json()[
        "results"
    ]
    assert len(split) == 120 and all("result" in p for p in split)
    assert [people(p) for p in split] == [people(p) for p in alone]
    assert all(ls_text(i).split(" met")[0] in people(p) for i, p in enumerate(split))
    logged = stack.nginx.requests("/predict", at_least=3)
    # the replica that got the big request answered one chunk itself and forwarded the other, which
    # least_conn sent to the other replica (the first one holds the big request's connection); then
    # the big request itself, and the unsplit one
    assert [fwd for fwd, _ in logged] == [True, False, True]
    replicas = {f"127.0.0.1:{stack.a.port}", f"127.0.0.1:{stack.b.port}"}
    assert {logged[0][1][-1], logged[1][1][-1]} == replicas  # both replicas worked on it

    # Label Studio-style traffic (one open task, or a few) from 4 threads; replica a dies mid-run
    answers: dict[int, list[dict[str, Any]]] = {}
    failures: list[str] = []
    done = threading.Semaphore(0)

    def call(k: int) -> None:
        body = ls_predict_body(1000 + 3 * k, 3)
        try:
            resp = requests.post(url + "/predict", json=body, timeout=100)
            if resp.status_code != 200:
                failures.append(f"request {k}: {resp.status_code} {resp.text[:200]}")
            else:
                answers[k] = resp.json()["results"]
        except requests.RequestException as exc:
            failures.append(f"request {k}: {exc}")
        finally:
            done.release()

    before = len(logged)
    with ThreadPoolExecutor(4) as pool:
        for k in range(80):
            pool.submit(call, k)
        for _ in range(20):
            assert done.acquire(timeout=60)
        stack.a.kill()  # SIGKILL, requests in flight on it included
        killed_at = time.monotonic()
    assert failures == []
    assert sorted(answers) == list(range(80))
    for k, results in answers.items():
        assert len(results) == 3, k  # one prediction per task, none lost
        for j, prediction in enumerate(results):
            assert "result" in prediction and "error" not in prediction, (k, prediction)
            assert ls_text(1000 + 3 * k + j).split(" met")[0] in people(prediction)
    served = stack.nginx.requests("/predict", at_least=before + 80)[before:]
    assert len(served) == 80
    assert {tried[-1] for _, tried in served[:20]} == replicas  # spread over both before the kill
    # a request that found a dead went on to b (passive health check, non_idempotent), and then a
    # was left out: every later request was answered by b
    a_then_b = [f"127.0.0.1:{stack.a.port}", f"127.0.0.1:{stack.b.port}"]
    assert any(tried == a_then_b for _, tried in served[20:])
    assert all(tried[-1] == f"127.0.0.1:{stack.b.port}" for _, tried in served[25:])
    assert time.monotonic() - killed_at < 120

    # after the kill, the big request still gets one prediction per task, from the live replica
    again = requests.post(url + "/predict", json=big, timeout=100).json()["results"]
    assert [people(p) for p in again] == [people(p) for p in alone]


def test_replicas_agree_and_a_batch_job_moves_to_the_live_replica(stack: Stack) -> None:
    assert stack.nginx is not None
    setup = ls_predict_body(0, 1)
    body = {"project": setup["project"], "schema": setup["label_config"], "hostname": "", "access_token": ""}
    versions = {
        requests.post(stack.nginx.url + "/setup", json=body, timeout=30).json()["model_version"]
        for _ in range(4)
    }
    assert len(versions) == 1
    (version,) = versions
    assert requests.get(stack.a.url + "/versions", timeout=10).json() == {"versions": [version]}
    assert requests.get(stack.b.url + "/versions", timeout=10).json() == {"versions": [version]}
    assert requests.post(stack.b.url + "/setup", json=body, timeout=30).json()["model_version"] == version

    # a job created through replica a, polled through b and nginx; a dies; b finishes it
    tasks = [{"id": i, "data": {"text": ls_text(i)}} for i in range(600)]
    created = requests.post(
        stack.a.url + "/batch",
        json={"label_config": setup["label_config"], "tasks": tasks, "job": True},
        timeout=30,
    )
    assert created.status_code == 202
    job = created.json()["job_id"]
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = requests.get(f"{stack.b.url}/jobs/{job}", timeout=10).json()
        if status["done"] >= 16:
            break
        time.sleep(0.02)
    assert 16 <= status["done"] < 600, status
    stack.a.kill()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = requests.get(f"{stack.nginx.url}/jobs/{job}", timeout=10).json()
        if status["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert status["state"] == "done" and (status["done"], status["failed"]) == (600, 0), status
    assert "resumes at" in stack.b.log()
    result = requests.get(f"{stack.nginx.url}/jobs/{job}/result", timeout=30).json()
    assert [t["id"] for t in result] == list(range(600))
    assert all(len(t["predictions"]) == 1 and t["predictions"][0]["model_version"] == version for t in result)
