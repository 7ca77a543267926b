"""Adapter behaviours the mutation run found unchecked: option validation messages, defaults, edges."""

from __future__ import annotations

import pytest
import torch
from idforge.models.adapter import DiffIDAdapter, DualCrossAttention, check_adapter_options


def test_dual_cross_attention_accepts_width_one_and_names_the_softmax_conflict():
    attn = DualCrossAttention(dim=1)
    e_id, e_attr = attn(torch.ones(1, 2, 1), torch.ones(1, 3, 1))
    assert e_id.shape == (1, 2, 1) and e_attr.shape == (1, 3, 1)
    with pytest.raises(ValueError, match=r"not both \(softmax already normalises over the keys\)$"):
        DualCrossAttention(dim=4, softmax=True, normalize_by_length=True)


def test_option_errors_name_the_first_unknown_key_and_the_bad_value():
    with pytest.raises(ValueError, match=r"^adapter\.aaa: not an adapter option"):
        check_adapter_options({"zzz": 1, "aaa": 2})
    with pytest.raises(ValueError, match=r"got 'grid'$"):
        check_adapter_options({"clip_tokens": "grid"})


def test_text_start_needs_final_activation_off_even_when_it_is_left_at_its_default():
    with pytest.raises(ValueError, match="final_activation"):
        check_adapter_options({"text_start": True})  # final_activation defaults to True
    check_adapter_options({"text_start": True, "final_activation": False})
    check_adapter_options({"text_start": True, "variant": "decoupled"})  # decoupled has no context MLP


def test_defaults_are_the_papers_widths_and_token_count():
    adapter = DiffIDAdapter()
    assert adapter.config.clip_dim == 1024  # CLIP ViT-H/14 image embedding (Diff-ID sec. 4.1)
    assert adapter.config.num_decoupled_tokens == 4  # IP-Adapter's image tokens (Ye et al. 2023)


def test_width_errors_name_the_width_and_text_start_names_both_widths():
    with pytest.raises(ValueError, match=r"^DiffIDAdapter: text_dim must be >= 1, got 0$"):
        DiffIDAdapter(text_dim=0)
    with pytest.raises(ValueError, match=r"^adapter\.text_start: the text width 32 must equal the UNet's"):
        DiffIDAdapter(text_dim=32, cross_attention_dim=64, text_start=True, final_activation=False)


def test_the_decoupled_variant_builds_no_identity_tokens_for_the_context():
    adapter = DiffIDAdapter(
        variant="decoupled", arcface_dim=8, clip_dim=8, text_dim=16, cross_attention_dim=16
    )
    with pytest.raises(ValueError, match="decoupled variant builds no e_id tokens"):
        adapter.identity_tokens(torch.randn(1, 8), torch.randn(1, 8))
