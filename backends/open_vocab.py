"""Open-vocabulary detection: boxes for the project's own labels, with the labeling config's labels as prompts.

Claims `RectangleLabels` / `Rectangle` (+ its sibling `Labels`) on an `Image` when the tag's `model_name`
names an open-vocabulary model, or its `model_path` is such a checkpoint folder, or (for tags that name
no model) when the DETECTOR setting does; otherwise the torchvision detection family keeps those tags.

Models (transformers, by short name, Hugging Face id or `model_path` folder):
`grounding_dino` (IDEA-Research/grounding-dino-tiny), `grounding_dino_base`, `mm_grounding_dino` and
`llmdet` (MM-Grounding-DINO checkpoints), `owlv2` (google/owlv2-base-patch16-ensemble).

Each label is prompted by its `predicted_values` (synonyms) or its value, lower-cased; every box
leaves under the config label whose phrase produced it, found by token span (Grounding DINO) or query
index (OWLv2). See backends/_open_vocab.py for prompts, chunking and decoding.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _open_vocab as ov
from backends import _torchvision as tv
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
    import torch

    from serving.settings import Settings

log = logging.getLogger(__name__)

_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass
class OvInput:
    """One preprocessed image: uint8 CHW at the model's working size, its original size, the plan's prompts."""

    tensor: torch.Tensor
    size: tuple[int, int]  # original (width, height), as Label Studio shows the image
    prompts: ov.PromptSet
    floor: float  # the lowest score any of the item's targets keeps


@dataclass
class OvDetections:
    """One image's detections on the CPU, in original pixels; `entries` index `prompts.entries`."""

    boxes_xyxy_px: np.ndarray  # (N, 4) float64
    scores: np.ndarray  # (N,) float64
    entries: np.ndarray  # (N,) int64
    size: tuple[int, int]
    prompts: ov.PromptSet

    def labels(self) -> list[str]:
        """Return the config label of each detection."""
        return [self.prompts.entries[int(e)].label for e in self.entries]


def _size_value(size: Any, key: str) -> int | None:
    """Read one field of an image processor's size (a SizeDict or a plain dict)."""
    value = getattr(size, key, None)
    if value is None and isinstance(size, dict):
        value = size.get(key)
    return int(value) if value else None


class OpenVocabBackend(Backend):
    """Grounding DINO / MM-Grounding-DINO / LLMDet / OWLv2 boxes for the config's own labels."""

    family = "open_vocab"
    control_tags = ("RectangleLabels", "Rectangle")
    plain_tags: ClassVar[tuple[str, ...]] = ("Rectangle",)
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 4
    # Before detection (50), which would take the tag otherwise; after OCR (10), which claims the
    # rectangles of a config with a per-region TextArea.
    priority = 45
    fp16 = True
    default_model = "grounding_dino"
    default_threshold = ov.DEFAULT_THRESHOLDS["dino"]
    # The automatic route for labels no closed-vocabulary model knows (serving/plan/routing.py).
    zero_shot = True
    # IoU above which two boxes of one label are one object (per-label NMS, across prompt chunks too).
    nms_iou: ClassVar[float] = 0.5
    # Image x prompt-chunk rows in one model call: bounds GPU memory for long label lists.
    max_rows: ClassVar[int] = 16
    prompt_cache_size: ClassVar[int] = 64

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names this family knows (any Hugging Face id or folder of these models works too)."""
        return tuple(ov.KNOWN)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True when a model_name picks an open-vocabulary model."""
        return ov.open_vocab_name(name) is not None

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return DETECTOR when it names an open-vocabulary model, else grounding_dino."""
        chosen = ov.open_vocab_name(settings.detector, "", settings.model_dir) if settings.detector else None
        return chosen or cls.default_model

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim rectangle tags whose model_name/model_path (or DETECTOR) picks an open-vocabulary model."""
        if obj.tag not in cls.object_tags:
            return []

        def pick(control: ControlTag) -> tuple[str | None, str]:
            name, path = control.attr("model_name"), control.attr("model_path")
            if name or path:
                return ov.open_vocab_name(name, path, settings.model_dir), path
            chosen = (
                ov.open_vocab_name(settings.detector, "", settings.model_dir) if settings.detector else None
            )
            return chosen, path

        return ov.prompt_claims(controls, cls.control_tags, cls.plain_tags, pick)

    # ---- weights ----
    @classmethod
    def _folder_of(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return ov.local_folder(ov.source_of(spec.name, spec.path, settings.model_dir), settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the model's files are local, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        folder = cls._folder_of(spec, settings)
        if spec.path:
            if folder is None or not ov.weights_present(folder):
                return (
                    f"model_path '{spec.path}' is not a save_pretrained() folder of an open-vocabulary "
                    "detector (config.json and model weights)"
                )
        elif folder is None or not ov.weights_present(folder):
            source = ov.source_of(spec.name, "", settings.model_dir)
            return (
                f"weights of '{source}' are not in the Hugging Face cache: run "
                f"`python -m serving weights download --model {spec.name}` where internet exists (the Docker "
                "image does it at build time), or set model_path to a save_pretrained() folder"
            )
        kind = ov.model_type(folder)
        if kind not in ov.MODEL_KINDS:
            return (
                f"'{folder}' holds a {kind or 'unknown'} model, not an open-vocabulary detector "
                f"({', '.join(sorted(ov.MODEL_KINDS))})"
            )
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder's content."""
        folder = cls._folder_of(spec, settings)
        if folder is None or not ov.weights_present(folder):
            return f"{spec.name}@missing"
        return f"{spec.name}@{weights_fingerprint(folder)}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where each known model's checkpoint is expected and whether it is present."""
        out = []
        for model in ov.KNOWN.values():
            folder = ov.local_folder(model.repo)
            present = folder is not None and ov.weights_present(folder)
            out.append(
                tv.WeightStatus(
                    model.name, str(folder) if folder else "(Hugging Face cache)", present, model.repo
                )
            )
        return out

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch checkpoints into the Hugging Face cache (the defaults when `models` is empty)."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or list(ov.DEFAULT_DOWNLOADS):
            repo = ov.source_of(name, "", "")
            if Path(repo).is_dir():
                written.append(repo)  # a local folder: nothing to fetch
                continue
            folder = Path(snapshot_download(repo, allow_patterns=_ALLOW_PATTERNS))
            if not ov.weights_present(folder):  # a checkpoint published without safetensors
                folder = Path(
                    snapshot_download(repo, allow_patterns=[*_ALLOW_PATTERNS, "pytorch_model*.bin"])
                )
            written.append(str(folder))
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.kind = ov.kind_of(spec.name, None)
        self.mean: Any = None
        self.std: Any = None
        self.shortest: int = 800  # Grounding DINO's working size
        self.longest: int | None = 1333
        self.side = 960  # OWLv2's square
        self.max_text_len = 256
        self.query_len = 16
        self.text_threshold = float(settings.text_threshold)
        # Text encoded once per prompt set and reused across images; False encodes it with every image,
        # as the models do by themselves (the benchmark's baseline).
        self.cache_text = True
        self._text: Any = None
        self._vision: Any = None
        self._masks_fn: Any = None
        self._special: Any = None
        self._ids = (101, 102, 1012)  # [CLS], [SEP], "."
        self._prompt_sets: OrderedDict[tuple[ov.LabelPrompt, ...], ov.PromptSet] = OrderedDict()
        self._prompt_lock = threading.Lock()
        self._target_prompts: OrderedDict[int, tuple[Target, tuple[ov.LabelPrompt, ...]]] = OrderedDict()

    def load(self, device: str) -> None:
        """Load the checkpoint and its processor from local files onto the device."""
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        folder = self._folder_of(self.spec, self.settings)
        reason = self.availability(self.spec, self.settings)
        if folder is None or reason:
            raise RuntimeError(reason or f"no checkpoint for {self.spec.key}")
        # local_files_only: availability() found the files; nothing downloads while serving
        model = AutoModelForZeroShotObjectDetection.from_pretrained(str(folder), local_files_only=True)
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        kind = ov.MODEL_KINDS.get(str(model.config.model_type))
        if kind is None:
            raise RuntimeError(f"{folder}: {model.config.model_type} is not an open-vocabulary detector")
        model.eval().to(device)
        self.kind = kind
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32, device=device)[
            :, None, None
        ]
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32, device=device)[:, None, None]
        if kind == "dino":
            size = image_processor.size
            self.shortest = _size_value(size, "shortest_edge") or 800
            self.longest = _size_value(size, "longest_edge")
            self.max_text_len = int(model.config.max_text_len)
            inner = model.model
            self._text = _cached_text_backbone(inner.text_backbone)
            inner.text_backbone = self._text
            self._vision = _shared_image_backbone(inner.backbone)
            inner.backbone = self._vision
            self._masks_fn = importlib.import_module(
                type(inner).__module__
            ).generate_masks_with_special_tokens_and_transfer_map
            self._special = inner.special_tokens
            tok = self.tokenizer
            self._ids = (int(tok.cls_token_id), int(tok.sep_token_id), int(tok.convert_tokens_to_ids(".")))
            expected = [int(t) for t in self._special.tolist()][:3]
            if list(self._ids) != expected:
                log.warning(
                    "%s: tokenizer ids of [CLS], [SEP], '.' are %s, the model delimits phrases by %s",
                    self.spec.key,
                    self._ids,
                    expected,
                )
        else:
            self.side = int(model.config.vision_config.image_size)
            self.query_len = int(model.config.text_config.max_position_embeddings)
        self.model = model
        self.device = device
        log.info(
            "open-vocabulary %s (%s) loaded on %s from %s",
            self.spec.name,
            model.config.model_type,
            device,
            folder,
        )

    # ---- prompts ----
    def prompts_for(self, targets: Sequence[Target]) -> ov.PromptSet:
        """Return the prompt set of a plan's targets: built (and later encoded) once, then reused."""
        entries = ov.union_prompts(targets)
        with self._prompt_lock:
            found = self._prompt_sets.get(entries)
            if found is not None:
                self._prompt_sets.move_to_end(entries)
                return found
            # built under the lock: a fast tokenizer must not be called from two threads at once
            prompts = self._build_prompts(entries)
            self._prompt_sets[entries] = prompts
            while len(self._prompt_sets) > self.prompt_cache_size:
                self._prompt_sets.popitem(last=False)
            return prompts

    def _build_prompts(self, entries: tuple[ov.LabelPrompt, ...]) -> ov.PromptSet:
        prompts = ov.PromptSet(entries=entries)
        if not entries:
            return prompts
        if self.kind == "dino":
            cls_id, sep_id, dot_id = self._ids

            def tokenize(phrases: list[str]) -> list[list[int]]:
                return [list(ids) for ids in self.tokenizer(phrases, add_special_tokens=False)["input_ids"]]

            prompts.chunks = ov.dino_chunks(entries, tokenize, cls_id, sep_id, dot_id, self.max_text_len)
        else:
            phrases = [(i, p) for i, entry in enumerate(entries) for p in entry.phrases]
            enc = self.tokenizer(
                [p for _, p in phrases],
                padding="max_length",
                max_length=self.query_len,
                truncation=True,
            )
            prompts.query_ids = [list(r) for r in enc["input_ids"]]
            prompts.query_mask = [list(r) for r in enc["attention_mask"]]
            prompts.query_entry = tuple(i for i, _ in phrases)
        return prompts

    def target_prompts(self, target: Target) -> tuple[ov.LabelPrompt, ...]:
        """Return one target's label prompts (memoised: postprocess asks for every image)."""
        key = id(target)
        with self._prompt_lock:
            hit = self._target_prompts.get(key)
            if hit is not None and hit[0] is target:
                return hit[1]
        prompts = ov.label_prompts(ov.label_control(target))
        with self._prompt_lock:
            self._target_prompts[key] = (target, prompts)
            while len(self._target_prompts) > 4 * self.prompt_cache_size:
                self._target_prompts.popitem(last=False)
        return prompts

    def threshold_of(self, target: Target) -> float:
        """Return a target's score threshold: model_score_threshold, else this model's own default."""
        if target.option("model_score_threshold"):
            return float(target.threshold)
        return ov.DEFAULT_THRESHOLDS[self.kind]

    # ---- images ----
    def work_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Return the (width, height) the model sees the image at (OWLv2: before padding to its square)."""
        if self.kind == "dino":
            return ov.dino_resize(size, self.shortest, self.longest)
        return ov.owl_resize(size, self.side)

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale preprocess() resizes an image to (the resolver may decode large JPEGs smaller)."""
        return self.work_size(size)[0] / size[0]

    def preprocess(self, item: Item) -> OvInput:
        """Resize to the model's working size as uint8 and attach the plan's prompt set."""
        if item.image is None:
            raise InputError(f'task has no image for <{item.obj.tag} name="{item.obj.name}">')
        prompts = self.prompts_for(item.targets)
        if not prompts.entries:
            raise InputError("no config labels to prompt the open-vocabulary model with")
        floor = min((self.threshold_of(t) for t in item.targets), default=self.default_threshold)
        tensor = tv.image_to_tensor(tv.resize_to(item.image, self.work_size(item.size)))
        return OvInput(tensor, item.size, prompts, max(floor, 1e-3))

    def _normalised(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.to(self.device, non_blocking=str(self.device).startswith("cuda")).float().div_(255.0)
        return (x - self.mean) / self.std

    # ---- forward ----
    def forward(self, batch: list[Any]) -> list[Any]:
        """Detect in a batch of images; images of one prompt set run together, one output per input."""
        import torch

        out: list[Any] = [None] * len(batch)
        groups: dict[int, list[int]] = {}
        for index, x in enumerate(batch):
            groups.setdefault(id(x.prompts), []).append(index)
        # the runtime already runs forward under inference_mode; direct callers (bench, tests) may not
        with torch.inference_mode():
            for indices in groups.values():
                inputs = [batch[i] for i in indices]
                found = self._forward_dino(inputs) if self.kind == "dino" else self._forward_owl(inputs)
                for index, det in zip(indices, found, strict=True):
                    out[index] = det
        return out

    def _limit(self) -> int:
        return self.settings.max_detections if self.settings.max_detections > 0 else 100

    def _finish(
        self, x: OvInput, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> OvDetections:
        """Merge one image's candidates (all prompt chunks), keep the best per label, move them to the CPU."""
        import torch

        boxes = torch.cat([p[0] for p in parts])
        scores = torch.cat([p[1] for p in parts])
        entries = torch.cat([p[2] for p in parts])
        # a box under one original pixel wide or high is nothing an annotator can use
        sides = boxes[:, 2:] - boxes[:, :2]
        scores = torch.where((sides >= 1.0).all(dim=1), scores, torch.zeros_like(scores))
        keep = ov.select(boxes, scores, entries, x.floor, self.nms_iou, self._limit())
        table = torch.cat(
            [boxes[keep].float(), scores[keep].float()[:, None], entries[keep].float()[:, None]], 1
        )
        table_np = table.cpu().numpy().astype(np.float64)
        return OvDetections(
            boxes_xyxy_px=table_np[:, :4],
            scores=table_np[:, 4],
            entries=table_np[:, 5].astype(np.int64),
            size=x.size,
            prompts=x.prompts,
        )

    def _forward_dino(self, inputs: list[OvInput]) -> list[OvDetections]:
        prompts = inputs[0].prompts
        n_chunks = len(prompts.chunks)
        parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in inputs]
        images_per_call = max(1, self.max_rows // n_chunks)
        chunks_per_call = min(n_chunks, self.max_rows)
        for i0 in range(0, len(inputs), images_per_call):
            part = inputs[i0 : i0 + images_per_call]
            pixels, mask = self._dino_pixels(part)
            for c0 in range(0, n_chunks, chunks_per_call):
                chunk_ids = list(range(c0, min(n_chunks, c0 + chunks_per_call)))
                for offset, found in enumerate(self._run_dino(pixels, mask, part, prompts, chunk_ids)):
                    parts[i0 + offset].extend(found)
        return [self._finish(x, p) for x, p in zip(inputs, parts, strict=True)]

    def _dino_pixels(self, part: list[OvInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return normalised images padded bottom-right to the batch's largest, and their pixel mask."""
        import torch

        height = max(int(x.tensor.shape[1]) for x in part)
        width = max(int(x.tensor.shape[2]) for x in part)
        pixels = torch.zeros((len(part), 3, height, width), dtype=torch.float32, device=self.device)
        mask = torch.zeros((len(part), height, width), dtype=torch.long, device=self.device)
        for i, x in enumerate(part):
            h, w = int(x.tensor.shape[1]), int(x.tensor.shape[2])
            pixels[i, :, :h, :w] = self._normalised(x.tensor)
            mask[i, :h, :w] = 1
        return pixels, mask

    def _run_dino(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor,
        part: list[OvInput],
        prompts: ov.PromptSet,
        chunk_ids: list[int],
    ) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Run images x chunks as one batch; return each image's (boxes px, score, entry) per chunk."""
        import torch

        n_images, n_chunks = pixels.shape[0], len(chunk_ids)
        chunks = [prompts.chunks[k] for k in chunk_ids]
        width = max(len(c.input_ids) for c in chunks)
        ids = torch.zeros((n_chunks, width), dtype=torch.long)
        attention = torch.zeros((n_chunks, width), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk.input_ids)] = torch.tensor(chunk.input_ids)
            attention[row, : len(chunk.input_ids)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        # row r is image r // n_chunks with chunk r % n_chunks
        if self.cache_text:
            self._text.pending = self._text_features(prompts, chunk_ids, width).repeat(n_images, 1, 1)
        self._vision.repeats = n_chunks  # the image backbone runs once per image, not once per row
        try:
            out = self.model(
                pixel_values=pixels.repeat_interleave(n_chunks, 0),
                pixel_mask=mask.repeat_interleave(n_chunks, 0),
                input_ids=ids.repeat(n_images, 1),
                attention_mask=attention.repeat(n_images, 1),
            )
        finally:
            self._text.pending = None
            self._vision.repeats = 1
        logits = out.logits.view(n_images, n_chunks, *out.logits.shape[1:])
        boxes = ov.cxcywh_to_xyxy(out.pred_boxes.float()).view(n_images, n_chunks, -1, 4)
        scale = torch.tensor(
            [[x.size[0], x.size[1], x.size[0], x.size[1]] for x in part],
            dtype=torch.float32,
            device=boxes.device,
        )
        boxes = boxes * scale[:, None, None, :]
        found: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in part]
        for j, k in enumerate(chunk_ids):
            token_phrase, phrase_entry = self._chunk_maps(prompts, k)
            scores, entries = ov.dino_entry_scores(
                logits[:, j].float().sigmoid(),
                token_phrase,
                phrase_entry,
                len(prompts.entries),
                self.text_threshold,
            )
            for i in range(n_images):
                found[i].append((boxes[i, j], scores[i], entries[i]))
        return found

    def _chunk_maps(self, prompts: ov.PromptSet, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        key = ("maps", k, str(self.device))
        hit = prompts.cache.get(key)
        if hit is None:
            chunk = prompts.chunks[k]
            hit = (
                torch.tensor(chunk.token_phrase, dtype=torch.long, device=self.device),
                torch.tensor(chunk.phrase_entry, dtype=torch.long, device=self.device),
            )
            prompts.cache[key] = hit
        return hit

    def _text_features(self, prompts: ov.PromptSet, chunk_ids: list[int], width: int) -> torch.Tensor:
        """Return the text encoder's output for chunks (padded to width): each chunk encoded once per prompt set."""
        import torch

        feats = []
        for k in chunk_ids:
            key = ("text", k, str(self.device))
            cached = prompts.cache.get(key)
            if cached is None:
                ids = torch.tensor([prompts.chunks[k].input_ids], dtype=torch.long, device=self.device)
                cached = encode_dino_text(self._text.inner, self._masks_fn, self._special, ids)[0]
                prompts.cache[key] = cached
            feats.append(cached)
        out = feats[0].new_zeros((len(feats), width, feats[0].shape[-1]))
        for row, f in enumerate(feats):
            out[row, : f.shape[0]] = f
        return out

    def _forward_owl(self, inputs: list[OvInput]) -> list[OvDetections]:
        import torch

        prompts = inputs[0].prompts
        query_entry = self._query_entry(prompts)
        out: list[OvDetections] = []
        for i0 in range(0, len(inputs), self.max_rows):
            part = inputs[i0 : i0 + self.max_rows]
            canvas = torch.zeros(
                (len(part), 3, self.side, self.side), dtype=torch.float32, device=self.device
            )
            for i, x in enumerate(part):
                h, w = int(x.tensor.shape[1]), int(x.tensor.shape[2])
                # padded bottom-right with black before normalising, as OWLv2's processor does
                canvas[i, :, :h, :w] = x.tensor.to(self.device).float().div_(255.0)
            pixels = (canvas - self.mean) / self.std
            feature_map = self.model.image_embedder(pixel_values=pixels)[0]
            b, gh, gw, dim = feature_map.shape
            feats = feature_map.reshape(b, gh * gw, dim)
            if self.cache_text:
                queries = self._query_embeds(prompts)[None].expand(b, -1, -1)
            else:  # the model's own way: every image's queries encoded with it
                queries = self.encode_queries(prompts, copies=b).view(b, len(prompts.query_entry), -1)
            logits = self.model.class_predictor(feats, queries, None)[0]
            boxes = ov.cxcywh_to_xyxy(self.model.box_predictor(feats, feature_map).float())
            scores, entries = ov.query_entry_scores(logits, query_entry, len(prompts.entries))
            for i, x in enumerate(part):
                # boxes are relative to the padded square, whose side is the original's longer side
                out.append(self._finish(x, [(boxes[i] * float(max(x.size)), scores[i], entries[i])]))
        return out

    def _query_entry(self, prompts: ov.PromptSet) -> torch.Tensor:
        import torch

        key = ("query_entry", str(self.device))
        hit = prompts.cache.get(key)
        if hit is None:
            hit = torch.tensor(prompts.query_entry, dtype=torch.long, device=self.device)
            prompts.cache[key] = hit
        return hit

    def _query_embeds(self, prompts: ov.PromptSet) -> torch.Tensor:
        """Return OWLv2's normalised query embeddings of a prompt set, computed once per set."""
        key = ("queries", str(self.device))
        hit = prompts.cache.get(key)
        if hit is None:
            hit = self.encode_queries(prompts)
            prompts.cache[key] = hit
        return hit

    def encode_queries(self, prompts: ov.PromptSet, copies: int = 1) -> torch.Tensor:
        """Encode the prompt set's queries (`copies` times over, as the model does per image): normalised."""
        import torch

        ids = torch.tensor(prompts.query_ids, dtype=torch.long, device=self.device).repeat(copies, 1)
        mask = torch.tensor(prompts.query_mask, dtype=torch.long, device=self.device).repeat(copies, 1)
        parts = []
        for start in range(0, ids.shape[0], 256):
            pooled = self.model.owlv2.get_text_features(
                input_ids=ids[start : start + 256], attention_mask=mask[start : start + 256]
            ).pooler_output
            parts.append(pooled / torch.linalg.norm(pooled, dim=-1, keepdim=True))
        return torch.cat(parts)

    # ---- output ----
    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one rectangle per detection of this tag's labels above its threshold."""
        det: OvDetections = output
        wanted = det.prompts.entries_for(self.target_prompts(target))
        threshold = self.threshold_of(target)
        items: list[dict[str, Any]] = []
        for k in range(det.scores.shape[0]):
            entry = int(det.entries[k])
            score = float(det.scores[k])
            if entry not in wanted or score < threshold:
                continue
            label = target.label_map(det.prompts.entries[entry].label)
            if label is None:
                continue
            items.extend(regions.rectangle_items(target, det.boxes_xyxy_px[k], det.size, score, label))
        return items


def encode_dino_text(
    text_backbone: Any, masks_fn: Any, special_tokens: Any, input_ids: torch.Tensor
) -> torch.Tensor:
    """Run Grounding DINO's text encoder on prompts exactly as the model does (phrase-block attention)."""
    import torch

    attention, positions = masks_fn(input_ids, special_tokens=special_tokens)
    out = text_backbone(
        input_ids, attention[:, None], torch.zeros_like(input_ids), positions, return_dict=True
    )
    return out.last_hidden_state


def _cached_text_backbone(inner: Any) -> Any:
    """Wrap Grounding DINO's text encoder so that a forward can hand it features computed beforehand."""
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutput

    class CachedTextBackbone(nn.Module):
        """Returns `pending` (set around one model call) instead of re-encoding the same prompts."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.pending: Any = None

        def forward(self, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
            pending = self.pending
            if pending is not None and tuple(pending.shape[:2]) == tuple(input_ids.shape):
                return BaseModelOutput(last_hidden_state=pending)
            return self.inner(input_ids, *args, **kwargs)

    return CachedTextBackbone()


def _shared_image_backbone(inner: Any) -> Any:
    """Wrap Grounding DINO's image backbone so that rows repeating one image (prompt chunks) share one run."""
    from torch import nn

    class SharedImageBackbone(nn.Module):
        """With `repeats` = r, rows come in runs of r copies of one image: run each image once."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.position_embedding = inner.position_embedding
            self.repeats = 1

        def forward(self, pixel_values: Any, pixel_mask: Any) -> Any:
            r = self.repeats
            if r <= 1:
                return self.inner(pixel_values, pixel_mask)
            features, positions = self.inner(pixel_values[::r], pixel_mask[::r])
            features = [(f.repeat_interleave(r, 0), m.repeat_interleave(r, 0)) for f, m in features]
            return features, [p.repeat_interleave(r, 0) for p in positions]

    return SharedImageBackbone()
