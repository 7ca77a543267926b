"""``idforge morph``: frames between two people (Diff-ID sec. 3.4), plus a GIF and a strip."""

from __future__ import annotations

from pathlib import Path


def morph(
    a: Path,
    b: Path,
    model: Path,
    out: Path,
    frames: int = 8,
    strategy: str = "full",
    prompt: str = "a photo of a face",
    steps: int = 50,
    landmarks_a: list[list[float]] | None = None,
    landmarks_b: list[list[float]] | None = None,
    detector: str = "auto",
    device: str = "cpu",
) -> int:
    """Morph person A into person B: DDIM inversion of both photos, SLERP of identities, LERP of latents.

    Args:
        a: photo of the first person.
        b: photo of the second person.
        model: folder written by `idforge export`.
        out: output folder: frame_000.png ..., morph.gif, strip.png.
        frames: frames including both ends.
        strategy: full (SLERP identity + LERP latents), embedding (identity only) or latent (latents only).
        prompt: prompt of the inversion and the sampling.
        steps: DDIM steps of the inversion and of the sampling.
        landmarks_a: 5 landmarks of photo A as JSON (bypasses detection).
        landmarks_b: 5 landmarks of photo B as JSON (bypasses detection).
        detector: face detector: auto, insightface or dlib.
        device: where to run (cpu, cuda).
    """
    from idforge.inference.export import load_pipeline
    from idforge.inference.morph import morph as run_morph
    from idforge.inference.references import aligned_reference, to_tensor
    from PIL import Image
    from torchvision.utils import save_image

    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder (write one with `idforge export`)")
    pipe = load_pipeline(model, device=device)
    res, crop = int(pipe.config.resolution), float(pipe.config.crop_scale)
    img_a = to_tensor(
        [aligned_reference(a, res, crop, landmarks_a, detector, landmarks_option="--landmarks_a")]
    )
    img_b = to_tensor(
        [aligned_reference(b, res, crop, landmarks_b, detector, landmarks_option="--landmarks_b")]
    )
    images = run_morph(pipe, img_a, img_b, frames=frames, strategy=strategy, prompt=prompt, steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    pics = []
    for i, img in enumerate((images + 1) / 2):
        save_image(img, out / f"frame_{i:03d}.png")
        pics.append(Image.open(out / f"frame_{i:03d}.png").convert("RGB"))
    pics[0].save(out / "morph.gif", save_all=True, append_images=pics[1:], duration=200, loop=0)
    save_image((images + 1) / 2, out / "strip.png", nrow=frames, padding=2)
    print(out / "strip.png")
    print(out / "morph.gif")
    return 0
