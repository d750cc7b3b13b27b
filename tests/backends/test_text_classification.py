"""Text classification: Choices and Taxonomy on Text, HyperText, Paragraphs and Table, zero-shot and supervised.

Tiny random BERT / DeBERTa-v2 checkpoints are built and saved by the tests and load through the real
code; their logits are planted from the tokens they get (tests/backends/_text_cls_support.py), so the
choices and scores are exact. Predictions go through /predict and are validated by label_studio_sdk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from backends import registry
from backends.text_classification import TextClassificationBackend, nli_classes
from serving.contract import Backend
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._ocr_support import validate
from tests.backends._text_cls_support import PlantedText, save_model, softmax
from tests.support.fakes import FakeResolver

SENTIMENT = """<View><Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text"{attrs}>
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral"/>
  </Choices></View>"""
# LS 1.23.2's Two-level sentiment, shaped: the second level shows only for Positive
TWO_LEVEL = """<View><Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" showInLine="true">
    <Choice value="Positive"/><Choice value="Negative"/>
  </Choices>
  <Choices name="why" toName="text" visibleWhen="choice-selected" whenTagName="sentiment"
           whenChoiceValue="Positive">
    <Choice value="Sports"/><Choice value="Music"/>
  </Choices>
  <Choices name="deeper" toName="text" visibleWhen="choice-selected" whenTagName="why"
           whenChoiceValue="Music">
    <Choice value="Happy"/><Choice value="Sad"/>
  </Choices></View>"""
TAXONOMY = """<View><Text name="text" value="$text"/>
  <Taxonomy name="topic" toName="text">
    <Choice value="Leisure"><Choice value="Sports"/><Choice value="Music" alias="mus"/></Choice>
    <Choice value="Politics"/>
  </Taxonomy></View>"""
P2 = softmax(2.0, -2.0)[0]  # one choice word found among two choices
P3 = softmax(2.0, -2.0, -2.0)[0]
YES = 1 / (1 + math.exp(-4.0))  # entailment 2 vs contradiction -2


@pytest.fixture(scope="module")
def nli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("nli") / "tiny-nli")


def families() -> dict[str, type[Backend]]:
    out = dict(registry())
    out["text_classification"] = PlantedText
    return out


def app_for(tmp_path: Path, model: Path, **settings: Any) -> tuple[Flask, Runtime]:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"),
        max_wait_ms=20.0,
        load_wait_s=60.0,
        text_classification_model=str(model),
        llm_text_model=str(tmp_path / "none"),
        **settings,
    )
    runtime = Runtime(cfg, families=families(), resolver=FakeResolver())
    return create_app(cfg, runtime=runtime), runtime


def predict(app: Flask, config: str, datas: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """POST /setup and /predict; check every prediction is valid for our checks and the SDK; return results."""
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    tasks = [{"id": i + 1, "data": d} for i, d in enumerate(datas)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert len(results) == len(tasks)
    schema = ConfigSchema.from_config(config)
    for prediction in results:
        valid, problems = filter_valid(schema, prediction["result"])
        assert valid == prediction["result"] and not problems
        assert validate(config, prediction["result"]) == []
    return [p["result"] for p in results]


def answers(result: list[dict[str, Any]]) -> dict[str, tuple[Any, float]]:
    out = {}
    for r in result:
        key = "taxonomy" if r["type"] == "taxonomy" else "choices"
        out[r["from_name"]] = (r["value"][key], r["score"])
    return out


def backend_of(runtime: Runtime, config: str) -> Any:
    return runtime.slot(runtime.plan(config).targets[0].model).backend


def test_routing_sends_text_choices_here_even_when_a_language_model_is_ready(
    tmp_path: Path, nli: Path
) -> None:
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text("{}")
    (lm / "model.safetensors").write_bytes(b"x")
    settings = Settings(model_dir=str(tmp_path), text_classification_model=str(nli), llm_text_model=str(lm))
    plan = build_plan(TWO_LEVEL, settings, registry())
    assert {r.control: r.family for r in plan.routes} == dict.fromkeys(
        ("sentiment", "why", "deeper"), "text_classification"
    )
    # a Choices tag with an LLM prompt stays the generation family's
    prompted = SENTIMENT.format(attrs=' model_prompt="Is it positive?"')
    assert [r.family for r in build_plan(prompted, settings, registry()).routes] == ["text_generation"]
    # no weights: still routed here, so /setup answers 422 with the download command
    bare = Settings(model_dir=str(tmp_path), llm_text_model=str(tmp_path / "none"))
    (target,) = build_plan(SENTIMENT.format(attrs=""), bare, registry()).targets
    assert target.model.family == "text_classification"
    reason = TextClassificationBackend.availability(target.model, bare)
    assert reason is not None and "python -m serving weights download --model nli" in reason
    named = build_plan(SENTIMENT.format(attrs=""), settings, registry()).targets[0].model
    assert TextClassificationBackend.availability(named, settings) is None


def test_single_choice_is_a_softmax_over_the_choices_entailment(tmp_path: Path, nli: Path) -> None:
    app, runtime = app_for(tmp_path, nli)
    config = SENTIMENT.format(attrs="")
    texts = ["a great positive game", "awful negative vote", "filler neutral"]
    results = predict(app, config, [{"text": t} for t in texts])
    assert [answers(r)["sentiment"] for r in results] == [
        (["Positive"], pytest.approx(P3)),
        (["Negative"], pytest.approx(P3)),
        (["Neutral"], pytest.approx(P3)),
    ]
    model = backend_of(runtime, config).model
    # every (text, hypothesis) pair ran: 3 texts x 3 choices, the hypotheses from the default template
    assert len(model.pairs) == 9
    assert ("a great positive game", "this example is positive.") in model.pairs


def test_multiple_choices_are_entailment_vs_contradiction_over_the_threshold(
    tmp_path: Path, nli: Path
) -> None:
    app, _ = app_for(tmp_path, nli)
    config = SENTIMENT.format(attrs=' choice="multiple"')
    (both, none) = predict(app, config, [{"text": "positive and negative positive"}, {"text": "filler"}])
    # positive twice: entailment 6 vs -6; negative once: 2 vs -2; neutral -2 vs 2 stays below 0.5
    assert answers(both)["sentiment"] == (["Positive", "Negative"], pytest.approx(1 / (1 + math.exp(-12))))
    assert none == []
    low = SENTIMENT.format(attrs=' choice="multiple" model_score_threshold="0.01"')
    (everything,) = predict(app, low, [{"text": "positive"}])
    assert answers(everything)["sentiment"][0] == ["Positive", "Negative", "Neutral"]


def test_hypothesis_template_and_predicted_values_make_the_hypotheses(tmp_path: Path, nli: Path) -> None:
    app, runtime = app_for(tmp_path, nli)
    config = """<View><Text name="text" value="$text"/>
      <Choices name="c" toName="text" model_hypothesis="the text is about {label}">
        <Choice value="Good" predicted_values="happy,great"/><Choice value="Bad" alias="b" predicted_values="sad"/>
      </Choices></View>"""
    (good, bad) = predict(app, config, [{"text": "great day"}, {"text": "sad day"}])
    assert answers(good)["c"] == (["Good"], pytest.approx(P2))
    assert answers(bad)["c"] == (["b"], pytest.approx(P2))  # the alias, as Label Studio stores it
    assert ("great day", "the text is about happy") in backend_of(runtime, config).model.pairs
    plan = runtime.plan(config)
    assert plan.targets[0].model.family == "text_classification"
    assert (
        TextClassificationBackend.target_version(plan.targets[0], runtime.settings)
        == "the text is about {label}"
    )


def test_child_choices_show_only_when_their_parent_choice_is_chosen(tmp_path: Path, nli: Path) -> None:
    app, _ = app_for(tmp_path, nli)
    texts = ["positive music happy", "negative music happy", "positive sports sad"]
    pos_music, neg, pos_sports = predict(app, TWO_LEVEL, [{"text": t} for t in texts])
    assert answers(pos_music) == {
        "sentiment": (["Positive"], pytest.approx(P2)),
        "why": (["Music"], pytest.approx(P2)),
        "deeper": (["Happy"], pytest.approx(P2)),
    }
    assert answers(neg) == {"sentiment": (["Negative"], pytest.approx(P2))}  # never a child of Positive
    assert set(answers(pos_sports)) == {"sentiment", "why"}  # "deeper" needs Music


def test_taxonomy_answers_leaf_paths_as_label_studio_stores_them(tmp_path: Path, nli: Path) -> None:
    app, _ = app_for(tmp_path, nli)
    sports, music, politics = predict(
        app, TAXONOMY, [{"text": "sports game"}, {"text": "music song"}, {"text": "politics vote"}]
    )
    assert answers(sports)["topic"] == ([["Leisure", "Sports"]], pytest.approx(P3))
    assert answers(music)["topic"] == ([["Leisure", "mus"]], pytest.approx(P3))
    assert answers(politics)["topic"] == ([["Politics"]], pytest.approx(P3))


def test_hypertext_paragraphs_and_table_are_read_as_their_visible_text(tmp_path: Path, nli: Path) -> None:
    app, runtime = app_for(tmp_path, nli)
    config = """<View>
      <HyperText name="page" value="$html"/>
      <Choices name="page_topic" toName="page"><Choice value="Sports"/><Choice value="Politics"/></Choices>
      <Paragraphs name="chat" value="$dialogue" layout="dialogue"/>
      <Choices name="chat_topic" toName="chat"><Choice value="Sports"/><Choice value="Politics"/></Choices>
      <Table name="table" value="$row"/>
      <Choices name="row_topic" toName="table"><Choice value="Sports"/><Choice value="Politics"/></Choices>
    </View>"""
    html = "<html><body><p>sports game</p><script>politics politics</script><div hidden>politics</div></body></html>"
    dialogue = [{"author": "a", "text": "politics"}, {"author": "b", "text": "vote"}]
    (result,) = predict(
        app, config, [{"html": html, "dialogue": dialogue, "row": {"topic": "sports", "n": 3}}]
    )
    got = answers(result)
    assert got["page_topic"][0] == ["Sports"]  # scripts and hidden parts are not read
    assert got["chat_topic"][0] == ["Politics"]
    assert got["row_topic"][0] == ["Sports"]
    premises = {p for p, _ in backend_of(runtime, config).model.pairs}
    assert {"sports game", "a : politics b : vote", "topic : sports n : 3"} <= premises


def test_long_texts_are_windowed_and_every_window_weighs_in(tmp_path: Path) -> None:
    short = save_model(tmp_path / "short-nli", max_positions=32)
    app, runtime = app_for(tmp_path, short)
    config = SENTIMENT.format(attrs="")
    text = " ".join(["filler", "the", "a", "game", "vote", "song", "spam"] * 9 + ["negative"])
    multi = SENTIMENT.format(attrs=' choice="multiple"')
    (single,) = predict(app, config, [{"text": text}])
    model = backend_of(runtime, config).model
    assert max(shape[1] for shape in model.shapes) <= 32  # no pair over the model's length
    windows = [p for p, _ in model.pairs]
    n = len(windows) // 3  # each window with each of the 3 hypotheses
    assert n > 2 and sum(w.endswith("negative") for w in windows) == 3 and windows[0].startswith("filler the")
    # single choice averages the windows' distributions: only the last one sees "negative"
    mean = (softmax(-2.0, 2.0, -2.0)[1] + (n - 1) / 3) / n
    assert answers(single)["sentiment"] == (["Negative"], pytest.approx(mean))
    (multiple,) = predict(app, multi, [{"text": text}])
    assert answers(multiple)["sentiment"] == (["Negative"], pytest.approx(YES))  # its best window


def test_a_fine_tuned_classifier_maps_its_classes_and_drops_unknown_ones(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "model_dir" / "clf", {0: "POS", 1: "NEG", 2: "spam"}, arch="deberta")
    app, runtime = app_for(tmp_path, tmp_path / "unused")
    config = """<View><Text name="text" value="$text"/>
      <Choices name="c" toName="text" model_path="clf">
        <Choice value="Good" predicted_values="POS"/><Choice value="Bad" predicted_values="NEG"/>
      </Choices></View>"""
    good, spam = predict(app, config, [{"text": "pos day"}, {"text": "spam"}])
    assert answers(good)["c"] == (["Good"], pytest.approx(softmax(3.0, -3.0, -3.0)[0]))
    # spam wins but maps to no choice: the best mapped choice carries its own probability
    assert answers(spam)["c"] == (["Good"], pytest.approx(softmax(3.0, -3.0, -3.0)[1]))
    assert backend_of(runtime, config).spec.path == "clf"
    assert folder.is_dir()


def test_nli_classes_follow_transformers_pipeline() -> None:
    assert nli_classes(["contradiction", "neutral", "entailment"]) == (2, 0)
    assert nli_classes(["entailment", "not_entailment"]) == (0, 1)
    assert nli_classes(["ENTAILMENT", "NEUTRAL", "CONTRADICTION"]) == (0, 2)
    assert nli_classes(["POS", "NEG"]) == (-1, 0)


def test_weights_download_knows_the_default_model_and_hub_ids(tmp_path: Path) -> None:
    from serving.cli.weights import _owner

    assert _owner("nli", registry()) == "text_classification"
    assert _owner("text_classification:MoritzLaurer/deberta-v3-base-zeroshot-v2.0", registry()) == (
        "text_classification"
    )
    assert _owner("dslim/bert-base-NER", registry()) == "ner"  # a plain id stays NER's download
    # a hub id on a Choices tag is ours; its /setup command names it with the prefix
    config = SENTIMENT.format(attrs=' model_name="org/my-classifier"')
    (target,) = build_plan(config, Settings(model_dir=str(tmp_path)), registry()).targets
    assert (target.model.family, target.model.name) == ("text_classification", "org/my-classifier")
    reason = TextClassificationBackend.availability(target.model, Settings(model_dir=str(tmp_path)))
    assert reason is not None and "--model text_classification:org/my-classifier" in reason
    (status,) = TextClassificationBackend.weights_status(Settings(model_dir=str(tmp_path)))
    assert (status.model, status.present, status.url) == (
        "nli",
        False,
        "MoritzLaurer/deberta-v3-base-zeroshot-v2.0",
    )
    # a local folder is already there: nothing to fetch
    folder = save_model(tmp_path / "local")
    assert TextClassificationBackend.download_weights([str(folder)], Settings()) == [str(folder)]


def test_a_multi_label_classifier_uses_sigmoids_and_taxonomy_nodes_leave_as_paths(tmp_path: Path) -> None:
    labels = {0: "sports", 1: "music", 2: "politics"}
    save_model(tmp_path / "model_dir" / "multi", labels, multi_label=True)
    app, _ = app_for(tmp_path, tmp_path / "unused")
    config = """<View><Text name="text" value="$text"/>
      <Choices name="c" toName="text" model_path="multi" choice="multiple">
        <Choice value="Sports"/><Choice value="Music"/><Choice value="Politics"/>
      </Choices>
      <Taxonomy name="topic" toName="text" model_path="multi">
        <Choice value="Leisure"><Choice value="Sports"/><Choice value="Music" alias="mus"/></Choice>
        <Choice value="Politics"/>
      </Taxonomy></View>"""
    (both,) = predict(app, config, [{"text": "music and sports"}])
    sig = 1 / (1 + math.exp(-3.0))
    got = answers(both)
    assert got["c"] == (["Sports", "Music"], pytest.approx(sig))  # case-insensitive names
    # the classifier's "sports" is the node Leisure > Sports ("music" maps to no node: its alias is "mus")
    assert got["topic"] == ([["Leisure", "Sports"]], pytest.approx(sig))


def test_dynamic_choices_are_each_tasks_own_list(tmp_path: Path, nli: Path) -> None:
    app, _ = app_for(tmp_path, nli)
    config = """<View><Text name="text" value="$text"/>
      <Choices name="c" toName="text" value="$options"/></View>"""
    options = [{"value": "Sports"}, {"value": "Music"}]
    (sports, none) = predict(
        app,
        config,
        [
            {"text": "sports game", "options": options},
            {"text": "politics vote", "options": [{"value": "Music"}]},
        ],
    )
    assert answers(sports)["c"] == (["Sports"], pytest.approx(P2))
    assert none == []  # one option, not entailed: below 0.5
