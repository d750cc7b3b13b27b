"""Real replicas for the tests: gunicorn processes of this server and Debian's nginx, all on loopback."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import check_nginx  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "ls_requests"
PEOPLE = ["Barack Obama", "Angela Merkel", "Emmanuel Macron", "Jacinda Ardern", "Justin Trudeau"]


def free_port() -> int:
    """Return a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ls_text(i: int) -> str:
    """Return task i's text: a person (found by spaCy) and the index."""
    return f"{PEOPLE[i % 5]} met the board of Microsoft on day {i}."


def ls_predict_body(first: int, n: int) -> dict[str, Any]:
    """Return a /predict body as Label Studio 1.23.2 sends it (captured), with n tasks from index first."""
    captured = json.loads((FIXTURES / "predict_single_open_task.json").read_text())["body"]
    template = captured["tasks"][0]
    tasks = []
    for i in range(first, first + n):
        task = copy.deepcopy(template)
        task["id"], task["data"] = 5000 + i, {"text": ls_text(i)}
        tasks.append(task)
    return {**captured, "tasks": tasks}


class Replica:
    """`gunicorn -c gunicorn.conf.py _wsgi:app` (what `make run` and the image start) on a loopback port."""

    def __init__(self, name: str, model_dir: Path, logs: Path, **env: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        variables = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "MODEL_DIR": str(model_dir),
            "WARMUP": "ner",
            "NER_ENGINE": "spacy",
            "WORKERS": "1",
            "THREADS": "8",
            "JOB_RESCAN_S": "1",
            "LOG_LEVEL": "INFO",
            "PYTHONPATH": str(REPO),
            **env,
        }
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        # its own session: kill() ends this replica's master and worker together, and nothing else
        self.proc = subprocess.Popen(
            [str(gunicorn), "-c", "gunicorn.conf.py", "_wsgi:app"],
            cwd=REPO,
            env=variables,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until /health reports every warmed-up model ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log(5000)
            with contextlib.suppress(requests.RequestException):
                backends = requests.get(self.url + "/health", timeout=2).json().get("backends") or {}
                if backends and all(state == "ready" for state in backends.values()):
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout:g} s:\n{self.log(5000)}")

    def kill(self) -> None:
        """SIGKILL the replica's process group (master and worker): a crash, not a graceful stop."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), or kill after 20 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self, tail: int = 0) -> str:
        """Return the replica's log so far (its last `tail` characters when tail > 0)."""
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text


class Nginx:
    """Debian's nginx running deploy/nginx.conf, its upstreams pointed at the replicas' loopback ports."""

    def __init__(self, port: int, upstreams: list[str]) -> None:
        binary = check_nginx.nginx_binary()
        if binary is None:
            pytest.skip("nginx is not installed (make test installs Debian's nginx)")
        # run as root, nginx's workers switch to "nobody", who cannot enter pytest's private tmp folders
        prefix = self.prefix = Path(tempfile.mkdtemp(prefix="lsml-nginx-"))
        prefix.chmod(0o755)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.access_log = prefix / "access.log"
        conf = prefix / "nginx.conf"
        conf.write_text(
            check_nginx.localize(check_nginx.CONF.read_text(), upstreams, f"127.0.0.1:{port}", prefix)
        )
        self._log = open(self.access_log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, *check_nginx.nginx_args(conf, prefix, foreground=True)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (prefix / "error.log").read_text(errors="replace")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/nginx-health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("nginx did not start")

    def requests(self, path: str, at_least: int = 0, timeout: float = 10.0) -> list[tuple[bool, list[str]]]:
        """Return (forwarded chunk?, upstream addresses tried) of each request to `path`, in log order.

        nginx logs a request when it ends, just after the answer left: the chunks of a split request
        come before the request itself, and the last lines may lag (wait for `at_least` of them).
        """
        deadline = time.monotonic() + timeout
        while True:
            out = []
            for line in self.access_log.read_text().splitlines():
                if f'"POST {path} ' in line or f'"GET {path} ' in line:
                    forwarded = " fwd=1 " in line
                    out.append((forwarded, line.split("upstream=", 1)[1].strip().split(", ")))
            if len(out) >= at_least or time.monotonic() > deadline:
                return out
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop nginx (SIGQUIT: graceful) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.prefix, ignore_errors=True)
