"""Audio classification and sound events with the config's labels: CLAP zero-shot, or a supervised classifier.

- `Choices` on `Audio`/`AudioPlus` (intent, emotion, speaker gender, scene, ...): each choice
  is a prompt for CLAP (`model_prompt`, default "This is a sound of {}.", filled with the choice's
  `predicted_values` phrases or its value). The file is cut into the model's own 10 s windows; their
  normalised embeddings are averaged into one. Single choice: the softmax over the tag's choices,
  the best one when it reaches the threshold (default 0.1); `choice="multiple"`: every choice whose
  softmax share reaches it (CLAP's scores are contrastive, not per-label probabilities).
- `Labels` on the audio with no per-region TextArea (*Sound event detection*; Whisper takes Labels that
  a per-region TextArea transcribes): windows of SOUND_EVENT_WINDOW_S every SOUND_EVENT_HOP_S seconds,
  each scored by the softmax over the tag's labels plus a background prompt (`model_background`,
  default "background noise", "" for none); windows quieter than -60 dBFS score nothing. Windows
  become regions {start, end, labels} in seconds (see _audio_windows.merge_events), threshold 0.5.
  A per-region `Choices` on the same audio (*Intent classification*) is linked to the Labels tag: each
  region gets the choice of the windows inside it, under the region's id.
- A supervised classifier (any `AutoModelForAudioClassification` checkpoint: AST, wav2vec2, HuBERT,
  BEATs-style fine-tunes) by `model_name="audio_classification:<id>"`, a cached id, or `model_path`:
  its `id2label` mapped through the label map; softmax for a single choice, sigmoid for multiple
  choices and for events.
- *Speaker segmentation* (a Labels tag whose labels all name speakers): a diarization model through
  `AutoModelForAudioFrameClassification`, SPEAKER_MODEL (default nvidia/Nemotron-3-Diarization: up to 8
  speakers every 10 ms over a whole recording, OpenMDW licence, no gated agreement; pyannote's weights are
  gated and need pyannote.audio). Each speaker's frames at or above the threshold (0.5) become regions;
  speakers take the config's labels in order of first speech ("Speaker one" speaks first).

The default model is CLAP_MODEL (laion/larger_clap_general: LAION's later CLAP checkpoint trained on
general audio, music and speech, which covers both the sound-event and the speech templates; the
2023 laion/clap-htsat-unfused is `model_name="clap-htsat-unfused"`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _audio_windows as aw
from backends import _hf as hf
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    LabelMap,
    ModelSpec,
    ObjectTag,
    Target,
)
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

AUDIO_OBJECTS = ("Audio", "AudioPlus")
PREFIX = "audio_classification:"
KNOWN = {
    "clap-general": "laion/larger_clap_general",
    "clap-music-speech": "laion/larger_clap_music_and_speech",
    "clap-htsat-unfused": "laion/clap-htsat-unfused",
    "clap-htsat-fused": "laion/clap-htsat-fused",
}
SPEAKER_MODEL = "speaker_segmentation"
MIN_GAP_S = 0.2  # speaker regions: pauses shorter than this do not split a turn
_SPEAKER = re.compile(
    r"\b(speaker|spk|narrator|interviewer|interviewee|caller|agent)\b|^(person|voice) ?\d", re.I
)
DEFAULT_TEMPLATE = "This is a sound of {}."
DEFAULT_BACKGROUND = "background noise"
CHOICE_THRESHOLD = 0.1
EVENT_THRESHOLD = 0.5
SILENCE_DBFS = -60.0
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def source_of(spec: ModelSpec, settings: Settings) -> str:
    """Return what from_pretrained loads: model_path, CLAP_MODEL for "clap", a short name's id, or the id."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return str(path if path.is_absolute() else Path(settings.model_dir) / path)
    name = spec.name.removeprefix(PREFIX)
    if name == "clap":
        return settings.clap_model
    if name == SPEAKER_MODEL:
        return settings.speaker_model
    return KNOWN.get(name.lower(), name)


def _config(folder: Path | None) -> dict[str, Any]:
    if folder is None:
        return {}
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_kind(folder: Path | None) -> str:
    """Return "clap", "classifier", "frames" (a per-frame head: diarization) or "" from a config.json."""
    data = _config(folder)
    if data.get("model_type") == "clap":
        return "clap"
    if any(str(a).endswith("ForAudioFrameClassification") for a in data.get("architectures") or ()):
        return "frames"
    if any(str(a).endswith("ForAudioClassification") for a in data.get("architectures") or ()):
        return "classifier"
    return ""


def is_speaker_tag(control: ControlTag) -> bool:
    """Return True for a Labels tag whose labels all name speakers (the *Speaker segmentation* template)."""
    return (
        control.tag == "Labels" and bool(control.labels) and all(_SPEAKER.search(x) for x in control.labels)
    )


@dataclass(frozen=True)
class PromptSet:
    """One tag's prompts: per label its phrases in the tag's order, then the background phrase ("" = none)."""

    labels: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]
    background: str = ""
    # "clip" (Choices: the whole file), "events" (Labels: sliding windows), "region" (per-region Choices)
    view: str = "clip"

    def texts(self) -> list[str]:
        """Return every phrase to embed, the background last."""
        flat = [p for group in self.phrases for p in group]
        return flat + ([self.background] if self.background else [])


def prompt_set(target: Target) -> PromptSet:
    """Return a target's labels with their prompt texts (template x predicted_values or value)."""
    view = "events" if target.control.tag == "Labels" else "clip"
    return _prompts(target.control, target.label_map.config_labels, view)


def region_prompt_set(target: Target) -> PromptSet | None:
    """Return the prompts of the per-region Choices linked to a sound-event target (None without one)."""
    choices = target.linked.get("choices")
    return _prompts(choices, choices.labels, "region") if choices is not None else None


def _prompts(control: ControlTag, labels: Sequence[str], view: str) -> PromptSet:
    template = (control.attr("model_prompt") or DEFAULT_TEMPLATE).replace("{label}", "{}")
    if "{}" not in template:
        template += " {}"
    phrases = []
    for label in labels:
        raw = control.predicted_values.get(label) or (control.label_values.get(label, label),)
        phrases.append(
            tuple(template.format(p.strip()) for p in raw if p.strip()) or (template.format(label),)
        )
    background = ""
    if view == "events":
        phrase = control.attr("model_background", DEFAULT_BACKGROUND).strip()
        if phrase and phrase.casefold() not in {x.casefold() for x in labels}:
            background = template.format(phrase)
    return PromptSet(tuple(labels), tuple(phrases), background, view)


def threshold_of(target: Target) -> float:
    """Return the tag's model_score_threshold, else 0.1 for Choices and 0.5 for sound events."""
    if target.option("model_score_threshold"):
        return target.threshold
    return CHOICE_THRESHOLD if target.control.tag == "Choices" else EVENT_THRESHOLD


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


@dataclass
class Prepared:
    """One task's audio for the model: the windows of each view ("clip", "events") and what they need."""

    duration: float
    spans: dict[str, list[tuple[float, float]]]
    loud: dict[str, np.ndarray]  # per view: which windows are above the silence floor
    mel: np.ndarray | None = None  # CLAP: the file's log-mel (frames, bins)
    samples: np.ndarray | None = None  # a supervised classifier: the samples, featurised per window group
    prompts: tuple[PromptSet, ...] = ()


@dataclass
class Scored:
    """The model's answer for one task: per view the windows and their scores (CLAP per prompt set)."""

    duration: float
    spans: dict[str, list[tuple[float, float]]]
    loud: dict[str, np.ndarray]
    clap: dict[tuple[str, PromptSet], np.ndarray] = field(default_factory=dict)  # logits per phrase
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # classifier: (windows, classes)
    # per-region Choices (CLAP): the events windows' embeddings, each region prompt set's text embeddings
    events: np.ndarray | None = None
    texts: dict[PromptSet, np.ndarray] = field(default_factory=dict)
    scale: float = 1.0


class AudioClassificationBackend(Backend):
    """CLAP (zero-shot) or a supervised audio classifier for Choices and sound-event Labels on audio."""

    family = "audio_classification"
    control_tags = ("Choices", "Labels")
    object_tags = AUDIO_OBJECTS
    input_kind = "audio"
    max_batch_size = 8  # tasks; their windows are batched by window_batch
    priority = 70  # after Whisper (30), which takes the Labels tags a per-region TextArea transcribes
    fp16 = True
    default_model = "clap"
    default_threshold = EVENT_THRESHOLD
    zero_shot = True
    whole_tag = True  # a single choice (and a window's label) needs every label scored together
    window_batch: ClassVar[int] = 64  # windows per encoder call: bounds GPU memory
    clip_window_s: ClassVar[float] = 10.0  # a supervised classifier's window for Choices (AST: 10.24 s)
    text_cache_size: ClassVar[int] = 64

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names (any CLAP or audio-classification id or folder works too)."""
        return ("clap", *KNOWN, SPEAKER_MODEL)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for the short names, audio_classification:<id>, ids naming CLAP, cached classifiers."""
        lowered = name.strip().lower()
        if lowered in cls.model_names() or lowered.startswith(PREFIX) or "clap" in lowered:
            return True
        return bool(name.strip()) and model_kind(hf.checkpoint_folder(name.strip())) == "classifier"

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim tags naming one of our models, or whose model_path is a CLAP / audio classifier folder."""
        claims = super().claim(obj, controls, settings)
        if obj.tag not in cls.object_tags:
            return claims
        taken = {c.control.name for c in claims}
        for control in controls:
            path = control.attr("model_path")
            if control.tag not in cls.control_tags or not path or control.attr("model_name"):
                continue
            folder = hf.local_folder(source_of(ModelSpec(cls.family, "", path), settings))
            if control.name not in taken and model_kind(folder):
                claims.append(Claim(control=control, model_name=Path(path).name, model_path=path))
        return claims

    @classmethod
    def route_claim(
        cls, obj: ObjectTag, claim: Claim, controls: Sequence[ControlTag], settings: Settings
    ) -> Claim | None:
        """Take whole-file Choices and Labels tags on audio; a speaker Labels tag gets the not-served speaker model."""
        routed = super().route_claim(obj, claim, controls, settings)
        if routed is not None and claim.control.attr("perRegion").strip().lower() == "true":
            return None  # a choice per region needs regions first: not a whole-file answer
        if routed is not None and is_speaker_tag(claim.control):
            return Claim(control=claim.control, model_name=SPEAKER_MODEL)
        if routed is not None and claim.control.tag == "Labels":
            per_region = _per_region_choices(claim.control, controls)
            if per_region is not None:
                return Claim(
                    routed.control, routed.model_name, linked={**routed.linked, "choices": per_region}
                )
        return routed

    @classmethod
    def target_version(cls, target: Target, settings: Settings) -> str:
        """Return the prompt template and background phrase when a tag sets them (they shape the answers)."""
        parts = [target.option("model_prompt"), target.option("model_background")]
        return "|".join(parts) if any(parts) else ""

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
                return f"model_path '{spec.path}' is not a save_pretrained() folder of a CLAP or audio classifier"
            return (
                f"weights of '{source_of(spec, settings)}' are not in the Hugging Face cache: run "
                f"`python -m serving weights download --model {spec.name}` where internet exists, or set "
                f"{'SPEAKER_MODEL' if spec.name == SPEAKER_MODEL else 'CLAP_MODEL'} / model_path to a "
                "save_pretrained() folder"
            )
        kind = model_kind(folder)
        if not kind:
            return (
                f"'{folder}' is neither CLAP nor an audio (frame) classifier (*ForAudio[Frame]Classification)"
            )
        if spec.name == SPEAKER_MODEL and kind != "frames":
            return f"'{folder}' is no speaker diarization model (*ForAudioFrameClassification)"
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder."""
        return hf.folder_version(spec.name, cls._folder(spec, settings))

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where CLAP_MODEL's and SPEAKER_MODEL's checkpoints are and whether they are present."""
        from backends._torchvision import WeightStatus

        out = []
        for name, source in (("clap", settings.clap_model), (SPEAKER_MODEL, settings.speaker_model)):
            folder = hf.checkpoint_folder(source, settings.model_dir)
            present = folder is not None and hf.weights_file(folder) is not None
            out.append(WeightStatus(name, str(folder) if folder else "(Hugging Face cache)", present, source))
        return out

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch checkpoints into the Hugging Face cache (CLAP_MODEL and SPEAKER_MODEL when `models` is empty)."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or [cls.default_model, SPEAKER_MODEL]:
            repo = source_of(ModelSpec(cls.family, name), settings)
            if Path(repo).is_dir():
                written.append(repo)
                continue
            written.append(str(snapshot_download(repo, allow_patterns=_ALLOW_PATTERNS)))
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.extractor: Any = None
        self.kind = ""
        self.dtype: Any = None
        self.id2label: dict[int, str] = {}
        self._text: OrderedDict[tuple[str, ...], Any] = OrderedDict()

    def load(self, device: str) -> None:
        """Load CLAP (model, tokenizer, feature extractor) or the classifier and its extractor, local files only."""
        import torch
        from transformers import (
            AutoFeatureExtractor,
            AutoModelForAudioClassification,
            AutoModelForAudioFrameClassification,
            AutoProcessor,
            AutoTokenizer,
            ClapModel,
        )

        folder = self._folder(self.spec, self.settings)
        reason = self.availability(self.spec, self.settings)
        if reason or folder is None:
            raise RuntimeError(reason or f"no checkpoint for {self.spec.key}")
        self.kind = model_kind(folder)
        self.dtype = torch.float16 if device.startswith("cuda") and self.settings.fp16 else torch.float32
        if self.kind == "clap":
            model = ClapModel.from_pretrained(str(folder), local_files_only=True, dtype=self.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        else:
            head = (
                AutoModelForAudioFrameClassification
                if self.kind == "frames"
                else AutoModelForAudioClassification
            )
            model = head.from_pretrained(str(folder), local_files_only=True, dtype=self.dtype)
            self.id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        # a diarizer's processor may do more than its feature extractor (Nemotron 3 Diarization ships one)
        has_processor = (folder / "processor_config.json").is_file()
        loader = AutoProcessor if self.kind == "frames" and has_processor else AutoFeatureExtractor
        self.extractor = loader.from_pretrained(str(folder), local_files_only=True)
        self.model = model.eval().to(device)
        self.device = device

    def labels(self) -> Sequence[str]:
        """Return a classifier's classes (CLAP has none: the config's labels are its prompts)."""
        return [self.id2label[k] for k in sorted(self.id2label)]

    def audio_rate(self) -> int:
        """Return the feature extractor's rate (48 kHz for LAION's CLAP, 16 kHz for most classifiers)."""
        extractor = getattr(self.extractor, "feature_extractor", self.extractor)
        return int(getattr(extractor, "sampling_rate", 16000))

    def _clip_window_s(self) -> float:
        if self.kind == "clap":
            return float(getattr(self.extractor, "max_length_s", 10))
        return self.clip_window_s

    def preprocess(self, item: Item) -> Prepared:
        """Cut the audio into each view's windows, note their loudness; CLAP: the file's log-mel (CPU)."""
        assert item.audio is not None
        rate = item.sample_rate or self.audio_rate()
        targets = [t for t in item.targets if t.model == self.spec]
        if self.kind == "frames":  # the diarization model reads the whole recording in one forward
            whole = {"speakers": [(0.0, item.duration)]}
            return Prepared(item.duration, whole, {"speakers": np.ones(1, dtype=bool)}, samples=item.audio)
        views = {"clip" if t.control.tag == "Choices" else "events" for t in targets}
        spans: dict[str, list[tuple[float, float]]] = {}
        loud: dict[str, np.ndarray] = {}
        for view in sorted(views):
            if view == "clip":
                spans[view] = aw.window_spans(item.duration, self._clip_window_s(), self._clip_window_s())
            else:
                window = self.settings.sound_event_window_s
                spans[view] = aw.window_spans(item.duration, window, self.settings.sound_event_hop_s)
            loud[view] = aw.window_rms_db(item.audio, rate, spans[view]) > SILENCE_DBFS
        regional = [p for t in targets if (p := region_prompt_set(t)) is not None]
        prompts = tuple(dict.fromkeys([*(prompt_set(t) for t in targets), *regional]))
        prompts = prompts if self.kind == "clap" else ()
        prepared = Prepared(item.duration, spans, loud, prompts=prompts)
        if self.kind == "clap":
            prepared.mel = aw.log_mel(item.audio, self.extractor)
        else:
            prepared.samples = item.audio
        return prepared

    def forward(self, batch: list[Any]) -> list[Any]:
        """Encode every window of every task, window_batch at a time; score CLAP's prompt sets."""
        out = [Scored(p.duration, p.spans, p.loud) for p in batch]
        if self.kind == "frames":
            for scored, p in zip(out, batch, strict=True):
                assert p.samples is not None
                scored.logits["speakers"] = self._frame_probs(p.samples)
            return out
        rows = [
            (i, view, k) for i, p in enumerate(batch) for view in p.spans for k in range(len(p.spans[view]))
        ]
        found: dict[tuple[int, str], list[np.ndarray]] = {}
        for start in range(0, len(rows), self.window_batch):
            part = rows[start : start + self.window_batch]
            encoded = self._encode_windows(batch, part)
            for (i, view, _k), row in zip(part, encoded, strict=True):
                found.setdefault((i, view), []).append(row)
        for (i, view), vectors in found.items():
            stacked = np.stack(vectors)
            if self.kind != "clap":
                out[i].logits[view] = stacked
                continue
            if view == "clip":  # one embedding for the file: the mean direction of its windows
                stacked = _unit(stacked.mean(axis=0, keepdims=True))
            else:
                out[i].events = stacked
            out[i].scale = self._scale()
            for prompts in batch[i].prompts:
                if prompts.view == view:
                    out[i].clap[(view, prompts)] = stacked @ self._text_embeddings(prompts).T * out[i].scale
                elif prompts.view == "region":
                    out[i].texts[prompts] = self._text_embeddings(prompts)
        return out

    def _scale(self) -> float:
        return float(self.model.logit_scale_a.float().exp())

    def _encode_windows(self, batch: list[Prepared], part: list[tuple[int, str, int]]) -> list[np.ndarray]:
        """Return one row per window: CLAP's normalised embedding, or the classifier's logits."""
        import torch

        if self.kind == "clap":
            feats = np.stack([self._clap_input(batch[i], batch[i].spans[view][k]) for i, view, k in part])
            return list(self._embed_audio(feats))
        rate = self.audio_rate()
        pieces = []
        for i, view, k in part:
            start, end = batch[i].spans[view][k]
            samples = batch[i].samples
            assert samples is not None
            pieces.append(samples[round(start * rate) : max(round(end * rate), round(start * rate) + 1)])
        logits = []
        for group in _same_length(pieces):  # one extractor call per shape: equal-length windows pad alike
            inputs = self.extractor([pieces[j] for j in group], sampling_rate=rate, return_tensors="pt")
            inputs = {
                k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()
            }
            with torch.inference_mode():
                values = self.model(**inputs).logits.float().cpu().numpy()
            logits += list(zip(group, values, strict=True))
        return [row for _j, row in sorted(logits, key=lambda x: x[0])]

    def _frame_probs(self, samples: np.ndarray) -> np.ndarray:
        """Return the diarization model's per-frame speaker probabilities (frames, speakers) for one recording."""
        import torch

        inputs = self.extractor([samples], sampling_rate=self.audio_rate(), return_tensors="pt")
        inputs = {
            k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        return np.asarray(torch.sigmoid(logits[0]).cpu().numpy(), dtype=np.float64)

    def _clap_input(self, prepared: Prepared, span: tuple[float, float]) -> np.ndarray:
        """Return a window's CLAP input (channels, frames, bins) from the file's log-mel (repeat-padded)."""
        fe = self.extractor
        hop = int(fe.hop_length)
        rate = int(fe.sampling_rate)
        total = int(fe.max_length_s * rate) // hop + 1
        samples = round((span[1] - span[0]) * rate)
        frames = total if samples >= int(fe.max_length_s * rate) else max(round(samples / hop), 1)
        assert prepared.mel is not None
        window = aw.clap_window(prepared.mel, round(span[0] * rate / hop), frames, total)
        channels = 4 if str(getattr(fe, "truncation", "")) == "fusion" else 1
        return np.repeat(window[None], channels, axis=0)

    def _embed_audio(self, feats: np.ndarray) -> np.ndarray:
        """Return CLAP's normalised audio embeddings of a stack of windows (windows, dim) float64."""
        import torch

        x = torch.from_numpy(feats).to(self.device, dtype=self.dtype)
        longer = torch.zeros((x.shape[0], 1), dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            out = self.model.get_audio_features(input_features=x, is_longer=longer)
        embeds = torch.nn.functional.normalize(_features(out).float(), dim=-1)
        return np.asarray(embeds.cpu().numpy(), dtype=np.float64)

    def _embed_text(self, texts: list[str]) -> np.ndarray:
        """Return CLAP's normalised text embeddings (texts, dim) float64."""
        import torch

        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            out = self.model.get_text_features(**tokens)
        embeds = torch.nn.functional.normalize(_features(out).float(), dim=-1)
        return np.asarray(embeds.cpu().numpy(), dtype=np.float64)

    def _text_embeddings(self, prompts: PromptSet) -> np.ndarray:
        """Return a prompt set's text embeddings, computed once per model (cached by texts)."""
        key = tuple(prompts.texts())
        cached = self._text.get(key)
        if cached is not None:
            self._text.move_to_end(key)
            return np.asarray(cached)
        embeds = self._embed_text(list(key))
        self._text[key] = embeds
        while len(self._text) > self.text_cache_size:
            self._text.popitem(last=False)
        return embeds

    # ---- postprocess ----
    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the choice(s) for Choices; labeled time regions with scores for sound-event Labels."""
        scored: Scored = output
        labels = target.label_map.config_labels
        if not labels:
            return []
        multiple = target.option("choice", "single").strip().lower() == "multiple"
        if target.control.tag == "Choices":
            probs = self._choice_probs(scored, target, multiple)
            if probs is None:
                return []
            return _choices(target, labels, probs, multiple, threshold_of(target))
        if self.kind == "frames":
            return self._speakers(scored, target)
        per_window = self._event_probs(scored, target)
        if per_window is None:
            return []
        per_window = per_window * scored.loud["events"][:, None]
        items: list[dict[str, Any]] = []
        for event in aw.merge_events(scored.spans["events"], per_window, threshold_of(target)):
            picked, score = self._region_choices(scored, target, event)
            items += regions.audio_segment_items(
                target,
                event.start,
                event.end,
                scored.duration,
                event.score,
                labels[event.label],
                choices=picked,
                choice_score=score,
            )
        return items

    def _speakers(self, scored: Scored, target: Target) -> list[dict[str, Any]]:
        """Return one region per speaker turn; speakers take the config's labels in order of first speech."""
        probs = scored.logits.get("speakers")
        labels = target.label_map.config_labels
        if probs is None or not probs.size or scored.duration <= 0:
            return []
        # frames every 10 ms (Nemotron) or 20 ms (WavLM): the ms step, not duration / frames, which drifts
        frame_s = round(scored.duration / probs.shape[0], 3) or scored.duration / probs.shape[0]
        turns = aw.frame_runs(probs, frame_s, threshold_of(target), MIN_GAP_S)
        order = list(dict.fromkeys(t.label for t in turns))  # speakers by first turn
        if len(order) > len(labels):
            log.info(
                "%d speakers found, the config names %d: the later ones are left out", len(order), len(labels)
            )
        items: list[dict[str, Any]] = []
        for turn in turns:
            rank = order.index(turn.label)
            if rank < len(labels):
                items += regions.audio_segment_items(
                    target, turn.start, turn.end, scored.duration, turn.score, labels[rank]
                )
        return items

    def _region_choices(self, scored: Scored, target: Target, event: aw.Event) -> tuple[list[str], float]:
        """Return the linked per-region Choices' answer for one region: from the windows inside it."""
        choices = target.linked.get("choices")
        if choices is None or not choices.labels:
            return [], 0.0
        spans = scored.spans["events"]
        inside = np.array([s < event.end and e > event.start for s, e in spans]) & scored.loud["events"]
        if not inside.any():
            return [], 0.0
        multiple = choices.attr("choice", "single").strip().lower() == "multiple"
        if self.kind == "clap":
            prompts = region_prompt_set(target)
            if prompts is None or scored.events is None or prompts not in scored.texts:
                return [], 0.0
            embedding = _unit(scored.events[inside].mean(axis=0, keepdims=True))
            probs = _softmax(_per_label((embedding @ scored.texts[prompts].T)[0] * scored.scale, prompts))
        else:
            mean = scored.logits["events"][inside].mean(axis=0)
            probs = self._mapped(
                _sigmoid(mean) if multiple else _softmax(mean),
                LabelMap(choices.labels, choices.predicted_values),
            )
        picked = _picked(probs, multiple, _choice_threshold(choices))
        return [choices.labels[i] for i in picked], float(probs[picked[0]]) if picked else 0.0

    def _choice_probs(self, scored: Scored, target: Target, multiple: bool) -> np.ndarray | None:
        """Return one probability per config label for the whole file."""
        if self.kind == "clap":
            prompts = prompt_set(target)
            logits = scored.clap.get(("clip", prompts))
            if logits is None:
                return None
            return _softmax(_per_label(logits[0], prompts))
        logits = scored.logits.get("clip")
        if logits is None:
            return None
        mean = logits.mean(axis=0)
        return self._mapped(_sigmoid(mean) if multiple else _softmax(mean), target.label_map)

    def _event_probs(self, scored: Scored, target: Target) -> np.ndarray | None:
        """Return (windows, config labels) probabilities of the events view."""
        if self.kind == "clap":
            prompts = prompt_set(target)
            logits = scored.clap.get(("events", prompts))
            if logits is None:
                return None
            per_label = np.stack([_per_label(row, prompts) for row in logits])
            if prompts.background:
                per_label = np.concatenate([per_label, logits[:, -1:]], axis=1)
            return _softmax(per_label)[:, : len(prompts.labels)]
        logits = scored.logits.get("events")
        if logits is None:
            return None
        return np.stack([self._mapped(_sigmoid(row), target.label_map) for row in logits])

    def _mapped(self, probs: np.ndarray, label_map: LabelMap) -> np.ndarray:
        """Return per config label the highest probability of the model classes that map to it."""
        labels = label_map.config_labels
        out = np.zeros(len(labels))
        index = {label: j for j, label in enumerate(labels)}
        for k, p in enumerate(probs):
            mapped = label_map(self.id2label.get(k, str(k)))
            if mapped is not None and mapped in index:
                out[index[mapped]] = max(out[index[mapped]], float(p))
        return out


def _per_label(logits: np.ndarray, prompts: PromptSet) -> np.ndarray:
    """Return each label's logit: its best phrase's (the background, when present, is left out)."""
    out, k = [], 0
    for phrases in prompts.phrases:
        out.append(float(np.max(logits[k : k + len(phrases)])))
        k += len(phrases)
    return np.asarray(out)


def _per_region_choices(labels: ControlTag, controls: Sequence[ControlTag]) -> ControlTag | None:
    """Return the per-region Choices that describes this Labels tag's regions (*Intent classification*)."""
    for control in controls:
        wanted = control.attr("whenTagName")
        if (
            control.tag == "Choices"
            and control.attr("perRegion").strip().lower() == "true"
            and control.to_name == labels.to_name
            and wanted in ("", labels.name)
            and not control.attr("model_name")
        ):
            return control
    return None


def _picked(probs: np.ndarray, multiple: bool, threshold: float) -> list[int]:
    """Return the chosen indices: the best one (single) or every one at or above the threshold, best first."""
    if multiple:
        return [int(i) for i in np.argsort(-probs, kind="stable") if probs[i] >= threshold]
    best = int(np.argmax(probs))
    return [best] if probs[best] >= threshold else []


def _choice_threshold(control: ControlTag) -> float:
    raw = control.attr("model_score_threshold")
    try:
        return float(raw) if raw else CHOICE_THRESHOLD
    except ValueError:
        return CHOICE_THRESHOLD


def _choices(
    target: Target, labels: Sequence[str], probs: np.ndarray, multiple: bool, threshold: float
) -> list[dict[str, Any]]:
    """Return the choices item: the best label (single) or every label at or above the threshold."""
    picked = _picked(probs, multiple, threshold)
    if not picked:
        return []
    return [regions.choices_item(target, [labels[i] for i in picked], float(probs[picked[0]]))]


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / max(float(np.linalg.norm(x)), 1e-12))


def _same_length(pieces: list[np.ndarray]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for j, piece in enumerate(pieces):
        groups.setdefault(int(piece.shape[0]), []).append(j)
    return list(groups.values())


def _features(output: Any) -> Any:
    """Return the embedding tensor of get_*_features (a tensor, or an output with pooler_output)."""
    pooled = getattr(output, "pooler_output", None)
    return pooled if pooled is not None else output
