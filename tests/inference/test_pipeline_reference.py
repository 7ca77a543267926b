"""IdentityPipeline with a ReferenceNet (FlashFace sec. 3.3): references encoded once per generation,
three-branch guidance equal to eq. (3) on the UNet's own predictions, and an export round trip."""

from __future__ import annotations

import pytest
import torch
from idforge.inference.export import export_generator, load_pipeline, pipeline_from_generator
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.zoo import ZooSpec


def _model(tiny_zoo, conditioning="referencenet", variant="final"):
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    cfg = GeneratorConfig(
        zoo=spec,
        adapter={} if conditioning == "referencenet" else {"variant": variant},
        conditioning=conditioning,
        reference={"face_mask": "mask", "image_size": 16},
    )
    model = IdentityGenerator.from_config(cfg)
    with torch.no_grad():  # move every trainable weight away from its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _refs(n=3):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _run(pipe, **kw):
    kw.setdefault("reference_images", _refs())
    return pipe(
        "a photo of a person",
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        face_box=torch.tensor([8.0, 8.0, 24.0, 24.0]),
        **kw,
    ).images


@pytest.mark.parametrize("conditioning", ["referencenet", "both"])
def test_references_are_encoded_once_per_generation(tiny_zoo, conditioning):
    model = _model(tiny_zoo, conditioning)
    pipe = pipeline_from_generator(model, resolution=32)
    pipe.set_progress_bar_config(disable=True)
    ref_calls, unet_calls = [], []
    h1 = model.reference_net.unet.register_forward_hook(lambda m, a, o: ref_calls.append(a[0].shape[0]))
    h2 = pipe.unet.register_forward_hook(lambda m, a, o: unet_calls.append(1))
    out = _run(pipe)
    h1.remove(), h2.remove()
    assert ref_calls == [3]  # one ReferenceNet forward over the 3 references, not one per step
    assert len(unet_calls) == 3 and torch.isfinite(out).all()
    # the references matter, and lambda_ref = 0 with lambda_feat = 1 ignores them (eq. (3))
    other = _run(pipe, reference_images=_refs(2) * -1)
    assert not torch.allclose(out, other, atol=1e-4)
    a = _run(pipe, reference_guidance_scale=0.0, lambda_feat=1.0)
    b = _run(pipe, reference_guidance_scale=0.0, lambda_feat=1.0, reference_images=_refs(2) * -1)
    torch.testing.assert_close(a, b)


def test_guided_step_equals_eq3_on_three_separate_unet_calls(tiny_zoo):
    model = _model(tiny_zoo)
    pipe = pipeline_from_generator(model, resolution=32)
    feats = pipe.encode_references(_refs(), lambda_feat=0.85)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    text, null = pipe.encode_text(["a photo"]), pipe.encode_text([""])
    t = torch.tensor([400])
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]])
    with torch.no_grad():
        mask = model.unet_input(x, box, (32, 32))[:, 4:]  # (1, 1, 8, 8)
        branches = [(1 - 7.5, null, None), (7.5 - 2.0, text, None), (2.0, text, None)]
        refs = feats.repeat(3).drop(torch.arange(3) < 2)
        channels = torch.cat([mask * 0, mask * 0, mask])  # the mask is dropped with the references
        with pipe._guided_unet(branches, 1.0, refs, channels):
            guided = pipe.unet(x, t, encoder_hidden_states=text).sample

        def unet(states, reference, m):
            kw = {"reference": reference}
            return pipe.unet(torch.cat([x, m], 1), t, encoder_hidden_states=states, cross_attention_kwargs=kw)

        dropped = feats.drop(torch.tensor([True]))
        y_none = unet(null, dropped, mask * 0).sample
        y_text = unet(text, dropped, mask * 0).sample
        y_ref = unet(text, feats, mask).sample
    expected = y_none + 7.5 * (y_text - y_none) + 2.0 * (y_ref - y_text)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y_ref, y_text, atol=1e-4)


def test_export_round_trip_keeps_the_referencenet(tiny_zoo, tmp_path):
    model = _model(tiny_zoo)
    pipe = pipeline_from_generator(model, resolution=32)
    pipe.set_progress_bar_config(disable=True)
    before = _run(pipe)
    export_generator(model, tmp_path / "out", resolution=32)
    assert (tmp_path / "out" / "reference_net" / "reference_processors.safetensors").is_file()
    loaded = load_pipeline(tmp_path / "out")
    assert loaded.reference_net is not None and loaded.face_mask == "mask" and loaded.adapter is None
    torch.testing.assert_close(_run(loaded), before, rtol=1e-4, atol=1e-5)


def test_decoupled_adapter_and_referencenet_keep_both_processor_kinds_through_export(tiny_zoo, tmp_path):
    """Identity processors (cross-attention) and reference processors (self-attention) share the UNet:
    installing one kind must not replace the other, live or after an export round trip."""
    from idforge.models.attention import IdentityAttnProcessor
    from idforge.models.reference_attention import ReferenceAttnProcessor

    model = _model(tiny_zoo, "both", variant="decoupled")
    pipe = pipeline_from_generator(model, resolution=32)
    pipe.set_progress_bar_config(disable=True)
    arc = torch.nn.functional.normalize(
        torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    clip = torch.randn(1, model.image_encoder.output_dim, generator=torch.Generator().manual_seed(2))
    from idforge.inference.pipeline import IdentityEmbeds

    ident = IdentityEmbeds(arc, clip)
    before = _run(pipe, identity=ident)
    export_generator(model, tmp_path / "out", resolution=32)
    loaded = load_pipeline(tmp_path / "out")
    from idforge.models.reference_attention import reference_layers

    kinds = [type(p) for p in loaded.unet.attn_processors.values()]
    assert kinds.count(ReferenceAttnProcessor) == len(list(reference_layers(loaded.unet, "decoder"))) > 0
    assert kinds.count(IdentityAttnProcessor) == sum(1 for n in loaded.unet.attn_processors if "attn2" in n)
    torch.testing.assert_close(_run(loaded, identity=ident), before, rtol=1e-3, atol=1e-4)  # guidance 7.5
    assert not torch.allclose(_run(loaded, identity=ident.zeros_like()), before, atol=1e-3)
