"""The Ray engine on a real local Ray cluster started by the test: same outputs as the local engine,
per-task failures inside a block, kill -9 of the driver then resume, POST /batch with engine ray."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import model
from serving.cli import main as cli
from serving.jobs.output import iter_result_text
from serving.jobs.store import JobStore, create_store
from serving.settings import Settings
from tests.scaling._ray_support import ACTOR_CPUS, normalize_ids, ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
NER_CONFIG = (
    '<View><Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/>'
    '<Label value="Location"/></Labels><Text name="text" value="$text"/></View>'
)
OCR_CONFIG = (
    '<View><Image name="image" value="$image"/><Labels name="label" toName="image"><Label value="Text"/>'
    '</Labels><Rectangle name="bbox" toName="image"/>'
    '<TextArea name="transcription" toName="image" perRegion="true"/></View>'
)
PEOPLE = ["Barack Obama", "Angela Merkel", "Emmanuel Macron", "Jacinda Ardern", "Justin Trudeau"]
PLACES = ["Seattle", "Paris", "Berlin", "Tokyo", "Toronto"]


def ner_text(i: int) -> str:
    return f"{PEOPLE[i % 5]} visited Microsoft in {PLACES[(i // 5) % 5]} on day {i}."


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    yield from ray_cluster()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("NER_ENGINE", "spacy")
    # items are queued as they are decoded; a long wait for company (it ends once nothing more is being
    # decoded) makes the local engine batch a whole folder like one Ray block, so outputs compare bit for bit
    monkeypatch.setenv("MAX_WAIT_MS", "5000")
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def predict(*args: str) -> int:
    """Run `python -m serving predict ...` in this process, with the composition root's families."""
    return cli.main(["predict", *args, "--quiet"], families=model.families)


def ray_flags(actors: int = 2) -> list[str]:
    return ["--engine", "ray", "--ray-actors", str(actors), "--ray-cpus-per-actor", ACTOR_CPUS]


def test_ray_engine_outputs_equal_the_local_engine_for_ner_and_ocr(cluster: str, env: Path) -> None:
    ner = env / "ner.xml"
    ner.write_text(NER_CONFIG)
    tasks = env / "tasks.jsonl"
    tasks.write_text(
        "".join(json.dumps({"id": 100 + i, "data": {"text": ner_text(i)}}) + "\n" for i in range(60))
    )
    assert predict("--config", str(ner), "--input", str(tasks), "--output", "local.json") == 0
    assert (
        predict(
            "--config",
            str(ner),
            "--input",
            str(tasks),
            "--output",
            "ray.json",
            "--chunk-size",
            "8",
            *ray_flags(),
        )
        == 0
    )
    local, remote = json.loads(Path("local.json").read_text()), json.loads(Path("ray.json").read_text())
    assert [t["id"] for t in remote] == [100 + i for i in range(60)]
    assert normalize_ids(remote) == normalize_ids(local)
    spans = {(r["value"]["text"], r["value"]["labels"][0]) for r in remote[1]["predictions"][0]["result"]}
    assert ("Angela Merkel", "Person") in spans and ("Seattle", "Location") in spans

    # OCR (EasyOCR, a torch model) on a folder of images: the actors read the files from disk
    from PIL import Image, ImageDraw, ImageFont

    folder = env / "scans"
    folder.mkdir()
    font = ImageFont.load_default(size=40)
    words = ["HELLO", "WORLD", "RAY", "NGINX"]
    for i, word in enumerate(words):
        im = Image.new("RGB", (320, 120), "white")
        ImageDraw.Draw(im).text((20, 30), word, fill="black", font=font)
        im.save(folder / f"{i}.png")
    ocr = env / "ocr.xml"
    ocr.write_text(OCR_CONFIG)
    import torch

    # the same float arithmetic as the actor, which Ray runs with one thread (OMP_NUM_THREADS=1):
    # scores and boxes come out bit-identical, not only close
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert predict("--config", str(ocr), "--input", str(folder), "--output-dir", "local_dir") == 0
    finally:
        torch.set_num_threads(threads)
    assert (
        predict("--config", str(ocr), "--input", str(folder), "--output-dir", "ray_dir", *ray_flags(1)) == 0
    )
    local_files = sorted(Path("local_dir").glob("*.json"))
    ray_files = sorted(Path("ray_dir").glob("*.json"))
    assert (
        [p.name for p in ray_files]
        == [p.name for p in local_files]
        == [f"task_{i:07d}.json" for i in range(4)]
    )
    read = [json.loads(p.read_text()) for p in ray_files]
    assert normalize_ids(read) == normalize_ids([json.loads(p.read_text()) for p in local_files])
    texts = [
        [r["value"]["text"][0] for r in t["predictions"][0]["result"] if r["type"] == "textarea"]
        for t in read
    ]
    assert texts == [[w] for w in words]


def test_a_bad_task_in_the_middle_of_a_block_leaves_the_others_intact(cluster: str, env: Path) -> None:
    from serving.jobs.engines.ray import RayJobRunner, RayOptions

    tasks: list[Any] = [{"id": i, "data": {"text": ner_text(i)}} for i in range(9)]
    tasks[4] = {"id": 4, "data": {"body": "no text key here"}}  # the config reads $text
    tasks[6] = {"id": 6, "data": {"text": 12345}}  # not text
    settings = Settings.from_env()
    store = create_store(env / "job.sqlite", NER_CONFIG, tasks=tasks)
    store.close()
    shared = env / "shared"  # RAY_STAGE_DIR: the store stays on the driver's disk, the staged tasks go here
    options = RayOptions(
        actors=1, cpus_per_actor=float(ACTOR_CPUS), stall_timeout_s=60, stage_dir=str(shared), quiet=True
    )
    # one block of 9: the failures are isolated inside it, never a dropped block
    meta = RayJobRunner(settings, model.families, options=options, chunk_size=9).run(env / "job.sqlite")
    assert shared.is_dir() and list(shared.iterdir()) == []  # staged under it, removed when done
    assert meta is not None and meta["state"] == "done"
    assert (meta["done"], meta["failed"]) == (9, 2)
    store = JobStore(env / "job.sqlite")
    rows = store.conn.execute(
        "SELECT idx, prediction IS NOT NULL, error FROM results ORDER BY idx"
    ).fetchall()
    assert [r[0] for r in rows] == list(range(9))
    assert "no key 'text'" in rows[4][2] and "must be text" in rows[6][2]
    assert all(r[1] and r[2] is None for r in rows if r[0] not in (4, 6))
    out = json.loads("".join(iter_result_text(store)))
    store.close()
    assert [t["id"] for t in out] == list(range(9))
    assert "predictions" not in out[4] and "predictions" not in out[6]  # Label Studio asks for them again
    for i in (0, 1, 2, 3, 5, 7, 8):
        found = {r["value"]["text"] for r in out[i]["predictions"][0]["result"]}
        assert PEOPLE[i % 5] in found, (i, found)


def _done(state: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_kill_9_of_the_driver_mid_run_then_resume_predicts_every_task_exactly_once(
    cluster: str, env: Path
) -> None:
    total = 1500
    config = env / "ner.xml"
    config.write_text(NER_CONFIG)
    tasks = env / "tasks.jsonl"
    tasks.write_text(
        "".join(json.dumps({"id": i, "data": {"text": ner_text(i)}}) + "\n" for i in range(total))
    )
    out = env / "out.json"
    state = Path(str(out) + ".state")
    cmd = [
        sys.executable, "-m", "serving", "predict", "--config", str(config), "--input", str(tasks),
        "--output", str(out), "--chunk-size", "8", "--quiet", "--ray-address", cluster, *ray_flags(1),
    ]  # fmt: skip
    env_vars = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=env, env=env_vars, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _done(state) < 40 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed_at = _done(state)
    assert 40 <= killed_at < total, killed_at
    assert not out.exists()

    again = subprocess.run(
        [*cmd, "--resume"], cwd=env, env=env_vars, capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-3000:]
    # the tasks committed before the kill were not sent to the cluster again
    assert f"ray: {total - killed_at} tasks pending" in again.stderr
    result = json.loads(out.read_text())
    assert [t["id"] for t in result] == list(range(total))
    assert all(len(t["predictions"]) == 1 for t in result)
    assert all(
        PEOPLE[t["id"] % 5] in {r["value"]["text"] for r in t["predictions"][0]["result"]} for t in result
    )


def test_a_job_that_cannot_start_on_the_cluster_fails_fast_with_the_reason(cluster: str, env: Path) -> None:
    config = env / "ner.xml"
    config.write_text(NER_CONFIG)
    tasks = env / "tasks.jsonl"
    tasks.write_text(json.dumps({"text": "Barack Obama"}) + "\n")
    cmd = [
        sys.executable, "-m", "serving", "predict", "--config", str(config), "--input", str(tasks),
        "--output", "out.json", "--quiet", "--engine", "ray", "--ray-address", cluster, "--ray-gpus-per-actor", "1",
    ]  # fmt: skip
    env_vars = {**os.environ, "PYTHONPATH": str(REPO), "RAY_STALL_TIMEOUT_S": "5"}
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=env, env=env_vars, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "need 1 GPU" in done.stderr  # the warning names what is missing
    assert "no task finished on the Ray cluster for 5 s (RAY_STALL_TIMEOUT_S)" in done.stderr
    assert time.monotonic() - started < 60


def test_post_batch_with_engine_ray_runs_the_job_on_the_cluster(cluster: str, env: Path) -> None:
    settings = Settings.from_env().with_(
        ray_address=cluster, ray_cpus_per_actor=float(ACTOR_CPUS), ray_actors=1
    )
    app = model.create_app(settings)
    client = app.test_client()
    try:
        tasks = [{"id": i, "data": {"text": ner_text(i)}} for i in range(40)]
        created = client.post("/batch", json={"label_config": NER_CONFIG, "tasks": tasks, "engine": "ray"})
        assert created.status_code == 202, created.get_json()
        job = created.get_json()
        assert job["engine"] == "ray" and job["total"] == 40
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = client.get(f"/jobs/{job['job_id']}").get_json()
            seen.append(status["done"])
            if status["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert status["state"] == "done", status
        assert (status["done"], status["failed"], status["engine"]) == (40, 0, "ray")
        assert seen == sorted(seen)
        result = json.loads(client.get(f"/jobs/{job['job_id']}/result").get_data(as_text=True))
        inline = client.post("/batch", json={"label_config": NER_CONFIG, "tasks": tasks[:10]}).get_json()
        assert normalize_ids(result[:10]) == normalize_ids(inline)  # the local engine, same answers
        assert [t["id"] for t in result] == list(range(40))
    finally:
        app.extensions["lsml_jobs"].close()
        app.extensions["lsml_model"].runtime.close()
