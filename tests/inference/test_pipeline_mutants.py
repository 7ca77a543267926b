"""IdentityPipeline's smaller rules (inference/pipeline.py): schedulers by name, identity batches, SLERP's
values, the default resolution, default prompt and references, ReferenceNet generation for each face
mask and its export, output types."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from idforge.inference.export import export_generator, load_pipeline, pipeline_from_generator
from idforge.inference.pipeline import IdentityEmbeds, IdentityPipeline, make_scheduler, slerp
from idforge.models.generator import GeneratorConfig, IdentityGenerator

from tests.builders import perturbed_generator, tiny_spec


def _exactly(message: str) -> str:
    """A pytest.raises pattern that matches ``message`` and nothing more."""
    return f"^{re.escape(message)}$"


@pytest.fixture(scope="module")
def final(tiny_zoo):
    return perturbed_generator(tiny_zoo, {"variant": "final"})


def _pipe(model, resolution=32, **kw):
    pipe = pipeline_from_generator(model, resolution, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _identity(model, b=1):
    g = torch.Generator().manual_seed(1)
    arc = torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1)
    return IdentityEmbeds(arc, torch.randn(b, model.image_encoder.output_dim, generator=g))


def _gen(pipe, *args, **kw):
    kw.setdefault("num_inference_steps", 2)
    return pipe(*args, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


# ------------------------------------------------------------------------------------- pure parts


def test_schedulers_by_name_keep_the_training_noise_schedule(final):
    cfg = final.scheduler.config
    assert type(make_scheduler("ddim", cfg)).__name__ == "DDIMScheduler"
    dpm = make_scheduler("dpm++", cfg)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler" and dpm.config.algorithm_type == "dpmsolver++"
    assert type(make_scheduler("euler", cfg)).__name__ == "EulerDiscreteScheduler"
    assert torch.equal(dpm.alphas_cumprod, final.scheduler.alphas_cumprod)
    with pytest.raises(
        ValueError, match=_exactly("unknown scheduler 'heun': choose one of ddim, dpm++, euler")
    ):
        make_scheduler("heun", cfg)


def test_identity_embeds_broadcast_repeat_zero_and_scale():
    one = IdentityEmbeds(torch.randn(1, 4), torch.randn(1, 2, 3))
    three = one.expand(3)
    assert three.arcface.shape == (3, 4) and three.clip.shape == (3, 2, 3)
    assert torch.equal(three.clip[2], one.clip[0])
    assert three.expand(3) is three
    with pytest.raises(ValueError, match=_exactly("identity embeddings have batch 3; expected 1 or 2")):
        three.expand(2)
    rep = IdentityEmbeds(torch.arange(2.0)[:, None], torch.arange(2.0)[:, None]).repeat_interleave(2)
    assert rep.arcface[:, 0].tolist() == [0, 0, 1, 1] and rep.clip[:, 0].tolist() == [0, 0, 1, 1]
    z = one.zeros_like()
    assert not z.arcface.any() and not z.clip.any() and z.clip.shape == one.clip.shape
    s = one.scaled(0.5)
    assert torch.equal(s.arcface, one.arcface * 0.5) and torch.equal(s.clip, one.clip * 0.5)


def test_slerp_values_per_row():
    a = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    out = slerp(a, b, 0.5)
    r = math.sqrt(0.5)
    # row 0: w = pi/2, weights sin(pi/4) each; row 1: w = pi/4; row 2: parallel, plain LERP
    w1 = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    expected = torch.tensor([[2 * r, 3 * r], [w1 + w1, w1], [1.5, 1.5]])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(slerp(a, b, 0.25)[2], torch.tensor([1.25, 1.25]), atol=1e-6)
    anti = slerp(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), 0.25)
    assert torch.allclose(anti, torch.tensor([[0.5, 0.0]]), atol=1e-6)  # antiparallel: LERP too
    tokens = torch.randn(2, 3, 4, dtype=torch.float64)
    got = slerp(tokens, tokens.flip(0), 0.0)
    assert got.dtype == torch.float64 and got.shape == (2, 3, 4) and torch.allclose(got, tokens, atol=1e-6)


# --------------------------------------------------------------------------------- the pipeline


def test_resolution_defaults_to_the_unet_sample_size_in_pixels(final):
    pipe = _pipe(final)
    parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    parts |= {k: getattr(pipe, k) for k in ("adapter", "image_encoder", "face_encoder")}
    default = IdentityPipeline(**parts)
    blocks = len(pipe.vae.config.block_out_channels)
    assert default.vae_scale_factor == 2 ** (blocks - 1) > 1
    assert default.config.resolution == pipe.unet.config.sample_size * 2 ** (blocks - 1)
    assert IdentityPipeline(**parts, resolution=48).config.resolution == 48
    assert (pipe.face_mask, pipe.reference_size, pipe.reference_net) == ("none", 224, None)


def test_the_default_prompt_is_empty_and_references_give_the_identity(final):
    pipe = _pipe(final)
    ident = _identity(final)
    assert torch.equal(_gen(pipe, identity=ident), _gen(pipe, "", identity=ident))
    refs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    from_refs = _gen(pipe, "a photo", references=refs)
    assert torch.equal(from_refs, _gen(pipe, "a photo", identity=pipe.encode_identity(refs)))
    assert not torch.equal(from_refs, _gen(pipe, "a photo"))  # not the null identity
    # given embeddings win over references
    assert torch.equal(
        _gen(pipe, "a photo", identity=ident, references=refs), _gen(pipe, "a photo", identity=ident)
    )


def test_references_default_to_the_template_landmarks_at_their_size(final):
    pipe = _pipe(final, crop_scale=0.8)
    refs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    template = torch.as_tensor(pipe.template_landmarks, dtype=torch.float32)
    explicit = pipe.encode_identity(refs, landmarks=(template * 2).expand(2, 5, 2))
    default = pipe.encode_identity(refs)
    assert torch.allclose(default.arcface, explicit.arcface, atol=1e-6)
    off = pipe.encode_identity(refs, landmarks=template.expand(2, 5, 2))
    assert not torch.allclose(default.arcface, off.arcface, atol=1e-4)
    assert default.arcface.shape == (1, 512) and torch.allclose(default.arcface.norm(), torch.tensor(1.0))


# ------------------------------------------------------------------------------------ ReferenceNet


def _reference_model(tiny_zoo, face_mask, conditioning="referencenet"):
    torch.manual_seed(0)
    cfg = GeneratorConfig(
        zoo=tiny_spec(tiny_zoo),
        adapter={} if conditioning == "referencenet" else {"variant": "final"},
        conditioning=conditioning,
        reference={"face_mask": face_mask, "image_size": 16},
    )
    model = IdentityGenerator.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def refnets(tiny_zoo):
    models = {mask: _reference_model(tiny_zoo, mask) for mask in ("none", "inpaint")}
    return models | {
        "both": _reference_model(tiny_zoo, "none", conditioning="both")
    }  # adapter + ReferenceNet


def _refs(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.parametrize("face_mask", ["none", "inpaint", "both"])
def test_reference_generation_for_each_face_mask(refnets, face_mask):
    pipe = _pipe(refnets[face_mask])
    kw = {
        "reference_images": _refs(),
        "guidance_scale": 3.0,
        "face_box": torch.tensor([8.0, 8.0, 24.0, 24.0]),
    }
    out = _gen(pipe, "a photo", num_images_per_prompt=2, **kw)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert not torch.allclose(
        out, _gen(pipe, "a photo", num_images_per_prompt=2, **{**kw, "reference_images": -_refs()})
    )


def test_the_referencenet_encodes_references_with_the_empty_prompt(refnets, final):
    pipe = _pipe(refnets["none"])
    feats = pipe.encode_references(_refs(), lambda_feat=0.5)
    x = torch.nn.functional.interpolate(_refs(), size=(16, 16), mode="bilinear", antialias=True)
    expected = pipe.reference_net.encode_references(
        pipe.encode_images(x)[None], pipe.encode_text([""]), lambda_feat=0.5
    )
    assert feats.states.keys() == expected.states.keys()
    assert all(torch.allclose(feats.states[k], expected.states[k], atol=1e-6) for k in feats.states)
    with pytest.raises(
        ValueError,
        match=_exactly(
            "IdentityPipeline: reference_images need a ReferenceNet; export a generator trained with "
            "generator.conditioning referencenet or both"
        ),
    ):
        _pipe(final).encode_references(_refs())


def test_reference_export_keeps_its_folder_face_mask_and_size(refnets, tmp_path):
    out = export_generator(refnets["inpaint"], tmp_path / "out", resolution=32)
    assert json.loads((out / "reference_net" / "reference_input.json").read_text()) == {
        "face_mask": "inpaint",
        "image_size": 16,
    }
    loaded = load_pipeline(out)
    assert (loaded.face_mask, loaded.reference_size) == ("inpaint", 16)


# ------------------------------------------------------------------------------ output types


def test_latent_output_decodes_to_the_images_and_tuples_carry_no_nsfw_flag(final):
    pipe = _pipe(final)
    ident = _identity(final)
    raw = pipe(
        "a photo",
        identity=ident,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    img = _gen(pipe, "a photo", identity=ident)
    assert raw.shape == (1, 4, 16, 16) and img.shape == (1, 3, 32, 32)
    assert torch.allclose(img, (pipe.decode_latents_to_images(raw) + 1) / 2, atol=1e-5)
    images, nsfw = pipe(
        "a photo",
        identity=ident,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        return_dict=False,
    )
    assert nsfw is None and torch.equal(images, img)
