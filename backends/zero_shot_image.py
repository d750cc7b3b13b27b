"""Zero-shot image classification with the config's own choices: SigLIP 2 / SigLIP (transformers).

Reached through label routing (serving/plan/routing.py) for a `Choices` tag on an `Image` whose
choices the ImageNet classifier does not know, or by `model_name="siglip2"` (or any SigLIP id /
save_pretrained() folder, or `zero_shot_image:<id>`). The default model is ZERO_SHOT_IMAGE_MODEL,
else google/siglip2-base-patch16-224 (SigLIP 2: better zero-shot accuracy than SigLIP and CLIP at the
same size, and its sigmoid scores are per label, which suits `choice="multiple"`).

Each choice is a prompt: the tag's `model_prompt` template ("This is a photo of {}." by default; `{}`
or `{label}` stands for the choice), filled with the choice's `predicted_values` (best phrase wins)
or its value. Image embeddings are computed batched; each prompt set's text embeddings once per
model (cached by prompts), on the model's own thread. Scores: `choice="multiple"` emits every choice
whose sigmoid probability (SigLIP's own, per label) reaches the threshold; single choice emits the
choice with the highest logit, scored by the softmax over the tag's choices (a distribution over
the options), when it reaches the threshold (`model_score_threshold`, default 0.1).
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _hf as hf
from serving.contract import Backend, ControlTag, Item, ModelSpec, ObjectTag, Target
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

KNOWN = {"siglip2": "google/siglip2-base-patch16-224", "siglip": "google/siglip-base-patch16-224"}
PREFIX = "zero_shot_image:"
DEFAULT_TEMPLATE = "This is a photo of {}."
MODEL_TYPES = ("siglip", "siglip2")


def source_of(spec: ModelSpec, settings: Settings) -> str:
    """Return what from_pretrained loads: model_path, a short name's hub id, or the id itself."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return str(path if path.is_absolute() else Path(settings.model_dir) / path)
    name = spec.name.removeprefix(PREFIX)
    return KNOWN.get(name.lower(), name)


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one tag: per choice its phrases, in the tag's order."""

    choices: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]


def prompt_set(target: Target) -> PromptSet:
    """Return a target's choices with their prompt texts (template x predicted_values or value)."""
    control = target.control
    template = target.option("model_prompt", "") or DEFAULT_TEMPLATE
    template = template.replace("{label}", "{}")
    if "{}" not in template:
        template = template + " {}"
    choices = target.label_map.config_labels
    phrases = []
    for choice in choices:
        raw = control.predicted_values.get(choice) or (control.label_values.get(choice, choice),)
        phrases.append(
            tuple(template.format(p.strip()) for p in raw if p.strip()) or (template.format(choice),)
        )
    return PromptSet(tuple(choices), tuple(phrases))


@dataclass
class _Input:
    tensors: dict[str, Any]
    prompts: tuple[PromptSet, ...]


class ZeroShotImageBackend(Backend):
    """SigLIP 2 / SigLIP scoring the config's choices on an image."""

    family = "zero_shot_image"
    control_tags = ("Choices",)
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 32
    priority = 65  # after the ImageNet classifier (60), which keeps choices it knows
    fp16 = True
    default_model = "siglip2"
    default_threshold = 0.1
    zero_shot = True
    whole_tag = True  # one choice among all of a tag's options needs every option scored by one model
    text_cache_size: ClassVar[int] = 64

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names (any SigLIP hub id or folder works too)."""
        return tuple(KNOWN)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for siglip2/siglip, zero_shot_image:<id>, or an id naming SigLIP."""
        lowered = name.strip().lower()
        return lowered in KNOWN or lowered.startswith(PREFIX) or "siglip" in lowered

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return ZERO_SHOT_IMAGE_MODEL when set, else siglip2."""
        return settings.zero_shot_image_model or cls.default_model

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Any]:
        """Claim Choices tags whose model_name picks SigLIP, or whose model_path is a SigLIP folder."""
        claims = super().claim(obj, controls, settings)
        if obj.tag not in cls.object_tags:
            return claims
        from serving.contract import Claim

        taken = {c.control.name for c in claims}
        for control in controls:
            path = control.attr("model_path")
            if (
                control.tag in cls.control_tags
                and path
                and not control.attr("model_name")
                and control.name not in taken
            ):
                folder = hf.local_folder(source_of(ModelSpec(cls.family, "", path), settings))
                if folder is not None and _model_type(folder) in MODEL_TYPES:
                    claims.append(Claim(control=control, model_name=folder.name, model_path=path))
        return claims

    # ---- weights ----
    @classmethod
    def _folder(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return hf.checkpoint_folder(source_of(spec, settings), settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint is local, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        folder = cls._folder(spec, settings)
        if folder is None or hf.weights_file(folder) is None:
            if spec.path:
                return f"model_path '{spec.path}' is not a save_pretrained() folder of a SigLIP model"
            return (
                f"weights of '{source_of(spec, settings)}' are not in the Hugging Face cache: run "
                f"`python -m serving weights download --model {spec.name}` where internet exists, or set "
                "ZERO_SHOT_IMAGE_MODEL / model_path to a save_pretrained() folder"
            )
        kind = _model_type(folder)
        if kind not in MODEL_TYPES:
            return f"'{folder}' holds a {kind or 'unknown'} model, not SigLIP ({', '.join(MODEL_TYPES)})"
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder."""
        return hf.folder_version(spec.name, cls._folder(spec, settings))

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where each known model's checkpoint is and whether it is present."""
        from backends._torchvision import WeightStatus

        out = []
        for name, repo in KNOWN.items():
            folder = hf.checkpoint_folder(repo)
            present = folder is not None and hf.weights_file(folder) is not None
            out.append(WeightStatus(name, str(folder) if folder else "(Hugging Face cache)", present, repo))
        return out

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch checkpoints into the Hugging Face cache (siglip2 when `models` is empty)."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or [cls.default_model]:
            repo = source_of(ModelSpec(cls.family, name), settings)
            if Path(repo).is_dir():
                written.append(repo)
                continue
            patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
            written.append(str(snapshot_download(repo, allow_patterns=patterns)))
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.text_length = 64
        self._text: OrderedDict[PromptSet, Any] = OrderedDict()

    def load(self, device: str) -> None:
        """Load the SigLIP model, tokenizer and image processor from the local checkpoint."""
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        folder = self._folder(self.spec, self.settings)
        if folder is None:
            raise FileNotFoundError(self.availability(self.spec, self.settings) or "checkpoint missing")
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        text_config = getattr(self.model.config, "text_config", None)
        self.text_length = int(getattr(text_config, "max_position_embeddings", 64) or 64)
        self.device = device

    def preprocess(self, item: Item) -> _Input:
        """Run the image processor (CPU) and note the prompt sets of the item's targets."""
        assert item.image is not None
        image = item.image.convert("RGB") if item.image.mode != "RGB" else item.image
        tensors = dict(self.image_processor(images=[image], return_tensors="pt"))
        prompts = tuple(dict.fromkeys(prompt_set(t) for t in item.targets if t.model == self.spec))
        return _Input(tensors, prompts)

    def _text_embeddings(self, prompts: PromptSet) -> Any:
        """Return the normalised text embeddings of a prompt set's phrases (computed once, cached)."""
        import torch

        cached = self._text.get(prompts)
        if cached is not None:
            self._text.move_to_end(prompts)
            return cached
        texts = [p for phrases in prompts.phrases for p in phrases]
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        if getattr(self.model.config, "model_type", "") == "siglip":
            tokens.pop("attention_mask", None)  # SigLIP was trained without one (max_length padding)
        embeds = _features(self.model.get_text_features(**tokens))
        embeds = torch.nn.functional.normalize(embeds.float(), dim=-1)
        self._text[prompts] = embeds
        while len(self._text) > self.text_cache_size:
            self._text.popitem(last=False)
        return embeds

    def forward(self, batch: list[Any]) -> list[Any]:
        """Embed the batch's images in one call; score each item's prompt sets; return logits per set."""
        import torch

        keys = batch[0].tensors.keys()
        inputs = {k: torch.cat([b.tensors[k] for b in batch]).to(self.device) for k in keys}
        images = torch.nn.functional.normalize(
            _features(self.model.get_image_features(**inputs)).float(), dim=-1
        )
        scale = self.model.logit_scale.float().exp()
        bias = self.model.logit_bias.float()
        outputs: list[dict[PromptSet, np.ndarray]] = [{} for _ in batch]
        for prompts in dict.fromkeys(p for b in batch for p in b.prompts):
            text = self._text_embeddings(prompts)
            logits = (images @ text.T * scale + bias).cpu().numpy().astype(np.float64)
            for i, b in enumerate(batch):
                if prompts in b.prompts:
                    outputs[i][prompts] = logits[i]
        return outputs

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the best choice (single) or every choice above the threshold (multiple)."""
        prompts = prompt_set(target)
        logits = output.get(prompts)
        if logits is None or not prompts.choices:
            return []
        # a choice's logit is its best phrase's
        per_choice = []
        k = 0
        for phrases in prompts.phrases:
            per_choice.append(float(np.max(logits[k : k + len(phrases)])))
            k += len(phrases)
        scores = np.asarray(per_choice)
        if target.option("choice", "single").strip().lower() == "multiple":
            probs = 1.0 / (1.0 + np.exp(-scores))
            order = [int(i) for i in np.argsort(-probs, kind="stable") if probs[i] >= target.threshold]
            if not order:
                return []
            return [regions.choices_item(target, [prompts.choices[i] for i in order], float(probs[order[0]]))]
        shifted = np.exp(scores - scores.max())
        probs = shifted / shifted.sum()
        best = int(np.argmax(probs))
        if probs[best] < target.threshold:
            return []
        return [regions.choices_item(target, [prompts.choices[best]], float(probs[best]))]


def _features(output: Any) -> Any:
    """Return the embedding tensor of get_*_features (a tensor, or an output with pooler_output)."""
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output


def _model_type(folder: Path) -> str:
    import json

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("model_type", "")) if isinstance(data, dict) else ""
