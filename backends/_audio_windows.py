"""Sliding windows over audio: window spans, CLAP's log-mel computed once per file, events merged from windows.

Pure numpy (torch only inside `log_mel`), shared by the audio classification family: a window's
scores become per-label time regions by averaging the scores of the windows that cover each stretch
between window boundaries, then joining consecutive stretches at or above the threshold.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DB_FLOOR = -100.0  # 10 * log10(1e-10): the log-mel of silence (the feature extractor's mel floor)


@dataclass(frozen=True)
class Event:
    """One merged region: the label's index, seconds from the file's start, the mean score over it."""

    label: int
    start: float
    end: float
    score: float


def window_spans(duration: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """Return (start, end) of windows every `hop_s` seconds, all `window_s` long, the last ending at the end.

    A file no longer than a window is one window; the last window is moved back so that it ends at
    the file's end (every window then has the same length, so a batch has one shape).
    """
    if duration <= 0:
        return []
    if duration <= window_s:
        return [(0.0, duration)]
    count = math.ceil((duration - window_s) / hop_s)
    starts = [round(k * hop_s, 6) for k in range(count)]
    last = round(duration - window_s, 6)
    if not starts or last > starts[-1]:
        starts.append(last)
    return [(s, round(s + window_s, 6)) for s in starts]


def merge_events(
    spans: list[tuple[float, float]], scores: np.ndarray, threshold: float, min_s: float = 0.0
) -> list[Event]:
    """Turn per-window scores (windows, labels) into per-label regions, sorted by start then label.

    Each stretch between consecutive window boundaries scores the mean of the windows covering it;
    consecutive stretches at or above `threshold` join into one region scored by their length-weighted
    mean. Regions shorter than `min_s` are dropped.
    """
    if not spans or scores.size == 0:
        return []
    scores = np.asarray(scores, dtype=np.float64).reshape(len(spans), -1)
    bounds = sorted({t for span in spans for t in span})
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    out: list[Event] = []
    for label in range(scores.shape[1]):
        run: list[tuple[float, float, float]] = []  # (start, end, score) of the stretches in a run
        for lo, hi in itertools.pairwise(bounds):
            covering = (starts <= lo) & (ends >= hi)
            value = float(scores[covering, label].mean()) if covering.any() else 0.0
            if value >= threshold:
                run.append((lo, hi, value))
                continue
            out += _close(run, label, min_s)
            run = []
        out += _close(run, label, min_s)
    return sorted(out, key=lambda e: (e.start, e.label))


def frame_runs(probs: np.ndarray, frame_s: float, threshold: float, min_gap_s: float = 0.0) -> list[Event]:
    """Turn per-frame probabilities (frames, classes) into runs at or above the threshold, in seconds.

    Runs of one class closer than `min_gap_s` are joined (a breath does not end a turn); a run scores
    the mean probability of its frames above the threshold. Linear in the frames (an hour at 10 ms is
    360 000 of them).
    """
    out: list[Event] = []
    active = np.asarray(probs) >= threshold
    gap = max(round(min_gap_s / frame_s), 0) if frame_s > 0 else 0
    for label in range(active.shape[1]):
        on = np.flatnonzero(active[:, label])
        if not on.size:
            continue
        breaks = np.flatnonzero(np.diff(on) > gap + 1)
        for first, last in zip(np.r_[0, breaks + 1], np.r_[breaks, on.size - 1], strict=True):
            lo, hi = int(on[first]), int(on[last]) + 1
            score = float(np.mean(probs[lo:hi, label][active[lo:hi, label]]))
            out.append(Event(label, round(lo * frame_s, 3), round(hi * frame_s, 3), score))
    return sorted(out, key=lambda e: (e.start, e.label))


def _close(run: list[tuple[float, float, float]], label: int, min_s: float) -> list[Event]:
    if not run:
        return []
    start, end = run[0][0], run[-1][1]
    if end - start < min_s or end <= start:
        return []
    total = sum((hi - lo) * v for lo, hi, v in run)
    return [Event(label, round(start, 3), round(end, 3), total / (end - start))]


def window_rms_db(samples: np.ndarray, rate: int, spans: list[tuple[float, float]]) -> np.ndarray:
    """Return each window's RMS level in dBFS (-inf for digital silence)."""
    out = np.empty(len(spans))
    for k, (start, end) in enumerate(spans):
        piece = samples[round(start * rate) : max(round(end * rate), round(start * rate) + 1)]
        rms = float(np.sqrt(np.mean(np.square(piece, dtype=np.float64)))) if piece.size else 0.0
        out[k] = 20.0 * math.log10(rms) if rms > 0 else -math.inf
    return out


def log_mel(samples: np.ndarray, extractor: Any, block_frames: int = 6000) -> np.ndarray:
    """Return CLAP's log-mel spectrogram of a whole file, (frames, mel bins) float32, as its extractor computes it.

    The same Hann-windowed power STFT (centred, reflect-padded), mel filter bank (the extractor's
    HTK bank for fusion models, its Slaney bank otherwise) and dB scale, in float32 torch: once per
    file instead of once per window (10 min at 48 kHz in 3.3 s on 2 shared cores; the extractor's numpy
    STFT takes ~0.15 s per 10 s window, 90 s for that file's 2 s windows every 1 s). Frames are
    computed `block_frames` at a time from the padded signal, so an hour at 48 kHz never holds more
    than one block's complex spectrum (a whole-file STFT would be ~3 GB).
    """
    import torch

    n_fft = int(extractor.fft_window_size)
    hop = int(extractor.hop_length)
    x = np.asarray(samples, dtype=np.float32)
    if x.size <= n_fft // 2:  # reflect padding needs more samples than half a frame
        x = np.pad(x, (0, n_fft // 2 + 1 - x.size))
    padded = torch.from_numpy(np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect"))
    frames = 1 + x.size // hop
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32)
    fusion = str(getattr(extractor, "truncation", "")) == "fusion"
    bank = torch.from_numpy(
        np.asarray(extractor.mel_filters if fusion else extractor.mel_filters_slaney, dtype=np.float32)
    ).T
    out = []
    for first in range(0, frames, block_frames):
        count = min(block_frames, frames - first)
        piece = padded[first * hop : (first + count - 1) * hop + n_fft]
        spec = torch.stft(piece, n_fft, hop_length=hop, window=window, center=False, return_complex=True)
        db = 10.0 * torch.log10(torch.clamp(bank @ (spec.abs() ** 2), min=1e-10))
        out.append(db.T.float().numpy())
    return np.concatenate(out)


def clap_window(mel: np.ndarray, start_frame: int, frames: int, total_frames: int) -> np.ndarray:
    """Return one window's CLAP input (total_frames, bins): its frames repeated, then silence ("repeatpad")."""
    piece = mel[start_frame : start_frame + max(frames, 1)]
    if piece.shape[0] == 0:
        piece = np.full((1, mel.shape[1]), DB_FLOOR, dtype=np.float32)
    repeats = max(total_frames // piece.shape[0], 1)
    tiled = np.tile(piece, (repeats, 1))[:total_frames]
    if tiled.shape[0] < total_frames:
        pad = np.full((total_frames - tiled.shape[0], mel.shape[1]), DB_FLOOR, dtype=np.float32)
        tiled = np.concatenate([tiled, pad])
    return tiled
