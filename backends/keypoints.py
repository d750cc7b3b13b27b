"""Human keypoints (Keypoint R-CNN R50-FPN, COCO): KeyPointLabels, and KeyPoint with a linked Labels tag.

The model vocabulary is the 17 COCO keypoint names (nose, left_eye, ... right_ankle; "left eye",
"Left-Eye" and "lefteye" match too). Each detected person above the tag's threshold gives its
keypoints whose raw heatmap score reaches `model_point_threshold` (default 0.0); every keypoint
carries the person's score. Points of one person are linked through their region ids:
`<person id>-<keypoint name>` (the person id is shared by the 17 points, e.g. "3fa2c0d1e9-left_eye").
`model_point_size` sets the point width in pixels (default: 0.5% of the image width).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from backends import _torchvision as tv
from backends.detection import TorchvisionDetectorBase
from serving.contract import ControlTag, Item, ModelSpec, Target
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

COCO_KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
DEFAULT_POINT_WIDTH_PCT = 0.5


def _keypoint_aliases(names: Sequence[str]) -> tuple[frozenset[str], ...]:
    """Return one alias group per keypoint name: with spaces, hyphens, or nothing for underscores."""
    return tuple(frozenset({n, n.replace("_", " "), n.replace("_", "-"), n.replace("_", "")}) for n in names)


class KeypointsBackend(TorchvisionDetectorBase):
    """Person keypoints as KeyPointLabels / KeyPoint regions, linked per person by id."""

    family = "keypoints"
    control_tags = ("KeyPointLabels", "KeyPoint")
    plain_tags = ("KeyPoint",)
    max_batch_size = 4
    priority = 40
    default_model = "keypointrcnn_resnet50_fpn"
    supported_models = ("keypointrcnn_resnet50_fpn",)
    aliases = (*tv.VISION_ALIASES, *_keypoint_aliases(COCO_KEYPOINT_NAMES))

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Settings) -> set[str] | None:
        """Return None: keypoint labels name body parts, not classes, so no label is routed elsewhere."""
        return None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(*args, **kwargs)
        self.keypoint_names: list[str] = list(COCO_KEYPOINT_NAMES)

    def load(self, device: str) -> None:
        """Build Keypoint R-CNN with its weights on the device."""
        model, vocabulary, meta = tv.build_model(self.spec, self.settings, self._user_kwargs)
        tv.set_detector_limits(model, self.score_floor, self.max_detections())
        self.model = model.to(device)
        self.device = device
        if self.spec.path:
            self.categories = ["__background__", "person"]
            self.keypoint_names = vocabulary
        else:
            self.categories = vocabulary
            self.keypoint_names = list(meta.get("keypoint_names") or COCO_KEYPOINT_NAMES)

    def _user_kwargs(self, names: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Return builder arguments for a user checkpoint, whose class list names its keypoints."""
        return {"num_classes": 2, "num_keypoints": len(names)}, names

    def labels(self) -> Sequence[str]:
        """Return the keypoint names (the vocabulary labels map from)."""
        return self.keypoint_names

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the keypoints of every person above the threshold, ids shared per person."""
        det: tv.Detections = output
        if det.keypoints_px is None or det.keypoint_scores is None:
            return []
        decide = tv.RegionLabels(target, self.keypoint_names)
        point_threshold = tv.float_option(target, "model_point_threshold", 0.0)
        point_px = tv.float_option(target, "model_point_size", 0.0)
        width_pct = point_px / det.size[0] * 100.0 if point_px > 0 else DEFAULT_POINT_WIDTH_PCT
        # One decision per keypoint name, not per person.
        decisions = [decide(name) for name in self.keypoint_names]
        items: list[dict[str, Any]] = []
        for k in range(det.scores.shape[0]):
            score = float(det.scores[k])
            if score < target.threshold:
                continue
            person_id = regions.new_id()
            points = det.keypoints_px[k]
            point_scores = det.keypoint_scores[k]
            for j, (emit, label) in enumerate(decisions):
                if not emit or j >= points.shape[0] or point_scores[j] < point_threshold:
                    continue
                items.extend(
                    regions.keypoint_items(
                        target,
                        points[j],
                        det.size,
                        score,
                        label,
                        width_pct=width_pct,
                        region_id=f"{person_id}-{self.keypoint_names[j]}",
                    )
                )
        return items
