"""Tiny random real-time DETR checkpoints (RT-DETRv2, D-FINE, DEIMv2, RF-DETR) saved like the real ones.

No real weights exist offline: tests build models of the real architectures at tiny sizes from their
configs, save them with save_pretrained (model + image processor) and load them back through the
backend's own loading code. `Planted` wraps a loaded model: the real model runs, then its logits and
boxes are replaced by known values, so the answers are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLASSES = ("person", "car", "dog", "truck")
KINDS = ("rt_detr_v2", "d_fine", "deimv2", "rf_detr")
QUERIES = 10


def tiny_config(kind: str, classes: tuple[str, ...] = CLASSES) -> Any:
    """Return a tiny config of one real-time DETR architecture with these class names."""
    import transformers as tf

    id2label = dict(enumerate(classes))
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if kind == "rf_detr":
        backbone = tf.RfDetrDinov2Config(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            out_indices=[1, 2, 3, 4],
            num_windows=1,
        )
        return tf.RfDetrConfig(
            backbone_config=backbone,
            d_model=32,
            decoder_ffn_dim=32,
            decoder_self_attention_heads=2,
            decoder_cross_attention_heads=2,
            num_queries=QUERIES,
            group_detr=1,
            decoder_layers=2,
            decoder_n_points=2,
            intermediate_size=32,
            **labels,
        )
    common = dict(
        d_model=32,
        encoder_hidden_dim=32,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_layers=2,
        decoder_n_points=2,
        decoder_in_channels=[32, 32, 32],
        num_queries=QUERIES,
        **labels,
    )
    if kind == "rt_detr_v2":
        backbone = tf.RTDetrResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            out_features=["stage2", "stage3", "stage4"],
        )
        return tf.RTDetrV2Config(backbone_config=backbone, encoder_in_channels=[16, 32, 64], **common)
    hgnet = tf.HGNetV2Config(
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16, 32, 64],
        stage_mid_channels=[8, 8, 16, 16],
        stage_out_channels=[16, 32, 64, 64],
        stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[1, 1, 1, 1],
        stage_downsample=[False, True, True, True],
        stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5],
        hidden_sizes=[16, 32, 64, 64],
        out_features=["stage2", "stage3", "stage4"],
    )
    cls = tf.DFineConfig if kind == "d_fine" else tf.Deimv2Config
    return cls(backbone_config=hgnet, encoder_in_channels=[32, 64, 64], **common)


def save_detr(
    folder: Path, kind: str = "d_fine", side: int = 64, classes: tuple[str, ...] = CLASSES, seed: int = 0
) -> Path:
    """Save a tiny random real-time DETR with an RT-DETR image processor at side x side; return the folder."""
    from transformers import AutoModelForObjectDetection, RTDetrImageProcessor

    torch.manual_seed(seed)
    model = AutoModelForObjectDetection.from_config(tiny_config(kind, classes)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    normalize = kind == "rf_detr"  # RF-DETR's processor normalises with ImageNet statistics
    RTDetrImageProcessor(size={"height": side, "width": side}, do_normalize=normalize).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Plant:
    """One planted (query, class) answer: a logit and a box (cx, cy, w, h relative to the input)."""

    query: int
    label: str
    logit: float
    box: tuple[float, float, float, float]


class Planted(torch.nn.Module):
    """A loaded model that still runs, with its logits and boxes replaced by the plants (every image)."""

    def __init__(self, model: Any, plants: list[Plant]) -> None:
        super().__init__()
        self.inner = model
        self.plants = plants
        self.calls: list[int] = []

    @property
    def config(self) -> Any:
        """Return the real model's config."""
        return self.inner.config

    def forward(self, pixel_values: torch.Tensor) -> Any:
        """Run the real model, then plant the answers."""
        self.calls.append(int(pixel_values.shape[0]))
        out = self.inner(pixel_values=pixel_values)
        names = [self.inner.config.id2label[i] for i in range(self.inner.config.num_labels)]
        logits = torch.full_like(out.logits, -12.0)
        boxes = torch.full_like(out.pred_boxes, 0.5)
        for plant in self.plants:
            logits[:, plant.query, names.index(plant.label)] = plant.logit
            boxes[:, plant.query] = torch.tensor(plant.box)
        out.logits, out.pred_boxes = logits, boxes
        return out


def planted_family(plants: list[Plant]) -> type[Any]:
    """Return the real rt_detr family whose load() wraps the loaded model with planted answers."""
    from backends.rt_detr import RtDetrBackend

    class PlantedRtDetr(RtDetrBackend):
        def load(self, device: str) -> None:
            super().load(device)
            self.model = Planted(self.model, plants)

    return PlantedRtDetr
