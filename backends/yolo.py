"""The user's own Ultralytics YOLO checkpoints: boxes, rotated boxes, polygons, masks, keypoints and classes.

Ultralytics is AGPL-3.0: it is an optional extra (`pip install -r requirements-yolo.txt`), imported only
when a YOLO model is asked for, never at server start.

A tag is ours when its `model_path` is an Ultralytics checkpoint (`best.pt`: the file's pickle names
`ultralytics`), or its `model_name` is a YOLO name (`yolo11n`, `yolov8s-seg`, `yolo26n-pose`, ... or
`yolo:<file>`), whose `<name>.pt` is then read from MODEL_DIR (`python -m serving weights download --model
yolo11n` puts it there). What each task fills:

    detect    RectangleLabels / Rectangle
    obb       RectangleLabels / Rectangle with `rotation` (exact: LS rotates about the top-left corner),
              PolygonLabels / Polygon (the four corners)
    segment   PolygonLabels / Polygon (the mask's outline), BrushLabels / Brush (the mask), rectangles
    pose      KeyPointLabels / KeyPoint (points of one object share the id prefix), rectangles
    classify  Choices (top-1, or every class above the threshold with choice="multiple")

The checkpoint's own class names (and keypoint names; COCO's 17 when it has 17 unnamed ones) map to the
config's labels like every family's; classes no tag can emit are left out of the model's NMS. Images
are shrunk on the CPU to the model's size (`imgsz`) and batched in one predictor call.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _torchvision as tv
from backends.detection import link_sibling_labels
from backends.keypoints import COCO_KEYPOINT_NAMES, DEFAULT_POINT_WIDTH_PCT, _keypoint_aliases
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    ModelSpec,
    ObjectTag,
    Target,
    weights_fingerprint,
)
from serving.errors import InputError
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "yolo:"
# yolov8n, yolo11s-seg, yolo26x-pose.pt, yolov5su, yolo12n-obb, yolo11n-cls ...
_NAME = re.compile(r"^yolo(v\d+|\d+)[a-z0-9]*(-(seg|pose|cls|obb))?(\.pt)?$", re.IGNORECASE)
# Ultralytics model classes (as pickled in a checkpoint) -> task
_TASK_CLASSES = (
    (b"OBBModel", "obb"),
    (b"PoseModel", "pose"),
    (b"SegmentationModel", "segment"),
    (b"ClassificationModel", "classify"),
    (b"DetectionModel", "detect"),
)
_SUFFIX_TASK = {"seg": "segment", "pose": "pose", "cls": "classify", "obb": "obb"}
BOX_TAGS = ("RectangleLabels", "Rectangle")
TASK_TAGS: dict[str, tuple[str, ...]] = {
    "detect": BOX_TAGS,
    "obb": (*BOX_TAGS, "PolygonLabels", "Polygon"),
    "segment": (*BOX_TAGS, "PolygonLabels", "Polygon", "BrushLabels", "Brush"),
    "pose": (*BOX_TAGS, "KeyPointLabels", "KeyPoint"),
    "classify": ("Choices",),
}
PLAIN_TAGS = ("Rectangle", "Polygon", "Brush", "KeyPoint")
_sniffed: dict[tuple[str, int, int], str] = {}


def _strip(name: str) -> str:
    name = name.strip()
    return name[len(PREFIX) :].strip() if name.lower().startswith(PREFIX) else name


def is_yolo_name(name: str) -> bool:
    """Return True when a model_name names a YOLO model (yolo11n-style, or yolo:<file>)."""
    name = name.strip()
    return name.lower().startswith(PREFIX) or bool(_NAME.match(name))


def checkpoint_path(name: str, path: str, model_dir: str) -> Path:
    """Return the checkpoint file of (model_name, model_path): model_path, else <name>.pt under MODEL_DIR."""
    if path:
        p = Path(path).expanduser()
    else:
        bare = _strip(name)
        p = Path(bare if bare.lower().endswith(".pt") else f"{bare}.pt").expanduser()
    return p if p.is_absolute() or not model_dir else Path(model_dir) / p


def sniff_task(path: Path) -> str:
    """Return the task of an Ultralytics checkpoint from its pickle ('' when it is not one), without torch.

    torch.save writes a zip whose data.pkl names the classes it holds: Ultralytics' model classes
    under `ultralytics.nn.tasks`. Only that small record is read; cached per (path, size, mtime).
    """
    try:
        stat = path.stat()
    except OSError:
        return ""
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _sniffed:
        return _sniffed[key]
    task = ""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if pickles:
                with archive.open(pickles[0]) as fh:
                    head = fh.read(8 << 20)
                if b"ultralytics" in head:
                    task = next((t for marker, t in _TASK_CLASSES if marker in head), "detect")
    except (OSError, zipfile.BadZipFile, ValueError):
        task = ""
    _sniffed[key] = task
    return task


def task_of(name: str, path: str, model_dir: str) -> str:
    """Return the task a (model_name, model_path) serves: the checkpoint's when local, else the name's suffix."""
    file = checkpoint_path(name, path, model_dir)
    task = sniff_task(file) if file.is_file() else ""
    if task:
        return task
    match = _NAME.match(_strip(name) if name else "")
    if match and match.group(3):
        return _SUFFIX_TASK[match.group(3).lower()]
    return "detect" if match else ""


def yolo_name(name: str, path: str, model_dir: str) -> str | None:
    """Return the model name to serve when (model_name, model_path) picks a YOLO checkpoint, else None."""
    if name and is_yolo_name(name):
        return _strip(name) or None
    if path and not name:
        file = checkpoint_path("", path, model_dir)
        if file.is_file() and sniff_task(file):
            return file.stem
    if path and name.strip().lower() in {"yolo", "ultralytics"}:
        return file_stem(path)
    return None


def file_stem(path: str) -> str:
    """Return a checkpoint path's file name without its suffix."""
    return Path(path).stem


@dataclass
class YoloInput:
    """One image for the predictor: BGR uint8 at (at most) the model's size, and the original size."""

    array: np.ndarray  # (h, w, 3) BGR, as Ultralytics takes numpy images
    size: tuple[int, int]  # original (width, height), as Label Studio shows the image
    floor: float
    max_det: int
    classes: frozenset[int] | None  # classes some target emits; None = all


@dataclass
class YoloOutput:
    """One image's answer on the CPU, in ORIGINAL pixels (whatever the task)."""

    size: tuple[int, int]
    boxes_xyxy_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,)))
    classes: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    obb_xywhr_px: np.ndarray | None = None  # (N, 5)
    polygons_px: list[np.ndarray] | None = None  # per detection (P, 2)
    masks: np.ndarray | None = None  # (N, h, w) bool at the predictor's image size (upsampled on demand)
    keypoints_px: np.ndarray | None = None  # (N, K, 2)
    keypoint_scores: np.ndarray | None = None  # (N, K)
    probs: np.ndarray | None = None  # (C,) classify

    def full_mask(self, index: int) -> np.ndarray:
        """Return detection `index`'s mask at the original size as a uint8 0/255 array."""
        from PIL import Image

        assert self.masks is not None
        mask = Image.fromarray(self.masks[index].astype(np.uint8) * np.uint8(255))
        if mask.size != self.size:
            mask = mask.resize(self.size, Image.Resampling.NEAREST)
        return np.asarray(mask)


class YoloBackend(Backend):
    """An Ultralytics checkpoint (detect, obb, segment, pose or classify) for the tags its task fills."""

    family = "yolo"
    control_tags = tuple(dict.fromkeys(t for tags in TASK_TAGS.values() for t in tags))
    object_tags = ("Image",)
    input_kind = "image"
    # COCO names and, for pose checkpoints, COCO keypoint names ("Left Eye" is left_eye)
    aliases = (*tv.VISION_ALIASES, *_keypoint_aliases(COCO_KEYPOINT_NAMES))
    max_batch_size = 16
    # Only tags that name a YOLO model: before every other image family but SAM's smart tags and OCR.
    priority = 20
    fp16 = True
    default_model = ""
    default_threshold = 0.25  # Ultralytics' own default confidence
    nms_iou: ClassVar[float] = 0.7
    detections_per_img: ClassVar[int] = 100

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return example names (any yolo*-style name or Ultralytics checkpoint works)."""
        return ("yolo11n", "yolo11n-seg", "yolo11n-pose", "yolo11n-obb", "yolo11n-cls")

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True when a model_name names a YOLO model."""
        return is_yolo_name(name)

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim the tags a named YOLO checkpoint's task fills (or DETECTOR's, for rectangle tags naming none)."""
        if obj.tag not in cls.object_tags:
            return []
        claims = []
        for control in controls:
            if control.tag not in cls.control_tags:
                continue
            name, path = control.attr("model_name"), control.attr("model_path")
            if not name and not path and control.tag in BOX_TAGS and is_yolo_name(settings.detector):
                name = settings.detector
            chosen = yolo_name(name, path, settings.model_dir)
            if chosen is None:
                continue
            task = task_of(name or chosen, path, settings.model_dir)
            if control.tag not in TASK_TAGS.get(task, ()):
                log.warning(
                    '<%s name="%s"> names %s, a %s model, which fills %s: left to other families',
                    control.tag,
                    control.name,
                    chosen,
                    task or "unknown",
                    ", ".join(TASK_TAGS.get(task, ())),
                )
                continue
            claims.append(Claim(control=control, model_name=chosen, model_path=path))
        return link_sibling_labels(claims, controls, PLAIN_TAGS)

    # ---- weights ----
    @classmethod
    def _file(cls, spec: ModelSpec, settings: Settings) -> Path:
        return checkpoint_path(spec.name, spec.path, settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint is there and Ultralytics is installed, else how to fix it."""
        if importlib.util.find_spec("ultralytics") is None:
            return (
                "Ultralytics is not installed (it is AGPL-3.0, an optional extra): `make setup-yolo`, or "
                "pip install -r requirements-yolo-deps.txt && pip install --no-deps -r requirements-yolo.txt"
            )
        file = cls._file(spec, settings)
        if not file.is_file():
            if spec.path:
                return f"model_path {file} does not exist (an Ultralytics checkpoint such as best.pt)"
            return (
                f"{file} is missing: run `python -m serving weights download --model {spec.name}` where "
                "internet exists, or set model_path to your checkpoint"
            )
        if not sniff_task(file):
            return f"{file} is not an Ultralytics checkpoint (a .pt saved by Ultralytics training)"
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of the checkpoint file's content."""
        file = cls._file(spec, settings)
        return f"{spec.name}@{file.name}:{weights_fingerprint(file)}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return the YOLO checkpoints in MODEL_DIR."""
        folder = Path(settings.model_dir)
        files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
        return [tv.WeightStatus(f.stem, str(f), True) for f in files if sniff_task(f)]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch named Ultralytics release checkpoints (yolo11n.pt...) into MODEL_DIR; none by default."""
        if not models:
            return []
        from ultralytics.utils.downloads import attempt_download_asset

        written = []
        for name in models:
            file = checkpoint_path(name, "", settings.model_dir)
            file.parent.mkdir(parents=True, exist_ok=True)
            if not file.is_file():
                attempt_download_asset(str(file))
            written.append(str(file))
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.task = ""
        self.names: list[str] = []
        self.keypoint_names: list[str] = []
        self.imgsz = 640

    def load(self, device: str) -> None:
        """Load the checkpoint with Ultralytics (imported here only) and read its task, names and size."""
        reason = self.availability(self.spec, self.settings)
        if reason:
            raise RuntimeError(reason)
        from ultralytics import YOLO

        file = self._file(self.spec, self.settings)
        model = YOLO(str(file), task=sniff_task(file) or None)
        model.to(device)
        self.task = str(model.task)
        raw_names = model.names
        count = max(raw_names) + 1 if raw_names else 0
        self.names = [str(raw_names.get(i, "")) for i in range(count)]
        inner = model.model
        args = getattr(inner, "args", {}) or {}
        imgsz = args.get("imgsz", 640) if isinstance(args, dict) else 640
        self.imgsz = int(max(imgsz) if isinstance(imgsz, (list, tuple)) else imgsz)
        shape = getattr(inner, "kpt_shape", None)
        if shape:
            named = getattr(inner, "kpt_names", None)
            points = list(named.get(0, [])) if isinstance(named, dict) else []
            unnamed = not points or all(str(p).isdigit() for p in points)
            if unnamed:
                points = (
                    list(COCO_KEYPOINT_NAMES) if int(shape[0]) == 17 else [str(i) for i in range(shape[0])]
                )
            self.keypoint_names = [str(p) for p in points]
        self.model = model
        self.device = device
        log.info(
            "YOLO %s (%s, %d classes, imgsz %d) loaded on %s", file, self.task, count, self.imgsz, device
        )

    def labels(self) -> Sequence[str]:
        """Return the checkpoint's class names."""
        return [n for n in self.names if n]

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale that brings the longer side to the model's size (never above 1)."""
        return min(1.0, self.imgsz / max(size))

    def max_det_of(self, target: Target) -> int:
        """Return a target's cap: its max_det attribute, else MAX_DETECTIONS, else 100."""
        default = (
            self.settings.max_detections if self.settings.max_detections > 0 else self.detections_per_img
        )
        value = int(tv.float_option(target, "max_det", float(default)))
        return value if value > 0 else default

    def wanted_classes(self, targets: Sequence[Target]) -> frozenset[int] | None:
        """Return the classes some box/mask target emits (None = all), so NMS never sees the others."""
        if self.task in ("classify", "pose") or not targets:
            return None  # class probabilities are summed per choice; pose labels are keypoint names
        wanted: set[int] = set()
        for target in targets:
            decide = tv.RegionLabels(target, self.labels())
            wanted.update(i for i, n in enumerate(self.names) if n and decide(n)[0])
        return frozenset(wanted)

    def preprocess(self, item: Item) -> YoloInput:
        """Shrink to the model's size (never enlarge) as a BGR array, with the item's limits and classes."""
        if item.image is None:
            raise InputError(f'task has no image for <{item.obj.tag} name="{item.obj.name}">')
        size = item.size
        image = tv.resize_to(item.image, tv.scaled_size(size, self.input_scale(size)))
        rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        targets = list(item.targets)
        floor = min((t.threshold for t in targets), default=self.default_threshold)
        max_det = max((self.max_det_of(t) for t in targets), default=self.detections_per_img)
        return YoloInput(
            np.ascontiguousarray(rgb[..., ::-1]),
            size,
            max(floor, 1e-4),
            max_det,
            self.wanted_classes(targets),
        )

    def predict_raw(self, inputs: Sequence[YoloInput]) -> list[Any]:
        """Run Ultralytics' predictor once on the batch; return its Results, one per input."""
        classes: set[int] | None = set()
        for x in inputs:
            if x.classes is None or classes is None:
                classes = None
            else:
                classes |= x.classes
        kwargs: dict[str, Any] = {
            "imgsz": self.imgsz,
            "conf": min(x.floor for x in inputs),
            "iou": self.nms_iou,
            "max_det": max(x.max_det for x in inputs),
            "verbose": False,
            "device": self.device,
            "quantize": 16 if str(self.device).startswith("cuda") else None,  # fp16 on the GPU
            "retina_masks": True,  # masks at the (shrunk) input image's size, not the letterboxed one
            "batch": len(inputs),
        }
        if classes is not None:
            if not classes:
                return [None] * len(inputs)  # no tag can emit any class of this model
            kwargs["classes"] = sorted(classes)
        return list(self.model.predict([x.array for x in inputs], **kwargs))

    def forward(self, batch: list[Any]) -> list[Any]:
        """Predict the batch in one call; return each image's answer in original pixels."""
        inputs: list[YoloInput] = batch
        results = self.predict_raw(inputs)
        return [_to_output(r, x) for r, x in zip(results, inputs, strict=True)]

    # ---- output ----
    def category(self, index: int) -> str:
        """Return the model label of a class index ('' when out of range)."""
        return self.names[index] if 0 <= index < len(self.names) else ""

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn one image's answer into the items of one tag, by the tag's kind."""
        out: YoloOutput = output
        tag = target.control.tag
        if tag == "Choices":
            return self._choices(out, target)
        if tag in ("KeyPointLabels", "KeyPoint"):
            return self._keypoints(out, target)
        decide = tv.RegionLabels(target, self.labels())
        limit = self.max_det_of(target)
        items: list[dict[str, Any]] = []
        emitted = 0
        for k in np.argsort(-out.scores, kind="stable"):
            score = float(out.scores[k])
            if score < target.threshold or emitted >= limit:
                continue
            emit, label = decide(self.category(int(out.classes[k])))
            if not emit:
                continue
            found = self._region(out, int(k), target, score, label)
            if found:
                emitted += 1
                items.extend(found)
        return items

    def _region(
        self, out: YoloOutput, k: int, target: Target, score: float, label: str | None
    ) -> list[dict[str, Any]]:
        tag = target.control.tag
        if tag in BOX_TAGS:
            if out.obb_xywhr_px is not None:
                return regions.rotated_box_items(target, out.obb_xywhr_px[k], out.size, score, label)
            return regions.rectangle_items(target, out.boxes_xyxy_px[k], out.size, score, label)
        if tag in ("PolygonLabels", "Polygon"):
            if out.obb_xywhr_px is not None:
                corners = regions.rotated_box_corners_px(*(float(v) for v in out.obb_xywhr_px[k]))
                return regions.polygon_items(target, corners, out.size, score, label)
            if out.polygons_px is None or len(out.polygons_px[k]) < 3:
                return []
            return regions.polygon_items(target, out.polygons_px[k], out.size, score, label)
        if tag in ("BrushLabels", "Brush") and out.masks is not None:
            mask = out.full_mask(k)
            return regions.brush_items(target, mask, score, label) if mask.any() else []
        return []

    def _keypoints(self, out: YoloOutput, target: Target) -> list[dict[str, Any]]:
        if out.keypoints_px is None:
            return []
        decide = tv.RegionLabels(target, self.keypoint_names)
        decisions = [decide(name) for name in self.keypoint_names]
        point_threshold = tv.float_option(target, "model_point_threshold", 0.0)
        point_px = tv.float_option(target, "model_point_size", 0.0)
        width_pct = point_px / out.size[0] * 100.0 if point_px > 0 else DEFAULT_POINT_WIDTH_PCT
        limit = self.max_det_of(target)
        items: list[dict[str, Any]] = []
        for n, k in enumerate(np.argsort(-out.scores, kind="stable")):
            score = float(out.scores[k])
            if score < target.threshold or n >= limit:
                continue
            object_id = regions.new_id()
            for j, (emit, label) in enumerate(decisions):
                if not emit or j >= out.keypoints_px.shape[1]:
                    continue
                if out.keypoint_scores is not None and out.keypoint_scores[k, j] < point_threshold:
                    continue
                items.extend(
                    regions.keypoint_items(
                        target,
                        out.keypoints_px[k, j],
                        out.size,
                        score,
                        label,
                        width_pct=width_pct,
                        region_id=f"{object_id}-{self.keypoint_names[j]}",
                    )
                )
        return items

    def _choices(self, out: YoloOutput, target: Target) -> list[dict[str, Any]]:
        if out.probs is None:
            return []
        choices = target.label_map.config_labels
        index = {c: i for i, c in enumerate(choices)}
        scores = np.zeros(len(choices))
        for k, name in enumerate(self.names):
            mapped = target.label_map(name) if name else None
            if mapped is not None and mapped in index and k < out.probs.shape[0]:
                scores[index[mapped]] += float(out.probs[k])
        if not choices:
            return []
        if target.option("choice", "single").strip().lower() == "multiple":
            order = [
                int(i)
                for i in np.argsort(-scores, kind="stable")
                if scores[i] >= target.threshold and scores[i] > 0
            ]
            if not order:
                return []
            return [regions.choices_item(target, [choices[i] for i in order], float(scores[order[0]]))]
        best = int(np.argmax(scores))
        if scores[best] <= 0 or scores[best] < target.threshold:
            return []
        return [regions.choices_item(target, [choices[best]], float(scores[best]))]


def _to_output(result: Any, x: YoloInput) -> YoloOutput:
    """Copy one Ultralytics Results to the CPU in original pixels (the predictor saw x.array)."""
    out = YoloOutput(size=x.size)
    if result is None:
        return out
    height, width = x.array.shape[:2]
    sx, sy = x.size[0] / width, x.size[1] / height
    scale = np.array([sx, sy, sx, sy])
    if result.probs is not None:
        out.probs = result.probs.data.float().cpu().numpy().astype(np.float64)
        return out
    if result.obb is not None:
        obb = result.obb
        xywhr = obb.xywhr.float().cpu().numpy().astype(np.float64)
        # a rotated box scales exactly only when both axes scale alike (the predictor's image keeps the ratio)
        xywhr[:, :4] *= np.array([sx, sy, (sx + sy) / 2, (sx + sy) / 2])
        out.obb_xywhr_px = xywhr
        out.boxes_xyxy_px = obb.xyxy.float().cpu().numpy().astype(np.float64) * scale
        out.scores = obb.conf.float().cpu().numpy().astype(np.float64)
        out.classes = obb.cls.cpu().numpy().astype(np.int64)
        return out
    boxes = result.boxes
    if boxes is None:
        return out
    out.boxes_xyxy_px = boxes.xyxy.float().cpu().numpy().astype(np.float64) * scale
    out.scores = boxes.conf.float().cpu().numpy().astype(np.float64)
    out.classes = boxes.cls.cpu().numpy().astype(np.int64)
    if result.masks is not None:
        out.polygons_px = [np.asarray(p, dtype=np.float64) * scale[:2] for p in result.masks.xy]
        out.masks = (result.masks.data > 0.5).cpu().numpy()
    if result.keypoints is not None:
        kp = result.keypoints
        out.keypoints_px = kp.xy.float().cpu().numpy().astype(np.float64) * scale[:2]
        out.keypoint_scores = (
            kp.conf.float().cpu().numpy().astype(np.float64) if kp.conf is not None else None
        )
    return out
