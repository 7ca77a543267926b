"""Diffusion targets, x0 prediction, and Diff-ID's exponentially time-weighted ArcFace identity loss.

Diff-ID (paper 004) sec. 3.3, eq. (2)-(3), appendix A.1.4, eq. (16)-(21):

    z_t        = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                      (17)
    L_denoise  = E || eps - eps_theta(z_t, t) ||^2                             (16)
    x0_hat     = decode( (z_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) )   (SPEC.md sec. 2)
    L_identity = 1 - cos( ArcFace(x_original), ArcFace(x0_hat) )               (2), (18)
    W_t        = exp(-k t / T)                              k = 5              (19)
    L_total    = L_denoise + lambda_id * E[ W_t * L_identity ]  lambda_id = 0.1   (3), (20)-(21)

x0_hat is also formed for v-prediction (x0 = sqrt(abar) z_t - sqrt(1 - abar) v, Salimans & Ho
2022) and for x0 ("sample") prediction. The face in the decoded x0_hat is aligned with the sample's
stored 5 landmarks by a differentiable similarity warp (:mod:`idforge.models.face.align_torch`), so
gradients reach the UNet and the adapter through the frozen VAE decoder and the frozen ArcFace.

Cost knobs (SPEC.md sec. 2), all off by default:
- ``max_timestep``: only samples with t < max_timestep (W_t is small above it anyway);
- ``batch_fraction``: only ceil(fraction x B) of the samples (chosen at random among the eligible);
- ``face_window``: decode only a latent window that holds the ArcFace crop. The window is placed
  and sized from the crop's four corners mapped back into the image (the inverse of the alignment
  similarity), plus ``window_margin`` latents for the decoder's receptive field; ``"auto"`` takes
  the smallest window that holds every crop of the batch, an integer fixes the side and raises when
  a crop does not fit (a window that cut the crop would make ``grid_sample`` smear border pixels
  into the face, so the loss would optimise a distorted crop);
- ``decode_scale``: decode at reduced resolution (the latent window is resized by this factor with
  an antialiased resize first); the crop's pixels then come closer to the 112 px the face encoder
  sees, which also saves decoder work;
- ``checkpoint_decoder``: recompute the decoder in the backward pass instead of storing activations.
The alignment warp prefilters where it minifies (``antialias``, on by default), so a large face is
not aliased into the 112 px crop.
Skipped samples contribute zero: ``loss`` is lambda x (sum over used samples of W_t L_id) / B.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .face.align_torch import crop_corners, warp_to_template

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def timestep_weight(t: torch.Tensor, num_train_timesteps: int = 1000, k: float = 5.0) -> torch.Tensor:
    """W_t = exp(-k t / T), Diff-ID eq. (19): 1 at t = 0, exp(-k) at t = T, decreasing in t."""
    return torch.exp(-k * t.float() / num_train_timesteps)


def _abar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """abar_t per sample, shaped (B, 1, ..., 1) to broadcast over a sample of ``ndim`` dims."""
    a = alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
    return a.view(-1, *([1] * (ndim - 1)))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES} (the scheduler's "
            f"config.prediction_type), got {prediction_type!r}"
        )


def predict_x0(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Predicted clean sample from the network output at z_t = ``sample``, per prediction type.

    epsilon: x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar);  v_prediction: x0 = sqrt(abar) z_t -
    sqrt(1 - abar) v;  sample: x0 = the output.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    a = _abar(alphas_cumprod, timesteps, sample.dim())
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    return a.sqrt() * sample - (1 - a).sqrt() * model_output


def diffusion_target(
    noise: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The regression target for clean ``sample`` x0: eps (eq. 16), v = sqrt(abar) eps - sqrt(1 - abar) x0,
    or x0."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return sample
    a = _abar(alphas_cumprod, timesteps, sample.dim())
    return a.sqrt() * noise - (1 - a).sqrt() * sample


@dataclass
class IdentityLossConfig:
    """Weights and cost knobs of the identity loss (Diff-ID sec. 3.3; knobs from SPEC.md sec. 2)."""

    lambda_id: float = 0.1
    """lambda_identity of eq. (21) (Diff-ID: 0.1)."""
    k: float = 5.0
    """Decay of W_t = exp(-k t / T), eq. (19) (Diff-ID: 5)."""
    num_train_timesteps: int = 1000
    """T of eq. (19)."""
    max_timestep: int | None = None
    """Compute the loss only for t < max_timestep (None: every t)."""
    batch_fraction: float = 1.0
    """Compute it on ceil(batch_fraction x B) samples of each batch (at least one)."""
    face_window: int | str | None = None
    """Decode only a latent window holding the ArcFace crop: ``"auto"`` (sized per batch), a side in
    latents (an error when a crop does not fit), or None (the whole latent, the paper)."""
    window_margin: int = 1
    """Latents added around the crop on each side of the window (the decoder's border effects)."""
    decode_scale: float = 1.0
    """Resize the (windowed) latents by this factor before decoding (< 1: decode at reduced resolution)."""
    antialias: bool = True
    """Prefilter before the alignment warp where it minifies (False: plain bilinear, as cv2.warpAffine)."""
    checkpoint_decoder: bool = False
    """Recompute the decoder in the backward pass instead of storing its activations."""
    latent_scale: int | None = 8
    """Pixels per latent (SD's VAE: 8; the pixel codec: 1); needed with ``face_window``."""
    align_size: int = 112
    """Side of the aligned crop fed to the face encoder (ArcFace: 112)."""

    def __post_init__(self):
        if self.lambda_id < 0 or self.k < 0:
            raise ValueError(
                f"IdentityLossConfig: lambda_id and k must be >= 0, got {self.lambda_id}, {self.k}"
            )
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"IdentityLossConfig: num_train_timesteps must be >= 1, got {self.num_train_timesteps}"
            )
        if self.max_timestep is not None and not 0 < self.max_timestep <= self.num_train_timesteps:
            raise ValueError(
                f"IdentityLossConfig: max_timestep must be in (0, {self.num_train_timesteps}], "
                f"got {self.max_timestep}"
            )
        if not 0 < self.batch_fraction <= 1:
            raise ValueError(
                f"IdentityLossConfig: batch_fraction must be in (0, 1], got {self.batch_fraction}"
            )
        if isinstance(self.face_window, str) and self.face_window != "auto":
            raise ValueError(
                f"IdentityLossConfig: face_window must be 'auto', a side in latents or None, got "
                f"{self.face_window!r}"
            )
        if isinstance(self.face_window, int) and self.face_window < 1:
            raise ValueError(f"IdentityLossConfig: face_window must be >= 1 latent, got {self.face_window}")
        if self.window_margin < 0:
            raise ValueError(f"IdentityLossConfig: window_margin must be >= 0, got {self.window_margin}")
        if not 0 < self.decode_scale <= 1:
            raise ValueError(f"IdentityLossConfig: decode_scale must be in (0, 1], got {self.decode_scale}")
        if self.decode_scale < 1 and self.latent_scale is None:
            raise ValueError("IdentityLossConfig: decode_scale needs latent_scale (pixels per latent)")
        if self.latent_scale is not None and self.latent_scale < 1:
            raise ValueError(
                f"IdentityLossConfig: latent_scale must be >= 1 pixel per latent, got {self.latent_scale}"
            )
        if self.face_window is not None and self.latent_scale is None:
            raise ValueError(
                "IdentityLossConfig: face_window needs latent_scale (pixels per latent, e.g. the "
                "codec's downsample factor)"
            )
        if self.align_size < 1:
            raise ValueError(f"IdentityLossConfig: align_size must be >= 1, got {self.align_size}")


@dataclass
class IdentityLossOutput:
    """The weighted loss and the figures a trainer logs (statistics are detached; NaN when num_used = 0)."""

    loss: torch.Tensor
    """lambda x mean over the WHOLE batch of W_t L_id (skipped samples count 0); add to L_denoise."""
    id_loss: torch.Tensor
    """Mean L_id = 1 - cos over the samples used."""
    weight_mean: torch.Tensor
    """Mean W_t over the samples used."""
    id_cosine: torch.Tensor
    """Mean cos(ArcFace(x), ArcFace(x0_hat)) over the samples used."""
    num_used: int


class IdentityLoss(nn.Module):
    """lambda x mean_b(W_t L_id) with a frozen, differentiable face encoder (Diff-ID eq. (18)-(21))."""

    def __init__(self, face_encoder: nn.Module, config: IdentityLossConfig | None = None):
        """``face_encoder``: (B, 3, 112, 112) crops in [-1, 1] -> (B, 512) embeddings; frozen here."""
        super().__init__()
        self.config = config or IdentityLossConfig()
        self.face_encoder = face_encoder
        self.face_encoder.requires_grad_(False)
        self.face_encoder.eval()

    def train(self, mode: bool = True) -> IdentityLoss:
        super().train(mode)
        self.face_encoder.eval()  # BatchNorm statistics stay those of the pretrained encoder
        return self

    def select(
        self,
        timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sorted indices of the samples the loss is computed on.

        Eligible: ``active`` (False where the identity input was dropped for classifier-free guidance:
        such a sample cannot be asked to reproduce an identity it never saw) and below the timestep
        threshold; of those, the batch fraction.
        """
        cfg = self.config
        ok = torch.ones_like(timesteps, dtype=torch.bool)
        if active is not None:
            ok &= active.to(device=timesteps.device, dtype=torch.bool)
        if cfg.max_timestep is not None:
            ok &= timesteps < cfg.max_timestep
        idx = ok.nonzero().flatten()
        if cfg.batch_fraction < 1 and len(idx):
            n = min(len(idx), max(1, math.ceil(cfg.batch_fraction * len(timesteps))))
            device = generator.device if generator is not None else "cpu"
            perm = torch.randperm(len(idx), generator=generator, device=device)[:n].to(idx.device)
            idx = idx[perm.sort().values]
        return idx

    def window_bounds(self, landmarks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(B, 4) x_lo, y_lo, x_hi, y_hi in latents: the part of the image each ArcFace crop reads
        (its inverse-warped corners, clipped to the image), widened by ``window_margin``."""
        cfg = self.config
        h, w = latent_hw
        edges = crop_corners(landmarks.detach().float(), cfg.align_size) + 0.5  # (B, 4, 2) pixel edges
        lo = torch.floor(edges.amin(1) / cfg.latent_scale) - cfg.window_margin  # (B, 2)
        hi = torch.ceil(edges.amax(1) / cfg.latent_scale) + cfg.window_margin
        size = torch.tensor([w, h], dtype=lo.dtype, device=lo.device)
        lo = torch.minimum(lo.clamp_min(0), size - 1)
        hi = torch.maximum(torch.minimum(hi, size), lo + 1)
        return torch.cat([lo, hi], -1).long()

    def _window(
        self, latents: torch.Tensor, landmarks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Cut each latent to a window holding its ArcFace crop; (windows, landmarks in window pixels, side)."""
        cfg = self.config
        h, w = latents.shape[-2:]
        bounds = self.window_bounds(landmarks, (h, w))  # (B, 4)
        need_w = int((bounds[:, 2] - bounds[:, 0]).max())
        need_h = int((bounds[:, 3] - bounds[:, 1]).max())
        if cfg.face_window == "auto":
            win_w, win_h = need_w, need_h
        else:
            win_w, win_h = min(cfg.face_window, w), min(cfg.face_window, h)
            if need_w > win_w or need_h > win_h:
                raise ValueError(
                    f"identity_loss.face_window: {cfg.face_window} latents cannot hold the ArcFace crop "
                    f"(it reads a {need_w} x {need_h}-latent part of the {w} x {h} latent, margin "
                    f"included); set face_window to >= {max(need_w, need_h)} or 'auto'"
                )
        cx = (bounds[:, 0] + bounds[:, 2]).float() / 2
        cy = (bounds[:, 1] + bounds[:, 3]).float() / 2
        x0 = torch.floor(cx - win_w / 2 + 0.5).long().clamp(0, w - win_w)
        y0 = torch.floor(cy - win_h / 2 + 0.5).long().clamp(0, h - win_h)
        crops = torch.stack(
            [latents[i, :, y0[i] : y0[i] + win_h, x0[i] : x0[i] + win_w] for i in range(latents.shape[0])]
        )  # (B, C, win_h, win_w)
        offset = torch.stack([x0, y0], -1).to(landmarks)[:, None, :] * cfg.latent_scale  # (B, 1, 2) pixels
        return crops, landmarks - offset, (win_h, win_w)

    def _decode(self, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        if self.config.checkpoint_decoder and torch.is_grad_enabled():
            return checkpoint(decode, latents, use_reentrant=False)
        return decode(latents)

    def forward(
        self,
        *,
        x0_hat: torch.Tensor,
        decode: Callable[[torch.Tensor], torch.Tensor],
        timesteps: torch.Tensor,
        landmarks: torch.Tensor,
        reference_embeds: torch.Tensor,
        generator: torch.Generator | None = None,
        active: torch.Tensor | None = None,
    ) -> IdentityLossOutput:
        """Weighted identity loss of predicted clean latents ``x0_hat`` (B, C, h, w).

        Args:
            x0_hat: predicted clean latents (or pixels, with an identity ``decode``).
            decode: latents -> images in [-1, 1], (B, 3, h*s, w*s) with s = ``latent_scale``.
            timesteps: (B,) training timesteps t.
            landmarks: (B, 5, 2) landmarks in pixel coordinates of the full decoded image.
            reference_embeds: (B, 512) ArcFace(x_original); treated as constants.
            generator: random source of the ``batch_fraction`` choice.
            active: (B,) bool, False for samples whose identity input was dropped (no identity term).
        """
        cfg = self.config
        b = x0_hat.shape[0]
        if landmarks.shape != (b, 5, 2):
            raise ValueError(
                f"IdentityLoss: landmarks must be ({b}, 5, 2) pixel coordinates, got {tuple(landmarks.shape)}"
            )
        idx = self.select(timesteps, generator, active)
        zero = x0_hat.sum() * 0.0  # keeps the graph (and DDP's parameter bookkeeping) when nothing is used
        if len(idx) == 0:
            nan = torch.full((), float("nan"), device=x0_hat.device)
            return IdentityLossOutput(zero, nan, nan, nan, 0)
        z, lms = x0_hat[idx], landmarks[idx].float()
        if cfg.face_window is not None:
            z, lms, _ = self._window(z, lms)
        if cfg.decode_scale < 1:
            zh, zw = z.shape[-2:]
            size = (max(1, round(zh * cfg.decode_scale)), max(1, round(zw * cfg.decode_scale)))
            z = F.interpolate(z, size=size, mode="bilinear", antialias=True, align_corners=False)
            ratio = torch.tensor([size[1] / zw, size[0] / zh], dtype=lms.dtype, device=lms.device)
            lms = (lms + 0.5) * ratio - 0.5  # pixel centres of the smaller decoded image
        images = self._decode(decode, z)  # (n, 3, H, W)
        resized = cfg.face_window is not None or cfg.decode_scale < 1
        if resized and images.shape[-2] != z.shape[-2] * cfg.latent_scale:
            raise ValueError(
                f"IdentityLoss: decode maps {z.shape[-2]} latents to {images.shape[-2]} px, but "
                f"latent_scale={cfg.latent_scale}; set latent_scale to the codec's pixels per latent"
            )
        crops = warp_to_template(
            images.float(), lms, out_size=cfg.align_size, antialias=cfg.antialias
        )  # (n, 3, 112, 112)
        emb = F.normalize(self.face_encoder(crops).float(), dim=-1)
        ref = F.normalize(reference_embeds[idx].detach().float().to(emb.device), dim=-1)
        cos = (emb * ref).sum(-1)  # (n,)
        l_id = 1.0 - cos  # eq. (18)
        w_t = timestep_weight(timesteps[idx], cfg.num_train_timesteps, cfg.k).to(l_id.device)  # eq. (19)
        loss = cfg.lambda_id * (w_t * l_id).sum() / b + zero  # eq. (20)-(21): mean over the whole batch
        return IdentityLossOutput(
            loss, l_id.mean().detach(), w_t.mean().detach(), cos.mean().detach(), len(idx)
        )
