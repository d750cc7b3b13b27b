"""A tiny random GLiNER saved like a real checkpoint, and planted span scores on top of its real run.

No GLiNER weights exist offline: the test builds one of the real architecture (a 16-wide BERT
backbone, GLiNER's span head) with GLiNERConfig, saves it with save_pretrained and loads it back
through the backend's own loading code. Its real forward runs; the span logits it returns are then
replaced by planted ones: PLANTED[(words, prompt)] for a span of exactly those words prompted by
that phrase, -20 everywhere else, so every answer (span, label, score = sigmoid) is exact.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from backends.zero_shot_ner import ZeroShotNerBackend
from tests.backends._open_vocab_support import bert_tokenizer

# (the span's words as GLiNER splits them, the prompt) -> logit
PLANTED: dict[tuple[tuple[str, ...], str], float] = {
    (("Acme", "Corp"), "company"): 3.0,
    (("Acme", "Corp"), "Company"): 3.0,
    (("April", "24"), "Due date"): 2.0,
    (("Jane", "Doe"), "Author"): 4.0,
    (("Black", "holes"), "Title"): 1.0,
    (("Jane", "Doe"), "Customer"): 4.0,
    (("Paris",), "City"): 2.0,
    (("12345",), "NUMFAT"): 3.0,
    (("Italian", "Restaurant"), "FORN"): 2.0,
    (("Italian", "Restaurant"), "vendor"): 2.5,
}


def sigmoid(x: float) -> float:
    """Return GLiNER's score for a planted logit."""
    return 1.0 / (1.0 + math.exp(-x))


def save_gliner(folder: Path, max_len: int = 24, seed: int = 0) -> Path:
    """Save a tiny random GLiNER (BERT backbone 16 wide, spans up to 4 words) with its tokenizer."""
    from gliner import GLiNER, GLiNERConfig
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    backbone = folder.parent / f"{folder.name}-backbone"
    encoder = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=512,
    )
    BertModel(encoder).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    config = GLiNERConfig(
        model_name=str(backbone), hidden_size=16, max_width=4, max_len=max_len, dropout=0.0, fine_tune=True
    )
    GLiNER.from_config(config).save_pretrained(folder)
    return folder


class PlantedGliner:
    """Wraps a loaded GLiNER's run_batch: the real forward runs, its logits are replaced by planted ones."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.real = model.run_batch
        self.calls: list[list[list[str]]] = []  # the words of each row, per model call
        model.run_batch = self.run_batch

    def run_batch(self, batch: dict[str, Any], **kwargs: Any) -> Any:
        out = self.real(batch, **kwargs)
        logits = torch.full_like(out.logits, -20.0)
        self.calls.append([list(t) for t in batch["tokens"]])
        per_row = batch["id_to_classes"]
        if isinstance(per_row, dict):  # one label set shared by the batch
            per_row = [per_row] * len(batch["tokens"])
        for row, (words, classes) in enumerate(zip(batch["tokens"], per_row, strict=True)):
            for (span, prompt), value in PLANTED.items():
                cls = next((k - 1 for k, name in classes.items() if name == prompt), None)
                if cls is None:
                    continue
                for start in range(len(words) - len(span) + 1):
                    if tuple(words[start : start + len(span)]) == span:
                        logits[row, start, len(span) - 1, cls] = value
        out.logits = logits
        return out


class PlantedZeroShotNer(ZeroShotNerBackend):
    """The real family; its loaded GLiNER answers planted span scores."""

    def load(self, device: str) -> None:
        super().load(device)
        self.planted = PlantedGliner(self.model)
