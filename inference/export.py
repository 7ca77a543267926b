"""Export a trained generator as a self-contained :class:`IdentityPipeline` folder, and load it back.

Layout (``IdentityPipeline.save_pretrained``; safetensors only)::

    out/
      model_index.json            # IdentityPipeline + resolution, crop_scale, template
      unet/ vae/                  # plain UNet2DConditionModel / AutoencoderKL
      text_encoder/ tokenizer/
      scheduler/                  # the INFERENCE scheduler (DDIM by default), same noise schedule
      adapter/                    # adapter + identity attention processors: the adapter-only export
      image_encoder/ face_encoder/  # CLIP vision tower and ArcFace, copied in
      ip_adapter/ip-adapter.safetensors   # decoupled variant: diffusers' IP-Adapter format
      idforge.json                # resolution, crop_scale, variant, which weights (EMA or live)
      README.md                   # model card

The IP-Adapter file (``image_proj.{proj,norm}`` + ``ip_adapter.<2k+1>.to_{k,v}_ip.weight`` for the
k-th cross-attention layer, the key rule of diffusers' ``_convert_ip_adapter_attn_to_diffusers``)
loads into a stock SD1.5 pipeline with ``load_ip_adapter(out, subfolder="ip_adapter",
weight_name="ip-adapter.safetensors", image_encoder_folder=None)``; the image embeddings are
``concat(e_arc, e_i)`` of one person passed as ``ip_adapter_image_embeds`` (see
:func:`ip_adapter_image_embeds`: the stock pipeline repeats it over the batch, and with guidance it
takes the null identity first); the stock loop then reproduces idforge's sampling. The learnt zero-init gate of
:class:`~idforge.models.attention.IdentityAttnProcessor` is folded into ``to_v_ip`` (attention is
linear in V), so the stock processor at scale 1 computes the same output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from idforge.models.attention import processor_key
from idforge.models.codec import VaeCodec
from idforge.models.generator import IdentityGenerator

from idforge import __version__

from .components import FaceEncoderModel, IdentityAdapterModel, ImageEncoderModel
from .pipeline import IdentityPipeline, make_scheduler

log = logging.getLogger(__name__)

MANIFEST = "idforge.json"
IP_ADAPTER_DIR = "ip_adapter"
IP_ADAPTER_FILE = "ip-adapter.safetensors"


def pipeline_from_generator(
    model: IdentityGenerator, resolution: int, crop_scale: float = 1.0, scheduler: str = "ddim"
) -> IdentityPipeline:
    """An :class:`IdentityPipeline` sharing ``model``'s modules (nothing is copied: the encoders get
    thin diffusers wrappers), with an inference ``scheduler`` on the training noise schedule. Sampling
    of a live model (the demo's benchmark, the training sample grids) goes through this."""
    image_encoder = getattr(model, "image_encoder_model", None)
    if image_encoder is None:
        spec = getattr(model, "zoo_spec", None)
        if spec is None:
            raise ValueError(
                "pipeline_from_generator: the generator has no zoo_spec to read its CLIP config from"
            )
        image_encoder = ImageEncoderModel.from_encoder(model.image_encoder, spec.image_encoder)
    adapter = (
        IdentityAdapterModel.from_parts(model.adapter, model.unet) if model.adapter is not None else None
    )
    pipe = IdentityPipeline(
        vae=model.codec.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=make_scheduler(scheduler, model.scheduler.config),
        adapter=adapter,
        image_encoder=image_encoder,
        face_encoder=FaceEncoderModel.from_encoder(model.face_encoder),
        resolution=resolution,
        crop_scale=crop_scale,
    )
    if getattr(model, "reference_net", None) is not None:
        pipe.set_reference_net(model.reference_net, model.face_mask, model.reference_size)
    return pipe


def generator_from_pipeline(pipe: IdentityPipeline) -> IdentityGenerator:
    """The training-side view (:class:`IdentityGenerator`) of a pipeline's components, shared."""
    from diffusers import DDPMScheduler

    codec = VaeCodec(pipe.vae, sample_posterior=False)
    gen = IdentityGenerator(
        pipe.unet,
        codec,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.image_encoder.encoder,
        pipe.face_encoder.encoder,
        pipe.adapter.adapter if pipe.adapter is not None else None,
        DDPMScheduler.from_config(pipe.scheduler.config),
        train_unet=False,
        reference_net=pipe.reference_net,
        face_mask=pipe.face_mask,
        reference_size=pipe.reference_size,
    )
    gen.image_encoder_model = pipe.image_encoder
    return gen.eval()


def ip_adapter_state_dict(pipe: IdentityPipeline) -> dict[str, torch.Tensor]:
    """The decoupled adapter in diffusers' IP-Adapter format (see the module docstring)."""
    adapter = pipe.adapter.adapter
    if adapter.config.variant != "decoupled":
        raise ValueError(
            f"only the decoupled variant has an IP-Adapter form, this adapter is {adapter.config.variant!r}"
        )
    if adapter.norm_input is not None:
        raise ValueError(
            "an adapter with input_layernorm has no IP-Adapter form (ImageProjection has no input norm)"
        )
    if adapter.config.num_decoupled_tokens != 4:
        raise ValueError(
            "diffusers' IP-Adapter loader assumes 4 image tokens; this adapter has "
            f"{adapter.config.num_decoupled_tokens}"
        )
    state = {
        "image_proj.proj.weight": adapter.proj_decoupled.weight,
        "image_proj.proj.bias": adapter.proj_decoupled.bias,
        "image_proj.norm.weight": adapter.norm_decoupled.weight,
        "image_proj.norm.bias": adapter.norm_decoupled.bias,
    }
    key_id = 1
    for name in pipe.unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        proc = pipe.adapter.processors[processor_key(name)]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_id.weight
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.gate * proc.to_v_id.weight
        key_id += 2
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def ip_adapter_image_embeds(
    arcface: torch.Tensor, clip: torch.Tensor, classifier_free_guidance: bool = False
) -> torch.Tensor:
    """The image embeddings of the exported IP-Adapter: concat(e_arc, e_i), (B, 1, D).

    For a UNet call (``added_cond_kwargs={"image_embeds": [x]}``) row b conditions sample b. A stock
    pipeline's ``ip_adapter_image_embeds=[x]`` is one identity for the whole call, which the pipeline
    repeats over its prompts and images (a (B, 1, D) tensor there would give every sample the tokens of
    all B people): pass one person, (1, D) inputs, and with ``guidance_scale > 1`` set
    ``classifier_free_guidance`` so the zero (null) identity is stacked first, as the pipeline expects
    (it splits the tensor into negative and positive halves). That is idforge's own guidance: the
    empty prompt with the null identity against the prompt with the identity."""
    clip = clip.mean(1) if clip.dim() == 3 else clip  # patch tokens averaged, as the adapter does
    embeds = torch.cat([arcface, clip], dim=-1)[:, None]
    if not classifier_free_guidance:
        return embeds
    if embeds.shape[0] != 1:
        raise ValueError(
            f"ip_adapter_image_embeds: a stock pipeline takes one identity per call, got {embeds.shape[0]}; "
            "call the pipeline once per person (num_images_per_prompt for several images)"
        )
    return torch.cat([torch.zeros_like(embeds), embeds])


def model_card(info: dict) -> str:
    """README.md of an export: base model, data, steps, weights, metrics, intended use, limits."""
    metrics = info.get("metrics") or {}
    metric_lines = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (none recorded) | |"
    ip = (
        "\nThe decoupled adapter is also in diffusers' IP-Adapter format (`ip_adapter/`): "
        '`pipe.load_ip_adapter(DIR, subfolder="ip_adapter", weight_name="ip-adapter.safetensors", '
        "image_encoder_folder=None)`, image embeddings = concat(ArcFace, CLIP image embedding) of one "
        "person, shape (1, 1, D), the zero embedding stacked first when guidance_scale > 1 "
        "(`idforge.inference.export.ip_adapter_image_embeds`).\n"
        if info.get("ip_adapter")
        else ""
    )
    return f"""---
library_name: diffusers
tags: [idforge, identity, face, stable-diffusion]
---
# idforge identity model

Identity-conditioned generator (Diff-ID adapter, variant `{info.get("variant")}`) exported by idforge
{__version__}. Load with `idforge.inference.pipeline.IdentityPipeline.from_pretrained(DIR)` or run
`idforge generate --model DIR --ref photo.jpg --prompt "..."`.

| | |
|---|---|
| base model | {info.get("base", "unknown")} |
| training data | {info.get("data", "unknown")} |
| training steps | {info.get("steps", "unknown")} |
| weights | {info.get("weights", "live (as trained)")} |
| resolution | {info.get("resolution")} px |
| alignment | ArcFace 5-point template, crop_scale {info.get("crop_scale")} |
| scheduler | {info.get("scheduler", "ddim")} (inference; the training noise schedule) |

## Metrics
| metric | value |
|---|---|
{metric_lines}

## Intended use
Research on identity-preserving generation and editing: images of a consenting person from their
reference photos. References must be aligned like the training data (`idforge generate` detects and
aligns them).

## Limits
Identity fidelity is bounded by the face encoder and the training data; faces unlike the training
distribution (age, pose, occlusion, lighting) lose identity. Do not use it to impersonate people,
to make deceptive media, or for biometric identification.
{ip}"""


def export_generator(
    model: IdentityGenerator,
    out: str | Path,
    resolution: int,
    extra: dict | None = None,
    scheduler: str = "ddim",
    card: dict | None = None,
) -> Path:
    """Write ``model`` to ``out`` as a self-contained :class:`IdentityPipeline` folder; returns it.

    ``extra`` goes into ``idforge.json``; its ``crop_scale`` (the curation's alignment) goes into the
    pipeline config too. ``card`` fills the model card (base, data, steps, weights, metrics).
    """
    out = Path(out)
    extra = dict(extra or {})
    crop_scale = float(extra.get("crop_scale", 1.0))
    pipe = pipeline_from_generator(model, resolution, crop_scale=crop_scale, scheduler=scheduler)
    pipe.save_pretrained(out)
    variant = pipe.adapter.variant if pipe.adapter is not None else "referencenet"
    if (
        variant == "decoupled"
        and pipe.adapter.adapter.norm_input is None
        and (pipe.adapter.adapter.config.num_decoupled_tokens == 4)
    ):
        from safetensors.torch import save_file

        (out / IP_ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
        save_file(ip_adapter_state_dict(pipe), out / IP_ADAPTER_DIR / IP_ADAPTER_FILE)
    spec = getattr(model, "zoo_spec", None)
    manifest = {
        "format": "idforge-pipeline",
        "version": __version__,
        "resolution": int(resolution),
        "crop_scale": crop_scale,
        "variant": variant,
        "scheduler": scheduler,
        **extra,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    info = {
        "variant": variant,
        "base": spec.base if spec else None,
        "resolution": int(resolution),
        "crop_scale": crop_scale,
        "scheduler": scheduler,
        "ip_adapter": (out / IP_ADAPTER_DIR / IP_ADAPTER_FILE).is_file(),
        **(card or {}),
    }
    (out / "README.md").write_text(model_card(info))
    log.info("exported generator to %s", out)
    return out


def load_pipeline(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> IdentityPipeline:
    """``IdentityPipeline.from_pretrained(folder)`` with a one-line error for other folders."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder}: not a model folder; write one with `idforge export`")
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != "IdentityPipeline":
        raise ValueError(
            f"{folder}: written by an older idforge export ({index.get('_class_name')}); re-export it"
        )
    if not (folder / "vae" / "config.json").is_file():
        raise ValueError(
            f"{folder}: has no vae/ (a pixel-space model of an older idforge, which diffusers cannot run); "
            "train it again (`idforge demo` diffuses in a VAE's latents) and export it"
        )
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = IdentityPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_exported(folder: str | Path, device: str | torch.device = "cpu") -> tuple[IdentityGenerator, dict]:
    """Load a folder written by :func:`export_generator`; returns (generator in eval mode, manifest)."""
    pipe = load_pipeline(folder, device)
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    return generator_from_pipeline(pipe), manifest
