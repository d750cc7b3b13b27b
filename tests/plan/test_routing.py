"""Label routing (serving/plan/routing.py): which model serves which labels of each tag, and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from serving.contract import Backend, ModelSpec, Target
from serving.errors import ConfigError
from serving.plan.planner import build_plan
from serving.settings import Settings


class _ZeroShot(Backend):
    """A zero-shot family whose weights are present when `present` says so."""

    family = "zs_regions"
    control_tags = ("RectangleLabels", "Rectangle", "Labels")
    object_tags = ("Image", "Text")
    zero_shot = True
    default_model = "zs-model"
    present: ClassVar[bool] = True

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        return None if cls.present else "weights missing; python -m serving weights download --model zs-model"

    def load(self, device: str) -> None:
        raise NotImplementedError

    def forward(self, batch: list[Any]) -> list[Any]:
        raise NotImplementedError

    def postprocess(self, output: Any, target: Target, item: Any) -> list[dict[str, Any]]:
        raise NotImplementedError


class _ZeroShotChoices(_ZeroShot):
    family = "zs_choices"
    control_tags = ("Choices", "Taxonomy")
    object_tags = ("Image",)
    whole_tag = True
    default_model = "zs-clip"


@pytest.fixture(autouse=True)
def _present() -> Any:
    _ZeroShot.present = True
    yield
    _ZeroShot.present = True


FAMILIES = {
    "detection": DetectionBackend,
    "image_classification": ClassificationBackend,
    "zs_regions": _ZeroShot,
    "zs_choices": _ZeroShotChoices,
}


def _plan(body: str, families: dict[str, type[Backend]] | None = None, **settings: Any) -> Any:
    config = f'<View><Image name="image" value="$image"/><Text name="text" value="$text"/>{body}</View>'
    return build_plan(config, Settings(**settings), families or FAMILIES)


def _table(plan: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(r.control, r.family, r.labels) for r in plan.routes]


def _labels(target: Target) -> tuple[str, ...]:
    return target.label_map.config_labels


def test_known_labels_stay_with_the_closed_model() -> None:
    plan = _plan(
        '<RectangleLabels name="r" toName="image"><Label value="Person"/><Label value="Car"/></RectangleLabels>'
    )
    assert _table(plan) == [("r", "detection", ("Person", "Car"))]
    assert [t.model.key for t in plan.targets] == ["detection:fasterrcnn_resnet50_fpn_v2"]
    assert plan.routes[0].reason == "the model knows every label"


def test_mixed_labels_split_between_closed_and_zero_shot_each_with_its_own_labels() -> None:
    plan = _plan(
        '<RectangleLabels name="r" toName="image"><Label value="Person"/><Label value="Forklift"/>'
        '<Label value="Truck"/><Label value="Pallet" predicted_values="wooden pallet"/></RectangleLabels>'
    )
    assert _table(plan) == [
        ("r", "detection", ("Person", "Truck")),
        ("r", "zs_regions", ("Forklift", "Pallet")),
    ]
    closed, zero = plan.targets
    assert _labels(closed) == ("Person", "Truck") and closed.control.labels == ("Person", "Truck")
    # the zero-shot model is prompted by its own labels only, synonyms kept
    assert zero.control.labels == ("Forklift", "Pallet")
    assert zero.control.predicted_values == {"Pallet": ("wooden pallet",)}
    assert zero.label_map("wooden pallet") == "Pallet" and zero.label_map("Person") is None
    assert closed.label_map("person") == "Person" and closed.label_map("Forklift") is None
    # one tag, two models: two groups on the image
    assert [spec.key for spec, _obj, _t in plan.groups()] == [
        "detection:fasterrcnn_resnet50_fpn_v2",
        "zs_regions:zs-model",
    ]


def test_plain_rectangle_routes_the_linked_labels() -> None:
    plan = _plan(
        '<Rectangle name="box" toName="image"/>'
        '<Labels name="lab" toName="image"><Label value="Dog"/><Label value="Scratch"/></Labels>'
    )
    assert _table(plan) == [("box", "detection", ("Dog",)), ("box", "zs_regions", ("Scratch",))]
    assert plan.targets[1].linked["labels"].labels == ("Scratch",)
    assert plan.targets[1].control.name == "box"


def test_unknown_labels_only_go_to_the_zero_shot_model_alone() -> None:
    plan = _plan('<RectangleLabels name="r" toName="image"><Label value="Tumor"/></RectangleLabels>')
    assert _table(plan) == [("r", "zs_regions", ("Tumor",))]
    assert [t.model.key for t in plan.targets] == ["zs_regions:zs-model"]


def test_whole_tag_zero_shot_takes_a_mixed_choices_tag_whole() -> None:
    plan = _plan(
        '<Choices name="c" toName="image"><Choice value="Dog"/><Choice value="Weapons"/>'
        '<Choice value="Violence"/></Choices>'
    )
    assert _table(plan) == [("c", "zs_choices", ("Dog", "Weapons", "Violence"))]
    assert _labels(plan.targets[0]) == ("Dog", "Weapons", "Violence")


def test_imagenet_choices_and_coarse_classes_stay_with_the_classifier() -> None:
    plan = _plan(
        '<Choices name="c" toName="image"><Choice value="Dog"/><Choice value="Cat"/><Choice value="Car"/></Choices>'
    )
    assert _table(plan) == [("c", "image_classification", ("Dog", "Cat", "Car"))]


def test_model_name_on_the_tag_wins() -> None:
    plan = _plan(
        '<RectangleLabels name="r" toName="image" model_name="retinanet_resnet50_fpn_v2">'
        '<Label value="Forklift"/></RectangleLabels>'
    )
    assert _table(plan) == [("r", "detection", ("Forklift",))]
    assert plan.routes[0].reason.startswith("named on the tag")


def test_auto_route_false_keeps_the_claim_by_tag() -> None:
    plan = _plan(
        '<RectangleLabels name="r" toName="image"><Label value="Forklift"/></RectangleLabels>',
        auto_route=False,
    )
    assert _table(plan) == [("r", "detection", ("Forklift",))]
    assert plan.routes[0].reason == "claimed by tag (AUTO_ROUTE=false)"


def test_missing_zero_shot_weights_leave_the_closed_model_its_own_labels() -> None:
    _ZeroShot.present = False
    plan = _plan(
        '<RectangleLabels name="r" toName="image"><Label value="Person"/><Label value="Forklift"/></RectangleLabels>'
    )
    assert _table(plan) == [("r", "detection", ("Person",))]
    assert "not predicted: Forklift" in plan.routes[0].reason
    assert "python -m serving weights download --model zs-model" in plan.routes[0].reason


def test_nothing_can_serve_the_tag_routes_to_the_absent_zero_shot_model() -> None:
    # the runtime's check then answers /setup 422 with the zero-shot family's download command
    _ZeroShot.present = False
    plan = _plan('<RectangleLabels name="r" toName="image"><Label value="Tumor"/></RectangleLabels>')
    assert _table(plan) == [("r", "zs_regions", ("Tumor",))]
    assert "weights missing" in plan.routes[0].reason


def test_a_plain_tag_keeps_the_closed_model_when_no_zero_shot_model_is_present() -> None:
    # unlabeled boxes are still a service: the detector keeps the tag
    _ZeroShot.present = False
    plan = _plan(
        '<Rectangle name="box" toName="image"/><Labels name="lab" toName="image"><Label value="Scratch"/></Labels>'
    )
    assert [t.model.family for t in plan.targets] == ["detection"]


def test_a_tag_no_family_claims_goes_to_a_zero_shot_family() -> None:
    plan = _plan('<Labels name="ner" toName="text"><Label value="Noun"/><Label value="Pronoun"/></Labels>')
    assert _table(plan) == [("ner", "zs_regions", ("Noun", "Pronoun"))]
    assert plan.unfilled == ()


def test_a_tag_nothing_takes_is_reported_unfilled() -> None:
    families = {"detection": DetectionBackend}
    plan = _plan(
        '<RectangleLabels name="r" toName="image"><Label value="Person"/></RectangleLabels>'
        '<Labels name="ner" toName="text"><Label value="Noun"/></Labels>',
        families,
    )
    assert [(r.control, r.family, r.reason) for r in plan.routes] == [
        ("r", "detection", "the model knows every label"),
        ("ner", "", "no family fills this tag"),
    ]
    assert plan.unfilled == ("ner (Labels)",)


def test_zero_shot_families_never_take_an_unnamed_tag_by_claim_alone() -> None:
    families: dict[str, type[Backend]] = {"zs_regions": _ZeroShot}
    with pytest.raises(ConfigError):
        _plan(
            '<RectangleLabels name="r" toName="image"><Label value="X"/></RectangleLabels>',
            families,
            auto_route=False,
        )


def test_user_checkpoint_class_list_decides_known_labels(tmp_path: Path) -> None:
    (tmp_path / "det.pt").write_bytes(b"x")
    (tmp_path / "det.classes.txt").write_text("forklift\npallet\n")
    plan = _plan(
        f'<RectangleLabels name="r" toName="image" model_path="{tmp_path / "det.pt"}">'
        '<Label value="Forklift"/><Label value="Tumor"/></RectangleLabels>'
    )
    # model_path names the model: no routing
    assert _table(plan) == [("r", "detection", ("Forklift", "Tumor"))]
    spec = ModelSpec("detection", "fasterrcnn_resnet50_fpn_v2", str(tmp_path / "det.pt"))
    control = plan.targets[0].control
    assert DetectionBackend.known_labels(spec, control, Settings()) == {"Forklift"}


def test_static_vocabularies_equal_torchvision_weight_metadata() -> None:
    import torchvision.models as tvm

    from backends import _torchvision as tv

    data = json.loads(Path(tv.__file__).with_name("_vocabularies.json").read_text())
    for name, info in tv.MODELS.items():
        meta = tvm.get_model_weights(name)[info.member].meta
        assert data["vocabularies"][data["models"][name]] == list(meta["categories"]), name


def test_cli_plan_prints_the_routing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli.main import main

    config = tmp_path / "labeling.xml"
    config.write_text(
        '<View><Image name="image" value="$image"/>'
        '<RectangleLabels name="r" toName="image"><Label value="Person"/><Label value="Forklift"/></RectangleLabels>'
        "</View>"
    )
    assert main(["plan", "--config", str(config), "--json"], families=lambda: FAMILIES) == 0
    routes = json.loads(capsys.readouterr().out)
    assert [(r["control"], r["family"], r["model"], r["labels"]) for r in routes] == [
        ("r", "detection", "fasterrcnn_resnet50_fpn_v2", ["Person"]),
        ("r", "zs_regions", "zs-model", ["Forklift"]),
    ]
    assert main(["plan", "--config", str(config)], families=lambda: FAMILIES) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith('<RectangleLabels name="r" toName="image">  zs_regions:zs-model  [Forklift]')
