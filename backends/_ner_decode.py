"""Token-classification decoding for the NER family: tag schemes, window merging, span aggregation.

Pure numpy (no torch, no tokenizer), so the rules are unit-tested with planted per-token labels:

- Tags: BIO, BIOES (S/E), BILOU (U/L) and bare IO labels ("PER" means I-PER); "O" is outside.
- Aggregation works on words (the fast tokenizer's word_ids): a word takes the tag of its first
  sub-token, so span edges always fall on word edges and no "##ing" debris starts or ends a span.
- A B-/S-/U- tag always starts a new span, so two adjacent entities of one type never merge;
  an I-/E-/L- tag with no open span of its type starts one (I- without B-); S-/U-/E-/L- close it.
- Span score: the mean of the max softmax probability of every token in the span (all sub-tokens),
  i.e. how sure the model was, on average, of the tags that make up the span.
- Long texts: token windows overlap by `stride` tokens; each overlap is split at its middle and
  every token is taken from exactly one window, so an entity in an overlap is neither duplicated
  nor cut (the merged token sequence is decoded once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Tag prefixes as small ints (vectorised decoding compares arrays of these).
OUT, BEGIN, INSIDE, END, SINGLE = 0, 1, 2, 3, 4
_PREFIX = {"B": BEGIN, "I": INSIDE, "E": END, "L": END, "S": SINGLE, "U": SINGLE}
_TAG_RE = re.compile(r"^([BIELSU])[-_](.+)$")


class RawSpan(NamedTuple):
    """One entity found in a text: character offsets, the model's entity type, its score."""

    start: int
    end: int
    label: str
    score: float


def parse_tag(tag: str) -> tuple[int, str]:
    """Return (prefix code, entity type) of a tag; ("O" or "") is (OUT, "")."""
    tag = str(tag).strip()
    if not tag or tag.upper() == "O":
        return OUT, ""
    match = _TAG_RE.match(tag)
    if match:
        return _PREFIX[match.group(1)], match.group(2)
    return INSIDE, tag  # IO scheme: a bare type continues a span of that type


@dataclass(frozen=True)
class TagScheme:
    """Lookup tables from label id to (prefix code, type index) for one model's id2label."""

    prefix: np.ndarray  # (n_labels,) int8
    type_index: np.ndarray  # (n_labels,) int32, -1 for O
    types: tuple[str, ...]

    @classmethod
    def from_id2label(cls, id2label: Mapping[int, str] | Sequence[str]) -> TagScheme:
        """Build the tables from a model config's id2label (dict or list)."""
        items = dict(id2label) if isinstance(id2label, Mapping) else dict(enumerate(id2label))
        n = max((int(k) for k in items), default=-1) + 1
        prefix = np.zeros(n, dtype=np.int8)
        type_index = np.full(n, -1, dtype=np.int32)
        types: list[str] = []
        for key, tag in items.items():
            code, etype = parse_tag(tag)
            prefix[int(key)] = code
            if code != OUT:
                if etype not in types:
                    types.append(etype)
                type_index[int(key)] = types.index(etype)
        return cls(prefix=prefix, type_index=type_index, types=tuple(types))


def decode_tokens(
    scheme: TagScheme,
    label_ids: np.ndarray,
    probs: np.ndarray,
    offsets: np.ndarray,
    word_ids: np.ndarray | None = None,
) -> list[tuple[int, int, int, float]]:
    """Return (char start, char end, type index, score) spans from per-token predictions.

    `offsets` is (n, 2) character offsets; tokens with an empty offset (special tokens,
    padding) are ignored. `word_ids` groups sub-tokens into words (None: every token is a word).
    """
    label_ids = np.asarray(label_ids, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = offsets[:, 1] > offsets[:, 0]
    words: np.ndarray | None = None
    if word_ids is not None:
        words = np.asarray(word_ids, dtype=np.int64).reshape(-1)
        keep &= words >= 0
    if not keep.any():
        return []
    label_ids, probs, offsets = label_ids[keep], probs[keep], offsets[keep]
    n = len(label_ids)
    first = np.ones(n, dtype=bool)
    if words is not None:
        words = words[keep]
        first[1:] = words[1:] != words[:-1]
    unit_of_token = np.cumsum(first) - 1
    unit_labels = label_ids[first]
    prefix = scheme.prefix[unit_labels]
    etype = scheme.type_index[unit_labels]

    entity = etype >= 0
    prev_type = np.empty_like(etype)
    prev_type[0], prev_type[1:] = -1, etype[:-1]
    prev_prefix = np.empty_like(prefix)
    prev_prefix[0], prev_prefix[1:] = OUT, prefix[:-1]
    starts = entity & (
        (prefix == BEGIN)
        | (prefix == SINGLE)
        | (prev_type != etype)
        | (prev_prefix == END)
        | (prev_prefix == SINGLE)
    )
    n_spans = int(starts.sum())
    if n_spans == 0:
        return []
    span_of_unit = np.where(entity, np.cumsum(starts) - 1, -1)
    span_of_token = span_of_unit[unit_of_token]
    in_span = span_of_token >= 0
    sid = span_of_token[in_span]
    counts = np.bincount(sid, minlength=n_spans)
    score = np.bincount(sid, weights=probs[in_span], minlength=n_spans) / np.maximum(counts, 1)
    # span ids never decrease along the text, so each span's tokens are one contiguous run
    first_tok = np.searchsorted(sid, np.arange(n_spans), side="left")
    last_tok = np.searchsorted(sid, np.arange(n_spans), side="right") - 1
    span_offsets = offsets[in_span]
    char_start = span_offsets[first_tok, 0]
    char_end = span_offsets[last_tok, 1]
    span_type = etype[starts]
    return [
        (int(s), int(e), int(t), float(p))
        for s, e, t, p in zip(
            char_start.tolist(), char_end.tolist(), span_type.tolist(), score.tolist(), strict=True
        )
    ]


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Return (start, end) clipped to the text with whitespace removed from both edges."""
    start = max(0, min(start, len(text)))
    end = max(start, min(end, len(text)))
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def aggregate(
    text: str,
    scheme: TagScheme,
    label_ids: np.ndarray,
    probs: np.ndarray,
    offsets: np.ndarray,
    word_ids: np.ndarray | None = None,
) -> list[RawSpan]:
    """Return the entity spans of one text: exact, whitespace-trimmed, non-empty."""
    spans = []
    for start, end, type_idx, score in decode_tokens(scheme, label_ids, probs, offsets, word_ids):
        start, end = trim_span(text, start, end)
        if end > start:
            spans.append(RawSpan(start, end, scheme.types[type_idx], score))
    return spans


@dataclass
class Window:
    """One token window of a text: per-token predictions, without special tokens."""

    label_ids: np.ndarray
    probs: np.ndarray
    offsets: np.ndarray  # (n, 2)
    word_ids: np.ndarray  # (n,), -1 where unknown


def merge_windows(windows: Sequence[Window], stride: int) -> Window:
    """Join the overlapping windows of one text into one token sequence, each token once.

    Consecutive windows share `stride` tokens. The overlap is split at its middle (window k
    starts owning tokens at its content index stride // 2), measured in characters so that
    tokens sharing one offset (byte-level pieces of one emoji) stay together.
    """
    if len(windows) == 1:
        return windows[0]
    parts: list[Window] = []
    boundaries: list[int] = []
    for k, win in enumerate(windows):
        if k == 0 or len(win.offsets) == 0:
            boundaries.append(-1)
            continue
        split = min(stride // 2, len(win.offsets) - 1)
        boundaries.append(int(win.offsets[split, 0]))
    for k, win in enumerate(windows):
        starts = win.offsets[:, 0] if len(win.offsets) else np.zeros(0, dtype=np.int64)
        mask = np.ones(len(starts), dtype=bool)
        if k > 0 and boundaries[k] >= 0:
            mask &= starts >= boundaries[k]
        if k + 1 < len(windows) and boundaries[k + 1] >= 0:
            mask &= starts < boundaries[k + 1]
        parts.append(Window(win.label_ids[mask], win.probs[mask], win.offsets[mask], win.word_ids[mask]))
    return Window(
        label_ids=np.concatenate([p.label_ids for p in parts]),
        probs=np.concatenate([p.probs for p in parts]),
        offsets=np.concatenate([p.offsets.reshape(-1, 2) for p in parts]),
        word_ids=np.concatenate([p.word_ids for p in parts]),
    )
