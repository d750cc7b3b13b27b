"""Zero-shot NER: spans of the config's own labels on `Text`, `HyperText` and `Paragraphs` (GLiNER).

Reached through label routing (serving/plan/routing.py) for a `Labels` / `HyperTextLabels` /
`ParagraphLabels` tag whose labels no closed NER model knows (the CoNLL / OntoNotes types of the NER
family), or by `model_name="gliner"` (any GLiNER hub id, `gliner:<id>`, or a folder as model_path).
The default model is ZERO_SHOT_NER_MODEL, else urchade/gliner_multi-v2.1: multilingual (Label Studio
projects are not all English), Apache-2.0, and the GLiNER most used; `gliner_small` names the smaller
English urchade/gliner_small-v2.1.

Each label is a prompt: its `predicted_values` (every phrase is tried) or its value. BIO label sets
(`B-X`, `I-X`, `O`, as in Label Studio's *NER tagging invoices* template) are prompted by `X`; a span
found for `X` is emitted word by word as the template is annotated, its first word `B-X`, the others
`I-X` (`O` is never emitted). Texts longer than the model's `max_len` words go in overlapping windows;
every window of a batch is one GLiNER call (batched by the package), and where windows overlap the
best-scoring of overlapping spans wins (flat NER). Offsets, XPaths and Paragraphs indices come from
the NER family's span code (backends/ner.py, serving/results/hypertext.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends import _hf as hf
from backends.ner import CONTROLS_OF_OBJECT, batch_texts, regroup, span_input, span_items
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

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

KNOWN = {
    "gliner": "urchade/gliner_multi-v2.1",
    "gliner_multi": "urchade/gliner_multi-v2.1",
    "gliner_small": "urchade/gliner_small-v2.1",
}
PREFIX = "gliner:"
CONFIG_FILE = "gliner_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# GLiNER's own word splitter (WhitespaceTokenSplitter): windows count words as the model does
_WORD = re.compile(r"\w+(?:[-_]\w+)*|\S")
# words as an annotator selects them (granularity="word"): BIO labels go one per word
_SPACE = re.compile(r"\S+")
_BIO = re.compile(r"^([BI])-(.+)$")
# what the tokenizer of a backbone needs when the GLiNER repo ships none (urchade's v2.1 repos)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spm.model", "config.json")


def source_of(spec: ModelSpec, settings: Settings) -> str:
    """Return what loads: model_path (under MODEL_DIR when relative), a short name's hub id, or the id."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return str(path if path.is_absolute() else Path(settings.model_dir) / path)
    name = spec.name.removeprefix(PREFIX)
    return KNOWN.get(name.lower(), name)


def gliner_folder(source: str, model_dir: str = "") -> Path | None:
    """Return the folder holding a GLiNER checkpoint's gliner_config.json: a local folder, else the HF cache."""
    candidates = [Path(source).expanduser()]
    if model_dir and not Path(source).is_absolute():
        candidates += [Path(model_dir) / source, Path(model_dir) / source.rsplit("/", 1)[-1]]
    for folder in candidates:
        if (folder / CONFIG_FILE).is_file():
            return folder
    cached = hf.hf_cached(source, CONFIG_FILE)
    return Path(cached).parent if cached else None


def _weights(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def _backbone(folder: Path) -> str:
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("model_name", "")) if isinstance(data, dict) else ""


def _tokenizer_present(folder: Path) -> bool:
    """Return True when the checkpoint's tokenizer is local: in the folder, or its backbone's in the cache."""
    if (folder / "tokenizer_config.json").is_file():
        return True
    backbone = _backbone(folder)
    if not backbone:
        return False
    if Path(backbone).is_dir():
        return True
    return any(hf.hf_cached(backbone, name) for name in _TOKENIZER_FILES[:3])


Span = tuple[int, int, str, float]  # (start, end, phrase, score) in one text


@dataclass(frozen=True)
class Prompts:
    """The prompts of one tag: each phrase GLiNER is asked for, and what a span of it emits."""

    phrases: tuple[str, ...]
    # phrase -> (label of a plain tag, or BIO's (B-X, I-X) labels present in the tag)
    plain: dict[str, str]
    bio: dict[str, tuple[str, str]]


def prompts_of(target: Target) -> Prompts:
    """Return a target's prompts: each label's predicted_values or value; BIO labels by their type."""
    control = target.control
    labels = target.label_map.config_labels
    plain: dict[str, str] = {}
    bio: dict[str, tuple[str, str]] = {}
    types: dict[str, dict[str, str]] = {}
    for label in labels:
        m = _BIO.match(label)
        if m:
            types.setdefault(m.group(2), {})[m.group(1)] = label
    for kind, parts in types.items():
        first = parts.get("B") or parts["I"]
        inside = parts.get("I") or first
        raw = control.predicted_values.get(first) or control.predicted_values.get(inside) or (kind,)
        for phrase in raw:
            bio.setdefault(phrase.strip(), (first, inside))
    for label in labels:
        if _BIO.match(label) or (label == "O" and types):
            continue
        raw = control.predicted_values.get(label) or (control.label_values.get(label, label),)
        for phrase in raw:
            plain.setdefault(phrase.strip(), label)
    phrases = tuple(p for p in dict.fromkeys([*plain, *bio]) if p)
    return Prompts(phrases, plain, bio)


@dataclass
class _Input:
    value: Any  # what span_input() made of the item
    phrases: tuple[str, ...]
    threshold: float


class ZeroShotNerBackend(Backend):
    """GLiNER prompted by a tag's labels; spans on Text, HyperText and Paragraphs."""

    family = "zero_shot_ner"
    control_tags = ("Labels", "HyperTextLabels", "ParagraphLabels")
    object_tags = ("Text", "HyperText", "Paragraphs")
    input_kind = "text"
    max_batch_size = 32
    priority = 70  # before the NER family (100), which accepts any model_name, so "gliner" reaches here
    # GLiNER masks scores with large negative constants that overflow float16
    fp16 = False
    default_model = "gliner"
    default_threshold = 0.5  # GLiNER's own default: its span scores are per-label sigmoids
    zero_shot = True
    # windows overlap by this fraction of max_len words
    overlap = 0.25

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names (any GLiNER hub id or folder works too)."""
        return tuple(KNOWN)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for gliner, gliner:<id>, or an id naming GLiNER."""
        lowered = name.strip().lower()
        return lowered in KNOWN or lowered.startswith(PREFIX) or "gliner" in lowered

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return ZERO_SHOT_NER_MODEL when set, else gliner (urchade/gliner_multi-v2.1)."""
        return settings.zero_shot_ner_model or cls.default_model

    @classmethod
    def supported(cls) -> tuple[str, ...]:
        """Return the control/object pairs this family fills (as the NER family)."""
        return ("Labels on Text, HyperText", "HyperTextLabels on HyperText", "ParagraphLabels on Paragraphs")

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim span tags naming GLiNER, or whose model_path is a GLiNER folder."""
        allowed = [c for c in controls if c.tag in CONTROLS_OF_OBJECT.get(obj.tag, frozenset())]
        claims = super().claim(obj, allowed, settings)
        taken = {c.control.name for c in claims}
        for control in allowed:
            path = control.attr("model_path")
            named = bool(control.attr("model_name")) or control.name in taken
            folder = gliner_folder(source_of(ModelSpec(cls.family, "", path), settings)) if path else None
            if folder is not None and not named:
                claims.append(Claim(control=control, model_name=Path(path).name, model_path=path))
        return claims

    @classmethod
    def route_claim(
        cls, obj: ObjectTag, claim: Claim, controls: Sequence[ControlTag], settings: Settings
    ) -> Claim | None:
        """Take span tags the NER family could show (HyperTextLabels only on HyperText, ...)."""
        if claim.control.tag not in CONTROLS_OF_OBJECT.get(obj.tag, frozenset()):
            return None
        return super().route_claim(obj, claim, controls, settings)

    # ---- weights ----
    @classmethod
    def _folder(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return gliner_folder(source_of(spec, settings), settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint and its tokenizer are local, else what is missing and how to fetch it."""
        if importlib.util.find_spec("gliner") is None or importlib.util.find_spec("torch") is None:
            return "the gliner package is not installed: pip install --no-deps -r requirements-gliner.txt"
        folder = cls._folder(spec, settings)
        fetch = f"run `python -m serving weights download --model {spec.name}` where internet exists"
        if folder is None or _weights(folder) is None:
            if spec.path:
                return f"model_path '{spec.path}' is not a GLiNER folder ({CONFIG_FILE} and weights)"
            return (
                f"weights of '{source_of(spec, settings)}' are not in the Hugging Face cache: {fetch}, "
                "or set ZERO_SHOT_NER_MODEL / model_path to a GLiNER save_pretrained() folder"
            )
        if not _tokenizer_present(folder):
            return (
                f"the tokenizer of '{_backbone(folder) or folder}' (GLiNER's backbone) is not local: {fetch}"
            )
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its weights file."""
        folder = cls._folder(spec, settings)
        weights = _weights(folder) if folder is not None else None
        return f"{spec.name}@{weights_fingerprint(weights) if weights else 'missing'}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where each known GLiNER checkpoint is and whether it is present."""
        from backends._torchvision import WeightStatus

        out = []
        for repo in dict.fromkeys(KNOWN.values()):
            folder = gliner_folder(repo)
            present = folder is not None and _weights(folder) is not None and _tokenizer_present(folder)
            out.append(WeightStatus(repo, str(folder) if folder else "(Hugging Face cache)", present, repo))
        return out

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch GLiNER checkpoints (and their backbone's tokenizer when they ship none) into the HF cache."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or [cls.default_model_for(settings)]:
            repo = source_of(ModelSpec(cls.family, name), settings)
            if Path(repo).is_dir():
                written.append(repo)
                continue
            folder = Path(
                snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"])
            )
            written.append(str(folder))
            backbone = _backbone(folder)
            if backbone and not (folder / "tokenizer_config.json").is_file():
                # the tokenizer and config only: GLiNER's weights hold the backbone's own
                written.append(
                    str(snapshot_download(backbone, allow_patterns=["*.json", "*.model", "*.txt"]))
                )
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.max_words = 384

    def load(self, device: str) -> None:
        """Load the GLiNER checkpoint (offline) onto the device."""
        from gliner import GLiNER

        folder = self._folder(self.spec, self.settings)
        if folder is None:
            raise FileNotFoundError(self.availability(self.spec, self.settings) or "checkpoint missing")
        self.model = GLiNER.from_pretrained(str(folder), local_files_only=True, map_location=device)
        self.model.to(device).eval()
        self.max_words = int(getattr(self.model.config, "max_len", 384) or 384)
        self.device = device
        log.info("GLiNER %s loaded on %s (max_len %d words)", folder, device, self.max_words)

    def preprocess(self, item: Item) -> _Input:
        """Return the item's text(s) and the prompts of its targets served by this model."""
        mine = [t for t in item.targets if t.model == self.spec]
        phrases = tuple(dict.fromkeys(p for t in mine for p in prompts_of(t).phrases))
        threshold = min((t.threshold for t in mine), default=self.default_threshold)
        return _Input(span_input(item), phrases, threshold)

    def windows(self, text: str) -> list[tuple[int, int]]:
        """Return (start, end) character ranges of at most max_len words, overlapping, covering the text."""
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        size = max(1, self.max_words)
        if len(words) <= size:
            return [(0, len(text))]
        step = max(1, size - int(size * self.overlap))
        out = []
        for first in range(0, len(words), step):
            last = min(first + size, len(words)) - 1
            out.append((words[first][0], words[last][1]))
            if last == len(words) - 1:
                break
        return out

    def forward(self, batch: list[Any]) -> list[Any]:
        """Run GLiNER once over every window of every text of the batch; return raw spans per input."""
        jobs: list[tuple[int, int, str]] = []  # (text index, window start, window text)
        labels: list[list[str]] = []
        per_text: list[tuple[_Input, str]] = [
            (x, text) for x in batch for text in batch_texts([x.value]) if text.strip()
        ]
        for index, (x, text) in enumerate(per_text):
            if not x.phrases:
                continue
            for start, end in self.windows(text):
                jobs.append((index, start, text[start:end]))
                labels.append(list(x.phrases))
        found: list[list[Span]] = [[] for _ in per_text]
        if jobs:
            threshold = min(x.threshold for x in batch)
            shared = all(row == labels[0] for row in labels)
            answers = self.model.inference(
                [j[2] for j in jobs],
                labels[0] if shared else labels,
                threshold=threshold,
                flat_ner=True,
                batch_size=self.max_batch_size,
            )
            for (index, offset, _), spans in zip(jobs, answers, strict=True):
                found[index].extend(
                    (offset + int(s["start"]), offset + int(s["end"]), str(s["label"]), float(s["score"]))
                    for s in spans
                )
        spans_of = [
            [(a, b, label, score, _words(text, a, b)) for a, b, label, score in _flat(spans)]
            for (_, text), spans in zip(per_text, found, strict=True)
        ]
        return regroup([x.value for x in batch], spans_of)

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn the spans of the target's prompts into span items of its labels (BIO word by word)."""
        prompts = prompts_of(target)

        def accepted(spans: Sequence[Any], tgt: Target, size: int) -> list[tuple[int, int, str, float]]:
            return _emit(spans, prompts, tgt, size)

        return span_items(output, target, item, accepted)


def _flat(spans: list[Span]) -> list[Span]:
    """Return the spans that overlap no better one (windows overlap), in text order."""
    kept: list[Span] = []
    for span in sorted(set(spans), key=lambda s: (-s[3], s[0], s[1], s[2])):
        if all(span[1] <= k[0] or span[0] >= k[1] for k in kept):
            kept.append(span)
    return sorted(kept)


def _emit(
    spans: Sequence[Any], prompts: Prompts, target: Target, size: int
) -> list[tuple[int, int, str, float]]:
    """Return (start, end, config label, score) for one target: plain labels whole, BIO types word by word."""
    text_spans: list[tuple[int, int, str, float]] = []
    for start, end, phrase, score, words in spans:
        start, end = max(0, int(start)), min(size, int(end))
        if score < target.threshold or end <= start:
            continue
        if phrase in prompts.plain:
            text_spans.append((start, end, prompts.plain[phrase], float(score)))
        elif phrase in prompts.bio:
            kept = [(a, b) for a, b in words if a >= start and b <= end] or [(start, end)]
            text_spans.extend(_bio_words(kept, prompts.bio[phrase], float(score)))
    return [s for s in text_spans if target.label_map(s[2]) is not None]


def _bio_words(
    words: Sequence[tuple[int, int]], labels: tuple[str, str], score: float
) -> list[tuple[int, int, str, float]]:
    """Return a span as its words: the first B-X, the others I-X (one span when the tag has no I-X)."""
    first, inside = labels
    if first == inside:
        return [(words[0][0], words[-1][1], first, score)]
    return [(s, e, first if k == 0 else inside, score) for k, (s, e) in enumerate(words)]


def _words(text: str, start: int, end: int) -> tuple[tuple[int, int], ...]:
    """Return the white-space separated words of text[start:end] as absolute (start, end)."""
    found = tuple((start + m.start(), start + m.end()) for m in _SPACE.finditer(text[start:end]))
    return found or ((start, end),)
