"""Benchmark training: webhook latency while requests coalesce, and spaCy NER training time, in one run.

CPU run here:
    python -m bench.bench_training --webhooks 500 --ner-texts 100,400
GPU rows (a transformers checkpoint in the HF cache, a detector's weights in TORCH_HOME):
    python -m bench.bench_training --ner-texts 400 --hf-model dslim/bert-base-NER \
        --detector fasterrcnn_resnet50_fpn_v2 --images 300 --device cuda

Rows:
- webhook: --webhooks START_TRAINING calls through the app's test client (after /setup), every one
  joining the same queued job (no trainer is started): p50 / p99 / max milliseconds.
- spacy_ner_<n>: one training job over n templated texts (run_job in this process, as the trainer
  runs it): seconds, texts x epochs per second, and the Drug F1 on 40 held-out texts with drug names
  it never saw (the pretrained model's is 0).
- hf_ner_<n> (optional): the same for a transformers checkpoint.
- detection (optional): a detector fine-tuned on --images generated 640x480 images with two boxes
  each (Car, Tree), 2 epochs: seconds, images x epochs per second, F1 at IoU 0.5 on the training set.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import log, write_report


def webhook_latency(n: int, root: Path) -> dict[str, Any]:
    """Return latency statistics of n START_TRAINING webhooks that all coalesce into one job."""
    from model import families
    from serving.http.app import create_app
    from serving.inference.runtime import Runtime
    from serving.service.model import ModelService
    from serving.settings import Settings
    from tests.support import ner_corpus as nc

    cfg = Settings(
        model_dir=str(root / "webhook"),
        ner_engine="spacy",
        label_studio_url="http://ls",
        label_studio_api_key="k",
    )
    model = ModelService(cfg, Runtime(cfg, families()), families_ref="model:families")
    model.supervisor._spawn = lambda *a: _Alive()  # measure the request path only
    client = create_app(cfg, model=model).test_client()
    client.post("/setup", json={"project": "1.1", "schema": nc.CONFIG})
    model.training_device()  # decided in the background at start (imports torch): a server up for seconds
    body = {"action": "START_TRAINING", "project": {"id": 1, "label_config": nc.CONFIG}}
    times, jobs = [], set()
    for _ in range(n):
        started = time.perf_counter()
        response = client.post("/webhook", json=body)
        times.append((time.perf_counter() - started) * 1000)
        jobs.add(response.json["job"])
    times.sort()
    model.close()
    return {
        "requests": n,
        "jobs": len(jobs),
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[int(0.99 * (n - 1))], 2),
        "max_ms": round(times[-1], 2),
    }


class _Alive:
    pid = 0

    def poll(self) -> None:
        return None

    def send_signal(self, sig: int) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def ner_training(n: int, root: Path, device: str, model_name: str = "", epochs: int = 0) -> dict[str, Any]:
    """Train NER on n templated texts through run_job; return time, rate and held-out Drug F1."""
    from backends.ner import SPACY_DEFAULT, NerBackend
    from serving.contract import ModelSpec
    from serving.inference.runtime import Runtime
    from serving.service.model import ModelService
    from serving.settings import Settings
    from serving.training.job import run_job
    from serving.training.store import TrainingStore
    from serving.training.versions import VersionStore
    from serving.util.files import write_json_atomic
    from tests.support import ner_corpus as nc

    config = nc.CONFIG
    if model_name:
        config = config.replace('<Labels name="label"', f'<Labels name="label" model_name="{model_name}"')
    cfg = Settings(
        model_dir=str(root / f"ner-{n}-{int(time.time())}"),
        ner_engine="spacy",
        train_epochs=epochs,
        train_device=device,
    )
    spec = ModelSpec("ner", model_name or SPACY_DEFAULT)
    store = TrainingStore.for_settings(cfg)
    job_id, _ = store.request("1", spec, device, config, {"kind": "inline"}, "BENCH")
    write_json_atomic(store.job_dir(job_id) / "data.json", nc.export(nc.corpus(n, seed=1)))
    job = store.claim(device)
    assert job is not None
    started = time.perf_counter()
    done = run_job(
        job, store=store, versions=VersionStore.for_settings(cfg), families={"ner": NerBackend}, settings=cfg
    )
    seconds = time.perf_counter() - started
    if done.state != "done":
        raise RuntimeError(f"training failed: {done.error}")
    ran = len(done.progress.get("history", []))
    test = nc.corpus(
        40, seed=2, drugs=("Nexoprin", "Palvitrol", "Gravelox", "Tenuvant", "Orbicel", "Wexamine")
    )
    service = ModelService(cfg, Runtime(cfg, {"ner": NerBackend}))
    answers = service.predict([{"data": {"text": t}} for t, _ in test], label_config=config, project="1.1")
    found = [
        {(r["value"]["start"], r["value"]["end"], r["value"]["labels"][0]) for r in a["result"]}
        for a in answers
    ]
    gold = [set(s) for _, s in test]
    return {
        "texts": n,
        "epochs": ran,
        "seconds": round(seconds, 1),
        "texts_epochs_per_s": round(n * ran / seconds, 1),
        "held_out_f1": {label: round(nc.f1(gold, found, label), 3) for label in nc.LABELS},
    }


def detection_training(name: str, images: int, root: Path, device: str) -> dict[str, Any]:
    """Fine-tune a detector on generated images through run_job; return time and rate."""
    from backends.detection import DetectionBackend
    from serving.contract import ModelSpec
    from serving.settings import Settings
    from serving.training.job import run_job
    from serving.training.store import TrainingStore
    from serving.training.versions import VersionStore
    from serving.util.files import write_json_atomic
    from tests.backends.test_training_vision import box_tasks, detection_config

    cfg = Settings(model_dir=str(root / "det"), train_epochs=2, train_device=device, train_allow_cpu=True)
    store = TrainingStore.for_settings(cfg)
    job_id, _ = store.request("1", ModelSpec("detection", name), device, detection_config(name), {}, "BENCH")
    write_json_atomic(store.job_dir(job_id) / "data.json", box_tasks(images, size=(640, 480)))
    job = store.claim(device)
    assert job is not None
    started = time.perf_counter()
    done = run_job(
        job,
        store=store,
        versions=VersionStore.for_settings(cfg),
        families={"detection": DetectionBackend},
        settings=cfg,
    )
    seconds = time.perf_counter() - started
    if done.state != "done":
        raise RuntimeError(f"training failed: {done.error}")
    return {
        "model": name,
        "images": images,
        "epochs": 2,
        "seconds": round(seconds, 1),
        "images_epochs_per_s": round(2 * images / seconds, 2),
        "train_f1_iou50": done.metrics.get("f1"),
    }


def main() -> None:
    """Run the rows and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--webhooks", type=int, default=500)
    parser.add_argument("--ner-texts", default="100,400")
    parser.add_argument("--hf-model", default="", help="a transformers token-classification id or folder")
    parser.add_argument(
        "--detector", default="", help="e.g. fasterrcnn_resnet50_fpn_v2 (weights in TORCH_HOME)"
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/training.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows["webhook"] = webhook_latency(args.webhooks, root)
        log.warning("webhook %s", rows["webhook"])
        for n in [int(x) for x in args.ner_texts.split(",") if x]:
            rows[f"spacy_ner_{n}"] = ner_training(n, root, "cpu")
            log.warning("spacy %d %s", n, rows[f"spacy_ner_{n}"])
            if args.hf_model:
                rows[f"hf_ner_{n}"] = ner_training(n, root, args.device, model_name=args.hf_model)
                log.warning("hf %d %s", n, rows[f"hf_ner_{n}"])
        if args.detector:
            rows["detection"] = detection_training(args.detector, args.images, root, args.device)
            log.warning("detection %s", rows["detection"])
    report = {"machine": platform.platform(), "python": platform.python_version(), "rows": rows}
    write_report(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
