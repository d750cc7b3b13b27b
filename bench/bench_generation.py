"""Generation throughput (issue #26): /predict against the raw batched generate and a per-task loop, in one run.

Run: `python -m bench.bench_generation [--texts 64] [--images 32] [--tokens 16] [--out bench/results/generation.json]`.
Tiny random Qwen2 (text) and Qwen3-VL (vision) models built here, every answer planted at --tokens
tokens so each way does the same decoding work. For each kind: the engine's batched generate over
batches of the family's max_batch_size (the model alone), the same engine one prompt at a time (a
per-task loop), and POST /predict of every task in one request through create_app's test client.
On random tiny models the model is cheap, so the ratios show the serving path's overhead and what
batching buys; on a GPU with a real model the batched generate dominates.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import write_report
from serving.contract import ModelSpec
from serving.settings import Settings

log = logging.getLogger("bench_generation")

TEXT_CONFIG = '<View><Text name="text" value="$text"/><TextArea name="summary" toName="text"/></View>'
IMAGE_CONFIG = '<View><Image name="image" value="$image"/><TextArea name="caption" toName="image"/></View>'


def _png(seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(texts: int, images: int, tokens: int, repeats: int = 2) -> dict[str, Any]:
    """Measure both kinds; return {kind: {way: items/s}, ratios}."""
    import torch

    from backends.generation import TextGenerationBackend, VisionGenerationBackend
    from serving.http.app import create_app
    from serving.inference.runtime import Runtime
    from tests.backends._llm_support import PlantedAnswers, build_text_model, build_vision_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    settings = Settings(
        model_dir=str(root / "model_dir"),
        llm_text_model=str(build_text_model(root / "lm")),
        llm_vision_model=str(build_vision_model(root / "vlm")),
        llm_max_new_tokens=tokens,
        max_wait_ms=20.0,
    )
    families = {"vision_generation": VisionGenerationBackend, "text_generation": TextGenerationBackend}
    runtime = Runtime(settings, families=families)
    client = create_app(settings, runtime=runtime).test_client()
    answer = "x" * tokens  # one byte = one token with the byte-level tokenizer
    report: dict[str, Any] = {"machine": "CPU", "tokens_per_answer": tokens, "repeats": repeats}
    kinds = (
        (
            "text_generation",
            "llm",
            TEXT_CONFIG,
            [{"text": f"Document {i}: the cat sat on the mat."} for i in range(texts)],
        ),
        ("vision_generation", "vlm", IMAGE_CONFIG, [{"image": _png(i)} for i in range(images)]),
    )
    for family, name, config, datas in kinds:
        if not datas:
            continue
        slot = runtime.slot(ModelSpec(family, name))
        assert slot.ready.wait(300) and not slot.failed, slot.state
        backend = slot.backend
        engine = backend.engine
        engine.logits_processors[:] = [PlantedAnswers(engine.tokenizer, {}, fallback=answer)]
        tasks = [{"id": i + 1, "data": d} for i, d in enumerate(datas)]
        # the requests /predict builds, made by the backend itself from decoded items
        plan = runtime.plan(config)
        (target,) = plan.targets
        from serving.inference.prepare import prepare

        items = [prepare(t, target.obj, backend, None, [target], runtime.resolver)[1] for t in tasks]
        requests = [r for prepared in items for _, r in prepared]
        size = type(backend).max_batch_size
        client.post("/predict", json={"tasks": tasks[:2], "label_config": config})  # warm
        raw = loop = served = float("inf")
        for _ in range(repeats):  # best of each, interleaved: the machine is shared
            start = time.perf_counter()
            for i in range(0, len(requests), size):
                engine.generate(requests[i : i + size])
            raw = min(raw, time.perf_counter() - start)
            start = time.perf_counter()
            for request in requests:
                engine.generate([request])
            loop = min(loop, time.perf_counter() - start)
            start = time.perf_counter()
            response = client.post("/predict", json={"tasks": tasks, "label_config": config})
            served = min(served, time.perf_counter() - start)
            assert response.status_code == 200 and all(r.get("result") for r in response.json["results"])
        n = len(tasks)
        rates = {"raw_batched": n / raw, "per_task_loop": n / loop, "predict": n / served}
        report[family] = {
            "items": n,
            "batch": size,
            **{k: round(v, 2) for k, v in rates.items()},
            "predict_vs_raw": round(rates["predict"] / rates["raw_batched"], 3),
            "predict_vs_loop": round(rates["predict"] / rates["per_task_loop"], 3),
        }
        log.info("%s: %s", family, report[family])
    return report


def main() -> None:
    """Parse arguments, run, print and optionally write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.texts, args.images, args.tokens, args.repeats)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
