"""CPU and CUDA give the same vision outputs within tolerance (run wherever CUDA is available)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backends.classification import ClassificationBackend
from backends.segmentation import InstanceSegmentationBackend, SemanticSegmentationBackend
from serving.contract import ModelSpec
from tests.backends._vision_support import (
    PlantedDetector,
    Transform,
    image_item,
    save_random_weights,
    settings,
)
from tests.backends.test_vision_geometry import COCO, masks_make

pytestmark = pytest.mark.gpu


def _run(backend: Any, device: str, items: list[Any], fp16: bool = False) -> list[Any]:
    backend.device = device
    if getattr(backend.model, "to", None) is not None:
        backend.model.to(device)
    with (
        torch.inference_mode(),
        torch.autocast("cuda", dtype=torch.float16, enabled=fp16 and device == "cuda"),
    ):
        return backend.forward([backend.preprocess(it) for it in items])


def test_mask_upsampling_matches_on_cuda(tmp_path: Path) -> None:
    """Mask crops upsampled on the GPU equal the CPU ones but for a few boundary pixels."""
    backend = InstanceSegmentationBackend(
        ModelSpec("instance_segmentation", "maskrcnn_resnet50_fpn_v2"), settings(tmp_path)
    )
    backend.model = PlantedDetector(masks_make, Transform(min_size=40, max_size=80))
    backend.categories = COCO
    items = [image_item(160, 120)]
    (cpu,) = _run(backend, "cpu", items)
    (gpu,) = _run(backend, "cuda", items)
    np.testing.assert_allclose(cpu.boxes_xyxy_px, gpu.boxes_xyxy_px, atol=1e-3)
    a, b = cpu.full_mask(0) > 0, gpu.full_mask(0) > 0
    assert (a != b).sum() <= 0.01 * a.sum()


def test_classifier_probabilities_match_on_cuda(isolated_env: Path, tmp_path: Path) -> None:
    """Random-weight EfficientNet: CUDA fp32 within 1e-3 of the CPU, fp16 autocast within 2e-2."""
    save_random_weights("efficientnet_b0", isolated_env / "torch_home", num_classes=1000)
    backend = ClassificationBackend(ModelSpec("image_classification", "efficientnet_b0"), settings(tmp_path))
    backend.load("cpu")
    items = [image_item(300, 200), image_item(128, 128, color=(10, 200, 30))]
    cpu = np.stack(_run(backend, "cpu", items))
    gpu = np.stack(_run(backend, "cuda", items))
    half = np.stack(_run(backend, "cuda", items, fp16=True))
    np.testing.assert_allclose(cpu, gpu, atol=1e-3)
    np.testing.assert_allclose(cpu, half, atol=2e-2)


def test_semantic_class_maps_match_on_cuda(isolated_env: Path, tmp_path: Path) -> None:
    """Random-weight DeepLabV3-MobileNet: class maps agree on >= 99% of the pixels."""
    save_random_weights(
        "deeplabv3_mobilenet_v3_large", isolated_env / "torch_home", num_classes=21, aux_loss=True
    )
    backend = SemanticSegmentationBackend(
        ModelSpec("semantic_segmentation", "deeplabv3_mobilenet_v3_large"), settings(tmp_path)
    )
    backend.load("cpu")
    items = [image_item(96, 72), image_item(50, 80)]
    for c, g in zip(_run(backend, "cpu", items), _run(backend, "cuda", items), strict=True):
        assert c.class_map.shape == g.class_map.shape
        assert (c.class_map == g.class_map).mean() >= 0.99
