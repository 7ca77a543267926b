"""``idforge generate``: images of a reference face's identity from an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from idforge.inference.export import load_exported
from idforge.inference.sampling import SamplingConfig, sample
from PIL import Image


def _load_reference(path: Path, resolution: int, landmarks, crop_scale: float):
    from idforge.data_pipeline.align import align_face, template_for

    if not path.is_file():
        raise FileNotFoundError(f"reference image {path} not found")
    try:
        img = Image.open(path).convert("RGB")
    except Exception as exc:  # PIL raises several types for non-images
        raise ValueError(f"{path}: not a readable image ({exc})") from exc
    arr = np.asarray(img)
    if landmarks is not None:
        lm = np.asarray(json.loads(landmarks), dtype=np.float32)
        if lm.shape != (5, 2):
            raise ValueError(f"--landmarks must be 5 [x, y] pairs, got shape {lm.shape}")
        arr, _ = align_face(arr, lm, size=resolution, scale=crop_scale)
    elif arr.shape[:2] != (resolution, resolution):
        arr = np.asarray(img.resize((resolution, resolution), Image.BICUBIC))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    lms = torch.as_tensor(template_for(resolution, crop_scale), dtype=torch.float32)
    return x[None], lms[None]


def run_generate(args) -> list[Path]:
    model, manifest = load_exported(args.model, device=args.device)
    res = int(manifest["resolution"])
    ref, lms = _load_reference(
        Path(args.reference), res, args.landmarks, float(manifest.get("crop_scale", 1.0))
    )
    e_arc, e_clip = model.identity_embeds(ref.to(model.device), lms.to(model.device))
    prompts = list(args.prompt)
    n = len(prompts)
    images = sample(
        model,
        prompts,
        e_arc.expand(n, -1),
        e_clip.expand(n, *e_clip.shape[1:]),
        res,
        SamplingConfig(steps=args.steps, guidance_scale=args.guidance, seed=args.seed),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        arr = ((img.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        p = out / f"{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths
