"""Rendered text images, the guide's OCR config and target builders shared by the OCR tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from backends.ocr import OCRBackend
from serving.contract import Item, ObjectTag, Target
from serving.plan.planner import build_plan
from serving.settings import Settings

# Label Studio's OCR template from the pre-annotation guide.
GUIDE_CONFIG = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image">
    <Label value="Text" background="green"/>
    <Label value="Handwriting" background="blue"/>
  </Labels>
  <Rectangle name="bbox" toName="image" strokeWidth="3"/>
  <Polygon name="poly" toName="image" strokeWidth="3"/>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"
            maxSubmissions="1" rows="5" placeholder="Recognized Text" displayMode="region-list"/>
</View>"""

PAGE_CONFIG = """<View>
  <Image name="image" value="$ocr"/>
  <TextArea name="page_text" toName="image" rows="5"/>
</View>"""

HELLO = ("HELLO",)
THREE_LINES = ("Invoice number 2024", "Total amount due", "Thank you")


@dataclass
class Rendered:
    """A rendered page: RGB image and each line's pixel box (x0, y0, x1, y1)."""

    image: Image.Image
    lines: tuple[str, ...]
    boxes: list[tuple[int, int, int, int]]

    @property
    def array(self) -> np.ndarray:
        """Return the page as an RGB array."""
        return np.asarray(self.image)


def render(lines: Sequence[str], size: tuple[int, int] = (640, 300), font_px: int = 48) -> Rendered:
    """Render black lines on white with Pillow's built-in scalable font, 80 px apart."""
    font = ImageFont.load_default(size=font_px)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    boxes = []
    for index, text in enumerate(lines):
        origin = (40, 30 + 80 * index)
        draw.text(origin, text, font=font, fill="black")
        boxes.append(tuple(int(v) for v in draw.textbbox(origin, text, font=font)))
    return Rendered(image, tuple(lines), boxes)  # type: ignore[arg-type]


def targets_for(config: str, settings: Settings | None = None) -> list[Target]:
    """Plan a config with the OCR family alone."""
    return list(build_plan(config, settings or Settings(), {"ocr": OCRBackend}).targets)


def item_for(page: Rendered, context: dict[str, Any] | None = None) -> Item:
    """Build the runtime's Item for a rendered page."""
    obj = ObjectTag(name="image", tag="Image", value_key="ocr")
    return Item(task={"id": 1, "data": {"ocr": "page.png"}}, obj=obj, image=page.image, context=context)


def by_id(items: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group result items by region id."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        grouped.setdefault(item["id"], []).append(item)
    return grouped


def region_texts(items: Sequence[dict[str, Any]]) -> list[str]:
    """Return the per-region transcriptions in output order."""
    return [item["value"]["text"][0] for item in items if item["type"] == "textarea"]


def rect_px(value: dict[str, Any], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Return (x0, y0, x1, y1) pixels of an unrotated LS rectangle value."""
    w, h = size
    x0 = value["x"] * w / 100.0
    y0 = value["y"] * h / 100.0
    return x0, y0, x0 + value["width"] * w / 100.0, y0 + value["height"] * h / 100.0


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Return the intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def drawn_rect(
    box_px: Sequence[float], size: tuple[int, int], margin_px: float = 6.0, **extra: Any
) -> dict[str, Any]:
    """Return a rectangle region as Label Studio sends it in context.result, around a pixel box."""
    w, h = size
    x0, y0, x1, y1 = box_px
    value = {
        "x": (x0 - margin_px) / w * 100.0,
        "y": (y0 - margin_px) / h * 100.0,
        "width": (x1 - x0 + 2 * margin_px) / w * 100.0,
        "height": (y1 - y0 + 2 * margin_px) / h * 100.0,
        "rotation": 0,
    }
    value.update(extra)
    return {
        "id": "drawn_1",
        "from_name": "bbox",
        "to_name": "image",
        "type": "rectangle",
        "origin": "manual",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
    }


def validate(config: str, items: Sequence[dict[str, Any]]) -> list[str]:
    """Return label_studio_sdk's validation errors of a prediction (empty when valid)."""
    from label_studio_sdk.label_interface import LabelInterface

    errors = LabelInterface(config).validate_prediction({"result": list(items)}, return_errors=True)
    return list(errors) if isinstance(errors, list) else ([] if errors else ["invalid"])
