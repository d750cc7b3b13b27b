"""Image classification (torchvision ImageNet models): Choices on an Image.

Models by `model_name`: resnet50 (default), efficientnet_b0, vit_b_16, or a user checkpoint of
one of them (`model_path`, see backends/_torchvision.py). The softmax probability of every
model class that maps to a config choice is summed into that choice (so "Car" collects
"sports car", "cab", "convertible"...; and for the ImageNet models "Dog", "Cat" and "Bird" collect
their breeds/species). `choice="multiple"` emits every choice whose probability reaches the
threshold; otherwise (single, the Label Studio default) the most probable choice, when it reaches it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _torchvision as tv
from serving.contract import Backend, ControlTag, Item, LabelMap, ModelSpec, Target, TrainingRun, TrainResult
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

# ImageNet-1k index ranges of coarse classes (WordNet hierarchy): the model names breeds, configs say "Dog".
IMAGENET_COARSE: dict[str, tuple[range, ...]] = {
    "dog": (range(151, 269),),
    "cat": (range(281, 286),),
    "bird": (range(7, 25), range(80, 101), range(127, 147)),
}

CLASSIFICATION_ALIASES: tuple[frozenset[str], ...] = (
    *(g for g in tv.VISION_ALIASES if "car" not in g and "airplane" not in g),
    frozenset(
        {
            "car",
            "automobile",
            "sports car",
            "convertible",
            "cab",
            "taxi",
            "jeep",
            "limousine",
            "minivan",
            "racer",
            "race car",
            "beach wagon",
            "station wagon",
            "model t",
        }
    ),
    frozenset({"airplane", "aeroplane", "plane", "aircraft", "airliner", "warplane"}),
)


@dataclass(frozen=True)
class _Mapping:
    """For one label map: config-choice index of every model class (-1 = none) and the choices."""

    choice_of_class: np.ndarray
    choices: tuple[str, ...]


class ClassificationBackend(tv.TorchvisionWeights, Backend):
    """ImageNet classifiers answering Choices on an image."""

    family = "image_classification"
    control_tags = ("Choices",)
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 32
    priority = 60
    default_model = "resnet50"
    aliases = CLASSIFICATION_ALIASES
    supported_models: ClassVar[tuple[str, ...]] = ("resnet50", "efficientnet_b0", "vit_b_16")
    # The weights' own eval transforms (resize shorter side, center crop, interpolation).
    transforms: ClassVar[dict[str, tuple[int, int, str]]] = {
        "resnet50": (232, 224, "bilinear"),
        "efficientnet_b0": (256, 224, "bicubic"),
        "vit_b_16": (256, 224, "bilinear"),
    }
    mean: ClassVar[tuple[float, float, float]] = (0.485, 0.456, 0.406)
    std: ClassVar[tuple[float, float, float]] = (0.229, 0.224, 0.225)

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.categories: list[str] = []
        self.resize_size, self.crop_size, self.interpolation = self.transforms.get(
            spec.name, (256, 224, "bilinear")
        )
        self._mappings: weakref.WeakKeyDictionary[LabelMap, _Mapping] = weakref.WeakKeyDictionary()

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the classifiers served."""
        return cls.supported_models

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Settings) -> set[str] | None:
        """Return the choices some ImageNet class (or a user checkpoint's class, or Dog/Cat/Bird) feeds."""
        coarse = () if spec.path else tuple(IMAGENET_COARSE)
        return tv.known_labels(spec, control, settings, cls.aliases, coarse)

    def labels(self) -> Sequence[str]:
        """Return the class names."""
        return self.categories

    # ---- training (backends/_vision_train.py) ----
    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when this classifier can be fine-tuned here (its weights present), else why not."""
        reason = cls.availability(spec, settings)
        return f"cannot train: {reason}" if reason else None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Replace the last linear layer for the config's choices and fine-tune (early stages frozen)."""
        from backends import _vision_train

        return _vision_train.train_classifier(run, cls)

    def load(self, device: str) -> None:
        """Build the classifier with its weights on the device."""
        model, categories, _ = tv.build_model(self.spec, self.settings)
        self.model = model.to(device)
        self.categories = categories
        self.device = device

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale of the weights' resize of the shorter side."""
        return self.resize_size / min(size)

    def preprocess(self, item: Item) -> Any:
        """Resize the shorter side and center-crop as the weights' transform does; return uint8 CHW."""
        from PIL import Image as PILImage

        assert item.image is not None
        image = item.image.convert("RGB") if item.image.mode != "RGB" else item.image
        width, height = image.size
        scale = self.resize_size / min(width, height)
        size = (max(self.crop_size, round(width * scale)), max(self.crop_size, round(height * scale)))
        resample = (
            PILImage.Resampling.BICUBIC if self.interpolation == "bicubic" else PILImage.Resampling.BILINEAR
        )
        image = image.resize(size, resample)
        left = (size[0] - self.crop_size) // 2
        top = (size[1] - self.crop_size) // 2
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return tv.image_to_tensor(image)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Classify the batch in one call; return each image's class probabilities (numpy)."""
        import torch

        x = torch.stack(tv.to_device_float(batch, self.device))
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        probs = self.model((x - mean) / std).float().softmax(dim=1).cpu().numpy()
        return list(probs)

    def _mapping(self, label_map: LabelMap) -> _Mapping:
        """Return (cached per label map) which config choice each model class feeds."""
        cached = self._mappings.get(label_map)
        if cached is not None:
            return cached
        choices = label_map.config_labels
        index = {c: i for i, c in enumerate(choices)}
        choice_of_class = np.full(len(self.categories), -1, dtype=np.int64)
        for k, name in enumerate(self.categories):
            mapped = label_map(name)
            if mapped is not None and mapped in index:
                choice_of_class[k] = index[mapped]
        if len(self.categories) == 1000 and not self.spec.path:
            for coarse, spans in IMAGENET_COARSE.items():
                mapped = label_map(coarse)
                if mapped is None or mapped not in index:
                    continue
                for span in spans:
                    for k in span:
                        if choice_of_class[k] < 0:
                            choice_of_class[k] = index[mapped]
        result = _Mapping(choice_of_class, tuple(choices))
        self._mappings[label_map] = result
        return result

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Sum class probabilities per config choice; emit the argmax (single) or all above threshold."""
        probs = np.asarray(output, dtype=np.float64)
        mapping = self._mapping(target.label_map)
        if not mapping.choices:
            return []
        fed = mapping.choice_of_class >= 0
        scores = np.bincount(
            mapping.choice_of_class[fed], weights=probs[: fed.shape[0]][fed], minlength=len(mapping.choices)
        )
        if target.option("choice", "single").strip().lower() == "multiple":
            order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= target.threshold]
            if not order:
                return []
            return [
                regions.choices_item(target, [mapping.choices[i] for i in order], float(scores[order[0]]))
            ]
        best = int(np.argmax(scores))
        if not fed.any() or scores[best] < target.threshold:
            return []
        return [regions.choices_item(target, [mapping.choices[best]], float(scores[best]))]
