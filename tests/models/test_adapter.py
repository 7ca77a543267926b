"""Diff-ID adapter: the equations of sec. 3.2 / appendix A.1 eq. (5)-(15), stated as tests."""

from __future__ import annotations

import pytest
import torch
from idforge.models.adapter import DiffIDAdapter, DualCrossAttention, FusionMLP

B, T, D, C = 2, 7, 16, 12  # batch, text tokens, text width, cross-attention width


def _inputs(seed=0, patch=False):
    g = torch.Generator().manual_seed(seed)
    arc = torch.randn(B, 32, generator=g)
    clip = torch.randn(B, 5, 24, generator=g) if patch else torch.randn(B, 24, generator=g)
    text = torch.randn(B, T, D, generator=g)
    return arc, clip, text


def _adapter(**kw):
    torch.manual_seed(0)
    return DiffIDAdapter(arcface_dim=32, clip_dim=24, text_dim=D, cross_attention_dim=C, **kw)


def test_identity_branch_is_quadratic_and_attribute_branch_linear_in_text_scale():
    torch.manual_seed(0)
    attn = DualCrossAttention(D)
    e_id, e_t = torch.randn(B, 4, D), torch.randn(B, T, D)
    ident1, attr1 = attn(e_id, e_t)
    ident3, attr3 = attn(e_id, 3 * e_t)
    assert torch.allclose(ident3, 9 * ident1, rtol=1e-4, atol=1e-5)  # K and V both from e_t
    assert torch.allclose(attr3, 3 * attr1, rtol=1e-4, atol=1e-5)  # only Q from e_t
    soft = DualCrossAttention(D, softmax=True)
    soft.load_state_dict(attn.state_dict())
    assert not torch.allclose(soft(e_id, 3 * e_t)[0], 9 * soft(e_id, e_t)[0], rtol=1e-3)


def test_text_scale_laws_hold_inside_the_adapter_because_w_s_is_linear():
    ad = _adapter()
    seen = []
    ad.dual_attention.register_forward_hook(lambda m, i, o: seen.append(o))
    arc, clip, text = _inputs()
    ad(arc, clip, text)
    ad(arc, clip, 2 * text)
    (i1, a1), (i2, a2) = seen
    assert torch.allclose(i2, 4 * i1, rtol=1e-4, atol=1e-5)
    assert torch.allclose(a2, 2 * a1, rtol=1e-4, atol=1e-5)


def test_no_softmax_product_matches_the_equation_and_the_options():
    torch.manual_seed(0)
    attn = DualCrossAttention(D)
    e_id, e_t = torch.randn(B, 4, D), torch.randn(B, T, D)
    q, k, v = attn.to_q_id(e_id), attn.to_k_id(e_t), attn.to_v_id(e_t)
    expected = (q @ k.transpose(1, 2) / D**0.5) @ v
    assert torch.allclose(attn(e_id, e_t)[0], expected, atol=1e-5)
    qa, ka, va = attn.to_q_attr(e_t), attn.to_k_attr(e_id), attn.to_v_attr(e_id)
    assert torch.allclose(attn(e_id, e_t)[1], (qa @ ka.transpose(1, 2) / D**0.5) @ va, atol=1e-5)
    norm = DualCrossAttention(D, normalize_by_length=True)
    norm.load_state_dict(attn.state_dict())
    assert torch.allclose(norm(e_id, e_t)[0], expected / T, atol=1e-5)  # identity branch: T text keys
    soft = DualCrossAttention(D, softmax=True)
    soft.load_state_dict(attn.state_dict())
    assert torch.allclose(soft(e_id, e_t)[0], (q @ k.transpose(1, 2) / D**0.5).softmax(-1) @ v, atol=1e-5)


def test_heads_split_the_width_with_per_head_scaling():
    torch.manual_seed(0)
    attn = DualCrossAttention(D, num_heads=4)
    e_id, e_t = torch.randn(B, 4, D), torch.randn(B, T, D)
    q, k, v = attn.to_q_id(e_id), attn.to_k_id(e_t), attn.to_v_id(e_t)
    heads = [
        (q[..., h * 4 : (h + 1) * 4] @ k[..., h * 4 : (h + 1) * 4].transpose(1, 2) / 2.0)
        @ v[..., h * 4 : (h + 1) * 4]
        for h in range(4)
    ]
    out = attn(e_id, e_t)
    assert torch.allclose(out[0], torch.cat(heads, -1), atol=1e-5)
    assert out[1].shape == (B, T, D)
    assert all(m.bias is None for m in attn.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match="num_heads"):
        DualCrossAttention(D, num_heads=3)


def test_one_shared_projection_serves_both_branches():
    ad = _adapter()
    calls = []
    ad.shared_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    ad(*_inputs())
    assert calls == [4, T]  # e_id then e_t, through the same module
    shared = [n for n, _ in ad.named_parameters() if n.startswith("shared_proj")]
    assert shared == ["shared_proj.weight"]  # one bias-free W_s, no per-branch copy
    assert ad.proj_arcface.out_features == ad.proj_clip.out_features == D  # W_arc, W_i -> text width


def test_final_context_equals_the_equations_written_out():
    ad = _adapter()
    arc, clip, text = _inputs()
    w_s, att, mlp = ad.shared_proj.weight, ad.dual_attention, ad.mlp
    e_arc, e_i = arc @ ad.proj_arcface.weight.T, clip @ ad.proj_clip.weight.T  # eq. (5)
    e_img = torch.stack([e_arc, e_i], 1)
    e_id = torch.cat([e_img, e_img.max(1, keepdim=True).values, e_img.mean(1, keepdim=True)], 1)  # eq. (6)
    id_t, t_t = e_id @ w_s.T, text @ w_s.T  # eq. (7)

    def branch(q, k, v):  # eq. (8)
        return (q @ k.transpose(1, 2) / D**0.5) @ v

    e_identity = branch(att.to_q_id(id_t), att.to_k_id(t_t), att.to_v_id(t_t))  # eq. (9)-(10)
    e_attribute = branch(att.to_q_attr(t_t), att.to_k_attr(id_t), att.to_v_attr(id_t))  # eq. (11)-(12)
    fused = torch.cat([e_identity, e_attribute], 1)  # eq. (13)
    refined = torch.relu(mlp.fc2(torch.relu(mlp.fc1(fused))))  # eq. (14)-(15)
    assert torch.allclose(ad(arc, clip, text).context, refined, atol=1e-5)


def test_token_counts_and_pooling():
    ad = _adapter()
    arc, clip, text = _inputs()
    e_id = ad.identity_tokens(arc, clip)
    assert e_id.shape == (B, 4, D)  # e'_arc, e'_i, max, avg
    e_img = e_id[:, :2]
    assert torch.equal(e_id[:, 2], e_img.max(1).values) and torch.allclose(e_id[:, 3], e_img.mean(1))
    assert ad(arc, clip, text).context.shape == (B, 4 + T, C)
    assert ad.num_identity_tokens() == 4
    patch = _adapter(clip_tokens="patch")
    arc, clip, text = _inputs(patch=True)
    e_id = patch.identity_tokens(arc, clip)
    assert e_id.shape == (B, 1 + 5 + 2, D)
    assert torch.equal(e_id[:, 6], e_id[:, :6].max(1).values)  # pooled over all 6 image tokens
    assert patch(arc, clip, text).context.shape == (B, 8 + T, C) and patch.num_identity_tokens(5) == 8


def test_fusion_mlp_is_non_negative_with_the_default_final_relu():
    ctx = _adapter()(*_inputs()).context
    assert (ctx >= 0).all() and (ctx > 0).any()
    raw = _adapter(final_activation=False)(*_inputs()).context
    assert (raw < 0).any()
    mlp = FusionMLP(4, 8, 3)
    x = torch.randn(5, 4)
    assert torch.allclose(mlp(x), torch.relu(mlp.fc2(torch.relu(mlp.fc1(x)))))
    assert _adapter(mlp_hidden_dim=5).mlp.fc1.out_features == 5 and _adapter().mlp.fc1.out_features == 2 * D


def test_model_dim_sets_the_width_of_w_s_and_the_dual_attention():
    ad = _adapter(model_dim=8, num_heads=2)
    assert ad.shared_proj.weight.shape == (8, D) and ad.dual_attention.to_q_id.in_features == 8
    assert ad(*_inputs()).context.shape == (B, 4 + T, C)


@pytest.mark.parametrize("variant,tokens", [("arcface", 3), ("clip", 3), ("joint", 4), ("final", 4)])
def test_ablation_variants_shapes(variant, tokens):
    ad = _adapter(variant=variant)
    arc, clip, text = _inputs()
    e_id = ad.identity_tokens(arc, clip)
    assert e_id.shape == (B, tokens, D)
    out = ad(arc, clip, text)
    assert out.context.shape == (B, tokens + T, C) and out.id_tokens is None
    assert (ad.dual_attention is None) == (variant == "joint")
    assert (ad.proj_arcface is None) == (variant == "clip") and (ad.proj_clip is None) == (
        variant == "arcface"
    )
    if variant == "arcface":
        assert torch.allclose(e_id[:, 1], e_id[:, 0]) and torch.allclose(e_id[:, 2], e_id[:, 0])
        assert torch.allclose(out.context, ad(arc, clip * 5, text).context)  # CLIP input unused


def test_joint_variant_is_the_mlp_of_the_concatenated_projections():
    ad = _adapter(variant="joint")
    arc, clip, text = _inputs()
    fused = torch.cat([ad.shared_proj(ad.identity_tokens(arc, clip)), ad.shared_proj(text)], 1)
    assert torch.allclose(ad(arc, clip, text).context, ad.mlp(fused), atol=1e-6)


@pytest.mark.parametrize("patch", [False, True])
def test_decoupled_variant_keeps_text_and_emits_identity_tokens(patch):
    ad = _adapter(variant="decoupled", num_decoupled_tokens=3, clip_tokens="patch" if patch else "pooled")
    arc, clip, text = _inputs(patch=patch)
    out = ad(arc, clip, text)
    assert out.context is text
    assert out.id_tokens.shape == (B, 3, C) and ad.num_identity_tokens() == 3
    assert not torch.allclose(out.id_tokens, ad(arc * 2, clip, text).id_tokens)
    assert not hasattr(ad, "shared_proj")


def test_zeroed_identity_gives_a_constant_context_unless_text_residual():
    arc, clip, text = _inputs()
    ad = _adapter()
    a = ad(arc * 0, clip * 0, text).context
    b = ad(arc * 0, clip * 0, torch.randn_like(text)).context
    assert torch.allclose(a, b)
    res = _adapter(text_residual=True)
    assert not torch.allclose(res(arc * 0, clip * 0, text).context, res(arc * 0, clip * 0, text * 2).context)


def test_layernorm_switch_and_clear_errors():
    ad = _adapter(input_layernorm=True)
    assert ad.norm_id is not None and ad(*_inputs()).context.shape[1] == 4 + T
    with pytest.raises(ValueError, match="variant"):
        _adapter(variant="nope")
    with pytest.raises(ValueError, match="clip_tokens='patch'"):
        _adapter()(*_inputs(patch=True))
    with pytest.raises(ValueError, match="clip_tokens='pooled'"):
        _adapter(clip_tokens="patch")(*_inputs())
    with pytest.raises(ValueError, match="text states"):
        _adapter()(*_inputs()[:2], torch.zeros(B, T, D + 1))
    with pytest.raises(ValueError, match="not both"):
        _adapter(softmax=True, normalize_by_length=True)


@pytest.mark.parametrize("variant", ["final", "decoupled"])
def test_save_and_load_round_trip(tmp_path, variant):
    ad = _adapter(variant=variant, softmax=True, num_heads=2)
    ad.save_pretrained(tmp_path / "a")
    assert list((tmp_path / "a").glob("*.safetensors"))
    back = DiffIDAdapter.from_pretrained(tmp_path / "a")
    assert back.config.softmax and back.config.variant == variant and back.config.num_heads == 2
    x, y = ad(*_inputs()), back(*_inputs())
    assert torch.equal(x.context, y.context)
    assert (x.id_tokens is None) == (variant != "decoupled")
    if variant == "decoupled":
        assert torch.equal(x.id_tokens, y.id_tokens)


def test_text_start_gives_the_text_states_at_step_zero_and_learns_from_the_first_step():
    torch.manual_seed(0)
    adapter = DiffIDAdapter(
        arcface_dim=12,
        clip_dim=8,
        text_dim=16,
        cross_attention_dim=16,
        text_start=True,
        final_activation=False,
    )
    e_arc, e_i, e_t = torch.randn(2, 12), torch.randn(2, 8), torch.randn(2, 5, 16)
    ctx = adapter(e_arc, e_i, e_t).context
    n_id = adapter.num_identity_tokens()
    assert ctx.shape == (2, n_id + 5, 16)
    assert torch.equal(ctx[:, n_id:], e_t) and torch.equal(ctx[:, :n_id], torch.zeros(2, n_id, 16))
    ctx.pow(2).sum().backward()
    assert adapter.mlp.fc2.weight.grad.abs().sum() > 0  # the zero output layer trains at once
    paper = DiffIDAdapter(arcface_dim=12, clip_dim=8, text_dim=16, cross_attention_dim=16)
    assert not torch.allclose(paper(e_arc, e_i, e_t).context[:, n_id:], e_t)  # the paper replaces e_t


def test_text_start_refuses_a_final_relu():
    with pytest.raises(ValueError, match="text_start: needs adapter.final_activation: false"):
        DiffIDAdapter(arcface_dim=12, clip_dim=8, text_dim=16, cross_attention_dim=16, text_start=True)
