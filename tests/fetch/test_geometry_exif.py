"""EXIF-rotated images: sizes and percent coordinates are those of the image as Label Studio shows it."""

from __future__ import annotations

import base64
import io

from PIL import Image

from serving.contract import ControlTag, LabelMap, ModelSpec, ObjectTag, Target
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import DataResolver
from serving.results import regions
from serving.settings import Settings


def exif_jpeg_data_uri(orientation: int) -> str:
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def resolver(tmp_path) -> DataResolver:
    settings = Settings(model_dir=str(tmp_path))
    return DataResolver(settings, LabelStudioClient(settings))


def test_orientation_6_is_transposed_and_percentages_follow_the_shown_image(tmp_path) -> None:
    image = resolver(tmp_path).load_image(exif_jpeg_data_uri(6))
    assert image.size == (32, 64)  # shown rotated 90 degrees clockwise
    r, _, b = image.getpixel((16, 8))
    assert r > 200 and b < 60  # the stored left (red) half is now on top
    r, _, b = image.getpixel((16, 56))
    assert b > 200 and r < 60
    target = Target(
        ControlTag("box", "RectangleLabels", "img", ("Car",)),
        ObjectTag("img", "Image", "image"),
        ModelSpec("f", "m"),
        LabelMap(["Car"]),
    )
    (item,) = regions.rectangle_items(target, (8, 16, 24, 48), image.size, 0.9, "Car")
    assert (item["original_width"], item["original_height"]) == (32, 64)
    assert item["value"] == {
        "x": 25.0,
        "y": 25.0,
        "width": 50.0,
        "height": 50.0,
        "rotation": 0,
        "rectanglelabels": ["Car"],
    }


def test_orientation_3_keeps_size_and_turns_the_image_upside_down(tmp_path) -> None:
    image = resolver(tmp_path).load_image(exif_jpeg_data_uri(3))
    assert image.size == (64, 32)
    r, _, b = image.getpixel((8, 16))
    assert b > 200 and r < 60  # the stored right (blue) half is now on the left
