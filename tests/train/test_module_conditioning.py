"""What the training step feeds the adapter and the identity loss, and the validation loss's own seed."""

from __future__ import annotations

import torch
from idforge.models.generator import GeneratorConfig
from idforge.models.losses import IdentityLossConfig
from idforge.models.zoo import ZooSpec
from idforge.train.module import IdentityDiffusionModule

_LMS = torch.tensor([[11.0, 14.0], [21.0, 14.0], [16.0, 19.0], [12.0, 25.0], [20.0, 25.0]])


def _batch(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
        "landmarks": _LMS.expand(b, 5, 2).clone(),
        "embedding": torch.nn.functional.normalize(torch.randn(b, 512, generator=g), dim=-1),
        "caption": [f"a photo of person {i}" for i in range(b)],
    }


def _module(tiny_zoo, identity_loss=None, **kw) -> IdentityDiffusionModule:
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    return IdentityDiffusionModule(
        GeneratorConfig(zoo=spec, adapter={"variant": "final"}), identity_loss=identity_loss, **kw
    )


def test_identity_dropout_feeds_the_adapter_exactly_zero_and_keeps_the_caption(tiny_zoo, monkeypatch):
    module = _module(tiny_zoo, id_drop_prob=0.5)
    model = module.model
    seen = []
    real_condition = model.condition

    def spy(arc, clip, text):
        seen.append((arc.detach().clone(), clip.detach().clone(), text.detach().clone()))
        return real_condition(arc, clip, text)

    monkeypatch.setattr(model, "condition", spy)
    batch = _batch(8)
    with torch.no_grad():
        module._losses(batch, generator=torch.Generator().manual_seed(0), drop=True)
        full_arc, full_clip = model.identity_embeds(batch["image"], batch["landmarks"], batch["embedding"])
        captions = model.encode_text(batch["caption"])
    ((arc, clip, text),) = seen
    dropped = (arc == 0).all(-1)
    assert 0 < int(dropped.sum()) < 8, "seed 0 should drop some identities and keep others"
    assert (clip[dropped] == 0).all()
    assert torch.equal(arc[~dropped], full_arc[~dropped]) and torch.equal(clip[~dropped], full_clip[~dropped])
    assert torch.equal(text, captions)  # identity-only dropout never touches the caption
    # a dropped sample sees the null identity that guidance subtracts at inference
    with torch.no_grad():
        null = real_condition(torch.zeros_like(arc), torch.zeros_like(clip), captions).context
        ctx = real_condition(arc, clip, text).context
    assert torch.allclose(ctx[dropped], null[dropped], atol=1e-6)


def test_identity_loss_falls_back_to_arcface_of_the_target_photo(tiny_zoo):
    module = _module(tiny_zoo, IdentityLossConfig(lambda_id=1.0, k=0.0))
    model = module.model
    batch = _batch(2)
    del batch["embedding"]  # no stored embedding: the reference is ArcFace(target) (Diff-ID eq. 18)
    with torch.no_grad():
        fallback = module._losses(batch, generator=torch.Generator().manual_seed(5), drop=False)
        explicit = dict(batch, embedding=model.face_embeds(batch["image"], batch["landmarks"]))
        stored = module._losses(explicit, generator=torch.Generator().manual_seed(5), drop=False)
        other = dict(batch, embedding=torch.nn.functional.normalize(torch.randn(2, 512), dim=-1))
        wrong = module._losses(other, generator=torch.Generator().manual_seed(5), drop=False)
    assert torch.allclose(fallback["identity"], stored["identity"], atol=1e-6)
    assert torch.allclose(fallback["loss"], stored["loss"], atol=1e-6)
    assert (fallback["identity"] - wrong["identity"]).abs() > 1e-3


def _val_loss(module, batch, batch_idx=0) -> float:
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        module.validation_step(batch, batch_idx)
    return logged["val/loss"]


def test_validation_step_is_seeded_by_val_seed_and_ignores_the_training_stream(tiny_zoo):
    module = _module(tiny_zoo).eval()
    batch = _batch(2)
    first = _val_loss(module, batch)
    torch.manual_seed(123)  # a different global RNG state ...
    module._rng = torch.Generator().manual_seed(99)  # ... and a training stream mid-way
    torch.rand(10, generator=module._rng)
    assert _val_loss(module, batch) == first
    module.val_seed += 1
    assert _val_loss(module, batch) != first  # the noise and timesteps come from val_seed
    module.val_seed -= 1
    assert _val_loss(_module(tiny_zoo).eval(), batch) == first  # a fresh module: the same figure
