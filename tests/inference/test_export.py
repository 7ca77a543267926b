"""Export -> load_exported reproduces the generator; the folder's UNet/VAE/text parts load in a stock pipeline."""

from __future__ import annotations

import torch
from idforge.inference.export import export_generator, load_exported
from idforge.inference.pipeline import IdentityEmbeds
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.zoo import ZooSpec

from tests.builders import live_pipeline


def _model(tiny_zoo, variant="final"):
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=spec, adapter={"variant": variant}))
    with torch.no_grad():  # move every trainable weight away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def _generate(model):
    e_arc = torch.nn.functional.normalize(
        torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    e_clip = torch.randn(2, model.image_encoder.output_dim, generator=torch.Generator().manual_seed(2))
    pipe = live_pipeline(model)
    out = pipe(
        ["a photo", "a face"],
        identity=IdentityEmbeds(e_arc, e_clip),
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return out.images


def test_export_round_trip_reproduces_samples(tiny_zoo, tmp_path):
    model = _model(tiny_zoo)
    export_generator(model, tmp_path / "out", resolution=32)
    loaded, manifest = load_exported(tmp_path / "out")
    assert manifest["resolution"] == 32 and (tmp_path / "out" / "vae" / "config.json").is_file()
    assert torch.allclose(_generate(model), _generate(loaded), atol=1e-5)
    assert (tmp_path / "out" / "adapter" / "config.json").is_file()
    assert list((tmp_path / "out" / "adapter").glob("*.safetensors"))


def test_exported_folder_loads_with_plain_diffusers(tiny_zoo, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = _model(tiny_zoo)
    export_generator(model, tmp_path / "out", resolution=32)
    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "out", safety_checker=None, feature_extractor=None
    )
    trained = model.unet.state_dict()
    assert set(pipe.unet.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())


def test_decoupled_export_keeps_identity_processors(tiny_zoo, tmp_path):
    model = _model(tiny_zoo, "decoupled")
    export_generator(model, tmp_path / "dec", resolution=32)
    assert (
        not (tmp_path / "dec" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes().count(b"to_k_id")
    )
    loaded, _ = load_exported(tmp_path / "dec")
    assert torch.allclose(_generate(model), _generate(loaded), atol=1e-5)


def test_load_exported_rejects_other_folders(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="idforge export"):
        load_exported(tmp_path)


def test_export_is_self_contained_and_carries_the_source_encoders_weights(tiny_zoo, tmp_path):
    import shutil

    from idforge.inference.export import load_pipeline

    source = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, source)
    model = _model(source)
    export_generator(model, tmp_path / "out", resolution=32)
    moved = tmp_path / "gone"
    source.rename(moved)  # the source model folder is no longer where the generator was built from
    shutil.rmtree(moved)
    pipe = load_pipeline(tmp_path / "out")
    source_clip = model.image_encoder.visual.state_dict()
    exported_clip = pipe.image_encoder.encoder.visual.state_dict()
    assert set(exported_clip) == set(source_clip)
    assert all(torch.equal(v, source_clip[k]) for k, v in exported_clip.items())
    source_face = model.face_encoder.state_dict()
    assert all(torch.equal(v, source_face[k]) for k, v in pipe.face_encoder.encoder.state_dict().items())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(pipe.image_encoder(x), model.image_encoder(x), atol=1e-6)
    loaded, _ = load_exported(tmp_path / "out")
    assert torch.allclose(_generate(model), _generate(loaded), atol=1e-5)
