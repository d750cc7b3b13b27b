"""Detectors side by side: Faster R-CNN v2 vs the real-time DETRs vs a YOLO checkpoint, raw vs /predict vs per task.

Run (CPU, small): `python -m bench.bench_detectors --images 8 --batch 4`; on a GPU box raise --images.
Every row comes from one process on one machine, one model after another on the same JPEGs:
- raw: the family's forward() on preprocessed inputs (the runtime's only model step, fp16 autocast on
  CUDA like the runtime), `--batch` images per call: the model's own speed with its batched selection;
- /predict: one POST /predict with every image (data: URIs: decode, preprocess pool, micro-batcher,
  post-processing, validation), through the real composition root (model.create_app);
- per task: the same images, one POST /predict per task, as Label Studio's per-task loop sends them.

No weights exist offline, so every model is its real architecture at its real size with random weights
(speed does not depend on the weights): torchvision's fasterrcnn_resnet50_fpn_v2 (saved where its weight
enum expects it), transformers' D-FINE-L (DFineConfig's defaults: HGNetV2-B4, 6 decoder layers) and
RT-DETRv2-R50 (RTDetrV2Config's defaults) saved with save_pretrained at 640x640, and an Ultralytics
YOLO11n built from its YAML. Each model sees images at its own native size (Faster R-CNN 800 px on the
shorter side, the others 640). Accuracy is not measured here: the COCO AP numbers are the published ones.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_detectors")

COCO_AP = {"fasterrcnn": 46.7, "dfine_l": 54.0, "rtdetr_v2_r50": 53.4, "yolo11n": 39.5}
MODELS = ("fasterrcnn", "dfine_l", "rtdetr_v2_r50", "yolo11n")


def build(model: str, root: Path) -> tuple[str, str, str]:
    """Save a random-weight model; return (family, model_name, model_path) for a tag."""
    import torch

    torch.manual_seed(0)
    if model == "fasterrcnn":
        from bench.bench_vision import fill_random_weights

        fill_random_weights("fasterrcnn_resnet50_fpn_v2", Path(os.environ["TORCH_HOME"]))
        return "detection", "fasterrcnn_resnet50_fpn_v2", ""
    if model == "yolo11n":
        from tests.backends._yolo_support import save_yolo

        names = ("person", "car", *(f"class{i}" for i in range(78)))
        path = save_yolo(root / "yolo" / "best.pt", "detect", names, imgsz=640)
        return "yolo", "", str(path)
    from transformers import (
        DFineConfig,
        DFineForObjectDetection,
        RTDetrImageProcessor,
        RTDetrV2Config,
        RTDetrV2ForObjectDetection,
    )

    from tests.backends._vision_support import coco_categories

    names = [c for c in coco_categories() if c not in ("__background__", "N/A")]
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if model == "dfine_l":
        net: Any = DFineForObjectDetection(DFineConfig(**labels))
    else:
        net = RTDetrV2ForObjectDetection(RTDetrV2Config(**labels))
    folder = root / model
    net.eval().save_pretrained(folder)
    RTDetrImageProcessor(size={"height": 640, "width": 640}).save_pretrained(folder)
    return "rt_detr", "", str(folder)


def config_for(name: str, path: str) -> str:
    """Return a RectangleLabels config (Person, Car) naming the model by name or path."""
    attrs = f' model_name="{name}"' if name else ""
    attrs += f' model_path="{path}"' if path else ""
    return (
        f'<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"{attrs} '
        'model_score_threshold="0.05"><Label value="Person"/><Label value="Car"/></RectangleLabels></View>'
    )


def raw_rate(app: Any, config: str, jpegs: list[bytes], batch: int, device: str) -> float:
    """Return images/s of the loaded backend's forward() alone on preprocessed inputs, `batch` per call."""
    import torch
    from PIL import Image

    from serving.contract import Item

    runtime = app.extensions["lsml_model"].runtime
    plan = runtime.plan(config)
    spec, obj, targets = plan.groups()[0]
    backend = runtime.slot(spec).backend
    items = [
        Item(task={}, obj=obj, image=Image.open(io.BytesIO(b)).convert("RGB"), targets=targets) for b in jpegs
    ]
    inputs = [backend.preprocess(it) for it in items]
    fp16 = device.startswith("cuda") and backend.fp16
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        backend.forward(inputs[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(inputs), batch):
            with backend.lock:
                backend.forward(inputs[i : i + batch])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return len(inputs) / (time.perf_counter() - start)


def measure(model: str, root: Path, jpegs: list[bytes], batch: int, device: str) -> dict[str, Any]:
    """Return one model's rows: raw, /predict and per-task images/s, and the regions returned."""
    from model import create_app
    from serving.settings import Settings

    family, name, path = build(model, root)
    settings = Settings(
        model_dir=str(root), max_batch_size=batch, device=device, predict_timeout_s=1800.0, load_wait_s=600.0
    )
    app = create_app(settings)
    config = config_for(name, path)
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [
        {"id": i + 1, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(b).decode()}}
        for i, b in enumerate(jpegs)
    ]
    warm = client.post("/predict", json={"tasks": tasks[:batch], "label_config": config})  # load + warm-up
    assert warm.status_code == 200, warm.get_json()
    plan = app.extensions["lsml_model"].runtime.plan(config)
    assert plan.targets[0].model.family == family, plan.targets[0].model
    start = time.perf_counter()
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config})
    predict_rate = len(tasks) / (time.perf_counter() - start)
    body = resp.get_json()
    assert resp.status_code == 200 and len(body["results"]) == len(tasks), body
    start = time.perf_counter()
    for task in tasks:
        one = client.post("/predict", json={"tasks": [task], "label_config": config})
        assert one.status_code == 200
    per_task = len(tasks) / (time.perf_counter() - start)
    raw = raw_rate(app, config, jpegs, batch, device)
    app.extensions["lsml_model"].runtime.close()
    row = {
        "model": model,
        "family": family,
        "coco_ap_published": COCO_AP[model],
        "raw_images_per_s": round(raw, 3),
        "predict_images_per_s": round(predict_rate, 3),
        "per_task_images_per_s": round(per_task, 3),
        "regions": sum(len(r["result"]) for r in body["results"]),
    }
    log.info(
        "%-14s raw %7.2f  /predict %7.2f  per task %7.2f images/s  (%d regions)",
        model,
        raw,
        predict_rate,
        per_task,
        row["regions"],
    )
    return row


def main() -> None:
    """Measure every model and print the rows side by side, with ratios to Faster R-CNN v2."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", default="640x480")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ultralytics", "serving", "backends", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("TORCH_HOME", "HF_HOME", "YOLO_CONFIG_DIR"):
            os.environ[name] = str(root / name.lower())
            (root / name.lower()).mkdir()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("YOLO_OFFLINE", "1")
        import torch

        from bench._common import write_report
        from bench.bench_vision import make_jpegs

        torch.set_flush_denormal(True)  # random weights make denormal floats, which crawl on CPU
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        width, height = (int(v) for v in args.image_size.split("x"))
        jpegs = make_jpegs(args.images, (width, height))
        rows = [measure(m, root, jpegs, args.batch, device) for m in args.models.split(",")]

    base = next((r for r in rows if r["model"] == "fasterrcnn"), rows[0])
    print(
        f"\n{args.images} images {args.image_size}, batch {args.batch}, {device}, torch {torch.__version__}"
    )
    print(
        f"{'model':<15}{'AP':>6}{'raw/s':>9}{'/predict/s':>12}{'per task/s':>12}{'raw x':>8}{'/predict x':>12}"
    )
    for r in rows:
        print(
            f"{r['model']:<15}{r['coco_ap_published']:>6}{r['raw_images_per_s']:>9.2f}"
            f"{r['predict_images_per_s']:>12.2f}{r['per_task_images_per_s']:>12.2f}"
            f"{r['raw_images_per_s'] / base['raw_images_per_s']:>8.2f}"
            f"{r['predict_images_per_s'] / base['predict_images_per_s']:>12.2f}"
        )
    print(
        f"median /predict / raw: {statistics.median(r['predict_images_per_s'] / r['raw_images_per_s'] for r in rows):.2f}"
    )
    write_report(args.out, {"device": device, "images": args.images, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
