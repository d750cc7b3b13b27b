"""Image decode for a model's working size: full decode + resize vs the reduced JPEG decode, side by side.

Run: `python -m bench.bench_decode [--repeat N]`. For phone-sized photos (12 MP JPEG, EXIF-rotated)
and a 640x480 JPEG, served by a local HTTP server, it times the data resolver's load_image followed
by the backend's preprocess (what the thread pool does per task), without and with the model's
shrink hint, for the default detector (Faster R-CNN, 800-pixel short side), SSDlite (320) and image
classification (232). The download cache is off, so every call fetches and decodes.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from bench.bench_e2e import serve_files
from serving.contract import Backend, Item, ModelSpec, ObjectTag
from serving.fetch.decode import ORIGINAL_SIZE
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import DataResolver
from serving.settings import Settings

log = logging.getLogger("bench_decode")


class SizeOnly:
    """Stands in for a torchvision detector: only its transform's sizes matter to preprocess."""

    def __init__(self, min_size: int, max_size: int, fixed: tuple[int, int] | None = None) -> None:
        self.transform = type("T", (), {"min_size": (min_size,), "max_size": max_size, "fixed_size": fixed})()


def photo(width: int, height: int, orientation: int = 1) -> bytes:
    """Return a photo-like JPEG (gradients and sensor noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def backends() -> dict[str, Backend]:
    """Return backends whose preprocess is real, with models reduced to their input sizes."""
    settings = Settings(model_dir=tempfile.mkdtemp())
    frcnn = DetectionBackend(ModelSpec("detection", "fasterrcnn_resnet50_fpn_v2"), settings)
    frcnn.model = SizeOnly(800, 1333)
    ssd = DetectionBackend(ModelSpec("detection", "ssdlite320_mobilenet_v3_large"), settings)
    ssd.model = SizeOnly(320, 320, fixed=(320, 320))
    cls = ClassificationBackend(ModelSpec("image_classification", "resnet50"), settings)
    cls.resize_size, cls.crop_size, cls.interpolation = 232, 224, "bilinear"
    return {"Faster R-CNN (800)": frcnn, "SSDlite (320)": ssd, "ResNet-50 (232)": cls}


def best(fn: Any, repeat: int) -> float:
    """Return the fastest of `repeat` calls, in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main(argv: list[str] | None = None) -> int:
    """Print, per image and model, full vs reduced decode+preprocess times and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings(model_dir=tempfile.mkdtemp(), cache_max_bytes=0)
    resolver = DataResolver(settings, LabelStudioClient(settings))
    obj = ObjectTag("image", "Image", "image")
    files = {"photo.jpg": photo(4032, 3024, 6), "small.jpg": photo(640, 480)}
    server, port, _ = serve_files(files)
    base = f"http://127.0.0.1:{port}"
    images = {"12 MP photo, EXIF 6": f"{base}/photo.jpg", "640x480 JPEG": f"{base}/small.jpg"}
    log.info(
        "%-20s %-20s %10s %10s %8s %s", "image", "model", "full ms", "reduced ms", "speed-up", "decoded at"
    )
    for image_name, url in images.items():
        for model_name, backend in backends().items():

            def full(url: str = url, backend: Backend = backend) -> Any:
                return backend.preprocess(Item(task={}, obj=obj, image=resolver.load_image(url)))

            def reduced(url: str = url, backend: Backend = backend) -> Any:
                image = resolver.load_image(url, shrink=backend.input_scale)
                item = Item(task={}, obj=obj, image=image, original_size=image.info.get(ORIGINAL_SIZE))
                return backend.preprocess(item)

            a, b = full(), reduced()
            shape_a = tuple(getattr(a, "tensor", a).shape)
            shape_b = tuple(getattr(b, "tensor", b).shape)
            if shape_a != shape_b:
                log.error("model inputs differ: %s vs %s", shape_a, shape_b)
                return 1
            t_full, t_reduced = best(full, args.repeat), best(reduced, args.repeat)
            decoded = resolver.load_image(url, shrink=backend.input_scale).size
            log.info(
                "%-20s %-20s %10.1f %10.1f %7.2fx %s",
                image_name,
                model_name,
                t_full,
                t_reduced,
                t_full / t_reduced,
                f"{decoded[0]}x{decoded[1]}",
            )
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
