"""Open-vocabulary detection helpers: model names and weights, prompts built from config labels, prompt
chunks, and the token-span / query -> label decoding.

A label's prompt phrases are its `predicted_values` (synonyms) when present, else its `value`, lower-cased;
a detection goes back to the config label whose phrase produced it by position (the phrase's token span in
a Grounding DINO prompt, the query index of OWLv2), never by matching decoded text.

Grounding DINO reads one prompt "phrase . phrase . phrase ." of at most `max_text_len` tokens (256), its
phrases separated by the "." token: a long label list is split into several prompts (chunks), a label and
all its synonyms always in one chunk. OWLv2 embeds each phrase as its own query (16 tokens at most).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends import _hf as hf

if TYPE_CHECKING:
    import torch

    from serving.contract import Claim, ControlTag, Target

log = logging.getLogger(__name__)

# transformers model_type -> how we run it
MODEL_KINDS = {"grounding-dino": "dino", "mm-grounding-dino": "dino", "owlv2": "owl"}
# A model_name may say explicitly that it is ours: open_vocab:<id or folder>.
PREFIX = "open_vocab:"
# Hugging Face ids we take for open-vocabulary models even before their files are fetched.
_ID_HINTS = ("grounding-dino", "grounding_dino", "groundingdino", "owlv2", "llmdet", "mm_grounding")
_SEPARATORS = re.compile(r"[.?]")  # Grounding DINO's phrase delimiters can't appear inside a phrase
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class KnownModel:
    """A model users can name by a short name: its Hugging Face id and how it runs."""

    name: str
    repo: str
    kind: str  # "dino" | "owl"
    what: str


KNOWN: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel("grounding_dino", "IDEA-Research/grounding-dino-tiny", "dino", "Grounding DINO Swin-T"),
        KnownModel(
            "grounding_dino_base", "IDEA-Research/grounding-dino-base", "dino", "Grounding DINO Swin-B"
        ),
        KnownModel(
            "mm_grounding_dino",
            "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det",
            "dino",
            "MM-Grounding-DINO Swin-T",
        ),
        KnownModel("llmdet", "iSEE-Laboratory/llmdet_tiny", "dino", "LLMDet Swin-T (MM-Grounding-DINO)"),
        KnownModel("owlv2", "google/owlv2-base-patch16-ensemble", "owl", "OWLv2 ViT-B/16"),
    )
}
# What `python -m serving weights download` fetches with no --model (and the Docker image bakes in).
DEFAULT_DOWNLOADS = ("grounding_dino", "owlv2")
# Scores of the two kinds live on different scales: OWLv2's true objects often score 0.1-0.3.
DEFAULT_THRESHOLDS = {"dino": 0.3, "owl": 0.1}


# ---- names, folders, weights ----


def strip_prefix(name: str) -> str:
    """Return a model name without the explicit open_vocab: prefix."""
    name = name.strip()
    return name[len(PREFIX) :].strip() if name.lower().startswith(PREFIX) else name


def resolve_path(path: str, model_dir: str) -> Path:
    """Return a model_path; relative paths live under MODEL_DIR."""
    p = Path(path).expanduser()
    if not p.is_absolute() and model_dir:
        p = Path(model_dir) / p
    return p


def source_of(name: str, path: str, model_dir: str) -> str:
    """Return what from_pretrained loads: the model_path folder, a short name's Hugging Face id, or the name."""
    if path:
        return str(resolve_path(path, model_dir))
    bare = strip_prefix(name)
    known = KNOWN.get(bare.lower())
    return known.repo if known else bare


def local_folder(source: str, model_dir: str = "") -> Path | None:
    """Return the local folder holding `source`'s config.json: a folder, one under MODEL_DIR, or the HF cache."""
    return hf.checkpoint_folder(source, model_dir)


def weights_present(folder: Path) -> bool:
    """Return True when a save_pretrained() folder holds model weights."""
    return hf.weights_file(folder) is not None


def model_type(folder: Path) -> str:
    """Return the transformers model_type of a checkpoint folder ('' when unreadable)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("model_type", "")) if isinstance(data, dict) else ""


def open_vocab_name(name: str, path: str = "", model_dir: str = "") -> str | None:
    """Return the model name to serve when (model_name, model_path) picks an open-vocabulary model, else None.

    Ours: a short name (grounding_dino, owlv2...), `open_vocab:<id>`, one of the known Hugging Face ids, an
    id that names such a model, or a folder (model_path, or a name that is a folder or a cached id) whose
    config.json says grounding-dino, mm-grounding-dino or owlv2.
    """
    name = name.strip()
    if name:
        bare = strip_prefix(name)
        if name.lower().startswith(PREFIX):
            return bare or None
        if bare.lower() in KNOWN:
            return bare.lower()
        if any(bare.lower() == m.repo.lower() for m in KNOWN.values()):
            return bare
        folder = local_folder(source_of(bare, path, model_dir), model_dir)
        if folder is not None and model_type(folder) in MODEL_KINDS:
            return bare
        if "/" in bare and not path and any(hint in bare.lower() for hint in _ID_HINTS):
            return bare
        return None
    if path:
        folder = local_folder(str(resolve_path(path, model_dir)), model_dir)
        kind = model_type(folder) if folder is not None else ""
        return kind if kind in MODEL_KINDS else None
    return None


def kind_of(name: str, folder: Path | None) -> str:
    """Return "dino" or "owl" for a model: from its config when local, else from its name."""
    if folder is not None:
        kind = MODEL_KINDS.get(model_type(folder))
        if kind:
            return kind
    known = KNOWN.get(strip_prefix(name).lower())
    if known:
        return known.kind
    return "owl" if "owl" in name.lower() else "dino"


# ---- prompts from the config's labels ----


def clean_phrase(text: str) -> str:
    """Return a prompt phrase: lower-cased, Grounding DINO's delimiters (. ?) removed, spaces collapsed."""
    return _SPACES.sub(" ", _SEPARATORS.sub(" ", text.lower())).strip()


@dataclass(frozen=True)
class LabelPrompt:
    """One config label and the phrases that prompt for it."""

    label: str  # the label as Label Studio stores it (its alias when it has one)
    phrases: tuple[str, ...]


def label_control(target: Target) -> ControlTag | None:
    """Return the control whose labels a target emits: its own, or its linked Labels tag's."""
    if target.control.labels:
        return target.control
    return target.linked.get("labels")


def label_prompts(control: ControlTag | None) -> tuple[LabelPrompt, ...]:
    """Return each label of a control with its phrases: predicted_values, else its value, lower-cased."""
    if control is None:
        return ()
    out = []
    for label in control.labels:
        raw = control.predicted_values.get(label) or (control.label_values.get(label, label),)
        phrases = tuple(dict.fromkeys(p for p in (clean_phrase(r) for r in raw) if p))
        if phrases:
            out.append(LabelPrompt(label, phrases))
    return tuple(out)


def prompt_claims(
    controls: Sequence[ControlTag],
    control_tags: Iterable[str],
    plain_tags: Iterable[str],
    pick: Callable[[ControlTag], tuple[str | None, str]],
) -> list[Claim]:
    """Claim each control of `control_tags` whose model `pick` names and whose labels can prompt a detector.

    `pick(control)` returns (model name or None, model_path). A plain tag (Rectangle, BrushLabels-less
    shapes) borrows the first sibling <Labels> tag's labels; a control with no labels to prompt with is
    skipped with a warning (there is nothing to ask the detector for).
    """
    from serving.contract import Claim

    labels_tags = [c for c in controls if c.tag == "Labels"]
    claims = []
    for control in controls:
        if control.tag not in control_tags:
            continue
        model, path = pick(control)
        if model is None:
            continue
        linked: dict[str, ControlTag] = {}
        if control.tag in plain_tags and labels_tags:
            linked["labels"] = labels_tags[0]
        if not label_prompts(control if control.labels else linked.get("labels")):
            log.warning(
                '<%s name="%s"> asks for %s but has no labels to prompt it with (add <Label> values, or a '
                "sibling <Labels> for a plain %s)",
                control.tag,
                control.name,
                model,
                control.tag,
            )
            continue
        claims.append(Claim(control=control, model_name=model, model_path=path, linked=linked))
    return claims


def union_prompts(targets: Iterable[Target]) -> tuple[LabelPrompt, ...]:
    """Return the distinct label prompts of several targets, in first-seen order."""
    seen: dict[LabelPrompt, None] = {}
    for target in targets:
        for prompt in label_prompts(label_control(target)):
            seen.setdefault(prompt, None)
    return tuple(seen)


@dataclass(frozen=True)
class DinoChunk:
    """One Grounding DINO prompt: "[CLS] phrase . phrase . [SEP]" as token ids, with each token's phrase."""

    input_ids: tuple[int, ...]
    token_phrase: tuple[int, ...]  # per token: phrase index in this chunk, -1 for [CLS], ".", [SEP]
    phrase_entry: tuple[int, ...]  # per phrase: index of its LabelPrompt in the prompt set


def dino_chunks(
    entries: Sequence[LabelPrompt],
    tokenize: Callable[[list[str]], list[list[int]]],
    cls_id: int,
    sep_id: int,
    dot_id: int,
    max_len: int,
) -> list[DinoChunk]:
    """Pack the labels' phrases into prompts of at most max_len tokens; a label never spans two prompts.

    `tokenize` turns phrases into token ids without special tokens. A label whose phrases alone exceed a
    prompt keeps the phrases that fit (at least its first, truncated); that is logged.
    """
    budget = max_len - 2  # [CLS] ... [SEP]
    if budget < 2:
        raise ValueError(f"max_len {max_len} leaves no room for a phrase")
    flat = [phrase for entry in entries for phrase in entry.phrases]
    tokens_of = dict(zip(flat, tokenize(flat), strict=True)) if flat else {}
    groups: list[tuple[int, list[list[int]]]] = []  # (entry index, token ids of each phrase)
    for index, entry in enumerate(entries):
        token_ids = [[i for i in tokens_of[p] if i not in (dot_id, cls_id, sep_id)] for p in entry.phrases]
        kept = _fit_phrases(entry, token_ids, budget, max_len)
        if kept:
            groups.append((index, kept))

    # Greedy packing in label order: a chunk closes when the next label's phrases would not fit.
    packed: list[list[tuple[int, list[list[int]]]]] = [[]]
    used = 0
    for index, phrases in groups:
        cost = sum(len(p) + 1 for p in phrases)
        if packed[-1] and used + cost > budget:
            packed.append([])
            used = 0
        packed[-1].append((index, phrases))
        used += cost
    chunks: list[DinoChunk] = []
    for members in packed:
        if not members:
            continue
        input_ids: list[int] = [cls_id]
        token_phrase: list[int] = [-1]
        phrase_entry: list[int] = []
        for index, phrases in members:
            for tokens in phrases:
                input_ids.extend(tokens)
                token_phrase.extend([len(phrase_entry)] * len(tokens))
                input_ids.append(dot_id)
                token_phrase.append(-1)
                phrase_entry.append(index)
        chunks.append(DinoChunk((*input_ids, sep_id), (*token_phrase, -1), tuple(phrase_entry)))
    return chunks


def _fit_phrases(
    entry: LabelPrompt, token_ids: list[list[int]], budget: int, max_len: int
) -> list[list[int]]:
    """Return the token ids of the label's phrases that fit one prompt (at least its first, truncated)."""
    kept: list[list[int]] = []
    cost = 0
    for ids in token_ids:
        if not ids:
            continue
        if cost + len(ids) + 1 > budget:
            if not kept:
                kept.append(ids[: budget - 1])
            log.warning(
                "label %r: its prompt phrases exceed one %d-token prompt; kept %d of %d",
                entry.label,
                max_len,
                len(kept),
                len(entry.phrases),
            )
            break
        kept.append(ids)
        cost += len(ids) + 1
    return kept


@dataclass(eq=False)
class PromptSet:
    """The prompts of one plan's targets for one model: built once, reused for every image of the plan.

    `cache` holds what the model thread computes from the prompts once (Grounding DINO's text features
    per chunk, OWLv2's query embeddings), on the model's device.
    """

    entries: tuple[LabelPrompt, ...]
    chunks: list[DinoChunk] = field(default_factory=list)  # Grounding DINO
    query_ids: list[list[int]] = field(default_factory=list)  # OWLv2: one row of token ids per phrase
    query_mask: list[list[int]] = field(default_factory=list)
    query_entry: tuple[int, ...] = ()  # OWLv2: the entry of each query
    cache: dict[Any, Any] = field(default_factory=dict)
    _wanted: dict[tuple[LabelPrompt, ...], frozenset[int]] = field(default_factory=dict)

    def entries_for(self, prompts: tuple[LabelPrompt, ...]) -> frozenset[int]:
        """Return the indices of the entries one target asked for."""
        found = self._wanted.get(prompts)
        if found is None:
            wanted = set(prompts)
            found = frozenset(i for i, entry in enumerate(self.entries) if entry in wanted)
            self._wanted[prompts] = found
        return found


# ---- decoding: per query/box, the best label and its score ----


def dino_entry_scores(
    probs: torch.Tensor,
    token_phrase: torch.Tensor,
    phrase_entry: torch.Tensor,
    n_entries: int,
    text_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (score, entry) per query from Grounding DINO's per-token probabilities (rows, queries, tokens).

    A phrase scores the mean probability of its tokens, or 0 when any of its tokens is under
    `text_threshold`; a label scores its best phrase; each query takes its best label. Tokens are
    matched to phrases by position (`token_phrase`, -1 for delimiters), never by decoded text.
    """
    import torch

    rows, queries, width = probs.shape
    phrase_of = torch.full((width,), -1, dtype=torch.long, device=probs.device)
    n = min(width, token_phrase.numel())
    phrase_of[:n] = token_phrase[:n].to(probs.device)
    tokens = (phrase_of >= 0).nonzero().squeeze(1)
    n_phrases = phrase_entry.numel()
    scores = torch.zeros((rows, queries), dtype=torch.float32, device=probs.device)
    entries = torch.zeros((rows, queries), dtype=torch.long, device=probs.device)
    if tokens.numel() == 0 or n_phrases == 0 or n_entries == 0:
        return scores, entries
    p = probs[..., tokens].float()
    index = phrase_of[tokens].expand(rows, queries, -1)
    mean = torch.zeros((rows, queries, n_phrases), device=probs.device)
    mean.scatter_reduce_(2, index, p, reduce="mean", include_self=False)
    low = torch.full((rows, queries, n_phrases), float("inf"), device=probs.device)
    low.scatter_reduce_(2, index, p, reduce="amin", include_self=True)
    phrase_score = torch.where(low >= text_threshold, mean, torch.zeros_like(mean))
    per_entry = torch.zeros((rows, queries, n_entries), device=probs.device)
    entry_index = phrase_entry.to(probs.device).expand(rows, queries, -1)
    per_entry.scatter_reduce_(2, entry_index, phrase_score, reduce="amax", include_self=True)
    scores, entries = per_entry.max(dim=-1)
    return scores, entries


def query_entry_scores(
    logits: torch.Tensor, query_entry: torch.Tensor, n_entries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (score, entry) per box from OWLv2's per-query logits (images, boxes, queries).

    A label scores the sigmoid of its best query (its phrases are separate queries); each box takes its
    best label. Queries map to labels by index.
    """
    import torch

    images, boxes, _ = logits.shape
    probs = logits.float().sigmoid()
    per_entry = torch.zeros((images, boxes, n_entries), device=logits.device)
    index = query_entry.to(logits.device).expand(images, boxes, -1)
    per_entry.scatter_reduce_(2, index, probs, reduce="amax", include_self=True)
    scores, entries = per_entry.max(dim=-1)
    return scores, entries


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Return (cx, cy, w, h) boxes as (x0, y0, x1, y1)."""
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def select(
    boxes: torch.Tensor, scores: torch.Tensor, entries: torch.Tensor, floor: float, iou: float, limit: int
) -> torch.Tensor:
    """Return the indices kept: score >= floor, per-label NMS at `iou`, the `limit` best, best first."""
    import torch
    from torchvision.ops import batched_nms

    candidates = (scores >= floor).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return candidates
    kept = batched_nms(boxes[candidates].float(), scores[candidates].float(), entries[candidates], iou)
    return torch.as_tensor(candidates[kept[:limit]])


# ---- image sizes ----


def dino_resize(size: tuple[int, int], shortest: int, longest: int | None) -> tuple[int, int]:
    """Return the (width, height) Grounding DINO's processor resizes an image to (shortest/longest edge).

    The shorter side goes to `shortest` unless the longer would then pass `longest`; the longer side
    follows the unrounded scale, as the processor computes it (tests compare with the processor).
    """
    width, height = size
    target = shortest
    exact: float | None = None
    if longest:
        small, large = float(min(width, height)), float(max(width, height))
        if large / small * shortest > longest:
            exact = longest * small / large
            target = round(exact)
    if (height <= width and height == target) or (width <= height and width == target):
        return width, height
    basis = exact if exact is not None else float(target)
    if width < height:
        return target, int(basis * height / width)
    return int(basis * width / height), target


def owl_resize(size: tuple[int, int], side: int) -> tuple[int, int]:
    """Return the (width, height) an image is scaled to before OWLv2 pads it to a side x side square."""
    width, height = size
    scale = side / max(width, height)
    return max(1, min(side, round(width * scale))), max(1, min(side, round(height * scale)))
