"""Validation of result items and pre-annotation files against a labeling config."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.errors import ConfigError
from serving.results.rle import mask_to_rle
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import check_items, filter_valid
from serving.results.validation.files import check_prediction, validate_file
from serving.results.validation.problems import Problem

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "preannotations"
EXAMPLES = sorted(p.stem for p in FIXTURES.glob("*.xml"))


def load(name: str) -> tuple[ConfigSchema, list[dict[str, Any]]]:
    schema = ConfigSchema.from_config((FIXTURES / f"{name}.xml").read_text())
    return schema, json.loads((FIXTURES / f"{name}.json").read_text())


def codes(problems: list[Problem]) -> list[str]:
    return [p.code for p in problems]


def test_every_guide_example_is_valid() -> None:
    assert set(EXAMPLES) >= {"image_bbox", "ner", "ocr", "brush", "choices", "shapes"}
    for name in EXAMPLES:
        schema, tasks = load(name)
        assert validate_file(schema, tasks) == [], name


def test_schema_is_cached_by_config_text_and_bad_xml_is_a_config_error() -> None:
    text = (FIXTURES / "ocr.xml").read_text()
    assert ConfigSchema.from_config(text) is ConfigSchema.from_config(str(text))
    schema = ConfigSchema.from_config(text)
    assert schema.controls["transcription"].per_region
    assert schema.controls["label"].labels == frozenset({"Text", "Handwriting"})
    assert schema.image_keys() == ["ocr"]
    with pytest.raises(ConfigError, match="not valid XML"):
        ConfigSchema.from_config("<View><Image name='a' value='$a'>")
    with pytest.raises(ConfigError, match="empty"):
        ConfigSchema.from_config("   ")


def _item(task: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return task["predictions"][0]["result"][i]


def _set(path: str, value: Any, i: int = 0) -> Callable[[dict[str, Any]], None]:
    """Return a mutation that sets item i's dotted path (value.x...) to value (DELETE removes it)."""

    def mutate(task: dict[str, Any]) -> None:
        target = _item(task, i)
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


DELETE = object()


def _pred(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(task: dict[str, Any]) -> None:
        if value is DELETE:
            del task["predictions"][0][key]
        else:
            task["predictions"][0][key] = value

    return mutate


def _drop_geometry(task: dict[str, Any]) -> None:
    # the OCR example without its rectangle: labels and textarea of r1 point at no region
    task["predictions"][0]["result"] = [
        r for r in task["predictions"][0]["result"] if r["type"] != "rectangle"
    ]


def _bad_rle_size(task: dict[str, Any]) -> None:
    _item(task)["value"]["rle"] = mask_to_rle(np.zeros((10, 10), np.uint8))


def _truncated_rle(task: dict[str, Any]) -> None:
    rle = _item(task)["value"]["rle"]
    _item(task)["value"]["rle"] = rle[: len(rle) // 2]


def _data(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(task: dict[str, Any]) -> None:
        task["data"][key] = value

    return mutate


def _drop_data(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(task: dict[str, Any]) -> None:
        del task["data"][key]

    return mutate


BROKEN = [
    ("image_bbox", _set("from_name", "labels"), "unknown_from_name", "controls: label (RectangleLabels)"),
    ("image_bbox", _set("to_name", "img"), "wrong_to_name", "set to_name to 'image'"),
    ("image_bbox", _set("type", "rectangle"), "wrong_type", "set type to 'rectanglelabels'"),
    ("image_bbox", _set("value.rectanglelabels", ["Cat"]), "unknown_label", '<Label value="Cat"/>'),
    ("image_bbox", _set("value.rectanglelabels", DELETE), "missing_label", "value['rectanglelabels']"),
    ("image_bbox", _set("value.rectanglelabels", "Airplane"), "bad_label", "list of strings"),
    ("image_bbox", _set("original_width", DELETE), "missing_original_size", "original_width"),
    ("image_bbox", _set("original_height", 0), "missing_original_size", "original_height"),
    ("image_bbox", _set("value.x", 101.0), "out_of_range", "value.x"),
    ("image_bbox", _set("value.y", -3.0), "out_of_range", "value.y"),
    ("image_bbox", _set("value.width", 96.0), "out_of_range", "value.x + value.width"),
    ("image_bbox", _set("value.height", 90.0), "out_of_range", "value.y + value.height"),
    ("image_bbox", _set("value.x", "10"), "bad_coordinates", "not a number"),
    ("image_bbox", _set("value.width", 80.0, 2), "out_of_range", "rotated rectangle"),
    ("image_bbox", _set("score", "high"), "bad_score", "not a number"),
    ("image_bbox", _set("score", float("nan")), "bad_score", "not a number"),
    ("image_bbox", _set("score", True), "bad_score", "not a number"),
    ("image_bbox", _set("value", DELETE), "missing_value", "value"),
    ("image_bbox", _set("id", "result2"), "duplicate_id", "share id"),
    ("image_bbox", _pred("model_version", DELETE), "missing_model_version", "model_version"),
    ("image_bbox", _pred("score", "0.5"), "bad_score", "Label Studio answers 400"),
    ("image_bbox", _pred("result", DELETE), "missing_result", "result"),
    ("image_bbox", _drop_data("image"), "missing_data_key", "no key 'image'"),
    ("ner", _set("value.text", "Barack"), "span_mismatch", "'Barack Obama'"),
    ("ner", _set("value.start", 5, 1), "span_mismatch", "text[5:30]"),
    ("ner", _set("value.end", 99), "bad_span", "past the end"),
    ("ner", _set("value.end", 0), "bad_span", "start < end"),
    ("ner", _set("value.start", "0"), "bad_span", "integer"),
    ("ner", _set("value.labels", ["PER"]), "unknown_label", "map the model's label"),
    ("ocr", _drop_geometry, "missing_geometry", "no region"),
    ("ocr", _set("id", "zz", 2), "missing_geometry", "'zz'"),
    ("ocr", _set("value.text", [1], 2), "bad_value", "list of strings"),
    ("ocr", _set("value.points", [[10.0, 20.0], [130.0, 20.0], [30.0, 25.0]], 3), "out_of_range", "point(s)"),
    ("ocr", _set("value.points", [[10.0, 20.0], [30.0]], 3), "bad_coordinates", "[x, y]"),
    ("brush", _bad_rle_size, "bad_rle", "original_width*original_height*4 = 2400"),
    ("brush", _truncated_rle, "bad_rle", "does not decode"),
    ("brush", _set("value.format", "png"), "bad_rle", "format='rle'"),
    ("brush", _set("original_width", DELETE), "missing_original_size", "original_width"),
    ("choices", _set("value.choices", ["Boeing", "airbus-a"]), "too_many_choices", 'choice="multiple"'),
    ("choices", _set("value.choices", ["Cessna"]), "unknown_label", '<Choice value="Cessna"/>'),
    ("shapes", _set("value.points", [[0.0, 0.0], [50.0, 0.0]]), "bad_coordinates", "at least 3 points"),
    ("shapes", _set("value.x", 100.5, 1), "out_of_range", "value.x"),
    ("shapes", _set("value.radiusX", -1.0, 2), "out_of_range", "value.radiusX"),
    ("shapes", _set("to_id", "nope", 3), "bad_relation", "to_id 'nope'"),
]


@pytest.mark.parametrize(
    ("example", "mutate", "code", "hint"), BROKEN, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BROKEN)]
)
def test_broken_variant_is_reported_with_its_code_and_fix(
    example: str, mutate: Callable[[dict[str, Any]], None], code: str, hint: str
) -> None:
    schema, tasks = load(example)
    tasks = copy.deepcopy(tasks)
    mutate(tasks[0])
    problems = validate_file(schema, tasks)
    matching = [p for p in problems if p.code == code]
    assert matching, f"expected {code}, got {[str(p) for p in problems]}"
    assert any(hint in p.message for p in matching), [p.message for p in matching]
    assert matching[0].task == 0
    assert matching[0].severity == "error"


def test_missing_prediction_score_is_a_warning_not_an_error() -> None:
    schema, tasks = load("image_bbox")
    prediction = copy.deepcopy(tasks[0]["predictions"][0])
    del prediction["score"]
    problems = check_prediction(schema, prediction, tasks[0]["data"], 0)
    assert [(p.code, p.severity) for p in problems] == [("missing_score", "warning")]


def test_span_offsets_in_utf16_code_units_are_accepted_too() -> None:
    schema, tasks = load("ner")
    item = copy.deepcopy(_item(tasks[1], 1))  # "Lisbon" after an emoji: Python [19, 25), UTF-16 [20, 26)
    item["value"].update(start=20, end=26)
    assert check_items(schema, [item], tasks[1]["data"], 1) == []
    item["value"].update(start=21, end=27)
    assert codes(check_items(schema, [item], tasks[1]["data"], 1)) == ["span_mismatch"]


def test_span_text_is_not_checked_when_the_text_is_a_url() -> None:
    schema, tasks = load("ner")
    item = copy.deepcopy(_item(tasks[0]))
    item["value"]["text"] = "whatever"
    assert check_items(schema, [item], {"text": "https://example.com/doc.txt"}, 0) == []
    assert codes(check_items(schema, [item], tasks[0]["data"], 0)) == ["span_mismatch"]


def test_filter_valid_drops_the_bad_region_and_its_linked_items_only() -> None:
    schema, tasks = load("ocr")
    items = copy.deepcopy(tasks[0]["predictions"][0]["result"])
    items[0]["value"]["width"] = 120.0  # the r1 rectangle is out of range
    kept, problems = filter_valid(schema, items, tasks[0]["data"], 0)
    assert {i["id"] for i in kept} == {"p1"}
    assert len(kept) == 3
    by_code = {p.code for p in problems}
    assert "out_of_range" in by_code and "linked_region_dropped" in by_code


def test_filter_valid_keeps_geometry_when_only_its_label_is_wrong() -> None:
    schema, tasks = load("ocr")
    items = copy.deepcopy(tasks[0]["predictions"][0]["result"])
    items[1]["value"]["labels"] = ["Printed"]  # labels item of r1
    kept, problems = filter_valid(schema, items, tasks[0]["data"], 0)
    assert [(i["id"], i["type"]) for i in kept] == [
        ("r1", "rectangle"),
        ("r1", "textarea"),
        ("p1", "polygon"),
        ("p1", "labels"),
        ("p1", "textarea"),
    ]
    assert codes(problems) == ["unknown_label"]


def test_filter_valid_returns_the_same_list_when_clean() -> None:
    schema, tasks = load("shapes")
    items = tasks[0]["predictions"][0]["result"]
    kept, problems = filter_valid(schema, items, tasks[0]["data"], 0)
    assert kept is items and problems == []


def test_dynamic_choices_are_checked_against_the_task_data() -> None:
    schema = ConfigSchema.from_config(
        '<View><Text name="t" value="$text"/><Choices name="c" toName="t" value="$options"/></View>'
    )
    item = {"id": "a", "from_name": "c", "to_name": "t", "type": "choices", "value": {"choices": ["x"]}}
    assert check_items(schema, [item], None, 0) == []  # unknown options: not checked
    data = {"text": "hi", "options": [{"value": "x"}, {"value": "y"}]}
    assert check_items(schema, [item], data, 0) == []
    item["value"]["choices"] = ["z"]
    assert codes(check_items(schema, [item], data, 0)) == ["unknown_label"]


def test_annotations_are_checked_without_a_model_version() -> None:
    schema, tasks = load("ner")
    task = {"data": tasks[0]["data"], "annotations": [{"result": tasks[0]["predictions"][0]["result"]}]}
    assert validate_file(schema, [task]) == []
    task["annotations"][0]["result"][0]["value"]["labels"] = ["Nobody"]
    assert codes(validate_file(schema, [task])) == ["unknown_label"]


def test_task_level_problems() -> None:
    schema, _ = load("ner")
    problems = validate_file(
        schema, [{"text": "bare data"}, "nope", {"data": {"text": "x"}, "predictions": {}}]
    )  # type: ignore[list-item]
    assert codes(problems) == ["missing_data", "bad_task", "bad_predictions"]
    assert [p.task for p in problems] == [0, 1, 2]


def test_problem_str_names_task_region_and_control() -> None:
    p = Problem(3, "r1", "label", "unknown_label", "fix it", task_id=42)
    assert str(p) == "task #3 (id 42) region 'r1' [label]: error unknown_label: fix it"


def test_regions_built_by_regions_module_pass() -> None:
    from serving.contract import ControlTag, LabelMap, ModelSpec, ObjectTag, Target
    from serving.results import regions

    schema, _ = load("ocr")
    obj = ObjectTag("image", "Image", "ocr")
    labels = ControlTag("label", "Labels", "image", ("Text", "Handwriting"))
    target = Target(
        control=ControlTag("bbox", "Rectangle", "image"),
        obj=obj,
        model=ModelSpec("ocr", "x"),
        label_map=LabelMap(["Text"]),
        linked={"labels": labels, "textarea": ControlTag("transcription", "TextArea", "image")},
    )
    poly = Target(
        control=ControlTag("poly", "Polygon", "image"),
        obj=obj,
        model=ModelSpec("ocr", "x"),
        label_map=LabelMap(["Text"]),
        linked=target.linked,
    )
    items = regions.rectangle_items(target, (630, 10, 640, 480), (640, 480), 0.9, "Text", "hello")
    items += regions.polygon_items(poly, [(0, 0), (640, 0), (640, 480)], (640, 480), 0.8, "Handwriting", "x")
    assert len(items) == 6
    assert check_items(schema, items, {"ocr": "/data/upload/1/a.png"}, 0) == []


def test_predict_route_drops_invalid_regions_before_they_leave(tmp_path: Path) -> None:
    from serving.contract import Backend, Item, Target
    from serving.http.app import create_app
    from serving.inference.runtime import Runtime
    from serving.results import regions
    from serving.settings import Settings
    from tests.support.fakes import FakeResolver

    class Sloppy(Backend):
        """Emits one good box, one out of the image, one with a label missing from the config."""

        family = "sloppy"
        control_tags = ("RectangleLabels",)
        default_model = "sloppy-1"

        def load(self, device: str) -> None:
            """Nothing to load."""

        def forward(self, batch: list[Any]) -> list[Any]:
            """Return nothing; postprocess makes the regions."""
            return [None for _ in batch]

        def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
            """Build the three regions."""
            good = regions.rectangle_items(target, (10, 10, 50, 50), item.size, 0.9, "Car", region_id="good")
            outside = regions.rectangle_items(
                target, (10, 10, 50, 50), item.size, 0.8, "Car", region_id="outside"
            )
            outside[0]["value"]["x"] = 150.0
            unknown = regions.rectangle_items(
                target, (0, 0, 5, 5), item.size, 0.7, "Boat", region_id="unknown"
            )
            return good + outside + unknown

    settings = Settings(model_dir=str(tmp_path / "m"), max_wait_ms=1.0)
    runtime = Runtime(settings, families={"sloppy": Sloppy}, resolver=FakeResolver())
    app = create_app(settings, runtime=runtime)
    config = (FIXTURES / "image_bbox.xml").read_text()
    tasks = [{"id": 1, "data": {"image": "https://example.com/200x100.jpg"}}]
    resp = app.test_client().post("/predict", json={"tasks": tasks, "label_config": config})
    assert resp.status_code == 200, resp.json
    [prediction] = resp.json["results"]
    assert [r["id"] for r in prediction["result"]] == ["good"]
    assert prediction["result"][0]["value"]["x"] == pytest.approx(5.0)
    assert prediction["result"][0]["original_width"] == 200
    schema = ConfigSchema.from_config(config)
    assert check_prediction(schema, prediction, tasks[0]["data"], 0) == []
    app.extensions["lsml_jobs"].close()
