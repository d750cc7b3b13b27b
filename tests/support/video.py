"""Video clips made by the tests with PyAV: solid rectangles that move, appear and disappear, known frame rate."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)


@dataclass(frozen=True)
class Shape:
    """A solid rectangle of one colour, present on frames [first, last], its box per frame index."""

    color: tuple[int, int, int]
    first: int
    last: int
    box: Callable[[int], Box]

    def at(self, index: int) -> Box | None:
        """Return the box on 0-based frame `index`, None when the shape is not on it."""
        return self.box(index) if self.first <= index <= self.last else None


def moving(x0: int, y0: int, w: int, h: int, dx: float, dy: float = 0.0) -> Callable[[int], Box]:
    """Return a box of size w x h starting at (x0, y0), moving (dx, dy) pixels per frame (even pixels)."""

    def box(i: int) -> Box:
        x = round((x0 + dx * i) / 2.0) * 2
        y = round((y0 + dy * i) / 2.0) * 2
        return x, y, x + w, y + h

    return box


def render(shapes: Sequence[Shape], index: int, size: tuple[int, int]) -> np.ndarray:
    """Return frame `index` as an RGB array: grey background, the shapes in order (later ones on top)."""
    width, height = size
    image = np.full((height, width, 3), 96, dtype=np.uint8)
    for shape in shapes:
        box = shape.at(index)
        if box is None:
            continue
        x0, y0, x1, y1 = (max(0, v) for v in box)
        image[y0 : min(y1, height), x0 : min(x1, width)] = shape.color
    return image


def make_clip(
    shapes: Sequence[Shape],
    frames: int,
    fps: int = 10,
    size: tuple[int, int] = (320, 240),
    container: str = "mp4",
    codec: str = "libx264",
    gop: int = 0,
) -> bytes:
    """Return an encoded clip of `frames` frames at `fps` (near-lossless, so colours survive)."""
    out = io.BytesIO()
    with av_open(out, container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "4", "preset": "ultrafast"}
        else:
            stream.options = {"crf": "4", "b": "0"} if "vpx" in codec else {}
        if gop:
            stream.gop_size = gop
        import av

        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(render(shapes, i, size), format="rgb24")
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return out.getvalue()


def av_open(out: io.BytesIO, container: str) -> object:
    """Open an in-memory output container of a format (mp4, webm, matroska, avi, mov)."""
    import av

    return av.open(out, mode="w", format=container)


def color_boxes(image: np.ndarray, colors: Sequence[tuple[int, int, int]], tol: int = 40) -> dict[int, Box]:
    """Return {colour index: bounding box} of the pixels near each colour (what a planted detector sees)."""
    found: dict[int, Box] = {}
    pixels = image.astype(np.int16)
    for k, color in enumerate(colors):
        mask = (np.abs(pixels - np.array(color, dtype=np.int16)) <= tol).all(axis=2)
        if mask.sum() < 16:
            continue
        ys, xs = np.nonzero(mask)
        found[k] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return found
