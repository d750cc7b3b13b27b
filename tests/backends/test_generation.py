"""Generation through POST /predict with tiny random Qwen2 / Qwen2.5-VL models and planted answers."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from backends.generation import TextGenerationBackend, VisionGenerationBackend
from serving.contract import ModelSpec
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.backends._llm_support import PlantedAnswers, build_text_model, build_vision_model

CAPTION_CONFIG = """<View>
  <Image name="image" value="$captioning"/>
  <Header value="Describe the image:"/>
  <TextArea name="caption" toName="image" placeholder="Enter description here..." rows="5" maxSubmissions="1"/>
</View>"""
SUMMARY_CONFIG = """<View>
  <Header value="Please read the text" />
  <Text name="text" value="$text" />
  <Header value="Provide one sentence summary" />
  <TextArea name="answer" toName="text" showSubmitButton="true" maxSubmissions="1" editable="true" required="true" />
</View>"""
TRANSLATION_CONFIG = """<View>
  <Text name="english" value="$english" />
  <TextArea name="spanish" toName="english" transcription="true" maxSubmissions="1" editable="true"/>
</View>"""
CHOICES_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single" model_name="llm">
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral"/>
  </Choices>
  <Choices name="topics" toName="text" choice="multiple" model_name="llm">
    <Choice value="Food"/><Choice value="Service"/><Choice value="Price"/>
  </Choices>
</View>"""

TEXTS = {
    "The cat sat on the warm mat all afternoon and did not move.": "A cat napped on a mat.",
    "Stocks fell sharply on Monday after the bank raised rates.": "Stocks fell after a rate rise.",
}


def _png(color: str, size: tuple[int, int] = (96, 64)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    return {"text": build_text_model(root / "lm"), "vision": build_vision_model(root / "vlm")}


@pytest.fixture(scope="module")
def app(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = Settings(
        model_dir=str(tmp_path_factory.mktemp("model_dir")),
        llm_text_model=str(models["text"]),
        llm_vision_model=str(models["vision"]),
        max_wait_ms=20.0,
    )
    runtime = Runtime(
        settings,
        families={"vision_generation": VisionGenerationBackend, "text_generation": TextGenerationBackend},
    )
    client = create_app(settings, runtime=runtime).test_client()
    engines = {}
    for family, name in (("vision_generation", "vlm"), ("text_generation", "llm")):
        slot = runtime.slot(ModelSpec(family, name))
        assert slot.ready.wait(120) and not slot.failed, slot.state
        engines[family] = slot.backend.engine
    return client, engines, runtime


def _plant(engine: Any, answers: dict[str, str], fallback: str = "?") -> PlantedAnswers:
    planted = PlantedAnswers(engine.tokenizer, answers, fallback)
    engine.logits_processors[:] = [planted]
    return planted


def _texts(prediction: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["from_name"], r["value"]["text"][0]) for r in prediction["result"] if r["type"] == "textarea"]


def test_captions_and_vqa_from_the_task_question(app: Any) -> None:
    """One batched generate captions each image; a task with data.question gets that question answered."""
    client, engines, _ = app
    planted = _plant(
        engines["vision_generation"],
        {"Describe this image": "A plain red picture.", "What colour is the square?": "Blue."},
    )
    tasks = [
        {"id": 1, "data": {"captioning": _png("red")}},
        {"id": 2, "data": {"captioning": _png("blue"), "question": "What colour is the square?"}},
        {"id": 3, "data": {"captioning": _png("green", (300, 200))}},
    ]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CAPTION_CONFIG})
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert [_texts(r) for r in results] == [
        [("caption", "A plain red picture.")],
        [("caption", "Blue.")],
        [("caption", "A plain red picture.")],
    ]
    for prediction in results:
        (region,) = prediction["result"]
        assert region["to_name"] == "image" and region["type"] == "textarea"
        # forced tokens carry all the probability mass: the mean token probability is 1
        assert region["score"] == pytest.approx(1.0)
        assert prediction["model_version"].startswith("vision_generation-")
    # the three tasks went through one generate, each prompt with its image and its own question
    assert planted.calls == 1 and len(planted.prompts) == 3
    assert sum("Question: What colour is the square?" in p for p in planted.prompts) == 1
    assert all(p.count("<|image_pad|>") > 1 for p in planted.prompts)


def test_summary_of_each_text_in_one_batch(app: Any) -> None:
    """Text Summarization: each text's own summary, in task order, through one generate."""
    client, engines, _ = app
    planted = _plant(engines["text_generation"], dict(TEXTS))
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate([*TEXTS, *TEXTS])]
    response = client.post("/predict", json={"tasks": tasks, "label_config": SUMMARY_CONFIG})
    assert response.status_code == 200, response.json
    expected = [[("answer", TEXTS[t])] for t in [*TEXTS, *TEXTS]]
    assert [_texts(r) for r in response.json["results"]] == expected
    assert planted.calls == 1
    assert all("Summarise the following text in one sentence." in p for p in planted.prompts)
    # left padding: every row ends with the generation prompt, so every row continues its own prompt
    assert all(p.rstrip("\n").endswith("<|im_start|>assistant") for p in planted.prompts)


def test_translation_into_the_language_the_config_names(app: Any) -> None:
    """Machine Translation: the TextArea named "spanish" asks for Spanish."""
    client, engines, _ = app
    planted = _plant(
        engines["text_generation"],
        {"into Spanish. Reply with the translation only.\n\nGood morning": "Buenos días"},
    )
    tasks = [{"id": 7, "data": {"english": "Good morning"}}]
    response = client.post("/predict", json={"tasks": tasks, "label_config": TRANSLATION_CONFIG})
    assert response.status_code == 200, response.json
    assert _texts(response.json["results"][0]) == [("spanish", "Buenos días")]
    assert "Translate the following text into Spanish." in planted.prompts[0]


def test_model_prompt_template_and_version(app: Any) -> None:
    """model_prompt fills the task's $keys; changing it changes model_version (Label Studio predicts again)."""
    client, engines, _ = app
    config = TRANSLATION_CONFIG.replace(
        'name="spanish"',
        'name="spanish" model_prompt="Say $english like a pirate from $port" model_max_tokens="8"',
    )
    planted = _plant(
        engines["text_generation"], {"Say Good morning like a pirate from Bristol": "Ahoy there matey"}
    )
    tasks = [{"id": 1, "data": {"english": "Good morning", "port": "Bristol"}}]
    first = client.post("/predict", json={"tasks": tasks, "label_config": config}).json["results"][0]
    # model_max_tokens=8 cuts the answer at 8 tokens (one byte each here)
    assert _texts(first) == [("spanish", "Ahoy the")]
    user_turn = planted.prompts[0].split("<|im_start|>user\n", 1)[1]
    assert user_turn.startswith(
        "Say Good morning like a pirate from Bristol<|im_end|>"
    )  # content not appended twice
    other = client.post(
        "/predict", json={"tasks": tasks, "label_config": config.replace("a pirate", "a poet")}
    ).json["results"][0]
    plain = client.post("/predict", json={"tasks": tasks, "label_config": TRANSLATION_CONFIG}).json[
        "results"
    ][0]
    versions = {first["model_version"], other["model_version"], plain["model_version"]}
    assert len(versions) == 3


def test_choices_parsed_strictly(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Choices from a prompt listing them: exact matches kept, a made-up choice dropped with a logged reason."""
    client, engines, _ = app
    _plant(
        engines["text_generation"],
        {
            "Lovely soup, friendly staff.\n\nWhich of these choices applies? Choices: Positive, Negative": "Positive.",
            "Lovely soup, friendly staff.\n\nWhich of these choices applies? Choices: Food, Service": "food, Service",
            "Cold soup.\n\nWhich of these choices applies? Choices: Positive, Negative": "Furious",
            "Cold soup.\n\nWhich of these choices applies? Choices: Food, Service": "Food, Parking",
        },
    )
    tasks = [
        {"id": 1, "data": {"text": "Lovely soup, friendly staff."}},
        {"id": 2, "data": {"text": "Cold soup."}},
    ]
    with caplog.at_level(logging.INFO, logger="backends._llm_prompts"):
        response = client.post("/predict", json={"tasks": tasks, "label_config": CHOICES_CONFIG})
    assert response.status_code == 200, response.json
    good, bad = response.json["results"]
    assert sorted((r["from_name"], r["value"]["choices"]) for r in good["result"]) == [
        ("sentiment", ["Positive"]),
        ("topics", ["Food", "Service"]),
    ]
    assert bad["result"] == [] and "error" not in bad
    assert "'Furious', which is not one of" in caplog.text and "'Food, Parking'" in caplog.text


def test_missing_weights_answer_setup_422_with_the_command(tmp_path: Path) -> None:
    """No checkpoint: /setup says which command fetches it, nothing downloads."""
    settings = Settings(model_dir=str(tmp_path), llm_vision_model=str(tmp_path / "nowhere"))
    runtime = Runtime(settings, families={"vision_generation": VisionGenerationBackend})
    client = create_app(settings, runtime=runtime).test_client()
    response = client.post("/setup", json={"schema": CAPTION_CONFIG, "project": "1"})
    assert response.status_code == 422
    assert "python -m serving weights download --model vlm" in str(response.json)


def test_qwen25_vl_through_the_same_engine(tmp_path: Path) -> None:
    """The engine is architecture-neutral: a Qwen2.5-VL checkpoint answers through the same batched path."""
    from PIL import Image

    from backends._llm_engines import TransformersEngine
    from backends._llm_prompts import Request
    from tests.backends._llm_support import build_qwen25_vl

    engine = TransformersEngine(str(build_qwen25_vl(tmp_path / "vl25")), vision=True, timeout_s=30.0)
    engine.load("cpu")
    _plant(engine, {"red one": "Red.", "blue one": "Blue!"})
    replies = engine.generate(
        [
            Request("sys", "Name the red one", Image.new("RGB", (80, 60), "red"), 16),
            Request("sys", "Name the blue one", Image.new("RGB", (50, 90), "blue"), 3),
        ]
    )
    assert [r.text for r in replies] == ["Red.", "Blu"]  # the second row is cut at its own 3 tokens
    assert all(r.score == pytest.approx(1.0) and not r.error for r in replies)


def test_hypertext_and_dialogue_content(app: Any) -> None:
    """HyperText is given as its visible text (no markup); a dialogue as "speaker: line" lines."""
    client, engines, _ = app
    planted = _plant(
        engines["text_generation"],
        {
            "the following text in one sentence.\n\nBoard notes\n\nThe board met.": "Board met.",
            "the following conversation in one sentence.\n\nAnna: Hi Bo\nBo: Hello Anna": "Greetings.",
        },
    )
    config = """<View>
      <HyperText name="html" value="$html"/><TextArea name="gist" toName="html"/>
      <Paragraphs name="chat" value="$chat" layout="dialogue" nameKey="speaker" textKey="line"/>
      <TextArea name="recap" toName="chat"/>
    </View>"""
    html = "<html><head><style>p {}</style></head><body><h1>Board notes</h1><p>The board <b>met</b>.</p></body></html>"
    chat = [{"speaker": "Anna", "line": "Hi Bo"}, {"speaker": "Bo", "line": "Hello Anna"}]
    tasks = [{"id": 1, "data": {"html": html, "chat": chat}}]
    response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert response.status_code == 200, response.json
    assert sorted(_texts(response.json["results"][0])) == [("gist", "Board met."), ("recap", "Greetings.")]
    assert not any("<b>" in p or "style" in p for p in planted.prompts)


RATING_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Rating name="stars" toName="text" maxRating="5"/>
</View>"""


def test_rating_parsed_strictly(app: Any) -> None:
    """Rating: a whole number from 1 to maxRating ("4/5" too); out of range or words store nothing."""
    client, engines, _ = app
    planted = _plant(
        engines["text_generation"],
        {"Great food.": "4", "Fine food.": "Rating: 3/5", "Odd food.": "7", "Bad food.": "two"},
    )
    texts = ["Great food.", "Fine food.", "Odd food.", "Bad food."]
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": RATING_CONFIG})
    assert response.status_code == 200, response.json
    ratings = [[(r["type"], r["value"]) for r in p["result"]] for p in response.json["results"]]
    assert ratings == [[("rating", {"rating": 4})], [("rating", {"rating": 3})], [], []]
    assert all("from 1 (worst) to 5 (best)" in p for p in planted.prompts)


def test_validator_checks_rating_range() -> None:
    """A rating outside 1..maxRating is a problem, so nothing invalid leaves even from another family."""
    from serving.results.schema import ConfigSchema
    from serving.results.validation.files import check_prediction

    schema = ConfigSchema.from_config(RATING_CONFIG.replace('maxRating="5"', 'maxRating="3"'))

    def problems(rating: Any) -> list[str]:
        item = {
            "from_name": "stars",
            "to_name": "text",
            "type": "rating",
            "value": {"rating": rating},
            "score": 1.0,
        }
        prediction = {"result": [item], "score": 1.0, "model_version": "v"}
        return [p.code for p in check_prediction(schema, prediction, {"text": "x"})]

    assert problems(3) == [] and problems(1) == []
    assert problems(4) == ["bad_value"] and problems(0) == ["bad_value"] and problems("2") == ["bad_value"]


def test_image_choices_named_for_the_vision_model(app: Any) -> None:
    """Choices on an image with model_name="vlm": the vision model picks among the listed choices."""
    client, engines, _ = app
    planted = _plant(engines["vision_generation"], {"Choices: Indoor, Outdoor": "outdoor"})
    config = """<View><Image name="image" value="$image"/>
      <Choices name="scene" toName="image" model_name="vlm"><Choice value="Indoor"/><Choice value="Outdoor"/></Choices>
    </View>"""
    tasks = [{"id": 1, "data": {"image": _png("skyblue")}}]
    response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert response.status_code == 200, response.json
    (region,) = response.json["results"][0]["result"]
    assert region["type"] == "choices" and region["value"] == {"choices": ["Outdoor"]}
    assert "Reply with exactly one choice" in planted.prompts[0]


def test_time_limit_stops_a_batch_early(models: dict[str, Path]) -> None:
    """LLM_TASK_TIMEOUT_S bounds generate (max_time): past it, each row keeps what it has written."""
    from backends._llm_engines import TransformersEngine
    from backends._llm_prompts import Request

    engine = TransformersEngine(str(models["text"]), vision=False, timeout_s=1e-9)
    engine.load("cpu")
    _plant(engine, {"go": "A long planted answer."})
    (reply,) = engine.generate([Request("sys", "go", None, 64)])
    assert reply.text == "A" and not reply.error  # one step, then the time limit ends the batch
