"""OCR engines behind one interface: read whole pages in a batch, read one drawn region.

EasyOCR (torch, GPU-capable) and Tesseract (CPU, via tesserocr). Heavy imports happen in the
engine constructors, which run in the worker's load(), never at import.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import queue
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from backends._ocr_geometry import (
    Line,
    box_quad,
    merge_fragments,
    pad_border,
    pad_to,
    plan_detection_groups,
    reading_order,
    text_bands,
    tighten,
)

log = logging.getLogger(__name__)

ENGINES = ("easyocr", "tesseract")

# ISO 639-1 style codes (what EasyOCR and the OCR_LANGUAGES setting use) -> Tesseract's traineddata names.
_TESSERACT_LANGS = {
    "en": "eng",
    "fr": "fra",
    "de": "deu",
    "es": "spa",
    "it": "ita",
    "pt": "por",
    "nl": "nld",
    "pl": "pol",
    "ru": "rus",
    "uk": "ukr",
    "ar": "ara",
    "hi": "hin",
    "ja": "jpn",
    "ko": "kor",
    "ch_sim": "chi_sim",
    "ch_tra": "chi_tra",
    "tr": "tur",
    "sv": "swe",
    "cs": "ces",
}

# Where distributions put Tesseract's traineddata files (Debian/Ubuntu, Fedora, Homebrew, source builds).
TESSDATA_CANDIDATES = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
    "/usr/local/share/tessdata",
    "/opt/homebrew/share/tessdata",
)

# EasyOCR's own defaults of readtext(), kept explicit so batched and single paths agree.
_DETECT_KW: dict[str, Any] = {
    "min_size": 20,
    "text_threshold": 0.7,
    "low_text": 0.4,
    "link_threshold": 0.4,
    "canvas_size": 2560,
    "mag_ratio": 1.0,
    "slope_ths": 0.1,
    "ycenter_ths": 0.5,
    "height_ths": 0.5,
    "width_ths": 0.5,
    "add_margin": 0.1,
}
_CONTRAST_THS = 0.1
# Area a padded detector batch may waste on the GPU (same-size pages always share a batch).
_PAD_WASTE = 0.3
_ADJUST_CONTRAST = 0.5
# Floats per recognizer mini-batch (batch x 1 x 64 x width): bounds memory for very wide lines.
_MAX_BATCH_FLOATS = 1 << 24


def parse_model_name(name: str) -> tuple[str, tuple[str, ...]] | None:
    """Split "easyocr:en,fr" / "tesseract:deu+eng" into (engine, languages); None when not an OCR engine."""
    engine, _, langs = name.strip().partition(":")
    engine = engine.strip().lower()
    if engine not in ENGINES:
        return None
    separators = langs.replace("+", ",")
    return engine, tuple(lang.strip() for lang in separators.split(",") if lang.strip())


def tesseract_lang(code: str) -> str:
    """Return Tesseract's name for a language code (3-letter names pass through)."""
    return _TESSERACT_LANGS.get(code, code)


def canonical_model_name(engine: str, langs: Sequence[str]) -> str:
    """Return the model name that keys one loaded engine (English needs no suffix)."""
    if engine == "tesseract":
        names = [tesseract_lang(lang) for lang in langs] or ["eng"]
        return "tesseract" if names == ["eng"] else "tesseract:" + "+".join(names)
    names = list(langs) or ["en"]
    return "easyocr" if names == ["en"] else "easyocr:" + ",".join(names)


# ---- EasyOCR weights: resolved without importing easyocr (planning must stay cheap) ----


@lru_cache(maxsize=1)
def _easyocr_config() -> ModuleType | None:
    """Load easyocr/config.py alone (model file names, MODULE_PATH) without importing torch."""
    spec = importlib.util.find_spec("easyocr")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "config.py"
    config_spec = importlib.util.spec_from_file_location("_easyocr_config_only", path)
    if config_spec is None or config_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(config_spec)
    config_spec.loader.exec_module(module)
    return module


def easyocr_required_files(langs: Sequence[str]) -> tuple[str, ...]:
    """Return the weight files EasyOCR needs for these languages (mirrors Reader's model choice)."""
    config = _easyocr_config()
    if config is None:
        return ()
    wanted = set(langs) or {"en"}
    gen1, gen2 = config.recognition_models["gen1"], config.recognition_models["gen2"]
    if wanted == {"en"}:
        recog = gen2["english_g2"]
    else:
        special = [
            ("th", gen1["thai_g1"]),
            ("ch_tra", gen1["zh_tra_g1"]),
            ("ch_sim", gen2["zh_sim_g2"]),
            ("ja", gen2["japanese_g2"]),
            ("ko", gen2["korean_g2"]),
            ("ta", gen1["tamil_g1"]),
            ("te", gen2["telugu_g2"]),
            ("kn", gen2["kannada_g2"]),
        ]
        families = [
            (config.bengali_lang_list, gen1["bengali_g1"]),
            (config.arabic_lang_list, gen1["arabic_g1"]),
            (config.devanagari_lang_list, gen1["devanagari_g1"]),
            (config.cyrillic_lang_list, gen2["cyrillic_g2"]),
        ]
        recog = next((model for code, model in special if code in wanted), None)
        if recog is None:
            recog = next((model for codes, model in families if wanted & set(codes)), gen2["latin_g2"])
    return (config.detection_models["craft"]["filename"], recog["filename"])


def easyocr_candidate_dirs(model_path: str = "", model_dir: str = "") -> list[Path]:
    """Return the folders searched for EasyOCR weights, in order."""
    if model_path:
        return [Path(model_path)]
    dirs = [Path(model_dir)] if model_dir else []
    if importlib.util.find_spec("easyocr_en_models") is not None:
        import easyocr_en_models

        dirs.append(Path(easyocr_en_models.model_dir()))
    config = _easyocr_config()
    if config is not None:
        dirs.append(Path(config.MODULE_PATH) / "model")
    return dirs


def resolve_easyocr_dir(langs: Sequence[str], model_path: str = "", model_dir: str = "") -> Path | None:
    """Return the first folder that holds every weight file the languages need."""
    files = easyocr_required_files(langs)
    if not files:
        return None
    for folder in easyocr_candidate_dirs(model_path, model_dir):
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def resolve_tessdata(langs: Sequence[str], model_path: str = "", tessdata_dir: str = "") -> Path | None:
    """Return the first tessdata folder with every language's traineddata."""
    names = [tesseract_lang(lang) for lang in langs] or ["eng"]
    candidates = [model_path] if model_path else [tessdata_dir, *TESSDATA_CANDIDATES]
    for folder in (Path(c) for c in candidates if c):
        if all((folder / f"{name}.traineddata").is_file() for name in names):
            return folder
    return None


# ---- engines ----


class EasyOCREngine:
    """EasyOCR with batched CRAFT detection and bucketed, batched CRNN recognition."""

    def __init__(self, langs: Sequence[str], model_dir: Path, device: str) -> None:
        """Build the Reader from local weights only (download_enabled=False)."""
        import easyocr
        import easyocr.easyocr as easyocr_module
        import torch

        gpu: bool | str = device if device.startswith("cuda") else False
        self.reader = easyocr.Reader(
            list(langs) or ["en"],
            gpu=gpu,
            model_storage_directory=str(model_dir),
            download_enabled=False,
            verbose=False,
        )
        self.device = self.reader.device
        if self.device != "cpu":
            # Reader wraps both nets in DataParallel over every visible GPU; a server worker owns one device.
            for attr in ("detector", "recognizer"):
                net = getattr(self.reader, attr)
                if isinstance(net, torch.nn.DataParallel):
                    setattr(self.reader, attr, net.module.to(self.device))
        self.img_h = int(easyocr_module.imgH)
        character = self.reader.character
        ignore = set(character) - set(self.reader.lang_char)
        self.ignore_idx = [character.index(ch) + 1 for ch in ignore if ch in character]
        self.rtl = self.reader.model_lang == "arabic"
        self.files = [Path(model_dir) / name for name in easyocr_required_files(langs)]

    # -- recognition --
    def _predict(
        self, crops: list[np.ndarray], img_w: int, adjust_contrast: float
    ) -> list[tuple[str, float]]:
        from easyocr.recognition import AlignCollate, recognizer_predict
        from PIL import Image

        collate = AlignCollate(
            imgH=self.img_h, imgW=img_w, keep_ratio_with_pad=True, adjust_contrast=adjust_contrast
        )
        chunk = max(1, min(256, _MAX_BATCH_FLOATS // (self.img_h * img_w)))
        pils = [Image.fromarray(crop, "L") for crop in crops]
        batches = [collate(pils[k : k + chunk]) for k in range(0, len(pils), chunk)]
        out = recognizer_predict(
            self.reader.recognizer,
            self.reader.converter,
            batches,
            int(img_w / 10),
            self.ignore_idx,
            {},
            "greedy",
            5,
            device=self.device,
        )
        return [(str(text), float(conf)) for text, conf in out]

    def _bucket(self, crop: np.ndarray) -> int:
        h, w = crop.shape[:2]
        ratio = max(w / max(1, h), h / max(1, w))
        units = max(1, math.ceil(ratio))
        if self.device == "cpu":
            # Exact widths: the CPU pays for padding, and this matches EasyOCR's own per-line path.
            return units
        # Fewer, wider buckets on the GPU: one call per power of two of the width.
        return 1 << (units - 1).bit_length()

    def recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Recognise grey crops already resized to the model height; batch by width bucket."""
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        buckets: dict[int, list[int]] = {}
        for index, crop in enumerate(crops):
            buckets.setdefault(self._bucket(crop), []).append(index)
        for units, indices in sorted(buckets.items()):
            img_w = units * self.img_h
            group = [crops[i] for i in indices]
            first = self._predict(group, img_w, 0.0)
            # EasyOCR's second round: retry low-confidence crops with contrast stretched, keep the better.
            low = [k for k, (_, conf) in enumerate(first) if conf < _CONTRAST_THS]
            if low:
                second = self._predict([group[k] for k in low], img_w, _ADJUST_CONTRAST)
                for k, retry in zip(low, second, strict=True):
                    if retry[1] >= first[k][1]:
                        first[k] = retry
            for i, result in zip(indices, first, strict=True):
                results[i] = result
        if self.rtl:
            from bidi import get_display

            results = [(get_display(text), conf) for text, conf in results]
        return results

    def _resize(self, grey: np.ndarray) -> np.ndarray:
        from easyocr.utils import compute_ratio_and_resize

        h, w = grey.shape[:2]
        resized, _ = compute_ratio_and_resize(grey, w, h, self.img_h)
        return np.ascontiguousarray(resized)

    # -- pages --
    def detect(
        self, images: Sequence[np.ndarray], max_waste: float | None = None
    ) -> list[tuple[list[Any], list[Any]]]:
        """Return EasyOCR's (horizontal boxes, free quads) per RGB image, batching near-equal sizes."""
        if max_waste is None:
            # A GPU runs a padded batch in about the time of one image; a CPU pays for every padded pixel.
            max_waste = 0.0 if self.device == "cpu" else _PAD_WASTE
        found: list[tuple[list[Any], list[Any]]] = [([], [])] * len(images)
        for group in plan_detection_groups([im.shape[:2] for im in images], max_waste=max_waste):
            height = max(images[i].shape[0] for i in group)
            width = max(images[i].shape[1] for i in group)
            if len(group) == 1:
                batch: np.ndarray = images[group[0]]
            else:
                batch = np.stack([pad_to(images[i], height, width) for i in group])
            horizontal, free = self.reader.detect(batch, reformat=False, **_DETECT_KW)
            for i, h_list, f_list in zip(group, horizontal, free, strict=True):
                found[i] = (h_list, f_list)
        return found

    def read_pages(self, images: Sequence[np.ndarray]) -> list[list[Line]]:
        """Return the text lines of each RGB page, in reading order; all crops recognised together."""
        from easyocr.utils import get_image_list

        boxes = self.detect(images)
        owners: list[int] = []
        quads: list[np.ndarray] = []
        crops: list[np.ndarray] = []
        for index, (image, (h_list, f_list)) in enumerate(zip(images, boxes, strict=True)):
            if not h_list and not f_list:
                continue
            grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            image_list, _ = get_image_list(h_list, f_list, grey, model_height=self.img_h, sort_output=False)
            for box, crop in image_list:
                owners.append(index)
                quads.append(np.asarray(box, dtype=np.float64).reshape(4, 2))
                crops.append(np.ascontiguousarray(crop))
        pages: list[list[Line]] = [[] for _ in images]
        for owner, quad, (text, conf) in zip(owners, quads, self.recognize(crops), strict=True):
            if text.strip():
                pages[owner].append(Line(quad, text.strip(), conf))
        return [merge_fragments(lines) for lines in pages]

    def read_region(self, crop_rgb: np.ndarray) -> tuple[str, float]:
        """Return the text of one drawn region (several lines joined by newlines) and its confidence."""
        grey = cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2GRAY)
        pieces = [tighten(grey[start:end]) for start, end in text_bands(grey)]
        if not pieces:
            return "", 0.0
        results = [(text.strip(), conf) for text, conf in self.recognize([self._resize(p) for p in pieces])]
        kept = [(text, conf) for text, conf in results if text]
        if not kept:
            return "", 0.0
        return "\n".join(text for text, _ in kept), float(np.mean([conf for _, conf in kept]))

    def close(self) -> None:
        """Release nothing: torch frees the nets with the object."""


class TesseractEngine:
    """Tesseract via tesserocr: one API per worker thread (tesserocr releases the GIL while recognising)."""

    def __init__(self, langs: Sequence[str], tessdata: Path, threads: int = 1) -> None:
        """Create the per-thread APIs (page segmentation) and one region API (single block)."""
        from tesserocr import PSM, PyTessBaseAPI

        self.lang = "+".join(tesseract_lang(lang) for lang in langs) or "eng"
        self.tessdata = tessdata
        self.threads = max(1, threads)
        self._apis: queue.Queue[Any] = queue.Queue()
        for _ in range(self.threads):
            self._apis.put(PyTessBaseAPI(path=str(tessdata), lang=self.lang, psm=PSM.AUTO))
        self._region_api = PyTessBaseAPI(path=str(tessdata), lang=self.lang, psm=PSM.SINGLE_BLOCK)
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="tesseract") if self.threads > 1 else None
        )
        self.files = [tessdata / f"{name}.traineddata" for name in self.lang.split("+")]

    @staticmethod
    def _set_image(api: Any, image: np.ndarray) -> None:
        # Raw bytes, not a PIL image: PIL objects shared across threads crashed tesserocr in testing.
        rgb = np.ascontiguousarray(image)
        height, width = rgb.shape[:2]
        api.SetImageBytes(rgb.tobytes(), width, height, 3, 3 * width)

    def _read_page(self, image: np.ndarray) -> list[Line]:
        from tesserocr import RIL, iterate_level

        api = self._apis.get()
        try:
            self._set_image(api, image)
            api.Recognize()
            lines = []
            iterator = api.GetIterator()
            if iterator is None:
                return []
            for result in iterate_level(iterator, RIL.TEXTLINE):
                if result.Empty(RIL.TEXTLINE):
                    continue
                text = (result.GetUTF8Text(RIL.TEXTLINE) or "").strip()
                bbox = result.BoundingBox(RIL.TEXTLINE)
                if not text or bbox is None:
                    continue
                conf = float(result.Confidence(RIL.TEXTLINE)) / 100.0
                lines.append(Line(box_quad(*bbox), " ".join(text.split()), min(1.0, max(0.0, conf))))
            return reading_order(lines)
        finally:
            api.Clear()
            self._apis.put(api)

    def read_pages(self, images: Sequence[np.ndarray]) -> list[list[Line]]:
        """Return the text lines of each RGB page, in reading order, pages in parallel threads."""
        if self._pool is None or len(images) == 1:
            return [self._read_page(image) for image in images]
        return list(self._pool.map(self._read_page, images))

    def read_region(self, crop_rgb: np.ndarray) -> tuple[str, float]:
        """Return the text of one drawn region (lines joined by newlines) and its confidence."""
        api = self._region_api
        try:
            self._set_image(api, pad_border(crop_rgb, max(2, crop_rgb.shape[0] // 10)))
            text = api.GetUTF8Text() or ""
            conf = float(api.MeanTextConf()) / 100.0
        finally:
            api.Clear()
        lines = [" ".join(line.split()) for line in text.splitlines()]
        joined = "\n".join(line for line in lines if line)
        return joined, (min(1.0, max(0.0, conf)) if joined else 0.0)

    def close(self) -> None:
        """End every Tesseract API and stop the thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        apis: Iterable[Any] = [self._apis.get_nowait() for _ in range(self._apis.qsize())]
        for api in [*apis, self._region_api]:
            api.End()
