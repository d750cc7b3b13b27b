"""Start and stop a real Label Studio, our server and headless chromium by PID, and talk to them."""

from __future__ import annotations

import atexit
import base64
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
# Same default as scripts/setup_e2e.sh; CI may point both at a cached location.
LS_VENV = Path(os.environ.get("LS_E2E_VENV", str(REPO / ".cache" / "ls-venv")))
if not LS_VENV.is_absolute():
    LS_VENV = REPO / LS_VENV
# A migrated empty database made by scripts/setup_e2e.sh: copying it skips 1-2 minutes of migrations.
LS_DB_TEMPLATE = LS_VENV / "db-template" / "label_studio.sqlite3"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Every process we start, so an interpreter exit (even after a failed fixture) still stops it.
_RUNNING: dict[int, ManagedProcess] = {}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Return True when something accepts connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ls_executable() -> Path | None:
    """Return the label-studio entry point of the e2e virtualenv, or None when it is not installed."""
    exe = LS_VENV / "bin" / "label-studio"
    marker = LS_VENV / f".ls-{LS_VERSION}"
    return exe if exe.exists() and marker.exists() else None


def chromium_executable() -> str | None:
    """Return the path of a chromium binary, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the child when the test process dies, even by SIGKILL (no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped with its whole group."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path):
        """Start the process now."""
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session = own process group: stop() reaches every child (runserver reloaders, workers).
            start_new_session=True,
            # The group leader dies with us; gunicorn workers and chromium helpers follow their leader.
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.pid = self.proc.pid
        _RUNNING[self.pid] = self
        log.info("started %s pid %d (log %s)", name, self.pid, log_path)

    def alive(self) -> bool:
        """Return True while the main process runs."""
        return self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        """Return the end of the process log."""
        try:
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Send SIGTERM to the process group, then SIGKILL what is left; idempotent."""
        pgid = self.pid  # start_new_session makes the child its group leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s pid %d ignored SIGTERM; killing its group", self.name, self.pid)
        # Children may outlive the leader (a gunicorn worker, a Django autoreloader): kill the group anyway.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        _RUNNING.pop(self.pid, None)
        if not self._log.closed:
            self._log.close()
        log.info("stopped %s pid %d", self.name, self.pid)


@atexit.register
def stop_all() -> None:
    """Stop every process this module started and has not stopped yet."""
    for proc in list(_RUNNING.values()):
        proc.stop(timeout=5)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM (a CI job timeout) into KeyboardInterrupt so fixtures stop their processes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def group_alive(pid: int) -> bool:
    """Return True when any process of the group led by pid still exists."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_until(
    probe: Callable[[], Any],
    timeout: float,
    what: str,
    proc: ManagedProcess | None = None,
    every: float = 0.5,
) -> Any:
    """Call probe until it returns a truthy value; fail with the process log when it dies or time runs out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.proc.returncode} while waiting for {what}:\n{proc.tail()}"
            )
        try:
            value = probe()
        except Exception as exc:  # connection refused while starting, etc.
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(every)
    tail = f"\n--- {proc.name} log ---\n{proc.tail()}" if proc is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error}){tail}")


def isolated_env(root: Path, **extra: str) -> dict[str, str]:
    """Return an environment with HOME and every model cache under root, offline hubs, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "PYTEST_"))}
    for key, sub in {
        "HOME": "home",
        "XDG_CACHE_HOME": "cache",
        "TORCH_HOME": "torch",
        "HF_HOME": "hf",
        "EASYOCR_MODULE_PATH": "easyocr",
    }.items():
        path = root / sub
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


# ---------------------------------------------------------------- Label Studio


class LabelStudio:
    """A Label Studio server on loopback with SQLite in a temp dir, and a REST client for it."""

    def __init__(self, root: Path, username: str = "admin@example.com", password: str = "e2e-Passw0rd!"):
        """Remember where the instance lives; start() launches it."""
        self.root = root
        self.username = username
        self.password = password
        self.token = "e2e" + os.urandom(12).hex()
        self.port = 0
        self.proc: ManagedProcess | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        """Return the base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        """Start label-studio on a free loopback port and wait for /health and the API token."""
        exe = ls_executable()
        if exe is None:
            raise RuntimeError(
                f"label-studio {LS_VERSION} is not installed in {LS_VENV}; run scripts/setup_e2e.sh"
            )
        self.port = free_port()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        if LS_DB_TEMPLATE.exists() and not (data / LS_DB_TEMPLATE.name).exists():
            shutil.copyfile(LS_DB_TEMPLATE, data / LS_DB_TEMPLATE.name)
        env = isolated_env(
            self.root,
            LABEL_STUDIO_BASE_DATA_DIR=str(data),
            LABEL_STUDIO_HOST=self.url,
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",
            # Our server runs on 127.0.0.1: both are needed or connecting it answers 403.
            ML_BLOCK_LOCAL_IP="false",
            SSRF_PROTECTION_ENABLED="false",
            DJANGO_DB="sqlite",
            LOG_LEVEL="WARNING",
        )
        env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
        argv = [
            str(exe),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",  # the bind address; the default is 0.0.0.0
            "--port",
            str(self.port),
            "--username",
            self.username,
            "--password",
            self.password,
            "--user-token",
            self.token,
            "--enable-legacy-api-token",
        ]
        self.proc = ManagedProcess("label-studio", argv, env, self.root, self.root / "label-studio.log")
        self.session.headers["Authorization"] = f"Token {self.token}"
        wait_until(self._healthy, timeout, f"Label Studio /health on port {self.port}", self.proc, every=1.0)
        # /health answers before the user and token exist on a first start.
        wait_until(
            lambda: self.session.get(f"{self.url}/api/current-user/whoami", timeout=5).ok,
            60,
            "the Label Studio API token",
            self.proc,
        )

    def _healthy(self) -> bool:
        # A busy port makes label-studio move to port+1 silently: only our port counts.
        return requests.get(f"{self.url}/health", timeout=3).status_code == 200

    def stop(self) -> None:
        """Stop the server and every child."""
        if self.proc is not None:
            self.proc.stop()

    # ---- REST ----
    def api(self, method: str, path: str, expect: int | Sequence[int] = (200, 201), **kwargs: Any) -> Any:
        """Call the REST API; raise with the response text on an unexpected status."""
        kwargs.setdefault("timeout", 120)
        resp = self.session.request(method, f"{self.url}{path}", **kwargs)
        codes = (expect,) if isinstance(expect, int) else tuple(expect)
        if resp.status_code not in codes:
            raise AssertionError(
                f"{method} {path} -> {resp.status_code} (wanted {codes}): {resp.text[:2000]}"
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        """Create a project."""
        return self.api("POST", "/api/projects", json={"title": title, "label_config": label_config})

    def import_json(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks and return their ids in import order."""
        before = set(self.task_ids(project))
        self.api("POST", f"/api/projects/{project}/import", json=tasks)
        return sorted(set(self.task_ids(project)) - before)

    def import_file(self, project: int, filename: str, content: bytes, mime: str) -> list[int]:
        """Upload a file (multipart) as one task; Label Studio stores it under /data/upload/."""
        before = set(self.task_ids(project))
        self.api("POST", f"/api/projects/{project}/import", files={"file": (filename, content, mime)})
        return sorted(set(self.task_ids(project)) - before)

    def tasks(self, project: int) -> list[dict[str, Any]]:
        """Return every task of a project (listing never asks the backend for predictions)."""
        body = self.api("GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"})
        return list(body["tasks"] if isinstance(body, dict) else body)

    def task_ids(self, project: int) -> list[int]:
        """Return every task id of a project."""
        return [int(t["id"]) for t in self.tasks(project)]

    def task_data(self, project: int, task_id: int) -> dict[str, Any]:
        """Return a task's data without opening it."""
        (task,) = [t for t in self.tasks(project) if t["id"] == task_id]
        return dict(task["data"])

    def task(self, task_id: int) -> dict[str, Any]:
        """Return one task (opening a task with no prediction makes Label Studio ask the backend)."""
        return self.api("GET", f"/api/tasks/{task_id}")

    def connect_ml(self, project: int, url: str, title: str = "lsml e2e") -> dict[str, Any]:
        """Connect an ML backend to a project; Label Studio calls /health and /setup before answering."""
        return self.api(
            "POST",
            "/api/ml",
            json={"url": url, "project": project, "title": title, "is_interactive": True},
        )

    def ml_backend(self, ml_id: int) -> dict[str, Any]:
        """Return an ML backend (GET refreshes its state through /health and /setup)."""
        return self.api("GET", f"/api/ml/{ml_id}")

    def retrieve_predictions(self, project: int) -> Any:
        """Run the Data Manager action "Retrieve predictions" on every task of a project."""
        return self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
        )

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        """Return the stored predictions of a task."""
        return self.api("GET", "/api/predictions", params={"task": task_id})

    def interactive(self, ml_id: int, task_id: int, result: list[dict[str, Any]]) -> Any:
        """Ask the backend for an interactive prediction with the regions a user drew."""
        return self.api(
            "POST",
            f"/api/ml/{ml_id}/interactive-annotating",
            json={"task": task_id, "context": {"result": result}},
        )

    def download(self, path: str, headers: Mapping[str, str]) -> requests.Response:
        """GET a Label Studio path with explicit auth headers only (no session token)."""
        return requests.get(f"{self.url}{path}", headers=dict(headers), timeout=30)

    def use_personal_access_token(self, pat: str) -> None:
        """Authenticate the REST client with an access JWT exchanged for a personal access token."""
        resp = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": pat}, timeout=30)
        if resp.status_code != 200:
            raise AssertionError(f"PAT exchange failed: {resp.status_code} {resp.text[:500]}")
        self.session.headers["Authorization"] = f"Bearer {resp.json()['access']}"

    def use_legacy_token(self) -> None:
        """Authenticate the REST client with the legacy token again."""
        self.session.headers["Authorization"] = f"Token {self.token}"

    def login_session(self) -> str:
        """Log in through the form like a browser and return the sessionid cookie."""
        browser = requests.Session()
        browser.get(f"{self.url}/user/login/", timeout=30)
        csrf = browser.cookies.get("csrftoken", "")
        resp = browser.post(
            f"{self.url}/user/login/",
            data={"email": self.username, "password": self.password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{self.url}/user/login/", "X-CSRFToken": csrf},
            allow_redirects=False,
            timeout=30,
        )
        session_id = browser.cookies.get("sessionid")
        if resp.status_code not in (302, 303) or not session_id:
            raise AssertionError(f"form login failed: {resp.status_code} {resp.text[:500]}")
        return str(session_id)


# ---------------------------------------------------------------- our server


class MLServer:
    """Our server under gunicorn, as a real process, with every cache in a temp dir."""

    def __init__(self, root: Path, env: Mapping[str, str]):
        """Remember the settings; start() launches it."""
        self.root = root
        self.extra_env = dict(env)
        self.port = 0
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Return the base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0, wait_models: bool = True) -> None:
        """Start gunicorn on a free port, wait for /health and (by default) for every warm-up model."""
        self.port = free_port()
        model_dir = self.root / "model_dir"
        model_dir.mkdir(parents=True, exist_ok=True)
        env = isolated_env(
            self.root,
            HOST="127.0.0.1",
            PORT=str(self.port),
            MODEL_DIR=str(model_dir),
            WORKERS="1",
            THREADS="8",
            LOG_LEVEL="INFO",
            **self.extra_env,
        )
        argv = [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "_wsgi:app"]
        self.proc = ManagedProcess(f"ml-server:{self.port}", argv, env, REPO, self.root / "ml-server.log")
        wait_until(
            lambda: requests.get(f"{self.url}/health", timeout=2).ok, 60, "our server's /health", self.proc
        )
        if wait_models:
            wait_until(self._models_ready, timeout, "the warm-up models", self.proc, every=1.0)

    def health(self) -> dict[str, Any]:
        """Return /health's JSON."""
        return requests.get(f"{self.url}/health", timeout=5).json()

    def _models_ready(self) -> bool:
        states = self.health().get("backends") or {}
        failed = {k: v for k, v in states.items() if str(v).startswith("unavailable")}
        if failed:
            raise RuntimeError(f"models failed to load: {failed}\n{self.proc.tail() if self.proc else ''}")
        return bool(states) and all(v == "ready" for v in states.values())

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        if self.proc is not None:
            self.proc.stop()


# ---------------------------------------------------------------- chromium over the DevTools protocol


class Chromium:
    """Headless chromium driven over the DevTools protocol (websocket-client)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
    )

    def __init__(self, root: Path, width: int = 1440, height: int = 900):
        """Remember where the profile lives; start() launches chromium."""
        self.root = root
        self.width = width
        self.height = height
        self.proc: ManagedProcess | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)

    def start(self, timeout: float = 60.0) -> None:
        """Launch chromium with a DevTools port and attach to its first page."""
        import websocket  # websocket-client

        exe = chromium_executable()
        if exe is None:
            raise RuntimeError("chromium is not installed; run scripts/setup_e2e.sh")
        port = free_port()
        profile = self.root / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        argv = [
            exe,
            *self.FLAGS,
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-allow-origins=*",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        env = isolated_env(self.root)
        self.proc = ManagedProcess("chromium", argv, env, self.root, self.root / "chromium.log")

        def page_ws() -> str | None:
            targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        ws_url = wait_until(page_ws, timeout, "chromium's DevTools endpoint", self.proc)
        self._ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Network.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )

    def send(
        self, method: str, params: Mapping[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Send one DevTools command and return its result (events arriving meanwhile are dropped)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": dict(params or {})}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self._ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method} failed: {msg['error']}")
                return dict(msg.get("result") or {})
        raise TimeoutError(f"DevTools {method} gave no answer in {timeout} s")

    def set_cookie(self, url: str, name: str, value: str) -> None:
        """Set a cookie for url (e.g. Label Studio's sessionid)."""
        ok = self.send("Network.setCookie", {"name": name, "value": value, "url": url, "path": "/"})
        if not ok.get("success", True):
            raise RuntimeError(f"chromium refused cookie {name}")

    def navigate(self, url: str) -> None:
        """Open url in the page."""
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(
        self, expression: str, check: Callable[[Any], bool], what: str, timeout: float = 90.0, stable: int = 3
    ) -> Any:
        """Evaluate expression until check(value) holds `stable` polls in a row; return the value.

        Label Studio re-mounts the editor while a task loads (a spinner replaces regions that were
        already drawn), so one matching poll is not enough before a screenshot.
        """
        state: dict[str, Any] = {"value": None, "streak": 0}

        def probe() -> bool:
            state["value"] = self.evaluate(expression)
            state["streak"] = state["streak"] + 1 if check(state["value"]) else 0
            return bool(state["streak"] >= stable)

        try:
            wait_until(probe, timeout, what, self.proc, every=1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- last page state ---\n{str(state['value'])[:3000]}") from None
        return state["value"]

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def stop(self) -> None:
        """Close the connection and stop chromium with its helper processes."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self.proc is not None:
            self.proc.stop(timeout=10)
