"""The composed generator: one predicate decides what trains and what is saved."""

from __future__ import annotations

import pytest
import torch
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.zoo import ZooSpec


def _spec(tiny_zoo) -> ZooSpec:
    return ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )


@pytest.mark.parametrize("train_unet", [True, False])
def test_trainable_key_set_is_exactly_adapter_plus_optional_unet(tiny_zoo, train_unet):
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=_spec(tiny_zoo), train_unet=train_unet))
    keys = set(model.trainable_state_dict())
    adapter = {k for k in model.state_dict() if k.startswith("adapter.")}
    unet = {k for k in model.state_dict() if k.startswith("unet.")}
    assert keys == (adapter | unet if train_unet else adapter)
    for name, p in model.named_parameters():
        assert p.requires_grad == model.is_trainable(name), name
    for frozen in (model.codec, model.text_encoder, model.image_encoder, model.face_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())


def test_decoupled_variant_trains_identity_processors_with_a_frozen_unet(tiny_zoo):
    model = IdentityGenerator.from_config(
        GeneratorConfig(zoo=_spec(tiny_zoo), train_unet=False, adapter={"variant": "decoupled"})
    )
    keys = set(model.trainable_state_dict())
    procs = {k for k in keys if k.startswith("unet.")}
    assert procs and all(".processor." in k for k in procs)
    assert any("to_k_id" in k for k in procs)


def test_conditioning_and_prediction_shapes(tiny_zoo):
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=_spec(tiny_zoo)))
    refs = torch.rand(2, 3, 32, 32) * 2 - 1
    lms = torch.tensor([[11.0, 14.0], [21.0, 14.0], [16.0, 19.0], [12.0, 25.0], [20.0, 25.0]]).expand(2, 5, 2)
    e_arc, e_clip = model.identity_embeds(refs, lms)
    assert e_arc.shape == (2, 512) and e_clip.shape == (2, model.image_encoder.output_dim)
    with torch.no_grad():
        assert torch.allclose(model.face_embeds(refs, lms), e_arc)  # the ArcFace half, without CLIP
    cond = model.condition(e_arc, e_clip, model.encode_text(["a photo", "a face"]))
    assert cond.context.shape[0] == 2 and cond.context.shape[-1] == model.unet.config.cross_attention_dim
    z = model.codec.encode(refs)
    out = model.predict(z, torch.tensor([1, 999]), cond)
    assert out.shape == z.shape


def test_identity_embeds_needs_landmarks_or_embeddings(tiny_zoo):
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=_spec(tiny_zoo)))
    with pytest.raises(ValueError, match="landmarks"):
        model.identity_embeds(torch.zeros(1, 3, 32, 32))
