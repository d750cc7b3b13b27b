"""Speech transcription (Whisper through transformers): TextArea on Audio/AudioPlus, whole file or per segment.

A TextArea on the audio gets the whole transcript. A Labels tag on the audio with a per-region
TextArea (Label Studio's *ASR using segments* and *Speech transcription* templates) gets one region per
Whisper segment: start/end in seconds, the config's label for speech, and the segment's text under the
same region id. Long files are cut into 30 s chunks that overlap by 5 s; each chunk's timestamped
segments are kept where their midpoint falls in the chunk's own half of each overlap, then stitched
into one monotone, non-overlapping list. Every chunk of every task in a batch goes through the encoder
and generate() together (grouped by language), fp16 on CUDA. The language is `model_language` on the
TextArea (a code or name: "en", "german"), else detected per chunk. Scores are the mean probability of
a segment's text tokens under the model (one teacher-forced decoder pass after generation).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _hf
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

AUDIO_OBJECTS = ("Audio", "AudioPlus")
SPEECH_ALIASES = (
    frozenset({"speech", "voice", "speaking", "talking", "utterance", "transcription", "segment"}),
)
TIME_PRECISION = 0.02  # seconds per Whisper timestamp token
SAMPLE_RATE = 16000
# Short names: "whisper" is WHISPER_MODEL; "whisper-<size>" is OpenAI's checkpoint of that size.
SIZES = ("tiny", "base", "small", "medium", "large-v3", "large-v3-turbo", "tiny.en", "base.en", "small.en")
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def _is_true(value: str) -> bool:
    return value.strip().lower() in {"true", "1", "yes", "on"}


@dataclass
class Segment:
    """One stretch of speech: seconds from the file's start, its text and mean token probability."""

    start: float
    end: float
    text: str
    score: float
    open: bool = False  # no closing timestamp: the chunk ended inside it


@dataclass
class Prepared:
    """One task's audio cut into chunks: log-mel features, each chunk's start and length in seconds."""

    features: np.ndarray  # (chunks, mel bins, frames) float32
    offsets: list[float]
    lengths: list[float]
    duration: float
    language: str | None


@dataclass
class Transcript:
    """Whisper's answer for one task: stitched segments, the language used, the audio's length."""

    segments: list[Segment]
    duration: float
    languages: list[str] = field(default_factory=list)


def chunk_spans(duration: float, chunk_s: float, overlap_s: float) -> list[tuple[float, float]]:
    """Return (start, length) of each chunk covering `duration` seconds, consecutive chunks overlapping."""
    if duration <= chunk_s:
        return [(0.0, duration)]
    step = chunk_s - overlap_s
    count = math.ceil((duration - overlap_s) / step)
    return [(k * step, min(chunk_s, duration - k * step)) for k in range(count)]


def parse_tokens(
    ids: Sequence[int], logprobs: Sequence[float], eot: int, ts_begin: int, length: float, decode: Any
) -> list[Segment]:
    """Turn one chunk's generated ids (timestamps, text, specials) into segments in chunk seconds.

    Whisper writes <|t0|> text <|t1|> for each segment; a text without its closing timestamp (the
    chunk ended mid-segment) ends at the chunk's end. Specials (language, task, notimestamps) are skipped.
    """
    out: list[Segment] = []
    start: float | None = None
    text: list[int] = []
    probs: list[float] = []

    def close(end: float, cut: bool = False) -> None:
        words = str(decode(text)).strip()
        if words:
            begin = min(max(start if start is not None else 0.0, 0.0), length)
            score = float(np.exp(np.mean(probs))) if probs else 1.0
            seg = Segment(begin, min(max(end, begin), length), words, min(max(score, 0.0), 1.0), cut)
            out.append(seg)

    for tok, lp in zip(ids, logprobs, strict=False):
        tok = int(tok)
        if tok == eot:
            break
        if tok >= ts_begin:
            t = (tok - ts_begin) * TIME_PRECISION
            if text:
                close(t)
                text, probs, start = [], [], None
            else:
                start = t
        elif tok < eot:
            text.append(tok)
            probs.append(float(lp))
    if text:
        close(length, cut=True)
    return out


def stitch(
    chunks: Sequence[tuple[float, float, list[Segment]]], overlap_s: float, duration: float
) -> list[Segment]:
    """Join chunks' segments (chunk seconds) into one monotone, non-overlapping list in file seconds.

    A chunk keeps the segments that start before the middle of its overlap with the next chunk,
    except one cut off by the chunk's end inside that overlap (the next chunk hears all of it). A
    segment whose midpoint the kept ones already cover was heard twice and is dropped; the rest
    start no earlier than the previous segment's end.
    """
    out: list[Segment] = []
    last = len(chunks) - 1
    for k, (offset, length, segments) in enumerate(chunks):
        hi = offset + length - overlap_s / 2 if k < last else math.inf
        for seg in segments:
            start, end = offset + seg.start, offset + seg.end
            if start >= hi or (seg.open and k < last and start >= offset + length - overlap_s):
                continue
            covered = out[-1].end if out else 0.0
            if (start + end) / 2 <= covered and out:
                continue
            start = max(start, covered)
            end = min(max(end, start), duration)
            if end - start >= TIME_PRECISION / 2:
                out.append(Segment(round(start, 3), round(end, 3), seg.text, seg.score))
    return out


def whisper_language(value: str, lang_to_id: dict[str, int]) -> str | None:
    """Return the language code for a model_language value (code or English name), None for "auto"/empty."""
    text = value.strip().lower()
    if not text or text == "auto":
        return None
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    code = TO_LANGUAGE_CODE.get(text, text)
    if lang_to_id and f"<|{code}|>" not in lang_to_id:
        known = ", ".join(sorted(k.strip("<|>") for k in lang_to_id))
        raise InputError(f'model_language="{value}" is not a language of this Whisper model ({known})')
    return code


class TranscriptionBackend(Backend):
    """Whisper answering TextArea (whole transcript) and Labels + per-region TextArea (segments) on audio."""

    family = "audio_transcription"
    control_tags = ("TextArea", "Labels")
    object_tags = AUDIO_OBJECTS
    input_kind = "audio"
    max_batch_size = 8  # tasks; their chunks are batched by chunk_batch
    priority = 30  # before audio classification, which would take the Labels tag for sound events
    fp16 = True
    default_model = "whisper"
    aliases = SPEECH_ALIASES
    chunk_s: ClassVar[float] = 30.0
    overlap_s: ClassVar[float] = 5.0
    chunk_batch: ClassVar[int] = 16  # chunks per generate() call: bounds GPU memory
    max_new_tokens: ClassVar[int] = 440  # Whisper's decoder holds 448 positions, the prompt included

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names (any Whisper hub id or save_pretrained() folder works too)."""
        return ("whisper", *(f"whisper-{s}" for s in SIZES))

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for the short names and any id or folder that names Whisper."""
        return name in cls.model_names() or "whisper" in name.lower()

    @classmethod
    def source_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the hub id or folder a spec loads: model_path, WHISPER_MODEL, openai/whisper-<size>, the id."""
        if spec.path:
            return spec.path
        if spec.name == "whisper":
            return settings.whisper_model
        if spec.name.startswith("whisper-") and spec.name[8:] in SIZES:
            return f"openai/{spec.name}"
        return spec.name

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim whole-file TextAreas, and each Labels tag that a per-region TextArea transcribes."""
        if obj.tag not in cls.object_tags:
            return []

        def picks(control: ControlTag) -> bool:
            name = control.attr("model_name")
            return not name or cls.accepts_model(name)

        textareas = [c for c in controls if c.tag == "TextArea" and picks(c)]
        labels = [c for c in controls if c.tag == "Labels"]
        claims = []
        for area in textareas:
            name = area.attr("model_name") or cls.default_model
            path = area.attr("model_path")
            if not _is_true(area.attr("perRegion")):
                claims.append(Claim(control=area, model_name=name, model_path=path))
                continue
            wanted = area.attr("whenTagName")
            source = next((c for c in labels if c.name == wanted), None) if wanted else None
            source = source or (labels[0] if labels else None)
            if source is None:
                continue  # a per-region TextArea with no Labels to draw its regions: nothing to fill
            labels.remove(source)
            claims.append(Claim(control=source, model_name=name, model_path=path, linked={"textarea": area}))
        return claims

    # ---- weights ----
    @classmethod
    def _folder(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return _hf.checkpoint_folder(cls.source_of(spec, settings), settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint is local, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        folder = cls._folder(spec, settings)
        if folder is None or _hf.weights_file(folder) is None:
            source = cls.source_of(spec, settings)
            if spec.path:
                return f"model_path '{spec.path}' is not a save_pretrained() folder of a Whisper model"
            return (
                f"weights of '{source}' are not in the Hugging Face cache: run "
                f"`python -m serving weights download --model {spec.name}` where internet exists, "
                "or set model_path to a save_pretrained() folder"
            )
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder."""
        folder = cls._folder(spec, settings)
        return f"{spec.name}@{weights_fingerprint(folder) if folder else 'missing'}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where WHISPER_MODEL's checkpoint is and whether it is present."""
        from backends._torchvision import WeightStatus

        spec = ModelSpec(cls.family, cls.default_model)
        folder = cls._folder(spec, settings)
        present = folder is not None and _hf.weights_file(folder) is not None
        source = cls.source_of(spec, settings)
        return [WeightStatus("whisper", str(folder) if folder else "(Hugging Face cache)", present, source)]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch the Whisper checkpoints (WHISPER_MODEL when `models` is empty) into the Hugging Face cache."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or ["whisper"]:
            source = cls.source_of(ModelSpec(cls.family, name), settings)
            if Path(source).is_dir():
                written.append(source)
                continue
            written.append(str(snapshot_download(source, allow_patterns=_ALLOW_PATTERNS)))
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.processor: Any = None
        self.dtype: Any = None
        self.eot = 0
        self.sot = 0
        self.ts_begin = 0
        self.transcribe_id = 0
        self.lang_to_id: dict[str, int] = {}

    def load(self, device: str) -> None:
        """Load the checkpoint and its processor from local files (fp16 on CUDA)."""
        import torch
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        reason = self.availability(self.spec, self.settings)
        folder = self._folder(self.spec, self.settings)
        if reason or folder is None:
            raise RuntimeError(reason or f"no checkpoint for {self.spec.key}")
        self.dtype = torch.float16 if device.startswith("cuda") and self.settings.fp16 else torch.float32
        # local_files_only: availability() found the files; nothing downloads while serving
        model = WhisperForConditionalGeneration.from_pretrained(
            str(folder), local_files_only=True, dtype=self.dtype
        )
        self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        self.model = model.eval().to(device)
        tok = self.processor.tokenizer
        gen = self.model.generation_config
        self.eot = int(tok.convert_tokens_to_ids("<|endoftext|>"))
        self.sot = int(tok.convert_tokens_to_ids("<|startoftranscript|>"))
        self.ts_begin = int(tok.convert_tokens_to_ids("<|0.00|>"))
        self.transcribe_id = int(tok.convert_tokens_to_ids("<|transcribe|>"))
        self.lang_to_id = dict(getattr(gen, "lang_to_id", None) or {})
        self.device = device

    def audio_rate(self) -> int:
        """Return the feature extractor's rate (16 kHz for every Whisper)."""
        fe = getattr(self.processor, "feature_extractor", None)
        return int(getattr(fe, "sampling_rate", SAMPLE_RATE))

    def preprocess(self, item: Item) -> Prepared:
        """Cut the audio into overlapping chunks and compute each chunk's log-mel features (CPU)."""
        assert item.audio is not None
        rate = item.sample_rate or SAMPLE_RATE
        duration = item.duration
        languages = {t.option("model_language").strip() for t in item.targets} - {""}
        if len(languages) > 1:
            raise InputError(f"the TextAreas of this audio ask for different languages: {sorted(languages)}")
        language = whisper_language(next(iter(languages), ""), self.lang_to_id)
        spans = chunk_spans(duration, self.chunk_s, self.overlap_s)
        pieces = [item.audio[round(s * rate) : round(s * rate) + round(n * rate)] for s, n in spans]
        feats = self.processor.feature_extractor(pieces, sampling_rate=rate, return_tensors="np")[
            "input_features"
        ]
        return Prepared(
            np.asarray(feats, dtype=np.float32),
            [s for s, _ in spans],
            [n for _, n in spans],
            duration,
            language,
        )

    def forward(self, batch: list[Any]) -> list[Any]:
        """Transcribe every chunk of every task, chunk_batch at a time per language; stitch per task."""
        rows = [(i, k) for i, p in enumerate(batch) for k in range(len(p.offsets))]
        by_language: dict[str | None, list[tuple[int, int]]] = {}
        for i, k in rows:
            by_language.setdefault(batch[i].language, []).append((i, k))
        found: dict[tuple[int, int], tuple[list[Segment], str]] = {}
        for language, group in by_language.items():
            for start in range(0, len(group), self.chunk_batch):
                part = group[start : start + self.chunk_batch]
                feats = np.stack([batch[i].features[k] for i, k in part])
                lengths = [batch[i].lengths[k] for i, k in part]
                for key, answer in zip(part, self._transcribe(feats, language, lengths), strict=True):
                    found[key] = answer
        out = []
        for i, p in enumerate(batch):
            chunks = [(p.offsets[k], p.lengths[k], found[(i, k)][0]) for k in range(len(p.offsets))]
            languages = sorted({found[(i, k)][1] for k in range(len(p.offsets))})
            out.append(Transcript(stitch(chunks, self.overlap_s, p.duration), p.duration, languages))
        return out

    def _transcribe(
        self, feats: np.ndarray, language: str | None, lengths: Sequence[float]
    ) -> list[tuple[list[Segment], str]]:
        """Detect the language, generate with timestamps, score the text tokens; segments per chunk."""
        import torch

        x = torch.from_numpy(feats).to(self.device, dtype=self.dtype)
        encoder = self.model.get_encoder()(x)
        if language is None and self.lang_to_id:
            lang_ids = self.model.detect_language(encoder_outputs=encoder).reshape(-1).tolist()
            id_to_lang = {v: k for k, v in self.lang_to_id.items()}
            codes = [id_to_lang.get(int(i), "<|en|>").strip("<|>") for i in lang_ids]
        else:
            codes = [language or "en"] * x.shape[0]
        # generate() gets the features, not `encoder`: when a chunk ends on a lone timestamp it seeks
        # on and re-encodes the rest, which it cannot do from encoder outputs (it repeats the chunk)
        generated = self.model.generate(
            input_features=x,
            language=codes if self.lang_to_id else None,
            task="transcribe" if self.lang_to_id else None,
            return_timestamps=True,
            max_new_tokens=self.max_new_tokens,
        )
        sequences = generated.sequences if hasattr(generated, "sequences") else generated
        sequences = sequences.to(self.device)
        # the decoder prompt, rebuilt for the scoring pass (generate() returns what follows it)
        prompts = [[self.sot, self.lang_to_id.get(f"<|{c}|>", self.sot), self.transcribe_id] for c in codes]
        if not self.lang_to_id:
            prompts = [[self.sot] for _ in codes]
        texts = [self._strip(row) for row in sequences.tolist()]
        logprobs = self._score(encoder, prompts, texts)
        decode = self.processor.tokenizer.decode
        return [
            (parse_tokens(ids, lps, self.eot, self.ts_begin, length, decode), code)
            for ids, lps, length, code in zip(texts, logprobs, lengths, codes, strict=True)
        ]

    def _strip(self, row: list[int]) -> list[int]:
        """Drop a leading prompt and everything from the end-of-text token on."""
        i = 0
        while i < len(row) and self.eot < row[i] < self.ts_begin:
            i += 1
        row = row[i:]
        return row[: row.index(self.eot)] if self.eot in row else row

    def _score(self, encoder: Any, prompts: list[list[int]], texts: list[list[int]]) -> list[list[float]]:
        """Return each generated token's log-probability: one teacher-forced decoder pass over the batch."""
        import torch

        full = [p + t for p, t in zip(prompts, texts, strict=True)]
        width = max(len(f) for f in full)
        if width < 2:
            return [[] for _ in texts]
        ids = torch.full((len(full), width), self.eot, dtype=torch.long, device=self.device)
        for r, f in enumerate(full):
            ids[r, : len(f)] = torch.tensor(f, device=self.device)
        logits = self.model(encoder_outputs=encoder, decoder_input_ids=ids[:, :-1]).logits.float()
        picked = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].cpu().numpy()
        return [
            picked[r, len(p) - 1 : len(p) - 1 + len(t)].tolist()
            for r, (p, t) in enumerate(zip(prompts, texts, strict=True))
        ]

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Whole transcript for a TextArea; one labeled region + its text per segment for Labels."""
        transcript: Transcript = output
        if not transcript.segments:
            return []
        if target.control.tag == "TextArea":
            text = " ".join(s.text for s in transcript.segments)
            score = float(np.mean([s.score for s in transcript.segments]))
            return [regions.textarea_item(target, [text], score)]
        label = self._speech_label(target)
        if label is None:
            return []
        items: list[dict[str, Any]] = []
        for seg in transcript.segments:
            items += regions.audio_segment_items(
                target, seg.start, seg.end, transcript.duration, seg.score, label, seg.text
            )
        return items

    @staticmethod
    def _speech_label(target: Target) -> str | None:
        """Return the config's label for speech: the TextArea's whenLabelValue, a speech alias, else the first."""
        area = target.linked.get("textarea")
        wanted = area.attr("whenLabelValue") if area is not None else ""
        for name in (wanted, "speech"):
            if name and (label := target.label_map(name)) is not None:
                return label
        labels = target.label_map.config_labels
        return target.label_map(labels[0]) if labels else None
