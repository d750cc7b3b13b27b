"""Tiny random open-vocabulary checkpoints (Grounding DINO, MM-Grounding-DINO, OWLv2) saved like the real ones.

No real weights exist offline, so tests build models of the real architectures with tiny sizes, save
them with save_pretrained (model + processor: tokenizer and image processor) and load them back
through the backend's own loading code. The BERT vocabulary puts [CLS], [SEP], "." and "?" at the ids
Grounding DINO hard-codes as phrase delimiters (101, 102, 1012, 1029), as the real vocabulary does.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

# Words tokenised whole; any other lower-case word splits into letters (a-z and ##a-##z are in the vocab).
WORDS = (
    "car",
    "person",
    "safety",
    "vest",
    "fork",
    "##lift",
    "pallet",
    "dog",
    "cat",
    "hi",
    "vis",
    "jacket",
    "truck",
    "bus",
    "helmet",
)


def bert_vocab(size: int = 1100, extra: tuple[str, ...] = ()) -> list[str]:
    """Return a WordPiece vocabulary with the special ids of bert-base-uncased (`extra` words kept whole)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    digits = list(string.digits) + ["##" + c for c in string.digits]
    body = [*WORDS, *extra, *letters, *digits, "-", "##-"] + [f"[unused{i}]" for i in range(99, 2 * size)]
    body = list(dict.fromkeys(body))
    while len(vocab) < 1012:
        vocab.append(body.pop(0))
    vocab.append(".")
    while len(vocab) < 1029:
        vocab.append(body.pop(0))
    vocab.append("?")
    while len(vocab) < size:
        vocab.append(body.pop(0))
    return vocab


def bert_tokenizer(extra: tuple[str, ...] = ()) -> Any:
    """Return an uncased BERT tokenizer over bert_vocab()."""
    from transformers import BertTokenizer

    vocab = bert_vocab(extra=extra)
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def dino_config(mm: bool = False, max_text_len: int = 32, num_queries: int = 20) -> Any:
    """Return a tiny Grounding DINO (or MM-Grounding-DINO) config: Swin 8-dim, BERT 16-dim, d_model 32."""
    from transformers import BertConfig, GroundingDinoConfig, MMGroundingDinoConfig, SwinConfig

    cls = MMGroundingDinoConfig if mm else GroundingDinoConfig
    return cls(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(bert_vocab()),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=max(64, max_text_len),
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=num_queries,
        max_text_len=max_text_len,
        encoder_n_points=2,
        decoder_n_points=2,
    )


def save_dino(
    folder: Path,
    mm: bool = False,
    max_text_len: int = 32,
    shortest: int = 64,
    longest: int = 96,
    seed: int = 0,
) -> Path:
    """Save a tiny random Grounding DINO (MM when `mm`) with its processor; return the folder."""
    from transformers import (
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoForObjectDetection,
    )

    torch.manual_seed(seed)
    cls = MMGroundingDinoForObjectDetection if mm else GroundingDinoForObjectDetection
    model = cls(dino_config(mm, max_text_len)).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": shortest, "longest_edge": longest}
        ),
        tokenizer=bert_tokenizer(),
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def clip_tokenizer() -> Any:
    """Return a CLIP BPE tokenizer whose vocabulary is single printable characters (no merges)."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_owl(folder: Path, side: int = 64, seed: int = 0) -> Path:
    """Save a tiny random OWLv2 (ViT 16-dim, patch 16 on a side x side square) with its processor."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    config = Owlv2Config(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 16,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "image_size": side,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}), tokenizer=tokenizer
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---- planted answers on top of the real tiny models ----


@dataclass(frozen=True)
class Plant:
    """A known detection: the prompt phrase a query grounds, its box (normalised x0, y0, x1, y1), its logit.

    Grounding DINO boxes are relative to the image; OWLv2 boxes to the padded square (side = longer side).
    """

    phrase: str
    box: tuple[float, float, float, float]
    logit: float = 6.0

    def cxcywh(self) -> torch.Tensor:
        """Return the box as the models output it."""
        x0, y0, x1, y1 = self.box
        return torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])


DELIMITERS = (101, 102, 1012)


def find_phrase(row: list[int], tokens: list[int]) -> int | None:
    """Return where `tokens` stand as one whole phrase of a prompt row (between delimiters), else None."""
    n = len(tokens)
    for start in range(1, len(row) - n):
        if row[start : start + n] == tokens and row[start - 1] in DELIMITERS and row[start + n] in DELIMITERS:
            return start
    return None


class PlantedDino(torch.nn.Module):
    """Runs the real model (prompts, caches and batching all run), then plants known answers.

    Query k of every row whose prompt holds plant k's phrase gets the plant's logit on that phrase's
    tokens (-8 elsewhere) and the plant's box: what a model that grounded the phrase would output.
    """

    def __init__(self, real: Any, plants: list[Plant], tokenizer: Any) -> None:
        super().__init__()
        self.real = real
        self.config = real.config
        self.model = real.model
        self.plants = [(list(tokenizer(p.phrase, add_special_tokens=False)["input_ids"]), p) for p in plants]
        self.calls: list[tuple[int, ...]] = []

    def forward(self, **kwargs: Any) -> Any:
        """Return the real output with the planted logits and boxes."""
        out = self.real(**kwargs)
        ids = kwargs["input_ids"]
        self.calls.append(tuple(ids.shape))
        logits = torch.where(torch.isinf(out.logits), out.logits, torch.full_like(out.logits, -8.0))
        boxes = out.pred_boxes.clone()
        for r in range(ids.shape[0]):
            row = ids[r].tolist()
            for q, (tokens, plant) in enumerate(self.plants):
                start = find_phrase(row, tokens)
                if start is not None:
                    logits[r, q, start : start + len(tokens)] = plant.logit
                    boxes[r, q] = plant.cxcywh()
        return SimpleNamespace(logits=logits, pred_boxes=boxes)


class _RecordingText(torch.nn.Module):
    """OWLv2's text model, recording which phrase each query embedding came from."""

    def __init__(self, real: Any, tokenizer: Any) -> None:
        super().__init__()
        self.real = real
        self.tokenizer = tokenizer
        self.seen: list[tuple[torch.Tensor, str]] = []

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """Return the real features; remember (normalised embedding, phrase) per query."""
        out = self.real.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        pooled = out.pooler_output
        normalised = pooled / torch.linalg.norm(pooled, dim=-1, keepdim=True)
        for vector, ids in zip(normalised, input_ids, strict=True):
            text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
            self.seen.append((vector.clone(), text))
        return out

    def phrase_of(self, vector: torch.Tensor) -> str:
        """Return the phrase whose embedding this query is."""
        sims = [float(torch.dot(vector.float(), v.float())) for v, _ in self.seen]
        return self.seen[int(np.argmax(sims))][1]


class PlantedOwl(torch.nn.Module):
    """Runs the real OWLv2 parts, then plants known answers: patch k is plant k's box, scored on its query."""

    def __init__(self, real: Any, plants: list[Plant], tokenizer: Any) -> None:
        super().__init__()
        self.real = real
        self.config = real.config
        self.owlv2 = _RecordingText(real.owlv2, tokenizer)
        self.plants = plants
        self.calls: list[tuple[int, ...]] = []

    def image_embedder(self, pixel_values: torch.Tensor) -> Any:
        """Return the real image features."""
        self.calls.append(tuple(pixel_values.shape))
        return self.real.image_embedder(pixel_values=pixel_values)

    def class_predictor(self, feats: torch.Tensor, queries: torch.Tensor, mask: Any) -> Any:
        """Return -8 everywhere but the plant's logit on (its patch, the query of its phrase)."""
        logits, embeds = self.real.class_predictor(feats, queries, mask)
        logits = torch.full_like(logits, -8.0)
        # the character-level test tokenizer decodes "hi-vis" as "hi - vis": compare without spaces
        phrases = [self.owlv2.phrase_of(queries[0, q]).replace(" ", "") for q in range(queries.shape[1])]
        for k, plant in enumerate(self.plants):
            for q, phrase in enumerate(phrases):
                if phrase == plant.phrase.replace(" ", ""):
                    logits[:, k, q] = plant.logit
        return logits, embeds

    def box_predictor(self, feats: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        """Return the real boxes with the plants' boxes on their patches."""
        boxes = self.real.box_predictor(feats, feature_map).clone()
        for k, plant in enumerate(self.plants):
            boxes[:, k] = plant.cxcywh()
        return boxes


def planted_family(plants: list[Plant]) -> type[Any]:
    """Return the real open-vocabulary family whose load() wraps the loaded model with planted answers."""
    from backends.open_vocab import OpenVocabBackend

    class PlantedOpenVocab(OpenVocabBackend):
        def load(self, device: str) -> None:
            super().load(device)
            wrap = PlantedDino if self.kind == "dino" else PlantedOwl
            self.model = wrap(self.model, plants, self.tokenizer)

    return PlantedOpenVocab


class BoxFillDecoder:
    """A loaded SAM model whose mask decoder still runs, with each box's mask planted as the box itself.

    The low-resolution logits are the signed distance to the box's nearest edge in the model's input
    space (positive inside), which upsamples to the box at the original size; predicted IoU 0.9.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        """Run the real decoder, then replace its masks."""
        out = self.model(**kwargs)
        boxes = kwargs["input_boxes"]
        b, n_obj, n_masks, h, w = out.pred_masks.shape
        size = float(self.model.config.prompt_encoder_config.image_size)
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * size / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * size / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        logits = torch.zeros((b, n_obj, n_masks, h, w))
        for i in range(b):
            for o in range(n_obj):
                x0, y0, x1, y1 = (float(v) for v in boxes[i, o])
                logits[i, o] = torch.minimum(torch.minimum(xx - x0, x1 - xx), torch.minimum(yy - y0, y1 - yy))
        out.pred_masks = logits.to(out.pred_masks.device)
        out.iou_scores = torch.full((b, n_obj, n_masks), 0.9)
        self.calls.append({"batch": b, "objects": n_obj, "boxes": boxes.clone()})
        return out


def planted_grounded_family(plants: list[Plant]) -> type[Any]:
    """Return the real Grounded-SAM family with planted detector answers and box-filling SAM masks."""
    from backends.grounded_sam import GroundedSamBackend

    class PlantedGroundedSam(GroundedSamBackend):
        def load(self, device: str) -> None:
            super().load(device)
            wrap = PlantedDino if self.detector.kind == "dino" else PlantedOwl
            self.detector.model = wrap(self.detector.model, plants, self.detector.tokenizer)
            assert self.sam is not None
            self.decoder = BoxFillDecoder(self.sam.model)
            self.sam.model = self.decoder

    return PlantedGroundedSam
