"""The one video decoder: containers, sampled frames (by seeking), caps, and bad files as InputError."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from serving.errors import InputError
from serving.fetch.cache import Fetched
from serving.fetch.local import LocalFileResolver
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import DataResolver
from serving.fetch.video import Sampling, decode_video, sample_indices
from serving.settings import Settings
from tests.support.video import Shape, color_boxes, make_clip, moving

RED = (230, 30, 30)
# a red square moving 4 px per frame: its x on frame i tells which frame was decoded
SHAPES = [Shape(RED, 0, 10_000, moving(0, 100, 40, 40, 4.0))]


def _x_of(frame: object) -> int:
    return color_boxes(np.asarray(frame), [RED])[0][0]


@pytest.mark.parametrize(
    ("container", "codec"),
    [
        ("mp4", "libx264"),
        ("webm", "libvpx-vp9"),
        ("matroska", "libx264"),
        ("mov", "libx264"),
        ("avi", "mpeg4"),
    ],
)
def test_every_container_decodes_the_sampled_frames(container: str, codec: str) -> None:
    """A 30-frame 10 fps clip sampled at 5 fps: frames 0, 2, ..., 28, each the frame it says it is."""
    body = make_clip(SHAPES, 30, fps=10, container=container, codec=codec)
    video = decode_video(Fetched(body, "", None, f"clip.{container}"), Sampling(fps=5.0))
    assert video.fps == pytest.approx(10.0)
    assert video.frame_count == 30
    assert video.duration == pytest.approx(3.0, abs=0.11)
    assert video.size == (320, 240)
    assert video.indices == tuple(range(0, 30, 2))
    assert video.times == pytest.approx([i / 10 for i in range(0, 30, 2)])
    assert [_x_of(f) for f in video.frames] == pytest.approx([4 * i for i in video.indices], abs=2)


def test_sparse_sampling_seeks_to_each_frame() -> None:
    """0.25 fps of a 30 fps clip with keyframes every 15 frames: frames 0, 120, 240, decoded after seeks."""
    slow = [Shape(RED, 0, 10_000, moving(0, 40, 40, 40, 1.0))]
    body = make_clip(slow, 300, fps=30, size=(352, 128), gop=15)
    video = decode_video(Fetched(body, "", None, "long.mp4"), Sampling(fps=0.25))
    assert video.indices == (0, 120, 240)
    assert [_x_of(f) for f in video.frames] == pytest.approx([0, 120, 240], abs=2)
    late = decode_video(Fetched(body, "", None, "long.mp4"), Sampling(fps=0.25, start_s=5.0))
    assert late.indices == (150, 270)
    assert [_x_of(f) for f in late.frames] == pytest.approx([150, 270], abs=2)


def test_sample_indices_cover_the_clip_within_the_frame_cap() -> None:
    """The stride widens to keep at most max_frames, still spread over the whole clip."""
    assert sample_indices(30, 10.0, Sampling(fps=0)) == list(range(30))
    assert sample_indices(30, 10.0, Sampling(fps=20.0)) == list(range(30))
    assert sample_indices(1000, 25.0, Sampling(fps=5.0, max_frames=10)) == list(range(0, 1000, 100))
    assert sample_indices(7, 30.0, Sampling(fps=30.0, start_s=1.0)) == [6]
    assert sample_indices(1000, 25.0, Sampling(fps=0, max_frames=4, start_s=2.0, spread=False)) == [
        50,
        51,
        52,
        53,
    ]


def test_frames_are_shrunk_to_the_max_side() -> None:
    """A 640x480 clip with VIDEO_FRAME_MAX_SIDE=320 gives 320x240 frames; the size stays the stream's."""
    body = make_clip(SHAPES, 4, fps=10, size=(640, 480))
    video = decode_video(Fetched(body, "", None, "a.mp4"), Sampling(fps=0, max_side=320))
    assert {f.size for f in video.frames} == {(320, 240)}
    assert video.size == (640, 480)


def test_caps_refuse_long_videos() -> None:
    """MAX_VIDEO_SECONDS is read from the header: nothing is decoded for a refused clip."""
    body = make_clip(SHAPES, 40, fps=10)
    with pytest.raises(InputError, match="MAX_VIDEO_SECONDS"):
        decode_video(Fetched(body, "", None, "a.mp4"), Sampling(max_seconds=2.0))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html>login</html>", "HTML page"),
        (b"\x00\x01garbage" * 50, "cannot decode"),
    ],
)
def test_bad_bytes_are_input_errors(body: bytes, message: str) -> None:
    """Empty, HTML and garbage bodies are per-task InputErrors that say what is wrong."""
    with pytest.raises(InputError, match=message):
        decode_video(Fetched(body, "", None, "x.mp4"), Sampling())


def test_truncated_audio_only_and_image_files_are_refused() -> None:
    """A cut-off mp4, a wav and a PNG fail with a clear reason, never an FFmpeg exception."""
    from tests.backends._audio_support import tone, wav_bytes

    body = make_clip(SHAPES, 30, fps=10)
    with pytest.raises(InputError, match=r"cannot decode|no decodable"):
        decode_video(Fetched(body[: len(body) // 3], "", None, "cut.mp4"), Sampling())
    with pytest.raises(InputError, match="not a supported video container"):
        decode_video(Fetched(wav_bytes(tone(440, 1.0)), "", None, "a.wav"), Sampling())
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(InputError, match=r"not a supported video container|cannot decode"):
        decode_video(Fetched(png.getvalue(), "", None, "x.png"), Sampling())


def test_resolvers_decode_data_uris_and_file_uris(tmp_path: Path) -> None:
    """Downloads and file:// go through the same decoder with the VIDEO_* settings; the size limit applies."""
    body = make_clip(SHAPES, 20, fps=10)
    uri = "data:video/mp4;base64," + base64.b64encode(body).decode()
    settings = Settings(cache_max_bytes=0, video_sample_fps=2.0)
    video = DataResolver(settings, LabelStudioClient(settings)).load_video(uri)
    assert video.indices == (0, 5, 10, 15)
    path = tmp_path / "clip.mp4"
    path.write_bytes(body)
    local = LocalFileResolver([tmp_path], lambda: pytest.fail("no network"), Settings(video_max_frames=3))
    assert local.load_video(path.as_uri()).indices == (0, 6, 13)
    small = LocalFileResolver([tmp_path], lambda: pytest.fail("no network"), Settings(max_download_bytes=10))
    with pytest.raises(InputError, match="MAX_DOWNLOAD_BYTES"):
        small.load_video(path.as_uri())
