"""Real-time DETR detectors through transformers: RT-DETR(v2), D-FINE, DEIMv2 and RF-DETR boxes.

Claims `RectangleLabels` / `Rectangle` (+ its sibling `Labels`) on an `Image` when the tag's `model_name`
is one of the short names below, a Hugging Face id of such a model, or a save_pretrained() folder (by name
or `model_path`) whose config.json says rt_detr, rt_detr_v2, d_fine, deimv2 or rf_detr. A tag that names
no model is ours when DETECTOR names one of these, or else when the default (`dfine_l`) is in the cache:
it is more accurate than torchvision's Faster R-CNN v2 at a fraction of the cost (docs/BENCHMARKS.md);
without its weights the torchvision detection family keeps those tags, as before.

The checkpoint's class names (config.id2label, COCO for the published weights) map to the config's labels
like the torchvision detector's (aliases, predicted_values). One batched post-processing per model call:
scores of classes no target of the batch can emit are zeroed before the top-k (fewer boxes to carry), then
the top `max_det` (query, class) pairs above the lowest threshold of the batch are kept, on the device.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _hf as hf
from backends import _torchvision as tv
from backends.detection import link_sibling_labels
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    LabelMap,
    ModelSpec,
    ObjectTag,
    Target,
    TrainingRun,
    TrainResult,
    weights_fingerprint,
)
from serving.errors import InputError
from serving.results import regions

if TYPE_CHECKING:
    import torch

    from serving.settings import Settings

log = logging.getLogger(__name__)

# transformers model_type of the checkpoints this family runs (all: sigmoid class scores per query)
MODEL_TYPES = ("rt_detr", "rt_detr_v2", "d_fine", "deimv2", "rf_detr")
# A model_name may say explicitly that it is ours: rt_detr:<id or folder>.
PREFIX = "rt_detr:"
# Hugging Face ids we take for these models before their files are fetched.
_ID_HINTS = ("rtdetr", "rt-detr", "rt_detr", "dfine", "d-fine", "d_fine", "deimv2", "rf-detr", "rf_detr")
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


@dataclass(frozen=True)
class KnownModel:
    """A model users can name by a short name: its Hugging Face id and what it is."""

    name: str
    repo: str
    what: str


KNOWN: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel("rtdetr_v2_r18", "PekingU/rtdetr_v2_r18vd", "RT-DETRv2 R18 (COCO 47.9 AP)"),
        KnownModel("rtdetr_v2_r50", "PekingU/rtdetr_v2_r50vd", "RT-DETRv2 R50 (COCO 53.4 AP)"),
        KnownModel("rtdetr_v2_r101", "PekingU/rtdetr_v2_r101vd", "RT-DETRv2 R101 (COCO 54.3 AP)"),
        KnownModel("dfine_n", "ustc-community/dfine-nano-coco", "D-FINE N (COCO 42.8 AP)"),
        KnownModel("dfine_s", "ustc-community/dfine-small-coco", "D-FINE S (COCO 48.5 AP)"),
        KnownModel("dfine_m", "ustc-community/dfine-medium-coco", "D-FINE M (COCO 52.3 AP)"),
        KnownModel("dfine_l", "ustc-community/dfine-large-coco", "D-FINE L (COCO 54.0 AP)"),
        KnownModel("dfine_x", "ustc-community/dfine-xlarge-coco", "D-FINE X (COCO 55.8 AP)"),
        KnownModel(
            "deimv2_n", "harshaljanjani/DEIMv2_HGNetv2_N_COCO_Transformers", "DEIMv2 HGNetv2-N (COCO 43.0 AP)"
        ),
        KnownModel("rf_detr_base", "Roboflow/rf-detr-base", "RF-DETR base (COCO 53.3 AP)"),
    )
}
DEFAULT_MODEL = "dfine_l"
# What `python -m serving weights download` fetches with no --model (and makes the default detector).
DEFAULT_DOWNLOADS = (DEFAULT_MODEL,)


# ---- names and folders (cheap: no torch, no transformers) ----


def _strip(name: str) -> str:
    name = name.strip()
    return name[len(PREFIX) :].strip() if name.lower().startswith(PREFIX) else name


def source_of(name: str, path: str, model_dir: str) -> str:
    """Return what from_pretrained loads: the model_path folder, a short name's Hugging Face id, or the name."""
    if path:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() or not model_dir else Path(model_dir) / p)
    bare = _strip(name)
    known = KNOWN.get(bare.lower())
    return known.repo if known else bare


def model_type(folder: Path) -> str:
    """Return the transformers model_type of a checkpoint folder ('' when unreadable)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("model_type", "")) if isinstance(data, dict) else ""


def rt_detr_name(name: str, path: str = "", model_dir: str = "") -> str | None:
    """Return the model name to serve when (model_name, model_path) picks a real-time DETR, else None."""
    name = name.strip()
    if name:
        bare = _strip(name)
        if name.lower().startswith(PREFIX):
            return bare or None
        if bare.lower() in KNOWN:
            return bare.lower()
        if any(bare.lower() == m.repo.lower() for m in KNOWN.values()):
            return bare
        folder = hf.checkpoint_folder(source_of(bare, path, model_dir), model_dir)
        if folder is not None and model_type(folder) in MODEL_TYPES:
            return bare
        if "/" in bare and not path and any(hint in bare.lower() for hint in _ID_HINTS):
            return bare
        return None
    if path:
        folder = hf.checkpoint_folder(source_of("", path, model_dir), model_dir)
        kind = model_type(folder) if folder is not None else ""
        return kind if kind in MODEL_TYPES else None
    return None


def default_present(model_dir: str = "") -> bool:
    """Return True when the default model's checkpoint is local (it then answers tags that name no model)."""
    folder = hf.checkpoint_folder(KNOWN[DEFAULT_MODEL].repo, model_dir)
    return folder is not None and hf.weights_file(folder) is not None


# ---- batched post-processing (one call per model call) ----


def select_detections(
    logits: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    allowed: torch.Tensor,
    floors: torch.Tensor,
    scale_xyxy: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the top-k (query, class) pairs of a batch: boxes (B, k, 4) px, scores, classes, kept mask.

    logits (B, Q, C), boxes_cxcywh (B, Q, 4) relative to the model input; allowed (B, C) zeroes classes no
    target of an image can emit (before the top-k); floors (B,) the lowest threshold an image keeps;
    scale_xyxy (B, 4) turns relative corners into original pixels.
    """
    import torch

    batch, queries, classes = logits.shape
    probs = logits.float().sigmoid() * allowed[:, None, :].float()
    k = max(1, min(int(k), queries * classes))
    scores, flat = torch.topk(probs.reshape(batch, -1), k, dim=1)
    query = torch.div(flat, classes, rounding_mode="floor")
    label = flat % classes
    cx, cy, w, h = boxes_cxcywh.float().unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    picked = torch.gather(corners, 1, query[..., None].expand(-1, -1, 4)) * scale_xyxy[:, None, :]
    kept = (scores >= floors[:, None]) & (scores > 0)
    return picked, scores, label, kept


# ---- the family ----


@dataclass
class DetrInput:
    """One preprocessed image: uint8 CHW at the model's size, the original size, class mask and limits."""

    tensor: torch.Tensor
    size: tuple[int, int]  # original (width, height), as Label Studio shows the image
    allowed: np.ndarray  # (C,) bool: classes some target of this image can emit
    floor: float  # the lowest score any of the item's targets keeps
    max_det: int


class RtDetrBackend(Backend):
    """RT-DETR(v2) / D-FINE / DEIMv2 / RF-DETR boxes, as RectangleLabels or Rectangle (+ linked Labels)."""

    family = "rt_detr"
    control_tags = ("RectangleLabels", "Rectangle")
    plain_tags: ClassVar[tuple[str, ...]] = ("Rectangle",)
    object_tags = ("Image",)
    input_kind = "image"
    aliases = tv.VISION_ALIASES
    max_batch_size = 16
    # Before torchvision detection (50), after open-vocabulary detection (45) and OCR (10).
    priority = 47
    fp16 = True
    default_model = DEFAULT_MODEL
    default_threshold = 0.5
    detections_per_img: ClassVar[int] = 100

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names this family knows (any Hugging Face id or folder of these models works too)."""
        return tuple(KNOWN)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True when a model_name picks a real-time DETR."""
        return rt_detr_name(name) is not None

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return DETECTOR when it names a real-time DETR, else the default."""
        chosen = rt_detr_name(settings.detector, "", settings.model_dir) if settings.detector else None
        return chosen or cls.default_model

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim rectangle tags whose model_name/model_path (or DETECTOR, or the cached default) picks us."""
        if obj.tag not in cls.object_tags:
            return []
        claims = []
        for control in controls:
            if control.tag not in cls.control_tags:
                continue
            name, path = control.attr("model_name"), control.attr("model_path")
            if name or path:
                chosen = rt_detr_name(name, path, settings.model_dir)
            elif settings.detector:
                chosen = rt_detr_name(settings.detector, "", settings.model_dir)
            else:
                chosen = DEFAULT_MODEL if default_present(settings.model_dir) else None
            if chosen is not None:
                claims.append(Claim(control=control, model_name=chosen, model_path=path))
        return link_sibling_labels(claims, controls, cls.plain_tags)

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Settings) -> set[str] | None:
        """Return the config labels the checkpoint's id2label maps to (label routing; None when unreadable)."""
        folder = cls._folder_of(spec, settings)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder else None
        except (OSError, ValueError):
            config = None
        names = config.get("id2label") if isinstance(config, dict) else None
        if not isinstance(names, dict):
            return None
        label_map = LabelMap(control.labels, control.predicted_values, cls.aliases)
        return {mapped for name in names.values() if (mapped := label_map(str(name))) is not None}

    # ---- weights ----
    @classmethod
    def _folder_of(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return hf.checkpoint_folder(source_of(spec.name, spec.path, settings.model_dir), settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the model's files are local, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        folder = cls._folder_of(spec, settings)
        if folder is None or hf.weights_file(folder) is None:
            if spec.path:
                return (
                    f"model_path '{spec.path}' is not a save_pretrained() folder of a real-time DETR "
                    "(config.json and model weights)"
                )
            source = source_of(spec.name, "", settings.model_dir)
            return (
                f"weights of '{source}' are not in the Hugging Face cache: run "
                f"`python -m serving weights download --model {spec.name}` where internet exists, "
                "or set model_path to a save_pretrained() folder"
            )
        kind = model_type(folder)
        if kind not in MODEL_TYPES:
            return f"'{folder}' holds a {kind or 'unknown'} model, not a real-time DETR ({', '.join(MODEL_TYPES)})"
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder's content."""
        folder = cls._folder_of(spec, settings)
        if folder is None or hf.weights_file(folder) is None:
            return f"{spec.name}@missing"
        return f"{spec.name}@{weights_fingerprint(folder)}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where each known model's checkpoint is expected and whether it is present."""
        out = []
        for model in KNOWN.values():
            folder = hf.checkpoint_folder(model.repo)
            present = folder is not None and hf.weights_file(folder) is not None
            out.append(
                tv.WeightStatus(
                    model.name, str(folder) if folder else "(Hugging Face cache)", present, model.repo
                )
            )
        return out

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch checkpoints into the Hugging Face cache (the default when `models` is empty)."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or list(DEFAULT_DOWNLOADS):
            repo = source_of(name, "", "")
            if Path(repo).is_dir():
                written.append(repo)
                continue
            folder = Path(snapshot_download(repo, allow_patterns=_ALLOW_PATTERNS))
            if hf.weights_file(folder) is None:  # a checkpoint published without safetensors
                folder = Path(
                    snapshot_download(repo, allow_patterns=[*_ALLOW_PATTERNS, "pytorch_model*.bin"])
                )
            written.append(str(folder))
        return written

    # ---- training (backends/_detr_train.py) ----
    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when this checkpoint can be fine-tuned here, else why not (GPU, or TRAIN_ALLOW_CPU)."""
        from serving.training.names import training_device

        reason = cls.availability(spec, settings)
        if reason:
            return f"cannot train: {reason}"
        if not training_device(settings).startswith("cuda") and not settings.train_allow_cpu:
            return (
                "real-time DETRs train on a GPU: no CUDA device here (set TRAIN_ALLOW_CPU=true to train on "
                "the CPU anyway; expect hours for a few hundred images)"
            )
        return None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Give the checkpoint a class head for the config's labels and fine-tune it (the version is a folder)."""
        from backends import _detr_train

        folder = cls._folder_of(run.spec, run.settings)
        if folder is None:
            raise RuntimeError(
                cls.availability(run.spec, run.settings) or f"no checkpoint for {run.spec.key}"
            )
        return _detr_train.train_detr(run, folder)

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.categories: list[str] = []
        self.input_size: tuple[int, int] = (640, 640)  # (width, height) the model sees
        self.mean: Any = None
        self.std: Any = None
        self.rescale = 1.0 / 255.0

    def load(self, device: str) -> None:
        """Load the checkpoint and read its image processor's size and normalisation, from local files."""
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        folder = self._folder_of(self.spec, self.settings)
        reason = self.availability(self.spec, self.settings)
        if folder is None or reason:
            raise RuntimeError(reason or f"no checkpoint for {self.spec.key}")
        model = AutoModelForObjectDetection.from_pretrained(str(folder), local_files_only=True)
        config = model.config
        model.eval().to(device)
        try:
            processor: Any = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError):
            processor = None  # a folder saved without its processor: RT-DETR's own defaults
        self.input_size = _input_size(processor)
        if processor is not None and getattr(processor, "do_normalize", False):
            self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)[:, None, None]
            self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)[:, None, None]
        if processor is not None and getattr(processor, "do_rescale", True):
            self.rescale = float(getattr(processor, "rescale_factor", 1.0 / 255.0))
        elif processor is not None:
            self.rescale = 1.0
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.categories = [id2label.get(i, "") for i in range(int(config.num_labels))]
        self.model = model
        self.device = device
        log.info(
            "%s (%s) loaded on %s from %s at %sx%s",
            self.spec.name,
            config.model_type,
            device,
            folder,
            *self.input_size,
        )

    def labels(self) -> Sequence[str]:
        """Return the checkpoint's class names."""
        return [c for c in self.categories if c]

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale of the larger per-axis resize to the model's size (never above 1)."""
        return min(1.0, max(self.input_size[0] / size[0], self.input_size[1] / size[1]))

    def allowed_classes(self, targets: Sequence[Target]) -> np.ndarray:
        """Return which classes some target can emit (every class for a target that emits unlabeled boxes)."""
        allowed = np.zeros(len(self.categories), dtype=bool)
        for target in targets:
            decide = tv.RegionLabels(target, self.labels())
            for index, name in enumerate(self.categories):
                if name and not allowed[index]:
                    allowed[index] = decide(name)[0]
        return allowed

    def max_det_of(self, target: Target) -> int:
        """Return a target's box cap: its max_det attribute, else MAX_DETECTIONS, else 100."""
        default = (
            self.settings.max_detections if self.settings.max_detections > 0 else self.detections_per_img
        )
        value = int(tv.float_option(target, "max_det", float(default)))
        return value if value > 0 else default

    def preprocess(self, item: Item) -> DetrInput:
        """Resize to the model's input size (stretched, as its processor does) as uint8; set class mask and limits."""
        if item.image is None:
            raise InputError(f'task has no image for <{item.obj.tag} name="{item.obj.name}">')
        targets = list(item.targets)
        floor = min((t.threshold for t in targets), default=self.default_threshold)
        max_det = max((self.max_det_of(t) for t in targets), default=self.detections_per_img)
        tensor = tv.image_to_tensor(tv.resize_to(item.image, self.input_size))
        allowed = self.allowed_classes(targets) if targets else np.ones(len(self.categories), dtype=bool)
        return DetrInput(tensor, item.size, allowed, max(floor, 1e-4), max_det)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Run the model once on the batch and select every image's boxes in one batched call."""
        import torch

        inputs: list[DetrInput] = batch
        with torch.inference_mode():
            pixels = torch.stack([x.tensor for x in inputs]).to(self.device, non_blocking=True).float()
            pixels = pixels * self.rescale
            if self.mean is not None:
                pixels = (pixels - self.mean) / self.std
            out = self.model(pixel_values=pixels)
            allowed = torch.from_numpy(np.stack([x.allowed for x in inputs])).to(out.logits.device)
            floors = torch.tensor([x.floor for x in inputs], device=out.logits.device)
            scale = torch.tensor(
                [[x.size[0], x.size[1], x.size[0], x.size[1]] for x in inputs],
                dtype=torch.float32,
                device=out.logits.device,
            )
            boxes, scores, labels, kept = select_detections(
                out.logits, out.pred_boxes, allowed, floors, scale, max(x.max_det for x in inputs)
            )
            table = torch.cat(
                [boxes, scores[..., None], labels[..., None].float(), kept[..., None].float()], dim=-1
            )
            rows = table.cpu().numpy().astype(np.float64)
        found = []
        for i, x in enumerate(inputs):
            r = rows[i][rows[i][:, 6] > 0][: x.max_det]
            found.append(
                tv.Detections(
                    boxes_xyxy_px=r[:, :4], scores=r[:, 4], labels=r[:, 5].astype(np.int64), size=x.size
                )
            )
        return found

    def category(self, index: int) -> str:
        """Return the model label of a class index ('' when out of range)."""
        return self.categories[index] if 0 <= index < len(self.categories) else ""

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one rectangle per detection above the tag's threshold whose label the config accepts."""
        det: tv.Detections = output
        decide = tv.RegionLabels(target, self.labels())
        limit = self.max_det_of(target)
        items: list[dict[str, Any]] = []
        emitted = 0
        for k in range(det.scores.shape[0]):  # best first
            score = float(det.scores[k])
            if score < target.threshold or emitted >= limit:
                continue
            emit, label = decide(self.category(int(det.labels[k])))
            if emit:
                emitted += 1
                items.extend(regions.rectangle_items(target, det.boxes_xyxy_px[k], det.size, score, label))
        return items


def _input_size(processor: Any) -> tuple[int, int]:
    """Return the (width, height) a processor resizes to: its fixed size, else a square of its shortest edge."""
    size = getattr(processor, "size", None) if processor is not None else None

    def field(key: str) -> int | None:
        value = getattr(size, key, None)
        if value is None and isinstance(size, dict):
            value = size.get(key)
        return int(value) if value else None

    height, width = field("height"), field("width")
    if height and width:
        return width, height
    # A shortest/longest-edge processor (RF-DETR's default) pads to a square in its training: serve the
    # shortest edge as a square, which every one of these (position-embedding interpolating) models takes.
    edge = field("shortest_edge")
    return (edge, edge) if edge else (640, 640)
