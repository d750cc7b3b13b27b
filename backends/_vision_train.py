"""Fine-tuning torchvision detectors and classifiers on a project's annotations (the standard recipe).

The pretrained model (COCO / ImageNet weights, or the tag's own `model_path` checkpoint) gets a new
predictor head for the config's labels; the early backbone stages stay frozen (torchvision's
`trainable_backbone_layers=3`: ResNet conv1 + layer1, the first MobileNet stages) and BatchNorm keeps
its statistics (batches of a few images would ruin them). SGD with momentum and a linear decay,
horizontal flips, mixed precision on CUDA. The result is a user checkpoint of the same architecture
(`model.pt` + `model.classes.txt`), which the family serves like any `model_path` checkpoint.

- Detection: Faster R-CNN (box predictor replaced), RetinaNet and FCOS (the classification head's
  last convolution replaced; its tower keeps its pretrained weights). SSDlite is not trained here.
  Refused on CPU unless TRAIN_ALLOW_CPU=true (an epoch over a few hundred images takes hours there).
- Classification: the last linear layer (resnet fc, efficientnet classifier, vit heads) replaced;
  single choice trains with cross-entropy, `choice="multiple"` with per-choice sigmoids.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends import _torchvision as tv
from backends._train_loop import Optimization, amp_setup, linear_decay, load_state, train_epochs
from serving.contract import Example, TrainingRun, TrainResult
from serving.training.examples import precision_recall_f1, split_holdout

log = logging.getLogger(__name__)

DETECTION_EPOCHS = 10
CLASSIFICATION_EPOCHS = 8
SEED = 13
# preprocessed images kept in memory across epochs (uint8, at the size the model works at)
CACHE_BYTES = 2 << 30
TRAINABLE_DETECTORS = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
)


# ---------------------------------------------------------------------------------------------- shared


def freeze_batchnorm(model: Any) -> None:
    """Keep every BatchNorm in eval mode with frozen affine parameters (small batches would ruin them)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)


def freeze_early_backbone(body: Any, trainable_layers: int = 3) -> int:
    """Freeze the early stages of a ResNet or MobileNet feature extractor; return how many tensors froze.

    ResNet: everything before the last `trainable_layers` of layer1..layer4 (conv1 and layer1 for 3).
    MobileNet: the blocks before the last `trainable_layers` stages (torchvision's own rule).
    Other backbones are left trainable (and logged).
    """
    frozen = 0
    names = [name for name, _ in body.named_children()]
    if "layer4" in names:
        keep = ("layer4", "layer3", "layer2", "layer1")[:trainable_layers]
        for name, p in body.named_parameters():
            if not name.startswith(keep):
                p.requires_grad_(False)
                frozen += 1
        return frozen
    blocks = list(body.children())
    stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
    if len(stages) > trainable_layers:
        before = stages[len(stages) - trainable_layers]
        for block in blocks[:before]:
            for p in block.parameters():
                p.requires_grad_(False)
                frozen += 1
        return frozen
    log.info("backbone %s: no known stages to freeze; all of it trains", type(body).__name__)
    return 0


def write_model(output: Path, model: Any, labels: Sequence[str]) -> None:
    """Write model.pt (state_dict on the CPU) and model.classes.txt: a checkpoint the family serves."""
    import torch

    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(state, output / "model.pt")
    (output / "model.classes.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- detection


def sgd_setup(run: TrainingRun, model: Any, lr: float, total_steps: int, device: str) -> tuple[Any, ...]:
    """Return (optimizer, scheduler, autocast on, its dtype, scaler), resumed from run.checkpoint if any.

    SGD with momentum on the trainable parameters and a linear decay: torchvision's fine-tuning recipe.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=run.learning_rate_or(lr), momentum=0.9, weight_decay=1e-4)
    scheduler = linear_decay(optimizer, total_steps)
    amp, amp_dtype, scaler = amp_setup(device)
    if run.checkpoint is not None:
        load_state(run.checkpoint, model, optimizer, scheduler, scaler, device)
    return optimizer, scheduler, amp, amp_dtype, scaler


def detector_trainable(name: str) -> str | None:
    """Return why a detector cannot be fine-tuned here, or None."""
    if name not in TRAINABLE_DETECTORS:
        return (
            f"{name} is not trained here (trainable: {', '.join(TRAINABLE_DETECTORS)}); "
            "set model_name on the tag to one of them"
        )
    return None


def replace_detector_head(model: Any, num_classes: int) -> None:
    """Give a Faster R-CNN, RetinaNet or FCOS a predictor for num_classes (background included)."""
    import torch
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        old = roi_heads.box_predictor
        roi_heads.box_predictor = FastRCNNPredictor(old.cls_score.in_features, num_classes)
        return
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is None or not hasattr(head, "cls_logits"):
        raise RuntimeError(f"{type(model).__name__}: no detection head this recipe knows how to replace")
    old = head.cls_logits
    anchors = head.num_anchors
    new = torch.nn.Conv2d(old.in_channels, anchors * num_classes, kernel_size=3, stride=1, padding=1)
    torch.nn.init.normal_(new.weight, std=0.01)
    assert new.bias is not None
    torch.nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))  # torchvision's focal-loss prior
    head.cls_logits = new
    head.num_classes = num_classes


def _train_mode(model: Any) -> None:
    """Put a model in training mode at an epoch's start, its BatchNorm statistics frozen."""
    model.train()
    freeze_batchnorm(model)


def _detector_body(model: Any) -> Any:
    backbone = getattr(model, "backbone", None)
    return getattr(backbone, "body", backbone)


class ImageCache:
    """Preprocessed training images (uint8 CHW at the model's working size) with their boxes, up to a budget."""

    def __init__(self, run: TrainingRun, scale_of: Callable[[tuple[int, int]], float]) -> None:
        self.run = run
        self.scale_of = scale_of
        self.items: dict[int, tuple[Any, np.ndarray, list[str]]] = {}
        self.bytes = 0

    def get(self, index: int, example: Example) -> tuple[Any, np.ndarray, list[str]]:
        """Return (uint8 tensor, boxes xyxy in its pixels, labels) of an example."""
        cached = self.items.get(index)
        if cached is not None:
            return cached
        image, boxes, labels = self.run.load_image(example)
        scale = min(1.0, self.scale_of(image.size))
        size = tv.scaled_size(image.size, scale)
        tensor = tv.image_to_tensor(tv.resize_to(image, size))
        sx, sy = size[0] / image.size[0], size[1] / image.size[1]
        boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        entry = (tensor, boxes, labels)
        nbytes = int(tensor.numel())
        if self.bytes + nbytes <= CACHE_BYTES:
            self.items[index] = entry
            self.bytes += nbytes
        return entry


def train_detector(run: TrainingRun, user_kwargs: Any) -> TrainResult:
    """Fine-tune a torchvision detector for the config's labels; write model.pt + model.classes.txt."""
    import torch

    torch.manual_seed(SEED)
    labels = list(run.labels)
    label_index = {label: i + 1 for i, label in enumerate(labels)}  # 0 is the background
    model, _, _ = tv.build_model(run.spec, run.settings, user_kwargs)
    replace_detector_head(model, len(labels) + 1)
    frozen = freeze_early_backbone(_detector_body(model))
    device = run.device
    model.to(device)
    train, held_out = split_holdout(run.examples)
    cache = ImageCache(run, lambda size: tv.detector_input_scale(size, model))
    epochs = run.epochs_or(DETECTION_EPOCHS)
    batch_size = 4 if device.startswith("cuda") else 2
    steps = (len(train) + batch_size - 1) // batch_size
    opt = Optimization(*sgd_setup(run, model, 0.005, steps * epochs, device))
    log.info(
        "detector %s: %d labels, %d images (%d held out), %d frozen backbone tensors, %s",
        run.spec.name,
        len(labels),
        len(train),
        len(held_out),
        frozen,
        device,
    )

    def step(chunk: list[int], rng: random.Random) -> tuple[float, dict[str, float]]:
        images, targets = [], []
        for i in chunk:
            tensor, boxes, names = cache.get(i, train[i])
            boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            if rng.random() < 0.5:  # horizontal flip
                width = tensor.shape[-1]
                tensor = tensor.flip(-1)
                boxes_t = torch.stack(
                    [width - boxes_t[:, 2], boxes_t[:, 1], width - boxes_t[:, 0], boxes_t[:, 3]], 1
                )
            images.append(tensor.to(device).float().div_(255.0))
            targets.append(
                {
                    "boxes": boxes_t.to(device),
                    "labels": torch.as_tensor(
                        [label_index[n] for n in names], dtype=torch.int64, device=device
                    ),
                }
            )
        with opt.autocast():
            losses = model(images, targets)
            loss = sum(losses.values())
        opt.step(loss, max_norm=10.0)
        return float(loss.detach()), {k: round(float(v.detach()), 5) for k, v in losses.items()}

    train_epochs(
        run,
        len(train),
        batch_size,
        epochs,
        step,
        opt.writer(model),
        seed=SEED,
        begin_epoch=lambda: _train_mode(model),
    )
    model.eval()
    write_model(run.output_dir, model, labels)
    metrics = detection_scores(model, cache, train, held_out, labels, device)
    return TrainResult("model.pt", metrics)


def detection_scores(
    model: Any,
    cache: ImageCache,
    train: Sequence[Example],
    held_out: Sequence[Example],
    labels: Sequence[str],
    device: str,
) -> dict[str, Any]:
    """Return precision/recall/F1 per label at IoU 0.5 and score 0.5, on held-out images (else training)."""
    import torch
    from torchvision.ops import box_iou

    examples = held_out or train
    offset = len(train) if held_out else 0
    tp = np.zeros(len(labels) + 1)
    fp = np.zeros(len(labels) + 1)
    fn = np.zeros(len(labels) + 1)
    index = {label: i + 1 for i, label in enumerate(labels)}
    with torch.inference_mode():
        for k, example in enumerate(examples):
            tensor, boxes, names = cache.get(offset + k, example)
            out = model([tensor.to(device).float().div_(255.0)])[0]
            keep = out["scores"] >= 0.5
            pred_boxes, pred_labels = out["boxes"][keep].float().cpu(), out["labels"][keep].cpu()
            gold_boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            gold_labels = torch.as_tensor([index[n] for n in names], dtype=torch.int64)
            for c in range(1, len(labels) + 1):
                p, g = pred_boxes[pred_labels == c], gold_boxes[gold_labels == c]
                matched = 0
                if len(p) and len(g):
                    iou = box_iou(p, g).numpy()
                    used: set[int] = set()
                    for row in iou:  # predictions in score order: greedy one-to-one matching
                        j = int(np.argmax(np.where([i in used for i in range(len(g))], -1.0, row)))
                        if row[j] >= 0.5 and j not in used:
                            used.add(j)
                            matched += 1
                tp[c] += matched
                fp[c] += len(p) - matched
                fn[c] += len(g) - matched
    per = {label: precision_recall_f1(tp[i + 1], fp[i + 1], fn[i + 1]) for i, label in enumerate(labels)}
    return {
        "on": "held_out" if held_out else "train",
        "iou": 0.5,
        **precision_recall_f1(tp.sum(), fp.sum(), fn.sum()),
        "per_label": per,
    }


# ---------------------------------------------------------------------------------------------- classification


def replace_classifier(model: Any, num_classes: int) -> None:
    """Give a resnet / efficientnet / vit a final linear layer for num_classes."""
    import torch

    if isinstance(getattr(model, "fc", None), torch.nn.Linear):
        model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
        return
    heads = getattr(model, "heads", None)
    if heads is not None and isinstance(getattr(heads, "head", None), torch.nn.Linear):
        heads.head = torch.nn.Linear(heads.head.in_features, num_classes)
        return
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, torch.nn.Sequential) and isinstance(classifier[-1], torch.nn.Linear):
        classifier[-1] = torch.nn.Linear(classifier[-1].in_features, num_classes)
        return
    raise RuntimeError(f"{type(model).__name__}: no final linear layer this recipe knows how to replace")


def freeze_classifier_backbone(model: Any) -> int:
    """Freeze the early stages: resnet up to layer2, efficientnet features[:5], vit all but the last 4 blocks."""
    frozen = 0
    if hasattr(model, "layer4"):
        for name, p in model.named_parameters():
            if not name.startswith(("layer3", "layer4", "fc")):
                p.requires_grad_(False)
                frozen += 1
    elif hasattr(model, "features"):
        for block in list(model.features)[:5]:
            for p in block.parameters():
                p.requires_grad_(False)
                frozen += 1
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layers"):
        layers = list(model.encoder.layers)
        frozen_blocks = layers[: max(0, len(layers) - 4)]
        for module in (getattr(model, "conv_proj", None), *frozen_blocks):
            if module is None:
                continue
            for p in module.parameters():
                p.requires_grad_(False)
                frozen += 1
        model.class_token.requires_grad_(False)
        model.encoder.pos_embedding.requires_grad_(False)
    return frozen


class ClassifierImages:
    """Training images preprocessed as the family serves them (resize + center crop), kept across epochs."""

    def __init__(self, run: TrainingRun, helper: Any, device: str) -> None:
        import torch

        self.run = run
        self.helper = helper
        self.device = device
        self.mean = torch.tensor(helper.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(helper.std, device=device).view(1, 3, 1, 1)
        self.tensors: dict[int, Any] = {}

    def get(self, index: int, example: Example) -> Any:
        """Return the uint8 CHW tensor of an example (preprocessed once)."""
        if index not in self.tensors:
            from serving.contract import Item, ObjectTag

            image, _, _ = self.run.load_image(example)
            self.tensors[index] = self.helper.preprocess(
                Item({"id": example.task_id}, ObjectTag(example.obj, "Image", ""), image=image)
            )
        return self.tensors[index]

    def normalise(self, batch: Any) -> Any:
        """Return a uint8 NCHW batch on the device as the model's normalised float input."""
        return (batch.to(self.device).float().div_(255.0) - self.mean) / self.std


def train_classifier(run: TrainingRun, backend_cls: Any) -> TrainResult:
    """Fine-tune a torchvision classifier for the config's choices; write model.pt + model.classes.txt."""
    import torch

    torch.manual_seed(SEED)
    labels = list(run.labels)
    index = {label: i for i, label in enumerate(labels)}
    target = run.targets[0]
    multiple = target.option("choice", "single").strip().lower() == "multiple"
    model, _, _ = tv.build_model(run.spec, run.settings)
    replace_classifier(model, len(labels))
    frozen = freeze_classifier_backbone(model)
    device = run.device
    model.to(device)
    usable = [e for e in run.examples if e.choices]
    train, held_out = split_holdout(usable)
    images = ClassifierImages(run, backend_cls(run.spec, run.settings), device)
    epochs = run.epochs_or(CLASSIFICATION_EPOCHS)
    batch_size = 16
    steps = (len(train) + batch_size - 1) // batch_size
    opt = Optimization(*sgd_setup(run, model, 0.01, steps * epochs, device))
    log.info(
        "classifier %s: %d choices, %d images, %d frozen tensors",
        run.spec.name,
        len(labels),
        len(train),
        frozen,
    )

    def step(chunk: list[int], rng: random.Random) -> tuple[float, None]:
        batch = torch.stack([images.get(i, train[i]) for i in chunk]).to(device)
        flip = torch.tensor([rng.random() < 0.5 for _ in chunk], device=device)
        x = images.normalise(torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch))
        with opt.autocast():
            logits = model(x).float()
        if multiple:
            goal = torch.zeros((len(chunk), len(labels)), device=device)
            for row, i in enumerate(chunk):
                goal[row, [index[c] for c in train[i].choices]] = 1.0
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, goal)
        else:
            goal_idx = torch.tensor([index[train[i].choices[0]] for i in chunk], device=device)
            loss = torch.nn.functional.cross_entropy(logits, goal_idx)
        opt.step(loss)
        return float(loss.detach()), None

    train_epochs(
        run,
        len(train),
        batch_size,
        epochs,
        step,
        opt.writer(model),
        seed=SEED,
        begin_epoch=lambda: _train_mode(model),
    )
    model.eval()
    write_model(run.output_dir, model, labels)
    return TrainResult("model.pt", classification_scores(model, images, train, held_out, labels, multiple))


def classification_scores(
    model: Any,
    images: ClassifierImages,
    train: Sequence[Example],
    held_out: Sequence[Example],
    labels: Sequence[str],
    multiple: bool,
) -> dict[str, Any]:
    """Return the accuracy on held-out images (else training): every choice right for choice="multiple"."""
    import torch

    scored = held_out or train
    offset = len(train) if held_out else 0
    correct = 0
    with torch.inference_mode():
        for k, example in enumerate(scored):
            logits = model(images.normalise(images.get(offset + k, example)[None])).float()[0]
            if multiple:
                picked = {labels[j] for j in torch.nonzero(logits.sigmoid() >= 0.5).flatten().tolist()}
                correct += picked == set(example.choices)
            else:
                correct += labels[int(logits.argmax())] == example.choices[0]
    return {
        "on": "held_out" if held_out else "train",
        "accuracy": round(correct / max(1, len(scored)), 4),
        "images": len(scored),
    }
