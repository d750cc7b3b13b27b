"""Tiny random text classifiers (BERT, DeBERTa-v2) saved like real checkpoints, with planted logits.

The tests build an NLI cross-encoder (contradiction / neutral / entailment) or a plain classifier,
save it with its tokenizer, and load it through the family's own loading code. The real model runs on
every sub-batch; its logits are then replaced by planted ones computed from the tokens it was given:
NLI entailment = 4 x (times the hypothesis's choice word occurs in the premise) - 2 (contradiction the
negative of it), so the answers and their scores are exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.text_classification import TextClassificationBackend
from tests.backends._open_vocab_support import bert_tokenizer

# Words kept whole by the tiny WordPiece vocabulary (others split into letters).
WORDS = (
    "this",
    "example",
    "is",
    "about",
    "positive",
    "negative",
    "neutral",
    "sports",
    "politics",
    "music",
    "great",
    "awful",
    "game",
    "vote",
    "song",
    "spam",
    "toxic",
    "happy",
    "sad",
    "the",
    "a",
    "filler",
    ":",
)
TEMPLATE_WORDS = {"this", "example", "is", "about", "text", "the", "a", "."}
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}


def tokenizer(extra: tuple[str, ...] = ()) -> Any:
    """Return the tests' uncased BERT tokenizer (`extra` words kept whole too)."""
    return bert_tokenizer(extra=(*WORDS, *extra))


def save_model(
    folder: Path,
    id2label: dict[int, str] = NLI_LABELS,
    arch: str = "bert",
    max_positions: int = 128,
    multi_label: bool = False,
    seed: int = 0,
    extra: tuple[str, ...] = (),
) -> Path:
    """Save a tiny random sequence classifier (BERT or DeBERTa-v2) and its tokenizer into `folder`."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
    )

    torch.manual_seed(seed)
    tok = tokenizer(extra)
    common = {
        "vocab_size": len(tok.get_vocab()),
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": max_positions,
        "id2label": dict(id2label),
        "label2id": {v: k for k, v in id2label.items()},
    }
    if multi_label:
        common["problem_type"] = "multi_label_classification"
    if arch == "deberta":
        model: Any = DebertaV2ForSequenceClassification(DebertaV2Config(type_vocab_size=0, **common))
    else:
        model = BertForSequenceClassification(BertConfig(**common))
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    tok.model_max_length = max_positions
    tok.save_pretrained(folder)
    return folder


class Planted(torch.nn.Module):
    """The loaded model: it runs on every sub-batch, its logits replaced by planted ones (see the module doc)."""

    def __init__(self, model: Any, tok: Any, rule: Any) -> None:
        super().__init__()
        self.model = model
        self.tok = tok
        self.rule = rule
        self.shapes: list[tuple[int, int]] = []
        self.pairs: list[tuple[str, str]] = []

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, **kwargs: Any) -> Any:
        real = self.model(**kwargs).logits
        ids = kwargs["input_ids"]
        self.shapes.append(tuple(ids.shape))
        assert int(kwargs["attention_mask"].sum(dim=1).max()) == ids.shape[1], "padded to the longest pair"
        rows = []
        for row, mask in zip(ids.tolist(), kwargs["attention_mask"].tolist(), strict=True):
            assert all(mask[: sum(mask)]) and not any(mask[sum(mask) :]), "padding on the right only"
            parts = _split(self.tok, row[: sum(mask)])
            self.pairs.append((parts[0], parts[1] if len(parts) > 1 else ""))
            rows.append(self.rule(*self.pairs[-1]))
        planted = torch.tensor(np.asarray(rows), dtype=real.dtype)
        return type("Out", (), {"logits": planted + 0 * real.sum()})()


def _split(tok: Any, ids: list[int]) -> list[str]:
    """Return the decoded segments between [CLS]/[SEP] (premise, hypothesis)."""
    parts: list[list[int]] = [[]]
    for token in ids[1:]:
        if token == tok.sep_token_id:
            parts.append([])
        else:
            parts[-1].append(token)
    return [tok.decode(p) for p in parts if p]


def nli_rule(premise: str, hypothesis: str) -> list[float]:
    """Return planted NLI logits: entailment 4 x (choice word occurrences in the premise) - 2."""
    words = premise.lower().split()
    choice = [w for w in hypothesis.lower().replace(".", " ").split() if w not in TEMPLATE_WORDS]
    hits = sum(words.count(w) for w in choice)
    entail = 4.0 * hits - 2.0
    return [-entail, 0.0, entail]


def keyword_rule(classes: list[str]) -> Any:
    """Return a classifier rule: logit 3 for each class whose name (lower-cased) occurs in the text, else -3."""

    def rule(text: str, _second: str) -> list[float]:
        words = text.lower().split()
        return [3.0 if c.lower() in words else -3.0 for c in classes]

    return rule


class PlantedText(TextClassificationBackend):
    """The real family; its loaded model wrapped with planted logits (NLI or keyword rule by its classes).

    Models trained by the tests (the baseline, or a fine-tune with its tag groups) keep their own logits.
    """

    def load(self, device: str) -> None:
        super().load(device)
        if self.baseline or self.groups:
            return  # a model trained by the test answers with its own logits
        rule = nli_rule if self.zero_shot_model else keyword_rule(self.class_names)
        self.model = Planted(self.model, self.tokenizer, rule)


def softmax(*logits: float) -> list[float]:
    """Return softmax of a few logits (the expected scores)."""
    e = np.exp(np.asarray(logits) - max(logits))
    return list(e / e.sum())
