"""The one audio decoder: every format to mono float32 at the model's rate, limits, bad files as InputError."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import InputError
from serving.fetch.audio import decode_audio
from serving.fetch.cache import Fetched
from serving.fetch.local import LocalFileResolver
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import DataResolver
from serving.settings import Settings
from tests.backends._audio_support import FORMATS, encode, silence, tone, wav_bytes


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / samples.shape[0])


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_format_decodes_to_the_model_rate(kind: str) -> None:
    """A 440 Hz tone at 22.05 kHz comes back at 16 kHz, mono float32, 440 Hz, about 2 s long."""
    audio = decode_audio(Fetched(encode(tone(440, 2.0, 22050), 22050, kind), "", None, kind), 16000)
    assert audio.sample_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    # AAC adds up to ~2 frames of priming; the others are exact to a frame
    assert 2.0 <= audio.duration < 2.1
    assert abs(_peak_hz(audio.samples, 16000) - 440.0) < 1.0
    assert 0.45 < float(np.abs(audio.samples).max()) <= 1.0


def test_resamples_up_for_a_48khz_model() -> None:
    """The same file decodes at 48 kHz for CLAP: three times the samples, same tone."""
    body = wav_bytes(tone(1000, 1.0, 16000), 16000)
    audio = decode_audio(Fetched(body, "audio/wav", None, "a.wav"), 48000)
    assert audio.samples.shape[0] == 48000
    assert abs(_peak_hz(audio.samples, 48000) - 1000.0) < 1.5


def test_stereo_is_mixed_to_mono() -> None:
    """Two channels become one (the mean): left tone + right silence halves the amplitude."""
    import av

    rate = 16000
    left = tone(500, 1.0, rate, amplitude=0.8)
    stereo = np.stack([left, np.zeros_like(left)])
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(
            (stereo * 32767).astype(np.int16).T.reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    audio = decode_audio(Fetched(buf.getvalue(), "audio/wav", None, "s.wav"), rate)
    assert audio.samples.shape[0] == rate
    peak = float(np.abs(audio.samples).max())
    assert 0.35 < peak < 0.6  # FFmpeg's downmix of L+R, not the left channel alone


def test_duration_cap_refuses_long_audio() -> None:
    """MAX_AUDIO_SECONDS: a 5 s file is refused under a 3 s cap and decodes under a 6 s cap."""
    body = wav_bytes(silence(5.0))
    with pytest.raises(InputError, match="MAX_AUDIO_SECONDS=3"):
        decode_audio(Fetched(body, "", None, "long.wav"), 16000, max_seconds=3.0)
    assert decode_audio(Fetched(body, "", None, "long.wav"), 16000, max_seconds=6.0).duration == 5.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>login</body></html>", "HTML page"),
        (b"\x00\x01garbage bytes that are no audio at all" * 10, "cannot decode the audio"),
    ],
)
def test_bad_bytes_are_input_errors(body: bytes, message: str) -> None:
    """Empty, HTML and garbage bodies fail the task with a reason."""
    with pytest.raises(InputError, match=message):
        decode_audio(Fetched(body, "", None, "bad"), 16000)


def test_truncated_and_non_audio_files_are_refused() -> None:
    """A PNG is not an audio container; a wav cut after its header holds no samples."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with pytest.raises(InputError, match=r"not a supported audio container|cannot decode"):
        decode_audio(Fetched(png.getvalue(), "image/png", None, "x.png"), 16000)
    with pytest.raises(InputError, match=r"no audio samples|cannot decode"):
        decode_audio(Fetched(wav_bytes(tone(440, 1.0))[:44], "", None, "cut.wav"), 16000)


def test_data_resolver_decodes_a_data_uri() -> None:
    """The network resolver decodes data: URIs (and every download) through the same decoder."""
    body = encode(tone(300, 1.0), 16000, "flac")
    uri = "data:audio/flac;base64," + base64.b64encode(body).decode()
    resolver = DataResolver(Settings(cache_max_bytes=0), LabelStudioClient(Settings()))
    audio = resolver.load_audio(uri, sample_rate=16000)
    assert audio.samples.shape[0] == 16000
    assert abs(_peak_hz(audio.samples, 16000) - 300.0) < 1.0
    small = DataResolver(Settings(cache_max_bytes=0, max_download_bytes=100), LabelStudioClient(Settings()))
    with pytest.raises(InputError, match="MAX_DOWNLOAD_BYTES"):
        small.load_audio(uri)


def test_local_files_resolver_reads_file_uris(tmp_path: Path) -> None:
    """file:// audio under an allowed root decodes; the duration cap and the size limit apply."""
    path = tmp_path / "a.mp3"
    path.write_bytes(encode(tone(440, 3.0), 16000, "mp3"))
    resolver = LocalFileResolver([tmp_path], lambda: pytest.fail("no network"), Settings())
    assert resolver.load_audio(path.as_uri(), sample_rate=16000).duration == pytest.approx(3.0, abs=0.05)
    capped = LocalFileResolver([tmp_path], lambda: pytest.fail("no network"), Settings(max_audio_seconds=1.0))
    with pytest.raises(InputError, match="MAX_AUDIO_SECONDS"):
        capped.load_audio(path.as_uri())
    small = LocalFileResolver([tmp_path], lambda: pytest.fail("no network"), Settings(max_download_bytes=10))
    with pytest.raises(InputError, match="MAX_DOWNLOAD_BYTES"):
        small.load_audio(path.as_uri())
