"""``idforge export``: a training checkpoint (trainable weights + hyper-parameters) -> IdentityPipeline folder."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from idforge.inference.export import export_generator
from idforge.models.generator import GeneratorConfig, IdentityGenerator


def _training_crop_scale(ckpt_path: Path) -> tuple[float | None, str | None]:
    """(crop_scale, shards) from the curation manifest beside the run's training shards, found through
    the LightningCLI ``config.yaml`` saved above the checkpoint."""
    import yaml

    for folder in list(ckpt_path.parents)[:4]:
        cfg = folder / "config.yaml"
        if not cfg.is_file():
            continue
        shards = ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("train_shards")
        for shard in sorted(glob.glob(str(shards))) if isinstance(shards, str) else []:
            manifest = Path(shard).parent / "manifest.json"
            if manifest.is_file():
                conf = json.loads(manifest.read_text()).get("config", {})
                if "crop_scale" in conf:
                    return float(conf["crop_scale"]), shards
    return None, None


def _load_deepspeed_folder(folder: Path) -> dict:
    """A DeepSpeed checkpoint (a folder of per-rank shards) consolidated into one fp32 state dict with
    the trainer's own state (hyper-parameters, EMA), through Lightning's converter."""
    if not ((folder / "latest").is_file() or (folder / "checkpoint").is_dir()):
        raise IsADirectoryError(
            f"{folder}: a folder, not a checkpoint file (nor a DeepSpeed checkpoint folder with `latest` "
            "or `checkpoint/`); pass the .ckpt file written by `idforge train fit`"
        )
    import importlib.util
    import tempfile

    if importlib.util.find_spec("deepspeed") is None:
        raise ModuleNotFoundError(
            f"{folder}: a DeepSpeed checkpoint folder; consolidating it needs DeepSpeed: "
            "`pip install 'idforge[deepspeed]'`"
        )
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        return convert_zero_checkpoint_to_fp32_state_dict(folder, Path(tmp) / "consolidated.ckpt")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    resolution: int | None = None,
    crop_scale: float | None = None,
    scheduler: str = "ddim",
    ema: bool = True,
) -> Path:
    ckpt_path = Path(checkpoint)
    if ckpt_path.is_dir():
        ckpt = _load_deepspeed_folder(ckpt_path)
    elif ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{ckpt_path}: checkpoint not found (written by `idforge train fit` under "
            "the trainer's default_root_dir/checkpoints)"
        )
    hp = ckpt.get("hyper_parameters", {})
    if "generator" not in hp:
        raise ValueError(f"{ckpt_path}: no generator hyper-parameters; was it written by idforge's trainer?")
    model = IdentityGenerator.from_config(GeneratorConfig(**hp["generator"]))
    use_ema = ema and isinstance(ckpt.get("ema"), dict)
    source = ckpt["ema"] if use_ema else ckpt["state_dict"]
    state = {k.removeprefix("model."): v for k, v in source.items() if k.startswith("model.") or use_ema}
    expected = set(model.trainable_state_dict())
    missing = expected - set(state)
    if missing:
        raise ValueError(
            f"{ckpt_path}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}"
        )
    model.load_state_dict(state, strict=False)
    shards = None
    if crop_scale is None:
        crop_scale, shards = _training_crop_scale(ckpt_path)
    if crop_scale is None:
        raise ValueError(
            f"{ckpt_path}: no curation manifest found for the training shards; pass --crop_scale "
            "(the `crop_scale` in the shards' manifest.json)"
        )
    res = resolution or int(model.unet.config.sample_size) * model.codec.downsample
    card = {
        "steps": ckpt.get("global_step"),
        "data": shards or "see the training config",
        "weights": "EMA" if use_ema else "live (as trained; the checkpoint has no EMA weights)",
    }
    return export_generator(
        model, out, res, extra={"crop_scale": crop_scale, "ema": use_ema}, scheduler=scheduler, card=card
    )


def export(
    checkpoint: Path,
    out: Path,
    resolution: int | None = None,
    crop_scale: float | None = None,
    scheduler: str = "ddim",
    ema: bool = True,
) -> int:
    """Export a training checkpoint to a self-contained IdentityPipeline folder (diffusers layout).

    Args:
        checkpoint: Lightning .ckpt written by `idforge train fit` (under default_root_dir/checkpoints), or
            the checkpoint folder DeepSpeed writes in its place (consolidated on the fly).
        out: output folder, loaded by `idforge generate`, `idforge morph`, `idforge eval` and
            `IdentityPipeline.from_pretrained`.
        resolution: generation resolution in pixels (default: the UNet's sample size x the VAE's factor).
        crop_scale: face alignment scale of the references (default: the training shards' curation value).
        scheduler: inference scheduler written into the folder: ddim, dpm++ or euler.
        ema: export the EMA weights when the checkpoint has them.
    """
    folder = export_checkpoint(checkpoint, out, resolution, crop_scale, scheduler, ema)
    print(f"exported {checkpoint} -> {folder}")
    return 0
