"""The serving path's own cost (issue #29): /predict against the model alone, side by side in one run.

Run: `python -m bench.bench_overhead [--n 4096] [--images 256] [--only ner,detector,brush]`.
Each part measures the model (or the decoder) alone and the same work through create_app's test
client, one after the other in this process, so the ratios hold on any machine:

- ner: the tiny random BERT of bench_ner (a stand-in for a model at GPU speed): the raw tokenizer +
  model batched, NerBackend.forward one text at a time (the per-task loop), /predict of --n texts in
  one request and over --clients concurrent requests, and one-task latency: /predict of one text
  against the backend's batch-1 forward (medians).
- detector: a planted detector (20 boxes an image, its forward costs nothing) on --images 640x480
  JPEG data: URIs: the server's decoder alone over the same images with PREPROCESS_THREADS threads
  (decode-bound throughput), and /predict of the same images.
- brush: a planted instance segmenter (5 masks an image, 640x480): /predict images/s and the cost
  per region over the detector's.

Per-stage breakdown: `py-spy record -r 250 -f raw -o /tmp/ner.txt -- python -m bench.bench_overhead
--only ner --profile-app`, then `python -m bench.bench_overhead --stages /tmp/ner.txt` sums the
samples of every thread by the stage a stack is in (see STAGES).
"""

from __future__ import annotations

import argparse
import base64
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import predict_concurrently, write_report
from serving.contract import Backend, Item, Target
from serving.results import regions
from serving.settings import Settings

log = logging.getLogger("bench_overhead")

# Stage of a sampled stack: the first of these (in this order) that names one of its frames.
STAGES: list[tuple[str, str]] = [
    ("new_id", "region ids"),
    ("_forward_fn.<locals>.run", "model forward"),
    ("_filter_valid", "validation against the config"),
    ("load_image", "fetch + decode"),
    ("prepare", "preparation (task data, preprocess)"),
    ("Runtime._postprocess", "post-processing (regions)"),
    ("TaskRun._post", "post-processing (regions)"),
    ("plan_version", "model_version hashing"),
    ("Planner.plan", "planning"),
    ("from_config", "config schema"),
    ("Runtime._answer", "answer (score, entry)"),
    ("answer", "answer (score, entry)"),
    ("jsonify", "JSON encode (answer)"),
    ("json_body", "JSON decode (request)"),
    ("predict_concurrently", "bench client (request, decode answer)"),
    ("Batcher.", "batcher (gather, hand-off)"),
    ("Runtime.", "runtime (admission, hand-offs, collect)"),
    ("TaskRun.", "runtime (admission, hand-offs, collect)"),
    ("Call.", "runtime (admission, hand-offs, collect)"),
    ("Residency.", "runtime (admission, hand-offs, collect)"),
    ("_worker", "thread pool hand-offs"),
    ("Flask.", "HTTP (Flask, werkzeug)"),
]
IDLE = {"_worker", "wait", "Condition.wait", "_wait_for_tstate_lock", "select", "Event.wait", ""}
APP = ("predict_blueprint", "Runtime.", "TaskRun.", "Call.", "Batcher.", "predict_concurrently", "_worker")


class PlantedDetector(Backend):
    """Returns 20 planted boxes an image; its forward costs nothing (a fast detector on a GPU)."""

    family = "planted_det"
    control_tags = ("RectangleLabels",)
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 32
    default_model = "planted-det"
    boxes = 20

    def load(self, device: str) -> None:
        """Nothing to load."""

    def labels(self) -> list[str]:
        """Return the planted vocabulary."""
        return ["person", "car"]

    def preprocess(self, item: Item) -> tuple[int, int]:
        """Return the image size (the decoded image is what a real detector would tensorise)."""
        return item.size

    def forward(self, batch: list[Any]) -> list[Any]:
        """Plant `boxes` boxes an image, spread over it."""
        out = []
        for w, h in batch:
            dets = []
            for k in range(self.boxes):
                x, y = (k % 5) * w / 5, (k // 5) * h / 4
                dets.append(((x, y, x + w / 6, y + h / 5), "person" if k % 2 else "car", 0.5 + k / 100))
            out.append(dets)
        return out

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the mapped rectangles."""
        out: list[dict[str, Any]] = []
        for box, label, score in output:
            mapped = target.label_map(label)
            if mapped is not None:
                out.extend(regions.rectangle_items(target, box, item.size, score, mapped))
        return out


class PlantedBrush(PlantedDetector):
    """Returns 5 planted instance masks an image (brush RLE at the original size)."""

    family = "planted_brush"
    control_tags = ("BrushLabels",)
    default_model = "planted-brush"
    masks = 5

    def forward(self, batch: list[Any]) -> list[Any]:
        """Return the sizes: masks are built in postprocess, where a real segmenter pastes them."""
        return list(batch)

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit `masks` ellipse masks."""
        w, h = output
        yy, xx = np.ogrid[:h, :w]
        label = target.label_map("person")
        out: list[dict[str, Any]] = []
        for k in range(self.masks):
            cy, cx = h * (k + 1) / (self.masks + 1), w * (k + 1) / (self.masks + 1)
            mask = ((yy - cy) / (h / 8)) ** 2 + ((xx - cx) / (w / 10)) ** 2 <= 1
            out.extend(regions.brush_items(target, mask.astype(np.uint8) * 255, 0.7, label))
        return out


def _best(fn: Callable[[], Any], repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _median_latency(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _client(settings: Settings, families: dict[str, type[Backend]]) -> tuple[Any, Any]:
    from serving.http.app import create_app
    from serving.inference.runtime import Runtime

    runtime = Runtime(settings, families=families)
    return create_app(settings, runtime=runtime).test_client(), runtime


def bench_ner(args: argparse.Namespace, tmp: Path, rows: dict[str, float]) -> None:
    """The NER rows: raw, per-task loop, /predict one and many clients, one-task latency."""
    from backends.ner import NerBackend
    from bench.bench_ner import build_tiny_model, make_texts, run_backend, run_raw_batched
    from serving.contract import ModelSpec

    model = str(build_tiny_model(tmp / "random-bert"))
    settings = Settings(model_dir=str(tmp), device="cpu", max_tasks_per_request=max(5000, args.n))
    texts = make_texts(args.n)
    backend = NerBackend(ModelSpec("ner", model), settings)
    backend.load("cpu")
    run_backend(backend, texts[:64], NerBackend.max_batch_size)
    config = (
        f'<View><Labels name="ner" toName="text" model_name="{model}">'
        '<Label value="PER"/><Label value="ORG"/><Label value="LOC"/><Label value="MISC"/>'
        '</Labels><Text name="text" value="$text"/></View>'
    )
    client, runtime = _client(settings, {"ner": NerBackend})
    datas = [{"text": t} for t in texts]
    predict_concurrently(client, config, datas[:8], 1)  # plans the config, loads the model
    if args.profile_app:  # only the app, for py-spy
        for _ in range(args.profile_rounds):
            predict_concurrently(client, config, datas, 1)
        runtime.close()
        return
    rows["ner raw_batched"] = args.n / _best(
        lambda: run_raw_batched(backend, texts, NerBackend.max_batch_size)
    )
    loop = texts[: args.loop_n]
    rows["ner per_task_loop"] = len(loop) / _best(lambda: run_backend(backend, loop, 1))
    rows["ner predict_app"] = args.n / _best(lambda: predict_concurrently(client, config, datas, 1))
    rows["ner predict_app_concurrent"] = args.n / _best(
        lambda: predict_concurrently(client, config, datas, args.clients)
    )
    one = texts[5]
    rows["ner batch-1 forward ms"] = 1000 * _median_latency(lambda: run_backend(backend, [one], 1), 40)
    rows["ner one-task /predict ms"] = 1000 * _median_latency(
        lambda: predict_concurrently(client, config, [{"text": one}], 1), 40
    )
    runtime.close()


def _jpeg_uris(count: int) -> list[str]:
    from bench.bench_vision import make_jpegs

    return ["data:image/jpeg;base64," + base64.b64encode(b).decode() for b in make_jpegs(count, (640, 480))]


def bench_images(args: argparse.Namespace, tmp: Path, rows: dict[str, float], part: str) -> None:
    """The planted detector (or brush) rows: decode alone vs /predict, same images, same threads."""
    from serving.fetch.local import build_resolver

    settings = Settings(model_dir=str(tmp), device="cpu")
    uris = _jpeg_uris(args.images)
    cls = PlantedDetector if part == "detector" else PlantedBrush
    tag = "RectangleLabels" if part == "detector" else "BrushLabels"
    config = (
        f'<View><Image name="image" value="$image"/><{tag} name="r" toName="image">'
        f'<Label value="person"/><Label value="car"/></{tag}></View>'
    )
    client, runtime = _client(settings, {cls.family: cls})
    datas = [{"image": u} for u in uris]
    predict_concurrently(client, config, datas[:4], 1)
    if args.profile_app:
        for _ in range(args.profile_rounds):
            predict_concurrently(client, config, datas, 1)
        runtime.close()
        return
    resolver = build_resolver(settings)
    if part == "detector":
        with ThreadPoolExecutor(settings.preprocess_threads) as pool:
            rows["detector decode_only"] = args.images / _best(
                lambda: list(pool.map(resolver.load_image, uris)), 2
            )
    results: list[Any] = []
    rows[f"{part} predict_app"] = args.images / _best(
        lambda: results.__setitem__(slice(None), predict_concurrently(client, config, datas, 1)), 2
    )
    rows[f"{part} regions"] = float(sum(len(r["result"]) for r in results))
    runtime.close()


def stages(path: str) -> dict[str, float]:
    """Return the share of py-spy raw samples (every thread, busy ones only) in each stage of STAGES."""
    counts: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f.split(" (")[0].strip() for f in stack.split(";")]
        if frames[-1] in IDLE or not any(key in f for f in frames for key in APP):
            continue  # a thread waiting for work, or the set-up (imports, model building)
        total += int(n)
        stage = next(
            (
                name
                for key, name in STAGES
                if any(
                    key == f
                    or (key.endswith(".") and f.startswith(key))
                    or (key in f and not key.endswith("."))
                    for f in frames
                )
            ),
            "other",
        )
        counts[stage] += int(n)
    return {k: v / max(1, total) for k, v in counts.most_common()}


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for; print rows and ratios."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096, help="texts for the NER rows")
    parser.add_argument("--loop-n", type=int, default=512, help="texts for the per-task loop")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--only", default="ner,detector,brush")
    parser.add_argument("--profile-app", action="store_true", help="run only /predict, for py-spy")
    parser.add_argument("--profile-rounds", type=int, default=2)
    parser.add_argument("--stages", default="", help="print the stage shares of a py-spy raw file")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("werkzeug", "serving", "backends"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.stages:
        for stage, share in stages(args.stages).items():
            log.info("%-40s %5.1f%%", stage, 100 * share)
        return 0
    import torch

    torch.set_num_threads(1)  # like one model thread beside the server's threads on 2 cores
    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    rows: dict[str, float] = {}
    parts = args.only.split(",")
    if "ner" in parts:
        bench_ner(args, tmp, rows)
    for part in ("detector", "brush"):
        if part in parts:
            bench_images(args, tmp, rows, part)
    for name, value in rows.items():
        log.info("%-32s %10.1f", name, value)
    ratios: dict[str, float] = {}
    if "ner raw_batched" in rows:
        ratios["ner predict_app / raw_batched (>= 0.8)"] = rows["ner predict_app"] / rows["ner raw_batched"]
        ratios["ner predict_app / per_task_loop (>= 3)"] = rows["ner predict_app"] / rows["ner per_task_loop"]
        ratios["ner concurrent / one request (>= 1)"] = (
            rows["ner predict_app_concurrent"] / rows["ner predict_app"]
        )
        ratios["ner one-task overhead ms (<= 5)"] = (
            rows["ner one-task /predict ms"] - rows["ner batch-1 forward ms"]
        )
    if "detector decode_only" in rows:
        ratios["detector predict_app / decode_only (>= 0.8)"] = (
            rows["detector predict_app"] / rows["detector decode_only"]
        )
    for name, value in ratios.items():
        log.info("%-46s %7.2f", name, value)
    write_report(args.out, {"rows": rows, "ratios": ratios, "n": args.n, "images": args.images})
    return 0


if __name__ == "__main__":
    sys.exit(main())
