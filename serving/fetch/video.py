"""Decoding fetched bytes into video frames: ONE decoder (PyAV, FFmpeg's libraries) for every video path.

mp4, webm, mov, avi and mkv decode here into the sampled frames a video family works on, so `/predict`,
batch jobs and the command line give the same bytes the same verdict: a container allow-list (FFmpeg
probes hundreds of formats; only video containers are opened), a duration cap read from the header and
checked again while decoding, a cap on the frames kept (the sampling stride widens to fit it, so memory
stays bounded by VIDEO_MAX_FRAMES x VIDEO_FRAME_MAX_SIDE^2 x 3 bytes), a seek to each sampled frame when
it lies far ahead (a 1 fps sample of a 30 fps clip decodes from keyframes, not every frame), and every
FFmpeg error a clear per-task InputError.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from serving.errors import InputError
from serving.fetch.cache import Fetched

logger = logging.getLogger(__name__)

# FFmpeg demuxer names (a name may list aliases: "mov,mp4,m4a,3gp,3g2,mj2") that may be opened.
VIDEO_CONTAINERS = frozenset({"mov", "mp4", "m4v", "matroska", "webm", "avi"})
SUPPORTED = "mp4, webm, mov, avi, mkv"
# Seek instead of decoding forward when the next sampled frame is this many seconds ahead: below it,
# decoding the frames in between costs less than a seek (which restarts at the previous keyframe).
SEEK_AHEAD_S = 2.0


@dataclass(frozen=True)
class Sampling:
    """Which frames to keep: `fps` per second (0 = every frame), at most `max_frames`, sides <= `max_side`."""

    fps: float = 5.0
    max_frames: int = 300
    max_side: int = 1024
    max_seconds: float = 3600.0
    start_s: float = 0.0  # interactive tracking starts at the drawn frame
    spread: bool = (
        True  # False: the first max_frames frames from start_s (interactive tracking), not the clip
    )


@dataclass(frozen=True)
class Video:
    """Sampled frames of a video: RGB images, their 0-based frame indices and times in seconds."""

    frames: tuple[Image.Image, ...]
    indices: tuple[int, ...]
    times: tuple[float, ...]
    fps: float  # the stream's average frame rate
    frame_count: int  # frames in the stream (counted from the header, else duration x fps)
    duration: float  # seconds
    size: tuple[int, int]  # (width, height) of the stream as shown (frames may be smaller)


def _looks_like_html(body: bytes) -> bool:
    head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def decode_video(fetched: Fetched, sampling: Sampling) -> Video:
    """Return the sampled frames of `fetched`'s first video stream (InputError when it is not a video)."""
    where = fetched.source or "the video"
    if not fetched.body:
        raise InputError(f"{where} is empty (0 bytes)")
    if _looks_like_html(fetched.body):
        raise InputError(
            f"{where} returned an HTML page, not a video (a login page or an error page?): check the URL "
            "and LABEL_STUDIO_API_KEY"
        )
    try:
        return _decode(fetched.body, where, sampling)
    except InputError:
        raise
    except Exception as exc:  # FFmpeg errors (corrupt, truncated, unknown codec) are the task's problem
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot decode the video of {where}: {detail} (supported: {SUPPORTED})") from None


def sample_indices(frame_count: int, fps: float, sampling: Sampling) -> list[int]:
    """Return the 0-based frame indices to keep: every fps/sampling.fps-th from start_s, at most max_frames.

    With `spread` the stride widens so the max_frames cover the whole clip; without, the first ones are kept.
    """
    first = min(max(0, round(sampling.start_s * fps)), max(0, frame_count - 1))
    span = frame_count - first
    if span <= 0:
        return []
    step = 1.0 if sampling.fps <= 0 or sampling.fps >= fps else fps / sampling.fps
    if sampling.spread and sampling.max_frames > 0 and span / step > sampling.max_frames:
        step = span / sampling.max_frames  # widen the stride: the whole clip, fewer frames
    out: list[int] = []
    k = 0
    while True:
        index = first + math.floor(k * step + 1e-9)
        if index >= frame_count or (sampling.max_frames > 0 and len(out) >= sampling.max_frames):
            return out
        if not out or index != out[-1]:
            out.append(index)
        k += 1


def _stream_info(container: Any, stream: Any, where: str) -> tuple[float, float, int]:
    """Return (fps, duration s, frame count) from the header (InputError when the rate is unknown)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not fps or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"{where} declares no frame rate; re-encode it with a constant frame rate")
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    if duration <= 0 and container.duration is not None:
        duration = float(container.duration) / 1_000_000.0
    count = int(stream.frames or 0)
    if count <= 0:
        count = round(duration * fps)
    if duration <= 0:
        duration = count / fps
    return fps, duration, count


def _decode(body: bytes, where: str, sampling: Sampling) -> Video:
    import av

    with av.open(io.BytesIO(body), mode="r", metadata_errors="ignore") as container:
        names = {n.strip() for n in str(container.format.name).split(",")}
        if not names & VIDEO_CONTAINERS:
            raise InputError(
                f"{where} is a {container.format.name} file, not a supported video container ({SUPPORTED})"
            )
        if not container.streams.video:
            raise InputError(f"{where} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, duration, count = _stream_info(container, stream, where)
        if sampling.max_seconds > 0 and duration > sampling.max_seconds:
            raise InputError(
                f"{where} is {duration:.1f} s long, over MAX_VIDEO_SECONDS={sampling.max_seconds:g}"
            )
        size = (int(stream.codec_context.width), int(stream.codec_context.height))
        wanted = sample_indices(count, fps, sampling)
        frames, indices = _collect(container, stream, wanted, fps, sampling)
    if not frames:
        raise InputError(f"{where} holds no decodable video frames")
    times = tuple(i / fps for i in indices)
    return Video(tuple(frames), tuple(indices), times, fps, count, duration, size)


def _collect(
    container: Any, stream: Any, wanted: list[int], fps: float, sampling: Sampling
) -> tuple[list[Image.Image], list[int]]:
    """Decode the wanted frames in order, seeking when the next one is more than SEEK_AHEAD_S ahead."""
    base = float(stream.time_base)
    start = float(stream.start_time or 0) * base
    frames: list[Image.Image] = []
    indices: list[int] = []
    decoder: Iterator[Any] | None = None
    position = -1  # index of the last decoded frame
    for target in wanted:
        if decoder is None or target - position > SEEK_AHEAD_S * fps:
            if decoder is not None or target > SEEK_AHEAD_S * fps:
                # backward: land on the keyframe before the target and decode forward from it
                container.seek(int((start + target / fps) / base), stream=stream, backward=True)
            decoder = container.decode(stream)
        found = None
        for frame in decoder:
            position = round((frame.pts * base - start) * fps) if frame.pts is not None else position + 1
            if position >= target:
                found = frame
                break
        if found is None:
            break  # the stream ended early (a header that over-counts): keep what was decoded
        frames.append(_to_image(found, sampling.max_side))
        indices.append(target)
    return frames, indices


def _to_image(frame: Any, max_side: int) -> Image.Image:
    """Return the frame as an RGB image, shrunk so its longer side is at most max_side (aspect kept)."""
    width, height = int(frame.width), int(frame.height)
    longer = max(width, height)
    if max_side > 0 and longer > max_side:
        scale = max_side / longer
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        return frame.to_image(width=width, height=height)
    return frame.to_image()
