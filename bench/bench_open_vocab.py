"""Open-vocabulary detection: images/s at batch 1 vs batched, and prompt encoding once per plan vs per image.

Run (GPU box): `python -m bench.bench_open_vocab --arch dino --images 64 --batch-sizes 1,8 --labels 80`.
All rows come from one process on one machine, measured one after another on the same preprocessed
images: the backend's forward() (the runtime's only GPU step, fp16 autocast on CUDA like the runtime)
at each batch size, first with the prompts' text encoded once per prompt set (the server's way), then
encoded with every image (`cache_text = False`: what the models do by themselves, Grounding DINO's text
encoder running on every image x prompt row, OWLv2's on every image's queries). The cost of encoding
the prompt set alone is timed too.

No weights exist offline, so the model is random-initialised at the real architecture's size
(`--size real`: Grounding DINO Swin-T + BERT-base, 900 queries, 256-token prompts; OWLv2 ViT-B/16) or
at the tests' tiny size, saved with save_pretrained and loaded through the backend's own loading code.
The vocabulary is the tests' synthetic one, holding the benchmark's label words whole as the real
WordPiece vocabulary does (OWLv2 pads every query to 16 tokens anyway). `--work-size` shrinks the working resolution for CPU runs (Grounding DINO's
shorter side, OWLv2's square side; real: 800 and 960).
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import write_report

log = logging.getLogger("bench_open_vocab")

# Label names of a warehouse/street project, cycled (with a number) when --labels asks for more.
LABELS = (
    "person",
    "forklift",
    "pallet",
    "safety vest",
    "hard hat",
    "car",
    "truck",
    "bicycle",
    "traffic cone",
    "ladder",
    "box",
    "shelf",
    "door",
    "fire extinguisher",
    "dog",
    "backpack",
    "helmet",
    "glove",
    "bus",
    "trolley",
)


def build(arch: str, size: str, work: int, folder: Path) -> Path:
    """Save a random checkpoint of the chosen architecture and size, with its processor; return the folder."""
    import torch

    from tests.backends import _open_vocab_support as support

    if size == "tiny":
        if arch == "owl":
            return support.save_owl(folder, side=work)
        return support.save_dino(folder, max_text_len=256, shortest=work, longest=work * 1333 // 800)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "owl":
        from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

        tokenizer = support.clip_tokenizer()
        vocab = tokenizer.get_vocab()
        ids = {k: vocab[v] for k, v in (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"))}
        config = Owlv2Config(
            text_config={"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["eos"]},
            vision_config={"image_size": work},
        )
        Owlv2ForObjectDetection(config).eval().save_pretrained(folder)
        image_processor = Owlv2ImageProcessor(size={"height": work, "width": work})
        Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
        return folder
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    words = tuple(dict.fromkeys(w for label in LABELS for w in label.split()))
    config = GroundingDinoConfig(text_config=BertConfig(vocab_size=30522))
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    dino_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": work, "longest_edge": work * 1333 // 800}
    )
    tokenizer = support.bert_tokenizer(words)
    GroundingDinoProcessor(image_processor=dino_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def label_config(n: int) -> str:
    """Return a RectangleLabels config with n labels (one with synonyms)."""
    labels = []
    for i in range(n):
        name = LABELS[i % len(LABELS)] + ("" if i < len(LABELS) else f" {i // len(LABELS)}")
        extra = ' predicted_values="safety vest,hi-vis jacket"' if name == "safety vest" else ""
        labels.append(f'<Label value="{name}"{extra}/>')
    return (
        '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image" model_name="x">'
        + "".join(labels)
        + "</RectangleLabels></View>"
    )


def timed(fn: Any, device: str) -> tuple[float, float]:
    """Return (wall seconds, process CPU seconds) of one call of fn (synchronising CUDA).

    CPU seconds (all threads) measure the work itself: on a shared CPU machine the wall clock also
    counts the time other processes held the cores.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    """Measure the rows and print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", choices=("dino", "owl"), default="dino")
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--work-size", type=int, default=0, help="working resolution (default: the model's)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--image-size", default="640x480")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (median kept)")
    parser.add_argument("--device", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from PIL import Image

    from backends.open_vocab import OpenVocabBackend, encode_dino_text
    from bench.bench_vision import make_jpegs
    from serving.contract import Item, LabelMap, ModelSpec, ObjectTag, Target
    from serving.plan.planner import parse_config
    from serving.settings import Settings

    torch.set_flush_denormal(True)  # random weights make denormal floats, which crawl on CPU
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work_size or (960 if args.arch == "owl" else 800)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    width, height = (int(v) for v in args.image_size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = build(args.arch, args.size, work, Path(tmp) / "model")
        backend = OpenVocabBackend(
            ModelSpec("open_vocab", args.arch, str(folder)), Settings(model_dir=tmp, text_threshold=0.0)
        )
        backend.load(device)
        log.info("built and loaded %s/%s in %.1f s", args.arch, args.size, time.perf_counter() - started)

    xml = label_config(args.labels)
    _, controls = parse_config(xml)
    obj = ObjectTag("image", "Image", "image")
    control = controls[0]
    target = Target(control, obj, ModelSpec("open_vocab", args.arch), LabelMap(control.labels), 0.0)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in make_jpegs(args.images, (width, height))]
    items = [Item(task={"id": i}, obj=obj, image=im, targets=(target,)) for i, im in enumerate(images)]
    inputs = [backend.preprocess(it) for it in items]
    prompts = inputs[0].prompts
    chunks = len(prompts.chunks) if args.arch == "dino" else 0
    queries = len(prompts.query_entry)
    fp16 = device.startswith("cuda")

    def encode() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            if args.arch == "dino":
                for chunk in prompts.chunks:
                    ids = torch.tensor([chunk.input_ids], device=device)
                    encode_dino_text(backend._text.inner, backend._masks_fn, backend._special, ids)
            else:
                backend.encode_queries(prompts)

    encode()
    encode_times = [timed(encode, device) for _ in range(5)]
    encode_ms = statistics.median(t[0] for t in encode_times) * 1000
    encode_cpu_ms = statistics.median(t[1] for t in encode_times) * 1000
    log.info(
        "prompt set: %d labels, %s; encoding it once: %.1f ms (%.1f CPU ms)",
        args.labels,
        f"{chunks} chunks" if chunks else f"{queries} queries",
        encode_ms,
        encode_cpu_ms,
    )

    # Rows interleaved over --rounds rounds, median kept: the machine's other load hits every row alike.
    configs = [(cache, bs) for cache in (True, False) for bs in batch_sizes]
    samples: dict[tuple[bool, int], list[tuple[float, float]]] = {c: [] for c in configs}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        for bs in batch_sizes:
            backend.forward(inputs[:bs])  # warm-up (and the one encoding of the prompt set)
        for _ in range(args.rounds):
            for cache, bs in configs:
                backend.cache_text = cache

                def run(bs: int = bs) -> None:
                    for i in range(0, len(inputs), bs):
                        backend.forward(inputs[i : i + bs])

                samples[(cache, bs)].append(timed(run, device))
    backend.cache_text = True
    rows: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}
    for cache, bs in configs:
        key = f"batch {bs}, text {'once per plan' if cache else 'per image'}"
        walls = [len(inputs) / wall for wall, _ in samples[(cache, bs)]]
        rows[key] = statistics.median(walls)
        cpu_ms[key] = statistics.median(cpu for _, cpu in samples[(cache, bs)]) * 1000 / len(inputs)
        log.info(
            "%-36s %8.2f images/s (rounds %s), %8.1f CPU ms an image",
            key,
            rows[key],
            ", ".join(f"{v:.2f}" for v in walls),
            cpu_ms[key],
        )

    b1, bn = batch_sizes[0], batch_sizes[-1]
    once, each = "text once per plan", "text per image"
    ratios = {
        f"images/s batch {bn} / batch {b1} ({once})": rows[f"batch {bn}, {once}"]
        / rows[f"batch {b1}, {once}"],
        f"images/s {once} / {each}, batch {b1}": rows[f"batch {b1}, {once}"] / rows[f"batch {b1}, {each}"],
        f"images/s {once} / {each}, batch {bn}": rows[f"batch {bn}, {once}"] / rows[f"batch {bn}, {each}"],
        f"CPU time {each} / {once}, batch {b1}": cpu_ms[f"batch {b1}, {each}"]
        / cpu_ms[f"batch {b1}, {once}"],
        f"CPU time {each} / {once}, batch {bn}": cpu_ms[f"batch {bn}, {each}"]
        / cpu_ms[f"batch {bn}, {once}"],
    }
    for key, value in ratios.items():
        log.info("%-44s %.2fx", key, value)
    write_report(
        args.out,
        {
            "arch": args.arch,
            "size": args.size,
            "device": device,
            "work_size": work,
            "image_size": [width, height],
            "images": args.images,
            "labels": args.labels,
            "chunks": chunks,
            "queries": queries,
            "encode_prompt_set_ms": encode_ms,
            "encode_prompt_set_cpu_ms": encode_cpu_ms,
            "images_per_s": rows,
            "cpu_ms_per_image": cpu_ms,
            "ratios": ratios,
            "threads": torch.get_num_threads(),
            "detections_per_image": float(np.mean([len(d.scores) for d in backend.forward(inputs[:bn])])),
        },
    )


if __name__ == "__main__":
    main()
