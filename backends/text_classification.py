"""Text classification: Choices and Taxonomy on Text, HyperText, Paragraphs and Table, zero-shot or by a classifier.

Zero-shot (the default, reached through label routing for every such tag that names no model): an NLI
cross-encoder scores each (text, hypothesis) pair, a hypothesis per choice from the tag's
`model_hypothesis` template ("This example is {}." by default) and the choice's `predicted_values` or
value; transformers' zero-shot-classification semantics (backends/_text_scores.py). The default model
is TEXT_CLASSIFICATION_MODEL, else MoritzLaurer/deberta-v3-base-zeroshot-v2.0: a DeBERTa-v3 base
cross-encoder (MIT) trained for exactly this task format (true / not true of a hypothesis), near the
large model's accuracy at about a third of its cost (README: "Text classification").

Supervised: any Hugging Face sequence-classification id (model_name="org/name" or
"text_classification:<id>") or save_pretrained() folder (model_path); its id2label goes through the
tag's label map, classes that map to no choice never leave.

Long texts are cut into token windows (a quarter overlapping, at most `max_windows`, spread over the
text) and aggregated (see _text_scores.py). Every (window, hypothesis) pair of a batch of tasks runs
in sub-batches sorted by length, each padded to its longest, in fp16 autocast on CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends import _hf as hf
from backends import _text_baseline as baseline
from backends import _text_inputs as inputs
from backends import _text_scores as scores
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    ModelSpec,
    ObjectTag,
    Target,
    TrainingRun,
    TrainResult,
)
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

KNOWN = {
    "nli": "MoritzLaurer/deberta-v3-base-zeroshot-v2.0",
    "nli-large": "MoritzLaurer/deberta-v3-large-zeroshot-v2.0",
    "nli-c": "MoritzLaurer/deberta-v3-base-zeroshot-v2.0-c",  # commercially-friendly training data only
}
PREFIX = "text_classification:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRUE = {"true", "1", "yes", "on"}


def source_of(spec: ModelSpec, settings: Settings) -> str:
    """Return what from_pretrained loads: model_path (under MODEL_DIR when relative), a short name's id, or the id."""
    if spec.path:
        path = Path(spec.path).expanduser()
        return str(path if path.is_absolute() else Path(settings.model_dir) / path)
    name = spec.name.removeprefix(PREFIX)
    return KNOWN.get(name.lower(), name)


def _config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_classifier(folder: Path) -> bool:
    """Return True when a checkpoint folder holds a sequence-classification head."""
    archs = _config(folder).get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


@dataclass
class _Input:
    """One item's encoded pairs and where each target's logits lie in them."""

    encodings: list[dict[str, list[int]]]
    layout: list[tuple[str, int, int]]  # (target name or "" for a classifier, windows, hypotheses)


@dataclass
class _Output:
    """One item's logits per target, and the decisions made from them (memoised for visibleWhen)."""

    logits: dict[str, np.ndarray]
    decided: dict[str, scores.Decision | None] = field(default_factory=dict)


class TextClassificationBackend(Backend):
    """Choices and Taxonomy on text objects: an NLI cross-encoder zero-shot, or a sequence classifier."""

    family = "text_classification"
    control_tags = ("Choices", "Taxonomy")
    object_tags = ("Text", "HyperText", "Paragraphs", "Table")
    input_kind = "text"
    max_batch_size = 32
    priority = 70  # before text generation (1000), which keeps only Choices with an LLM prompt
    fp16 = True
    default_model = "nli"
    default_threshold = 0.5
    zero_shot = True
    whole_tag = True  # one choice among a tag's options needs every option scored by one model
    max_windows: ClassVar[int] = 8
    pairs_per_forward: ClassVar[int] = 64

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short names (any sequence-classification hub id or folder works too)."""
        return tuple(KNOWN)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for a short name or text_classification:<id> (what `weights download --model` routes here).

        A plain hub id (org/name) on a Choices / Taxonomy tag is ours too (see claim), but not here:
        NER takes any name, and a token classifier's id must stay NER's download.
        """
        lowered = name.strip().lower()
        return lowered in KNOWN or lowered.startswith(PREFIX)

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return TEXT_CLASSIFICATION_MODEL when set, else the DeBERTa-v3 zero-shot model."""
        return str(getattr(settings, "text_classification_model", "") or "") or cls.default_model

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim tags naming our model or a hub id (never perRegion ones); a model_path alone must be a classifier."""
        if obj.tag not in cls.object_tags:
            return []
        claims = []
        for control in controls:
            if control.tag not in cls.control_tags or _per_region(control):
                continue
            name, path = control.attr("model_name").strip(), control.attr("model_path")
            if name and not (cls.accepts_model(name) or _HUB_ID.match(name)):
                continue
            if not name and not path:
                continue  # reached through routing (route_claim), which says why
            if path and not name:
                folder = hf.local_folder(source_of(ModelSpec(cls.family, "", path), settings))
                if folder is not None and not is_classifier(folder):
                    continue  # another family's checkpoint (a language model for generation)
            claims.append(
                Claim(control=control, model_name=name or cls.default_model_for(settings), model_path=path)
            )
        return claims

    @classmethod
    def route_claim(
        cls, obj: ObjectTag, claim: Claim, controls: Sequence[ControlTag], settings: Settings
    ) -> Claim | None:
        """Take a tag that names no model (not perRegion ones: they need a region first)."""
        if _per_region(claim.control):
            return None
        return super().route_claim(obj, claim, controls, settings)

    @classmethod
    def supported(cls) -> tuple[str, ...]:
        """Return what this family fills."""
        return tuple(
            f"{tag} on {', '.join(cls.object_tags)} (text classification)" for tag in cls.control_tags
        )

    # ---- weights ----
    @classmethod
    def _folder(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return hf.checkpoint_folder(source_of(spec, settings), str(getattr(settings, "model_dir", "") or ""))

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint is local, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install -r requirements.txt"
        folder = cls._folder(spec, settings)
        if folder is None or hf.weights_file(folder) is None:
            if spec.path:
                return f"model_path '{spec.path}' is not a save_pretrained() folder of a text classifier"
            name = spec.name if cls.accepts_model(spec.name) else PREFIX + spec.name
            return (
                f"weights of '{source_of(spec, settings)}' are not in the Hugging Face cache: run "
                f"`python -m serving weights download --model {name}` where internet exists, or set "
                "TEXT_CLASSIFICATION_MODEL / model_path to a save_pretrained() folder"
            )
        if not is_classifier(folder):
            return f"'{folder}' is not a sequence-classification checkpoint (config.json architectures)"
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model name and a fingerprint of its checkpoint folder."""
        return hf.folder_version(spec.name, cls._folder(spec, settings))

    @classmethod
    def target_version(cls, target: Target, settings: Settings) -> str:
        """Return the tag's own hypothesis template (editing it makes Label Studio predict again)."""
        return target.option(inputs.TEMPLATE_ATTR, "").strip()

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where the default zero-shot checkpoint is and whether it is present."""
        from backends._torchvision import WeightStatus

        spec = ModelSpec(cls.family, cls.default_model_for(settings))
        folder = cls._folder(spec, settings)
        present = folder is not None and hf.weights_file(folder) is not None
        source = source_of(spec, settings)
        return [WeightStatus(spec.name, str(folder) if folder else "(Hugging Face cache)", present, source)]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch checkpoints into the Hugging Face cache (the default zero-shot model when `models` is empty)."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or [cls.default_model_for(settings)]:
            repo = source_of(ModelSpec(cls.family, name), settings)
            if hf.local_folder(repo) is not None:
                written.append(repo)
                continue
            patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
            written.append(str(snapshot_download(repo, allow_patterns=patterns)))
        return written

    # ---- training (backends/_text_train.py) ----
    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the tag's model is here (a fine-tune starts from it; the CPU baseline needs nothing)."""
        reason = cls.availability(spec, settings)
        return f"cannot train: {reason}" if reason else None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Fine-tune a classifier for the config's tags (a new head), or fit the CPU baseline."""
        from backends import _text_train

        return _text_train.train(run, cls)

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_length = 512
        self.entail = -1  # the entailment class of an NLI model; -1 = a plain classifier
        self.contra = 0
        self.multi_label = False
        self.class_names: list[str] = []
        self.input_names: tuple[str, ...] = ("input_ids", "attention_mask")
        self.pad_id = 0
        self.baseline = False  # the hashed n-gram CPU baseline (backends/_text_baseline.py)
        # a model trained here: which classes are each tag's (backends/_text_train.py)
        self.groups: dict[str, dict[str, Any]] = {}
        self._tok_lock = threading.Lock()  # a fast tokenizer is not safe across the preprocess threads

    def load(self, device: str) -> None:
        """Load the tokenizer and the sequence classifier; find the NLI classes when it has them."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = self._folder(self.spec, self.settings)
        if folder is None:
            raise FileNotFoundError(self.availability(self.spec, self.settings) or "checkpoint missing")
        saved = _config(folder)
        self.groups = dict(saved.get("lsml_groups") or {})
        if baseline.is_baseline(saved):
            self._load_baseline(folder, saved, device)
            return
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
        config = self.model.config
        self.class_names = [str(config.id2label[i]) for i in range(int(config.num_labels))]
        self.multi_label = getattr(config, "problem_type", "") == "multi_label_classification"
        self.entail, self.contra = nli_classes(self.class_names) if not self.groups else (-1, 0)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        positions = int(getattr(config, "max_position_embeddings", 512) or 512)
        self.max_length = min(limit, positions) if 0 < limit < 100_000 else positions
        names = tuple(getattr(self.tokenizer, "model_input_names", ()) or ())
        self.input_names = tuple(n for n in names if n in ("input_ids", "attention_mask", "token_type_ids"))
        if "input_ids" not in self.input_names:
            self.input_names = ("input_ids", "attention_mask")
        self.device = device
        log.info(
            "%s: %s (%s, %d classes, %d tokens)",
            self.spec.key,
            folder,
            "NLI zero-shot" if self.zero_shot_model else "classifier",
            len(self.class_names),
            self.max_length,
        )

    def _load_baseline(self, folder: Path, saved: dict[str, Any], device: str) -> None:
        self.model, _ = baseline.load(folder)
        self.model.to(device)
        self.baseline = True
        self.class_names = [str(saved["id2label"][str(i)]) for i in range(len(saved["id2label"]))]
        self.input_names = ("input_ids",)
        self.device = device
        log.info("%s: %s (hashed n-gram baseline, %d classes)", self.spec.key, folder, len(self.class_names))

    @property
    def zero_shot_model(self) -> bool:
        """Return True when the loaded model is an NLI cross-encoder (it has an entailment class)."""
        return self.entail >= 0

    def labels(self) -> Sequence[str]:
        """Return the classifier's classes (an NLI model's are its entailment classes)."""
        return self.class_names

    def _encode(self, first: list[str], second: list[str] | None) -> list[dict[str, list[int]]]:
        with self._tok_lock:
            enc = self.tokenizer(
                first, second, truncation="only_first" if second else True, max_length=self.max_length
            )
        return [{k: list(enc[k][i]) for k in self.input_names if k in enc} for i in range(len(first))]

    def _windows(self, text: str, reserved: int) -> list[str]:
        """Return the text's windows leaving `reserved` tokens for the hypothesis and special tokens."""
        with self._tok_lock:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc.get("offset_mapping", [])]
        if not offsets:
            return [text]
        return inputs.windows(offsets, text, max(16, self.max_length - reserved), self.max_windows)

    def preprocess(self, item: Item) -> _Input:
        """Build the text's windows and every (window, hypothesis) pair of the item's targets, tokenized."""
        text = inputs.text_of(item).strip() or " "
        if self.baseline:
            return _Input([{"input_ids": baseline.features(text)}], [("", 1, 1)])
        mine = [t for t in item.targets if t.model == self.spec]
        specials = _specials(self.tokenizer)
        if not self.zero_shot_model:
            parts = self._windows(text, specials)
            return _Input(self._encode(parts, None), [("", len(parts), 1)])
        hyps_of = {t.control.name: [h for hs in inputs.candidates(t).hypotheses for h in hs] for t in mine}
        longest = max((self._length(h) for hs in hyps_of.values() for h in hs), default=0)
        parts = self._windows(text, longest + specials)
        first: list[str] = []
        second: list[str] = []
        layout = []
        for name, hyps in hyps_of.items():
            for part in parts:
                first.extend([part] * len(hyps))
                second.extend(hyps)
            layout.append((name, len(parts), len(hyps)))
        return _Input(self._encode(first, second) if first else [], layout)

    def _length(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def forward(self, batch: list[Any]) -> list[Any]:
        """Run every pair of the batch in length-sorted sub-batches padded to their longest; return logits per item."""
        flat = [(i, j) for i, x in enumerate(batch) for j in range(len(x.encodings))]
        flat.sort(key=lambda ij: -len(batch[ij[0]].encodings[ij[1]]["input_ids"]))
        num = len(self.class_names)
        results = [np.zeros((len(x.encodings), num), dtype=np.float32) for x in batch]
        for start in range(0, len(flat), self.pairs_per_forward):
            chunk = flat[start : start + self.pairs_per_forward]
            logits = self._run([batch[i].encodings[j] for i, j in chunk])
            for (i, j), row in zip(chunk, logits, strict=True):
                results[i][j] = row
        outputs = []
        for x, rows in zip(batch, results, strict=True):
            per_target: dict[str, np.ndarray] = {}
            k = 0
            for name, w, h in x.layout:
                block = rows[k : k + w * h]
                per_target[name] = block.reshape(w, h, num) if name else block.reshape(w, num)
                k += w * h
            outputs.append(_Output(per_target))
        return outputs

    def _run(self, encodings: list[dict[str, list[int]]]) -> np.ndarray:
        """Pad one sub-batch to its longest pair and return its logits (float32, CPU)."""
        import torch

        longest = max(len(e["input_ids"]) for e in encodings)
        pad = self.pad_id
        tensors = {}
        for key in encodings[0]:
            fill = pad if key == "input_ids" else 0
            rows = [e[key] + [fill] * (longest - len(e[key])) for e in encodings]
            tensors[key] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model(**tensors).logits.float().cpu().numpy()

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the tag's choice (or choices, or Taxonomy paths) when it shows for the answers of its parents."""
        if not isinstance(output, _Output):
            return []
        decision = self._decide(output, target, item, set())
        if decision is None or not decision.chosen:
            return []
        cands = inputs.candidates(target) if self.zero_shot_model else self._classes(target)
        score = float(decision.probs[decision.chosen[0]])
        if target.control.tag == "Taxonomy":
            return [regions.taxonomy_item(target, [cands.paths[i] for i in decision.chosen], score)]
        return [regions.choices_item(target, [cands.names[i] for i in decision.chosen], score)]

    def _decide(self, output: _Output, target: Target, item: Item, seen: set[str]) -> scores.Decision | None:
        """Return the target's decision (memoised), None when it does not show (visibleWhen) or has no logits."""
        name = target.control.name
        if name in output.decided:
            return output.decided[name]
        if name in seen:
            return None  # a visibleWhen cycle: nothing shows
        seen.add(name)
        mine = [t for t in item.targets if t.model == self.spec]

        def chosen_of(parent: Target) -> set[str] | None:
            parent_decision = self._decide(output, parent, item, seen)
            if parent_decision is None:
                return set()
            parent_cands = inputs.candidates(parent) if self.zero_shot_model else self._classes(parent)
            return scores.chosen_names(parent, parent_cands, parent_decision)

        decision = None
        if scores.visible(target, mine, chosen_of):
            decision = self._score(output, target)
        output.decided[name] = decision
        return decision

    def _score(self, output: _Output, target: Target) -> scores.Decision | None:
        multiple = inputs.is_multiple(target)
        if self.zero_shot_model:
            logits = output.logits.get(target.control.name)
            cands = inputs.candidates(target)
            if logits is None or not cands.names:
                return None
            probs = scores.nli_probs(logits, cands, self.entail, self.contra, multiple)
        else:
            logits = output.logits.get("")
            cands = self._classes(target)
            if logits is None or not cands.names:
                return None
            mapping = self._choice_of_class(target, cands)
            multi_label = self.multi_label
            group = self.groups.get(target.control.name)
            if group:
                # a model trained here: this tag's own classes, scored as they were trained
                ids = [int(i) for i in group["classes"]]
                logits, mapping, multi_label = logits[:, ids], mapping[ids], bool(group["multiple"])
            probs = scores.classifier_probs(logits, mapping, len(cands.names), multi_label)
        return scores.Decision(scores.choose(target, probs, multiple), probs)

    def _classes(self, target: Target) -> inputs.Candidates:
        """Return a classifier's candidates: the tag's labels (a Taxonomy node as its path from the root)."""
        labels = target.label_map.config_labels
        path_of: dict[str, tuple[str, ...]] = {}
        for path in target.control.paths:
            path_of.setdefault(path[-1], path)
        paths = tuple(path_of.get(label, (label,)) for label in labels)
        return inputs.Candidates(tuple(labels), paths, tuple((label,) for label in labels))

    def _choice_of_class(self, target: Target, cands: inputs.Candidates) -> np.ndarray:
        index = {c: i for i, c in enumerate(cands.names)}
        out = np.full(len(self.class_names), -1, dtype=np.int64)
        for k, name in enumerate(self.class_names):
            mapped = target.label_map(name)
            if mapped is not None and mapped in index:
                out[k] = index[mapped]
        return out


def nli_classes(class_names: Sequence[str]) -> tuple[int, int]:
    """Return (entailment, contradiction) class indices of an NLI head, (-1, 0) for a plain classifier.

    As transformers' pipeline: entailment is the class named entail*; contradiction the one named
    contradict* / not_entail*, else the first or last class, whichever entailment is not.
    """
    lowered = [n.lower() for n in class_names]
    entail = next((i for i, n in enumerate(lowered) if n.startswith("entail")), -1)
    if entail < 0 or len(class_names) < 2:
        return -1, 0
    contra = next(
        (
            i
            for i, n in enumerate(lowered)
            if n.startswith(("contradict", "not_entail", "not entail", "non_entail"))
        ),
        -1 if entail == 0 else 0,
    )
    return entail, contra % len(class_names)


def _specials(tokenizer: Any) -> int:
    try:
        return int(tokenizer.num_special_tokens_to_add(pair=True))
    except Exception:
        return 4


def _per_region(control: ControlTag) -> bool:
    return control.attr("perRegion").strip().lower() in _TRUE
