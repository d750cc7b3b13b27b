"""Object detection (torchvision, COCO): RectangleLabels, and Rectangle with a linked sibling Labels tag.

Models by `model_name`: fasterrcnn_resnet50_fpn_v2 (default), retinanet_resnet50_fpn_v2,
fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large, fasterrcnn_mobilenet_v3_large_fpn; or a user
checkpoint of one of them with `model_path` (see backends/_torchvision.py for the format).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from backends import _torchvision as tv
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    ModelSpec,
    ObjectTag,
    Target,
    TrainingRun,
    TrainResult,
)
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)


def link_sibling_labels(
    claims: list[Claim], controls: Sequence[ControlTag], plain_tags: Sequence[str]
) -> list[Claim]:
    """Link the first sibling Labels tag (same image) to every plain geometry claim."""
    labels = [c for c in controls if c.tag == "Labels"]
    if not labels:
        return claims
    out = []
    for claim in claims:
        if claim.control.tag in plain_tags and "labels" not in claim.linked:
            claim = Claim(
                claim.control, claim.model_name, claim.model_path, {**claim.linked, "labels": labels[0]}
            )
        out.append(claim)
    return out


class TorchvisionDetectorBase(tv.TorchvisionWeights, Backend):
    """What detection, instance segmentation and keypoints share: load, preprocess, batched forward."""

    object_tags = ("Image",)
    input_kind = "image"
    aliases = tv.VISION_ALIASES
    # The model's own score threshold: a tag's model_score_threshold below it acts as this value.
    score_floor: ClassVar[float] = 0.1
    detections_per_img: ClassVar[int] = 100
    plain_tags: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.categories: list[str] = []

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the torchvision builders this family serves."""
        return cls.supported_models

    supported_models: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim this family's controls; plain geometry links a sibling Labels tag on the same image."""
        return link_sibling_labels(super().claim(obj, controls, settings), controls, cls.plain_tags)

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Settings) -> set[str] | None:
        """Return the config labels some class of the detector maps to (COCO / VOC / a checkpoint's list)."""
        return tv.known_labels(spec, control, settings, cls.aliases)

    def labels(self) -> Sequence[str]:
        """Return the model's class names (no background / N/A placeholders)."""
        return [c for c in self.categories if c and c != "N/A" and c.casefold() not in tv.BACKGROUND_NAMES]

    def load(self, device: str) -> None:
        """Build the detector with its weights on the device."""
        model, categories, _ = tv.build_model(self.spec, self.settings, self._user_kwargs)
        tv.set_detector_limits(model, self.score_floor, self.max_detections())
        self.model = model.to(device)
        self.categories = categories
        self.device = device

    def max_detections(self) -> int:
        """Return the per-image detection cap: MAX_DETECTIONS when set, else the family's own."""
        return self.settings.max_detections if self.settings.max_detections > 0 else self.detections_per_img

    def _user_kwargs(self, names: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Return builder arguments and vocabulary for a user checkpoint's class list."""
        categories = tv.with_background(names)
        return {"num_classes": len(categories)}, categories

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale the detector's own transform would bring the image to (never above 1)."""
        return tv.detector_input_scale(size, self.model)

    def preprocess(self, item: Item) -> tv.ImageInput:
        """Shrink the image to the size the model works at (never enlarge) and make a uint8 tensor."""
        assert item.image is not None
        size = item.size
        target = tv.scaled_size(size, self.input_scale(size))
        return tv.ImageInput(tv.image_to_tensor(tv.resize_to(item.image, target)), size)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Run the model once on the batch (images may differ in size)."""
        return tv.run_detector(self.model, batch, self.device)

    def category(self, index: int) -> str:
        """Return the model label of a class index ('' when out of range)."""
        return self.categories[index] if 0 <= index < len(self.categories) else ""


class DetectionBackend(TorchvisionDetectorBase):
    """Boxes from a COCO detector, as RectangleLabels or Rectangle (+ linked Labels) regions."""

    family = "detection"
    control_tags = ("RectangleLabels", "Rectangle")
    plain_tags = ("Rectangle",)
    max_batch_size = 8
    priority = 50
    default_model = "fasterrcnn_resnet50_fpn_v2"
    supported_models = (
        "fasterrcnn_resnet50_fpn_v2",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
        "ssdlite320_mobilenet_v3_large",
        "fasterrcnn_mobilenet_v3_large_fpn",
    )

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return DETECTOR when it names one of these detectors, else the family's default."""
        return settings.detector if settings.detector in cls.supported_models else cls.default_model

    # ---- training (backends/_vision_train.py) ----
    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when this detector can be fine-tuned here, else why not (GPU, or TRAIN_ALLOW_CPU)."""
        from backends import _vision_train
        from serving.training.names import training_device

        reason = _vision_train.detector_trainable(spec.name) or cls.availability(spec, settings)
        if reason:
            return f"cannot train: {reason}"
        if not training_device(settings).startswith("cuda") and not settings.train_allow_cpu:
            return (
                "detection trains on a GPU: no CUDA device here (set TRAIN_ALLOW_CPU=true to train on the "
                "CPU anyway; expect hours for a few hundred images)"
            )
        return None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Replace the box predictor for the config's labels and fine-tune (early backbone frozen)."""
        from backends import _vision_train

        backend = cls(run.spec, run.settings)
        return _vision_train.train_detector(run, backend._user_kwargs)

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one rectangle per detection above the tag's threshold whose label the config accepts."""
        det: tv.Detections = output
        decide = tv.RegionLabels(target, self.labels())
        items: list[dict[str, Any]] = []
        for k in range(det.scores.shape[0]):
            score = float(det.scores[k])
            if score < target.threshold:
                continue
            emit, label = decide(self.category(int(det.labels[k])))
            if emit:
                items.extend(regions.rectangle_items(target, det.boxes_xyxy_px[k], det.size, score, label))
        return items
