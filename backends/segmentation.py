"""Instance segmentation (Mask R-CNN) and semantic segmentation (DeepLabV3 / FCN) on images.

Instance (family "instance_segmentation", model maskrcnn_resnet50_fpn_v2) fills
- BrushLabels / Brush: one RLE mask per object, at the ORIGINAL image resolution;
- PolygonLabels / Polygon: the object's largest outer contour (through boundary pixel centers),
  simplified with Douglas-Peucker to `model_polygon_tolerance` pixels (default 1.0, 0 = no simplification);
- EllipseLabels / Ellipse: the ellipse with the mask's area moments (center, radii, rotation).

Semantic (family "semantic_segmentation": deeplabv3_resnet50, deeplabv3_mobilenet_v3_large, fcn_resnet50)
fills BrushLabels / Brush with one region per class present. A brush tag is routed by its
`model_name`: a semantic model name picks semantic segmentation, anything else (or none) instance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _torchvision as tv
from backends.detection import TorchvisionDetectorBase, link_sibling_labels
from serving.contract import Backend, Claim, ControlTag, Item, ModelSpec, ObjectTag, Target
from serving.results import regions
from serving.results.rle import crops_to_rle

if TYPE_CHECKING:
    import torch

    from serving.settings import Settings

log = logging.getLogger(__name__)

BRUSH_TAGS = ("BrushLabels", "Brush")
POLYGON_TAGS = ("PolygonLabels", "Polygon")
ELLIPSE_TAGS = ("EllipseLabels", "Ellipse")
DEFAULT_POLYGON_TOLERANCE_PX = 1.0


def mask_polygon_px(crop: np.ndarray, offset_xy: tuple[int, int], tolerance_px: float) -> np.ndarray | None:
    """Return the largest outer contour of a boolean mask crop as (K, 2) pixel points, or None (< 3 points).

    Points are pixel centers (x + 0.5, y + 0.5) in the full image, simplified to `tolerance_px`.
    """
    import cv2

    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    if tolerance_px > 0:
        contour = cv2.approxPolyDP(contour, float(tolerance_px), True)
    points = contour.reshape(-1, 2).astype(np.float64)
    if points.shape[0] < 3:
        return None
    return points + np.array([offset_xy[0] + 0.5, offset_xy[1] + 0.5])


def mask_ellipse_px(
    crop: np.ndarray, offset_xy: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float], float] | None:
    """Return ((cx, cy), (rx, ry), rotation degrees clockwise) of the ellipse with the mask's moments.

    A filled ellipse of radii a, b has variances a^2/4 and b^2/4 along its axes, so the radii are
    2*sqrt(eigenvalues) of the pixel covariance (plus 1/12 for the pixels' own extent). The axis
    nearest to horizontal becomes radiusX, so axis-aligned shapes get rotation 0.
    """
    import cv2

    m = cv2.moments(crop.astype(np.uint8), binaryImage=True)
    area = m["m00"]
    if area <= 0:
        return None
    cx = offset_xy[0] + m["m10"] / area + 0.5
    cy = offset_xy[1] + m["m01"] / area + 0.5
    a = m["mu20"] / area + 1.0 / 12.0
    b = m["mu11"] / area
    c = m["mu02"] / area + 1.0 / 12.0
    half_diff = (a - c) / 2.0
    root = math.hypot(half_diff, b)
    lam1 = (a + c) / 2.0 + root
    lam2 = max((a + c) / 2.0 - root, 0.0)
    theta = 0.5 * math.atan2(2.0 * b, a - c)  # direction of the major axis, y down = clockwise
    rx, ry = 2.0 * math.sqrt(lam1), 2.0 * math.sqrt(lam2)
    if abs(theta) > math.pi / 4:
        rx, ry = ry, rx
        theta -= math.copysign(math.pi / 2, theta)
    return (cx, cy), (rx, ry), math.degrees(theta)


class InstanceSegmentationBackend(TorchvisionDetectorBase):
    """Mask R-CNN objects as brush masks, polygons or ellipses."""

    family = "instance_segmentation"
    control_tags = (*BRUSH_TAGS, *POLYGON_TAGS, *ELLIPSE_TAGS)
    plain_tags = ("Brush", "Polygon", "Ellipse")
    max_batch_size = 4
    priority = 40
    default_model = "maskrcnn_resnet50_fpn_v2"
    supported_models = ("maskrcnn_resnet50_fpn_v2",)

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn each object above the threshold into the tag's geometry, at the original resolution."""
        det: tv.Detections = output
        decide = tv.RegionLabels(target, self.labels())
        tag = target.control.tag
        tolerance = tv.float_option(target, "model_polygon_tolerance", DEFAULT_POLYGON_TOLERANCE_PX)
        items: list[dict[str, Any]] = []
        brushes: list[tuple[np.ndarray, tuple[int, int], float, str | None]] = []
        for k in range(det.scores.shape[0]):
            score = float(det.scores[k])
            if score < target.threshold or det.masks is None or det.masks[k] is None:
                continue
            emit, label = decide(self.category(int(det.labels[k])))
            if not emit:
                continue
            x0, y0, crop = det.masks[k]  # type: ignore[misc]
            if tag in BRUSH_TAGS:
                brushes.append((crop, (x0, y0), score, label))
            elif tag in POLYGON_TAGS:
                points = mask_polygon_px(crop, (x0, y0), tolerance)
                if points is not None:
                    items.extend(regions.polygon_items(target, points, det.size, score, label))
            elif tag in ELLIPSE_TAGS:
                fitted = mask_ellipse_px(crop, (x0, y0))
                if fitted is not None:
                    center, radii, rotation = fitted
                    items.extend(
                        regions.ellipse_items(target, center, radii, rotation, det.size, score, label)
                    )
        # Encoded from the crops, all masks of the image in one pass: the same bytes as each
        # full-size mask's RLE, without building the full masks.
        rles = crops_to_rle([(crop, offset) for crop, offset, _, _ in brushes], det.size)
        for (_, _, score, label), rle in zip(brushes, rles, strict=True):
            geometry = {"format": "rle", "rle": rle}
            items.extend(regions.geometry_items(target, geometry, det.size, score, label))
        return items


@dataclass
class SemanticInput:
    """One preprocessed image for a semantic model: uint8 CHW tensor at the model's scale + original size."""

    tensor: torch.Tensor
    size: tuple[int, int]  # original (width, height)


@dataclass
class SemanticOutput:
    """Per-pixel classes at the original resolution and, per class present, its mean confidence."""

    class_map: np.ndarray  # (height, width) uint8/int class indices
    class_scores: dict[int, float]


class SemanticSegmentationBackend(tv.TorchvisionWeights, Backend):
    """DeepLabV3 / FCN (Pascal VOC classes): one BrushLabels region per class present."""

    family = "semantic_segmentation"
    control_tags = BRUSH_TAGS
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 4
    priority = 40
    default_model = "deeplabv3_resnet50"
    aliases = tv.VISION_ALIASES
    supported_models: ClassVar[tuple[str, ...]] = (
        "deeplabv3_resnet50",
        "deeplabv3_mobilenet_v3_large",
        "fcn_resnet50",
    )
    # The weights' own transform: shorter side to 520, ImageNet mean/std.
    resize_size: ClassVar[int] = 520
    mean: ClassVar[tuple[float, float, float]] = (0.485, 0.456, 0.406)
    std: ClassVar[tuple[float, float, float]] = (0.229, 0.224, 0.225)

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.categories: list[str] = []
        self.short_side = self.resize_size

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the semantic models served."""
        return cls.supported_models

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim brush tags only when their model_name names a semantic model (instance is the default)."""
        if obj.tag not in cls.object_tags:
            return []
        claims = [
            Claim(control=c, model_name=c.attr("model_name"), model_path=c.attr("model_path"))
            for c in controls
            if c.tag in cls.control_tags and c.attr("model_name") in cls.supported_models
        ]
        return link_sibling_labels(claims, controls, ("Brush",))

    def labels(self) -> Sequence[str]:
        """Return the class names (background excluded)."""
        return [c for c in self.categories if c.casefold() not in tv.BACKGROUND_NAMES]

    def load(self, device: str) -> None:
        """Build the model with its weights on the device."""
        # A user checkpoint trained with aux_loss carries an auxiliary head that inference never runs.
        model, categories, _ = tv.build_model(
            self.spec, self.settings, self._user_kwargs, ignore_prefixes=("aux_classifier.",)
        )
        self.model = model.to(device)
        self.categories = categories
        self.device = device

    @staticmethod
    def _user_kwargs(names: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Return builder arguments for a user checkpoint: every output class, in order."""
        return {"num_classes": len(names)}, names

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale that brings the shorter side to the model's (may enlarge)."""
        return self.short_side / min(size)

    def preprocess(self, item: Item) -> SemanticInput:
        """Resize the shorter side to the model's scale (as the weights' transform does) as uint8."""
        from PIL import Image as PILImage

        assert item.image is not None
        width, height = item.size
        scale = self.input_scale(item.size)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = (
            item.image if size == item.image.size else item.image.resize(size, PILImage.Resampling.BILINEAR)
        )
        return SemanticInput(tv.image_to_tensor(image), item.size)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Run the model once on the padded batch; upsample each image's logits to its original size."""
        import torch
        import torch.nn.functional as F

        images = tv.to_device_float([inp.tensor for inp in batch], self.device)
        mean = torch.tensor(self.mean, device=self.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(3, 1, 1)
        max_h = max(x.shape[1] for x in images)
        max_w = max(x.shape[2] for x in images)
        # Pad after normalising: the padding is the mean colour, and is cropped away below.
        stacked = torch.zeros((len(images), 3, max_h, max_w), device=self.device)
        for i, x in enumerate(images):
            stacked[i, :, : x.shape[1], : x.shape[2]] = (x - mean) / std
        logits = self.model(stacked)["out"]
        outputs = []
        for i, (inp, x) in enumerate(zip(batch, images, strict=True)):
            out = logits[i, :, : x.shape[1], : x.shape[2]].float()
            outputs.append(self._to_original(out, inp.size, F))
        return outputs

    @staticmethod
    def _to_original(logits: torch.Tensor, size: tuple[int, int], F: Any) -> SemanticOutput:
        """Return classes at the original size: upsample only the logits of classes present (on device)."""
        import torch

        num_classes = logits.shape[0]
        probs = logits.softmax(dim=0)
        conf, cls = probs.max(dim=0)
        flat_cls = cls.flatten()
        sums = torch.zeros(num_classes, device=logits.device).index_add_(0, flat_cls, conf.flatten())
        counts = torch.bincount(flat_cls, minlength=num_classes)
        present = torch.nonzero(counts > 0).flatten()
        width, height = size
        if present.numel() == 1:
            class_map = present.to(torch.uint8).expand(height, width)
        else:
            up = F.interpolate(
                logits[present][None], size=(height, width), mode="bilinear", align_corners=False
            )
            class_map = present[up[0].argmax(dim=0)].to(torch.uint8 if num_classes <= 256 else torch.int32)
        means = (sums[present] / counts[present]).cpu().numpy()
        return SemanticOutput(
            class_map=class_map.contiguous().cpu().numpy(),
            class_scores={int(c): float(s) for c, s in zip(present.cpu().numpy(), means, strict=True)},
        )

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one brush region per class present whose mean confidence reaches the threshold."""
        seg: SemanticOutput = output
        decide = tv.RegionLabels(target, self.labels())
        brushes: list[tuple[np.ndarray, tuple[int, int], float, str | None]] = []
        for cls_index, score in sorted(seg.class_scores.items()):
            name = self.categories[cls_index] if cls_index < len(self.categories) else ""
            if not name or name.casefold() in tv.BACKGROUND_NAMES or score < target.threshold:
                continue
            emit, label = decide(name)
            if not emit:
                continue
            mask = seg.class_map == cls_index
            rows = np.flatnonzero(mask.any(axis=1))
            if rows.size == 0:
                continue
            # Encoded from the class's bounding box: the RLE scan then skips the rows and columns
            # the class is absent from, and all classes of the image are packed in one pass.
            band = mask[rows[0] : rows[-1] + 1]
            cols = np.flatnonzero(band.any(axis=0))
            brushes.append((band[:, cols[0] : cols[-1] + 1], (int(cols[0]), int(rows[0])), score, label))
        height, width = seg.class_map.shape
        rles = crops_to_rle([(crop, offset) for crop, offset, _, _ in brushes], (width, height))
        items: list[dict[str, Any]] = []
        for (_, _, score, label), rle in zip(brushes, rles, strict=True):
            geometry = {"format": "rle", "rle": rle}
            items.extend(regions.geometry_items(target, geometry, (width, height), score, label))
        return items
