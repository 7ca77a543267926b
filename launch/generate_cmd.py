"""``idforge generate``: images of a person from their photos, with an exported model."""

from __future__ import annotations

from pathlib import Path

import torch


def _references(paths, res, crop_scale, landmarks, detector, face_index):
    from idforge.inference.references import aligned_reference, to_tensor

    if landmarks is not None and len(paths) != 1:
        raise ValueError("--landmarks applies to one --ref; detect the faces of several references instead")
    return to_tensor([aligned_reference(p, res, crop_scale, landmarks, detector, face_index) for p in paths])


def generate(
    model: Path,
    ref: list[Path],
    prompt: list[str],
    out: Path,
    num_images: int = 1,
    mix: list[Path] | None = None,
    mix_weight: float = 0.5,
    landmarks: list[list[float]] | None = None,
    face_index: int | None = None,
    detector: str = "auto",
    scheduler: str = "ddim",
    steps: int = 50,
    guidance: float = 1.0,
    identity_guidance: float | None = None,
    adapter_scale: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> int:
    """Generate images of the person in the reference photos, as PNGs plus grid.png.

    Args:
        model: folder written by `idforge export` (or `idforge demo`'s export/).
        ref: photo of the person; repeat `--ref` for several (their identity embeddings are averaged).
        prompt: caption of an image; repeat `--prompt` for several.
        out: output folder for the PNGs (000.png, 001.png, ...) and grid.png.
        num_images: images per prompt.
        mix: photos of a second person to mix in (identity SLERP).
        mix_weight: weight of the second person (0: only --ref, 1: only --mix).
        landmarks: 5 landmarks of a single --ref as JSON [[x, y], ...] (eyes, nose, mouth corners);
            bypasses face detection.
        face_index: which face of a photo with several (0 = the largest; default: the largest).
        detector: face detector: auto (insightface pack, else dlib), insightface or dlib.
        scheduler: ddim, dpm++ or euler.
        steps: sampling steps.
        guidance: text guidance scale (1: none).
        identity_guidance: identity guidance scale (default: the text scale).
        adapter_scale: identity strength (0: none).
        seed: sampling seed.
        device: where to run (cpu, cuda).
    """
    from idforge.inference.export import load_pipeline
    from idforge.inference.pipeline import mix_identities
    from torchvision.utils import save_image

    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (write one with `idforge export`)")
    for p in [*ref, *(mix or [])]:
        if not p.is_file():
            raise FileNotFoundError(f"reference image {p} not found")
    if num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {num_images}")
    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    pipe.set_scheduler(scheduler)
    res, crop = int(pipe.config.resolution), float(pipe.config.crop_scale)
    identity = pipe.encode_identity(_references(ref, res, crop, landmarks, detector, face_index))
    if mix:
        other = pipe.encode_identity(_references(mix, res, crop, None, detector, face_index))
        identity = mix_identities(identity, other, mix_weight)
    images = pipe(
        list(prompt),
        identity=identity,
        num_inference_steps=steps,
        guidance_scale=guidance,
        identity_guidance_scale=identity_guidance,
        adapter_scale=adapter_scale,
        num_images_per_prompt=num_images,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(images):
        path = out / f"{i:03d}.png"
        save_image(img, path)
        written.append(path)
        print(path)
    save_image(images, out / "grid.png", nrow=num_images, padding=2)
    print(out / "grid.png")
    return 0
