"""Diffusion targets and Diff-ID's exponentially time-weighted ArcFace identity loss.

Diff-ID (paper 004) sec. 3.3 and appendix A.1.4:

    x0_hat     = decode( (z_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) )   (epsilon prediction)
    L_identity = 1 - cos( ArcFace(x_original), ArcFace(x0_hat) )
    W_t        = exp(-k t / T)                                                   k = 5
    L_total    = L_denoise + lambda_id * E[ W_t * L_identity ]                   lambda_id = 0.1

x0_hat is also formed for v-prediction (x0 = sqrt(abar) z_t - sqrt(1 - abar) v) and x0-prediction.
The face in x0_hat is aligned with the sample's stored 5 landmarks by a differentiable warp
(:mod:`idforge.models.align_torch`), so gradients reach the UNet and the adapter through the frozen
VAE decoder and ArcFace. Cost knobs (SPEC.md sec. 2): only timesteps below ``max_timestep``, only a
``batch_fraction`` of the samples, decoding only a ``face_window`` of latents around the face box
(a 32 x 32 latent window -> 256 px instead of the whole 64 x 64 latent), and gradient checkpointing
of the decoder. Skipped samples contribute zero to the batch mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .align_torch import warp_to_template

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def timestep_weight(t: torch.Tensor, num_train_timesteps: int = 1000, k: float = 5.0) -> torch.Tensor:
    """W_t = exp(-k t / T) (Diff-ID sec. 3.3): 1 at t = 0, exp(-k) at t = T."""
    return torch.exp(-k * t.float() / num_train_timesteps)


def _abar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a.view(-1, *([1] * (ndim - 1)))


def predict_x0(model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Predicted clean sample from the network output, for each scheduler prediction type."""
    a = _abar(alphas_cumprod, timesteps, sample.dim())
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def diffusion_target(noise: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The regression target: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _abar(alphas_cumprod, timesteps, sample.dim())
        return a.sqrt() * noise - (1 - a).sqrt() * sample
    if prediction_type == "sample":
        return sample
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


@dataclass
class IdentityLossConfig:
    lambda_id: float = 0.1
    """Weight of the identity term (Diff-ID: 0.1)."""
    k: float = 5.0
    """Decay of W_t = exp(-k t / T) (Diff-ID: 5)."""
    num_train_timesteps: int = 1000
    max_timestep: int | None = None
    """Compute the loss only for t below this (None: all t)."""
    batch_fraction: float = 1.0
    """Compute it on this fraction of each batch (at least one sample)."""
    face_window: int | None = None
    """Decode only a window of this many latents around the face box (None: the whole latent)."""
    checkpoint_decoder: bool = False
    """Recompute the decoder in the backward pass instead of storing its activations."""
    latent_scale: int | None = None
    """Pixels per latent (None: taken from the decoded size)."""
    align_size: int = 112

    def __post_init__(self):
        if self.lambda_id < 0 or self.k < 0:
            raise ValueError(f"lambda_id and k must be >= 0, got {self.lambda_id}, {self.k}")
        if not 0 < self.batch_fraction <= 1:
            raise ValueError(f"batch_fraction must be in (0, 1], got {self.batch_fraction}")
        if self.face_window is not None and self.face_window < 1:
            raise ValueError(f"face_window must be >= 1 latent, got {self.face_window}")


@dataclass
class IdentityLossOutput:
    loss: torch.Tensor  # lambda * mean over the batch of W_t * L_id (skipped samples count 0)
    id_loss: torch.Tensor  # mean L_id over the samples used
    weight_mean: torch.Tensor  # mean W_t over the samples used
    id_cosine: torch.Tensor  # mean cos(ArcFace(x), ArcFace(x0_hat)) over the samples used
    num_used: int


class IdentityLoss(nn.Module):
    """L = lambda * mean_b( W_t L_id ) with a frozen, differentiable ArcFace."""

    def __init__(self, face_encoder: nn.Module, config: IdentityLossConfig | None = None):
        super().__init__()
        self.config = config or IdentityLossConfig()
        self.face_encoder = face_encoder
        self.face_encoder.requires_grad_(False)
        self.face_encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.face_encoder.eval()
        return self

    def select(self, timesteps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices of the samples the loss is computed on (timestep threshold, batch fraction)."""
        cfg = self.config
        ok = torch.ones_like(timesteps, dtype=torch.bool)
        if cfg.max_timestep is not None:
            ok &= timesteps < cfg.max_timestep
        idx = ok.nonzero().flatten()
        if cfg.batch_fraction < 1 and len(idx):
            n = max(1, math.ceil(cfg.batch_fraction * len(timesteps)))
            perm = torch.randperm(len(idx), generator=generator, device="cpu")[:n].to(idx.device)
            idx = idx[perm.sort().values]
        return idx

    def _decode_window(self, x0_hat, decode, landmarks, boxes):
        cfg = self.config
        win = cfg.face_window
        h, w = x0_hat.shape[-2:]
        if win is None or (win >= h and win >= w):
            return x0_hat, landmarks, None
        if boxes is None:
            raise ValueError("face_window needs the face boxes of the samples")
        scale = cfg.latent_scale
        if scale is None:
            raise ValueError("face_window needs latent_scale (pixels per latent) in IdentityLossConfig")
        cx = ((boxes[:, 0] + boxes[:, 2]) / 2 / scale).round().long()
        cy = ((boxes[:, 1] + boxes[:, 3]) / 2 / scale).round().long()
        x0 = (cx - win // 2).clamp(0, max(w - win, 0))
        y0 = (cy - win // 2).clamp(0, max(h - win, 0))
        crops = torch.stack([x0_hat[i, :, y0[i]:y0[i] + win, x0[i]:x0[i] + win] for i in range(len(x0))])
        offset = torch.stack([x0, y0], -1).to(landmarks.dtype)[:, None, :] * scale  # (B, 1, 2) pixels
        return crops, landmarks - offset, offset

    def forward(self, *, x0_hat: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                timesteps: torch.Tensor, landmarks: torch.Tensor, reference_embeds: torch.Tensor,
                boxes: torch.Tensor | None = None, generator: torch.Generator | None = None) -> IdentityLossOutput:
        cfg = self.config
        b = x0_hat.shape[0]
        idx = self.select(timesteps, generator)
        zero = x0_hat.sum() * 0.0
        if len(idx) == 0:
            nan = torch.tensor(float("nan"), device=x0_hat.device)
            return IdentityLossOutput(zero, nan, nan, nan, 0)
        z, lms, _ = self._decode_window(x0_hat[idx], decode, landmarks[idx].float(),
                                        None if boxes is None else boxes[idx].float())
        images = checkpoint(decode, z, use_reentrant=False) if cfg.checkpoint_decoder and torch.is_grad_enabled() \
            else decode(z)
        crops = warp_to_template(images.float(), lms, out_size=cfg.align_size)
        emb = F.normalize(self.face_encoder(crops).float(), dim=-1)
        ref = F.normalize(reference_embeds[idx].float().to(emb.device), dim=-1)
        cos = (emb * ref).sum(-1)
        l_id = 1.0 - cos
        w_t = timestep_weight(timesteps[idx], cfg.num_train_timesteps, cfg.k)
        loss = cfg.lambda_id * (w_t * l_id).sum() / b + zero
        return IdentityLossOutput(loss, l_id.mean().detach(), w_t.mean().detach(), cos.mean().detach(), len(idx))
