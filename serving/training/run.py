"""`Run`: the TrainingRun a family's train() gets (progress to the store, checkpoints, images in pixels)."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.contract import (
    Example,
    Target,
    TrainCancelled,
    TrainingRun,
)
from serving.errors import InputError
from serving.results import regions
from serving.settings import Settings
from serving.training.store import TrainingJob, TrainingStore

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)


class Run(TrainingRun):
    """The TrainingRun of one job: progress to the store, checkpoints in the job folder, images resolved."""

    def __init__(
        self,
        *,
        job: TrainingJob,
        store: TrainingStore,
        settings: Settings,
        targets: Sequence[Target],
        examples: Sequence[Example],
        output_dir: Path,
        device: str,
        resolver: Any,
        stop: threading.Event | None = None,
    ) -> None:
        """Set up the run; the checkpoint to resume from is the newest complete epoch folder."""
        self.job = job
        self.store = store
        self.spec = job.spec
        self.settings = settings
        self.targets = tuple(targets)
        labels: list[str] = []
        for target in self.targets:
            labels.extend(label for label in target.label_map.config_labels if label not in labels)
        self.labels = tuple(labels)
        self.examples = list(examples)
        self.output_dir = output_dir
        self.device = device
        self.epochs = settings.train_epochs
        self.resolver = resolver
        self.stop = stop or threading.Event()
        self.checkpoints = store.job_dir(job.id) / "checkpoints"
        done = self.completed_epochs()
        self.start_epoch = (done[-1] if done else 0) + 1
        self.checkpoint = self.checkpoints / f"epoch-{done[-1]}" if done else None
        self._last_write = 0.0
        self._progress: dict[str, Any] = dict(job.progress or {})

    def completed_epochs(self) -> list[int]:
        """Return the epochs with a complete checkpoint folder, ascending."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for path in self.checkpoints.iterdir():
            match = re.fullmatch(r"epoch-(\d+)", path.name)
            if match and path.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def progress(
        self,
        epoch: int,
        step: int,
        loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        epochs: int | None = None,
        steps: int | None = None,
    ) -> None:
        """Record progress (written at most every 0.5 s, always with metrics); raise TrainCancelled to stop."""
        entry = self._progress
        entry.update({"epoch": int(epoch), "step": int(step)})
        if loss is not None and math.isfinite(float(loss)):
            entry["loss"] = round(float(loss), 6)
        if epochs is not None:
            entry["epochs"] = int(epochs)
        if steps is not None:
            entry["steps"] = int(steps)
        if metrics:
            entry["metrics"] = _jsonable(metrics)
        self._write(force=bool(metrics))

    def end_epoch(self, epoch: int, loss: float, metrics: Mapping[str, Any] | None = None) -> None:
        """Append the epoch's mean loss (and metrics) to the history; write it; raise TrainCancelled to stop."""
        entry = self._progress
        history = [h for h in entry.get("history", []) if int(h.get("epoch", 0)) < epoch]
        record: dict[str, Any] = {"epoch": int(epoch), "loss": _jsonable(float(loss))}
        if metrics:
            record["metrics"] = _jsonable(metrics)
            entry["metrics"] = record["metrics"]
        history.append(record)
        entry["history"] = history
        entry["epoch"] = int(epoch)
        log.info("job %s: epoch %d loss %.5f %s", self.job.id, epoch, loss, dict(metrics or {}))
        self._write(force=True)

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= 0.5:
            self._last_write = now
            self.store.update(self.job.id, progress=self._progress)
            if self.store.cancel_requested(self.job.id):
                raise TrainCancelled("cancelled")
        if self.stop.is_set():
            raise TrainCancelled("the trainer is stopping; the job resumes from its last checkpoint")

    def save_checkpoint(self, epoch: int, write: Callable[[Path], None]) -> None:
        """Fill a fresh folder with write(), rename it to epoch-<n> (atomic), then drop older epochs."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        staging = self.checkpoints / f".epoch-{epoch}.{uuid.uuid4().hex[:6]}.tmp"
        staging.mkdir()
        write(staging)
        final = self.checkpoints / f"epoch-{epoch}"
        if final.exists():  # a killed run may have saved this epoch before; the new one replaces it
            shutil.rmtree(final)
        os.rename(staging, final)
        self._progress["checkpoint_epoch"] = int(epoch)
        self.store.update(self.job.id, progress=self._progress)
        for old in self.completed_epochs():
            if old < epoch:
                shutil.rmtree(self.checkpoints / f"epoch-{old}", ignore_errors=True)
        log.info("job %s: checkpoint of epoch %d saved", self.job.id, epoch)

    def load_image(self, example: Example) -> tuple[Image.Image, np.ndarray, list[str]]:
        """Return the image as shown (RGB, EXIF applied) and its boxes in pixels (xyxy) with labels."""
        import numpy as np

        if example.image is None:
            raise InputError(f"task {example.task_id} has no image")
        task_id = example.task_id if isinstance(example.task_id, int) else None
        image = self.resolver.load_image(example.image, task_id)
        size = image.size  # the size Label Studio shows: percentages are of this
        boxes, labels = [], []
        for box in example.boxes:
            x0, y0, x1, y1 = regions.box_pct_to_xyxy_px(
                box.x, box.y, box.width, box.height, box.rotation, size
            )
            if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
                boxes.append((x0, y0, x1, y1))
                labels.append(box.label)
        array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return image, array, labels


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return round(number, 6) if math.isfinite(number) else None
