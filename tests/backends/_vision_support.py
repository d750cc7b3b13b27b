"""Helpers for the vision backend tests: planted torchvision-format models, targets, random weights."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from backends import _torchvision as tv
from serving.contract import ControlTag, Item, LabelMap, ModelSpec, ObjectTag, Target
from serving.settings import Settings


def coco_categories() -> list[str]:
    """Return torchvision's COCO category list (index = model label), without any download."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights

    return list(FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])


def voc_categories() -> list[str]:
    """Return torchvision's Pascal VOC category list of the semantic models."""
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

    return list(DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])


def imagenet_categories() -> list[str]:
    """Return torchvision's ImageNet-1k category list."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


class Transform:
    """Stands in for GeneralizedRCNNTransform's size attributes (drives the input downscale)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = (min_size,)
        self.max_size = max_size


class PlantedDetector(torch.nn.Module):
    """Returns fixed torchvision-format outputs, computed from each input tensor's (h, w).

    `make(h, w)` returns the dict for one image in INPUT coordinates (boxes, scores, labels and
    optionally masks (N, 1, h, w) probabilities, keypoints (N, K, 3), keypoints_scores (N, K)).
    """

    def __init__(self, make: Callable[[int, int], dict[str, torch.Tensor]], transform: Any = None) -> None:
        super().__init__()
        self.make = make
        self.inputs: list[list[tuple[int, ...]]] = []
        if transform is not None:
            self.transform = transform

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Record input shapes and return the planted outputs."""
        assert all(x.dtype == torch.float32 and float(x.max()) <= 1.0 for x in images)
        self.inputs.append([tuple(x.shape) for x in images])
        outs = [self.make(int(x.shape[1]), int(x.shape[2])) for x in images]
        # Outputs live where the inputs are, as a real model's do (CPU or CUDA).
        return [{k: v.to(x.device) for k, v in out.items()} for x, out in zip(images, outs, strict=True)]


class PlantedSemantic(torch.nn.Module):
    """Returns logits where `regions(h, w)` gives a (h, w) class-index map; confidence set by `logit`."""

    def __init__(
        self, num_classes: int, regions: Callable[[int, int], torch.Tensor], logit: float = 6.0
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.regions = regions
        self.logit = logit
        self.inputs: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {"out": (B, C, H, W) logits}."""
        self.inputs.append(tuple(x.shape))
        b, _, h, w = x.shape
        cls = self.regions(h, w)
        logits = torch.zeros((b, self.num_classes, h, w))
        logits.scatter_(1, cls[None, None].expand(b, 1, h, w), self.logit)
        return {"out": logits}


class PlantedClassifier(torch.nn.Module):
    """Returns fixed logits for every image."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the planted logits for each image of the batch."""
        self.shapes.append(tuple(x.shape))
        return self.logits[None].expand(x.shape[0], -1)


def control(
    tag: str,
    name: str = "tag",
    labels: Sequence[str] = (),
    attrs: dict[str, str] | None = None,
    predicted_values: dict[str, tuple[str, ...]] | None = None,
) -> ControlTag:
    """Return a control tag on the image "image"."""
    return ControlTag(
        name=name,
        tag=tag,
        to_name="image",
        labels=tuple(labels),
        attrs=attrs or {},
        predicted_values=predicted_values or {},
    )


IMAGE = ObjectTag(name="image", tag="Image", value_key="image")


def target(
    ctrl: ControlTag,
    family: str,
    model: str,
    aliases: Sequence[Any] = (),
    threshold: float = 0.5,
    linked: dict[str, ControlTag] | None = None,
) -> Target:
    """Return a Target built like the planner does (labels from the control or its linked Labels)."""
    source = ctrl
    if not ctrl.labels and linked and "labels" in linked:
        source = linked["labels"]
    return Target(
        control=ctrl,
        obj=IMAGE,
        model=ModelSpec(family, model),
        label_map=LabelMap(source.labels, source.predicted_values, aliases),
        threshold=threshold,
        linked=linked or {},
    )


def image_item(width: int, height: int, color: tuple[int, int, int] = (120, 80, 40)) -> Item:
    """Return an Item holding a plain RGB image of the given size."""
    return Item(
        task={"id": 1, "data": {"image": "x"}}, obj=IMAGE, image=Image.new("RGB", (width, height), color)
    )


def save_random_weights(builder: str, torch_home: Path, **kwargs: Any) -> Path:
    """Save a randomly initialised state_dict where torchvision's weight enum expects it (fp16: half the disk)."""
    import torchvision.models as tvm

    info = tv.model_info(builder)
    if "weights_backbone" in inspect.signature(tvm.get_model_builder(builder)).parameters:
        kwargs["weights_backbone"] = None
    model = tvm.get_model(builder, weights=None, **kwargs)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = torch_home / "hub" / "checkpoints" / info.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def settings(tmp_path: Path) -> Settings:
    """Return settings with MODEL_DIR under tmp_path."""
    return Settings(model_dir=str(tmp_path / "model_dir"))


def ellipse_mask(
    h: int, w: int, cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0
) -> np.ndarray:
    """Return a boolean (h, w) filled ellipse sampled at pixel centers; angle clockwise (y down)."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64) + 0.5
    t = np.deg2rad(angle_deg)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
