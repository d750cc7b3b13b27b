"""ByteTrack-style multi-object tracking: boxes of sampled frames linked into tracks (IoU + Hungarian).

ByteTrack's association (Zhang et al., 2022) without its Kalman filter: confident boxes are matched to
the tracks' predicted boxes first, the tracks left over then take the low-score boxes (an occluded
object scores low; dropping those boxes is what breaks tracks), a confident box nobody took starts a
track, and a track unseen for `max_lost` samples ends. The prediction is constant velocity from the
last two observations, which keeps two crossing objects on their own tracks. Written here rather than
taken from `supervision` or `boxmot`: both pull opencv-python (and boxmot torch pins) into the server's
environment for forty lines of association; scipy's linear_sum_assignment is the Hungarian solver.
Matching is per label: a box never joins a track of another class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (any unit, the same for every box)


@dataclass(frozen=True)
class Detection:
    """One box on one sampled frame: its place, score and label (None for unlabeled boxes)."""

    box: Box
    score: float
    label: str | None


@dataclass
class Track:
    """One object across sampled frames: (sample position, box, score) per frame it was seen on."""

    track_id: int
    label: str | None
    seen: list[tuple[int, Box, float]] = field(default_factory=list)
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))

    @property
    def last(self) -> int:
        """Return the sample position of the last observation."""
        return self.seen[-1][0]

    def predict(self, position: int) -> np.ndarray:
        """Return the box expected at `position` (constant velocity from the last observation)."""
        return np.asarray(self.seen[-1][1], dtype=float) + self.velocity * float(position - self.last)

    def add(self, position: int, det: Detection) -> None:
        """Record an observation and update the velocity (per sample step), smoothed."""
        if self.seen:
            steps = max(1, position - self.last)
            step_velocity = (np.asarray(det.box, dtype=float) - np.asarray(self.seen[-1][1])) / steps
            self.velocity = (
                step_velocity if len(self.seen) == 1 else 0.5 * self.velocity + 0.5 * step_velocity
            )
        self.seen.append((position, det.box, det.score))

    @property
    def score(self) -> float:
        """Return the mean score of the observations."""
        return float(np.mean([s for _, _, s in self.seen]))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the IoU of every box of a (N, 4) with every box of b (M, 4), xyxy."""
    if a.size == 0 or b.size == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


class ByteTracker:
    """Link per-frame detections into tracks; feed frames in order with update(), read tracks()."""

    def __init__(
        self,
        high: float = 0.5,
        low: float = 0.1,
        match_iou: float = 0.2,
        max_lost: int = 5,
        min_hits: int = 2,
    ) -> None:
        """`high`: a box this confident starts or continues a track; `low`: weaker boxes only continue one."""
        self.high, self.low, self.match_iou = high, low, match_iou
        self.max_lost, self.min_hits = max_lost, min_hits
        self._active: list[Track] = []
        self._done: list[Track] = []
        self._next_id = 1

    def update(self, position: int, detections: Sequence[Detection]) -> None:
        """Associate one sampled frame's detections (position: its 0-based place among the samples)."""
        strong = [d for d in detections if d.score >= self.high]
        weak = [d for d in detections if self.low <= d.score < self.high]
        left = self._associate(position, self._active, strong, self.match_iou)
        unmatched_tracks = [t for t in self._active if t.last != position]
        self._associate(position, unmatched_tracks, weak, 0.5)
        for det in left:
            track = Track(self._next_id, det.label)
            self._next_id += 1
            track.add(position, det)
            self._active.append(track)
        still: list[Track] = []
        for track in self._active:
            (still if position - track.last <= self.max_lost else self._done).append(track)
        self._active = still

    def _associate(
        self, position: int, tracks: Sequence[Track], dets: Sequence[Detection], threshold: float
    ) -> list[Detection]:
        """Match dets to tracks by IoU with the predicted boxes (Hungarian); return the dets left over."""
        if not tracks or not dets:
            return list(dets)
        from scipy.optimize import linear_sum_assignment

        predicted = np.stack([t.predict(position) for t in tracks])
        boxes = np.asarray([d.box for d in dets], dtype=float)
        iou = iou_matrix(predicted, boxes)
        same = np.asarray([[t.label == d.label for d in dets] for t in tracks])
        iou = np.where(same, iou, 0.0)
        rows, cols = linear_sum_assignment(-iou)
        used = set()
        for r, c in zip(rows, cols, strict=True):
            if iou[r, c] >= threshold:
                tracks[r].add(position, dets[c])
                used.add(int(c))
        return [d for k, d in enumerate(dets) if k not in used]

    def tracks(self) -> list[Track]:
        """Return every track seen at least min_hits times (a one-frame flicker is noise), by id."""
        every = self._done + self._active
        return sorted((t for t in every if len(t.seen) >= self.min_hits), key=lambda t: t.track_id)
