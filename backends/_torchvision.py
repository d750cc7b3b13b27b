"""Shared plumbing of the torchvision families: weights, user checkpoints, image tensors, label policy.

Pretrained weights are torchvision's own weight enums, read from `$TORCH_HOME/hub/checkpoints`
(torch's hub cache: `torch.hub.get_dir()/checkpoints`) under the file name the enum's URL ends with.
Nothing is downloaded while serving: `python -m serving weights download` (or `make weights`) fills the
cache where internet exists, and a backend whose file is missing reports how to get it.

A user checkpoint (`model_path` on the control tag) is a torchvision state_dict file for the
architecture named by `model_name` (the family's default when absent), plus a class-name list beside it:

    /models/ships.pt              torch.save(model.state_dict()) (a {"model": state_dict} or
                                  {"state_dict": ...} training checkpoint works too; "module." is stripped)
    /models/ships.classes.txt     one class name per line, in the model's output index order
                                  (or ships.classes.json, a JSON list; or classes.txt / classes.json in the
                                  same folder)

For detectors, instance segmentation and keypoints, index 0 is the background: list only the
foreground classes, or start the list with `__background__` (both work). For semantic segmentation
and classification, list every output class in order (a semantic class named `__background__` or
`background` is never emitted). A relative `model_path` is resolved under MODEL_DIR.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from serving.contract import ControlTag, LabelMap, ModelSpec, Target, weights_fingerprint
from serving.results.regions import LABELED_GEOMETRY
from serving.settings import torch_checkpoints_dir

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from serving.settings import Settings

log = logging.getLogger(__name__)

BACKGROUND_NAMES = {"__background__", "background", "_background_", "bg"}
DOWNLOAD_HINT = (
    "run `python -m serving weights download{args}` (or `make weights`) where internet is available"
)


@dataclass(frozen=True)
class TorchvisionModel:
    """One torchvision model and the weight enum member it serves with (static: no torch import)."""

    name: str  # builder name, also the model_name users write
    weights_enum: str  # e.g. "FasterRCNN_ResNet50_FPN_V2_Weights"
    member: str  # e.g. "COCO_V1"
    url: str

    @property
    def file_name(self) -> str:
        """Return the checkpoint file name torch's hub cache stores the weights under."""
        return self.url.rsplit("/", 1)[-1]


_BASE_URL = "https://download.pytorch.org/models/"
# Kept static so that /health and /setup can check weights without importing torchvision;
# tests/backends/test_vision_weights.py checks every row against torchvision's enums.
MODELS: dict[str, TorchvisionModel] = {
    m.name: m
    for m in (
        TorchvisionModel(
            "fasterrcnn_resnet50_fpn_v2",
            "FasterRCNN_ResNet50_FPN_V2_Weights",
            "COCO_V1",
            _BASE_URL + "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth",
        ),
        TorchvisionModel(
            "retinanet_resnet50_fpn_v2",
            "RetinaNet_ResNet50_FPN_V2_Weights",
            "COCO_V1",
            _BASE_URL + "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
        ),
        TorchvisionModel(
            "fcos_resnet50_fpn",
            "FCOS_ResNet50_FPN_Weights",
            "COCO_V1",
            _BASE_URL + "fcos_resnet50_fpn_coco-99b0c9b7.pth",
        ),
        TorchvisionModel(
            "ssdlite320_mobilenet_v3_large",
            "SSDLite320_MobileNet_V3_Large_Weights",
            "COCO_V1",
            _BASE_URL + "ssdlite320_mobilenet_v3_large_coco-a79551df.pth",
        ),
        TorchvisionModel(
            "fasterrcnn_mobilenet_v3_large_fpn",
            "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
            "COCO_V1",
            _BASE_URL + "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth",
        ),
        TorchvisionModel(
            "maskrcnn_resnet50_fpn_v2",
            "MaskRCNN_ResNet50_FPN_V2_Weights",
            "COCO_V1",
            _BASE_URL + "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
        ),
        TorchvisionModel(
            "keypointrcnn_resnet50_fpn",
            "KeypointRCNN_ResNet50_FPN_Weights",
            "COCO_V1",
            _BASE_URL + "keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
        ),
        TorchvisionModel(
            "deeplabv3_resnet50",
            "DeepLabV3_ResNet50_Weights",
            "COCO_WITH_VOC_LABELS_V1",
            _BASE_URL + "deeplabv3_resnet50_coco-cd0a2569.pth",
        ),
        TorchvisionModel(
            "deeplabv3_mobilenet_v3_large",
            "DeepLabV3_MobileNet_V3_Large_Weights",
            "COCO_WITH_VOC_LABELS_V1",
            _BASE_URL + "deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        ),
        TorchvisionModel(
            "fcn_resnet50",
            "FCN_ResNet50_Weights",
            "COCO_WITH_VOC_LABELS_V1",
            _BASE_URL + "fcn_resnet50_coco-1167a1af.pth",
        ),
        TorchvisionModel(
            "resnet50", "ResNet50_Weights", "IMAGENET1K_V2", _BASE_URL + "resnet50-11ad3fa6.pth"
        ),
        TorchvisionModel(
            "efficientnet_b0",
            "EfficientNet_B0_Weights",
            "IMAGENET1K_V1",
            _BASE_URL + "efficientnet_b0_rwightman-7f5810bc.pth",
        ),
        TorchvisionModel(
            "vit_b_16", "ViT_B_16_Weights", "IMAGENET1K_V1", _BASE_URL + "vit_b_16-c867db91.pth"
        ),
    )
}

# Synonyms between COCO / Pascal VOC / ImageNet names and what configs commonly say. Only true
# synonyms: a hypernym group (vehicle = car, bus...) would make the mapping ambiguous when a config
# lists both; use predicted_values on <Label> for those.
VISION_ALIASES: tuple[frozenset[str], ...] = tuple(
    frozenset(group)
    for group in (
        {"person", "people", "human", "pedestrian"},
        {"car", "automobile"},
        {"airplane", "aeroplane", "plane", "aircraft"},
        {"motorcycle", "motorbike"},
        {"tv", "tvmonitor", "tv monitor", "television"},
        {"bicycle", "bike"},
        {"couch", "sofa"},
        {"dining table", "diningtable"},
        {"potted plant", "pottedplant", "houseplant"},
        {"cell phone", "cellphone", "mobile phone", "smartphone"},
        {"hair drier", "hair dryer"},
        {"laptop", "notebook computer"},
    )
)


def checkpoints_dir() -> Path:
    """Return torch's hub checkpoint folder ($TORCH_HOME/hub/checkpoints), where weights are read."""
    # Only a torch that finished importing: while another thread is still importing it, `import
    # torch.hub` raises KeyError('torch') on CPython 3.11 (seen at start-up with WARMUP and an early
    # /setup). /setup and /health must answer in milliseconds, and importing torch can take seconds.
    hub = getattr(sys.modules.get("torch"), "hub", None)
    if hub is not None and hasattr(hub, "get_dir"):
        return Path(hub.get_dir()) / "checkpoints"
    return torch_checkpoints_dir()


def model_info(name: str) -> TorchvisionModel:
    """Return the static description of a torchvision model, or raise KeyError."""
    return MODELS[name]


def weights_file(name: str) -> Path:
    """Return where the pretrained weights of a model are expected."""
    return checkpoints_dir() / model_info(name).file_name


def download_hint(name: str, family: str = "") -> str:
    """Return the command that fetches one model's weights."""
    args = f" --model {name}" if name else (f" --family {family}" if family else "")
    return DOWNLOAD_HINT.format(args=args)


def resolve_model_path(path: str, settings: Settings) -> Path:
    """Return a user checkpoint path; relative paths live under MODEL_DIR."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(settings.model_dir) / p
    return p


def class_list_file(checkpoint: Path) -> Path | None:
    """Return the class-name list beside a user checkpoint, or None."""
    stem = checkpoint.with_suffix("")
    for candidate in (
        stem.with_name(stem.name + ".classes.txt"),
        stem.with_name(stem.name + ".classes.json"),
        checkpoint.parent / "classes.txt",
        checkpoint.parent / "classes.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def read_class_names(path: Path) -> list[str]:
    """Read a class-name list: a JSON list, or one name per line (blank lines and # comments skipped)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path} must hold a JSON list of class names")
        return [n.strip() for n in names]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def with_background(names: Sequence[str]) -> list[str]:
    """Return a detector vocabulary whose index 0 is the background (added when missing)."""
    names = list(names)
    if names and names[0].casefold() in BACKGROUND_NAMES:
        return names
    return ["__background__", *names]


def availability(spec: ModelSpec, settings: Settings, known: Collection[str], family: str) -> str | None:
    """Return None when a spec can load, else why not and how to fix it (cheap, no torchvision import)."""
    if spec.name not in known:
        return f"unknown model_name '{spec.name}' for {family}; use one of: {', '.join(sorted(known))}"
    if spec.path:
        checkpoint = resolve_model_path(spec.path, settings)
        if not checkpoint.is_file():
            return f"model_path {checkpoint} does not exist (a torchvision state_dict file for {spec.name})"
        if class_list_file(checkpoint) is None:
            stem = checkpoint.with_suffix("").name
            return (
                f"no class-name list beside {checkpoint}: add {checkpoint.parent}/{stem}.classes.txt "
                "with one class name per line, in the model's output order"
            )
        return None
    path = weights_file(spec.name)
    if not path.is_file():
        return f"weights missing ({path}); {download_hint(spec.name)}"
    return None


@functools.cache
def _static_vocabularies() -> dict[str, Any]:
    return dict(json.loads((Path(__file__).with_name("_vocabularies.json")).read_text(encoding="utf-8")))


def vocabulary(spec: ModelSpec, settings: Settings) -> list[str] | None:
    """Return a model's class names without importing torch: the pretrained weights' categories
    (backends/_vocabularies.json, a copy of torchvision's weight metadata a test keeps equal), or a
    user checkpoint's class list; None when unknown (a broken checkpoint: availability says why)."""
    if spec.path:
        checkpoint = resolve_model_path(spec.path, settings)
        list_file = class_list_file(checkpoint) if checkpoint.is_file() else None
        try:
            return read_class_names(list_file) if list_file else None
        except (OSError, ValueError):
            return None
    data = _static_vocabularies()
    key = data["models"].get(spec.name)
    return list(data["vocabularies"][key]) if key else None


def known_labels(
    spec: ModelSpec,
    control: ControlTag,
    settings: Settings,
    aliases: Sequence[Collection[str]],
    extra: Sequence[str] = (),
) -> set[str] | None:
    """Return the labels of `control` some class of the model maps to (through LabelMap), None when unknown."""
    names = vocabulary(spec, settings)
    if names is None:
        return None
    label_map = LabelMap(control.labels, control.predicted_values, aliases)
    found = {label_map(name) for name in (*names, *extra) if name and name.casefold() not in BACKGROUND_NAMES}
    return {label for label in found if label is not None}


def version_of(spec: ModelSpec, settings: Settings) -> str:
    """Return model name + weights fingerprint (changes when the weights file changes)."""
    if spec.path:
        path = resolve_model_path(spec.path, settings)
        return f"{spec.name}@{path.name}:{weights_fingerprint(path)}"
    return f"{spec.name}:{weights_fingerprint(weights_file(spec.name))}"


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Load a state_dict (or a training checkpoint holding one) onto the CPU, tensors only."""
    import torch

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state_dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def build_model(
    spec: ModelSpec,
    settings: Settings,
    user_kwargs: Callable[[list[str]], tuple[dict[str, Any], list[str]]] | None = None,
    ignore_prefixes: Sequence[str] = (),
) -> tuple[Any, list[str], dict[str, Any]]:
    """Build a torchvision model with its weights; return (model in eval mode on CPU, vocabulary, meta).

    Pretrained: the builder gets the weight enum, so torchvision itself loads the file from the hub
    cache exactly as it would after a download (availability() checked it is there: no network).
    User checkpoint: `user_kwargs(class names)` gives the builder arguments (num_classes...) and the
    vocabulary; the architecture is built without weights and the state_dict loaded strictly.
    """
    import torchvision.models as tvm

    info = model_info(spec.name)
    if spec.path:
        checkpoint = resolve_model_path(spec.path, settings)
        list_file = class_list_file(checkpoint)
        if list_file is None:
            raise FileNotFoundError(f"no class-name list beside {checkpoint}")
        names = read_class_names(list_file)
        kwargs, vocabulary = user_kwargs(names) if user_kwargs else ({"num_classes": len(names)}, names)
        # Detection/segmentation builders would otherwise fetch ImageNet backbone weights.
        if "weights_backbone" in inspect.signature(tvm.get_model_builder(spec.name)).parameters:
            kwargs = {"weights_backbone": None, **kwargs}
        model = tvm.get_model(spec.name, weights=None, **kwargs)
        state = load_state_dict_file(checkpoint)
        if ignore_prefixes:
            state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"{checkpoint} does not fit {spec.name} built with {kwargs} "
                f"(from {list_file.name}): {str(exc)[:400]}"
            ) from exc
        meta: dict[str, Any] = {}
    else:
        path = weights_file(spec.name)
        if not path.is_file():
            raise FileNotFoundError(f"weights missing ({path}); {download_hint(spec.name)}")
        weights = tvm.get_model_weights(spec.name)[info.member]
        model = tvm.get_model(spec.name, weights=weights)
        meta = dict(weights.meta)
        vocabulary = list(meta.get("categories") or [])
    model.eval()
    return model, vocabulary, meta


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """Return an RGB PIL image as a contiguous uint8 CHW tensor (float conversion happens on the device)."""
    import torch

    array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Return (width, height) times scale, rounded, at least 1; the size itself when scale >= 1."""
    if scale >= 1.0:
        return size
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Return the image resized to `size` (antialiased), or itself when it already has that size."""
    from PIL import Image as PILImage

    if image.size == size:
        return image
    return image.resize(size, PILImage.Resampling.BILINEAR, reducing_gap=None)


def to_device_float(batch: Sequence[torch.Tensor], device: str) -> list[torch.Tensor]:
    """Move uint8 CHW tensors to the device and scale them to float [0, 1] there."""
    non_blocking = device.startswith("cuda")
    return [x.to(device, non_blocking=non_blocking).float().div_(255.0) for x in batch]


class RegionLabels:
    """Decide, per model label, whether a geometry region is emitted and with which config label.

    Labeled controls (RectangleLabels...) emit only mapped labels. A plain control (Rectangle...)
    with a linked Labels tag emits only mapped labels when that tag maps any of the model's labels,
    and otherwise (a Labels tag meant for something else, as in the pre-annotation guide's
    "regions without labels" example) emits every region unlabeled. Without a Labels tag, all unlabeled.
    """

    def __init__(self, target: Target, vocabulary: Sequence[str]) -> None:
        self.label_map: LabelMap = target.label_map
        labeled = target.control.tag in LABELED_GEOMETRY or target.control.tag in {"Choices", "Labels"}
        has_labels = labeled or "labels" in target.linked
        self.restrict = labeled or (has_labels and any(self.label_map(v) is not None for v in vocabulary))
        self.use_labels = has_labels

    def __call__(self, model_label: str) -> tuple[bool, str | None]:
        """Return (emit, config label or None)."""
        mapped = self.label_map(model_label) if self.use_labels else None
        if mapped is None and self.restrict:
            return False, None
        return True, mapped


def float_option(target: Target, key: str, default: float) -> float:
    """Return a numeric per-tag knob, falling back to the default when absent or not a number."""
    raw = target.option(key, "")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        log.warning(
            '%s="%s" on <%s name="%s"> is not a number; using %s',
            key,
            raw,
            target.control.tag,
            target.control.name,
            default,
        )
        return default


# ---- detectors (R-CNN family, RetinaNet, FCOS, SSD) ----


@dataclass
class ImageInput:
    """One preprocessed image: a uint8 CHW tensor, possibly downscaled, and the original size."""

    tensor: torch.Tensor
    size: tuple[int, int]  # original (width, height), as Label Studio shows the image

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Return (original / input) per axis: multiply model coordinates by it."""
        height, width = self.tensor.shape[-2:]
        return self.size[0] / width, self.size[1] / height


@dataclass
class Detections:
    """One image's detections on the CPU, in ORIGINAL pixel coordinates."""

    boxes_xyxy_px: np.ndarray  # (N, 4) float
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) model class indices
    size: tuple[int, int]  # original (width, height)
    # Per detection: (x0, y0, bool mask crop) at original resolution, or None when not computed.
    masks: list[tuple[int, int, np.ndarray] | None] | None = None
    keypoints_px: np.ndarray | None = None  # (N, K, 2)
    keypoint_scores: np.ndarray | None = None  # (N, K)

    def full_mask(self, index: int) -> np.ndarray | None:
        """Return detection `index`'s mask as a (height, width) uint8 0/255 array."""
        if self.masks is None or self.masks[index] is None:
            return None
        x0, y0, crop = self.masks[index]  # type: ignore[misc]
        full = np.zeros((self.size[1], self.size[0]), dtype=np.uint8)
        full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop.astype(np.uint8) * np.uint8(255)
        return full


def detector_input_scale(size: tuple[int, int], model: Any) -> float:
    """Return how much to shrink an image before the detector (<= 1) so it is no larger than the model uses.

    GeneralizedRCNNTransform resizes every input to min_size/max_size anyway; shrinking on the CPU
    first (antialiased) saves the transfer and, above all, keeps pasted masks at that size instead
    of at a 12-megapixel original (they are upsampled back per detection crop on the device).
    """
    transform = getattr(model, "transform", None)
    if transform is None:
        return 1.0
    width, height = size
    fixed = getattr(transform, "fixed_size", None)
    if fixed:
        # Models that stretch to a fixed size (SSD): keep both sides at least that large.
        fixed_h, fixed_w = fixed
        return min(1.0, max(fixed_w / width, fixed_h / height))
    min_sizes = getattr(transform, "min_size", None)
    max_size = getattr(transform, "max_size", None)
    if not min_sizes or not max_size:
        return 1.0
    min_size = float(min_sizes[-1] if isinstance(min_sizes, (tuple, list)) else min_sizes)
    return min(1.0, min_size / min(width, height), float(max_size) / max(width, height))


def set_detector_limits(model: Any, score_floor: float, detections_per_img: int) -> None:
    """Set the model's own score threshold and detection cap (R-CNN heads or one-stage detectors)."""
    heads = getattr(model, "roi_heads", None)
    holder = heads if heads is not None else model
    if hasattr(holder, "score_thresh"):
        holder.score_thresh = score_floor
    if hasattr(holder, "detections_per_img"):
        holder.detections_per_img = detections_per_img


def run_detector(
    model: Any, inputs: Sequence[ImageInput], device: str, mask_threshold: float = 0.5
) -> list[Detections]:
    """Run a torchvision detector once on a batch; return CPU detections in original coordinates.

    Masks are thresholded on the device, cropped to their extent and upsampled to the original
    resolution there (per detection, with roi_align on the original pixel grid), so only small
    boolean crops cross to the CPU.
    """
    import torch

    images = to_device_float([inp.tensor for inp in inputs], device)
    raw = model(images)
    out: list[Detections] = []
    for inp, r in zip(inputs, raw, strict=True):
        sx, sy = inp.scale_xy
        scale = torch.tensor([sx, sy, sx, sy], device=r["boxes"].device, dtype=torch.float32)
        boxes = r["boxes"].float() * scale
        table = (
            torch.cat([boxes, r["scores"].float()[:, None], r["labels"].float()[:, None]], dim=1)
            .cpu()
            .numpy()
        )
        det = Detections(
            boxes_xyxy_px=table[:, :4].astype(np.float64),
            scores=table[:, 4].astype(np.float64),
            labels=table[:, 5].astype(np.int64),
            size=inp.size,
        )
        if "keypoints" in r:
            kp = r["keypoints"][..., :2].float() * scale[:2]
            det.keypoints_px = kp.cpu().numpy().astype(np.float64)
            det.keypoint_scores = r["keypoints_scores"].float().cpu().numpy().astype(np.float64)
        if "masks" in r:
            det.masks = _mask_crops(r["masks"], inp, mask_threshold)
        out.append(det)
    return out


def _mask_crops(
    masks: torch.Tensor, inp: ImageInput, threshold: float
) -> list[tuple[int, int, np.ndarray] | None]:
    """Return each mask as (x0, y0, bool crop) at the original resolution, computed on the device."""
    import torch
    from torchvision.ops import roi_align

    n = masks.shape[0]
    if n == 0:
        return []
    probs = masks.float()  # (N, 1, h, w) probabilities at the model input's size
    binary = probs[:, 0] > threshold
    rows = binary.any(dim=2)
    cols = binary.any(dim=1)
    extents = torch.cat([rows, cols], dim=1).cpu().numpy()  # one small transfer for all bounds
    h, w = binary.shape[1:]
    width, height = inp.size
    sx, sy = inp.scale_xy
    resized = abs(sx - 1.0) > 1e-9 or abs(sy - 1.0) > 1e-9
    crops: list[tuple[int, int, np.ndarray] | None] = []
    for k in range(n):
        r_any, c_any = extents[k, :h], extents[k, h:]
        if not r_any.any():
            crops.append(None)
            continue
        ry0, ry1 = int(r_any.argmax()), h - int(r_any[::-1].argmax())
        rx0, rx1 = int(c_any.argmax()), w - int(c_any[::-1].argmax())
        if not resized:
            crops.append((rx0, ry0, binary[k, ry0:ry1, rx0:rx1].cpu().numpy()))
            continue
        # The original pixels covered by the input pixels [r0-1, r1+1) (upsampling may spill one pixel).
        ox0 = max(0, int(np.floor((rx0 - 1) * sx)))
        ox1 = min(width, int(np.ceil((rx1 + 1) * sx)))
        oy0 = max(0, int(np.floor((ry0 - 1) * sy)))
        oy1 = min(height, int(np.ceil((ry1 + 1) * sy)))
        # roi_align with aligned=True samples input coordinate (o + 0.5) / s - 0.5 for original pixel o:
        # bilinear upsampling on the original pixel grid, for this crop only.
        box = torch.tensor(
            [[float(k), ox0 / sx, oy0 / sy, ox1 / sx, oy1 / sy]], device=probs.device, dtype=probs.dtype
        )
        up = roi_align(
            probs, box, output_size=(oy1 - oy0, ox1 - ox0), spatial_scale=1.0, sampling_ratio=1, aligned=True
        )
        crop = (up[0, 0] > threshold).cpu().numpy()
        if not crop.any():
            crops.append(None)
            continue
        ys = np.flatnonzero(crop.any(axis=1))
        xs = np.flatnonzero(crop.any(axis=0))
        crops.append((ox0 + int(xs[0]), oy0 + int(ys[0]), crop[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]))
    return crops


# ---- the weights CLI's hooks (serving/cli/weights.py calls these on every family that has them) ----


@dataclass(frozen=True)
class WeightStatus:
    """One weights file a family can use: its model, where it lives, and whether it is there."""

    model: str
    path: str
    present: bool
    url: str = ""


class TorchvisionWeights:
    """Mixin: check, fingerprint, list and download the torchvision weights of a family's models."""

    family: ClassVar[str]
    spec: ModelSpec
    settings: Settings

    @classmethod
    def model_names(cls) -> tuple[str, ...]:  # pragma: no cover - provided by the Backend subclass
        """Return the family's models."""
        return ()

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Report missing weights or a broken user checkpoint, with how to fix it."""
        return availability(spec, settings, cls.model_names(), cls.family)

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its weights file's content."""
        return version_of(spec, settings)

    @classmethod
    def weights_status(cls, settings: Settings) -> list[WeightStatus]:
        """Return where each model's weights are expected and whether they are present."""
        out = []
        for name in cls.model_names():
            path = weights_file(name)
            out.append(WeightStatus(name, str(path), path.is_file(), model_info(name).url))
        return out

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Download the named models' weights (all of the family's when empty) into the hub cache."""
        import torch.hub

        wanted = list(models) or list(cls.model_names())
        folder = checkpoints_dir()
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name in wanted:
            info = model_info(name)
            path = folder / info.file_name
            if path.is_file():
                log.info("%s: already present at %s", name, path)
            else:
                # torchvision file names end in the first hex digits of the file's sha256.
                match = torch.hub.HASH_REGEX.search(info.file_name)
                log.info("%s: downloading %s", name, info.url)
                torch.hub.download_url_to_file(info.url, str(path), match.group(1) if match else None)
            written.append(str(path))
        return written
