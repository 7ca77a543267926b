"""Reference attention (FlashFace eq. (1)-(2)): K/V lengths per placement, drop, lambda_feat, variable N,
identity mixing, save/load of the processors."""

from __future__ import annotations

import logging

import pytest
import torch
from idforge.models.attention import PassThroughAttnProcessor, install_identity_processors
from idforge.models.reference_attention import (
    ReferenceAttnProcessor,
    ReferenceFeatures,
    install_reference_processors,
    load_reference_processors,
    reference_processor_state_dict,
    save_reference_processors,
)
from idforge.models.referencenet import ReferenceNet, ReferenceNetConfig
from idforge.models.zoo import TinyConfig, tiny_unet

# 8 x 8 main latents; two levels of 16 / 32 channels, attention at both
UNET = TinyConfig(resolution=16, unet_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8)
REF = 6  # reference latents are 6 x 6 (3 x 3 at the second level)


def _pair(placement="decoder", zero_init=False):
    unet = tiny_unet(UNET, seed=0)
    ref = ReferenceNet.from_unet(unet, ReferenceNetConfig(placement=placement, zero_init=zero_init))
    ref.attach(unet)
    return unet, ref


def _inputs(batch=2, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        torch.randn(batch, 5, 16, generator=g),
        torch.randn(batch, n, 4, REF, REF, generator=g),
        torch.randn(1, 5, 16, generator=g),  # the references' text (empty prompt)
    )


def _run(unet, x, t, ctx, reference):
    with torch.no_grad():
        kwargs = None if reference is None else {"reference": reference}
        return unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs=kwargs).sample


@pytest.mark.parametrize(
    ("placement", "parts"),
    [
        ("decoder", {"mid_block", "up_blocks"}),
        ("encoder", {"down_blocks", "mid_block"}),
        ("both", {"down_blocks", "mid_block", "up_blocks"}),
    ],
)
def test_key_length_is_target_plus_n_reference_tokens_at_each_placement(placement, parts):
    unet, ref = _pair(placement)
    x, t, ctx, refs, empty = _inputs(n=3)
    with torch.no_grad():
        features = ref.encode_references(refs, empty)
    _run(unet, x, t, ctx, features)
    procs = {k: p for k, p in unet.attn_processors.items() if isinstance(p, ReferenceAttnProcessor)}
    assert {k.split(".")[0] for k in procs} == parts
    assert all(k.endswith("attn1.processor") for k in procs)
    # level 0 (16 channels): 8 x 8 target, 6 x 6 references; level 1 (32 channels): 4 x 4 and 3 x 3
    expected = {16: 8 * 8 + 3 * REF * REF, 32: 4 * 4 + 3 * 3 * 3}
    for name, proc in procs.items():
        assert proc.last_key_length == expected[proc.hidden_size], name


def test_every_other_layer_accepts_the_reference_keyword_silently(caplog):
    unet, ref = _pair()
    others = [p for p in unet.attn_processors.values() if not isinstance(p, ReferenceAttnProcessor)]
    assert others and all(isinstance(p, PassThroughAttnProcessor) for p in others)
    x, t, ctx, refs, empty = _inputs()
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        _run(unet, x, t, ctx, ref.encode_references(refs, empty))
    assert "not expected" not in caplog.text


def test_references_change_the_output_and_dropping_them_gives_the_no_reference_output():
    unet, ref = _pair()
    x, t, ctx, refs, empty = _inputs()
    with torch.no_grad():
        features = ref.encode_references(refs, empty)
    none = _run(unet, x, t, ctx, None)
    with_refs = _run(unet, x, t, ctx, features)
    assert (with_refs - none).abs().max() > 1e-3
    dropped = _run(unet, x, t, ctx, features.drop(torch.tensor([True, False])))
    torch.testing.assert_close(dropped[0], none[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dropped[1], with_refs[1], rtol=1e-5, atol=1e-5)


def test_lambda_feat_zero_equals_the_no_reference_output_and_blends_linearly():
    unet, ref = _pair()
    x, t, ctx, refs, empty = _inputs()
    with torch.no_grad():
        features = ref.encode_references(refs, empty)
    none = _run(unet, x, t, ctx, None)
    assert torch.equal(_run(unet, x, t, ctx, features.with_lambda(0.0)), none)
    # eq. (2) is affine in lambda at a single layer: check it on the processor itself
    proc = unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    y = torch.randn(2, 16, 32)
    terms = {lam: proc.reference_term(4, y, features.with_lambda(lam)).detach() for lam in (0.0, 0.85, 1.0)}
    torch.testing.assert_close(terms[0.85], 0.15 * terms[0.0] + 0.85 * terms[1.0], rtol=1e-5, atol=1e-6)


def test_variable_n_with_padding_equals_running_each_sample_alone():
    unet, ref = _pair("both")
    x, t, ctx, refs, empty = _inputs(batch=2, n=3)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    refs[1, 1:] = 100.0  # padding content must not matter
    with torch.no_grad():
        batched = _run(unet, x, t, ctx, ref.encode_references(refs, empty, valid))
        alone = [
            _run(
                unet,
                x[i : i + 1],
                t[i : i + 1],
                ctx[i : i + 1],
                ref.encode_references(refs[i : i + 1, :k], empty),
            )
            for i, k in ((0, 3), (1, 1))
        ]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_identity_mixing_weight_one_is_the_first_person_and_mixing_blends_between():
    unet, ref = _pair()
    x, t, ctx, refs, empty = _inputs(batch=2, n=2)
    other = torch.randn(2, 3, 4, REF, REF, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = ref.encode_references(refs, empty), ref.encode_references(other, empty)
    out_a, out_b = _run(unet, x, t, ctx, a), _run(unet, x, t, ctx, b)
    torch.testing.assert_close(
        _run(unet, x, t, ctx, ReferenceFeatures.mix(a, b, 1.0)), out_a, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        _run(unet, x, t, ctx, ReferenceFeatures.mix(a, b, 0.0)), out_b, rtol=1e-5, atol=1e-5
    )
    half = _run(unet, x, t, ctx, ReferenceFeatures.mix(a, b, 0.5))
    assert (half - out_a).abs().max() > 1e-4 and (half - out_b).abs().max() > 1e-4
    # at one layer the mix is exactly sum_g w_g Attn_ref(y, cat[y, y_r^g])
    proc = unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    y = torch.randn(2, 16, 32)
    with torch.no_grad():
        mixed = proc.reference_term(4, y, ReferenceFeatures.mix(a, b, 0.3))
        expected = 0.3 * proc.reference_term(4, y, a) + 0.7 * proc.reference_term(4, y, b)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


def test_copy_init_follows_flashface_and_zero_init_leaves_the_base_unet_unchanged():
    base = tiny_unet(UNET, seed=0)
    x, t, ctx, refs, empty = _inputs()
    base_out = _run(base, x, t, ctx, None)
    unet, ref = _pair(zero_init=True)
    with torch.no_grad():
        features = ref.encode_references(refs, empty)
    assert torch.equal(_run(unet, x, t, ctx, features), base_out)
    copied, _ = _pair(zero_init=False)
    proc = copied.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    attn = dict(copied.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert torch.equal(proc.to_k_ref.weight, attn.to_k.weight)
    assert torch.equal(proc.to_out_ref.bias, attn.to_out[0].bias)
    assert (_run(copied, x, t, ctx, None) - base_out).abs().max() > 1e-4  # the copy adds a term


def test_gradients_reach_the_referencenet_and_the_reference_attention():
    unet, ref = _pair()
    x, t, ctx, refs, empty = _inputs()
    features = ref.encode_references(refs, empty)
    unet(
        x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"reference": features}
    ).sample.square().mean().backward()
    groups = ref.parameter_groups(unet)
    assert groups["reference_attention"] and all(p.grad is not None for p in groups["reference_attention"])
    attn1 = ref.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert attn1.to_q.weight.grad is not None and attn1.to_q.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        unet, ref = _pair()
        if checkpointing:
            unet.enable_gradient_checkpointing()
            ref.unet.enable_gradient_checkpointing()
        unet.train(), ref.train()
        x, t, ctx, refs, empty = _inputs()
        features = ref.encode_references(refs, empty)
        out = unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"reference": features}).sample
        out.square().mean().backward()
        grads.append(ref.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_v.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_processors_save_and_load_alone_with_the_exact_key_set(tmp_path):
    unet, ref = _pair()
    with torch.no_grad():
        for proc in unet.attn_processors.values():
            if isinstance(proc, ReferenceAttnProcessor):
                proc.to_out_ref.weight.mul_(3.0)
    save_reference_processors(unet, tmp_path)
    x, t, ctx, refs, empty = _inputs()
    with torch.no_grad():
        features = ref.encode_references(refs, empty)
    expected = _run(unet, x, t, ctx, features)
    fresh = tiny_unet(UNET, seed=0)
    install_reference_processors(fresh, "decoder")
    assert not torch.equal(_run(fresh, x, t, ctx, features), expected)
    load_reference_processors(fresh, tmp_path)
    assert torch.equal(_run(fresh, x, t, ctx, features), expected)
    keys = set(reference_processor_state_dict(fresh))
    layers = [
        f"{part}.attentions.{i}.transformer_blocks.0.attn1.processor"
        for part, i in (
            ("mid_block", 0),
            ("up_blocks.0", 0),
            ("up_blocks.0", 1),
            ("up_blocks.1", 0),
            ("up_blocks.1", 1),
        )
    ]
    params = ("to_q_ref.weight", "to_k_ref.weight", "to_v_ref.weight", "to_out_ref.weight", "to_out_ref.bias")
    assert keys == {f"{layer}.{p}" for layer in layers for p in params}
    assert keys <= set(fresh.state_dict())  # the same tensors live in the UNet's state dict
    other = tiny_unet(UNET, seed=0)
    install_reference_processors(other, "encoder")
    with pytest.raises(ValueError, match="keys do not match"):
        load_reference_processors(other, tmp_path)


def test_reference_processors_sit_beside_the_adapter_identity_processors():
    unet = tiny_unet(UNET, seed=0)
    install_identity_processors(unet, cross_attention_dim=16)
    ref = ReferenceNet.from_unet(unet)
    procs = ref.attach(unet)
    names = {type(p).__name__ for p in unet.attn_processors.values()}
    assert names == {"IdentityAttnProcessor", "ReferenceAttnProcessor", "PassThroughAttnProcessor"}
    assert len(procs) == 5
    # the ReferenceNet is a plain UNet: no identity processors were copied into it
    assert {type(p).__name__ for p in ref.unet.attn_processors.values()} == {
        "AttnProcessor2_0",
        "ReferenceRecordAttnProcessor",
    }
