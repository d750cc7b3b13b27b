"""Benchmark interactive SAM: per-click latency with a warm embedding vs a cold encode, side by side in one run.

CPU run here (SAM 2.1 Hiera-T architecture at 1024 px, random weights: no SAM weights offline):
    python -m bench.bench_sam --arch tiny --out bench/results/sam_cpu.json
GPU target run (SAM 2.1 Hiera-L at 1024 px; the target is a warm click p50 <= 25 ms over HTTP):
    python -m bench.bench_sam --arch large --device cuda --n 200 --cold-n 20 --clients 8

Rows (milliseconds per click, p50 / p95, same model, same process run, one after another):
- raw_encode: SamModel.encode of one image alone (the image encoder: what a cold click pays once);
- raw_decode: SamModel.decode of one click on a cached embedding (prompt encoder + mask decoder +
  upsampling to the original size): the floor of a warm click;
- http_cold_click: POST /predict with params.context (one click) through gunicorn, each on an image
  the server has not seen (fetch from a local file server, decode, encode, decode, RLE, JSON);
- http_warm_click: the same request on an image already encoded (alternating click positions and
  a negative click): no fetch, no encode;
- http_warm_concurrent: --clients annotators clicking their own warm images at once; their clicks
  share decoder batches (mean batch size from /metrics).
Random weights give random masks; the mask of each answer is a brush RLE of the whole 1024 x 768 image,
so encoding it is part of the cost (as with real masks of similar extent).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import write_report  # noqa: E402
from bench.bench_e2e import free_port, gunicorn, serve_files  # noqa: E402

log = logging.getLogger("bench_sam")

MODEL_NAME = "facebook/sam2.1-hiera-tiny"
# The Hiera image encoders of the released SAM 2.1 checkpoints (the sam2 repository's configs).
ARCHS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 96,
        "blocks_per_stage": [1, 2, 7, 2],
        "embed_dim_per_stage": [96, 192, 384, 768],
        "num_attention_heads_per_stage": [1, 2, 4, 8],
        "window_size_per_stage": [8, 4, 14, 7],
        "global_attention_blocks": [5, 7, 9],
        "window_positional_embedding_background_size": [7, 7],
    },
    "large": {
        "hidden_size": 144,
        "num_attention_heads": 2,
        "blocks_per_stage": [2, 6, 36, 4],
        "embed_dim_per_stage": [144, 288, 576, 1152],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "window_size_per_stage": [8, 4, 16, 8],
        "global_attention_blocks": [23, 33, 43],
        "window_positional_embedding_background_size": [7, 7],
    },
}
CONFIG_TEMPLATE = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image" model_path="{model_path}"><Label value="Object"/></BrushLabels>
</View>"""


def build_model(folder: Path, arch: str, seed: int = 0) -> Path:
    """Save a random SAM 2 of a released architecture (1024 px input) with its processor into folder."""
    import torch
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
        Sam2VisionConfig,
    )

    torch.manual_seed(seed)
    backbone = Sam2HieraDetConfig(**ARCHS[arch])
    channels = list(reversed(ARCHS[arch]["embed_dim_per_stage"]))
    model = Sam2Model(
        Sam2Config(vision_config=Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=channels))
    )
    processor = Sam2Processor(image_processor=Sam2ImageProcessor(), target_size=1024)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_jpeg(i: int, size: tuple[int, int]) -> bytes:
    """Return a JPEG with a few shapes (distinct per i)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (40 + 7 * i % 200, 90, 120))
    draw = ImageDraw.Draw(image)
    w, h = size
    for k in range(6):
        x, y = (37 * (i + k) * 13) % w, (53 * (i + 2 * k) * 7) % h
        draw.ellipse((x, y, x + w // 5, y + h // 4), fill=((60 * k) % 255, 140, (90 * i) % 255))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pct(times: list[float], q: float) -> float:
    """Return the q-quantile of seconds, in ms."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000


def stats(times: list[float]) -> dict[str, float]:
    """Return p50/p95/mean in ms and the count."""
    return {
        "p50_ms": pct(times, 0.5),
        "p95_ms": pct(times, 0.95),
        "mean_ms": statistics.fmean(times) * 1000,
        "n": len(times),
    }


def raw_rows(folder: Path, device: str, image: bytes, n: int, encode_n: int) -> dict[str, Any]:
    """Time the encoder on one image and the decoder on one click, in-process (fp16 autocast on CUDA)."""
    import torch
    from PIL import Image

    from backends import _sam

    sam = _sam.SamModel.load(folder, device)
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    pixel_values, hw = sam.pixels(pil)
    fp16 = device.startswith("cuda")

    def sync() -> None:
        if fp16:
            torch.cuda.synchronize()

    encodes, decodes = [], []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        (emb,) = sam.encode([pixel_values], [pil.size], [hw])  # warm-up
        for _ in range(encode_n):
            sync()
            t0 = time.perf_counter()
            (emb,) = sam.encode([pixel_values], [pil.size], [hw])
            sync()
            encodes.append(time.perf_counter() - t0)
        width, height = pil.size
        prompt = _sam.Prompt(points_px=[(0.4 * width, 0.5 * height)], labels=[1])
        sam.decode([(emb, [prompt])])
        for k in range(n):
            p = _sam.Prompt(points_px=[((0.2 + 0.6 * k / n) * width, 0.5 * height)], labels=[1])
            sync()
            t0 = time.perf_counter()
            sam.decode([(emb, [p])])
            sync()
            decodes.append(time.perf_counter() - t0)
    return {"raw_encode": stats(encodes), "raw_decode": stats(decodes), "embedding_bytes": emb.nbytes}


def click(x: float, y: float, rid: str, positive: bool = True) -> dict[str, Any]:
    """Return a smart keypoint region (percent coordinates)."""
    return {
        "id": rid,
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"]},
    }


def interactive(
    session: requests.Session, url: str, config: str, task: dict[str, Any], regions: list[Any]
) -> float:
    """POST one interactive click; return its wall time (raise unless a mask came back)."""
    body = {"tasks": [task], "label_config": config, "params": {"context": {"result": regions}}}
    t0 = time.perf_counter()
    resp = session.post(url, json=body, timeout=600)
    elapsed = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"/predict {resp.status_code}: {resp.text[:300]}")
    (prediction,) = resp.json()["results"]
    if "error" in prediction:
        raise RuntimeError(f"click failed: {prediction['error']}")
    return elapsed


def metric(url: str, name: str) -> float:
    """Return a /metrics sample summed over labels."""
    total = 0.0
    for line in requests.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: list[str] | None = None) -> int:  # noqa: C901 (a benchmark's main: one measurement sequence read top to bottom)
    """Run the rows and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=20, help="warm clicks (and raw decodes)")
    parser.add_argument("--cold-n", type=int, default=3, help="cold clicks (each on a new image)")
    parser.add_argument("--encode-n", type=int, default=3, help="raw encodes")
    parser.add_argument("--clients", type=int, default=2, help="concurrent annotators for the last row")
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    # Before any torch op: worker threads copy the flag from this thread when they are created, and
    # random weights leave denormal floats that make CPU kernels ~10x slower in threads without it
    # (the server sets it in forward(), on its model thread).
    torch.set_flush_denormal(True)
    width, height = (int(v) for v in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-sam-"))
    started = time.perf_counter()
    folder = build_model(tmp / f"sam2.1-{args.arch}-random", args.arch)
    log.info("random SAM 2.1 %s saved in %.0f s", args.arch, time.perf_counter() - started)
    n_images = args.cold_n + args.clients + 2
    images = {f"img{i}.jpg": make_jpeg(i, (width, height)) for i in range(n_images)}
    raw: dict[str, Any] = {}

    def measure_raw() -> None:
        raw.update(raw_rows(folder, args.device, images["img0.jpg"], args.n, args.encode_n))

    # In a thread of its own, as the server's model thread: torch ops from the main thread ran 5-10x
    # slower on this 2-core VM shared with other jobs (the main thread's OpenMP team under contention).
    worker = threading.Thread(target=measure_raw)
    worker.start()
    worker.join()
    report: dict[str, Any] = {
        "arch": args.arch,
        "device": args.device,
        "size": args.size,
        "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
        **raw,
    }
    server, file_port, _ = serve_files(images)
    port = free_port()
    config = CONFIG_TEMPLATE.format(model_path=folder)
    env = {
        "MODEL_DIR": str(tmp / "model_dir"),
        "DEVICE": args.device,
        "WARMUP": f"sam:{MODEL_NAME}@{folder}",
        "HF_HOME": str(tmp / "hf"),
    }
    base = f"http://127.0.0.1:{port}"
    try:
        with gunicorn(env, port, tmp / "gunicorn.log"):
            deadline = time.monotonic() + 300
            while requests.get(f"{base}/health", timeout=5).json().get("backends", {}) != {
                f"sam:{MODEL_NAME}@{folder}": "ready"
            }:
                if time.monotonic() > deadline:
                    raise RuntimeError("the SAM model did not load")
                time.sleep(0.5)
            session = requests.Session()
            url = f"{base}/predict"

            def task(i: int) -> dict[str, Any]:
                return {"id": 1000 + i, "data": {"image": f"http://127.0.0.1:{file_port}/img{i}.jpg"}}

            interactive(session, url, config, task(n_images - 1), [click(50, 50, "w")])  # warm the path
            cold = [
                interactive(session, url, config, task(i), [click(50, 50, f"c{i}")])
                for i in range(args.cold_n)
            ]
            warm = []
            for k in range(args.n):
                regions = [click(20 + 60 * k / args.n, 50, "p")]
                if k % 2:
                    regions.append(click(80, 20, "n", positive=False))
                warm.append(interactive(session, url, config, task(0), regions))
            report["http_cold_click"] = stats(cold)
            report["http_warm_click"] = stats(warm)
            # concurrent annotators, each on their own (warmed) image
            owners = [args.cold_n + c for c in range(args.clients)]
            for i in owners:
                interactive(session, url, config, task(i), [click(50, 50, "w")])
            batches0 = metric(f"{base}/metrics", "lsml_batch_size_count")
            items0 = metric(f"{base}/metrics", "lsml_batch_size_sum")
            times: list[float] = []
            lock = threading.Lock()

            def annotator(i: int) -> None:
                s = requests.Session()
                for k in range(args.n):
                    t = interactive(s, url, config, task(i), [click(10 + 80 * k / args.n, 40, "p")])
                    with lock:
                        times.append(t)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=annotator, args=(i,)) for i in owners]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            batches = metric(f"{base}/metrics", "lsml_batch_size_count") - batches0
            items = metric(f"{base}/metrics", "lsml_batch_size_sum") - items0
            report["http_warm_concurrent"] = {
                **stats(times),
                "clients": args.clients,
                "clicks_per_s": len(times) / wall,
                "mean_decoder_batch": items / batches if batches else 0.0,
            }
            report["misses"] = metric(f"{base}/metrics", "lsml_embedding_cache_misses_total")
            report["hits"] = metric(f"{base}/metrics", "lsml_embedding_cache_hits_total")
    finally:
        server.shutdown()
    cold_p50 = report["http_cold_click"]["p50_ms"]
    warm_p50 = report["http_warm_click"]["p50_ms"]
    report["cold_over_warm_p50"] = cold_p50 / warm_p50
    log.info("SAM 2.1 %s (random weights), %s, %s image", args.arch, args.device, args.size)
    log.info("%-22s %10s %10s", "row", "p50 ms", "p95 ms")
    for row in ("raw_encode", "raw_decode", "http_cold_click", "http_warm_click", "http_warm_concurrent"):
        log.info("%-22s %10.1f %10.1f", row, report[row]["p50_ms"], report[row]["p95_ms"])
    log.info(
        "cold / warm click p50: %.1fx; %d annotators: %.1f clicks/s, mean decoder batch %.2f; cache %d misses, %d hits",
        report["cold_over_warm_p50"],
        args.clients,
        report["http_warm_concurrent"]["clicks_per_s"],
        report["http_warm_concurrent"]["mean_decoder_batch"],
        report["misses"],
        report["hits"],
    )
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
