"""SAM 2 video (transformers Sam2VideoModel): one drawn box tracked forward through a video's frames.

The model's own video session keeps each frame's features and the object's memory; the box prompt goes
on the first frame, `propagate_in_video_iterator` answers one mask per following frame, and the mask's
bounding box is the tracked box. Loaded from a local checkpoint only (SAM_MODEL: a SAM 2 / 2.1 id in the
Hugging Face cache or a save_pretrained() folder); nothing downloads while serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def load(folder: Path, device: str) -> tuple[Any, Any]:
    """Return (Sam2VideoModel, Sam2VideoProcessor) from a checkpoint folder, on the device, in eval mode."""
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    model = Sam2VideoModel.from_pretrained(folder).eval().to(device)
    return model, Sam2VideoProcessor.from_pretrained(folder)


def track(
    model: Any, processor: Any, frames: Sequence[Any], box_xyxy_px: Sequence[float], device: str
) -> list[np.ndarray]:
    """Return one boolean mask (H, W) per frame for the object boxed on frames[0] (pixels of the frames)."""
    import torch

    arrays = [np.asarray(f.convert("RGB")) for f in frames]
    height, width = arrays[0].shape[:2]
    with torch.inference_mode():
        session = processor.init_video_session(video=arrays, inference_device=device)
        processor.add_inputs_to_inference_session(
            inference_session=session, frame_idx=0, obj_ids=1, input_boxes=[[[float(v) for v in box_xyxy_px]]]
        )
        masks: dict[int, np.ndarray] = {}
        iterator = model.propagate_in_video_iterator(
            session, start_frame_idx=0, max_frame_num_to_track=len(arrays) - 1
        )
        for output in iterator:
            post = processor.post_process_masks(
                [output.pred_masks], original_sizes=[[height, width]], binarize=True
            )
            masks[int(output.frame_idx)] = post[0][0, 0].cpu().numpy().astype(bool)
    empty = np.zeros((height, width), dtype=bool)
    return [masks.get(k, empty) for k in range(len(arrays))]


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Return the pixel box (x0, y0, x1, y1) around a mask's pixels, None when it is empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
