"""Zero-shot NER (GLiNER) for span tags whose labels no closed NER model knows, routed automatically.

A tiny random GLiNER is built and saved by the test and loads through the real loading code; its
real forward runs and its span logits are planted (tests/backends/_gliner_support.py), so spans,
labels and scores are exact. Every answer goes through /predict and the SDK's validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gliner")

from flask import Flask

from backends.ner import NerBackend
from backends.zero_shot_ner import ZeroShotNerBackend
from serving.cli import weights as weights_cli
from serving.contract import Backend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._gliner_support import PlantedZeroShotNer, save_gliner, sigmoid
from tests.support.fakes import FakeResolver

TEXT_CONFIG = (
    '<View><Text name="text" value="$text"/><Labels name="ner" toName="text">'
    '<Label value="Company"/><Label value="Due date"/></Labels></View>'
)
# Label Studio 1.23.2's "HTML entity recognition" template
HTML_CONFIG = (
    '<View><HyperTextLabels name="ner" toName="text"><Label value="Title" background="green"/>'
    '<Label value="Author" background="blue"/><Label value="Body" background="yellow"/></HyperTextLabels>'
    '<View><HyperText name="text" value="$html"/></View></View>'
)
DIALOGUE_CONFIG = (
    '<View><Paragraphs name="chat" value="$dialogue" layout="dialogue"/>'
    '<ParagraphLabels name="ner" toName="chat"><Label value="Customer"/><Label value="City"/></ParagraphLabels>'
    "</View>"
)
# the labels of Label Studio's "NER tagging invoices (BIO format)" template
BIO_LABELS = ("NIF", "FORN", "DATA", "VALOR", "NUMFAT")
BIO_CONFIG = (
    '<View><Labels name="ner" toName="text" showInline="false">'
    + "".join(f'<Label value="B-{x}"/>' for x in BIO_LABELS)
    + "".join(f'<Label value="I-{x}"/>' for x in BIO_LABELS)
    + '<Label value="O"/></Labels><Text name="text" value="$ocr" granularity="word"/></View>'
)


@pytest.fixture(scope="module")
def gliner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gliner(tmp_path_factory.mktemp("gliner") / "tiny-gliner")


def families() -> dict[str, type[Backend]]:
    return {"zero_shot_ner": PlantedZeroShotNer, "ner": NerBackend}


def app_for(tmp_path: Path, gliner: Path) -> tuple[Flask, Runtime]:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"),
        max_wait_ms=20.0,
        load_wait_s=60.0,
        zero_shot_ner_model=str(gliner),
        ner_engine="spacy",
    )
    runtime = Runtime(cfg, families=families(), resolver=FakeResolver())
    return create_app(cfg, runtime=runtime), runtime


def predict(app: Flask, config: str, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [{"id": i + 1, "data": d} for i, d in enumerate(data)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results: list[dict[str, Any]] = resp.get_json()["results"]
    assert len(results) == len(tasks)
    schema = ConfigSchema.from_config(config)
    for prediction, task in zip(results, tasks, strict=True):
        valid, problems = filter_valid(schema, prediction["result"], task["data"])
        assert valid == prediction["result"] and not problems
    return results


def spans(prediction: dict[str, Any]) -> list[tuple[Any, ...]]:
    out = []
    for r in prediction["result"]:
        v = r["value"]
        label = (v.get("labels") or v.get("hypertextlabels") or v.get("paragraphlabels"))[0]
        where = (v["start"], v["end"]) if isinstance(v["start"], int) else (v["start"], v["startOffset"])
        out.append((*where, v["text"], label, pytest.approx(r["score"])))
    return out


def test_routing_sends_labels_no_ner_model_knows_to_gliner(gliner: Path) -> None:
    settings = Settings(zero_shot_ner_model=str(gliner), ner_engine="spacy")
    plan = build_plan(TEXT_CONFIG, settings, families())
    assert [(r.family, r.model, r.labels) for r in plan.routes] == [
        ("zero_shot_ner", str(gliner), ("Company", "Due date"))
    ]
    # OntoNotes knows Person (alias of PERSON), not Company: each model gets its own labels
    mixed = TEXT_CONFIG.replace('<Label value="Due date"/>', '<Label value="Person"/>')
    plan = build_plan(mixed, settings, families())
    assert [(r.family, r.labels) for r in plan.routes] == [
        ("ner", ("Person",)),
        ("zero_shot_ner", ("Company",)),
    ]
    known = mixed.replace('<Label value="Company"/>', '<Label value="Organization"/>')
    assert [r.family for r in build_plan(known, settings, families()).routes] == ["ner"]
    # without the weights the route still names GLiNER, so /setup answers 422 with the command
    missing = Settings(zero_shot_ner_model=str(gliner / "nope"), ner_engine="spacy")
    spec = build_plan(TEXT_CONFIG, missing, families()).targets[0].model
    assert spec.family == "zero_shot_ner"
    reason = ZeroShotNerBackend.availability(spec, missing)
    assert reason is not None and "python -m serving weights download --model" in reason
    # and that command knows the name: GLiNER's family downloads it, not NER's catch-all
    assert weights_cli._owner("gliner", families()) == "zero_shot_ner"
    assert weights_cli._owner("urchade/gliner_small-v2.1", families()) == "zero_shot_ner"


def test_text_spans_of_the_configs_labels_with_exact_offsets(tmp_path: Path, gliner: Path) -> None:
    app, _ = app_for(tmp_path, gliner)
    text = "Invoice from Acme Corp, dated April 24 😀 in Paris."
    (result,) = predict(app, TEXT_CONFIG, [{"text": text}])
    start = text.index("Acme")
    date = text.index("April")
    assert spans(result) == [
        (start, start + 9, "Acme Corp", "Company", sigmoid(3.0)),
        (date, date + 8, "April 24", "Due date", sigmoid(2.0)),
    ]
    assert result["model_version"]


def test_html_entity_recognition_template_gets_xpath_spans(tmp_path: Path, gliner: Path) -> None:
    app, _ = app_for(tmp_path, gliner)
    html = "<html><body><h1>Black holes</h1><p>by <b>Jane Doe</b></p><p>Nothing escapes.</p></body></html>"
    (result,) = predict(app, HTML_CONFIG, [{"html": html}])
    got = [
        (v["start"], v["startOffset"], v["end"], v["endOffset"], v["text"], v["hypertextlabels"], r["score"])
        for r in result["result"]
        for v in [r["value"]]
    ]
    assert got == [
        (
            "/h1[1]/text()[1]",
            0,
            "/h1[1]/text()[1]",
            11,
            "Black holes",
            ["Title"],
            pytest.approx(sigmoid(1.0)),
        ),
        (
            "/p[1]/b[1]/text()[1]",
            0,
            "/p[1]/b[1]/text()[1]",
            8,
            "Jane Doe",
            ["Author"],
            pytest.approx(sigmoid(4.0)),
        ),
    ]


def test_paragraph_spans_carry_the_paragraph_index(tmp_path: Path, gliner: Path) -> None:
    app, _ = app_for(tmp_path, gliner)
    dialogue = [{"author": "A", "text": "Hi 😀 from Paris"}, {"author": "B", "text": "I am Jane Doe"}]
    (result,) = predict(app, DIALOGUE_CONFIG, [{"dialogue": dialogue}])
    got = [
        (v["start"], v["startOffset"], v["endOffset"], v["text"], v["paragraphlabels"])
        for v in (r["value"] for r in result["result"])
    ]
    # UTF-16 offsets: the emoji counts two
    assert got == [("0", 11, 16, "Paris", ["City"]), ("1", 5, 13, "Jane Doe", ["Customer"])]


def test_bio_labels_are_prompted_by_type_and_emitted_word_by_word(tmp_path: Path, gliner: Path) -> None:
    app, _ = app_for(tmp_path, gliner)
    text = "INVOICE\n\nInvoice # 12345\n\nVendor\nItalian Restaurant\n123 Main Street"
    (result,) = predict(app, BIO_CONFIG, [{"ocr": text}])
    vendor = text.index("Italian")
    number = text.index("12345")
    assert spans(result) == [
        (number, number + 5, "12345", "B-NUMFAT", sigmoid(3.0)),
        (vendor, vendor + 7, "Italian", "B-FORN", sigmoid(2.0)),
        (vendor + 8, vendor + 18, "Restaurant", "I-FORN", sigmoid(2.0)),
    ]
    # predicted_values name the prompt of a type
    named = BIO_CONFIG.replace('<Label value="B-FORN"/>', '<Label value="B-FORN" predicted_values="vendor"/>')
    (result,) = predict(app, named, [{"ocr": text}])
    assert ("Restaurant", "I-FORN", pytest.approx(sigmoid(2.5))) in [s[2:] for s in spans(result)]


def test_long_texts_are_windowed_with_exact_offsets(tmp_path: Path, gliner: Path) -> None:
    app, runtime = app_for(tmp_path, gliner)
    filler = " ".join(f"w{i}" for i in range(50))
    long_text = f"{filler} Acme Corp {filler} April 24 end"
    texts = [{"text": long_text}, {"text": "Acme Corp"}]
    long_result, short = predict(app, TEXT_CONFIG, texts)
    first = long_text.index("Acme")
    date = long_text.index("April")
    assert spans(long_result) == [
        (first, first + 9, "Acme Corp", "Company", sigmoid(3.0)),
        (date, date + 8, "April 24", "Due date", sigmoid(2.0)),
    ]
    assert spans(short) == [(0, 9, "Acme Corp", "Company", sigmoid(3.0))]
    backend = runtime.slot(runtime.plan(TEXT_CONFIG).targets[0].model).backend
    rows = [len(words) for call in backend.planted.calls for words in call]
    # 105 words in windows of 24 overlapping by 6, plus the short text: every window at most 24 words
    assert len(rows) == 7 and max(rows) == 24


def test_dynamic_labels_prompt_each_task_with_its_own_list(tmp_path: Path, gliner: Path) -> None:
    config = (
        '<View><Labels name="ner" toName="text" value="$entities"/><Text name="text" value="$text"/></View>'
    )
    plan = build_plan(config, Settings(zero_shot_ner_model=str(gliner), ner_engine="spacy"), families())
    assert [(r.family, r.labels) for r in plan.routes] == [("zero_shot_ner", ())]
    assert "$entities" in plan.routes[0].reason
    app, _ = app_for(tmp_path, gliner)
    text = "Jane Doe of Acme Corp"
    first, second = predict(
        app,
        config,
        [
            {"text": text, "entities": [{"value": "Company", "html": "<b>Company</b>"}]},
            {"text": text, "entities": [{"value": "Customer"}, {"value": "City"}]},
        ],
    )
    # each task's own labels, and only those (the validator checks them against the same list)
    assert spans(first) == [(12, 21, "Acme Corp", "Company", sigmoid(3.0))]
    assert spans(second) == [(0, 8, "Jane Doe", "Customer", sigmoid(4.0))]
