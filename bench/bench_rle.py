"""Benchmark our brush RLE encoder against label_studio_sdk's mask2rle on 1920x1080 masks.

Run: `python -m bench.bench_rle [--repeat N]`. Prints, per mask kind, the best time of each encoder
(measured interleaved in one run), the speed-up ratio, and whether the bytes are identical; then the
instance path: 20 masks of one image encoded from their crops in one call, against mask2rle on each.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from serving.results.rle import crop_to_rle, crops_to_rle, mask_to_rle

log = logging.getLogger("bench_rle")

HEIGHT, WIDTH = 1080, 1920


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


def make_masks(seed: int = 0) -> dict[str, np.ndarray]:
    """Return the benchmark masks: one smooth object, a busy instance map, and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    blob = np.zeros((HEIGHT, WIDTH), np.uint8)
    blob[_ellipse(yy, xx, 500, 900, 300, 500)] = 255

    # Twenty objects with ragged (noisy) outlines, like a thresholded network mask at full resolution.
    objects = np.zeros((HEIGHT, WIDTH), np.uint8)
    for _ in range(20):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(30, 200), rng.uniform(30, 300)
        inside = _ellipse(yy, xx, cy, cx, ry, rx)
        edge = _ellipse(yy, xx, cy, cx, ry * 1.05, rx * 1.05) & ~inside
        objects[inside | (edge & (rng.random((HEIGHT, WIDTH)) < 0.5))] = 255

    noise = (rng.random((HEIGHT, WIDTH)) < 0.5).astype(np.uint8) * 255
    person = np.zeros((HEIGHT, WIDTH), np.uint8)
    person[_ellipse(yy, xx, 600, 1200, 250, 90)] = 255
    return {
        "single object": blob,
        "20 ragged objects": objects,
        "pixel noise": noise,
        "person (crop)": person,
    }


def make_instances(count: int = 20, seed: int = 1) -> list[np.ndarray]:
    """Return `count` full-size masks of one image, one elliptical object each, as Mask R-CNN gives them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(100, HEIGHT - 100), rng.uniform(100, WIDTH - 100)
        ry, rx = rng.uniform(20, 250), rng.uniform(20, 250)
        masks.append(_ellipse(yy, xx, cy, cx, ry, rx).astype(np.uint8) * np.uint8(255))
    return masks


def bounding_crop(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Return the crop of a mask to its non-zero pixels, and the crop's (x, y) offset."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1], (int(xs[0]), int(ys[0]))


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Return the fastest of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit non-zero when an encoding differs from the SDK's."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20, help="calls per encoder (noise: 1/5 of it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = True
    for name, mask in make_masks().items():
        # The instance backend encodes each object from its bounding-box crop: measure that path too.
        if name.endswith("(crop)"):
            encode = functools.partial(crop_to_rle, *bounding_crop(mask), (WIDTH, HEIGHT))
        else:
            encode = functools.partial(mask_to_rle, mask)
        ours_bytes = encode()
        sdk_bytes = mask2rle(mask)
        identical = ours_bytes == sdk_bytes
        ok &= identical
        runs = int(np.count_nonzero(mask.ravel()[1:] != mask.ravel()[:-1])) + 1
        repeat = args.repeat if runs < 100_000 else max(1, args.repeat // 5)
        # Interleave the two encoders so that machine load hits both alike.
        ours_s = sdk_s = float("inf")
        for _ in range(repeat):
            ours_s = min(ours_s, best_time(encode, 3))
            sdk_s = min(sdk_s, best_time(functools.partial(mask2rle, mask), 1))
        log.info(
            "%-18s runs=%-8d bytes=%-8d sdk=%9.2f ms  ours=%7.3f ms  speed-up=%6.1fx  identical=%s",
            name,
            runs,
            len(ours_bytes),
            sdk_s * 1e3,
            ours_s * 1e3,
            sdk_s / ours_s,
            identical,
        )
    # The instance path: all masks of one image from their crops in one call, against the SDK on
    # each full-size mask (what a per-object loop over mask2rle costs).
    instances = make_instances()
    crops = [bounding_crop(mask) for mask in instances]
    encode_all = functools.partial(crops_to_rle, crops, (WIDTH, HEIGHT))
    identical = encode_all() == [mask2rle(mask) for mask in instances]
    ok &= identical
    ours_s = sdk_s = float("inf")
    for _ in range(max(1, args.repeat // 4)):
        ours_s = min(ours_s, best_time(encode_all, 3))
        sdk_s = min(sdk_s, best_time(lambda: [mask2rle(mask) for mask in instances], 1))
    log.info(
        "%-18s masks=%-7d sdk=%9.2f ms  ours=%7.3f ms  speed-up=%6.1fx  identical=%s",
        "20 instances",
        len(instances),
        sdk_s * 1e3,
        ours_s * 1e3,
        sdk_s / ours_s,
        identical,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
