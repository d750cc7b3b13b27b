"""Helpers the benchmark scripts share: concurrent /predict through a test client, the JSON report."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("bench")


def predict_concurrently(client: Any, config: str, datas: list[dict[str, Any]], clients: int) -> list[Any]:
    """POST one task per data dict to /predict as `clients` concurrent requests; return the results in order."""
    chunks = [list(range(len(datas)))[c::clients] for c in range(clients)]
    results: list[Any] = [None] * len(datas)
    errors: list[str] = []

    def post(indices: list[int]) -> None:
        body = {
            "tasks": [{"id": i + 1, "data": datas[i]} for i in indices],
            "label_config": config,
            "project": "1.0",
            "params": {"context": None},
        }
        response = client.post("/predict", json=body)
        if response.status_code != 200:
            errors.append(f"{response.status_code}: {response.get_data(as_text=True)[:300]}")
            return
        # orjson: the client's decoding is not the server's cost being measured
        for i, prediction in zip(indices, orjson.loads(response.get_data())["results"], strict=True):
            results[i] = prediction

    threads = [threading.Thread(target=post, args=(chunk,)) for chunk in chunks if chunk]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def write_report(out: str, report: dict[str, Any]) -> None:
    """Write a benchmark's results as JSON when --out was given."""
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
