"""Extractive question answering: the answer span of a passage labelled with a `Labels` tag (transformers).

Label Studio's *Question answering* template shows a passage (`<Text name="text">`), a question
(a second `<Text name="question">`) and a `Labels` tag over the passage with one label, "Answer".
Label routing (serving/plan/routing.py) sends such a tag here: its labels are no NER type, and the
config has a second Text whose name or data key says question (or query), or, when the tag's one
label says answer, any second Text. `model_name="question_answering"` (or a QA hub id / folder as
model_path) picks it too. The default model is QA_MODEL, else deepset/roberta-base-squad2
(SQuAD 2.0: it was trained to abstain when the passage holds no answer, as many tasks will).

The question and passage go through a fast tokenizer (the passage in overlapping windows when long,
every window of a batch in one padded model call); the answer is the span of passage tokens, at most
`model_max_answer_tokens` (30) long, with the highest start x end probability over all windows. It is
emitted, with that probability as its score, when it beats the model's "no answer" (the first token's
start x end) and reaches the threshold (`model_score_threshold`, default 0.1). The label is the tag's
label that says answer, else its first.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends import _hf as hf
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

DEFAULT = "deepset/roberta-base-squad2"
_QUESTION = re.compile(r"question|query", re.IGNORECASE)
_ANSWER = re.compile(r"answer", re.IGNORECASE)


def question_of(obj: ObjectTag, labels: Sequence[str]) -> str:
    """Return the data key of the config's question Text for a passage, "" when it has none."""
    texts = [(name, key) for name, tag, key in obj.others if tag == "Text" and key]
    for name, key in texts:
        if _QUESTION.search(name) or _QUESTION.search(key):
            return key
    if texts and len(labels) == 1 and _ANSWER.search(labels[0]):
        return texts[0][1]
    return ""


def answer_label(labels: Sequence[str]) -> str:
    """Return the label an answer span takes: the one that says answer, else the first."""
    return next((label for label in labels if _ANSWER.search(label)), labels[0] if labels else "")


@dataclass
class _Input:
    question: str
    passage: str


class QuestionAnsweringBackend(Backend):
    """An extractive QA model labelling the answer span of a passage."""

    family = "question_answering"
    control_tags = ("Labels",)
    object_tags = ("Text",)
    input_kind = "text"
    max_batch_size = 32
    priority = 68  # before the zero-shot NER family (70): a question beside the passage makes it QA
    fp16 = True
    default_model = "question_answering"
    default_threshold = 0.1
    zero_shot = True  # it labels whatever the tag's label is: the question is the prompt
    whole_tag = True  # one answer per passage, for the whole tag
    max_answer_tokens = 30

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the short name (any QA hub id or folder works as model_path)."""
        return (cls.default_model,)

    @classmethod
    def source(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return what loads: model_path (under MODEL_DIR when relative), else QA_MODEL or the default id."""
        if spec.path:
            path = Path(spec.path).expanduser()
            return str(path if path.is_absolute() else Path(settings.model_dir) / path)
        if spec.name and spec.name != cls.default_model:
            return spec.name
        return settings.qa_model or DEFAULT

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for question_answering or an id naming SQuAD."""
        lowered = name.strip().lower()
        return lowered == cls.default_model or "squad" in lowered

    @classmethod
    def route_claim(
        cls, obj: ObjectTag, claim: Claim, controls: Sequence[ControlTag], settings: Settings
    ) -> Claim | None:
        """Take a Labels tag on a passage when the config has a question Text beside it."""
        labels = claim.control.labels
        if claim.control.tag != "Labels" or obj.tag != "Text" or not labels or not question_of(obj, labels):
            return None
        return Claim(control=claim.control, model_name=cls.default_model)

    # ---- weights ----
    @classmethod
    def _folder(cls, spec: ModelSpec, settings: Settings) -> Path | None:
        return hf.checkpoint_folder(cls.source(spec, settings), settings.model_dir)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the checkpoint is local, else what is missing and the command that fetches it."""
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            return "transformers/torch are not installed: pip install torch transformers"
        folder = cls._folder(spec, settings)
        if folder is None or hf.weights_file(folder) is None:
            return (
                f"weights of '{cls.source(spec, settings)}' are not local: run "
                f"`python -m serving weights download --model {spec.name}` where internet exists, or set "
                "QA_MODEL / model_path to a save_pretrained() folder of a question-answering model"
            )
        return None

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the model and a fingerprint of its weights."""
        folder = cls._folder(spec, settings)
        weights = hf.weights_file(folder) if folder is not None else None
        return f"{cls.source(spec, settings)}@{weights_fingerprint(weights) if weights else 'missing'}"

    @classmethod
    def weights_status(cls, settings: Settings) -> list[Any]:
        """Return where the default QA checkpoint is and whether it is present."""
        from backends._torchvision import WeightStatus

        repo = settings.qa_model or DEFAULT
        folder = hf.checkpoint_folder(repo, settings.model_dir)
        present = folder is not None and hf.weights_file(folder) is not None
        return [WeightStatus(repo, str(folder) if folder else "(Hugging Face cache)", present, repo)]

    @classmethod
    def download_weights(cls, models: Sequence[str], settings: Settings) -> list[str]:
        """Fetch the QA checkpoint into the Hugging Face cache."""
        from huggingface_hub import snapshot_download

        written = []
        for name in list(models) or [cls.default_model]:
            repo = cls.source(ModelSpec(cls.family, name), settings)
            if Path(repo).is_dir():
                written.append(repo)
                continue
            patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
            written.append(str(snapshot_download(repo, allow_patterns=patterns)))
        return written

    # ---- runtime ----
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the model loads in load()."""
        super().__init__(spec, settings)
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_length = 384
        self.stride = 128

    def load(self, device: str) -> None:
        """Load the QA model and its fast tokenizer (offline)."""
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        folder = self._folder(self.spec, self.settings)
        if folder is None:
            raise FileNotFoundError(self.availability(self.spec, self.settings) or "checkpoint missing")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not getattr(self.tokenizer, "is_fast", False):
            raise RuntimeError(f"'{folder}' has no fast tokenizer: answer offsets need one")
        self.model = AutoModelForQuestionAnswering.from_pretrained(folder, local_files_only=True)
        self.model.to(device).eval()
        limit = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        if "roberta" in str(getattr(self.model.config, "model_type", "")):
            limit -= 2  # RoBERTa positions start after the padding index
        self.max_length = min(384, limit)
        self.stride = min(128, self.max_length // 4)
        self.device = device

    def preprocess(self, item: Item) -> _Input:
        """Return the passage and the question of the task (the config's question Text)."""
        target = next((t for t in item.targets if t.model == self.spec), None)
        labels = target.label_map.config_labels if target is not None else ()
        key = question_of(item.obj, labels)
        data = item.task.get("data") or {}
        question = data.get(key) if key else None
        if not isinstance(question, str):
            raise InputError(f"task data has no question text under '{key or 'question'}' for the QA tag")
        return _Input(question.strip(), item.text or "")

    def forward(self, batch: list[Any]) -> list[Any]:
        """Score every window of every (question, passage) of the batch in one call; return each best span."""
        import torch

        enc = self.tokenizer(
            [x.question for x in batch],
            [x.passage for x in batch],
            truncation="only_second",
            max_length=self.max_length,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        # token_type_ids too: BERT-style models tell the question from the passage by them
        keys = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {k: enc[k].to(self.device) for k in keys if k in enc}
        with torch.inference_mode():
            out = self.model(**inputs)
        start = out.start_logits.float().masked_fill(inputs["attention_mask"] == 0, -1e4).softmax(-1)
        end = out.end_logits.float().masked_fill(inputs["attention_mask"] == 0, -1e4).softmax(-1)
        best: list[tuple[float, int, int, float]] = [(-1.0, 0, 0, 1.0) for _ in batch]
        for w, sample in enumerate(enc["overflow_to_sample_mapping"].tolist()):
            in_passage = np.array([s == 1 for s in enc.sequence_ids(w)])
            answer = _best_span(
                start[w].cpu().numpy(), end[w].cpu().numpy(), in_passage, self.max_answer_tokens
            )
            if answer is None:
                continue
            score, i, j = answer
            null = float(start[w, 0] * end[w, 0])
            offsets = enc["offset_mapping"][w].tolist()
            if score > best[sample][0]:
                best[sample] = (score, offsets[i][0], offsets[j][1], null)
        return best

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the answer span with the tag's answer label when it beats "no answer" and the threshold."""
        score, start, end, null = output
        text = item.text or ""
        label = answer_label(target.label_map.config_labels)
        if score < target.threshold or score <= null or end <= start or not label:
            return []
        return [regions.span_item(target, start, end, text[start:end], label, float(score))]


def _best_span(
    start: np.ndarray, end: np.ndarray, allowed: np.ndarray, longest: int
) -> tuple[float, int, int] | None:
    """Return (start x end probability, i, j) of the best passage span of at most `longest` tokens."""
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        return None
    s = start[idx][:, None] * end[idx][None, :]
    gap = idx[None, :] - idx[:, None]
    s = np.where((gap >= 0) & (gap < longest), s, -1.0)
    flat = int(np.argmax(s))
    i, j = divmod(flat, idx.size)
    return float(s[i, j]), int(idx[i]), int(idx[j])
