"""Algorithm 1 (FlowID paper 000; FINEdits paper 002): invert, mask, masked denoising.

:class:`Editor` holds one photo and its (optionally fine-tuned) backbone, so sequential edits of
the same photo reuse the tuned weights (FINEdits' EditFFHQ protocol). One edit:

    levels 0 (clean) .. K (strength t_s);  z_ref_0 = z0
    inversion   z_ref_{k+1} = move(z_ref_k, k -> k+1, c_src)          (trajectory kept)
    mask        at level k_M = round(K * mask_at) (t_M < t_s):
                removal  -- attention to the concept in c_src, recorded during inversion;
                addition -- denoise K -> k_M with c_tgt unmasked, record there, go back to K
    editing     z'_{k-1} = move(z_k, k -> k-1, c_tgt);  z_{k-1} = M z'_{k-1} + (1 - M) z_ref_{k-1}

Optional guidance of the editing pass (not in the papers' Algorithm 1, off by default): c_tgt is
replaced by p(c_neg) + w (p(c_tgt) - p(c_neg)), the negative being the source prompt unless given,
for backbones whose prompts steer weakly.

With a binary mask (no blur) the latent outside the mask equals the source trajectory exactly at
every level, so the unedited region decodes to the inverted-and-kept source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .attention import maps_to_grid
from .backbone import EditBackbone, Guided
from .finetune import FinetuneConfig, finetune
from .mask import make_mask, scaled_kernel

log = logging.getLogger(__name__)

MODES = ("removal", "addition")


@dataclass(frozen=True)
class Preset:
    """FINEdits Table 3: max-pool kernel (on SD3's 64-token grid at 1024 px) and inversion strength."""

    kernel: int
    strength: float


PRESETS: dict[str, Preset] = {
    "hair_color": Preset(15, 0.92),
    "hat": Preset(15, 0.90),
    "glasses": Preset(21, 0.80),
    "hair": Preset(11, 0.90),
    "beard": Preset(25, 0.94),
    "earrings": Preset(11, 0.86),
    "smiling": Preset(11, 0.72),
}


@dataclass
class EditResult:
    latent: torch.Tensor
    """Edited z0 (1, C, h, w)."""
    image: torch.Tensor
    """Decoded (1, 3, H, W) in [-1, 1]."""
    mask: torch.Tensor | None
    """(1, 1, h, w) in [0, 1] at the latent grid, or None (unmasked edit)."""
    trajectory: list[torch.Tensor]
    """z_ref_0 .. z_ref_K of the inversion."""
    attention: torch.Tensor | None = None
    """The averaged concept attention map (1, 1, h, w) the mask came from."""


class Editor:
    """One photo on one backbone: fine-tune once, edit as often as wanted."""

    def __init__(self, backbone: EditBackbone, image: torch.Tensor):
        self.backbone = backbone
        with torch.no_grad():
            self.z0 = backbone.encode_image(image.to(backbone.device))  # (1, C, h, w)
        self.tuned_steps = 0
        self.losses: list[float] = []

    def finetune(self, prompt: str, cfg: FinetuneConfig, progress=None) -> list[float]:
        """Algorithm 1 line 1 on (this photo, ``prompt``); the weights stay tuned for later edits."""
        losses = finetune(self.backbone, self.z0, prompt, cfg, progress)
        self.tuned_steps += cfg.steps
        self.losses += losses
        return losses

    @torch.no_grad()
    def invert(self, prompt: str, levels: torch.Tensor, record_at: int | None = None, concept=None):
        """z0 -> level K with ``prompt``; returns (trajectory, attention maps recorded at ``record_at``)."""
        bb = self.backbone
        cond = bb.condition(prompt)
        traj, maps = [self.z0], []
        for k in range(len(levels) - 1):
            if k == record_at:
                bb.recorder.start(bb.concept_indices(prompt, concept))
            traj.append(bb.move(traj[-1], levels, k, k + 1, cond))
            if k == record_at:
                maps = bb.recorder.stop()
        return traj, maps

    @torch.no_grad()
    def edit(
        self,
        source: str,
        target: str,
        concept: str | None = None,
        strength: float = 0.9,
        steps: int = 50,
        mode: str = "removal",
        mask_at: float = 0.5,
        kernel: int = 15,
        blur: float = 0.0,
        chain: bool = False,
        mask: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        negative: str | None = None,
    ) -> EditResult:
        """Edit the photo (or, ``chain``, the previous edit's result) from ``source`` to ``target``.

        Args:
            concept: words of the prompt naming what changes (in ``source`` for removal, in
                ``target`` for addition); None: no mask (plain inversion + denoising).
            strength: t_s in (0, 1] (FINEdits Table 3 per edit type, :data:`PRESETS`).
            steps: steps of a full 0 -> 1 schedule; round(steps * strength) are run each way.
            mode: ``removal`` (mask from the inversion) or ``addition`` (mask from a first pass).
            mask_at: t_M as a fraction of t_s (the level where attention is read).
            kernel: max-pool kernel on SD3's 64-token grid (Table 3); scaled to this latent grid.
            blur: Gaussian sigma of the mask in latent pixels (0: binary mask).
            mask: a given (1, 1, h, w) mask instead of the attention one.
            guidance_scale: w of the editing pass, p = p(negative) + w (p(target) - p(negative));
                1 (default): the papers' unguided Algorithm 1. The inversion stays unguided (it
                must retrace the photo), so with target = source the result does not change.
            negative: the guidance's negative prompt; None: the source prompt (the guidance then
                amplifies exactly what the target changes); "" for classifier-free guidance.
        """
        if mode not in MODES:
            raise ValueError(f"edit mode {mode!r}: choose one of {', '.join(MODES)}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        bb = self.backbone
        levels = bb.levels(steps, strength)
        big_k = len(levels) - 1
        k_m = min(big_k - 1, max(0, round(big_k * mask_at)))
        negative = source if negative is None else negative
        bb.encode_prompts(self.prompts(source, target, guidance_scale, negative))  # one text-encoder visit
        if chain and getattr(self, "last", None) is not None:
            self.z0 = self.last
        use_attention = concept is not None and mask is None
        record = k_m if use_attention and mode == "removal" else None
        traj, maps = self.invert(source, levels, record, concept)
        c_plain = bb.condition(target)
        c_tgt = c_plain if guidance_scale == 1.0 else Guided(c_plain, bb.condition(negative), guidance_scale)
        attention = None
        if use_attention and mode == "addition":
            z = traj[-1]
            for k in range(big_k, k_m, -1):
                z = bb.move(z, levels, k, k - 1, c_tgt)
            bb.recorder.start(bb.concept_indices(target, concept))
            bb.move(z, levels, k_m, max(k_m - 1, 0), c_plain)  # one forward at t_M, for its attention
            maps = bb.recorder.stop()
        if use_attention:
            p = self._patch()
            grid = (self.z0.shape[-2] // p, self.z0.shape[-1] // p)  # the attention's token grid
            attention = maps_to_grid(maps, grid)
            mask = make_mask(attention, kernel=scaled_kernel(kernel, grid[1]), sigma=blur)
            if p > 1:  # mask made on the token grid, applied on the latent grid
                mask = torch.nn.functional.interpolate(mask, size=self.z0.shape[-2:], mode="nearest")
        z = traj[-1]
        m = None if mask is None else mask.to(z.device, torch.float32)
        for k in range(big_k, 0, -1):
            z_new = bb.move(z, levels, k, k - 1, c_tgt)
            z = z_new if m is None else (m * z_new.float() + (1 - m) * traj[k - 1].float()).to(z.dtype)
        self.last = z
        return EditResult(z, bb.decode(z), m, traj, attention)

    @staticmethod
    def prompts(
        source: str, target: str, guidance_scale: float = 1.0, negative: str | None = None
    ) -> list[str]:
        """The prompts one :meth:`edit` conditions on (the negative only when it guides), so a caller
        can encode several edits' prompts in one text-encoder visit (SPEC sec. 5)."""
        guided = guidance_scale != 1.0 and negative is not None
        return [source, target, negative] if guided else [source, target]

    def _patch(self) -> int:
        """The denoiser's patch size (SD3: 2; UNet: 1): k-means runs on the attention's own grid."""
        return int(getattr(self.backbone.denoiser.config, "patch_size", 1) or 1)
