"""Edit backbones behind one interface: SD3 (rectified flow) and SD1.5-style UNets (DDIM).

Algorithm 1 moves a latent between adjacent noise levels of a grid that runs from the clean image
(level 0) to the strength t_s (level K = round(steps * t_s)), in both directions, with the same
update rule: inversion goes up with the source prompt, editing comes down with the target prompt.
Each backbone supplies that grid, the one-level move, its own training loss, the prompt encoding
and where the concept's tokens sit in the sequence its attention sees.

- :class:`FlowBackbone`: ``StableDiffusion3Pipeline``. Levels are the stock
  ``FlowMatchEulerDiscreteScheduler`` sigmas (shifted); the move is FlowID Algorithm 1's Euler step
  z_b = z_a + (sigma_b - sigma_a) v(z_a, sigma_a). Training: z_t = (1 - t) z0 + t eps, target
  eps - z0, t ~ logit-normal (FINEdits eq. (1), SD3).
- :class:`UNetBackbone`: idforge's ``IdentityPipeline`` (an ``idforge export`` folder; the photo's
  own identity conditions it) or a plain ``StableDiffusionPipeline``. Levels are evenly spaced
  training timesteps t_k = k T / steps with the scheduler's alphas_cumprod (level 0 is the clean
  image, alpha = 1); the move is deterministic DDIM (Song et al. 2021, eta = 0), which run upwards
  is DDIM inversion. Training: the epsilon, v or x0 (``sample``) loss of the scheduler's
  ``prediction_type``. An x0-predicting model defines no noise direction at the clean level, so its
  first inversion step keeps the latent (z_ref_1 = z0) and inversion proceeds from level 1.

The edit runs its own level loop rather than the stock ``__call__`` because it must blend with the
stored trajectory after every step and record attention in the inversion pass; the updates are the
ones the stock schedulers implement.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import AttentionRecorder, concept_token_indices, install_recorder

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Guided:
    """A guided conditioning for :meth:`EditBackbone.move`: the denoiser's prediction is
    p(negative) + scale (p(positive) - p(negative)) (classifier-free guidance, Ho & Salimans 2022;
    with the source prompt as ``negative``, a directional guidance towards what the target changes).
    The moves are affine in the prediction, so guidance combines the two plain moves the same way."""

    positive: object
    negative: object
    scale: float


class EditBackbone(ABC):
    """A denoiser with encode/decode, prompt encoding, a level grid and the backbone's own loss."""

    joint_attention = False
    """SD3-style joint attention (True) or UNet cross-attention (False) for the recorder."""

    def __init__(self, pipe, denoiser: torch.nn.Module, resolution: int):
        self.pipe = pipe
        self.denoiser = denoiser
        self.resolution = int(resolution)
        self.recorder = AttentionRecorder()
        self.recording_layers = install_recorder(denoiser, self.recorder, joint=self.joint_attention)
        self._cond_cache: dict[str, object] = {}
        self.text_offload: torch.device | None = None
        """Where the text encoders wait between encodings (:meth:`offload_text_encoders`); None: in place."""

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # ---------------------------------------------------------------------------- per backbone
    @abstractmethod
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> z0."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z0 -> (B, 3, H, W) in [-1, 1]."""

    @abstractmethod
    def _encode_prompt(self, prompt: str):
        """The denoiser's conditioning for one prompt (batch 1)."""

    @abstractmethod
    def concept_indices(self, prompt: str, concept: str) -> list[int]:
        """Positions of the concept's tokens in the text sequence the attention layers see."""

    @abstractmethod
    def levels(self, steps: int, strength: float) -> torch.Tensor:
        """Noise levels from clean (index 0) to the strength (index K), ascending."""

    @abstractmethod
    def move(self, z: torch.Tensor, levels: torch.Tensor, a: int, b: int, cond) -> torch.Tensor:
        """One deterministic step of z from level ``a`` to the adjacent level ``b`` (up or down)."""

    @abstractmethod
    def draw_noise(self, n: int, shape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective's random draw for ``n`` samples: (t (n,), noise (n, *shape))."""

    @abstractmethod
    def training_loss(self, z0: torch.Tensor, cond, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The backbone's own objective on the batch z0 (n, C, h, w) with one conditioning."""

    # ---------------------------------------------------------------------------- shared
    @staticmethod
    def guided(predict, z: torch.Tensor, t, cond) -> torch.Tensor:
        """``predict(z, t, cond)``, or for a :class:`Guided` conditioning the guidance combination of
        the positive and negative predictions (in float32)."""
        if not isinstance(cond, Guided):
            return predict(z, t, cond)
        pos = predict(z, t, cond.positive).float()
        if cond.scale == 1.0:
            return pos
        neg = predict(z, t, cond.negative).float()
        return neg + cond.scale * (pos - neg)

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a (1, 3, H, W) image in [-1, 1] to the backbone's square resolution."""
        if image.shape[-2:] != (self.resolution, self.resolution):
            image = F.interpolate(image, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        return image

    def condition(self, prompt: str):
        """The denoiser's conditioning for ``prompt``, encoded once and cached (:meth:`encode_prompts`)."""
        return self.encode_prompts([prompt])[0]

    def encode_prompts(self, prompts: list[str]) -> list:
        """Conditionings of ``prompts``; only prompts not seen before run the text encoders, all in one
        visit: with :attr:`text_offload` set they come to the denoiser's device for it and go back after,
        so during fine-tuning and denoising they hold no accelerator memory (SPEC sec. 5)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if new:
            if self.text_offload is not None:
                self._move_text_encoders(self.device)
            with torch.no_grad():
                for p in new:
                    self._cond_cache[p] = self._encode_prompt(p)
            if self.text_offload is not None:
                self._move_text_encoders(self.text_offload)
            log.debug("encoded %d prompt(s); text encoders on %s", len(new), self.text_encoder_device)
        return [self._cond_cache[p] for p in prompts]

    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for n in TEXT_ENCODERS if (e := getattr(self.pipe, n, None)) is not None]

    @property
    def text_encoder_device(self) -> torch.device | None:
        encoders = self.text_encoders()
        return next(encoders[0].parameters()).device if encoders else None

    def offload_text_encoders(self, device: str | torch.device = "cpu") -> None:
        """Keep the text encoders on ``device`` (CPU) except while new prompts are encoded; now and from
        here on."""
        self.text_offload = torch.device(device)
        self._move_text_encoders(self.text_offload)

    def _move_text_encoders(self, device: torch.device) -> None:
        for enc in self.text_encoders():
            enc.to(device)
        if self.device.type == "cuda" and torch.device(device).type != "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ SD3
class FlowBackbone(EditBackbone):
    """SD3 through diffusers' ``StableDiffusion3Pipeline`` (rectified flow)."""

    joint_attention = True

    def __init__(self, pipe, resolution: int | None = None, max_sequence_length: int = 77):
        res = resolution or int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, pipe.transformer, res)

    def encode_image(self, image):
        vae = self.pipe.vae
        z = vae.encode(self.prepare_image(image).to(vae.device, vae.dtype)).latent_dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(self.dtype)

    def decode(self, z):
        vae = self.pipe.vae
        z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(z).sample.clamp(-1, 1).float()

    def _encode_prompt(self, prompt):
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return pe.to(self.dtype), pooled.to(self.dtype)  # (1, 77 + L_t5, D), (1, P)

    def concept_indices(self, prompt, concept):
        """CLIP positions (both CLIP encoders share them; their states are concatenated along
        channels), then T5 positions after the 77 CLIP tokens when the T5 branch is loaded."""
        idx = concept_token_indices(self.pipe.tokenizer, prompt, concept, 77)
        if self.pipe.tokenizer_2 is not None:
            idx2 = concept_token_indices(self.pipe.tokenizer_2, prompt, concept, 77)
            if idx2 != idx:
                raise ValueError(f"concept {concept!r}: the two CLIP tokenizers disagree ({idx} vs {idx2})")
        if self.pipe.text_encoder_3 is not None:
            t5 = concept_token_indices(self.pipe.tokenizer_3, prompt, concept, self.max_sequence_length)
            idx = idx + [77 + i for i in t5]
        return idx

    def levels(self, steps, strength):
        sched = self.pipe.scheduler
        sched.set_timesteps(steps)
        sigmas = sched.sigmas.flip(0)  # ascending, sigmas[0] = 0 (clean)
        k = max(1, round(steps * strength))
        return sigmas[: k + 1].to(self.device, torch.float32)

    def _velocity(self, z, sigma, cond):
        pe, pooled = cond
        n = z.shape[0]
        t = (sigma * self.pipe.scheduler.config.num_train_timesteps).expand(n).to(z.dtype)
        return self.denoiser(
            hidden_states=z,
            timestep=t,
            encoder_hidden_states=pe.expand(n, -1, -1),
            pooled_projections=pooled.expand(n, -1),
            return_dict=False,
        )[0]

    def move(self, z, levels, a, b, cond):
        v = self.guided(self._velocity, z, levels[a], cond)
        return (z.float() + (levels[b] - levels[a]) * v.float()).to(z.dtype)

    def draw_noise(self, n, shape, generator):
        return torch.sigmoid(torch.randn(n, generator=generator)), torch.randn(n, *shape, generator=generator)

    def training_loss(self, z0, cond, t, eps):
        n = z0.shape[0]
        t, eps = t.to(z0.device), eps.to(z0.device, z0.dtype)  # t ~ logit-normal(0, 1)
        tt = t.view(n, 1, 1, 1).to(z0.dtype)
        zt = (1 - tt) * z0 + tt * eps  # linear interpolant
        v = self._velocity(zt, t, cond)
        return F.mse_loss(v.float(), (eps - z0).float())


# ------------------------------------------------------------------------------------------ UNet
class UNetBackbone(EditBackbone):
    """idforge's ``IdentityPipeline`` (identity = the photo itself) or a ``StableDiffusionPipeline``."""

    def __init__(self, pipe, resolution: int | None = None):
        res = resolution or int(
            getattr(pipe.config, "resolution", 0) or pipe.unet.config.sample_size * pipe.vae_scale_factor
        )
        super().__init__(pipe, pipe.unet, res)
        self.identity = None
        alphas = pipe.scheduler.alphas_cumprod if hasattr(pipe.scheduler, "alphas_cumprod") else None
        if alphas is None:
            from diffusers import DDPMScheduler

            alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
        self.alphas_cumprod = alphas.float()
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)

    @property
    def is_identity(self) -> bool:
        return hasattr(self.pipe, "adapter")

    def encode_image(self, image):
        image = self.prepare_image(image)
        if self.is_identity:
            with torch.no_grad():
                identity = self.pipe.encode_identity(image.float())
            if self.identity is None or not (
                torch.equal(identity.arcface, self.identity.arcface)
                and torch.equal(identity.clip, self.identity.clip)
            ):
                self._cond_cache.clear()  # the prompts' conditioning depends on the identity
            self.identity = identity
            return self.pipe.encode_images(image).to(self.dtype)
        vae = self.pipe.vae
        z = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mode()
        return (z * vae.config.scaling_factor).to(self.dtype)

    def decode(self, z):
        if self.is_identity:
            return self.pipe.decode_latents_to_images(z).float()
        vae = self.pipe.vae
        return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1).float()

    def _encode_prompt(self, prompt):
        if self.is_identity:
            if self.identity is None:
                raise ValueError("encode the photo (encode_image) before the prompts: it gives the identity")
            ctx, id_tokens = self.pipe.condition(self.identity, self.pipe.encode_text([prompt]))
            return ctx.to(self.dtype), None if id_tokens is None else id_tokens.to(self.dtype)
        return self.pipe.encode_prompt(prompt, self.device, 1, False)[0].to(self.dtype), None

    def concept_indices(self, prompt, concept):
        return concept_token_indices(
            self.pipe.tokenizer, prompt, concept, self.pipe.tokenizer.model_max_length
        )

    def levels(self, steps, strength):
        k = max(1, round(steps * strength))
        return torch.tensor([round(i * self.num_train_timesteps / steps) for i in range(k + 1)]).clamp(
            max=self.num_train_timesteps - 1
        )

    def _alpha(self, levels, i) -> torch.Tensor:
        return torch.tensor(1.0) if i == 0 else self.alphas_cumprod[int(levels[i])]

    def _predict(self, z, t, cond):
        ctx, id_tokens = cond
        n = z.shape[0]
        kwargs = {}
        if id_tokens is not None:
            kwargs["cross_attention_kwargs"] = {"id_tokens": id_tokens.expand(n, -1, -1), "id_scale": 1.0}
        t = torch.as_tensor(t, device=z.device).expand(n) if torch.as_tensor(t).ndim == 0 else t.to(z.device)
        return self.denoiser(z, t, encoder_hidden_states=ctx.expand(n, -1, -1), return_dict=False, **kwargs)[
            0
        ]

    def move(self, z, levels, a, b, cond):
        """DDIM, eta = 0: x0 and eps from the prediction at level a, re-noised to level b."""
        if self.prediction_type == "sample" and a == 0:  # clean level: z = x0, no noise direction
            return z
        out = self.guided(self._predict, z, levels[a], cond).float()
        aa, ab = self._alpha(levels, a).to(z.device), self._alpha(levels, b).to(z.device)
        zf = z.float()
        if self.prediction_type == "v_prediction":
            x0 = aa.sqrt() * zf - (1 - aa).sqrt() * out
            eps = (1 - aa).sqrt() * zf + aa.sqrt() * out
        elif self.prediction_type == "sample":
            x0 = out
            eps = (zf - aa.sqrt() * x0) / (1 - aa).sqrt()
        else:
            eps = out
            x0 = (zf - (1 - aa).sqrt() * eps) / aa.sqrt()
        return (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).to(z.dtype)

    def draw_noise(self, n, shape, generator):
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t, torch.randn(n, *shape, generator=generator)

    def training_loss(self, z0, cond, t, eps):
        n = z0.shape[0]
        eps = eps.to(z0.device, z0.dtype)
        a = self.alphas_cumprod[t].view(n, 1, 1, 1).to(z0.device, z0.dtype)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = {"v_prediction": a.sqrt() * eps - (1 - a).sqrt() * z0, "sample": z0}.get(
            self.prediction_type, eps
        )
        return F.mse_loss(self._predict(zt, t, cond).float(), target.float())


# ------------------------------------------------------------------------------------------ loading
def load_backbone(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    resolution: int | None = None,
    offload_text_encoders: bool | None = None,
) -> EditBackbone:
    """An SD3 folder, an ``idforge export`` folder or a plain SD1.5 folder, by ``model_index.json``.

    ``offload_text_encoders``: keep the text encoders on the CPU between prompt encodings
    (:meth:`EditBackbone.offload_text_encoders`); None: when ``device`` is a GPU."""
    bb = _load_backbone(folder, device, dtype, resolution)
    if offload_text_encoders is None:
        offload_text_encoders = torch.device(device).type == "cuda"
    if offload_text_encoders:
        bb.offload_text_encoders("cpu")
    return bb


def _load_backbone(folder, device, dtype, resolution) -> EditBackbone:
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no model_index.json; give an SD3 diffusers folder or one written by `idforge export`"
        )
    kind = json.loads(index_file.read_text()).get("_class_name")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if kind == "StableDiffusion3Pipeline":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(folder, **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        return FlowBackbone(pipe, resolution)
    if kind == "IdentityPipeline":
        from idforge.inference.export import load_pipeline

        return UNetBackbone(load_pipeline(folder, device=device, dtype=dtype), resolution)
    if kind == "StableDiffusionPipeline":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        return UNetBackbone(pipe, resolution)
    raise ValueError(
        f"{index_file}: pipeline {kind!r} is not an edit backbone; use StableDiffusion3Pipeline, "
        "StableDiffusionPipeline or an `idforge export` folder"
    )
