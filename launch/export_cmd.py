"""``idforge export``: a training checkpoint (trainable weights + hyper-parameters) -> model folder."""

from __future__ import annotations

from pathlib import Path

import torch
from idforge.inference.export import export_generator
from idforge.models.generator import GeneratorConfig, IdentityGenerator


def export_checkpoint(checkpoint: str | Path, out: str | Path, resolution: int | None = None) -> Path:
    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"{ckpt_path}: checkpoint not found (written by `idforge train fit` under "
            "the trainer's default_root_dir/checkpoints)"
        )
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "generator" not in hp:
        raise ValueError(f"{ckpt_path}: no generator hyper-parameters; was it written by idforge's trainer?")
    model = IdentityGenerator.from_config(GeneratorConfig(**hp["generator"]))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    expected = set(model.trainable_state_dict())
    missing = expected - set(state)
    if missing:
        raise ValueError(
            f"{ckpt_path}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}"
        )
    model.load_state_dict(state, strict=False)
    res = resolution or int(model.unet.config.sample_size) * model.codec.downsample
    return export_generator(model, out, res)


def export(checkpoint: Path, out: Path, resolution: int | None = None) -> int:
    """Export a training checkpoint (trainable weights + hyper-parameters) to a self-contained model folder.

    Args:
        checkpoint: Lightning .ckpt written by `idforge train fit` (under default_root_dir/checkpoints).
        out: output folder (diffusers layout + adapter), loaded by `idforge generate` and `idforge eval`.
        resolution: generation resolution in pixels (default: the UNet's sample size x the codec's factor).
    """
    folder = export_checkpoint(checkpoint, out, resolution=resolution)
    print(f"exported {checkpoint} -> {folder}")
    return 0
