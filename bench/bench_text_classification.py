"""Benchmark zero-shot text classification: the raw NLI model batched vs a per-task loop vs /predict, in one run.

Run on a GPU machine with the real weights:
    python -m bench.bench_text_classification --n 4096 --model nli --out bench/results/text_cls.json
CPU smoke run here (a tiny random BERT NLI cross-encoder built in a temp folder, no hub access):
    python -m bench.bench_text_classification --tiny --n 4096 --loop-n 512

Every text is scored against the 3 choices of Label Studio's Text Classification template (3 pairs
per text). Rows (texts/s, same texts, same device, measured one after another in this process):
- raw_batched: tokenizer + model alone on the (text, hypothesis) pairs, batches of --pairs pairs
  padded to the longest, truncated (no windows), entailment softmax to the CPU: the ceiling.
- backend_batched: TextClassificationBackend preprocess + forward + postprocess over batches of its
  max_batch_size texts (windows, length-sorted sub-batches, decisions), no HTTP.
- per_task_loop: the same, one text at a time, like a server that runs one task at a time.
- predict_app: POST /predict with all --n tasks in one request through create_app's test client
  (planning, batcher, pre/post-processing, validation, JSON), after one warm-up request.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.text_classification import TextClassificationBackend
from bench._common import predict_concurrently, write_report
from serving.contract import Item
from serving.plan.planner import build_plan
from serving.settings import Settings

log = logging.getLogger("bench_text_classification")

CONFIG = """<View><Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single" showInLine="true">
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral"/>
  </Choices></View>"""
OPENINGS = [
    "This is a great movie",
    "The plot was thin",
    "It is a film",
    "I loved the soundtrack",
    "Awful acting",
]
MIDDLES = [
    "and the ending dragged",
    "with a cast that shines",
    "though the pacing is uneven",
    "like any other",
]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Return n review-like texts of mixed lengths (mostly one or two sentences, some long)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        sentences = 1 if r < 0.5 else int(rng.integers(2, 5)) if r < 0.95 else int(rng.integers(20, 40))
        parts = [
            f"{OPENINGS[int(rng.integers(len(OPENINGS)))]} {MIDDLES[int(rng.integers(len(MIDDLES)))]}."
            for _ in range(sentences)
        ]
        out.append(" ".join(parts))
    return out


def build_tiny_nli(folder: Path) -> Path:
    """Save a tiny random BERT NLI cross-encoder (contradiction / neutral / entailment) with its tokenizer."""
    import torch
    import transformers
    from transformers import BertConfig, BertForSequenceClassification

    fast = transformers.BertTokenizerFast  # type: ignore[attr-defined]
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    words = sorted(
        {w.lower().strip(".,") for t in OPENINGS + MIDDLES for w in t.split()} | {"this", "example"}
    )
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = fast(vocab=str(folder / "vocab.txt"), model_max_length=128)
    labels = {0: "contradiction", 1: "neutral", 2: "entailment"}
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def timed(fn: Callable[[], Any], device: str) -> float:
    """Return the wall time of one call run on its own thread (as the runtime's model thread), GPU work included.

    On a loaded CPU the main thread's torch ran the same forwards 2-4x slower than another thread
    did (measured here), so every row runs the way the server runs its model: off the main thread.
    """
    import threading

    import torch

    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def model_context(device: str) -> Any:
    """Return the runtime's context: inference_mode, and fp16 autocast on CUDA."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if device.startswith("cuda"):
        stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
    return stack


def run_raw(backend: TextClassificationBackend, texts: list[str], hypotheses: list[str], pairs: int) -> None:
    """Tokenize and run every (text, hypothesis) pair in batches padded to the longest; entailment to the CPU."""
    firsts = [t for t in texts for _ in hypotheses]
    seconds = hypotheses * len(texts)
    with model_context(backend.device):
        for i in range(0, len(firsts), pairs):
            enc = backend.tokenizer(
                firsts[i : i + pairs],
                seconds[i : i + pairs],
                truncation="only_first",
                max_length=backend.max_length,
                padding=True,
                return_tensors="pt",
            )
            inputs = {k: v.to(backend.device) for k, v in enc.items() if k in backend.input_names}
            backend.model(**inputs).logits.float().softmax(-1)[:, backend.entail].cpu()


def run_backend(backend: TextClassificationBackend, items: list[Item], batch: int) -> int:
    """Run preprocess + forward + postprocess over batches; return the regions made."""
    regions = 0
    with model_context(backend.device):
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            outputs = backend.forward([backend.preprocess(item) for item in chunk])
            for item, output in zip(chunk, outputs, strict=True):
                regions += len(backend.postprocess(output, item.targets[0], item))
    return regions


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print texts/s and ratios, write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096, help="texts (tasks) per measurement")
    parser.add_argument("--model", default="nli", help="model name or folder (default: the NLI default)")
    parser.add_argument("--tiny", action="store_true", help="build and use a tiny random BERT NLI (CPU run)")
    parser.add_argument("--device", default="", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--pairs", type=int, default=TextClassificationBackend.pairs_per_forward)
    parser.add_argument("--loop-n", type=int, default=0, help="texts for the per-task loop (default: --n)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_text_cls_"))
    model = str(build_tiny_nli(tmp / "tiny-nli")) if args.tiny else args.model
    settings = Settings(
        model_dir=str(tmp),
        device=device,
        max_wait_ms=5.0,
        max_tasks_per_request=max(5000, args.n),
        text_classification_model=model,
    )
    families = {"text_classification": TextClassificationBackend}
    plan = build_plan(CONFIG, settings, families)
    (target,) = plan.targets
    backend = TextClassificationBackend(target.model, settings)
    started = time.perf_counter()
    backend.load(device)
    load_s = time.perf_counter() - started
    texts = make_texts(args.n)
    loop_texts = texts[: args.loop_n or args.n]
    items = [Item(task={"id": i}, obj=target.obj, text=t, targets=(target,)) for i, t in enumerate(texts)]
    hypotheses = ["This example is Positive.", "This example is Negative.", "This example is Neutral."]
    log.info("loaded %s on %s in %.1f s; %d texts", backend.version(), device, load_s, len(texts))
    run_backend(backend, items[:64], backend.max_batch_size)  # warm-up

    rows: dict[str, float] = {}
    rows["raw_batched"] = len(texts) / timed(lambda: run_raw(backend, texts, hypotheses, args.pairs), device)
    batch = backend.max_batch_size
    rows["backend_batched"] = len(texts) / timed(lambda: run_backend(backend, items, batch), device)
    loop_items = items[: len(loop_texts)]
    rows["per_task_loop"] = len(loop_texts) / timed(lambda: run_backend(backend, loop_items, 1), device)

    from serving.http.app import create_app
    from serving.inference.runtime import Runtime

    runtime = Runtime(settings, families=families)
    client = create_app(settings, runtime=runtime).test_client()
    predict_concurrently(client, CONFIG, [{"text": t} for t in texts[:8]], 1)  # plans and loads once
    results: list[Any] = []

    def one_request() -> None:
        results[:] = predict_concurrently(client, CONFIG, [{"text": t} for t in texts], 1)

    rows["predict_app"] = len(texts) / timed(one_request, device)
    regions = sum(len(r["result"]) for r in results)
    runtime.close()

    ratios = {
        "predict_app / raw_batched": rows["predict_app"] / rows["raw_batched"],
        "backend_batched / raw_batched": rows["backend_batched"] / rows["raw_batched"],
        "predict_app / per_task_loop": rows["predict_app"] / rows["per_task_loop"],
        "backend_batched / per_task_loop": rows["backend_batched"] / rows["per_task_loop"],
    }
    for name, rate in rows.items():
        log.info("%-24s %10.1f texts/s", name, rate)
    for name, ratio in ratios.items():
        log.info("%-34s %6.2fx", name, ratio)
    log.info("regions from /predict: %d over %d tasks", regions, len(texts))
    report = {
        "model": model,
        "version": backend.version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "n_texts": len(texts),
        "n_loop_texts": len(loop_texts),
        "pairs_per_forward": args.pairs,
        "load_s": load_s,
        "texts_per_s": rows,
        "ratios": ratios,
        "regions": regions,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
