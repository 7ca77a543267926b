"""Export a trained generator to a self-contained folder, and load it back.

Layout (diffusers-compatible where it can be)::

    out/
      model_index.json         # StableDiffusionPipeline (only when the codec is a VAE)
      unet/ vae/ text_encoder/ tokenizer/ scheduler/    # save_pretrained of each component
      adapter/                 # DiffIDAdapter.save_pretrained (config.json + safetensors)
      adapter/identity_processors.safetensors            # decoupled variant only
      clip_image_encoder/      # open_clip local-dir folder (when the source was a local folder)
      face_encoder/            # idforge FaceEncoder folder
      idforge.json             # how idforge loads the folder (zoo spec relative to it)

``diffusers.StableDiffusionPipeline.from_pretrained(out)`` loads the UNet/VAE/text parts; the
identity path loads with :func:`load_exported`. Weights are safetensors throughout.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from idforge.models import zoo as zoo_lib
from idforge.models.attention import PROCESSOR_WEIGHTS as PROCESSORS
from idforge.models.attention import load_identity_processors, save_identity_processors
from idforge.models.generator import GeneratorConfig, IdentityGenerator

from idforge import __version__

log = logging.getLogger(__name__)

MANIFEST = "idforge.json"


def _split_processor_weights(unet) -> tuple[dict, dict]:
    """UNet weights without / with the identity attention processors' parameters."""
    base, procs = {}, {}
    for k, v in unet.state_dict().items():
        (procs if ".processor." in k else base)[k] = v.detach().contiguous()
    return base, procs


def export_generator(
    model: IdentityGenerator, out: str | Path, resolution: int, extra: dict | None = None
) -> Path:
    """Write ``model`` (as trained) to ``out``; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, procs = _split_processor_weights(model.unet)
    if procs:
        # save the UNet with its stock processors' weights only; identity processors go with the adapter
        from diffusers import UNet2DConditionModel

        plain = UNet2DConditionModel.from_config(model.unet.config)
        plain.load_state_dict(base, strict=True)
        plain.save_pretrained(out / "unet")
    else:
        model.unet.save_pretrained(out / "unet")
    model.adapter.save_pretrained(out / "adapter")
    if procs:
        save_identity_processors(model.unet, out / "adapter")
    has_vae = hasattr(model.codec, "vae")
    if has_vae:
        model.codec.vae.save_pretrained(out / "vae")
    model.text_encoder.save_pretrained(out / "text_encoder")
    model.tokenizer.save_pretrained(out / "tokenizer")
    model.scheduler.save_pretrained(out / "scheduler")
    model.face_encoder.save_pretrained(out / "face_encoder")
    spec = getattr(model, "zoo_spec", None)
    image_spec = spec.image_encoder if spec else None
    local = image_spec[len("local-dir:") :] if image_spec and image_spec.startswith("local-dir:") else None
    if local and Path(local).is_dir():
        shutil.copytree(local, out / "clip_image_encoder", dirs_exist_ok=True)
        image_spec = "local-dir:clip_image_encoder"
    if has_vae:
        import diffusers

        (out / "model_index.json").write_text(
            json.dumps(
                {
                    "_class_name": "StableDiffusionPipeline",
                    "_diffusers_version": diffusers.__version__,
                    "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"],
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "scheduler": [
                        type(model.scheduler).__module__.split(".")[0],
                        type(model.scheduler).__name__,
                    ],
                    "safety_checker": [None, None],
                    "feature_extractor": [None, None],
                    "image_encoder": [None, None],
                    "requires_safety_checker": False,
                },
                indent=2,
            )
        )
    manifest = {
        "format": "idforge-generator",
        "version": __version__,
        "resolution": int(resolution),
        "codec": "vae" if has_vae else zoo_lib.PIXEL,
        "image_encoder": image_spec,
        "image_tokens": spec.image_tokens if spec else "pooled",
        **(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("exported generator to %s", out)
    return out


def load_exported(folder: str | Path, device: str | torch.device = "cpu") -> tuple[IdentityGenerator, dict]:
    """Load a folder written by :func:`export_generator`; returns (generator in eval mode, manifest)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; is this a folder written by `idforge export`?")
    manifest = json.loads(path.read_text())
    image_spec = manifest["image_encoder"]
    if image_spec and image_spec.startswith("local-dir:") and not Path(image_spec[10:]).is_absolute():
        image_spec = f"local-dir:{folder / image_spec[10:]}"
    spec = zoo_lib.ZooSpec(
        base=str(folder),
        vae=zoo_lib.PIXEL if manifest["codec"] == zoo_lib.PIXEL else None,
        image_encoder=image_spec,
        image_tokens=manifest.get("image_tokens", "pooled"),
        face_encoder=str(folder / "face_encoder"),
    )
    model = IdentityGenerator.from_config(
        GeneratorConfig(zoo=spec, adapter_path=str(folder / "adapter"), train_unet=False)
    )
    if (folder / "adapter" / PROCESSORS).is_file():
        load_identity_processors(model.unet, folder / "adapter")  # strict: keys must match the layout
    return model.to(device).eval(), manifest
