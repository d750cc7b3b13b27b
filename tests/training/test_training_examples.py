"""Label Studio export -> training examples: spans, boxes, choices, percent -> pixels, EXIF, rotation."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.contract import BoxPct, ControlTag, LabelMap, ModelSpec, ObjectTag, Target
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import DataResolver
from serving.results import regions
from serving.settings import Settings
from serving.training.examples import examples_from_tasks, latest_annotation
from serving.training.run import Run
from serving.training.store import TrainingStore

TEXT = ObjectTag("text", "Text", "text")
IMAGE = ObjectTag("image", "Image", "image")
NER = Target(
    ControlTag("label", "Labels", "text", ("Person", "Drug")),
    TEXT,
    ModelSpec("ner", "m"),
    LabelMap(["Person", "Drug"]),
)
BOXES = Target(
    ControlTag("box", "RectangleLabels", "image", ("Car", "Tree")),
    IMAGE,
    ModelSpec("detection", "m"),
    LabelMap(["Car", "Tree"]),
)
LINKED_LABELS = ControlTag("kind", "Labels", "image", ("Car", "Tree"))
PLAIN_BOXES = Target(
    ControlTag("rect", "Rectangle", "image"),
    IMAGE,
    ModelSpec("detection", "m"),
    LabelMap(["Car", "Tree"]),
    linked={"labels": LINKED_LABELS},
)
CHOICES = Target(
    ControlTag("kind", "Choices", "image", ("Cat", "Dog")),
    IMAGE,
    ModelSpec("image_classification", "m"),
    LabelMap(["Cat", "Dog"]),
)


def span(start: int, end: int, text: str, label: str, from_name: str = "label") -> dict[str, Any]:
    return {
        "from_name": from_name,
        "to_name": "text",
        "type": "labels",
        "value": {"start": start, "end": end, "text": text, "labels": [label]},
    }


def annotation(ident: int, result: list[Any], when: str, cancelled: bool = False) -> dict[str, Any]:
    return {"id": ident, "result": result, "was_cancelled": cancelled, "created_at": when, "updated_at": when}


def test_the_latest_annotation_that_was_not_cancelled_is_used() -> None:
    task = {
        "annotations": [
            annotation(1, [], "2026-11-01T00:00:00Z"),
            annotation(2, [], "2026-11-03T00:00:00Z"),
            annotation(3, [], "2026-11-05T00:00:00Z", cancelled=True),  # skipped: not a label
        ]
    }
    assert latest_annotation(task)["id"] == 2  # type: ignore[index]
    assert latest_annotation({"annotations": [annotation(4, [], "x", cancelled=True)]}) is None
    assert latest_annotation({"annotations": []}) is None


def test_spans_are_checked_against_the_config_and_the_text() -> None:
    text = "Alice takes Zolvarex. 😀 Bob too."
    bob = text.index("Bob")
    tasks = [
        {
            "id": 1,
            "data": {"text": text},
            "annotations": [
                annotation(1, [span(0, 5, "Alice", "Drug")], "2026-11-01"),  # older: ignored
                annotation(
                    2,
                    [
                        span(0, 5, "Alice", "Person"),
                        span(12, 20, "Zolvarex", "Drug"),
                        # the browser's UTF-16 offsets: the emoji counts 2 units
                        span(bob + 1, bob + 4, "Bob", "Person"),
                        span(0, 5, "Alice", "Organization"),  # not in the config
                        span(30, 90, "x", "Person"),  # outside the text
                        span(6, 11, "Alicx", "Person"),  # disagrees with the text
                        span(0, 5, "Alice", "Person", from_name="other"),  # another control
                    ],
                    "2026-11-02",
                ),
            ],
        },
        {"id": 2, "data": {"text": "Nothing here."}, "annotations": [annotation(3, [], "2026-11-02")]},
        {
            "id": 3,
            "data": {"text": "Skipped."},
            "annotations": [annotation(4, [], "2026-11-02", cancelled=True)],
        },
        {"id": 4, "data": {"text": "Not annotated."}, "annotations": []},
    ]
    examples, stats = examples_from_tasks(tasks, [NER])
    assert [(e.task_id, e.spans) for e in examples] == [
        (1, ((0, 5, "Person"), (12, 20, "Drug"), (bob, bob + 3, "Person"))),
        (2, ()),  # "no entity here" is a lesson too
    ]
    assert examples[0].text == text and text[bob : bob + 3] == "Bob"
    assert (stats.tasks, stats.annotated, stats.examples, stats.regions, stats.cancelled) == (4, 2, 2, 3, 1)
    assert stats.dropped_regions == 3
    assert any("'Organization' is not in the config" in r for r in stats.reasons)
    assert any("outside the text" in r for r in stats.reasons)
    assert any("is not the text at" in r for r in stats.reasons)


def rect(
    x: float, y: float, w: float, h: float, label: str, rotation: float = 0, ident: str = "r"
) -> dict[str, Any]:
    return {
        "id": ident,
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


def test_rectangles_become_percent_boxes_and_bad_ones_are_dropped() -> None:
    task = {
        "id": 5,
        "data": {"image": "/data/upload/1/a.jpg"},
        "annotations": [
            annotation(
                1,
                [
                    rect(10, 20, 30, 40, "Car"),
                    rect(50, 10, 20, 30, "Tree", rotation=90),
                    rect(1, 1, 5, 5, "Bus"),  # not in the config
                    rect(1, 1, 0, 5, "Car"),  # empty
                    rect(1, float("nan"), 5, 5, "Car"),
                ],
                "2026",
            )
        ],
    }
    (example,), stats = examples_from_tasks([task], [BOXES])
    assert example.image == "/data/upload/1/a.jpg"
    assert example.boxes == (BoxPct(10, 20, 30, 40, 0, "Car"), BoxPct(50, 10, 20, 30, 90, "Tree"))
    assert stats.dropped_regions == 3


def test_a_plain_rectangle_takes_its_label_from_the_linked_labels_item() -> None:
    result = [
        {"id": "a", "from_name": "rect", "to_name": "image", "type": "rectangle", "value": {"x": 0, "y": 0, "width": 10, "height": 10}},
        {"id": "a", "from_name": "kind", "to_name": "image", "type": "labels", "value": {"x": 0, "y": 0, "width": 10, "height": 10, "labels": ["Tree"]}},
        {"id": "b", "from_name": "rect", "to_name": "image", "type": "rectangle", "value": {"x": 5, "y": 5, "width": 10, "height": 10}},
    ]  # fmt: skip
    (example,), stats = examples_from_tasks(
        [{"id": 1, "data": {"image": "x"}, "annotations": [annotation(1, result, "2026")]}], [PLAIN_BOXES]
    )
    assert example.boxes == (BoxPct(0, 0, 10, 10, 0, "Tree"),)
    assert stats.dropped_regions == 1  # "b" has no label


def test_choices() -> None:
    def task(choice: str) -> dict[str, Any]:
        item = {"from_name": "kind", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}
        return {"id": 1, "data": {"image": "x"}, "annotations": [annotation(1, [item], "2026")]}

    examples, stats = examples_from_tasks([task("Dog"), task("Horse")], [CHOICES])
    assert [e.choices for e in examples] == [("Dog",), ()]
    assert stats.dropped_regions == 1


@pytest.mark.parametrize(
    ("value", "rotation", "box"),
    [
        ((10, 20, 30, 40), 0, (20.0, 20.0, 80.0, 60.0)),
        # 90 degrees clockwise about the top-left corner (100, 10): the box swings to the left
        ((50, 10, 20, 30), 90, (70.0, 10.0, 100.0, 50.0)),
        ((50, 10, 20, 30), 180, (60.0, 0.0, 100.0, 10.0)),  # up-left, clipped at the top
        ((90, 90, 30, 30), 0, (180.0, 90.0, 200.0, 100.0)),  # clipped to the image
    ],
)
def test_percent_to_pixel_with_rotation(
    value: tuple[float, ...], rotation: float, box: tuple[float, ...]
) -> None:
    got = regions.box_pct_to_xyxy_px(*value, rotation, (200, 100))
    assert got == pytest.approx(box, abs=1e-9)


def test_percent_to_pixel_inverts_the_prediction_path() -> None:
    size = (640, 427)
    pct = regions.box_xyxy_px_to_pct((64.0, 42.7, 320.0, 400.0), size)
    assert regions.box_pct_to_xyxy_px(
        pct["x"], pct["y"], pct["width"], pct["height"], 0, size
    ) == pytest.approx((64.0, 42.7, 320.0, 400.0))


def exif_jpeg_data_uri(orientation: int) -> str:
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def make_run(tmp_path: Path, examples: list[Any]) -> Run:
    cfg = Settings(model_dir=str(tmp_path))
    store = TrainingStore.for_settings(cfg)
    store.request("1", ModelSpec("detection", "m"), "cpu", "<View/>", {"kind": "inline"}, "START_TRAINING")
    job = store.claim("cpu")
    assert job is not None
    return Run(
        job=job,
        store=store,
        settings=cfg,
        targets=[BOXES],
        examples=examples,
        output_dir=tmp_path / "out",
        device="cpu",
        resolver=DataResolver(cfg, LabelStudioClient(cfg)),
    )


def test_images_load_as_shown_and_boxes_are_pixels_of_the_shown_image(tmp_path: Path) -> None:
    """An EXIF-rotated photo: Label Studio shows it upright and the percentages are of that image."""
    # orientation 6: stored 64x32, shown 32x64 with the stored left (red) half on top
    task = {
        "id": 9,
        "data": {"image": exif_jpeg_data_uri(6)},
        "annotations": [annotation(1, [rect(0, 0, 100, 50, "Car"), rect(0, 50, 100, 50, "Tree")], "2026")],
    }
    (example,), _ = examples_from_tasks([task], [BOXES])
    run = make_run(tmp_path, [example])
    image, boxes, labels = run.load_image(example)
    assert image.size == (32, 64)
    assert labels == ["Car", "Tree"]
    np.testing.assert_allclose(boxes, [[0, 0, 32, 32], [0, 32, 32, 64]])
    pixels = np.asarray(image, dtype=np.int16)
    car = pixels[2:30, 2:30].reshape(-1, 3).mean(axis=0)
    tree = pixels[34:62, 2:30].reshape(-1, 3).mean(axis=0)
    assert car[0] > 200 and car[2] < 60  # the Car box covers the red half
    assert tree[2] > 200 and tree[0] < 60
