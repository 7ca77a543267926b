"""The codec between images and the space the UNet denoises: a VAE's scaled latents.

The generator only ever calls ``encode``/``decode`` and reads ``latent_channels`` and
``downsample`` (pixels per latent), so the same training and sampling code runs with the real
SD1.5 ``AutoencoderKL`` (4 x 64 x 64 latents for 512 px, scaled by ``scaling_factor`` 0.18215, as in
Rombach et al. 2022) and with the small ``AutoencoderKL`` the CPU demo trains on its photos.
"""

from __future__ import annotations

import torch
from torch import nn


class Codec(nn.Module):
    """Maps images in [-1, 1] (B, 3, H, W) to the denoised space and back."""

    latent_channels: int
    downsample: int

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class VaeCodec(Codec):
    """SD's ``AutoencoderKL``; latents are scaled by the VAE's ``scaling_factor`` (and shift, if any).

    The VAE is frozen: Diff-ID keeps encoder and decoder fixed (paper 004, appendix A.1). ``decode``
    stays differentiable with respect to its input so the identity loss can back-propagate
    through it.
    """

    def __init__(self, vae: nn.Module, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.sample_posterior = sample_posterior
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def train(self, mode: bool = True):  # the VAE stays in eval mode
        super().train(mode)
        self.vae.eval()
        return self

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if self.sample_posterior else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample
