"""Benchmark splitting one big /predict over two replicas, against one replica answering it alone.

    python -m bench.bench_replicas --tasks 1000 --repeat 3 --out bench/results/replicas.json

Starts two gunicorn replicas of this server (spaCy NER, the same command as `make run`) on loopback
ports, sharing MODEL_DIR; replica A has REPLICA_URLS=A,B and SPLIT_WAYS=2. The same Data Manager-style
request of --tasks tasks goes to A, alternately:
- alone: with the X-LSML-Forwarded header, so A answers it by itself (what any single server does);
- split: as Label Studio sends it, so A cuts it in two chunks answered by A and B in parallel.
Both answers must be equal (region ids aside) and hold one prediction per task, in order. The ratio
is alone / split wall time, medians over --repeat rounds measured alternately in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import write_report
from serving.scale.replicas import FORWARDED_HEADER

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench_replicas")

CONFIG = (
    '<View><Labels name="label" toName="text"><Label value="Person"/><Label value="Organization"/>'
    '<Label value="Location"/></Labels><Text name="text" value="$text"/></View>'
)
PEOPLE = [
    "Barack Obama",
    "Angela Merkel",
    "Emmanuel Macron",
    "Jacinda Ardern",
    "Justin Trudeau",
    "Ada Lovelace",
]
PLACES = ["Seattle", "Paris", "Berlin", "Tokyo", "Toronto", "London", "Nairobi"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_replica(port: int, model_dir: Path, logs: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `gunicorn -c gunicorn.conf.py _wsgi:app` on a loopback port (its own process group)."""
    variables = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_DIR": str(model_dir),
        "WARMUP": "ner",
        "NER_ENGINE": "spacy",
        "WORKERS": "1",
        "THREADS": "8",
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    with open(logs / f"replica-{port}.log", "w") as log_file:
        return subprocess.Popen(
            [str(gunicorn), "-c", "gunicorn.conf.py", "_wsgi:app"],
            cwd=ROOT,
            env=variables,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"replica {url} exited with {proc.returncode}")
        with contextlib.suppress(requests.RequestException):
            backends = requests.get(url + "/health", timeout=2).json().get("backends") or {}
            if backends and all(state == "ready" for state in backends.values()):
                return
        time.sleep(0.2)
    raise SystemExit(f"replica {url} not ready in {timeout:g} s")


def normalize(results: Any) -> Any:
    """Return the predictions without region ids (fresh per request)."""
    return [[{k: v for k, v in r.items() if k != "id"} for r in p["result"]] for p in results]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tasks = [
        {
            "id": i,
            "data": {
                "text": f"{PEOPLE[i % 6]} met {PEOPLE[(i + 1) % 6]} in {PLACES[i % 7]} about report {i}."
            },
        }
        for i in range(args.tasks)
    ]
    body = {"tasks": tasks, "label_config": CONFIG, "project": "1.0", "params": {"context": None}}
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        root = Path(tmp)
        try:
            split_env = {"REPLICA_URLS": f"{url_a},{url_b}", "SPLIT_WAYS": "2", "SPLIT_MIN_TASKS": "16"}
            procs.append(start_replica(port_a, root / "model_dir", root, split_env))
            procs.append(start_replica(port_b, root / "model_dir", root, {}))
            wait_ready(url_a, procs[0])
            wait_ready(url_b, procs[1])

            def post(headers: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
                started = time.perf_counter()
                resp = requests.post(url_a + "/predict", json=body, headers=headers, timeout=600)
                seconds = time.perf_counter() - started
                resp.raise_for_status()
                return seconds, resp.json()["results"]

            post({FORWARDED_HEADER: "1"})  # warm-up: first requests pay lazy imports and caches
            post({})
            alone_s, split_s = [], []
            for _ in range(args.repeat):
                seconds, alone = post({FORWARDED_HEADER: "1"})
                alone_s.append(seconds)
                seconds, split = post({})
                split_s.append(seconds)
                if len(split) != len(tasks) or normalize(split) != normalize(alone):
                    raise SystemExit("the split answer differs from the single replica's")
            # each replica's /predict count: A got the requests and one chunk per split; B the other chunk
            counts = {}
            for name, url in (("a", url_a), ("b", url_b)):
                metrics = requests.get(url + "/metrics", timeout=10).text
                counts[name] = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines()
                    if line.startswith('lsml_requests_total{route="/predict"')
                )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
    alone_med, split_med = statistics.median(alone_s), statistics.median(split_s)
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "tasks": args.tasks,
        "alone_s": [round(s, 2) for s in alone_s],
        "split_s": [round(s, 2) for s in split_s],
        "alone_tasks_per_s": round(args.tasks / alone_med, 1),
        "split_tasks_per_s": round(args.tasks / split_med, 1),
        "speedup": round(alone_med / split_med, 2),
        "predict_requests": counts,
        "same_answers": True,
    }
    log.info(
        "%d tasks in one /predict: one replica %.2f s (%.1f tasks/s), split over two %.2f s (%.1f tasks/s): "
        "%.2fx; answers identical; /predict requests a=%d b=%d",
        args.tasks, alone_med, report["alone_tasks_per_s"], split_med, report["split_tasks_per_s"],
        report["speedup"], counts["a"], counts["b"],
    )  # fmt: skip
    write_report(args.out, report)


if __name__ == "__main__":
    main()
