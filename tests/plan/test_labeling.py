"""Planning a labeling config: which backend fills which tag, label maps, knobs, caching."""

from __future__ import annotations

import pytest

from serving.contract import LabelMap
from serving.errors import ConfigError
from serving.plan.planner import Planner, build_plan
from serving.settings import Settings
from tests.support.fakes import FAMILIES

SETTINGS = Settings()


def plan(config: str):
    return build_plan(config, SETTINGS, FAMILIES)


@pytest.mark.parametrize(
    ("model_label", "expected"),
    [
        ("Person", "Person"),  # exact
        ("person", "Person"),  # case-insensitive
        ("PER", "Person"),  # alias table
        ("PERSON", "Person"),
        ("org", "Organization"),  # alias, case-insensitive
        ("Corp", "Organization"),  # predicted_values wins
        ("LOC", None),  # not in the config: never emitted
    ],
)
def test_label_mapping_order(model_label: str, expected: str | None) -> None:
    label_map = LabelMap(
        ["Person", "Organization"],
        {"Organization": ("Corp",)},
        [{"PER", "PERSON", "Person"}, {"ORG", "Organization"}],
    )
    assert label_map(model_label) == expected


def test_predicted_values_take_precedence_over_exact_names() -> None:
    label_map = LabelMap(["Car", "Truck"], {"Truck": ("car",)}, [])
    assert label_map("car") == "Truck"
    assert label_map("Car") == "Car"


def test_several_controls_in_one_config_are_all_planned() -> None:
    config = """<View>
      <Image name="img" value="$image"/>
      <RectangleLabels name="boxes" toName="img" model_score_threshold="0.7">
        <Label value="Car" predicted_values="automobile,truck"/>
      </RectangleLabels>
      <Text name="txt" value="$caption"/>
      <Labels name="ner" toName="txt"><Label value="Person"/></Labels>
      <Rating name="stars" toName="txt"/>
    </View>"""
    p = plan(config)
    by_name = {t.control.name: t for t in p.targets}
    assert set(by_name) == {"boxes", "ner"}
    assert by_name["boxes"].model.family == "fake_detection"
    assert by_name["boxes"].obj.value_key == "image"
    assert by_name["boxes"].threshold == 0.7
    assert by_name["boxes"].label_map("truck") == "Car"
    assert by_name["ner"].model.family == "fake_ner"
    assert by_name["ner"].threshold == 0.5
    assert p.unfilled == ("stars (Rating)",)
    assert [spec.key for spec in p.specs] == ["fake_detection:fake-det", "fake_ner:fake-ner-1"]


def test_model_skip_leaves_a_control_alone() -> None:
    config = """<View><Text name="t" value="$text"/>
      <Labels name="a" toName="t"><Label value="PER"/></Labels>
      <Labels name="b" toName="t" model_skip="true"><Label value="PER"/></Labels></View>"""
    p = plan(config)
    assert [t.control.name for t in p.targets] == ["a"]
    assert p.skipped == ("b (Labels)",)


def test_model_name_and_path_pick_the_model() -> None:
    config = """<View><Text name="t" value="$text"/>
      <Labels name="a" toName="t" model_name="fake-ner-1" model_path="/models/x"><Label value="PER"/></Labels></View>"""
    (target,) = plan(config).targets
    assert target.model.key == "fake_ner:fake-ner-1@/models/x"


def test_unknown_model_name_is_not_claimed() -> None:
    config = """<View><Text name="t" value="$text"/>
      <Labels name="a" toName="t" model_name="no-such-model"><Label value="PER"/></Labels></View>"""
    with pytest.raises(ConfigError, match="cannot fill any control tag"):
        plan(config)


def test_plain_rectangle_links_the_sibling_labels_tag() -> None:
    config = """<View><Image name="img" value="$image"/>
      <Rectangle name="box" toName="img"/>
      <Labels name="lab" toName="img"><Label value="Car"/></Labels></View>"""
    (target,) = plan(config).targets
    assert target.control.name == "box"
    assert target.linked["labels"].name == "lab"
    assert target.label_map("car") == "Car"
    assert plan(config).unfilled == ()


def test_readonly_and_hidden_per_tag() -> None:
    config = """<View><Text name="t" value="$text"/>
      <Labels name="a" toName="t" model_readonly="true" model_hidden="true"><Label value="PER"/></Labels></View>"""
    (target,) = plan(config).targets
    assert target.readonly and target.hidden


@pytest.mark.parametrize(
    "config",
    [
        "",
        "   ",
        "<View><broken",
        "<View></View>",
        '<View><Text name="t" value="$t"/></View>',
        "x" * 1_000_001,
    ],
)
def test_configs_without_anything_to_fill_raise_config_error(config: str) -> None:
    with pytest.raises(ConfigError):
        plan(config)


def test_bad_threshold_is_a_config_error_with_the_fix() -> None:
    config = """<View><Text name="t" value="$text"/>
      <Labels name="a" toName="t" model_score_threshold="high"><Label value="PER"/></Labels></View>"""
    with pytest.raises(ConfigError, match="between 0 and 1"):
        plan(config)


def test_plans_are_cached_by_config_hash() -> None:
    planner = Planner(SETTINGS, FAMILIES)
    config = (
        '<View><Text name="t" value="$text"/><Labels name="a" toName="t"><Label value="PER"/></Labels></View>'
    )
    assert planner.plan(config) is planner.plan(config)
    assert planner.plan(config) is not planner.plan(config.replace("PER", "ORG"))
