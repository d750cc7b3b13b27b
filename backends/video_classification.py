"""Video classification and frame classification with the config's own labels: SigLIP on sampled frames.

`Choices` on a `Video` (LS's Video Classification template): every sampled frame is scored by the
zero-shot image-text model of zero_shot_image.py (SigLIP 2 by default, same prompts, same knobs), and the
per-frame probabilities are averaged over the clip: single choice takes the best mean softmax
probability, `choice="multiple"` every choice whose mean sigmoid probability reaches the threshold.
`TimelineLabels` on a `Video` (Video Frame Classification): each sampled frame's softmax over the labels
is smoothed by a centred moving average of VIDEO_TIMELINE_SMOOTH_S seconds (a blip shorter than half of
it is absorbed by its neighbours), each frame takes its best label when that reaches the threshold, and
each run of one label becomes a range of editor frames [start, end] (to the frame before the next sample).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from backends._video import frame_rate_of
from backends.zero_shot_image import PromptSet, ZeroShotImageBackend, _features, prompt_set
from serving.contract import Item, Target
from serving.results import regions
from serving.results import video as video_regions


@dataclass
class _VideoInput:
    pixels: Any  # (frames, 3, H, W) tensor from the image processor
    prompts: tuple[PromptSet, ...]


def choice_logits(logits: np.ndarray, prompts: PromptSet) -> np.ndarray:
    """Return (frames, choices) logits: a choice's logit is its best phrase's."""
    out = []
    k = 0
    for phrases in prompts.phrases:
        out.append(logits[:, k : k + len(phrases)].max(axis=1))
        k += len(phrases)
    return np.stack(out, axis=1)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Return the softmax over the last axis."""
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def smooth(probs: np.ndarray, window: int) -> np.ndarray:
    """Return a centred moving average over `window` samples (odd; edges average what they have)."""
    if window <= 1 or probs.shape[0] <= 1:
        return probs
    half = window // 2
    padded = np.cumsum(np.vstack([np.zeros((1, probs.shape[1])), probs]), axis=0)
    n = probs.shape[0]
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    return (padded[hi] - padded[lo]) / (hi - lo)[:, None]


class VideoClassificationBackend(ZeroShotImageBackend):
    """SigLIP scoring the config's choices or timeline labels on a video's sampled frames."""

    family = "video_classification"
    control_tags: ClassVar[tuple[str, ...]] = ("Choices", "TimelineLabels")  # type: ignore[assignment]
    object_tags = ("Video",)
    input_kind = "video"
    max_batch_size = 1  # one video is already a batch of frames
    priority = 66
    zero_shot = False  # no closed model claims a video tag: this family takes its tags directly
    whole_tag = False
    frames_per_forward = 32

    def preprocess(self, item: Item) -> Any:
        """Run the image processor on every sampled frame (CPU) and note the prompt sets."""
        images = [f.convert("RGB") if f.mode != "RGB" else f for f in item.frames]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        prompts = tuple(dict.fromkeys(prompt_set(t) for t in item.targets if t.model == self.spec))
        return _VideoInput(pixels, prompts)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Embed each video's frames (frames_per_forward at a time); return per-frame logits per prompt set."""
        import torch

        scale = self.model.logit_scale.float().exp()
        bias = self.model.logit_bias.float()
        outputs = []
        for video in batch:
            parts = []
            for start in range(0, video.pixels.shape[0], self.frames_per_forward):
                chunk = video.pixels[start : start + self.frames_per_forward].to(self.device)
                parts.append(_features(self.model.get_image_features(pixel_values=chunk)).float())
            images = torch.nn.functional.normalize(torch.cat(parts), dim=-1)
            out = {}
            for prompts in video.prompts:
                text = self._text_embeddings(prompts)
                out[prompts] = (images @ text.T * scale + bias).cpu().numpy().astype(np.float64)
            outputs.append(out)
        return outputs

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit the clip's choice(s) (Choices) or its labeled frame ranges (TimelineLabels)."""
        prompts = prompt_set(target)
        logits = output.get(prompts)
        if logits is None or not prompts.choices or logits.shape[0] == 0:
            return []
        scores = choice_logits(logits, prompts)
        if target.control.tag == "TimelineLabels":
            return self.timeline(softmax(scores), prompts, target, item)
        if target.option("choice", "single").strip().lower() == "multiple":
            mean = (1.0 / (1.0 + np.exp(-scores))).mean(axis=0)
            order = [int(i) for i in np.argsort(-mean, kind="stable") if mean[i] >= target.threshold]
            if not order:
                return []
            return [regions.choices_item(target, [prompts.choices[i] for i in order], float(mean[order[0]]))]
        mean = softmax(scores).mean(axis=0)
        best = int(np.argmax(mean))
        if mean[best] < target.threshold:
            return []
        return [regions.choices_item(target, [prompts.choices[best]], float(mean[best]))]

    def timeline(
        self, probs: np.ndarray, prompts: PromptSet, target: Target, item: Item
    ) -> list[dict[str, Any]]:
        """Return one TimelineLabels region per run of sampled frames whose smoothed best label is the same."""
        indices = list(item.frame_indices)
        steps = [b - a for a, b in itertools.pairwise(indices)]
        step = float(np.median(steps)) if steps else 1.0
        window = int(self.settings.video_timeline_smooth_s * (item.fps or 1.0) / step)
        smoothed = smooth(probs, window | 1)
        best = smoothed.argmax(axis=1)
        keep = smoothed[np.arange(len(best)), best] >= target.threshold
        rate = frame_rate_of(item.obj, item.task)
        count = video_regions.video_frames_count(item.duration, rate)
        out = []
        for first, last in _runs([int(b) if k else -1 for b, k in zip(best, keep, strict=True)]):
            label = int(best[first])
            start = video_regions.video_frame(indices[first], item.fps, rate, count)
            if last + 1 < len(indices):
                end = video_regions.video_frame(indices[last + 1], item.fps, rate, count) - 1
            else:
                end = count
            score = float(smoothed[first : last + 1, label].mean())
            out.append(
                video_regions.timeline_item(target, start, max(start, end), prompts.choices[label], score)
            )
        return out


def _runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Return (first, last) positions of each run of one label (-1: no label, never a run)."""
    runs = []
    start = 0
    for k in range(1, len(labels) + 1):
        if k == len(labels) or labels[k] != labels[start]:
            if labels[start] >= 0:
                runs.append((start, k - 1))
            start = k
    return runs
