"""Algorithm 1 on tiny SD3 and on an `idforge export` folder: masked edits keep the source outside
the mask exactly, reconstruction improves with single-image fine-tuning, LoRA / full, sequential edits."""

from __future__ import annotations

import pytest
import torch
from idforge.inference.edit import Editor, FinetuneConfig, FlowBackbone, UNetBackbone, load_backbone

from .conftest import photo

SRC = "a person's face with red hair"
TGT = "a person's face with blond hair"


@pytest.fixture(params=["sd3", "export"])
def backbone(request, tiny_sd3_dir, tiny_export_dir):
    folder = tiny_sd3_dir if request.param == "sd3" else tiny_export_dir
    return load_backbone(folder)


def test_folders_load_as_their_backbones(tiny_sd3_dir, tiny_export_dir, tmp_path):
    sd3, unet = load_backbone(tiny_sd3_dir), load_backbone(tiny_export_dir)
    assert isinstance(sd3, FlowBackbone) and sd3.recording_layers == 2
    assert isinstance(unet, UNetBackbone) and unet.is_identity and unet.recording_layers > 0
    # SD3 sequence: 77 CLIP positions, then T5 positions
    idx = sd3.concept_indices(SRC, "red hair")
    assert all(i < 77 for i in idx[:2]) and all(i >= 77 for i in idx[2:]) and len(idx) == 4
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("mode", ["removal", "addition"])
def test_masked_edit_keeps_the_source_latent_outside_the_mask_exactly(backbone, mode):
    ed = Editor(backbone, photo())
    concept = "red hair" if mode == "removal" else "blond hair"
    res = ed.edit(SRC, TGT, concept, strength=0.8, steps=10, mode=mode, kernel=1)
    m = res.mask
    assert m is not None and set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0 < m.mean() < 1, "the attention mask must split the image"
    outside = m.expand_as(res.latent) == 0
    assert torch.equal(res.latent[outside], ed.z0[outside])
    assert not torch.equal(res.latent, ed.z0)
    unmasked = ed.edit(SRC, TGT, None, strength=0.8, steps=10)
    assert not torch.equal(unmasked.latent[outside], ed.z0[outside])


def test_attention_recorders_leave_the_denoiser_output_unchanged(backbone):
    ed = Editor(backbone, photo())
    levels = backbone.levels(10, 0.5)
    cond = backbone.condition(SRC)
    plain = backbone.move(ed.z0, levels, 0, 1, cond)
    backbone.recorder.start(backbone.concept_indices(SRC, "red hair"))
    recorded = backbone.move(ed.z0, levels, 0, 1, cond)
    maps = backbone.recorder.stop()
    assert torch.equal(plain, recorded) and len(maps) == backbone.recording_layers


def _recon_error(ed: Editor, strength=0.6, steps=8) -> float:
    res = ed.edit(SRC, SRC, None, strength=strength, steps=steps)
    return float((res.latent - ed.z0).abs().mean())


@pytest.mark.parametrize("kind", ["sd3", "export"])
def test_reconstruction_error_falls_as_finetuning_steps_grow(kind, tiny_sd3_dir, tiny_export_dir):
    """target = source, no mask: inversion + denoising reconstructs z0, better after fine-tuning
    (FlowID Fig. 2's trend). A larger lr than the papers' 5e-5 keeps the tiny run short."""
    bb = load_backbone(tiny_sd3_dir if kind == "sd3" else tiny_export_dir)
    ed = Editor(bb, photo(1))
    errors = [_recon_error(ed)]
    for steps in (5, 15):
        ed.finetune(SRC, FinetuneConfig(steps=steps, lr=3e-4, grad_accum=4, micro_batch=4))
        errors.append(_recon_error(ed))
    print(f"{kind} reconstruction |z - z0| after 0/5/20 steps: {errors}")
    assert errors[2] < errors[1] < errors[0]


def test_lora_trains_only_lora_weights_and_full_trains_the_base(tiny_sd3_dir):
    bb = load_backbone(tiny_sd3_dir)
    ed = Editor(bb, photo())
    base = {k: v.clone() for k, v in bb.denoiser.state_dict().items()}
    ed.finetune(SRC, FinetuneConfig(steps=2, method="lora", lora_rank=4, lr=1e-3, grad_accum=2))
    after = bb.denoiser.state_dict()
    lora = [k for k in after if "lora_" in k]
    kept = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert lora and kept.keys() == base.keys() and all(torch.equal(kept[k], base[k]) for k in base)
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora)

    full = load_backbone(tiny_sd3_dir)
    ed = Editor(full, photo())
    before = {k: v.clone() for k, v in full.denoiser.state_dict().items()}
    ed.finetune(SRC, FinetuneConfig(steps=1, lr=1e-3, grad_accum=2))
    changed = [k for k, v in full.denoiser.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert not any(p.requires_grad for p in full.denoiser.parameters())


def test_batched_accumulation_gives_the_same_gradient_as_batch_one(tiny_sd3_dir):
    states = []
    for micro in (4, 1):
        bb = load_backbone(tiny_sd3_dir)
        ed = Editor(bb, photo())
        ed.finetune(SRC, FinetuneConfig(steps=1, lr=1e-3, grad_accum=4, micro_batch=micro))
        states.append(bb.denoiser.state_dict())
    diffs = [(states[0][k] - states[1][k]).abs().max() for k in states[0]]
    assert max(diffs) < 1e-5


def test_sequential_edits_reuse_the_tuned_model(tiny_sd3_dir):
    bb = load_backbone(tiny_sd3_dir)
    ed = Editor(bb, photo())
    ed.finetune(SRC, FinetuneConfig(steps=2, lr=1e-3, grad_accum=2))
    tuned = {k: v.clone() for k, v in bb.denoiser.state_dict().items()}
    first = ed.edit(SRC, TGT, "red hair", strength=0.8, steps=10, kernel=1)
    second = ed.edit(
        TGT,
        "a person's face with blond hair and a hat",
        "hat",
        mode="addition",
        chain=True,
        strength=0.8,
        steps=10,
        kernel=1,
    )
    assert ed.tuned_steps == 2
    assert all(torch.equal(v, tuned[k]) for k, v in bb.denoiser.state_dict().items())
    assert torch.equal(second.trajectory[0], first.latent)


def test_adam8bit_without_bitsandbytes_names_the_extra(tiny_sd3_dir):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    ed = Editor(load_backbone(tiny_sd3_dir), photo())
    with pytest.raises(ImportError, match=r"idforge\[bnb\]"):
        ed.finetune(SRC, FinetuneConfig(steps=1, optimizer="adam8bit"))


def test_x0_predicting_unet_moves_by_ddim_and_trains_on_the_clean_latent(tiny_export_dir, monkeypatch):
    """prediction_type "sample" (the demo's export): x0 is the output, eps follows from it; at the clean
    level there is no noise direction, so the first inversion step keeps the latent."""
    bb = load_backbone(tiny_export_dir)
    bb.prediction_type = "sample"
    z, x0 = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    monkeypatch.setattr(bb, "_predict", lambda z_, t, cond: x0.expand_as(z_))
    levels = bb.levels(10, 0.5)
    aa, ab = bb.alphas_cumprod[int(levels[3])], bb.alphas_cumprod[int(levels[2])]
    eps = (z - aa.sqrt() * x0) / (1 - aa).sqrt()
    assert torch.allclose(bb.move(z, levels, 3, 2, None), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-5)
    assert torch.allclose(bb.move(z, levels, 1, 0, None), x0, atol=1e-5)
    assert torch.equal(bb.move(z, levels, 0, 1, None), z)
    t = torch.tensor([100, 900])
    assert float(bb.training_loss(x0.expand(2, -1, -1, -1), None, t, torch.randn(2, 4, 4, 4))) == 0.0


def test_guided_move_is_the_guidance_combination_of_the_two_moves(backbone):
    """w > 1: the prediction is p(negative) + w (p(target) - p(negative)); every backbone's move is
    affine in its prediction, so the guided move is the same combination of the two plain moves."""
    from idforge.inference.edit import Guided

    ed = Editor(backbone, photo())
    levels = backbone.levels(10, 0.8)
    pos, neg = backbone.condition(TGT), backbone.condition(SRC)
    z = backbone.move(backbone.move(ed.z0, levels, 0, 1, neg), levels, 1, 2, neg)
    a, b = backbone.move(z, levels, 2, 1, pos), backbone.move(z, levels, 2, 1, neg)
    guided = backbone.move(z, levels, 2, 1, Guided(pos, neg, 3.0))
    torch.testing.assert_close(guided, b + 3.0 * (a - b), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, a, atol=1e-5), "guidance 3 must move past the plain target step"
    torch.testing.assert_close(backbone.move(z, levels, 2, 1, Guided(pos, neg, 1.0)), a)


def test_edit_guidance_amplifies_the_prompt_change_and_keeps_reconstruction(backbone):
    ed = Editor(backbone, photo())
    plain = ed.edit(SRC, TGT, None, strength=0.8, steps=10)
    assert torch.equal(
        ed.edit(SRC, TGT, None, strength=0.8, steps=10, guidance_scale=1.0).latent, plain.latent
    )
    guided = ed.edit(SRC, TGT, None, strength=0.8, steps=10, guidance_scale=4.0)
    same = ed.edit(SRC, SRC, None, strength=0.8, steps=10)
    # the source prompt is the default negative: guidance pushes the result away from the source's
    assert (guided.latent - same.latent).abs().mean() > 1.5 * (plain.latent - same.latent).abs().mean()
    # target = source: guidance has nothing to amplify, the reconstruction is unchanged
    torch.testing.assert_close(
        ed.edit(SRC, SRC, None, strength=0.8, steps=10, guidance_scale=4.0).latent, same.latent
    )
    empty = ed.edit(SRC, TGT, None, strength=0.8, steps=10, guidance_scale=4.0, negative="")
    assert not torch.allclose(empty.latent, guided.latent)
    masked = ed.edit(SRC, TGT, "red hair", strength=0.8, steps=10, kernel=1, guidance_scale=4.0)
    outside = masked.mask.expand_as(masked.latent) == 0
    assert torch.equal(masked.latent[outside], ed.z0[outside])
