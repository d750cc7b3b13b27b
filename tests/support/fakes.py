"""Fake backends and resolvers for testing the server core without real models."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from PIL import Image

from serving.contract import Backend, Item, ModelSpec, Target
from serving.errors import InputError
from serving.results import regions
from serving.settings import Settings


class FakeResolver:
    """Inline text; images are blank RGB images whose size is read from 'WxH' in the URL."""

    def __init__(
        self, default_size: tuple[int, int] = (640, 480), documents: Mapping[str, str] | None = None
    ) -> None:
        self.default_size = default_size
        self.calls: list[str] = []
        # URL -> body served when a value is fetched (as_url=True), like an HTTP server would
        self.documents = dict(documents or {})

    def load_image(self, value: str, task_id: int | None = None, shrink: Any = None) -> Image.Image:
        """Return a blank image; 'missing' in the URL raises InputError like a 404 would."""
        self.calls.append(value)
        if "missing" in value:
            raise InputError(f"GET {value} answered 404")
        size = self.default_size
        for part in value.replace(".", "/").split("/"):
            if "x" in part and all(p.isdigit() for p in part.split("x", 1)):
                w, h = part.split("x", 1)
                size = (int(w), int(h))
        return Image.new("RGB", size, "white")

    def load_text(self, value: str, task_id: int | None = None, *, as_url: bool | None = None) -> str:
        """Return the value itself (inline text), or the document served at a URL when fetched."""
        self.calls.append(value)
        if as_url:
            if value not in self.documents:
                raise InputError(f"GET {value} answered 404")
            return self.documents[value]
        return value


class FakeNER(Backend):
    """Labels every capitalised word as PER (or ORG when it ends with 'Corp'); records batch sizes."""

    family = "fake_ner"
    control_tags = ("Labels",)
    object_tags = ("Text",)
    input_kind = "text"
    max_batch_size = 16
    default_model = "fake-ner-1"
    aliases = ({"PER", "PERSON", "Person"}, {"ORG", "Organization"})
    batch_sizes: ClassVar[list[int]] = []
    forward_delay_s: ClassVar[float] = 0.0
    load_delay_s: ClassVar[float] = 0.0
    load_error: ClassVar[str] = ""
    weights_version: ClassVar[str] = "w1"
    _lock = threading.Lock()

    def load(self, device: str) -> None:
        """Pretend to load weights."""
        time.sleep(self.load_delay_s)
        if self.load_error:
            raise RuntimeError(self.load_error)

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Any) -> str:
        """Return a version that changes with the fake weights."""
        return f"{spec.name}:{cls.weights_version}"

    def labels(self) -> list[str]:
        """Return the fake vocabulary."""
        return ["PER", "ORG"]

    def preprocess(self, item: Item) -> str:
        """Return the text."""
        assert item.text is not None
        return item.text

    def forward(self, batch: list[Any]) -> list[Any]:
        """Find capitalised words; a text containing BOOM raises for the whole batch."""
        with FakeNER._lock:
            FakeNER.batch_sizes.append(len(batch))
        if self.forward_delay_s:
            time.sleep(self.forward_delay_s)
        if any("BOOM" in text for text in batch):
            raise ValueError("model exploded on BOOM")
        outputs = []
        for text in batch:
            spans = []
            pos = 0
            for word in text.split(" "):
                stripped = word.strip(".,")
                if stripped[:1].isupper():
                    label = "ORG" if stripped.endswith("Corp") else "PERSON"
                    spans.append((pos, pos + len(stripped), label, 0.9 if label == "PERSON" else 0.6))
                pos += len(word) + 1
            outputs.append(spans)
        return outputs

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn spans into Labels items, mapped through the config."""
        assert item.text is not None
        out = []
        for start, end, label, score in output:
            mapped = target.label_map(label)
            if mapped is None or score < target.threshold:
                continue
            out.append(regions.span_item(target, start, end, item.text[start:end], mapped, score))
        return out


class FakeDetector(Backend):
    """Returns one planted box per image (pixel coordinates) labelled 'car' and one 'person'."""

    family = "fake_detection"
    control_tags = ("RectangleLabels", "Rectangle")
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 8
    default_model = "fake-det"
    aliases = ({"car", "automobile"}, {"person", "people"})

    @classmethod
    def claim(cls, obj: Any, controls: Any, settings: Settings) -> list[Any]:
        """Claim rectangles, linking a sibling Labels tag on the same image."""
        claims = super().claim(obj, controls, settings)
        labels = [c for c in controls if c.tag == "Labels"]
        out = []
        from serving.contract import Claim

        for claim in claims:
            linked = {"labels": labels[0]} if claim.control.tag == "Rectangle" and labels else {}
            out.append(Claim(claim.control, claim.model_name, claim.model_path, linked))
        return out

    def load(self, device: str) -> None:
        """Nothing to load."""

    def preprocess(self, item: Item) -> tuple[int, int]:
        """Return the image size."""
        return item.size

    def forward(self, batch: list[Any]) -> list[Any]:
        """Plant boxes relative to each image's size."""
        return [
            [((w * 0.1, h * 0.2, w * 0.5, h * 0.6), "car", 0.8), ((0, 0, w / 4, h / 4), "person", 0.4)]
            for w, h in batch
        ]

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit rectangles above threshold with mapped labels."""
        out = []
        for box, label, score in output:
            mapped = target.label_map(label)
            if score < target.threshold:
                continue
            if mapped is None and target.control.tag == "RectangleLabels":
                continue
            out.extend(regions.rectangle_items(target, box, item.size, score, mapped))
        return out


class FakeBrush(Backend):
    """Returns `regions` small square masks per image (a brush-heavy config), all labelled 'blob'."""

    family = "fake_brush"
    control_tags = ("BrushLabels",)
    object_tags = ("Image",)
    input_kind = "image"
    default_model = "fake-brush"
    regions: ClassVar[int] = 1000

    def load(self, device: str) -> None:
        """Nothing to load."""

    def preprocess(self, item: Item) -> tuple[int, int]:
        """Return the image size."""
        return item.size

    def forward(self, batch: list[Any]) -> list[Any]:
        """Return the sizes back (masks are built in postprocess, on the CPU)."""
        return batch

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one 4x4 mask per region, tiled over the image."""
        import numpy as np

        w, h = output
        label = target.label_map("blob")
        out: list[dict[str, Any]] = []
        per_row = max(1, w // 4)
        for k in range(self.regions):
            mask = np.zeros((h, w), dtype=np.uint8)
            y, x = divmod(k, per_row)
            mask[(y * 4) % h : (y * 4) % h + 4, x * 4 : x * 4 + 4] = 255
            out.extend(regions.brush_items(target, mask, 0.5, label))
        return out


FAMILIES: Mapping[str, type[Backend]] = {
    "fake_detection": FakeDetector,
    "fake_ner": FakeNER,
    "fake_brush": FakeBrush,
}


def reset_fakes() -> None:
    """Reset class-level knobs between tests."""
    FakeNER.batch_sizes.clear()
    FakeNER.forward_delay_s = 0.0
    FakeNER.load_delay_s = 0.0
    FakeNER.load_error = ""
    FakeNER.weights_version = "w1"


def spec(family: str = "fake_ner", name: str = "fake-ner-1") -> ModelSpec:
    """Return a ModelSpec."""
    return ModelSpec(family, name)
