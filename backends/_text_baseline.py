"""The CPU baseline of the text classification family: a linear model over hashed word n-grams.

Logistic regression (softmax per tag, sigmoid for multiple) on hashed unigram and bigram counts
scaled by 1/sqrt(n-grams) (long texts do not swamp the bias, short ones still count), trained in seconds on a CPU for a few hundred texts. Saved like a transformers checkpoint
(config.json with `model_type` "lsml_hashed_ngrams", model.safetensors), so the family's load() serves
the folder as a `model_path` and every version, hot swap and rollback works as for a fine-tuned model.
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from pathlib import Path
from typing import Any

MODEL_TYPE = "lsml_hashed_ngrams"
ARCHITECTURE = "HashedNgramForSequenceClassification"
BUCKETS = 1 << 16  # collisions are rare among a project's few thousand words
MAX_FEATURES = 8192
_WORD = re.compile(r"\w+", re.UNICODE)


def features(text: str, buckets: int = BUCKETS) -> list[int]:
    """Return the hashed ids (1..buckets) of a text's lower-cased words and word bigrams (0 is padding)."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    ids = [zlib.crc32(g.encode("utf-8")) % buckets + 1 for g in grams[:MAX_FEATURES]]
    return ids or [1]


def build(num_labels: int, buckets: int = BUCKETS) -> Any:
    """Return a fresh baseline model (torch module) with `num_labels` outputs."""
    import torch

    class HashedNgrams(torch.nn.Module):
        """Sum of hashed n-gram weight rows over sqrt(count), plus a bias: a linear classifier over n-gram counts."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Embedding(buckets + 1, num_labels, padding_idx=0)
            torch.nn.init.zeros_(self.weight.weight)
            self.bias = torch.nn.Parameter(torch.zeros(num_labels))

        def forward(self, input_ids: Any, attention_mask: Any | None = None, **_: Any) -> Any:
            mask = (input_ids > 0).float() if attention_mask is None else attention_mask.float()
            summed = (self.weight(input_ids) * mask.unsqueeze(-1)).sum(dim=1)
            logits = summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0).sqrt() + self.bias
            return type("Output", (), {"logits": logits})()

    return HashedNgrams()


def save(model: Any, folder: Path, config: dict[str, Any]) -> None:
    """Write config.json and model.safetensors of a baseline into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        **config,
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "buckets": int(model.weight.num_embeddings - 1),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def load(folder: Path) -> tuple[Any, dict[str, Any]]:
    """Return a saved baseline (eval mode) and its config."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = build(len(config["id2label"]), int(config.get("buckets", BUCKETS)))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), config


def is_baseline(config: dict[str, Any]) -> bool:
    """Return True for a baseline's config.json."""
    return config.get("model_type") == MODEL_TYPE
