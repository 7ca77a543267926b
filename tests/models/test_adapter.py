"""Diff-ID adapter: the equations of sec. 3.2 / appendix A.1, stated as tests."""

from __future__ import annotations

import pytest
import torch

from idforge.models.adapter import DiffIDAdapter, DualCrossAttention, FusionMLP

B, T, D = 2, 7, 16


def _inputs(seed=0, patch=False):
    g = torch.Generator().manual_seed(seed)
    arc = torch.randn(B, 32, generator=g)
    clip = torch.randn(B, 5, 24, generator=g) if patch else torch.randn(B, 24, generator=g)
    text = torch.randn(B, T, D, generator=g)
    return arc, clip, text


def _adapter(**kw):
    torch.manual_seed(0)
    return DiffIDAdapter(arcface_dim=32, clip_dim=24, text_dim=D, cross_attention_dim=12, **kw)


def test_identity_branch_is_quadratic_and_attribute_branch_linear_in_text_scale():
    attn = DualCrossAttention(D)
    e_id, e_t = torch.randn(B, 4, D), torch.randn(B, T, D)
    ident1, attr1 = attn(e_id, e_t)
    ident3, attr3 = attn(e_id, 3 * e_t)
    assert torch.allclose(ident3, 9 * ident1, rtol=1e-4, atol=1e-5)  # K and V both from e_t
    assert torch.allclose(attr3, 3 * attr1, rtol=1e-4, atol=1e-5)  # only Q from e_t


def test_no_softmax_product_matches_the_equation():
    attn = DualCrossAttention(D)
    e_id, e_t = torch.randn(B, 4, D), torch.randn(B, T, D)
    q, k, v = attn.to_q_id(e_id), attn.to_k_id(e_t), attn.to_v_id(e_t)
    expected = (q @ k.transpose(1, 2) / D**0.5) @ v
    assert torch.allclose(attn(e_id, e_t)[0], expected, atol=1e-5)
    norm = DualCrossAttention(D, normalize_by_length=True)
    norm.load_state_dict(attn.state_dict())
    assert torch.allclose(norm(e_id, e_t)[0], expected / T, atol=1e-5)
    soft = DualCrossAttention(D, softmax=True)
    soft.load_state_dict(attn.state_dict())
    assert torch.allclose(soft(e_id, e_t)[0], (q @ k.transpose(1, 2) / D**0.5).softmax(-1) @ v, atol=1e-5)


def test_projections_are_bias_free_and_heads_split_the_width():
    attn = DualCrossAttention(D, num_heads=4)
    assert all(m.bias is None for m in (attn.to_q_id, attn.to_k_id, attn.to_v_id, attn.to_q_attr))
    out = attn(torch.randn(B, 4, D), torch.randn(B, T, D))
    assert out[0].shape == (B, 4, D) and out[1].shape == (B, T, D)
    with pytest.raises(ValueError, match="divisible"):
        DualCrossAttention(D, num_heads=3)


def test_one_shared_projection_serves_both_branches():
    ad = _adapter()
    calls = []
    ad.shared_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    ad(*_inputs())
    assert len(calls) == 2 and calls[0][1] == 4 and calls[1][1] == T  # e_id then e_t, same module
    assert ad.shared_proj.bias is None
    names = [n for n, _ in ad.named_parameters() if "shared" in n]
    assert names == ["shared_proj.weight"]


def test_token_counts_and_pooling():
    ad = _adapter()
    arc, clip, text = _inputs()
    e_id = ad.identity_tokens(arc, clip)
    assert e_id.shape == (B, 4, D)  # e'_arc, e'_i, max, avg
    e_img = e_id[:, :2]
    assert torch.allclose(e_id[:, 2], e_img.max(1).values) and torch.allclose(e_id[:, 3], e_img.mean(1))
    assert ad(arc, clip, text).context.shape == (B, 4 + T, 12)
    patch = _adapter(clip_tokens="patch")
    arc, clip, text = _inputs(patch=True)
    assert patch.identity_tokens(arc, clip).shape == (B, 1 + 5 + 2, D)
    assert patch(arc, clip, text).context.shape == (B, 8 + T, 12)


def test_fusion_mlp_is_non_negative_with_the_default_final_relu():
    ctx = _adapter()(*_inputs()).context
    assert (ctx >= 0).all() and (ctx > 0).any()
    raw = _adapter(final_activation=False)(*_inputs()).context
    assert (raw < 0).any()
    mlp = FusionMLP(4, 8, 3)
    x = torch.randn(5, 4)
    assert torch.allclose(mlp(x), torch.relu(mlp.fc2(torch.relu(mlp.fc1(x)))))


@pytest.mark.parametrize("variant,tokens", [("arcface", 3), ("clip", 3), ("joint", 4), ("final", 4)])
def test_ablation_variants_shapes(variant, tokens):
    ad = _adapter(variant=variant)
    arc, clip, text = _inputs()
    assert ad.identity_tokens(arc, clip).shape == (B, tokens, D)
    out = ad(arc, clip, text)
    assert out.context.shape == (B, tokens + T, 12) and out.id_tokens is None
    assert (ad.dual_attention is None) == (variant == "joint")


def test_decoupled_variant_keeps_text_and_emits_identity_tokens():
    ad = _adapter(variant="decoupled")
    arc, clip, text = _inputs()
    out = ad(arc, clip, text)
    assert out.context is text
    assert out.id_tokens.shape == (B, 4, 12)


def test_zeroed_identity_gives_a_constant_context_unless_text_residual():
    arc, clip, text = _inputs()
    ad = _adapter()
    a = ad(arc * 0, clip * 0, text).context
    b = ad(arc * 0, clip * 0, torch.randn_like(text)).context
    assert torch.allclose(a, b)
    res = _adapter(text_residual=True)
    assert not torch.allclose(res(arc * 0, clip * 0, text).context, res(arc * 0, clip * 0, text * 2).context)


def test_layernorm_switch_and_validation():
    ad = _adapter(input_layernorm=True)
    assert ad.norm_id is not None and ad(*_inputs()).context.shape[1] == 4 + T
    with pytest.raises(ValueError, match="variant"):
        _adapter(variant="nope")
    with pytest.raises(ValueError, match="pooled"):
        _adapter()(*_inputs(patch=True))


def test_save_and_load_round_trip(tmp_path):
    ad = _adapter(variant="final", softmax=True)
    ad.save_pretrained(tmp_path / "a")
    back = DiffIDAdapter.from_pretrained(tmp_path / "a")
    assert back.config.softmax and back.config.variant == "final"
    assert torch.allclose(ad(*_inputs()).context, back(*_inputs()).context)
    assert list((tmp_path / "a").glob("*.safetensors"))
