"""Interactive segmentation with Segment Anything: clicks and boxes in Label Studio become masks.

Family "sam" (SAM 2.1 `facebook/sam2.1-hiera-tiny` by default, `-small`, `-base-plus`, `-large`;
SAM ViT-B/L/H and SlimSAM; any save_pretrained() folder by `model_path`) fills
- BrushLabels / Brush: the object's mask, RLE at the original size;
- PolygonLabels / Polygon: its largest outer contour, simplified to `model_polygon_tolerance` px;
on an Image that also has a smart prompt tag (`<KeyPointLabels smart="true">`, `<RectangleLabels
smart="true">`, plain KeyPoint/Rectangle too), or whose mask tag's model_name names a SAM model.

The prompts are the regions of an interactive call (`params.context.result`): every keypoint on the
image is one click (positive unless the region's `is_positive` or `value.positive` says false,
Label Studio's Alt+click); a rectangle is a box; clicks and one box make one object, several boxes
one object each (a click joins the smallest box around it). The image's embedding is computed once
and kept (serving/util/embeddings.py), so each later click only runs the prompt encoder and the mask
decoder, batched across annotators by the model's batcher. A plain /predict answers nothing for
these tags (a prompt is the input) and, for one task (Label Studio opening it), encodes its image
in the background so the first click is already warm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends import _sam
from backends._torchvision import WeightStatus, float_option
from backends.detection import link_sibling_labels
from backends.segmentation import BRUSH_TAGS, DEFAULT_POLYGON_TOLERANCE_PX, POLYGON_TAGS, mask_polygon_px
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
from serving.results.rle import crops_to_rle

if TYPE_CHECKING:
    from PIL import Image

    from serving.settings import Settings

log = logging.getLogger(__name__)

POINT_TAGS = ("KeyPointLabels", "KeyPoint")
BOX_TAGS = ("RectangleLabels", "Rectangle")
PROMPT_TAGS = POINT_TAGS + BOX_TAGS
PROMPT_ROLE = "prompt:"  # linked role prefix of the prompt tags a mask target listens to
# Region types Label Studio gives drawn points and boxes (a region of any other type is not a prompt).
POINT_TYPES = {"keypointlabels", "keypoint"}
BOX_TYPES = {"rectanglelabels", "rectangle"}
# A click session in Label Studio adds one point per click; past these it is not a person clicking.
MAX_POINTS = 64
MAX_BOXES = 32
TRUE = {"true", "1", "yes", "on"}


def _is_true(value: str) -> bool:
    return value.strip().lower() in TRUE


def is_smart(control: ControlTag) -> bool:
    """Return True for a prompt tag Label Studio sends to the backend (smart or smartOnly)."""
    return control.tag in PROMPT_TAGS and (
        _is_true(control.attr("smart")) or _is_true(control.attr("smartOnly"))
    )


def image_identity(task_id: Any, source: str) -> str:
    """Return what identifies an image across requests: a content hash for data URIs, else task id + URL."""
    if source.startswith("data:"):
        return "sha1:" + hashlib.sha1(source.encode("utf-8", "replace")).hexdigest()
    return f"task:{task_id}|{source}"


@dataclass
class SamRequest:
    """One image's work for the model thread: maybe an encode, then its prompts."""

    key: tuple[str, str]  # embedding cache key: (model key, image identity)
    size: tuple[int, int]  # original (width, height)
    prompts: list[_sam.Prompt] = field(default_factory=list)
    encode: bool = True  # False: no prompt for this image in an interactive call (nothing to run)
    embedding: _sam.Embedding | None = None  # pinned when the cache had it at preprocess time
    pixel_values: Any = None  # (1, 3, S, S) computed on the CPU pool when the cache missed
    input_hw: tuple[int, int] | None = None
    image: Image.Image | None = None  # to compute pixel_values on the model thread if still needed


@dataclass
class SamOutput:
    """The masks of one image, at the original size."""

    size: tuple[int, int]
    masks: list[_sam.Mask] = field(default_factory=list)


@dataclass(frozen=True)
class _DrawnPrompt:
    """One drawn region, validated, in percent of the image."""

    kind: str  # "point" or "box"
    value: Mapping[str, Any]
    positive: bool
    label: str | None


class SamBackend(Backend):
    """Masks (brush or polygon) from clicks and boxes, with a per-process cache of image embeddings."""

    family = "sam"
    control_tags = (*BRUSH_TAGS, *POLYGON_TAGS)
    object_tags = ("Image",)
    input_kind = "image"
    # Decoder calls gather clicks of different annotators; a batch with several cold images also
    # encodes them together. 8 bounds the encoder's memory for SAM 2.1 large at 1024 px.
    max_batch_size = 8
    priority = 5  # before keypoints/detection/segmentation: it takes their tags only with a smart prompt
    default_model = _sam.DEFAULT_MODEL
    default_threshold = 0.0  # a click always gets its mask; model_score_threshold filters by predicted IoU
    interactive_only = "interactive model: click or draw a box on the image to get a mask"

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.sam: _sam.SamModel | None = None

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the SAM checkpoints known by name (other SAM-like ids and folders work too)."""
        return _sam.KNOWN_MODELS

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for SAM / SAM 2 checkpoint names."""
        return _sam.is_sam_name(name)

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return SAM_MODEL when set, else SAM 2.1 tiny."""
        return settings.sam_model or cls.default_model

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim mask tags of an image that has smart prompt tags (or that name a SAM model), with those prompts."""
        if obj.tag not in cls.object_tags:
            return []
        prompts = [c for c in controls if is_smart(c)]
        claims = []
        for control in controls:
            if control.tag not in cls.control_tags:
                continue
            name = control.attr("model_name")
            named_sam = bool(name) and cls.accepts_model(name)
            if name and not named_sam:
                continue  # names another family's model (maskrcnn_*, deeplabv3_*)
            if not prompts and not named_sam:
                continue  # no way to click: the automatic families keep this tag
            claims.append(
                Claim(
                    control=control,
                    model_name=name or cls.default_model_for(settings),
                    model_path=control.attr("model_path"),
                    linked={f"{PROMPT_ROLE}{p.name}": p for p in prompts},
                )
            )
        return link_sibling_labels(claims, controls, ("Brush", "Polygon"))

    # ---- weights ----
    @classmethod
    def _source(cls, spec: ModelSpec) -> str:
        return spec.path or spec.name

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint is on disk, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        folder = _sam.checkpoint_folder(cls._source(spec), settings.model_dir)
        if folder is not None:
            try:
                flavor = _sam.flavor_of(folder)
            except ValueError as exc:
                return str(exc)
            if flavor not in {"sam", "sam2"}:
                return f"{folder} holds a {flavor} checkpoint; SAM and SAM 2 are supported"
            return None
        if spec.path:
            return (
                f"model_path '{spec.path}' is not a SAM / SAM 2 save_pretrained() folder (config.json, "
                "preprocessor_config.json and model.safetensors)"
            )
        return (
            f"weights of '{spec.name}' are not in the Hugging Face cache: run "
            f"`python -m serving weights download --model {spec.name}` where internet exists (the Docker "
            "image does it at build time), or set model_path to a save_pretrained() folder"
        )

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder (weights and processor config)."""
        folder = _sam.checkpoint_folder(cls._source(spec), settings.model_dir)
        return f"{spec.name}@{weights_fingerprint(folder) if folder is not None else 'missing'}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[WeightStatus]:
        """Return where the default checkpoint (SAM_MODEL or SAM 2.1 tiny) lives and whether it is present."""
        name = cls.default_model_for(settings)
        folder = _sam.checkpoint_folder(name, settings.model_dir)
        return [
            WeightStatus(name, str(folder) if folder else "(Hugging Face cache)", folder is not None, name)
        ]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch SAM checkpoints into the Hugging Face cache (where internet exists): configs and weights."""
        from huggingface_hub import snapshot_download

        written = []
        for name in (
            [m for m in models if cls.accepts_model(m)] if models else [cls.default_model_for(settings)]
        ):
            path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
            if _sam.checkpoint_folder(name, "") is None:  # an older repo with only a .bin
                path = snapshot_download(name, allow_patterns=["*.json", "*.bin"])
            written.append(path)
        return written

    # ---- runtime ----
    def load(self, device: str) -> None:
        """Load the checkpoint (local folder or Hugging Face cache, never the network) onto the device."""
        folder = _sam.checkpoint_folder(self._source(self.spec), self.settings.model_dir)
        if folder is None:
            raise RuntimeError(self.availability(self.spec, self.settings) or "SAM checkpoint not found")
        self.sam = _sam.SamModel.load(folder, device)
        self.device = device
        log.info("SAM (%s) loaded from %s, %d px input", self.sam.flavor, folder, self.sam.input_size)

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale the model resizes an image to (large JPEGs decode smaller on a cold click)."""
        if self.sam is None:
            return 1.0
        return self.sam.input_scale(size)

    def _key(self, item: Item, source: str) -> tuple[str, str]:
        return (self.spec.key, image_identity(item.task_id, source))

    def preprocess_cached(self, item: Item, source: str) -> SamRequest | None:
        """Answer a click on an image whose embedding is cached (or that holds no prompt) without fetching it."""
        drawn = self._drawn(item)
        if item.context is not None and not drawn:
            return SamRequest(key=self._key(item, source), size=(0, 0), encode=False)
        # A click arriving while the same image is being encoded waits for that encode.
        embedding = self.embedding_cache().get(
            self._key(item, source), wait_s=self.settings.predict_timeout_s / 2
        )
        if embedding is None:
            return None
        item.original_size = embedding.size
        prompts = _prompts(drawn, embedding.size)
        return SamRequest(
            key=self._key(item, source), size=embedding.size, prompts=prompts, embedding=embedding
        )

    def preprocess(self, item: Item) -> SamRequest:
        """Validate the prompts and, unless the embedding is cached, make the model input (CPU pool)."""
        source = str((item.task.get("data") or {}).get(item.obj.value_key, ""))
        key = self._key(item, source)
        drawn = self._drawn(item)
        if item.context is not None and not drawn:
            return SamRequest(key=key, size=item.size, encode=False)
        request = SamRequest(key=key, size=item.size, prompts=_prompts(drawn, item.size))
        if key not in self.embedding_cache() and self.sam is not None and item.image is not None:
            request.pixel_values, request.input_hw = self.sam.pixels(item.image)
        else:
            request.image = item.image
        return request

    def _drawn(self, item: Item) -> list[_DrawnPrompt]:
        """Return the validated prompts of the item's context on its image (InputError when one is bad)."""
        if item.context is None:
            return []
        prompt_tags: dict[str, ControlTag] = {}
        for target in item.targets:
            for role, control in target.linked.items():
                if role.startswith(PROMPT_ROLE):
                    prompt_tags[control.name] = control
        return _parse_context(item.context, item.obj.name, prompt_tags)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Encode the images not cached yet (once each, together), then decode every prompt in shape-batches."""
        import torch

        if self.sam is None:
            raise RuntimeError("SAM model not loaded: call load() first")
        if self.device.startswith("cpu"):
            # Random or pruned weights leave denormal floats that make CPU kernels several times
            # slower. The flag is per thread (and copied into threads it starts): set on the model
            # thread only, it changes no other thread's arithmetic.
            torch.set_flush_denormal(True)
        sam = self.sam
        requests: list[SamRequest] = batch
        need = [r for r in requests if r.encode and r.embedding is None]
        by_key: dict[tuple[str, str], SamRequest] = {}
        for r in need:  # several clicks on one new image: encode from one whose pixels are ready
            if r.key not in by_key or by_key[r.key].pixel_values is None:
                by_key[r.key] = r

        def encode(keys: list[tuple[str, str]]) -> list[_sam.Embedding]:
            return sam.encode_inputs([by_key[key] for key in keys])

        if need:
            embeddings = self.embedding_cache().get_many([r.key for r in need], encode)
            for r, embedding in zip(need, embeddings, strict=True):
                r.embedding = embedding
        jobs = [(r.embedding, r.prompts) for r in requests if r.prompts and r.embedding is not None]
        decoded = iter(sam.decode(jobs)) if jobs else iter(())
        outputs = []
        for r in requests:
            masks = next(decoded) if r.prompts and r.embedding is not None else []
            outputs.append(SamOutput(r.size, masks))
        return outputs

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn each mask into the tag's region: brush RLE at the original size, or a polygon."""
        out: SamOutput = output
        tag = target.control.tag
        labeled = tag in regions.LABELED_GEOMETRY
        items: list[dict[str, Any]] = []
        brushes: list[tuple[_sam.Mask, str | None]] = []
        for mask in out.masks:
            if mask.score < target.threshold:
                continue
            label = target.label_map(mask.prompt.label) if mask.prompt.label else None
            if label is None and labeled and target.label_map.config_labels:
                label = target.label_map.config_labels[0]
            if tag in BRUSH_TAGS:
                brushes.append((mask, label))
            elif tag in POLYGON_TAGS:
                tolerance = float_option(target, "model_polygon_tolerance", DEFAULT_POLYGON_TOLERANCE_PX)
                points = mask_polygon_px(mask.crop, mask.offset, tolerance)
                if points is not None:
                    items.extend(regions.polygon_items(target, points, out.size, mask.score, label))
        rles = crops_to_rle([(m.crop, m.offset) for m, _ in brushes], out.size)
        for (mask, label), rle in zip(brushes, rles, strict=True):
            geometry = {"format": "rle", "rle": rle}
            items.extend(regions.geometry_items(target, geometry, out.size, mask.score, label))
        return items


# ---- prompts: Label Studio regions -> validated clicks and boxes ----


def _number(value: Mapping[str, Any], key: str, region_id: Any) -> float:
    raw = value.get(key)
    try:
        number = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"region {region_id!r}: value.{key} must be a number, got {raw!r}") from None
    if not math.isfinite(number):
        raise InputError(f"region {region_id!r}: value.{key} must be a finite number, got {raw!r}")
    return number


def _polarity(region: Mapping[str, Any], value: Mapping[str, Any]) -> bool:
    """Return the click's polarity: top-level is_positive (Alt+click: false), else value.positive, else positive."""
    for raw in (region.get("is_positive"), value.get("positive")):
        if raw is None:
            continue
        if isinstance(raw, str):
            return raw.strip().lower() not in {"false", "0", "no", "off", ""}
        return bool(raw)
    return True


def _label_of(value: Mapping[str, Any], kind: str) -> str | None:
    for key in (kind, "keypointlabels", "rectanglelabels", "labels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def _parse_context(
    context: Mapping[str, Any], object_name: str, prompt_tags: Mapping[str, ControlTag]
) -> list[_DrawnPrompt]:
    """Return the point and box regions of one image in a context, validated (InputError otherwise)."""
    result = context.get("result")
    if not isinstance(result, list):
        raise InputError("params.context.result must be a list of regions")
    drawn: list[_DrawnPrompt] = []
    for region in result:
        if not isinstance(region, Mapping):
            raise InputError(f"params.context.result holds a {type(region).__name__}, not a region object")
        if region.get("to_name", object_name) != object_name:
            continue  # another image of the task
        kind = str(region.get("type", "")).lower()
        if kind not in POINT_TYPES and kind not in BOX_TYPES:
            continue  # a region's companions (its labels, a per-region text) or a drawn mask
        from_name = region.get("from_name")
        region_id = region.get("id")
        if from_name not in prompt_tags:
            known = ", ".join(sorted(prompt_tags)) or "none"
            raise InputError(
                f"region {region_id!r} comes from '{from_name}', which is not a smart prompt tag of "
                f"'{object_name}' (smart KeyPointLabels/RectangleLabels there: {known})"
            )
        value = region.get("value")
        if not isinstance(value, Mapping):
            raise InputError(f"region {region_id!r} has no 'value' object")
        drawn.append(_drawn(region, value, kind, region_id))
    n_points = sum(d.kind == "point" for d in drawn)
    n_boxes = len(drawn) - n_points
    if n_points > MAX_POINTS:
        raise InputError(f"{n_points} clicks on one image; at most {MAX_POINTS} are accepted")
    if n_boxes > MAX_BOXES:
        raise InputError(f"{n_boxes} boxes on one image; at most {MAX_BOXES} are accepted")
    return drawn


def _drawn(region: Mapping[str, Any], value: Mapping[str, Any], kind: str, region_id: Any) -> _DrawnPrompt:
    """Return one drawn click or box, checked to lie inside the image or to have an area."""
    if kind in POINT_TYPES:
        x, y = _number(value, "x", region_id), _number(value, "y", region_id)
        if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
            raise InputError(f"click {region_id!r} at x={x:g}%, y={y:g}% lies outside the image (0-100%)")
        return _DrawnPrompt("point", {"x": x, "y": y}, _polarity(region, value), _label_of(value, kind))
    box = {k: _number(value, k, region_id) for k in ("x", "y", "width", "height")}
    box["rotation"] = _number(value, "rotation", region_id) if value.get("rotation") is not None else 0.0
    if box["width"] <= 0 or box["height"] <= 0:
        raise InputError(
            f"box {region_id!r} has zero area (width={box['width']:g}%, height={box['height']:g}%)"
        )
    return _DrawnPrompt("box", box, True, _label_of(value, kind))


def _prompts(drawn: Sequence[_DrawnPrompt], size: tuple[int, int]) -> list[_sam.Prompt]:
    """Group clicks and boxes into objects, in pixels of the original image.

    No box: all clicks are one object. One box: the box and every click. Several boxes: one object
    per box, each click joining the smallest box around it; clicks outside every box make one more
    object when one of them is positive.
    """
    width, height = size
    points = [
        (regions.point_pct_to_px(d.value["x"], d.value["y"], size), d) for d in drawn if d.kind == "point"
    ]
    boxes: list[tuple[tuple[float, float, float, float], _DrawnPrompt]] = []
    for d in (d for d in drawn if d.kind == "box"):
        x0, y0, x1, y1 = regions.rect_pct_to_box_xyxy_px(d.value, size)
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:
            raise InputError(
                f"a box of {x1 - x0:.2g} x {y1 - y0:.2g} px inside the {width}x{height} image is too small to segment"
            )
        boxes.append(((x0, y0, x1, y1), d))
    if not boxes:
        if not points:
            return []
        if not any(d.positive for _, d in points):
            raise InputError(
                "only negative clicks (Alt+click): add a positive click or a box to mark the object"
            )
        first_positive = next(d for _, d in points if d.positive)
        return [
            _sam.Prompt(
                points_px=[xy for xy, _ in points],
                labels=[int(d.positive) for _, d in points],
                label=first_positive.label or next((d.label for _, d in points if d.label), None),
            )
        ]
    objects = [_sam.Prompt(box_xyxy_px=box, label=d.label) for box, d in boxes]
    outside: list[tuple[tuple[float, float], _DrawnPrompt]] = []
    for xy, d in points:
        around = [
            (k, (b[2] - b[0]) * (b[3] - b[1]))
            for k, (b, _) in enumerate(boxes)
            if b[0] <= xy[0] <= b[2] and b[1] <= xy[1] <= b[3]
        ]
        if len(boxes) == 1:
            around = around or [(0, 0.0)]
        if not around:
            outside.append((xy, d))
            continue
        k = min(around, key=lambda pair: pair[1])[0]
        objects[k].points_px.append(xy)
        objects[k].labels.append(int(d.positive))
    if any(d.positive for _, d in outside):
        first_positive = next(d for _, d in outside if d.positive)
        objects.append(
            _sam.Prompt(
                points_px=[xy for xy, _ in outside],
                labels=[int(d.positive) for _, d in outside],
                label=first_positive.label,
            )
        )
    return objects
