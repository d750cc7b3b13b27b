"""Load test on loopback: N concurrent clients for D seconds against gunicorn with a bounded queue.

Prints and returns: requests, status counts, 503s with Retry-After, p50/p95/p99 latency, and the
worker's RSS growth between the first 1,000 requests and the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger("bench.load")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = (
    '<View><Text name="text" value="$text"/>'
    '<Labels name="ner" toName="text"><Label value="PER"/><Label value="ORG"/></Labels></View>'
)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Return a process's resident memory in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_pid(master: int) -> int:
    """Return the (single) gunicorn worker's pid."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0]) if children else master


def start_server(port: int, queue_size: int, threads: int) -> subprocess.Popen[bytes]:
    """Start gunicorn with the fake backend on 127.0.0.1:port and wait for /health."""
    env = dict(
        os.environ,
        HOST="127.0.0.1",
        PORT=str(port),
        WORKERS="1",
        THREADS=str(threads),
        QUEUE_SIZE=str(queue_size),
        MAX_WAIT_MS="2",
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--access-logfile",
            "/dev/null",
            "bench.fake_server:app",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def run(  # noqa: C901 (a load test's driver: one measurement sequence read top to bottom)
    clients: int = 64, duration_s: float = 60.0, queue_size: int = 32, threads: int = 32
) -> dict[str, Any]:
    """Run the load and return the figures."""
    port = free_port()
    proc = start_server(port, queue_size, threads)
    url = f"http://127.0.0.1:{port}/predict"
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()
    count = 0
    rss_at_1000 = 0
    wpid = worker_pid(proc.pid)
    stop_at = time.monotonic() + duration_s

    def client(k: int) -> None:
        nonlocal count, rss_at_1000
        session = requests.Session()
        i = 0
        while time.monotonic() < stop_at:
            body = {
                "tasks": [{"id": i, "data": {"text": f"Alice{k} met Bob{i} at Acme Corp"}}],
                "label_config": CONFIG,
            }
            started = time.perf_counter()
            try:
                resp = session.post(url, json=body, timeout=30)
            except requests.RequestException as exc:
                with lock:
                    statuses["connection-error"] += 1
                    problems.append(str(exc)[:200])
                continue
            elapsed = time.perf_counter() - started
            with lock:
                count += 1
                statuses[str(resp.status_code)] += 1
                if resp.status_code == 200:
                    latencies.append(elapsed)
                    if len(resp.json()["results"]) != 1:
                        problems.append("wrong result count")
                elif resp.status_code == 503:
                    if not resp.headers.get("Retry-After"):
                        problems.append("503 without Retry-After")
                else:
                    problems.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                if count == 1000:
                    rss_at_1000 = rss_kib(wpid)
            if resp.status_code == 503:
                time.sleep(float(resp.headers.get("Retry-After", "1")) / 20)  # polite, but keep the pressure
            i += 1

    started = time.monotonic()
    pool = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - started
    rss_end = rss_kib(wpid)
    stop(proc)
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1) if latencies else 0.0
        )

    return {
        "clients": clients,
        "duration_s": round(wall, 1),
        "requests": count,
        "rate_rps": round(count / wall, 1),
        "statuses": dict(statuses),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else 0.0,
        "rss_kib_at_1000": rss_at_1000,
        "rss_kib_end": rss_end,
        "rss_growth_pct": round((rss_end - rss_at_1000) / rss_at_1000 * 100, 2) if rss_at_1000 else None,
        "problems": problems[:20],
    }


def main() -> None:
    """Command line: python -m bench.load_test --clients 64 --duration 60."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--queue-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.clients, args.duration, args.queue_size, args.threads)
    text = json.dumps(result, indent=2)
    log.info("%s", text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
