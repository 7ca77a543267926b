"""IdentityAttnProcessor on every branch of diffusers' attention (the mutation run found the 4-D,
group-norm, spatial-norm, mask, QK-norm and residual branches unchecked), and processor bookkeeping."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from idforge.models.attention import IdentityAttnProcessor, install_identity_processors, save_processors
from idforge.models.zoo import tiny_unet


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same_as_stock(attn: Attention, *args, **kwargs) -> None:
    proc = IdentityAttnProcessor(attn.inner_dim, attn.cross_attention_dim)
    ours = proc(attn, *args, **kwargs)
    stock = AttnProcessor2_0()(attn, *args, **kwargs)
    assert torch.equal(ours, stock)


def test_image_self_attention_with_group_spatial_norm_and_residual_equals_the_stock_processor():
    torch.manual_seed(0)
    attn = Attention(
        query_dim=32,
        heads=2,
        dim_head=16,
        norm_num_groups=4,
        spatial_norm_dim=3,
        residual_connection=True,
        rescale_output_factor=2.0,
    ).eval()
    x = torch.randn(2, 32, 4, 4, generator=_gen(1))  # (B, C, H, W): the 4-D input path
    temb = torch.randn(2, 3, 2, 2, generator=_gen(2))  # the spatial norm's conditioning
    _same_as_stock(attn, x, temb=temb)


def test_masked_cross_attention_with_qk_norm_equals_the_stock_processor():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, qk_norm="layer_norm").eval()
    x = torch.randn(2, 5, 8, generator=_gen(1))
    ctx = torch.randn(2, 7, 6, generator=_gen(2))
    mask = torch.zeros(2, 7)
    mask[:, 5:] = -1e4  # the last two text tokens masked out
    _same_as_stock(attn, x, ctx, attention_mask=mask)
    _same_as_stock(attn, x, ctx, attention_mask=torch.zeros(2, 1, 7))


def test_identity_branch_is_the_gated_attention_over_normed_identity_keys():
    """out = Attn(q, K_text, V_text) + gate * id_scale * Attn(q, norm_k(K_id), V_id) (IP-Adapter eq. 5)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, qk_norm="layer_norm").eval()
    proc = IdentityAttnProcessor(8, 6)
    with torch.no_grad():
        proc.gate.fill_(0.7)
    x = torch.randn(1, 5, 8, generator=_gen(1))
    ctx = torch.randn(1, 7, 6, generator=_gen(2))
    ids = torch.randn(1, 3, 6, generator=_gen(3))

    def heads(t):
        return t.view(1, -1, 2, 4).transpose(1, 2)

    with torch.no_grad():
        q = attn.norm_q(heads(attn.to_q(x)))
        k, v = attn.norm_k(heads(attn.to_k(ctx))), heads(attn.to_v(ctx))
        k_id, v_id = attn.norm_k(heads(proc.to_k_id(ids))), heads(proc.to_v_id(ids))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for scale in (1.0, 2.0):
            o = sdpa(q, k, v) + 0.7 * scale * sdpa(q, k_id, v_id)
            expected = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(1, 5, 8)))
            got = proc(attn, x, ctx, id_tokens=ids, id_scale=scale)
            assert torch.allclose(got, expected, atol=1e-6), scale
        assert torch.equal(proc(attn, x, ctx, id_tokens=ids), proc(attn, x, ctx, id_tokens=ids, id_scale=1.0))


def test_install_reports_identity_and_pass_through_counts_and_save_creates_nested_folders(tmp_path, caplog):
    unet = tiny_unet(seed=0)
    n_layers = len(unet.attn_processors)
    with caplog.at_level(logging.INFO, logger="idforge.models.attention"):
        trainable = install_identity_processors(unet, cross_attention_dim=unet.config.cross_attention_dim)
    n_id = len(trainable)
    assert 0 < n_id < n_layers
    messages = [r.getMessage() for r in caplog.records if r.name == "idforge.models.attention"]
    assert messages == [f"installed {n_id} identity attention processors ({n_layers - n_id} pass-through)"]
    path = save_processors(unet, IdentityAttnProcessor, tmp_path / "a" / "b", "ip.safetensors", "install")
    assert path.is_file()


def test_a_layout_mismatch_names_missing_and_unexpected_keys(tmp_path):
    from idforge.models.attention import load_processors
    from safetensors.torch import save_file

    unet = tiny_unet(seed=0)
    install_identity_processors(unet, cross_attention_dim=unet.config.cross_attention_dim)
    save_file({"bogus.to_k_id.weight": torch.zeros(1)}, tmp_path / "ip.safetensors")
    with pytest.raises(ValueError) as err:
        load_processors(unet, IdentityAttnProcessor, tmp_path, "ip.safetensors", "install")
    msg = str(err.value)
    assert msg.startswith(
        f"load {tmp_path / 'ip.safetensors'}: keys do not match the installed IdentityAttnProcessors"
    )
    assert msg.endswith(
        "unexpected ['bogus.to_k_id.weight']); call install with the layout it was saved with first"
    )


def test_cross_attention_with_a_normed_context_equals_the_stock_processor():
    """``cross_attention_norm`` (attn.norm_cross): the context is normed before K/V, as diffusers does."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm"
    )
    with torch.no_grad():
        attn.norm_cross.weight.uniform_(0.5, 1.5)
        attn.norm_cross.bias.uniform_(-0.5, 0.5)
    _same_as_stock(
        attn.eval(), torch.randn(2, 5, 8, generator=_gen(1)), torch.randn(2, 7, 6, generator=_gen(2))
    )


def test_wrong_identity_token_batch_is_refused_with_the_shapes():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    proc = IdentityAttnProcessor(attn.inner_dim, 6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    with pytest.raises(ValueError) as err:
        proc(attn, x, ctx, id_tokens=torch.randn(3, 4, 6))
    assert str(err.value) == "IdentityAttnProcessor: id_tokens must be (2, n, 6), got (3, 4, 6)"
