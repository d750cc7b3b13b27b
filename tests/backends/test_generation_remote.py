"""The generation families on an OpenAI-compatible server: a fake one on 127.0.0.1 started by the test."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from backends._llm_engines import OpenAIEngine
from backends._llm_prompts import Request
from backends.generation import TextGenerationBackend, VisionGenerationBackend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings

KEY = "sk-test-SECRET-4242"
SUMMARY_CONFIG = """<View><Text name="text" value="$text"/>
  <TextArea name="answer" toName="text"/></View>"""
CAPTION_CONFIG = """<View><Image name="image" value="$image"/>
  <TextArea name="caption" toName="image"/></View>"""


class FakeServer:
    """A chat-completions endpoint: answers "echo: <last line of the prompt>", with scripted failures."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_first: dict[str, int] = {}  # prompt substring -> how many 429s before success
        self.slow: set[str] = set()  # prompt substrings answered after 2 s
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                text = prompt if isinstance(prompt, str) else prompt[0]["text"]
                with server.lock:
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failing = next((k for k, n in server.fail_first.items() if k in text and n > 0), None)
                    if failing:
                        server.fail_first[failing] -= 1
                try:
                    time.sleep(0.05)  # long enough for concurrent requests to overlap
                    if any(k in text for k in server.slow):
                        time.sleep(2.0)
                    if failing:
                        self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                        return
                    answer = "echo: " + text.splitlines()[-1]
                    choice: dict[str, Any] = {"message": {"role": "assistant", "content": answer}}
                    if "scored" in text:  # a server that returns token log-probabilities
                        choice["logprobs"] = {
                            "content": [{"logprob": math.log(0.5)}, {"logprob": math.log(0.5)}]
                        }
                    self._send(200, {"choices": [choice]})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()


def _client(server: FakeServer, tmp_path: Any, **settings: Any) -> Any:
    knobs: dict[str, Any] = {
        "llm_concurrency": 3,
        "llm_retries": 2,
        "llm_task_timeout_s": 1.0,
        "max_wait_ms": 50.0,
        **settings,
    }
    s = Settings(
        model_dir=str(tmp_path), llm_base_url=server.url, llm_api_key=KEY, llm_model="served-model", **knobs
    )
    families = {"vision_generation": VisionGenerationBackend, "text_generation": TextGenerationBackend}
    return create_app(s, runtime=Runtime(s, families=families)).test_client()


def test_batch_through_the_server_in_order_with_concurrency_limit(server: FakeServer, tmp_path: Any) -> None:
    """Twelve tasks: twelve requests, at most LLM_CONCURRENCY at once, answers in task order, key sent."""
    client = _client(server, tmp_path)
    tasks = [{"id": i, "data": {"text": f"text number {i}"}} for i in range(12)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": SUMMARY_CONFIG})
    assert response.status_code == 200, response.json
    texts = [r["result"][0]["value"]["text"] for r in response.json["results"]]
    assert texts == [[f"echo: text number {i}"] for i in range(12)]
    assert len(server.bodies) == 12 and 1 < server.max_in_flight <= 3
    assert set(server.auth) == {f"Bearer {KEY}"}
    body = server.bodies[0]
    assert body["model"] == "served-model" and body["temperature"] == 0 and body["max_tokens"] == 256
    assert body["messages"][0]["role"] == "system"
    assert response.json["results"][0]["model_version"].startswith("text_generation-")


def test_429_is_retried_then_answered(server: FakeServer, tmp_path: Any) -> None:
    """Two 429s then success: the task gets its answer (LLM_RETRIES=2 allows three tries)."""
    server.fail_first = {"busy text": 2}
    client = _client(server, tmp_path)
    tasks = [{"id": 1, "data": {"text": "busy text"}}]
    (prediction,) = client.post("/predict", json={"tasks": tasks, "label_config": SUMMARY_CONFIG}).json[
        "results"
    ]
    assert prediction["result"][0]["value"]["text"] == ["echo: busy text"]
    assert len(server.bodies) == 3


def test_timeout_and_exhausted_retries_are_retryable_task_failures(
    server: FakeServer, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow answer and endless 429s fail only their own tasks, without a result; the key is never logged."""
    server.slow = {"slow text"}
    server.fail_first = {"busy text": 99}
    client = _client(server, tmp_path, llm_retries=1)
    tasks = [
        {"id": 1, "data": {"text": "slow text"}},
        {"id": 2, "data": {"text": "fine text"}},
        {"id": 3, "data": {"text": "busy text"}},
    ]
    with caplog.at_level(logging.DEBUG):
        response = client.post("/predict", json={"tasks": tasks, "label_config": SUMMARY_CONFIG})
    assert response.status_code == 200
    slow, fine, busy = response.json["results"]
    # no "result": Label Studio stores nothing and asks again on the next "Retrieve predictions"
    assert "result" not in slow and "did not answer within 1 s" in slow["error"]
    assert "result" not in busy and "HTTP 429" in busy["error"] and "retry later" in busy["error"]
    assert fine["result"][0]["value"]["text"] == ["echo: fine text"]
    assert KEY not in caplog.text and KEY not in json.dumps(response.json)


def test_images_go_as_data_uris(server: FakeServer, tmp_path: Any) -> None:
    """A captioning config on the server: the image travels as a JPEG data URI beside the prompt."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    client = _client(server, tmp_path)
    tasks = [{"id": 1, "data": {"image": uri}}]
    (prediction,) = client.post("/predict", json={"tasks": tasks, "label_config": CAPTION_CONFIG}).json[
        "results"
    ]
    assert prediction["result"][0]["value"]["text"] == ["echo: Describe this image in one or two sentences."]
    content = server.bodies[0]["messages"][1]["content"]
    assert content[1]["type"] == "image_url"
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (40, 30) and sent.getpixel((20, 15))[0] > 200


def test_refused_request_is_not_retried_and_scrubs_the_key() -> None:
    """A 400 that echoes the key: one try, and the error shows *** instead of the key."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(1)
            data = f"bad key {KEY}".encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        engine = OpenAIEngine(f"http://127.0.0.1:{httpd.server_address[1]}/v1", KEY, "m", retries=3)
        (reply,) = engine.generate([Request("sys", "hello")])
    finally:
        httpd.shutdown()
    assert calls == [1]
    assert "HTTP 400" in reply.error and KEY not in reply.error and "***" in reply.error


def test_server_needs_a_url_and_a_model(tmp_path: Any) -> None:
    """model_name="openai" without LLM_BASE_URL: /setup says what to set."""
    s = Settings(model_dir=str(tmp_path))
    client = create_app(
        s, runtime=Runtime(s, families={"text_generation": TextGenerationBackend})
    ).test_client()
    config = SUMMARY_CONFIG.replace('toName="text"', 'toName="text" model_name="openai:gpt-4o-mini"')
    response = client.post("/setup", json={"schema": config, "project": "1"})
    assert response.status_code == 422 and "LLM_BASE_URL is not set" in str(response.json)


def test_system_prompt_setting_and_logprob_score(server: FakeServer, tmp_path: Any) -> None:
    """LLM_SYSTEM_PROMPT is the system turn; a server's log-probabilities give the score (mean token probability)."""
    client = _client(server, tmp_path, llm_system_prompt="Be terse.")
    tasks = [{"id": 1, "data": {"text": "scored text"}}, {"id": 2, "data": {"text": "plain text"}}]
    scored, plain = client.post("/predict", json={"tasks": tasks, "label_config": SUMMARY_CONFIG}).json[
        "results"
    ]
    assert scored["result"][0]["score"] == pytest.approx(0.5)
    assert plain["result"][0]["score"] == pytest.approx(1.0)
    assert {b["messages"][0]["content"] for b in server.bodies} == {"Be terse."}
