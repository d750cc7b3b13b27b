"""Big requests at once (issue #32): they wait for queue room within their deadline instead of a 503.

Bound stated for the urgent lane: a one-task or interactive request during a big one waits for at
most the forward in progress and its own (plus max_wait_ms and its own preparation), never for the
big request's queued items; asserted here as under 0.5 s with 20 ms forwards, where the queue ahead
of it holds over a second of work.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.support.app import fixture_request
from tests.support.fakes import FAMILIES, FakeNER, FakeResolver, reset_fakes

CONFIG = fixture_request("predict_single_open_task")["body"]["label_config"]
KEY = "fake_ner:fake-ner-1"


class CountingResolver(FakeResolver):
    """Counts texts loaded and the most loaded ahead of the model (prepared, not yet in a forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.loaded = 0
        self.peak_ahead = 0

    def load_text(self, value: str, task_id: int | None = None, *, as_url: bool | None = None) -> str:
        with self.lock:
            self.loaded += 1
            self.peak_ahead = max(self.peak_ahead, self.loaded - sum(FakeNER.batch_sizes))
        return super().load_text(value, task_id, as_url=as_url)


@pytest.fixture(autouse=True)
def _reset() -> None:
    reset_fakes()


def _app(tmp_path: Path, **changes: Any) -> tuple[Any, CountingResolver]:
    settings = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0).with_(**changes)
    resolver = CountingResolver()
    app = create_app(settings, runtime=Runtime(settings, families=FAMILIES, resolver=resolver))
    client = app.test_client()
    client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    until = time.monotonic() + 30
    while client.get("/health").json["backends"].get(KEY) != "ready" and time.monotonic() < until:
        time.sleep(0.02)
    return client, resolver


def _tasks(first: int, n: int) -> list[dict[str, Any]]:
    return [{"id": first + k, "data": {"text": f"Name{first + k} went home"}} for k in range(n)]


def _post(client: Any, tasks: list[dict[str, Any]], context: Any = None) -> Any:
    body = {"tasks": tasks, "label_config": CONFIG, "params": {"context": context}}
    return client.post("/predict", json=body)


def _names(response: Any) -> list[str]:
    return [r["result"][0]["value"]["text"] for r in response.json["results"]]


def _metric(client: Any, name: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_eight_requests_of_512_texts_with_a_queue_of_1024_all_succeed_in_order(tmp_path: Path) -> None:
    FakeNER.forward_delay_s = 0.003
    client, resolver = _app(tmp_path, queue_size=1024)
    FakeNER.batch_sizes.clear()
    responses: dict[int, Any] = {}

    def send(k: int) -> None:
        responses[k] = _post(client, _tasks(k * 512, 512))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(8):
        assert responses[k].status_code == 200, responses[k].get_data(as_text=True)[:300]
        assert _names(responses[k]) == [f"Name{k * 512 + j}" for j in range(512)]
    assert sum(FakeNER.batch_sizes) == 8 * 512  # every text ran once
    # Texts are loaded only once their model has room: never more than the queue ahead of the model
    # (plus the batch being taken), although 4,096 were asked for at once.
    assert 512 < resolver.peak_ahead <= 1024 + FakeNER.max_batch_size
    # every request is counted once in the time waited for room; some had to wait
    assert _metric(client, "lsml_admission_wait_seconds_count") == 8
    assert _metric(client, "lsml_admission_wait_seconds_sum") > 0
    assert _metric(client, "lsml_admission_waiting_items") == 0


def test_small_and_interactive_requests_during_a_big_one_answer_within_the_bound(tmp_path: Path) -> None:
    FakeNER.forward_delay_s = 0.02  # 16 texts per 20 ms: the big request is ~2 s of work
    client, _ = _app(tmp_path, queue_size=1024)
    big: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: big.update(r=_post(client, _tasks(0, 1600))))
    runner.start()
    until = time.monotonic() + 10
    while _metric(client, "lsml_queue_depth") < 500 and time.monotonic() < until:
        time.sleep(0.01)  # the big request's texts fill the queue (over a second of work ahead)
    assert _metric(client, "lsml_queue_depth") >= 500
    latencies = []
    for k in range(5):
        context = (
            {"result": [{"from_name": "label", "to_name": "text", "type": "labels"}]} if k == 4 else None
        )
        started = time.monotonic()
        response = _post(client, _tasks(10_000 + k, 1), context)
        latencies.append(time.monotonic() - started)
        assert response.status_code == 200
        assert _names(response) == [f"Name{10_000 + k}"]
    runner.join(30)
    assert max(latencies) < 0.5, latencies
    assert big["r"].status_code == 200
    assert _names(big["r"]) == [f"Name{j}" for j in range(1600)]


def test_a_flood_past_the_deadline_gets_prompt_503s_with_retry_after(tmp_path: Path) -> None:
    FakeNER.forward_delay_s = 0.02  # ~800 texts/s
    client, _ = _app(tmp_path, queue_size=256, predict_timeout_s=1.0)
    assert _post(client, _tasks(0, 160)).status_code == 200  # the model's throughput is measured
    responses: dict[int, tuple[Any, float]] = {}

    def send(k: int) -> None:
        started = time.monotonic()
        response = _post(client, _tasks(1000 * (k + 1), 300))
        responses[k] = (response, time.monotonic() - started)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    refused = [(r, s) for r, s in responses.values() if r.status_code == 503]
    served = [(r, s) for r, s in responses.values() if r.status_code == 200]
    assert len(refused) + len(served) == 10
    assert 5 <= len(refused) <= 9  # 3,000 texts are ~4 s of work; at most ~0.9 s of it is admitted
    for response, seconds in refused:
        assert seconds < 0.5  # refused at once, not after waiting for the deadline
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json["error"] == "overloaded"
    for response, _ in served:
        ids = [r["value"]["text"] for p in response.json["results"] for r in p.get("result", [])[:1]]
        assert len(response.json["results"]) == 300
        assert ids == sorted(ids, key=lambda name: int(name[4:]))  # in order (late ones say so)
    assert _metric(client, "lsml_admission_rejected_total") == len(refused)
    time.sleep(1.0)
    # nothing crashed: once the flood is through, a request is served as usual
    assert _names(_post(client, _tasks(99_000, 20))) == [f"Name{99_000 + j}" for j in range(20)]
