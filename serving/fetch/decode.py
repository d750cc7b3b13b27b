"""Decoding fetched bytes: ONE image decoder and one text decoder for every path that reads task data.

`/predict`, batch jobs (a folder of images read as file:// URIs), the command line, the trainer and
every Ray actor decode images through `ImageDecoder.decode`, so the same bytes get the same verdict
everywhere: a format allow-list (no EPS, no exotic parsers), zero-size and pixel-count checks, a full
decode up front (a truncated file fails here, not inside a model), EXIF orientation applied (a broken
EXIF block is ignored, the pixels kept as stored), any mode converted to RGB (alpha on white, 16-bit
scaled, CMYK through its ICC profile), and a JPEG decoded smaller when its model shrinks it anyway.
"""

from __future__ import annotations

import codecs
import io
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from serving.errors import InputError
from serving.fetch.cache import Fetched

logger = logging.getLogger(__name__)

# Given an image's (width, height) as shown, the scale its model resizes it to (<= 1 means shrink).
Shrink = Callable[[tuple[int, int]], float]
# Formats Pillow may open: common raster formats only (no EPS, which would run Ghostscript, nor exotic parsers).
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "AVIF")


def _looks_like_html(body: bytes, content_type: str) -> bool:
    head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return content_type in {"text/html", "application/xhtml+xml"} or head.startswith(
        (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<script")
    )


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float single-channel images to 8-bit RGB (Pillow would clip)."""
    arr = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            gray = np.rint(values * 255.0)
        else:
            gray = np.rint((values - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(values)
    else:
        values = arr.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 65535:
            gray = (values + 128) // 257  # 16-bit full range -> 8-bit, rounded
        else:
            gray = (values - lo) * 255 // (hi - lo) if hi > lo else np.zeros_like(values)
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
            logger.debug("CMYK ICC conversion failed (%s); using the plain formula", exc)
    return im.convert("RGB")


# PIL image info key under which a shrunk decode keeps the original (EXIF-oriented) width and height.
ORIGINAL_SIZE = "lsml_original_size"
# EXIF orientations that swap width and height (transposed / rotated by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def draft_for_model(im: Image.Image, shrink: Shrink | None) -> tuple[int, int] | None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the model shrinks it at least that much anyway.

    `shrink` gives, for the image's (EXIF-oriented) size, the scale the model resizes it to; libjpeg's
    DCT scaling then skips most of the decode (a 12-megapixel photo for an 800-pixel detector decodes at
    half size, ~2x faster). Never below the model's size: the model still resizes from a larger image.
    Returns the original oriented size when the decode was reduced, else None.
    """
    if shrink is None or im.format not in ("JPEG", "MPO"):
        return None
    width, height = im.size
    try:
        swapped = im.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS
    except Exception:  # broken EXIF: orientation is ignored later too
        swapped = False
    oriented = (height, width) if swapped else (width, height)
    try:
        scale = float(shrink(oriented))
    except Exception:  # a hint only: decode in full rather than fail the task
        logger.debug("input_scale failed for a %dx%d image; decoding in full", *oriented, exc_info=True)
        return None
    if not 0 < scale <= 0.5:  # libjpeg's smallest step is 1/2
        return None
    im.draft(im.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
    return oriented if im.size != (width, height) else None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, 16-bit scaled, CMYK through its profile."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _high_depth_to_rgb(im)
    if mode == "P":
        return _composite_on_white(im) if "transparency" in im.info else im.convert("RGB")
    if mode in {"RGBA", "RGBa", "LA", "La", "PA"} or "transparency" in im.info:
        return _composite_on_white(im)
    return im.convert("RGB")


class ImageDecoder:
    """Bytes -> RGB image as Label Studio shows it; the only image decoder of the server (thread-safe)."""

    def __init__(self, max_pixels: int) -> None:
        """Decode with a MAX_IMAGE_PIXELS bound (0: none); sets Pillow's process-wide bomb limits to match."""
        self.max_pixels = max_pixels
        Image.init()  # registers every plugin, so Image.OPEN lists the formats this Pillow build has
        self.formats = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)
        # Pillow raises DecompressionBombError past 2x this and warns past 1x; decode() also checks explicitly.
        Image.MAX_IMAGE_PIXELS = max_pixels if max_pixels > 0 else None
        # Treat Pillow's bomb warning as an error process-wide (a thread-local catch_warnings does not exist).
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

    def decode(self, fetched: Fetched, shrink: Shrink | None = None) -> Image.Image:
        """Return the image in `fetched` as RGB, EXIF-transposed; InputError with the reason otherwise.

        With `shrink` (see draft_for_model) a JPEG may decode smaller; its info[ORIGINAL_SIZE] then
        holds the size Label Studio shows.
        """
        try:
            return self._decode(fetched, shrink)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"cannot decode the image from {fetched.source}: {type(exc).__name__}: {exc}"
            ) from None

    def _decode(self, fetched: Fetched, shrink: Shrink | None) -> Image.Image:
        body = fetched.body
        where = fetched.source
        if not body:
            raise InputError(f"{where} is empty (0 bytes), not an image")
        max_pixels = self.max_pixels
        try:
            im = Image.open(io.BytesIO(body), formats=self.formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image {where} is too large: {exc} (MAX_IMAGE_PIXELS={max_pixels})") from None
        except UnidentifiedImageError:
            raise self.not_an_image(fetched) from None
        except Exception as exc:
            raise InputError(f"cannot open the image from {where}: {type(exc).__name__}: {exc}") from None
        width, height = im.size
        if width <= 0 or height <= 0:
            raise InputError(f"image {where} has an empty size {width}x{height}")
        if max_pixels > 0 and width * height > max_pixels:
            raise InputError(
                f"image {where} is {width}x{height} = {width * height} pixels, over MAX_IMAGE_PIXELS={max_pixels}"
            )
        original = draft_for_model(im, shrink)
        try:
            im.load()  # decode fully now: a truncated file fails here, not later inside a model
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image {where} is too large: {exc}") from None
        except Exception as exc:
            raise InputError(f"image {where} is truncated or corrupt: {exc}") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an already decoded image
        except Exception as exc:  # broken EXIF: keep the pixels as stored
            logger.warning("Ignoring unreadable EXIF orientation of %s: %s", where, exc)
        try:
            rgb = to_rgb(im)
        except Exception as exc:
            raise InputError(f"cannot convert image {where} (mode {im.mode}) to RGB: {exc}") from None
        if original is not None:
            rgb.info[ORIGINAL_SIZE] = original
        return rgb

    @staticmethod
    def not_an_image(fetched: Fetched) -> InputError:
        """Return why bytes that Pillow cannot identify are not an image (an HTML login page, SVG, ...)."""
        body, where = fetched.body, fetched.source
        if _looks_like_html(body, fetched.content_type):
            if fetched.via_label_studio:
                return InputError(
                    f"Label Studio answered {where} with an HTML page (its login page?) instead of an image: "
                    "check LABEL_STUDIO_API_KEY"
                )
            return InputError(f"{where} returned an HTML page, not an image: check the URL")
        if body[:512].lstrip().lower().startswith((b"<svg", b"<?xml")):
            return InputError(f"{where} is SVG/XML; only raster images (JPEG, PNG, ...) are supported")
        kind = f" (Content-Type {fetched.content_type})" if fetched.content_type else ""
        return InputError(
            f"{where}{kind} is not an image this server can read; supported: {', '.join(IMAGE_FORMATS)}"
        )


# ---------------------------------------------------------------------------------------------- text

# Tie-break among equally plausible guesses: the most used legacy charsets first.
_COMMON_CHARSETS = (
    "cp1252",
    "latin_1",
    "iso8859_15",
    "cp1250",
    "cp1251",
    "gb18030",
    "cp932",
    "euc_kr",
    "big5",
)


def _detect_charset(body: bytes) -> tuple[str, str] | None:
    """Guess a legacy charset: most coherent language first, then least chaos, then the most common."""
    try:
        import charset_normalizer

        # BOM-less UTF-16/32 guesses are noise here (text with NUL bytes is refused before).
        matches = [
            m for m in charset_normalizer.from_bytes(body) if not m.encoding.startswith(("utf_16", "utf_32"))
        ]
    except Exception:  # a detector failure only means "unknown encoding"
        return None
    if not matches:
        return None

    # charset_normalizer's own best() ranks by chaos alone and picks e.g. mac_latin2 for French cp1252 text.
    def rank(m: Any) -> tuple[float, float, int]:
        common = (
            _COMMON_CHARSETS.index(m.encoding) if m.encoding in _COMMON_CHARSETS else len(_COMMON_CHARSETS)
        )
        return -round(m.coherence, 2), round(m.chaos, 2), common

    best = min(matches, key=rank)
    return best.encoding, str(best)


def decode_text(fetched: Fetched) -> str:
    """Decode downloaded text: BOM, then declared charset, then UTF-8, then a detected charset."""
    body = fetched.body
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if body.startswith(bom):
            try:
                return body.decode(encoding)
            except UnicodeDecodeError:
                break
    if fetched.charset:
        try:
            return body.decode(fetched.charset)
        except (LookupError, UnicodeDecodeError):
            logger.info("Text from %s is not valid %s as declared", fetched.source, fetched.charset)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    if b"\x00" in body:
        raise InputError(f"{fetched.source} is binary data, not text")
    best = _detect_charset(body)
    if best is not None:
        logger.info("Text from %s decoded as %s (detected)", fetched.source, best[0])
        return best[1]
    raise InputError(
        f"text from {fetched.source} is not valid UTF-8 (bad byte at offset {first_bad}) and its encoding "
        "could not be detected: save it as UTF-8 or send a charset in Content-Type"
    )


def scrub_surrogates(text: str) -> str:
    """Replace lone surrogates (possible in JSON strings) one for one, so character offsets stay valid."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
