"""``idforge generate``: images of a reference face's identity from an exported model."""

from __future__ import annotations

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
        lm = np.asarray(landmarks, dtype=np.float32)
        if lm.shape != (5, 2):
            raise ValueError(f"--landmarks must be 5 [x, y] pairs, got shape {lm.shape}")
        arr, _ = align_face(arr, lm, size=resolution, scale=crop_scale)
    elif arr.shape[:2] != (resolution, resolution):
        arr = np.asarray(img.resize((resolution, resolution), Image.BICUBIC))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    lms = torch.as_tensor(template_for(resolution, crop_scale), dtype=torch.float32)
    return x[None], lms[None]


def generate(
    model: Path,
    reference: Path,
    prompt: list[str],
    out: Path,
    landmarks: list[list[float]] | None = None,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> int:
    """Generate images of a reference face's identity, one per prompt, as PNGs.

    Args:
        model: folder written by `idforge export` (or `idforge demo`'s export/).
        reference: reference face image.
        prompt: caption of an image; repeat `--prompt` for several images.
        out: output folder for the PNGs (000.png, 001.png, ...).
        landmarks: the reference's 5 landmarks as JSON [[x, y], ...] (eyes, nose, mouth corners); default:
            the image is already an aligned crop at the model's template.
        steps: DDIM sampling steps.
        guidance: classifier-free guidance scale against the null identity.
        seed: sampling seed.
        device: where to run (cpu, cuda).
    """
    from tqdm import tqdm

    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (write one with `idforge export`)")
    if not reference.is_file():
        raise FileNotFoundError(f"reference image {reference} not found")
    generator, manifest = load_exported(model, device=device)
    res = int(manifest["resolution"])
    ref, lms = _load_reference(reference, res, landmarks, float(manifest.get("crop_scale", 1.0)))
    e_arc, e_clip = generator.identity_embeds(ref.to(generator.device), lms.to(generator.device))
    n = len(prompt)
    with tqdm(total=steps, unit="step", desc="sampling") as bar:
        images = sample(
            generator,
            list(prompt),
            e_arc.expand(n, -1),
            e_clip.expand(n, *e_clip.shape[1:]),
            res,
            SamplingConfig(steps=steps, guidance_scale=guidance, seed=seed),
            progress=bar.update,
        )
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = ((img.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        path = out / f"{i:03d}.png"
        Image.fromarray(arr).save(path)
        print(path)
    return 0
