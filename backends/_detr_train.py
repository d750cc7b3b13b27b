"""Fine-tuning a real-time DETR (RT-DETR(v2), D-FINE, DEIMv2, RF-DETR) for the config's labels.

The checkpoint is loaded with a new class head sized for the config's labels (transformers re-initialises
the mismatched class layers; the backbone, encoder, decoder and box heads keep their weights), trained
with AdamW (the backbone at a tenth of the rate) on the annotated boxes (horizontal flips), and saved
with save_pretrained beside its image processor: the version folder is a `model_path` the rt_detr family
serves like any checkpoint folder, its `id2label` the config's labels.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends._train_loop import Optimization, amp_setup, linear_decay, train_epochs
from backends._vision_train import SEED, ImageCache, detection_scores
from serving.contract import TrainResult
from serving.training.examples import split_holdout

if TYPE_CHECKING:
    from serving.contract import TrainingRun

log = logging.getLogger(__name__)

DETR_EPOCHS = 30
DETR_LR = 1e-4


class Detect:
    """Call a DETR like a torchvision detector (one CHW float image in, boxes/scores/labels 1-based out)."""

    def __init__(
        self, model: Any, size: tuple[int, int], mean: Any, std: Any, threshold: float = 0.05
    ) -> None:
        self.model, self.size, self.mean, self.std, self.threshold = model, size, mean, std, threshold

    def __call__(self, images: list[Any]) -> list[dict[str, Any]]:
        """Return one torchvision-style result per image, in its own pixels."""
        import torch

        from backends.rt_detr import select_detections

        out = []
        for image in images:
            height, width = image.shape[-2:]
            pixels = _pixels(image[None], self.size, self.mean, self.std)
            found = self.model(pixel_values=pixels)
            classes = found.logits.shape[-1]
            allowed = torch.ones((1, classes), dtype=torch.bool, device=pixels.device)
            floors = torch.tensor([self.threshold], device=pixels.device)
            scale = torch.tensor([[width, height, width, height]], dtype=torch.float32, device=pixels.device)
            boxes, scores, labels, kept = select_detections(
                found.logits, found.pred_boxes, allowed, floors, scale, 100
            )
            keep = kept[0]
            out.append({"boxes": boxes[0][keep], "scores": scores[0][keep], "labels": labels[0][keep] + 1})
        return out


def _pixels(batch: Any, size: tuple[int, int], mean: Any, std: Any) -> Any:
    """Return float images in [0, 1] stretched to the model's (width, height), normalised when it wants."""
    import torch.nn.functional as F

    x = F.interpolate(batch, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std if mean is not None else x


def train_detr(run: TrainingRun, folder: Path) -> TrainResult:
    """Fine-tune the checkpoint in `folder` for run.labels; write model + processor into run.output_dir."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from backends.rt_detr import _input_size

    torch.manual_seed(SEED)
    labels = list(run.labels)
    label_index = {label: i for i, label in enumerate(labels)}
    model = AutoModelForObjectDetection.from_pretrained(
        str(folder),
        local_files_only=True,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label_index,
        ignore_mismatched_sizes=True,  # a new class head for the config's labels
    )
    try:
        processor: Any = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        processor = None
    size = _input_size(processor)
    device = run.device
    model.to(device)
    mean = std = None
    if processor is not None and getattr(processor, "do_normalize", False):
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)[None, :, None, None]
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)[None, :, None, None]
    train, held_out = split_holdout(run.examples)
    cache = ImageCache(run, lambda s: min(1.0, max(size[0] / s[0], size[1] / s[1])))
    epochs = run.epochs_or(DETR_EPOCHS)
    batch_size = 4 if device.startswith("cuda") else 2
    steps = (len(train) + batch_size - 1) // batch_size
    lr = run.learning_rate_or(DETR_LR)
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": lr / 10}, {"params": rest, "lr": lr}], lr=lr, weight_decay=1e-4
    )
    amp, dtype, scaler = amp_setup(device)
    opt = Optimization(optimizer, linear_decay(optimizer, steps * epochs), amp, dtype, scaler)
    opt.resume(run, model, device)
    log.info(
        "%s: %d labels, %d images (%d held out), %dx%d input, %s",
        run.spec.name,
        len(labels),
        len(train),
        len(held_out),
        *size,
        device,
    )

    def step(chunk: list[int], rng: random.Random) -> tuple[float, dict[str, float]]:
        images, targets = [], []
        for i in chunk:
            tensor, boxes, names = cache.get(i, train[i])
            image, target = _example(
                tensor, boxes, [label_index[n] for n in names], rng.random() < 0.5, device
            )
            images.append(_pixels(image[None], size, mean, std)[0])
            targets.append(target)
        with opt.autocast():
            out = model(pixel_values=torch.stack(images), labels=targets)
        opt.step(out.loss, max_norm=0.1)
        parts = {k: round(float(v.detach()), 5) for k, v in (out.loss_dict or {}).items() if v.numel() == 1}
        return float(out.loss.detach()), parts

    train_epochs(
        run, len(train), batch_size, epochs, step, opt.writer(model), seed=SEED, begin_epoch=model.train
    )
    model.eval()
    _save(model, processor, size, Path(run.output_dir))
    with torch.inference_mode():
        metrics = detection_scores(Detect(model, size, mean, std), cache, train, held_out, labels, device)
    return TrainResult("", metrics)


def _example(
    tensor: Any, boxes: Any, classes: list[int], flip: bool, device: str
) -> tuple[Any, dict[str, Any]]:
    """Return one training image (0..1, maybe flipped) on `device` and its DETR target (normalised cxcywh)."""
    import torch

    height, width = tensor.shape[-2:]
    xyxy = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) / torch.tensor(
        [width, height, width, height], dtype=torch.float32
    )
    image = tensor.float().div(255.0)
    if flip:  # horizontal flip
        image = image.flip(-1)
        xyxy = torch.stack([1 - xyxy[:, 2], xyxy[:, 1], 1 - xyxy[:, 0], xyxy[:, 3]], 1)
    cxcywh = torch.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ],
        1,
    ).clamp(0.0, 1.0)
    target = {
        "class_labels": torch.as_tensor(classes, dtype=torch.int64, device=device),
        "boxes": cxcywh.to(device),
    }
    return image.to(device), target


def _save(model: Any, processor: Any, size: tuple[int, int], out_dir: Path) -> None:
    """Write the fine-tuned model and a processor for its input size (a folder the family serves)."""
    model.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
        return
    from transformers import RTDetrImageProcessor

    RTDetrImageProcessor(size={"height": size[1], "width": size[0]}).save_pretrained(out_dir)
