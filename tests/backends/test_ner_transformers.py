"""The transformers NER engine with tiny BERTs built and saved here, loaded through from_pretrained(path)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends import ner as ner_module  # noqa: E402
from backends.ner import HF_DEFAULT, SPACY_DEFAULT, NerBackend  # noqa: E402
from serving.contract import ControlTag, Item, LabelMap, ModelSpec, ObjectTag, Target  # noqa: E402
from serving.settings import Settings  # noqa: E402

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
# Planted tag of each word-piece: context-free, so the expected spans follow from the text alone.
PLANTED = {
    "barack": "B-PER",
    "obama": "I-PER",
    "alice": "B-PER",
    "acme": "B-ORG",
    "corp": "I-ORG",
    "paris": "B-LOC",
}
PLANTED.update({"sao": "B-LOC", "paulo": "I-LOC", "jose": "B-PER"})
FILLER = ["met", "in", "at", "the", "was", "born", "and", "works", "said", "today"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")


def _vocab() -> list[str]:
    return [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *CHARS,
        *("##" + c for c in CHARS),
        *PLANTED,
        *FILLER,
    ]


def _tokenizer(folder: Path, max_length: int) -> Any:
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n", encoding="utf-8")
    try:  # transformers 5 takes the vocab file as `vocab`, 4.x as `vocab_file`
        tok = transformers.BertTokenizerFast(
            vocab=str(vocab_file), do_lower_case=True, model_max_length=max_length
        )
        assert tok.convert_tokens_to_ids("obama") == _vocab().index("obama")
    except (TypeError, AssertionError):
        tok = transformers.BertTokenizerFast(
            vocab_file=str(vocab_file), do_lower_case=True, model_max_length=max_length
        )
    return tok


def _config(vocab_size: int, max_positions: int) -> Any:
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        id2label=dict(enumerate(TAGS)),
        label2id={t: i for i, t in enumerate(TAGS)},
    )


def build_planted_bert(folder: Path, max_positions: int = 64) -> Path:
    """Save a 2-layer BERT whose output tag depends only on the token (planted through the weights).

    Each word embedding is a spike on the dimension of its planted tag; position/type embeddings
    and every residual branch (attention and FFN outputs) are zero, so each layer passes its
    (already normalised) input through, and the classifier reads the spike.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder, max_positions)
    vocab = _vocab()
    model = transformers.BertForTokenClassification(_config(len(vocab), max_positions))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.bert.embeddings
        for i, piece in enumerate(vocab):
            emb.word_embeddings.weight[i, TAGS.index(PLANTED.get(piece, "O"))] = 10.0
        emb.LayerNorm.weight.fill_(1.0)
        for layer in model.bert.encoder.layer:
            layer.attention.output.LayerNorm.weight.fill_(1.0)
            layer.output.LayerNorm.weight.fill_(1.0)
        model.classifier.weight[:, : len(TAGS)] = torch.eye(len(TAGS))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_random_bert(folder: Path, max_positions: int = 64, seed: int = 0) -> Path:
    """Save a random 2-layer BERT with a sharp classifier (few near-ties between tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder, max_positions)
    torch.manual_seed(seed)
    model = transformers.BertForTokenClassification(_config(len(_vocab()), max_positions))
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def expected_spans(text: str) -> list[tuple[int, int, str]]:
    """Spans the planted model must find: BERT words (\\w+ or one punctuation mark), BIO over them."""
    out: list[list[Any]] = []
    prev = "O"
    for m in re.finditer(r"\w+|[^\w\s]", text):
        word = m.group().lower().replace("ã", "a").replace("é", "e")
        tag = PLANTED.get(word, "O")
        if tag == "O":
            prev = tag
            continue
        prefix, etype = tag.split("-")
        if prefix == "B" or prev == "O" or prev.split("-")[1] != etype:
            out.append([m.start(), m.end(), etype])
        else:
            out[-1][1] = m.end()
        prev = tag
    return [(s, e, t) for s, e, t in out]


def _target(labels: tuple[str, ...] = ("PER", "ORG", "LOC")) -> Target:
    control = ControlTag(name="label", tag="Labels", to_name="text", labels=labels)
    obj = ObjectTag(name="text", tag="Text", value_key="text")
    spec = ModelSpec("ner", "local")
    return Target(control, obj, spec, LabelMap(labels, {}, NerBackend.aliases), threshold=0.0)


def _load(folder: Path, settings: Settings | None = None, name: str = "") -> NerBackend:
    backend = NerBackend(ModelSpec("ner", name or str(folder)), settings or Settings())
    before = backend.version()
    backend.load("cpu")
    assert backend.version() == before and not before.endswith("@missing")
    return backend


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> NerBackend:
    return _load(build_planted_bert(tmp_path_factory.mktemp("planted") / "bert"))


def _spans(backend: NerBackend, texts: list[str]) -> list[list[tuple[int, int, str]]]:
    return [[(s.start, s.end, s.label) for s in out] for out in backend.forward(texts)]


def test_loads_through_from_pretrained_and_reports_version(planted: NerBackend) -> None:
    assert planted.engine == "transformers"
    assert planted.tokenizer.is_fast
    assert tuple(planted.labels()) == ("PER", "ORG", "LOC", "MISC")
    assert planted.max_length == 64
    assert re.fullmatch(r".+@[0-9a-f]{8}", planted.version())


@pytest.mark.parametrize(
    "text",
    [
        "Barack Obama was born in Paris.",
        "  Barack   Obama\n\nmet Alice\tat Acme Corp , Paris!\n",
        "😀 Barack Obama 😀😀 met José in São Paulo 🇫🇷 today",
        "Ünïcödé tëxt: Alice 👩‍👩‍👧 works at ACME corp; 東京 and Paris",
        "Paris Paris Alice Alice",  # adjacent same-type entities stay separate
        "Obama and Corp, then paris",  # I- without B- starts a span
        "",
        "   \n\t ",
    ],
)
def test_offsets_are_exact_for_unicode_emoji_spaces_and_newlines(planted: NerBackend, text: str) -> None:
    (spans,) = planted.forward([text])
    got = [(s.start, s.end, s.label) for s in spans]
    assert got == expected_spans(text)
    for s in spans:
        piece = text[s.start : s.end]
        assert piece and piece == piece.strip()
        assert 0.9 < s.score <= 1.0  # planted spikes give confident tags
    items = planted.postprocess(spans, _target(), Item({}, _target().obj, text=text))
    assert [(i["value"]["start"], i["value"]["end"], i["value"]["labels"][0]) for i in items] == got
    assert all(i["value"]["text"] == text[i["value"]["start"] : i["value"]["end"]] for i in items)


def test_emoji_and_accents_keep_exact_offsets(planted: NerBackend) -> None:
    text = "😀 Barack Obama 😀😀 met José in São Paulo"
    (spans,) = planted.forward([text])
    assert [(s.start, s.end, text[s.start : s.end], s.label) for s in spans] == [
        (2, 14, "Barack Obama", "PER"),
        (22, 26, "José", "PER"),
        (30, 39, "São Paulo", "LOC"),
    ]


def test_long_text_is_windowed_and_every_span_is_valid(planted: NerBackend) -> None:
    rng = np.random.default_rng(7)
    vocab = ["Barack Obama", "Alice", "Acme Corp", "Paris", "São Paulo", "😀", "x-ray", *FILLER]
    parts: list[str] = []
    while len(parts) < 2200:
        parts.append(str(vocab[int(rng.integers(len(vocab)))]))
    text = "  ".join(parts[:1100]) + "\n\n" + " ".join(parts[1100:])
    n_tokens = len(planted.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_tokens >= 3000
    (spans,) = planted.forward([text])
    got = [(s.start, s.end, s.label) for s in spans]
    assert got == expected_spans(text)
    assert len(got) == len(set(got))
    for (_, e0, _), (s1, _, _) in itertools.pairwise(got):
        assert e0 <= s1  # sorted and non-overlapping
    assert all(text[s:e] == text[s:e].strip() != "" for s, e, _ in got)


def test_entities_straddling_every_window_boundary(planted: NerBackend) -> None:
    """Shift the text one word at a time so entities sit on each position of the window overlap."""
    for shift in range(planted.stride + 2):
        text = "met " * shift + " ".join(["Barack Obama Acme Corp Paris"] * 40)
        (spans,) = planted.forward([text])
        assert [(s.start, s.end, s.label) for s in spans] == expected_spans(text), shift


def test_batch_of_mixed_lengths_equals_one_by_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _load(build_random_bert(tmp_path / "random"))
    rng = np.random.default_rng(3)
    words = [*PLANTED, *FILLER, "😀", "São", "x-ray", "Zürich"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in (1, 3, 200, 7, 60, 15, 400, 2, 33)]
    texts.insert(4, "")
    single = [backend.forward([t])[0] for t in texts]
    # small chunks too: windows of different texts share padded chunks in sorted order
    monkeypatch.setattr(ner_module, "_TOKENS_PER_CHUNK", 200)
    batched = backend.forward(texts)
    assert len(batched) == len(texts)
    assert sum(len(s) for s in single) > 20  # the random model does find entities
    for one, many, text in zip(single, batched, texts, strict=True):
        assert [(s.start, s.end, s.label) for s in many] == [(s.start, s.end, s.label) for s in one]
        assert [s.score for s in many] == pytest.approx([s.score for s in one], abs=1e-4)
        assert all(text[s.start : s.end].strip() == text[s.start : s.end] != "" for s in many)


@pytest.mark.gpu
def test_cuda_fp16_gives_the_cpu_spans(tmp_path: Path) -> None:
    folder = build_planted_bert(tmp_path / "planted")
    texts = ["😀 Barack Obama met José in São Paulo", "Acme Corp " * 300, ""]
    cpu = _spans(_load(folder), texts)
    backend = NerBackend(ModelSpec("ner", str(folder)), Settings())
    backend.load("cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        assert _spans(backend, texts) == cpu


def test_label_map_aliases_and_threshold(planted: NerBackend) -> None:
    text = "Barack Obama met Alice at Acme Corp in Paris"
    (spans,) = planted.forward([text])
    target = _target(("Person", "Organisation"))  # no location label: Paris is not emitted
    items = planted.postprocess(spans, target, Item({}, target.obj, text=text))
    assert [(i["value"]["text"], i["value"]["labels"]) for i in items] == [
        ("Barack Obama", ["Person"]),
        ("Alice", ["Person"]),
        ("Acme Corp", ["Organisation"]),
    ]
    assert all(i["from_name"] == "label" and i["to_name"] == "text" and i["type"] == "labels" for i in items)
    strict = Target(target.control, target.obj, target.model, target.label_map, threshold=0.999)
    assert planted.postprocess(spans, strict, Item({}, target.obj, text=text)) == []


def test_default_model_prefers_local_transformers_weights(tmp_path: Path) -> None:
    empty = Settings(model_dir=str(tmp_path / "none"))
    assert NerBackend.default_model_for(empty) == SPACY_DEFAULT
    assert NerBackend.default_model_for(empty.with_(ner_engine="transformers")) == HF_DEFAULT
    assert NerBackend.default_model_for(empty.with_(ner_engine="spacy")) == SPACY_DEFAULT
    # a save_pretrained() folder named like the default id under MODEL_DIR counts as present
    build_planted_bert(tmp_path / "models" / "bert-base-NER")
    settings = Settings(model_dir=str(tmp_path / "models"))
    assert NerBackend.default_model_for(settings) == HF_DEFAULT
    assert NerBackend.availability(ModelSpec("ner", HF_DEFAULT), settings) is None
    backend = _load(tmp_path, settings, name=HF_DEFAULT)
    assert backend.version().startswith(HF_DEFAULT + "@")
    assert _spans(backend, ["Alice"]) == [[(0, 5, "PER")]]


def test_availability_says_what_is_missing(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path))
    reason = NerBackend.availability(ModelSpec("ner", "someone/no-such-ner"), settings)
    assert reason is not None and "python -m serving weights download --model someone/no-such-ner" in reason
    assert "model_path" in (
        NerBackend.availability(ModelSpec("ner", "x", str(tmp_path / "nope")), settings) or ""
    )
    folder = build_planted_bert(tmp_path / "mine")
    assert NerBackend.availability(ModelSpec("ner", "mine", str(folder)), settings) is None
    assert NerBackend.availability(ModelSpec("ner", str(folder)), settings) is None
