"""Generation: TextArea (and prompted Choices) from a language model (Text, HyperText, Paragraphs) or a vision-language model (Image).

Two families share this module: `text_generation` (input text, lowest priority, so any classifier or
tagger claims first) and `vision_generation` (input image, before OCR, which keeps every TextArea of an
image that has OCR signals). Engines: transformers in process (LLM_TEXT_MODEL, LLM_VISION_MODEL, a
Hugging Face id or folder; model_name "llm" / "vlm") or any OpenAI-compatible server (LLM_BASE_URL,
LLM_API_KEY, LLM_MODEL; model_name "openai" or "openai:<model>"). Prompts: backends/_llm_prompts.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from backends import _hf
from backends import _llm_prompts as prompts
from backends._llm_prompts import Reply, Request
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

REMOTE = "openai"
# A TextArea on an image that is a transcription box is OCR's (backends/ocr.py), not a caption.
_OCR_WORDS = re.compile(r"transcri|ocr|recogni", re.IGNORECASE)
_OCR_ENGINES = ("easyocr", "tesseract")


def _is_true(value: str) -> bool:
    return value.strip().lower() in {"true", "1", "yes", "on"}


def remote_model(name: str, settings: Settings) -> str | None:
    """Return the server's model name for "openai[:model]" (LLM_MODEL when none is given), else None."""
    head, _, rest = name.partition(":")
    if head != REMOTE:
        return None
    return rest.strip() or str(getattr(settings, "llm_model", "") or "")


class _Generation(Backend):
    """What both generation families share: claims, prompts, engines, versions, weights."""

    control_tags = ("TextArea", "Choices", "Rating")
    # The model loads in bf16 (fp16) on CUDA itself; autocast around generate would only add casts.
    fp16 = False
    local_name: ClassVar[str] = ""
    vision: ClassVar[bool] = False
    setting: ClassVar[str] = ""  # the Settings field naming the in-process model

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the engine starts in load()."""
        super().__init__(spec, settings)
        self.engine: Any = None

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the names a tag's model_name may give: the in-process model, or the server."""
        return (cls.local_name, REMOTE)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Accept the in-process name ("llm" / "vlm"), "openai" and "openai:<model>"."""
        return name == cls.local_name or remote_model(name, _NO_SETTINGS) is not None

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return the server when LLM_BASE_URL is set, else the in-process model."""
        return REMOTE if getattr(settings, "llm_base_url", "") else cls.local_name

    @classmethod
    def source(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the in-process model a spec loads: the tag's model_path, else the setting (id or folder)."""
        return spec.path or str(getattr(settings, cls.setting, "") or "")

    @classmethod
    def folder(cls, spec: ModelSpec, settings: Settings) -> Any:
        """Return the checkpoint folder of an in-process spec (a folder, MODEL_DIR/<name>, the HF cache), or None."""
        return _hf.checkpoint_folder(
            cls.source(spec, settings), str(getattr(settings, "model_dir", "") or "")
        )

    @classmethod
    def _ready(cls, settings: Settings) -> bool:
        """Return True when the default model can answer here (a server is set, or the weights are local)."""
        spec = ModelSpec(cls.family, cls.default_model_for(settings))
        try:
            return cls.availability(spec, settings) is None
        except Exception:
            return False

    @classmethod
    def wants(cls, control: ControlTag, on_object: Sequence[ControlTag], settings: Settings) -> bool:
        """Return True when an unnamed control is ours: see the subclasses."""
        raise NotImplementedError

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim TextAreas (never perRegion ones: OCR's) and Choices this family answers on the object."""
        if obj.tag not in cls.object_tags:
            return []
        on_object = [c for c in controls if c.to_name == obj.name]
        claims = []
        for control in on_object:
            if control.tag not in cls.control_tags or _is_true(control.attr("perRegion")):
                continue
            name = control.attr("model_name")
            if name and not cls.accepts_model(name):
                continue
            if not name and not cls.wants(control, on_object, settings):
                continue
            model = name or cls.default_model_for(settings)
            path = control.attr("model_path") if remote_model(model, settings) is None else ""
            claims.append(Claim(control=control, model_name=model, model_path=path))
        return claims

    @classmethod
    def supported(cls) -> tuple[str, ...]:
        """Return what this family fills."""
        return tuple(f"{tag} on {', '.join(cls.object_tags)} (generated)" for tag in cls.control_tags)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the server is configured or the checkpoint is local, else what to do."""
        if remote_model(spec.name, settings) is not None:
            if not getattr(settings, "llm_base_url", ""):
                return "model_name names the generation server but LLM_BASE_URL is not set (e.g. http://vllm:8000/v1)"
            if not remote_model(spec.name, settings):
                return (
                    'no model for the generation server: set LLM_MODEL or write model_name="openai:<model>"'
                )
            return None
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            return "generation needs transformers: pip install -r requirements.txt"
        folder = cls.folder(spec, settings)
        if folder is None or (_hf.weights_file(folder) is None and not any(folder.glob("*.safetensors"))):
            source = cls.source(spec, settings)
            return (
                f"the {cls.family} model {source} is not downloaded: run "
                f"`python -m serving weights download --model {cls.local_name}` where internet is available "
                f"(or point {cls.setting.upper()} / model_path at a save_pretrained() folder)"
            )
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model's identity: the server's model name, or the checkpoint and its fingerprint."""
        remote = remote_model(spec.name, settings)
        if remote is not None:
            return f"{REMOTE}:{remote}"
        folder = cls.folder(spec, settings)
        return f"{cls.source(spec, settings)}@{weights_fingerprint(folder) if folder else 'missing'}"

    @classmethod
    def target_version(cls, target: Target, settings: Settings) -> str:
        """Return the digest of the target's prompt (template or default, system prompt, token budget)."""
        return prompts.target_version(target, cls._system(settings), cls._budget(settings))

    @staticmethod
    def _system(settings: Settings) -> str:
        return str(getattr(settings, "llm_system_prompt", "") or "")

    @staticmethod
    def _budget(settings: Settings) -> int:
        return int(getattr(settings, "llm_max_new_tokens", 256) or 256)

    # ---- weights ----
    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where the in-process model lives and whether it is present."""
        from backends._torchvision import WeightStatus

        spec = ModelSpec(cls.family, cls.local_name)
        folder = cls.folder(spec, settings)
        present = cls.availability(spec, settings) is None
        source = cls.source(spec, settings)
        return [
            WeightStatus(cls.local_name, str(folder) if folder else "(Hugging Face cache)", present, source)
        ]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch the in-process model (only when asked: `--model llm` / `--model vlm`, several GB each)."""
        if cls.local_name not in models:
            if not models:
                log.info(
                    "%s: not part of the default download (several GB): fetch it with --model %s",
                    cls.family,
                    cls.local_name,
                )
            return []
        from huggingface_hub import snapshot_download

        source = cls.source(ModelSpec(cls.family, cls.local_name), settings)
        if _hf.local_folder(source) is not None:
            return [source]
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
        return [snapshot_download(source, allow_patterns=patterns)]

    # ---- runtime ----
    def load(self, device: str) -> None:
        """Start the engine: the server's client, or the in-process model on the device."""
        from backends._llm_engines import OpenAIEngine, TransformersEngine

        s = self.settings
        remote = remote_model(self.spec.name, s)
        if remote is not None:
            self.engine = OpenAIEngine(
                str(getattr(s, "llm_base_url", "")),
                str(getattr(s, "llm_api_key", "")),
                remote,
                concurrency=int(getattr(s, "llm_concurrency", 8)),
                retries=int(getattr(s, "llm_retries", 3)),
                timeout_s=float(getattr(s, "llm_task_timeout_s", 60.0)),
            )
        else:
            folder = self.folder(self.spec, s)
            if folder is None:
                raise RuntimeError(self.availability(self.spec, s) or "model not found")
            self.engine = TransformersEngine(
                str(folder), self.vision, float(getattr(s, "llm_task_timeout_s", 60.0))
            )
        self.engine.load(device)
        self.device = device

    def requests_for(self, item: Item) -> list[tuple[str, Request]]:
        """Return (control name, request) for every target of the item's group."""
        system, budget = self._system(self.settings), self._budget(self.settings)
        return [(t.control.name, prompts.build(t, item, system, budget)) for t in item.targets]

    def preprocess(self, item: Item) -> Any:
        """Build the prompts of every target on this item (CPU)."""
        return self.requests_for(item)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Generate every prompt of every item in one engine call; return {control: Reply} per item."""
        flat = [request for requests in batch for _, request in requests]
        replies = self.engine.generate(flat) if flat else []
        out: list[dict[str, Reply]] = []
        k = 0
        for requests in batch:
            mine: dict[str, Reply] = {}
            for name, _ in requests:
                mine[name] = replies[k]
                k += 1
            out.append(mine)
        return out

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn a reply into a textarea item, or the config choices it names (strictly)."""
        reply: Reply | None = output.get(target.control.name)
        if reply is None:
            return []
        if reply.error:
            # no result: Label Studio asks for this task again on the next "Retrieve predictions"
            raise InputError(reply.error)
        if target.control.tag == "Rating":
            rating = prompts.parse_rating(reply.text, target)
            return [] if rating is None else [regions.rating_item(target, rating, reply.score)]
        if target.control.tag == "Choices":
            chosen = prompts.parse_choices(reply.text, target)
            if not chosen:
                return []
            return [regions.choices_item(target, chosen, reply.score)]
        if not reply.text:
            log.info("task %s: the model wrote nothing for %s", item.task_id, target.control.name)
            return []
        return [regions.textarea_item(target, [reply.text], reply.score)]


class _NoSettings:
    """Stand-in settings for name checks that need none."""

    llm_model = ""


_NO_SETTINGS: Any = _NoSettings()


class TextGenerationBackend(_Generation):
    """TextArea and Choices on Text, HyperText and Paragraphs from an instruction-tuned language model."""

    family = "text_generation"
    object_tags = ("Text", "HyperText", "Paragraphs")
    input_kind = "text"
    max_batch_size = 16
    priority = 1000  # last: a tagger, classifier or zero-shot model of the config's tags claims first
    local_name = "llm"
    setting = "llm_text_model"
    default_model = "llm"

    @classmethod
    def wants(cls, control: ControlTag, on_object: Sequence[ControlTag], settings: Settings) -> bool:
        """Unnamed: a TextArea when a model can answer or it is all the object has; Choices with an LLM prompt.

        A Choices tag without `model_prompt` is text classification's (backends/text_classification.py,
        reached through label routing): a zero-shot classifier scores every choice, which a reply cannot.
        """
        if control.tag == "Choices" and not control.attr("model_prompt").strip():
            return False
        if cls._ready(settings):
            return True
        return control.tag == "TextArea" and all(c.tag == "TextArea" for c in on_object)


class VisionGenerationBackend(_Generation):
    """TextArea on an Image (captions, answers to the task's question) from a vision-language model."""

    family = "vision_generation"
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 8
    priority = 9  # before OCR, which keeps every TextArea of an image with OCR signals (see wants)
    local_name = "vlm"
    vision = True
    setting = "llm_vision_model"
    default_model = "vlm"

    @classmethod
    def wants(cls, control: ControlTag, on_object: Sequence[ControlTag], settings: Settings) -> bool:
        """Unnamed: a page-level TextArea of an image without OCR signals (Choices and Rating need a model_name)."""
        if control.tag != "TextArea":
            return False
        words = f"{control.name} {control.attr('placeholder')}"
        if _OCR_WORDS.search(words):
            return False
        for other in on_object:
            if other.tag == "TextArea" and _is_true(other.attr("perRegion")):
                return False
            if other.attr("model_name").split(":", 1)[0].strip().lower() in _OCR_ENGINES:
                return False
        # where no model is here, only a pure captioning config is ours (its /setup says how to fetch one)
        return cls._ready(settings) or all(c.tag == "TextArea" for c in on_object)

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale that brings the image under LLM_IMAGE_MAX_PIXELS."""
        limit = int(getattr(self.settings, "llm_image_max_pixels", 0) or 0)
        pixels = size[0] * size[1]
        return 1.0 if limit <= 0 or pixels <= limit else (limit / pixels) ** 0.5

    def preprocess(self, item: Item) -> Any:
        """Shrink the image to the pixel budget (RGB), then build the prompts."""
        from PIL import Image as PILImage

        assert item.image is not None
        image = item.image.convert("RGB") if item.image.mode != "RGB" else item.image
        scale = self.input_scale(item.size)
        if scale < 1.0:
            width, height = item.size
            image = image.resize(
                (max(28, round(width * scale)), max(28, round(height * scale))), PILImage.Resampling.BICUBIC
            )
        shrunk = Item(
            task=item.task,
            obj=item.obj,
            image=image,
            text=item.text,
            value=item.value,
            context=item.context,
            original_size=item.size,
            targets=item.targets,
        )
        return self.requests_for(shrunk)
