"""Small random SAM 2 and SAM checkpoints of the real architectures, saved like the hub's (save_pretrained).

No SAM weights exist offline: tests build these, save them into a folder and load them through the
real loading code (backends/_sam.py). Input 128 px, so encoding takes milliseconds on a CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

INPUT_PX = 128


def build_sam2(folder: Path, seed: int = 0, input_px: int = INPUT_PX) -> Path:
    """Save a tiny random Sam2Model + Sam2Processor (Hiera backbone, 3 feature levels) into folder."""
    import torch
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2Model,
        Sam2Processor,
        Sam2VisionConfig,
    )

    torch.manual_seed(seed)
    stride = input_px // 4  # the patch embedding's stride is 4
    backbone = Sam2HieraDetConfig(
        hidden_size=12,
        image_size=input_px,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[12, 24, 48, 96],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[96, 48, 24, 12],
        backbone_feature_sizes=[[stride, stride], [stride // 2, stride // 2], [stride // 4, stride // 4]],
        fpn_hidden_size=32,
    )
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 32, "image_size": input_px, "patch_size": 16},
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    model = Sam2Model(config).eval()
    processor = Sam2Processor(
        image_processor=Sam2ImageProcessor(
            size={"height": input_px, "width": input_px}, mask_size={"height": stride, "width": stride}
        ),
        target_size=input_px,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def build_sam1(folder: Path, seed: int = 0, input_px: int = INPUT_PX) -> Path:
    """Save a tiny random SamModel + SamProcessor (ViT backbone, longest side resize + pad) into folder."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor, SamVisionConfig

    torch.manual_seed(seed)
    grid = input_px // 16
    vision = SamVisionConfig(
        hidden_size=32,
        image_size=input_px,
        patch_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        output_channels=32,
        mlp_dim=64,
        global_attn_indexes=[1],
        window_size=4,
        num_pos_feats=16,
    )
    config = SamConfig(
        vision_config=vision,
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": input_px,
            "patch_size": 16,
            "image_embedding_size": grid,
        },
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    model = SamModel(config).eval()
    processor = SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": input_px},
            pad_size={"height": input_px, "width": input_px},
            mask_size={"longest_edge": 4 * grid},
            mask_pad_size={"height": 4 * grid, "width": 4 * grid},
        )
    )
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def build_sam2_video(folder: Path, seed: int = 0, input_px: int = INPUT_PX) -> Path:
    """Save a tiny random Sam2VideoModel + Sam2VideoProcessor (memory attention and encoder included)."""
    import torch
    from transformers import (
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoVideoProcessor,
        Sam2VisionConfig,
    )

    torch.manual_seed(seed)
    stride = input_px // 4
    backbone = Sam2HieraDetConfig(
        hidden_size=12,
        image_size=input_px,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[12, 24, 48, 96],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[96, 48, 24, 12],
        backbone_feature_sizes=[[stride, stride], [stride // 2, stride // 2], [stride // 4, stride // 4]],
        fpn_hidden_size=128,
    )
    # hidden 128 over the memory's fixed 64 channels: object pointers split in two, as SAM 2's 256 in four
    config = Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 128, "image_size": input_px, "patch_size": 16},
        mask_decoder_config={
            "hidden_size": 128,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
        image_size=input_px,
        num_maskmem=3,
        memory_attention_hidden_size=128,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[input_px // 16, input_px // 16],
        memory_encoder_hidden_size=128,
        mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=64,
    )
    model = Sam2VideoModel(config).eval()
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(
            size={"height": input_px, "width": input_px}, mask_size={"height": stride, "width": stride}
        ),
        video_processor=Sam2VideoVideoProcessor(size={"height": input_px, "width": input_px}),
        target_size=input_px,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder
