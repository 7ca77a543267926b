"""A two-level random-weight UNet (8 x 8 latents, 16-d cross-attention) shared by the model tests."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def tiny_unet(cross_attention_first: bool = True, seed: int = 0) -> UNet2DConditionModel:
    """Cross-attention at the first (full-resolution) level, or at the second one."""
    torch.manual_seed(seed)
    down = (
        ("CrossAttnDownBlock2D", "DownBlock2D")
        if cross_attention_first
        else ("DownBlock2D", "CrossAttnDownBlock2D")
    )
    up = ("UpBlock2D", "CrossAttnUpBlock2D") if cross_attention_first else ("CrossAttnUpBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=8,
        down_block_types=down,
        up_block_types=up,
    )
