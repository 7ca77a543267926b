"""Face position mask, FlashFace sec. 3.2: a box mask channel (and the inpainting variant) at the UNet input.

A one-channel mask, 1 inside the face bounding box and 0 elsewhere, is concatenated to the noisy
latent; the UNet's ``conv_in`` is widened and the new input channels start at zero, so the widened
UNet computes exactly what it did before (STYLE.md 5). The inpainting variant also concatenates the
target latent with the face box zeroed (4 + 4 + 1 channels). Channel order follows diffusers'
inpainting UNets: ``[noisy (c), mask (1), masked latent (c)]``, so the plain mask variant is a prefix.
Dropping the mask (FlashFace drops it with the references, p = 0.1) zeroes the extra channels, which
is also the paper's "w/o pmask" setting (supplementary sec. 7).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def widen_conv_in(unet: nn.Module, extra_channels: int) -> nn.Module:
    """Give ``unet.conv_in`` ``extra_channels`` more input channels with zero weights, in place.

    The old weights and bias are kept for the first channels, and the model config's ``in_channels``
    is updated, so ``save_pretrained`` / ``from_pretrained`` round-trip the widened UNet.
    """
    if extra_channels <= 0:
        raise ValueError(f"widen_conv_in: extra_channels must be positive, got {extra_channels}")
    conv = unet.conv_in
    new = nn.Conv2d(
        conv.in_channels + extra_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
    log.info("widened conv_in to %d input channels (%d zero-initialised)", new.in_channels, extra_channels)
    return unet


def box_mask(boxes: torch.Tensor, image_size: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) masks, 1 on the latent cells that overlap each box.

    Args:
        boxes: (B, 4) face boxes ``x0, y0, x1, y1`` in pixels of an image of ``image_size`` (H, W).
        latent_size: (h, w) of the latent grid.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box_mask: boxes must be (B, 4) x0, y0, x1, y1, got {tuple(boxes.shape)}")
    (height, width), (h, w) = image_size, latent_size
    boxes = boxes.float()
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) * (height / h)  # cell tops
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) * (width / w)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))  # (B, 1)
    inside_y = (ys[None] + height / h > y0) & (ys[None] < y1)  # (B, h)
    inside_x = (xs[None] + width / w > x0) & (xs[None] < x1)  # (B, w)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]  # (B, 1, h, w)


def masked_latent(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target latent with the face box zeroed (the inpainting variant's condition)."""
    return latent * (1 - mask.to(latent.dtype))


def face_mask_input(
    noisy: torch.Tensor,
    mask: torch.Tensor,
    latent: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """The widened UNet's input: ``[noisy, mask]`` (c + 1) or, given the clean target ``latent``,
    ``[noisy, mask, masked latent]`` (c + 1 + c). ``drop`` (B,) bool zeroes the extra channels per sample."""
    mask = mask.to(noisy.dtype)
    extra = [mask] if latent is None else [mask, masked_latent(latent, mask)]
    extra = torch.cat(extra, dim=1)  # (B, 1 [+ c], h, w)
    if drop is not None:
        extra = extra * (~drop.to(extra.device)).to(extra.dtype).view(-1, 1, 1, 1)
    return torch.cat([noisy, extra], dim=1)
