"""``IdentityPipeline``: the identity-conditioned generator as a diffusers pipeline.

A :class:`diffusers.StableDiffusionPipeline` subclass whose components are registered (unet, vae,
text_encoder, tokenizer, scheduler, adapter, image_encoder, face_encoder), so ``save_pretrained`` /
``from_pretrained`` carry the whole model. It forms the identity context (Diff-ID sec. 3.2: the
adapter's ``e_refined`` replaces the text states; the ``decoupled`` variant keeps the text and
passes identity tokens through ``cross_attention_kwargs``) and hands it to the stock
``StableDiffusionPipeline.__call__`` as ``prompt_embeds``: the stock code prepares the latents,
steps the scheduler (DDIM, DPM-Solver++, Euler by name), shows the progress bar, decodes with the
VAE and handles ``enable_model_cpu_offload``.

Guidance (FlashFace sec. 3.3 form, written for identity instead of reference features)::

    Y = Y_none + s_text (Y_text - Y_none) + s_id (Y_text&id - Y_text)

with Y_none = (null identity, negative prompt), Y_text = (null identity, prompt), Y_text&id =
(identity, prompt). ``s_id = s_text = s`` gives classic CFG against the null branch,
Y_none + s (Y_text&id - Y_none), the former sampler's rule. The stock loop only knows two-branch
CFG, so it runs with ``guidance_scale=1`` and a forward pre-hook / hook pair on the UNet batches
the branches that have a non-zero weight into ONE UNet call per step and combines them; nothing
else of the stock loop changes. The null identity is the adapter applied to zeroed embeddings, the
input identity dropout trains.

ReferenceNet generators (FlashFace sec. 3.3, SPEC.md sec. 3): given ``reference_images``, the
ReferenceNet encodes them ONCE per generation (it sees a fixed timestep, so its features do not depend
on the step) and every step runs the three branches [none | text | text&ref] in one UNet call,
combined by eq. (3) with lambda_text = ``guidance_scale`` (7.5) and lambda_ref = ``reference_guidance_scale``
(2.0); ``lambda_feat`` (0.85) blends the reference attention with the plain one (eq. (2)). The
ReferenceNet is saved beside the components in ``reference_net/`` (not a diffusers component: it is
attached to the main UNet's processors) and loaded back by :meth:`IdentityPipeline.from_pretrained`.
``adapter=None`` is the ReferenceNet-only generator (the UNet attends to the text states).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from idforge.models.attention import (
    PassThroughAttnProcessor,
    is_stock_processor,
    iter_attention_layers,
    processor_key,
)
from idforge.models.face_mask import box_mask, face_mask_input
from idforge.models.guidance import LAMBDA_REF
from idforge.models.referencenet import ReferenceNet

# model_index.json names these component classes: importing the pipeline alone must make them loadable
from . import components  # noqa: F401

REFERENCE_DIR = "reference_net"
REFERENCE_INPUT = "reference_input.json"
LAMBDA_FEAT = 0.85

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "dpm++", "euler")


def make_scheduler(name: str, config):
    """An inference scheduler by name from a (training) scheduler config: ``ddim`` (eta 0,
    deterministic; Song et al. 2021), ``dpm++`` (DPM-Solver++ 2M, Lu et al. 2022), ``euler``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")


@dataclass
class IdentityEmbeds:
    """One person's (or a mix's) identity inputs: ArcFace (B, 512) and CLIP image (B, D) or (B, N, D)."""

    arcface: torch.Tensor
    clip: torch.Tensor

    def expand(self, n: int) -> IdentityEmbeds:
        if self.arcface.shape[0] == n:
            return self
        if self.arcface.shape[0] != 1:
            raise ValueError(f"identity embeddings have batch {self.arcface.shape[0]}; expected 1 or {n}")
        return IdentityEmbeds(self.arcface.expand(n, -1), self.clip.expand(n, *self.clip.shape[1:]))

    def repeat_interleave(self, n: int) -> IdentityEmbeds:
        return IdentityEmbeds(self.arcface.repeat_interleave(n, 0), self.clip.repeat_interleave(n, 0))

    def zeros_like(self) -> IdentityEmbeds:
        return IdentityEmbeds(torch.zeros_like(self.arcface), torch.zeros_like(self.clip))

    def scaled(self, s: float) -> IdentityEmbeds:
        return IdentityEmbeds(self.arcface * s, self.clip * s)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation, Diff-ID sec. 3.4 (A.1.5): sin((1-t)w)/sin w a + sin(t w)/sin w b,
    w = arccos(a.b / |a||b|) over the last axis; plain LERP where a and b are (anti)parallel."""
    af, bf = a.flatten(1).float(), b.flatten(1).float()
    cos = (af * bf).sum(-1) / (af.norm(dim=-1) * bf.norm(dim=-1)).clamp_min(eps)
    w = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]  # (B, 1)
    sin_w = torch.sin(w)
    safe = sin_w.abs() > eps
    ca = torch.where(safe, torch.sin((1 - t) * w) / sin_w.where(safe, torch.ones_like(sin_w)), 1 - t)
    cb = torch.where(
        safe, torch.sin(t * w) / sin_w.where(safe, torch.ones_like(sin_w)), torch.full_like(w, t)
    )
    return (ca * af + cb * bf).reshape(a.shape).to(a.dtype)


def mix_identities(a: IdentityEmbeds, b: IdentityEmbeds, weight: float) -> IdentityEmbeds:
    """Identity mixing: SLERP of both embeddings, ``weight`` 0 -> ``a``, 1 -> ``b``."""
    return IdentityEmbeds(slerp(a.arcface, b.arcface, weight), slerp(a.clip, b.clip, weight))


class IdentityPipeline(StableDiffusionPipeline):
    """Stable Diffusion with identity conditioning (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->image_encoder->face_encoder->adapter->unet->vae"
    _optional_components: ClassVar[list[str]] = ["adapter", "safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload: ClassVar[list[str]] = ["safety_checker"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        adapter,
        image_encoder,
        face_encoder,
        resolution: int | None = None,
        crop_scale: float = 1.0,
        template: str = "arcface",
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            adapter=adapter,
            image_encoder=image_encoder,
            face_encoder=face_encoder,
        )
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = int(resolution or unet.config.sample_size * scale)
        self.register_to_config(resolution=resolution, crop_scale=float(crop_scale), template=template)
        self.vae_scale_factor = scale
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale)
        self.safety_checker = None
        self.feature_extractor = None
        self.reference_net: ReferenceNet | None = None
        self.face_mask, self.reference_size = "none", 224
        self._install_identity_processors()

    # ------------------------------------------------------------------ components
    def set_reference_net(
        self, reference_net: ReferenceNet, face_mask: str = "none", reference_size: int = 224
    ):
        """Use ``reference_net`` (already attached to ``self.unet``) for ``reference_images``."""
        self.reference_net, self.face_mask, self.reference_size = (
            reference_net,
            face_mask,
            int(reference_size),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, then the ReferenceNet of ``reference_net/`` when the folder has one."""
        import json
        from pathlib import Path

        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path) / REFERENCE_DIR
        if folder.is_dir():
            ref = ReferenceNet.from_pretrained(folder, pipe.unet)
            opts = json.loads((folder / REFERENCE_INPUT).read_text())
            ref.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
            pipe.set_reference_net(ref, opts["face_mask"], opts["image_size"])
        return pipe

    def _install_identity_processors(self) -> None:
        if self.adapter is None:
            return
        procs = self.adapter.processors
        if not len(procs):
            return
        layers = {}
        current = self.unet.attn_processors
        for name, _, cross in iter_attention_layers(self.unet):
            if cross is not None and processor_key(name) not in procs:
                raise ValueError(f"adapter has no identity processor for the UNet layer {name}")
            if cross is not None:
                layers[name] = procs[processor_key(name)]
            elif is_stock_processor(current[name]):
                layers[name] = PassThroughAttnProcessor()
            else:  # a ReferenceNet's reference processor on this self-attention layer stays
                layers[name] = current[name]
        if sum(1 for n in layers if processor_key(n) in procs) != len(procs):
            raise ValueError("adapter's identity processors do not match this UNet's cross-attention layers")
        self.unet.set_attn_processor(layers)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' ``save_pretrained`` (safetensors); the UNet is written with stock processors so
        ``UNet2DConditionModel.from_pretrained`` loads it; identity processors live in ``adapter/``."""
        import json
        from pathlib import Path

        procs = self.unet.attn_processors
        if self.reference_net is not None:  # reference processors' weights, read before they are swapped
            self.reference_net.save_pretrained(Path(save_directory) / REFERENCE_DIR, self.unet)
            (Path(save_directory) / REFERENCE_DIR / REFERENCE_INPUT).write_text(
                json.dumps({"face_mask": self.face_mask, "image_size": self.reference_size})
            )
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            kwargs.setdefault("safe_serialization", True)
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.unet.set_attn_processor(procs)

    def set_scheduler(self, name: str) -> None:
        """Swap the inference scheduler by name (``ddim``, ``dpm++``, ``euler``), same noise schedule."""
        self.scheduler = make_scheduler(name, self.scheduler.config)

    @property
    def template_landmarks(self) -> np.ndarray:
        """(5, 2) landmarks of an aligned crop at the pipeline's resolution and ``crop_scale``."""
        from idforge.data_pipeline.align import template_for

        return template_for(int(self.config.resolution), float(self.config.crop_scale))

    # ------------------------------------------------------------------ identity inputs
    @torch.no_grad()
    def encode_identity(
        self, references: torch.Tensor, landmarks: torch.Tensor | None = None
    ) -> IdentityEmbeds:
        """(e_arc, e_i) of 1..N aligned reference crops (N, 3, H, W) in [-1, 1] of ONE person: the mean
        of the references' embeddings (ArcFace re-normalised). ``landmarks`` (N, 5, 2) default to the
        template of an aligned crop at ``crop_scale``."""
        from idforge.models.face.align_torch import warp_to_template

        device = self._execution_device
        refs = references.to(device, torch.float32)
        if landmarks is None:
            lms = torch.as_tensor(self.template_landmarks, dtype=torch.float32)
            lms = lms * (refs.shape[-1] / int(self.config.resolution))
            landmarks = lms.expand(refs.shape[0], 5, 2)
        crops = warp_to_template(refs, landmarks.to(device, torch.float32), out_size=112)
        arc = self.face_encoder(crops.to(self.face_encoder.dtype)).float()  # (N, 512)
        clip = self.image_encoder(refs).float()  # (N, D) or (N, P, D)
        arc = torch.nn.functional.normalize(arc.mean(0, keepdim=True), dim=-1)
        return IdentityEmbeds(arc, clip.mean(0, keepdim=True))

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """e_t: (B, 77, D) last hidden states of the CLIP text encoder."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self._execution_device))[0]

    @torch.no_grad()
    def condition(self, identity: IdentityEmbeds, text_states: torch.Tensor, adapter_scale: float = 1.0):
        """The adapter's output for one branch: (context (B, L, C), id_tokens or None).

        ``adapter_scale`` scales the identity embeddings (context-replacing variants) or the
        identity attention (``decoupled``: ``id_scale``)."""
        if self.adapter is None:  # ReferenceNet only: the text states are the context
            return text_states, None
        decoupled = self.adapter.variant == "decoupled"
        ident = identity if decoupled else identity.scaled(adapter_scale)
        device = text_states.device
        cond = self.adapter(ident.arcface.to(device), ident.clip.to(device), text_states)
        return cond.context, cond.id_tokens

    # ------------------------------------------------------------------ guidance on the stock loop
    @contextmanager
    def _guided_unet(
        self,
        branches: list[tuple[float, torch.Tensor, torch.Tensor | None]],
        id_scale: float,
        reference=None,
        mask_channels: torch.Tensor | None = None,
    ):
        """Hooks that turn each stock UNet call into one batched call over ``branches``
        ((weight, context, id_tokens)) and return the weighted sum of their predictions.

        ``reference``: ReferenceFeatures for the k*B batch (cached once); ``mask_channels``
        (k*B, e, h, w) the face-mask channels appended to the sample."""
        weights = [w for w, _, _ in branches]
        context = torch.cat([c for _, c, _ in branches])  # (k*B, L, C)
        id_tokens = None
        if branches[0][2] is not None:
            id_tokens = torch.cat([t for _, _, t in branches])  # (k*B, n, C)
        k = len(branches)

        def pre_hook(module, args, kwargs):
            sample, t = args[0], args[1] if len(args) > 1 else kwargs.pop("timestep")
            kwargs = dict(kwargs)
            kwargs["encoder_hidden_states"] = context.to(sample.dtype)
            extra = {}
            if id_tokens is not None:
                extra = {"id_tokens": id_tokens.to(sample.dtype), "id_scale": id_scale}
            if reference is not None:
                extra["reference"] = reference
            if extra:
                kwargs["cross_attention_kwargs"] = extra
            x = torch.cat([sample] * k)
            if mask_channels is not None:
                x = torch.cat([x, mask_channels.to(x.dtype)], dim=1)  # (k*B, c + e, h, w)
            return (x, t), kwargs

        def hook(module, args, kwargs, output):
            pred = output[0] if isinstance(output, tuple) else output.sample
            parts = pred.chunk(k)
            out = sum(w * p for w, p in zip(weights, parts))
            return (out,) if isinstance(output, tuple) else type(output)(sample=out)

        h1 = self.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        h2 = self.unet.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        identity: IdentityEmbeds | None = None,
        references: torch.Tensor | None = None,
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        identity_guidance_scale: float | None = None,
        adapter_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        reference_images: torch.Tensor | None = None,
        reference_guidance_scale: float = LAMBDA_REF,
        lambda_feat: float = LAMBDA_FEAT,
        face_box: torch.Tensor | None = None,
    ):
        """Generate images of ``identity`` (or of the aligned ``references`` (N, 3, H, W) in [-1, 1],
        one person) for each prompt.

        Args:
            prompt: one prompt or a list (B); the identity is broadcast, or gives one per prompt.
            identity: :class:`IdentityEmbeds` with batch 1 or B (see :meth:`encode_identity`,
                :func:`mix_identities`); None with no ``references`` is the null identity.
            negative_prompt: the null branch's prompt.
            guidance_scale: s_text of the module docstring (1: no guidance).
            identity_guidance_scale: s_id (default: ``guidance_scale``, classic CFG).
            adapter_scale: identity strength (0: the null identity).
            latents: start from this z_T (B * num_images_per_prompt, C, h, w) (morphing).
            output_type: ``pil``, ``np``, ``pt`` (images in [0, 1]) or ``latent``.
            reference_images: (N, 3, H, W) in [-1, 1], one person's faces for the ReferenceNet
                (three-branch guidance: ``guidance_scale`` is lambda_text, e.g. 7.5).
            reference_guidance_scale: lambda_ref of eq. (3) (2.0).
            lambda_feat: eq. (2)'s blend of reference and plain attention (0.85).
            face_box: (4,) x0, y0, x1, y1 in output pixels for the face-mask channel (None: empty mask).
        """
        if reference_images is not None:
            return self._call_with_references(
                prompt, identity, references, negative_prompt, num_inference_steps, guidance_scale,
                adapter_scale, num_images_per_prompt, height, width, generator, latents, eta,
                output_type, return_dict, callback_on_step_end, reference_images,
                reference_guidance_scale, lambda_feat, face_box,
            )  # fmt: skip
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
        if identity is None and references is not None:
            identity = self.encode_identity(references)
        device = self._execution_device
        text = self.encode_text(prompts)
        if identity is None:
            identity = self._null_identity(b, device)
        identity = identity.expand(b)
        n = num_images_per_prompt
        s_text = float(guidance_scale)
        s_id = s_text if identity_guidance_scale is None else float(identity_guidance_scale)
        null = identity.zeros_like()
        plan = [(s_id, identity, text), (s_text - s_id, null, text)]
        if s_text != 1.0:
            plan.append((1.0 - s_text, null, self.encode_text(negatives)))
        branches = []
        for w, ident, states in plan:
            if w == 0.0:
                continue
            ctx, tokens = self.condition(ident, states, adapter_scale)
            tokens = tokens.repeat_interleave(n, 0) if tokens is not None else None
            branches.append((w, ctx.repeat_interleave(n, 0), tokens))
        if not branches:  # every weight is zero: the prediction is zero; keep the stock shapes
            ctx, tokens = self.condition(identity, text, adapter_scale)
            branches = [(0.0, ctx.repeat_interleave(n, 0), tokens)]
        res = int(self.config.resolution)
        with self._guided_unet(branches, adapter_scale):
            return self._stock_loop(
                branches[0][1], num_inference_steps, height or res, width or res, generator, latents, eta,
                output_type, return_dict, callback_on_step_end,
            )  # fmt: skip

    def _null_identity(self, b: int, device) -> IdentityEmbeds:
        if self.adapter is None:
            return IdentityEmbeds(torch.zeros(b, 1, device=device), torch.zeros(b, 1, device=device))
        return IdentityEmbeds(
            torch.zeros(b, int(self.adapter.adapter.config.arcface_dim), device=device),
            torch.zeros(b, int(self.adapter.adapter.config.clip_dim), device=device),
        )

    @torch.no_grad()
    def encode_references(self, images: torch.Tensor, lambda_feat: float = LAMBDA_FEAT):
        """ReferenceNet features of one person's faces (N, 3, H, W) in [-1, 1], for a batch of 1."""
        if self.reference_net is None:
            raise ValueError(
                "IdentityPipeline: reference_images need a ReferenceNet; export a generator trained with "
                "generator.conditioning referencenet or both"
            )
        x = images.to(self._execution_device, torch.float32)
        size = self.reference_size
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        lat = self.encode_images(x.to(self.unet.dtype))[None]  # (1, N, c, h, w)
        empty = self.encode_text([""])  # (1, T, D): the ReferenceNet's text (see models/referencenet.py)
        return self.reference_net.encode_references(lat.to(self.unet.dtype), empty, lambda_feat=lambda_feat)

    def _call_with_references(
        self, prompt, identity, references, negative_prompt, num_inference_steps, guidance_scale,
        adapter_scale, n, height, width, generator, latents, eta, output_type, return_dict,
        callback_on_step_end, reference_images, lambda_ref, lambda_feat, face_box,
    ):  # fmt: skip
        """Three-branch guidance, FlashFace eq. (3): weights (1 - l_text, l_text - l_ref, l_ref) on
        [none | text | text&ref], one batched UNet call per step; references encoded once."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        device = self._execution_device
        negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
        if identity is None and references is not None and self.adapter is not None:
            identity = self.encode_identity(references)
        identity = (identity or self._null_identity(b, device)).expand(b)
        null = identity.zeros_like()
        feats = self.encode_references(reference_images, lambda_feat)  # once per generation
        m = b * n
        index, mask = feats.index.expand(m, -1, -1), feats.mask.expand(m, -1, -1)
        feats = type(feats)(feats.states, index, mask, lambda_feat)
        l_text, text = float(guidance_scale), self.encode_text(prompts)
        plan = [(1.0 - l_text, null, self.encode_text(negatives)), (l_text - lambda_ref, null, text)]
        plan.append((lambda_ref, identity, text))
        branches = []
        for w, ident, states in plan:
            ctx, tokens = self.condition(ident, states, adapter_scale)
            tokens = tokens.repeat_interleave(n, 0) if tokens is not None else None
            branches.append((w, ctx.repeat_interleave(n, 0), tokens))
        branch = torch.arange(3, device=mask.device).repeat_interleave(m)
        refs = feats.repeat(3).drop(branch < 2)  # references only in the text&ref branch
        res = int(self.config.resolution)
        h, w = height or res, width or res
        c = int(self.reference_net.config.latent_channels)
        shape = (m, c, h // self.vae_scale_factor, w // self.vae_scale_factor)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        mask_channels = None
        if self.face_mask != "none":
            box = (
                None
                if face_box is None
                else torch.as_tensor(face_box, dtype=torch.float32)[None].expand(m, 4)
            )
            fm = box_mask(box, (h, w), shape[-2:]) if box is not None else torch.zeros(m, 1, *shape[-2:])
            fm = fm.to(device).repeat(3, 1, 1, 1)
            drop = (branch < 2).to(device)  # the mask is dropped with the references (FlashFace)
            inp = face_mask_input(latents.repeat(3, 1, 1, 1), fm, None, drop)
            if self.face_mask == "inpaint":  # no target at generation: the masked latent is empty
                inp = torch.cat([inp, torch.zeros_like(latents.repeat(3, 1, 1, 1))], dim=1)
            mask_channels = inp[:, c:]
        with self._guided_unet(branches, adapter_scale, refs, mask_channels):
            return self._stock_loop(
                branches[0][1], num_inference_steps, h, w, generator, latents, eta, output_type, return_dict,
                callback_on_step_end,
            )  # fmt: skip

    def _stock_loop(
        self,
        prompt_embeds,
        steps,
        height,
        width,
        generator,
        latents,
        eta,
        output_type,
        return_dict,
        on_step_end,
    ):
        """diffusers' own denoising loop with its guidance off (the UNet hooks of :meth:`_guided_unet`
        batch and combine the branches)."""
        out = StableDiffusionPipeline.__call__(
            self,
            prompt_embeds=prompt_embeds,
            num_inference_steps=steps,
            guidance_scale=1.0,
            num_images_per_prompt=1,
            height=height,
            width=width,
            generator=generator,
            latents=latents,
            eta=eta,
            output_type=output_type,
            return_dict=True,
            callback_on_step_end=on_step_end,
        )
        return out if return_dict else (out.images, None)

    # ------------------------------------------------------------------ codec
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the space the UNet denoises (VAE mean latent x scaling
        factor). Deterministic (the posterior's mode)."""
        x = images.to(self._execution_device)
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()
        return z * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode_latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode_images`: (B, 3, H, W) in [-1, 1]."""
        z = latents / float(self.vae.config.scaling_factor)
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)
