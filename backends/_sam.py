"""Segment Anything models (SAM 2 / 2.1 and SAM 1 / SlimSAM through transformers): load, encode, decode.

Shared by the families that turn prompts into masks (backends/sam.py: clicks and boxes from Label
Studio; an open-vocabulary detector's boxes next). The split follows the model: `encode` runs the
image encoder once per image (the expensive part, cached per process by serving/util/embeddings.py);
`decode` runs the prompt encoder and mask decoder on cached embeddings, for many prompts and many
images in one call. Coordinates here are pixels of the original image; the conversion to the
model's input space and the masks back to the original size happen here, the same way the
transformers processors do them (tests compare both).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from backends import _hf as hf

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/sam2.1-hiera-tiny"
SAM2_MODELS = (
    "facebook/sam2.1-hiera-tiny",
    "facebook/sam2.1-hiera-small",
    "facebook/sam2.1-hiera-base-plus",
    "facebook/sam2.1-hiera-large",
)
SAM1_MODELS = (
    "facebook/sam-vit-base",
    "facebook/sam-vit-large",
    "facebook/sam-vit-huge",
    "Zigeng/SlimSAM-uniform-50",
    "Zigeng/SlimSAM-uniform-77",
)
KNOWN_MODELS = SAM2_MODELS + SAM1_MODELS
# Other checkpoints of the same architectures (e.g. a fine-tuned "org/sam2.1-hiera-large-cells").
_NAME_PATTERN = re.compile(r"(^|/)(sam2(\.\d+)?[-_]hiera|sam[-_]vit|slimsam|medsam)", re.IGNORECASE)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# The pad label transformers' SAM prompt encoders skip (a point slot that is not a point).
PAD_LABEL = -10


def is_sam_name(name: str) -> bool:
    """Return True when a model_name names a SAM / SAM 2 checkpoint."""
    return name in KNOWN_MODELS or bool(_NAME_PATTERN.search(name))


# ---- where the weights are (no network) ----


def checkpoint_folder(source: str, model_dir: str = "") -> Path | None:
    """Return the folder holding config, processor config and weights of a checkpoint, or None.

    A local folder (model_path, or MODEL_DIR/<name>) first, else the Hugging Face cache snapshot
    that `python -m serving weights download` fills.
    """
    folder = hf.checkpoint_folder(source, model_dir)
    if folder is None:
        return None
    has_weights = hf.weights_file(folder) is not None
    has_processor = any((folder / f).is_file() for f in PROCESSOR_FILES)
    return folder if has_weights and has_processor else None


def flavor_of(folder: Path) -> str:
    """Return "sam2" or "sam" from a checkpoint's config.json (its model_type)."""
    import json

    try:
        model_type = str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}/config.json is not readable JSON: {exc}") from exc
    if model_type in {"sam2", "sam2_video"}:
        return "sam2"
    if model_type in {"sam", "sam_hq"}:
        return "sam" if model_type == "sam" else "sam_hq"
    raise ValueError(f"{folder} holds a '{model_type}' model, not SAM or SAM 2 (model_type sam / sam2)")


# ---- what flows between the stages ----


@dataclass
class Embedding:
    """One image's encoder output (batch dimension 1, on the model's device) and its geometry."""

    features: Any  # SAM 2: list of feature maps, high to low resolution; SAM: one tensor
    size: tuple[int, int]  # original (width, height) of the image, as Label Studio shows it
    input_hw: tuple[int, int]  # the resized image's (height, width) inside the model's square input

    @property
    def nbytes(self) -> int:
        """Return the bytes the feature maps hold (what the embedding cache counts)."""
        maps = self.features if isinstance(self.features, list | tuple) else [self.features]
        return int(sum(m.numel() * m.element_size() for m in maps))


@dataclass
class Prompt:
    """One object to segment: clicks (pixels of the original image, 1 positive / 0 negative) and/or a box."""

    points_px: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box_xyxy_px: tuple[float, float, float, float] | None = None
    label: str | None = None  # the config label the prompt carried (mapped to the mask tag later)


@dataclass
class Mask:
    """One decoded mask at the original size, as a boolean crop at (x0, y0), with its predicted IoU."""

    crop: np.ndarray  # (h, w) bool
    offset: tuple[int, int]  # (x0, y0) in the original image
    score: float
    prompt: Prompt


# ---- the model ----


class EncoderInput(Protocol):
    """What SamModel.encode_inputs reads and fills of one image (SAM's request, Grounded-SAM's input)."""

    size: tuple[int, int]  # original (width, height)
    image: Image.Image | None
    pixel_values: Any
    input_hw: tuple[int, int] | None


class SamModel:
    """A loaded SAM or SAM 2 model and its processor: pixels, encode, decode (model thread)."""

    def __init__(self, model: Any, processor: Any, flavor: str, device: str) -> None:
        """Keep a loaded model (eval mode, on device) and its processor."""
        self.model = model
        self.processor = processor
        self.flavor = flavor
        self.device = device
        self.input_size = int(model.config.prompt_encoder_config.image_size)
        proc_size = _processor_size(processor, flavor)
        if proc_size != self.input_size:
            raise ValueError(
                f"the processor resizes images to {proc_size} px but the model expects {self.input_size} px"
            )

    @classmethod
    def load(cls, folder: Path, device: str) -> SamModel:
        """Load a checkpoint folder (config.json, processor config, weights) onto the device, offline."""
        flavor = flavor_of(folder)
        model: Any
        processor: Any
        if flavor == "sam2":
            from transformers import Sam2Model, Sam2Processor

            model = Sam2Model.from_pretrained(str(folder), local_files_only=True)
            processor = Sam2Processor.from_pretrained(str(folder), local_files_only=True)
        elif flavor == "sam":
            from transformers import SamModel as HFSamModel
            from transformers import SamProcessor

            model = HFSamModel.from_pretrained(str(folder), local_files_only=True)
            processor = SamProcessor.from_pretrained(str(folder), local_files_only=True)
        else:
            raise ValueError(f"{folder}: {flavor} checkpoints are not supported (SAM and SAM 2 are)")
        model.eval().to(device)
        return cls(model, processor, flavor, device)

    # ---- CPU: pixels ----
    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Return the model input of one image (CPU, (1, 3, S, S)) and the resized image's (height, width)."""
        out = self.processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        if self.flavor == "sam":
            hw = tuple(int(v) for v in out["reshaped_input_sizes"][0].tolist())
        else:
            hw = (self.input_size, self.input_size)
        return out["pixel_values"], (int(hw[0]), int(hw[1]))

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale an image of (width, height) is decoded at without losing model detail.

        SAM resizes the longer side to S; SAM 2 stretches both sides to S, so its shorter side decides.
        """
        side = min(size) if self.flavor == "sam2" else max(size)
        return self.input_size / max(1, side)

    # ---- model thread: encode ----
    def encode(
        self,
        pixel_values: Sequence[torch.Tensor],
        sizes: Sequence[tuple[int, int]],
        input_hws: Sequence[tuple[int, int]],
    ) -> list[Embedding]:
        """Run the image encoder once on a batch; return one Embedding per image (own storage each)."""
        import torch

        batch = torch.cat(list(pixel_values)).to(self.device)
        features = self.model.get_image_embeddings(batch)
        out = []
        for i, (size, hw) in enumerate(zip(sizes, input_hws, strict=True)):
            if isinstance(features, list | tuple):
                # clone: a slice would keep the whole batch's storage alive in the cache
                per_image: Any = [f[i : i + 1].clone() if len(batch) > 1 else f for f in features]
            else:
                per_image = features[i : i + 1].clone() if len(batch) > 1 else features
            out.append(Embedding(per_image, (int(size[0]), int(size[1])), hw))
        return out

    def encode_inputs(self, inputs: Sequence[EncoderInput]) -> list[Embedding]:
        """Encode images for the embedding cache, recomputing the pixels of any whose pixels are gone.

        An input's pixels are made on the CPU pool when the cache missed at preprocess time; when the
        cache had the embedding then and evicted it since, they are made here from its image.
        """
        for x in inputs:
            if x.pixel_values is None:
                if x.image is None:
                    raise RuntimeError("no image to encode (the cached embedding was evicted meanwhile)")
                x.pixel_values, x.input_hw = self.pixels(x.image)
        hws = []
        for x in inputs:
            assert x.input_hw is not None  # set with the pixels
            hws.append(x.input_hw)
        return self.encode([x.pixel_values for x in inputs], [x.size for x in inputs], hws)

    # ---- model thread: decode ----
    def to_input_space(self, xy_px: np.ndarray, emb: Embedding) -> np.ndarray:
        """Map original-image pixel coordinates (..., 2) into the model's S x S input (as the processors do)."""
        width, height = emb.size
        in_h, in_w = emb.input_hw
        return xy_px * np.array([in_w / width, in_h / height], dtype=np.float64)

    def decode(self, jobs: Sequence[tuple[Embedding, Sequence[Prompt]]]) -> list[list[Mask]]:
        """Segment every prompt of every job (an image's embedding + its prompts); one list of masks per job.

        Prompts of the same shape (box or not, points per object, objects per image) from different
        images run as one batch through the mask decoder. A single click asks for SAM's three
        candidate masks and keeps the one with the best predicted IoU (SAM's own advice for
        ambiguous single points); boxes and several clicks ask for one.
        """
        results: list[list[Mask | None]] = [[None] * len(prompts) for _, prompts in jobs]
        groups: dict[tuple[Any, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for j, (_, prompts) in enumerate(jobs):
            # boxed and box-free objects of one image need separate calls (boxes apply to all objects)
            by_kind: dict[bool, list[int]] = defaultdict(list)
            for k, prompt in enumerate(prompts):
                if prompt.points_px or prompt.box_xyxy_px is not None:
                    by_kind[prompt.box_xyxy_px is not None].append(k)
            for boxed, ks in by_kind.items():
                n_points = max(len(prompts[k].points_px) for k in ks)
                multimask = not boxed and len(ks) == 1 and n_points == 1
                groups[(boxed, len(ks), n_points, multimask)].append((j, ks))
        for (boxed, _, n_points, multimask), members in groups.items():
            self._decode_group(jobs, members, boxed, n_points, multimask, results)
        return [[m for m in masks if m is not None] for masks in results]

    def _decode_group(
        self,
        jobs: Sequence[tuple[Embedding, Sequence[Prompt]]],
        members: list[tuple[int, list[int]]],
        boxed: bool,
        n_points: int,
        multimask: bool,
        results: list[list[Mask | None]],
    ) -> None:
        import torch

        points, labels, boxes = [], [], []
        for j, ks in members:
            emb, prompts = jobs[j]
            pts = np.zeros((len(ks), max(1, n_points), 2), dtype=np.float64)
            lab = np.full((len(ks), max(1, n_points)), PAD_LABEL, dtype=np.int64)
            box = np.zeros((len(ks), 4), dtype=np.float64)
            for row, k in enumerate(ks):
                prompt = prompts[k]
                if prompt.points_px:
                    xy = self.to_input_space(np.asarray(prompt.points_px, dtype=np.float64), emb)
                    pts[row, : len(xy)] = xy
                    lab[row, : len(xy)] = prompt.labels
                if prompt.box_xyxy_px is not None:
                    corners = np.asarray(prompt.box_xyxy_px, dtype=np.float64).reshape(2, 2)
                    box[row] = self.to_input_space(corners, emb).reshape(4)
            points.append(pts)
            labels.append(lab)
            boxes.append(box)
        dtype = torch.float32
        kwargs: dict[str, Any] = {"multimask_output": multimask}
        if n_points > 0:
            kwargs["input_points"] = torch.from_numpy(np.stack(points)).to(self.device, dtype)
            kwargs["input_labels"] = torch.from_numpy(np.stack(labels)).to(self.device)
        if boxed:
            kwargs["input_boxes"] = torch.from_numpy(np.stack(boxes)).to(self.device, dtype)
        embeddings = [jobs[j][0] for j, _ in members]
        kwargs["image_embeddings"] = _stack_features([e.features for e in embeddings])
        out = self.model(**kwargs)
        iou = out.iou_scores.float()  # (B, objects, candidates)
        best = (
            iou.argmax(dim=-1)
            if multimask
            else torch.zeros(iou.shape[:2], dtype=torch.long, device=iou.device)
        )
        low = torch.gather(
            out.pred_masks, 2, best[:, :, None, None, None].expand(-1, -1, 1, *out.pred_masks.shape[-2:])
        )[:, :, 0]  # (B, objects, h, w)
        scores = torch.gather(iou, 2, best[:, :, None])[:, :, 0].cpu().numpy()
        for b, (j, ks) in enumerate(members):
            emb, prompts = jobs[j]
            crops = self.to_original(low[b], emb)
            for row, k in enumerate(ks):
                crop = crops[row]
                if crop is not None:
                    results[j][k] = Mask(crop[2], (crop[0], crop[1]), float(scores[b, row]), prompts[k])

    def upsample(self, low_res: torch.Tensor, emb: Embedding) -> torch.Tensor:
        """Return mask logits (N, H, W) at the original size from low-resolution logits (N, h, w)."""
        import torch.nn.functional as F

        width, height = emb.size
        logits = low_res[:, None].float()
        if self.flavor == "sam":
            # SAM pads the resized image into the square input: undo the padding before resizing back
            logits = F.interpolate(
                logits, (self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
            logits = logits[..., : emb.input_hw[0], : emb.input_hw[1]]
        return F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)[:, 0]

    def to_original(self, low_res: torch.Tensor, emb: Embedding) -> list[tuple[int, int, np.ndarray] | None]:
        """Return each mask at the original size as (x0, y0, bool crop), None when empty (on device, then CPU)."""
        masks = self.upsample(low_res, emb) > 0.0
        out: list[tuple[int, int, np.ndarray] | None] = []
        for mask in masks:
            rows = mask.any(dim=1).nonzero()
            if rows.numel() == 0:
                out.append(None)
                continue
            cols = mask.any(dim=0).nonzero()
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            x0, x1 = int(cols[0]), int(cols[-1]) + 1
            out.append((x0, y0, mask[y0:y1, x0:x1].cpu().numpy()))
        return out


def _stack_features(features: Sequence[Any]) -> Any:
    """Concatenate per-image feature maps along the batch dimension (SAM 2: per level)."""
    import torch

    if len(features) == 1:
        return features[0]
    if isinstance(features[0], list | tuple):
        return [torch.cat([f[level] for f in features]) for level in range(len(features[0]))]
    return torch.cat(list(features))


def _processor_size(processor: Any, flavor: str) -> int:
    """Return the square input size the processor resizes (and pads) images to."""
    if flavor == "sam2":
        return int(processor.target_size)
    size = processor.image_processor.size
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(longest) if longest else 0
