"""Tiny random Ultralytics checkpoints built from the architecture YAMLs, and planted predictor answers.

No real weights exist offline: each checkpoint is the real YOLO11n architecture of its task with random
weights, saved the way Ultralytics training saves `best.pt` ({"model": module, "train_args": ...}) and
loaded through the family's own code. `planted_family` runs the real predictor, then replaces its Results
with known ones in the coordinates of the image the predictor saw, so the answers are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLASSES = ("car", "person", "dog")
TASKS = {
    "detect": "yolo11n.yaml",
    "obb": "yolo11n-obb.yaml",
    "segment": "yolo11n-seg.yaml",
    "pose": "yolo11n-pose.yaml",
    "classify": "yolo11n-cls.yaml",
}


def save_yolo(path: Path, task: str = "detect", classes: tuple[str, ...] = CLASSES, imgsz: int = 64) -> Path:
    """Save a random-weight YOLO11n checkpoint of one task with these class names; return the file."""
    from ultralytics.nn import tasks as nn_tasks

    builders = {
        "detect": nn_tasks.DetectionModel,
        "obb": nn_tasks.OBBModel,
        "segment": nn_tasks.SegmentationModel,
        "pose": nn_tasks.PoseModel,
        "classify": nn_tasks.ClassificationModel,
    }
    torch.manual_seed(0)
    extra: dict[str, Any] = {"data_kpt_shape": (17, 3)} if task == "pose" else {}
    model = builders[task](TASKS[task], nc=len(classes), verbose=False, **extra)
    model.names = dict(enumerate(classes))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "train_args": {"task": task, "imgsz": imgsz}}, path)
    return path


@dataclass(frozen=True)
class Plant:
    """One planted detection, in coordinates relative to the image (0-1): what depends on the task.

    box: x0, y0, x1, y1 (detect, segment: its mask is the box; pose); obb: cx, cy, w, h (relative)
    and angle in radians; keypoints: (K, 2) relative points; probs: classify class probabilities.
    """

    cls: int
    conf: float
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    angle: float = 0.0
    keypoints: tuple[tuple[float, float], ...] = ()


def planted_results(
    results: list[Any], plants: list[Plant], task: str, probs: list[float] | None = None
) -> list[Any]:
    """Return new Results on the same images with the plants (relative coordinates scaled to each image)."""
    from ultralytics.engine.results import Results

    out = []
    for result in results:
        h, w = result.orig_shape
        names = result.names
        if task == "classify":
            out.append(Results(result.orig_img, result.path, names, probs=torch.tensor(probs or [])))
            continue
        if task == "obb":
            rows = [
                [p.box[0] * w, p.box[1] * h, p.box[2] * w, p.box[3] * h, p.angle, p.conf, p.cls]
                for p in plants
            ]
            out.append(
                Results(result.orig_img, result.path, names, obb=torch.tensor(rows, dtype=torch.float32))
            )
            continue
        rows = [[p.box[0] * w, p.box[1] * h, p.box[2] * w, p.box[3] * h, p.conf, p.cls] for p in plants]
        kwargs: dict[str, Any] = {"boxes": torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)}
        if task == "segment":
            masks = torch.zeros((len(plants), h, w))
            for i, p in enumerate(plants):
                x0, y0, x1, y1 = (
                    round(p.box[0] * w),
                    round(p.box[1] * h),
                    round(p.box[2] * w),
                    round(p.box[3] * h),
                )
                masks[i, y0:y1, x0:x1] = 1.0
            kwargs["masks"] = masks
        if task == "pose":
            kwargs["keypoints"] = torch.tensor(
                [[[x * w, y * h, 0.9] for x, y in p.keypoints] for p in plants], dtype=torch.float32
            )
        out.append(Results(result.orig_img, result.path, names, **kwargs))
    return out


def planted_family(plants: list[Plant], probs: list[float] | None = None) -> type[Any]:
    """Return the real yolo family whose predictor runs, then answers the plants; it records each call."""
    from backends.yolo import YoloBackend

    class PlantedYolo(YoloBackend):
        calls: list[dict[str, Any]] = []

        def predict_raw(self, inputs: Any) -> list[Any]:
            real = super().predict_raw(inputs)
            type(self).calls.append(
                {
                    "n": len(inputs),
                    "classes": self.model.predictor.args.classes,
                    "shapes": [x.array.shape for x in inputs],
                }
            )
            return planted_results(real, plants, self.task, probs)

    return PlantedYolo
