"""References from photos (detection, alignment, errors) and DDIM inversion / morphing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from idforge.inference.references import aligned_reference
from PIL import Image


def test_a_photo_without_a_face_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    from idforge.data_pipeline import detect

    path = tmp_path / "wall.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    monkeypatch.setattr(detect, "make_detector", lambda name, **kw: detect.LandmarksDetector())
    with pytest.raises(ValueError, match=rf"^{path}: no face found; .*--landmarks$"):
        aligned_reference(path, 32, 0.8, detector="landmarks")


def test_landmarks_bypass_detection_and_use_the_crop_scale(tmp_path):
    from idforge.data_pipeline.align import align_face

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    lms = [[30, 35], [50, 35], [40, 45], [32, 58], [48, 58]]
    crop = aligned_reference(tmp_path / "a.png", 32, 0.8, landmarks=lms)
    assert np.array_equal(crop, align_face(image, np.array(lms, np.float32), size=32, scale=0.8)[0])
    assert not np.array_equal(crop, align_face(image, np.array(lms, np.float32), size=32, scale=1.0)[0])


@pytest.mark.dlib
def test_astronaut_is_detected_and_the_face_index_is_checked(tmp_path):
    pytest.importorskip("dlib", reason="the dlib extra is not installed: pip install 'idforge[dlib]'")
    import skimage.data

    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "astronaut.png")
    crop = aligned_reference(tmp_path / "astronaut.png", 64, 0.8, detector="dlib")
    assert crop.shape == (64, 64, 3) and crop.std() > 10
    with pytest.raises(ValueError, match=r"astronaut.png: --face_index 3 but \d face\(s\) found"):
        aligned_reference(tmp_path / "astronaut.png", 64, 0.8, detector="dlib", face_index=3)


def test_ddim_inversion_then_sampling_reconstructs_the_latent(tiny_zoo, tmp_path):
    """A random tiny UNet's predictions swing too much for DDIM's linearisation, so its output is
    damped (conv_out x 0.05): a smooth predictor, where inversion error must shrink with the steps."""
    from idforge.inference.export import export_generator, load_pipeline
    from idforge.inference.morph import ddim_invert, ddim_sample
    from idforge.models.generator import GeneratorConfig, IdentityGenerator
    from idforge.models.zoo import ZooSpec

    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    export_generator(IdentityGenerator.from_config(GeneratorConfig(zoo=spec)), tmp_path / "m", 32)
    pipe = load_pipeline(tmp_path / "m")
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        pipe.unet.conv_out.bias.mul_(0.05)
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ident, z0 = pipe.encode_identity(img), pipe.encode_images(img)
    errors = {}
    for steps in (10, 50):
        rec = ddim_sample(pipe, ddim_invert(pipe, z0, ident, "a photo", steps), ident, "a photo", steps)
        errors[steps] = float((rec - z0).pow(2).mean().sqrt() / z0.pow(2).mean().sqrt())
    assert errors[50] < 0.15 and errors[50] < errors[10] / 2, errors
