"""Grounded-SAM: masks of the project's own labels, from an open-vocabulary detector's boxes prompting SAM.

Family "grounded_sam" fills `BrushLabels` / `Brush` (RLE at the original size) and `PolygonLabels` /
`Polygon` (+ sibling `Labels`) on an `Image` whose mask tag names an open-vocabulary detector:
`model_name="grounded_sam"` (the DETECTOR setting's open-vocabulary model, else `grounding_dino`),
or the detector itself (`grounding_dino`, `owlv2`, a Hugging Face id of one), or `model_path` = a
detector's checkpoint folder (a fine-tuned Grounding DINO...). SAM is the tag's `model_sam` (a SAM /
SAM 2 id or folder), else SAM_MODEL, else facebook/sam2.1-hiera-tiny.

Per image, the detector finds the tag's labels exactly as backends/open_vocab.py does (prompts from
the labels, span/query -> label, thresholds, per-label NMS, MAX_DETECTIONS); every kept box becomes
one SAM box prompt on ONE image embedding, one mask per box, and the region carries the detector's
label and score. The embedding goes through the process-wide cache (serving/util/embeddings.py) under
the interactive SAM family's key for the same checkpoint, so an annotator's clicks on that image
afterwards (backends/sam.py) reuse it, and the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends import _open_vocab as ov
from backends import _sam
from backends._torchvision import float_option
from backends.open_vocab import OpenVocabBackend, OvDetections, OvInput
from backends.sam import SamBackend, image_identity
from backends.segmentation import BRUSH_TAGS, DEFAULT_POLYGON_TOLERANCE_PX, POLYGON_TAGS, mask_polygon_px
from serving.contract import Backend, Claim, ControlTag, Item, ModelSpec, ObjectTag, Target
from serving.errors import InputError
from serving.results import regions
from serving.results.rle import crops_to_rle

if TYPE_CHECKING:
    from PIL import Image

    from serving.settings import Settings

log = logging.getLogger(__name__)

NAMES = ("grounded_sam", "grounded-sam", "groundedsam")


@dataclass
class GsInput:
    """One image: the detector's input, and what SAM needs to encode it unless its embedding is cached."""

    det: OvInput
    key: tuple[str, str]  # embedding cache key: (the SAM family's model key, image identity)
    size: tuple[int, int]  # original (width, height)
    image: Image.Image | None
    pixel_values: Any = None  # (1, 3, S, S), made on the CPU pool when the cache missed
    input_hw: tuple[int, int] | None = None


@dataclass
class GsOutput:
    """One image's detections and, per detection, its mask at the original size (None: SAM found none)."""

    detections: OvDetections
    masks: list[_sam.Mask | None] = field(default_factory=list)


def _sam_spec(sam: str) -> ModelSpec:
    """Return the SAM family's spec for a checkpoint name: its key is the embedding cache's model key."""
    return ModelSpec("sam", sam)


class GroundedSamBackend(Backend):
    """Brush or polygon masks of the config's labels: open-vocabulary boxes, then SAM box prompts."""

    family = "grounded_sam"
    control_tags = (*BRUSH_TAGS, *POLYGON_TAGS)
    plain_tags = ("Brush", "Polygon")
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 4
    # Before instance segmentation (40), which takes a mask tag with a model_path otherwise; after
    # interactive SAM (5), which leaves tags naming another model alone.
    priority = 35
    default_model = "grounded_sam"
    default_threshold = ov.DEFAULT_THRESHOLDS["dino"]
    # The automatic route for labels no closed-vocabulary model knows (serving/plan/routing.py).
    zero_shot = True

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the names this family knows (any open-vocabulary model on a mask tag works too)."""
        return ("grounded_sam",)

    @classmethod
    def resolve(cls, name: str, path: str, settings: Settings, sam: str = "") -> str | None:
        """Return "<detector>+<sam>" for a mask tag's model_name / model_path / model_sam, or None when not ours."""
        name = name.strip()
        sam = sam.strip() or settings.sam_model or _sam.DEFAULT_MODEL
        if name.lower() in NAMES:
            detector = ov.open_vocab_name("", path, settings.model_dir) if path else None
            if detector is None and settings.detector:
                detector = ov.open_vocab_name(settings.detector, "", settings.model_dir)
            return f"{detector or 'grounding_dino'}+{sam}"
        if not name and not path:
            return None  # a mask tag naming no model stays with Mask R-CNN (DETECTOR is for rectangles)
        detector = ov.open_vocab_name(name, path, settings.model_dir)
        return f"{detector}+{sam}" if detector else None

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return the detector and SAM that `grounded_sam` means under these settings (for WARMUP)."""
        return cls.resolve("grounded_sam", "", settings) or ""

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for grounded_sam (the weights command fetches its default detector and SAM)."""
        return name.strip().lower() in NAMES

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim mask tags whose model_name picks an open-vocabulary detector (or grounded_sam)."""
        if obj.tag not in cls.object_tags:
            return []

        def pick(control: ControlTag) -> tuple[str | None, str]:
            path = control.attr("model_path")
            return cls.resolve(control.attr("model_name"), path, settings, control.attr("model_sam")), path

        return ov.prompt_claims(controls, cls.control_tags, cls.plain_tags, pick)

    # ---- the two models ----
    @staticmethod
    def parts(spec: ModelSpec) -> tuple[ModelSpec, ModelSpec]:
        """Return the detector's and SAM's specs of a grounded spec ("<detector>+<sam>", path = detector's)."""
        detector, _, sam = spec.name.partition("+")
        return ModelSpec("open_vocab", detector, spec.path), _sam_spec(sam or _sam.DEFAULT_MODEL)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return why the detector or SAM cannot load (with the commands that fetch them), else None."""
        detector, sam = cls.parts(spec)
        reasons = [
            reason
            for reason in (
                OpenVocabBackend.availability(detector, settings),
                SamBackend.availability(sam, settings),
            )
            if reason
        ]
        return "; ".join(reasons) or None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return both models' versions (names and weights fingerprints)."""
        detector, sam = cls.parts(spec)
        return f"{OpenVocabBackend.version_of(detector, settings)}+{SamBackend.version_of(sam, settings)}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return nothing of its own: the open_vocab and sam families list the weights it uses."""
        return []

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch what `grounded_sam` uses: DETECTOR's (or grounding_dino's) and SAM_MODEL's (or the default's) weights."""
        written: list[str] = []
        for name in models:
            resolved = cls.resolve(name, "", settings)
            if resolved is None:
                continue
            detector, sam = cls.parts(ModelSpec(cls.family, resolved))
            written += OpenVocabBackend.download_weights([detector.name], settings)
            written += SamBackend.download_weights([sam.name], settings)
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Build the detector's backend (not loaded) and remember SAM's checkpoint."""
        super().__init__(spec, settings)
        detector_spec, self.sam_spec = self.parts(spec)
        self.detector = OpenVocabBackend(detector_spec, settings)
        self.sam: _sam.SamModel | None = None

    def load(self, device: str) -> None:
        """Load the detector and SAM (local files only) onto the device."""
        self.detector.load(device)
        folder = _sam.checkpoint_folder(self.sam_spec.name, self.settings.model_dir)
        if folder is None:
            raise RuntimeError(
                SamBackend.availability(self.sam_spec, self.settings) or "SAM checkpoint not found"
            )
        self.sam = _sam.SamModel.load(folder, device)
        self.device = device
        log.info(
            "Grounded-SAM %s loaded (SAM %s, %d px)", self.spec.name, self.sam.flavor, self.sam.input_size
        )

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the larger of the detector's and SAM's working scales (the image serves both)."""
        sam_scale = self.sam.input_scale(size) if self.sam is not None else 1.0
        return max(self.detector.input_scale(size), sam_scale)

    def preprocess(self, item: Item) -> GsInput:
        """Make the detector's input, and SAM's pixels unless the image's embedding is cached (CPU pool)."""
        if item.image is None:
            raise InputError(f'task has no image for <{item.obj.tag} name="{item.obj.name}">')
        source = str((item.task.get("data") or {}).get(item.obj.value_key, ""))
        key = (self.sam_spec.key, image_identity(item.task_id, source))
        x = GsInput(self.detector.preprocess(item), key, item.size, item.image)
        if key not in self.embedding_cache() and self.sam is not None:
            x.pixel_values, x.input_hw = self.sam.pixels(item.image)
        return x

    def forward(self, batch: list[Any]) -> list[Any]:
        """Detect in every image, encode the images with boxes (once each, cached), decode one mask per box."""
        import torch

        if self.sam is None:
            raise RuntimeError("Grounded-SAM not loaded: call load() first")
        sam = self.sam
        inputs: list[GsInput] = batch
        if str(self.device).startswith("cpu"):
            torch.set_flush_denormal(True)  # per thread: the model thread only (see backends/sam.py)
        with torch.inference_mode():
            detections = self.detector.forward([x.det for x in inputs])
            # only images where something was found need SAM
            boxed = [i for i, det in enumerate(detections) if len(det.scores)]
            by_key = {inputs[i].key: inputs[i] for i in boxed}

            def encode(keys: list[tuple[str, str]]) -> list[_sam.Embedding]:
                return sam.encode_inputs([by_key[key] for key in keys])

            embeddings = (
                self.embedding_cache().get_many([inputs[i].key for i in boxed], encode) if boxed else []
            )
            jobs = []
            owners: list[dict[int, int]] = []  # per job: id(prompt) -> detection index
            for i, embedding in zip(boxed, embeddings, strict=True):
                det = detections[i]
                width, height = det.size
                prompts, owner = [], {}
                for k, box in enumerate(det.boxes_xyxy_px):
                    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
                    x1, y1 = min(float(width), float(box[2])), min(float(height), float(box[3]))
                    prompt = _sam.Prompt(box_xyxy_px=(x0, y0, x1, y1))
                    owner[id(prompt)] = k
                    prompts.append(prompt)
                jobs.append((embedding, prompts))
                owners.append(owner)
            decoded = sam.decode(jobs) if jobs else []
        outputs = [GsOutput(det, [None] * len(det.scores)) for det in detections]
        for i, masks, owner in zip(boxed, decoded, owners, strict=True):
            for mask in masks:
                outputs[i].masks[owner[id(mask.prompt)]] = mask
        return outputs

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one mask region per detection of this tag's labels: detector label and score, SAM mask."""
        out: GsOutput = output
        det = out.detections
        wanted = det.prompts.entries_for(self.detector.target_prompts(target))
        threshold = self.detector.threshold_of(target)
        tag = target.control.tag
        items: list[dict[str, Any]] = []
        brushes: list[tuple[_sam.Mask, float, str]] = []
        for k, mask in enumerate(out.masks):
            entry, score = int(det.entries[k]), float(det.scores[k])
            if mask is None or entry not in wanted or score < threshold:
                continue
            label = target.label_map(det.prompts.entries[entry].label)
            if label is None:
                continue
            if tag in BRUSH_TAGS:
                brushes.append((mask, score, label))
            else:
                tolerance = float_option(target, "model_polygon_tolerance", DEFAULT_POLYGON_TOLERANCE_PX)
                points = mask_polygon_px(mask.crop, mask.offset, tolerance)
                if points is not None:
                    items.extend(regions.polygon_items(target, points, det.size, score, label))
        # all masks of the image encoded in one pass, from their crops
        rles = crops_to_rle([(m.crop, m.offset) for m, _, _ in brushes], det.size)
        for (_, score, label), rle in zip(brushes, rles, strict=True):
            items.extend(
                regions.geometry_items(target, {"format": "rle", "rle": rle}, det.size, score, label)
            )
        return items
