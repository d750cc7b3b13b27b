"""Two job managers (two replicas) sharing one MODEL_DIR: a job made through one is seen, cancelled and
finished through the other, whichever started first; a job on an engine a replica lacks fails clearly."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from serving.errors import BadRequest
from serving.jobs.manager import JobManager
from serving.jobs.store import create_store
from serving.settings import Settings

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="parity" toName="text"><Choice value="even"/><Choice value="odd"/></Choices>
</View>"""


class Predict:
    """A fake runtime.predict that records every task it predicted."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, label_config: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(self.delay_s)
        with self.lock:
            self.seen.extend(t["data"]["text"] for t in tasks)
        out = []
        for t in tasks:
            n = int(t["data"]["text"].split()[-1])
            value = {"choices": ["even" if n % 2 == 0 else "odd"]}
            item = {
                "id": f"r{n}",
                "from_name": "parity",
                "to_name": "text",
                "type": "choices",
                "value": value,
            }
            out.append({"result": [item], "score": 1.0, "model_version": "p1"})
        return out


def text_tasks(n: int) -> list[dict[str, Any]]:
    return [{"data": {"text": f"task number {i}"}} for i in range(n)]


def test_a_replica_started_before_any_job_finishes_the_job_another_replica_left(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path / "shared"), job_rescan_s=0.2)
    assert not (tmp_path / "shared" / "jobs").exists()
    second = Predict()
    b = JobManager(settings, second, chunk_size=10)  # before MODEL_DIR/jobs exists
    first = Predict(delay_s=0.02)
    a = JobManager(settings, first, chunk_size=10)
    try:
        job = a.create(CONFIG, tasks=text_tasks(300))
        deadline = time.monotonic() + 30
        while b.status(job)["done"] < 40 and time.monotonic() < deadline:  # B sees A's progress
            time.sleep(0.01)
        a.close()  # replica A goes away mid-job (its flock is released, as when it dies)
        stopped_at = a.status(job)["done"]
        assert 40 <= stopped_at < 300
        status = b.wait(job, 30)
        assert status["state"] == "done" and (status["done"], status["failed"]) == (300, 0)
        assert len(first.seen) == stopped_at  # A's committed chunks were not predicted again by B
        assert len(second.seen) == 300 - stopped_at
        assert sorted(first.seen + second.seen) == sorted(f"task number {i}" for i in range(300))
        import json

        body = json.loads("".join(b.result(job)))
        assert [t["data"]["text"] for t in body] == [f"task number {i}" for i in range(300)]
        assert all(len(t["predictions"]) == 1 for t in body)
        assert [j["job_id"] for j in b.list()] == [job]
    finally:
        a.close()
        b.close()


def test_a_job_is_cancelled_through_another_replica(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path / "shared"), job_rescan_s=60)
    a = JobManager(settings, Predict(delay_s=0.02), chunk_size=5)
    b = JobManager(settings, Predict(), chunk_size=5)
    try:
        job = a.create(CONFIG, tasks=text_tasks(400))
        deadline = time.monotonic() + 30
        while a.status(job)["done"] < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.cancel(job)["cancel_requested"] is True
        status = a.wait(job, 30)
        assert status["state"] == "cancelled" and status["done"] < 400
        assert b.cancel(job) == {"job_id": job, "state": "deleted"}
        assert not (tmp_path / "shared" / "jobs" / job).exists()
    finally:
        a.close()
        b.close()


def test_a_job_on_an_engine_this_replica_lacks_fails_with_the_reason(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path / "shared"), job_rescan_s=60)
    manager = JobManager(settings, Predict(), chunk_size=5)
    try:
        try:
            manager.create(CONFIG, tasks=text_tasks(5), engine="ray")
            raise AssertionError("engine ray accepted without RAY_ADDRESS")
        except BadRequest as exc:
            assert "RAY_ADDRESS" in exc.message
        # a ray job left in the shared folder by a replica that had Ray
        job_dir = tmp_path / "shared" / "jobs" / "0123456789ab"
        job_dir.mkdir(parents=True)
        create_store(
            job_dir / "job.sqlite", CONFIG, tasks=text_tasks(5), job_id=job_dir.name, extra={"engine": "ray"}
        ).close()
        manager.scan()
        status = manager.wait(job_dir.name, 10)
        assert status["state"] == "failed" and status["engine"] == "ray"
        assert "engine 'ray'" in status["error"] and "RAY_ADDRESS" in status["error"]
    finally:
        manager.close()
