"""BIO / BIOES aggregation and window merging of the NER backend, with planted per-token labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends._ner_decode import (
    BEGIN,
    INSIDE,
    OUT,
    SINGLE,
    TagScheme,
    Window,
    aggregate,
    merge_windows,
    parse_tag,
    trim_span,
)

BIO = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
BIOES = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-ORG", "I-ORG", "E-ORG", "S-ORG", "S-LOC"]


def _tokens(text: str) -> tuple[list[str], np.ndarray]:
    """Split on spaces: one token per word, with its character offsets."""
    words, offsets, pos = [], [], 0
    for word in text.split(" "):
        if word:
            words.append(word)
            offsets.append((pos, pos + len(word)))
        pos += len(word) + 1
    return words, np.array(offsets, dtype=np.int64)


def _run(text: str, tags: list[str], scheme_tags: list[str], probs: list[float] | None = None) -> list[tuple]:
    scheme = TagScheme.from_id2label(scheme_tags)
    words, offsets = _tokens(text)
    assert len(words) == len(tags)
    ids = np.array([scheme_tags.index(t) for t in tags])
    p = np.array(probs if probs is not None else [0.9] * len(tags))
    return [
        (s.start, s.end, text[s.start : s.end], s.label) for s in aggregate(text, scheme, ids, p, offsets)
    ]


@pytest.mark.parametrize(
    ("text", "tags", "expected"),
    [
        # a B- starts a new span: adjacent same-type entities never merge
        ("Ann Bob", ["B-PER", "B-PER"], [(0, 3, "Ann", "PER"), (4, 7, "Bob", "PER")]),
        (
            "Ann Lee Bob Ray",
            ["B-PER", "I-PER", "B-PER", "I-PER"],
            [(0, 7, "Ann Lee", "PER"), (8, 15, "Bob Ray", "PER")],
        ),
        # single-token entities at the start, middle and end are kept
        ("Paris is nice", ["B-LOC", "O", "O"], [(0, 5, "Paris", "LOC")]),
        ("we saw Rome today", ["O", "O", "B-LOC", "O"], [(7, 11, "Rome", "LOC")]),
        ("we saw Rome", ["O", "O", "B-LOC"], [(7, 11, "Rome", "LOC")]),
        # I- without B- starts a span
        ("at Acme Corp now", ["O", "I-ORG", "I-ORG", "O"], [(3, 12, "Acme Corp", "ORG")]),
        ("Acme", ["I-ORG"], [(0, 4, "Acme", "ORG")]),
        # I- of another type starts a new span of that type
        ("Acme Bob", ["B-ORG", "I-PER"], [(0, 4, "Acme", "ORG"), (5, 8, "Bob", "PER")]),
        # O between two I- of one type splits them
        ("Ann and Lee", ["I-PER", "O", "I-PER"], [(0, 3, "Ann", "PER"), (8, 11, "Lee", "PER")]),
        ("nothing here", ["O", "O"], []),
    ],
)
def test_bio_aggregation(text: str, tags: list[str], expected: list[tuple]) -> None:
    assert _run(text, tags, BIO) == expected


@pytest.mark.parametrize(
    ("text", "tags", "expected"),
    [
        ("Ann Bob", ["S-PER", "S-PER"], [(0, 3, "Ann", "PER"), (4, 7, "Bob", "PER")]),
        (
            "Ann Lee Kay Bob Ray",
            ["B-PER", "I-PER", "E-PER", "B-PER", "E-PER"],
            [(0, 11, "Ann Lee Kay", "PER"), (12, 19, "Bob Ray", "PER")],
        ),
        (
            "Acme Corp Rome",
            ["B-ORG", "E-ORG", "S-LOC"],
            [(0, 9, "Acme Corp", "ORG"), (10, 14, "Rome", "LOC")],
        ),
        # E- without an open span is a one-token entity
        ("see Ann now", ["O", "E-PER", "O"], [(4, 7, "Ann", "PER")]),
        # after E- the span is closed: a following I- starts a new one
        ("Ann Lee Kay", ["B-PER", "E-PER", "I-PER"], [(0, 7, "Ann Lee", "PER"), (8, 11, "Kay", "PER")]),
        # after S- too
        ("Ann Lee", ["S-PER", "I-PER"], [(0, 3, "Ann", "PER"), (4, 7, "Lee", "PER")]),
    ],
)
def test_bioes_aggregation(text: str, tags: list[str], expected: list[tuple]) -> None:
    assert _run(text, tags, BIOES) == expected


def test_bilou_and_bare_io_tags() -> None:
    assert parse_tag("U-PER") == (SINGLE, "PER")
    assert parse_tag("L-ORG")[1] == "ORG"
    assert parse_tag("PER") == (INSIDE, "PER")
    assert parse_tag("O") == (OUT, "")
    assert parse_tag("B_LOC") == (BEGIN, "LOC")
    io = ["O", "PER", "LOC"]
    assert _run("Ann Lee in Rome", ["PER", "PER", "O", "LOC"], io) == [
        (0, 7, "Ann Lee", "PER"),
        (11, 15, "Rome", "LOC"),
    ]


def test_span_score_is_mean_of_token_max_probabilities() -> None:
    scheme = TagScheme.from_id2label(BIO)
    text = "Ann Lee met Rome"
    _, offsets = _tokens(text)
    spans = aggregate(text, scheme, np.array([1, 2, 0, 5]), np.array([0.9, 0.6, 0.99, 0.55]), offsets)
    assert [(s.label, round(s.score, 6)) for s in spans] == [("PER", 0.75), ("LOC", 0.55)]


def test_word_level_first_subtoken_decides_and_no_subword_debris() -> None:
    scheme = TagScheme.from_id2label(BIO)
    text = "Obamas visited"
    # tokens: "Ob" "##ama" "##s" "visited"; the word takes its first sub-token's tag
    offsets = np.array([[0, 2], [2, 5], [5, 6], [7, 14]])
    words = np.array([0, 0, 0, 1])
    spans = aggregate(text, scheme, np.array([1, 0, 3, 0]), np.array([0.9, 0.5, 0.4, 0.8]), offsets, words)
    assert [(s.start, s.end, s.label) for s in spans] == [(0, 6, "PER")]
    assert spans[0].score == pytest.approx((0.9 + 0.5 + 0.4) / 3)
    # a later sub-token alone never creates a span that starts mid-word
    spans = aggregate(text, scheme, np.array([0, 1, 2, 0]), np.array([0.9] * 4), offsets, words)
    assert spans == []


def test_special_tokens_and_edge_whitespace_are_ignored() -> None:
    scheme = TagScheme.from_id2label(BIO)
    text = "  Ann  Lee \n"
    # [CLS], " Ann" with its leading spaces (byte-level BPE style), "  Lee \n", [SEP]
    offsets = np.array([[0, 0], [0, 5], [5, 12], [0, 0]])
    spans = aggregate(text, scheme, np.array([3, 1, 2, 3]), np.array([0.1, 0.8, 0.6, 0.1]), offsets)
    assert [(s.start, s.end, text[s.start : s.end]) for s in spans] == [(2, 10, "Ann  Lee")]
    assert spans[0].score == pytest.approx(0.7)
    assert trim_span("  x  ", 0, 5) == (2, 3)
    assert trim_span("   ", 0, 3)[0] == trim_span("   ", 0, 3)[1]


def _windows(n: int, content: int, stride: int) -> list[tuple[int, int]]:
    """Token ranges of windows as the fast tokenizer makes them (step content - stride)."""
    ranges, start = [], 0
    while True:
        stop = min(start + content, n)
        ranges.append((start, stop))
        if stop == n:
            return ranges
        start += content - stride


def _seq(n: int, seed: int = 0) -> Window:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, size=n)
    gaps = rng.integers(0, 3, size=n)
    starts = np.cumsum(lengths + gaps) - lengths
    offsets = np.stack([starts, starts + lengths], axis=1)
    words = np.cumsum(rng.random(n) < 0.7)
    return Window(rng.integers(0, 7, size=n), rng.random(n), offsets, words)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    content=st.integers(4, 40),
    stride_frac=st.floats(0.0, 0.45),
    seed=st.integers(0, 99),
)
def test_merge_windows_takes_every_token_exactly_once(
    n: int, content: int, stride_frac: float, seed: int
) -> None:
    stride = int(content * stride_frac)
    full = _seq(n, seed)
    wins = [
        Window(full.label_ids[a:b], full.probs[a:b], full.offsets[a:b], full.word_ids[a:b])
        for a, b in _windows(n, content, stride)
    ]
    merged = merge_windows(wins, stride)
    np.testing.assert_array_equal(merged.offsets, full.offsets)
    np.testing.assert_array_equal(merged.label_ids, full.label_ids)
    np.testing.assert_array_equal(merged.word_ids, full.word_ids)


def test_entity_in_window_overlap_is_neither_duplicated_nor_cut() -> None:
    scheme = TagScheme.from_id2label(BIO)
    words = [f"w{i}" for i in range(30)]
    text = " ".join(words)
    _, offsets = _tokens(text)
    labels = np.zeros(30, dtype=np.int64)
    labels[[9, 10, 11]] = [1, 2, 2]  # one 3-token PER entity straddling the overlap of windows 0 and 1
    probs = np.full(30, 0.8)
    word_ids = np.arange(30)
    content, stride = 12, 4
    wins = [
        Window(labels[a:b], probs[a:b], offsets[a:b], word_ids[a:b]) for a, b in _windows(30, content, stride)
    ]
    assert len(wins) == 4
    merged = merge_windows(wins, stride)
    spans = aggregate(text, scheme, merged.label_ids, merged.probs, merged.offsets, merged.word_ids)
    assert [(text[s.start : s.end], s.label) for s in spans] == [("w9 w10 w11", "PER")]
