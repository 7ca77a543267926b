"""ReferenceAttnProcessor and ReferenceFeatures on one diffusers Attention layer: the output is the stock
self-attention plus the reference term (FlashFace eq. (2)) scaled by the layer's output factor, the default
projections match diffusers' layout, and malformed features get errors that name the shapes."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from idforge.models.reference_attention import ReferenceAttnProcessor, ReferenceFeatures


def _layer(rescale=1.0):
    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8, rescale_output_factor=rescale).eval()


def _y(batch=2, length=5, seed=1):
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rescale", [1.0, 2.0])
def test_copy_init_without_references_adds_a_second_self_attention_term(rescale):
    """Attn_ref is a copy of the self-attention, so with no references eq. (2) adds Attn1(y, y) once
    more, and both terms are divided by the layer's rescale_output_factor: out = 2 x stock output."""
    attn = _layer(rescale)
    proc = ReferenceAttnProcessor.from_attention("attn1", attn)
    y = _y()
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, y)
        out = proc(attn, y)
    torch.testing.assert_close(out, 2 * stock, rtol=1e-5, atol=1e-6)


def test_the_reference_term_is_added_to_the_self_attention():
    attn = _layer()
    proc = ReferenceAttnProcessor.from_attention("attn1", attn)
    y, states = _y(), _y(batch=3, length=4, seed=2)
    ref = ReferenceFeatures(
        {"attn1": states}, torch.tensor([[[0, 1]], [[2, 0]]]), torch.ones(2, 1, 2, dtype=torch.bool)
    )
    with torch.no_grad():
        out = proc(attn, y, reference=ref)
        expected = AttnProcessor2_0()(attn, y) + proc.reference_term(attn.heads, y, ref)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, 2 * AttnProcessor2_0()(attn, y), atol=1e-3)  # the references count


def test_default_projections_have_diffusers_bias_layout_and_load_a_copied_processor():
    """Default: no bias on q/k/v, a bias on the output, as diffusers' Attention (bias=False,
    out_bias=True), so a processor built from the layout alone loads one copied from a layer."""
    proc = ReferenceAttnProcessor("attn1", 16)
    assert proc.to_out_ref.bias is not None
    assert all(p.bias is None for p in (proc.to_q_ref, proc.to_k_ref, proc.to_v_ref))
    copied = ReferenceAttnProcessor.from_attention("attn1", _layer())
    proc.load_state_dict(copied.state_dict())  # strict: the key sets match
    y = _y()
    torch.testing.assert_close(proc.reference_term(2, y, None), copied.reference_term(2, y, None))


def _match(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_index_and_mask_of_different_shapes_are_an_error_naming_both():
    with pytest.raises(
        ValueError,
        match=_match("ReferenceFeatures: index and mask must both be (B, G, N), got (2, 1, 3) and (2, 3)"),
    ):
        ReferenceFeatures({}, torch.zeros(2, 1, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))


def test_groups_without_weights_and_weights_of_the_wrong_shape_are_errors():
    index, mask = torch.zeros(2, 2, 3, dtype=torch.long), torch.ones(2, 2, 3, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=_match("ReferenceFeatures: 2 reference groups need mixing weights (B, 2)")
    ):
        ReferenceFeatures({}, index, mask)
    with pytest.raises(
        ValueError, match=_match("ReferenceFeatures: weights must be (B, G) = (2, 2), got (2, 3)")
    ):
        ReferenceFeatures({}, index, mask, weights=torch.ones(2, 3))
    assert ReferenceFeatures({}, index, mask, weights=torch.full((2, 2), 0.5)).batch_size == 2


def test_mixing_features_of_different_batches_or_layers_is_an_error():
    def features(batch, layer):
        return ReferenceFeatures.from_padded({layer: _y(batch)}, torch.ones(batch, 1, dtype=torch.bool))

    message = _match("ReferenceFeatures.mix: both features must cover the same batch and layers")
    with pytest.raises(ValueError, match=message):
        ReferenceFeatures.mix(features(2, "a"), features(3, "a"), 0.5)
    with pytest.raises(ValueError, match=message):
        ReferenceFeatures.mix(features(2, "a"), features(2, "b"), 0.5)
    mixed = ReferenceFeatures.mix(features(2, "a"), features(2, "a"), 0.25)
    torch.testing.assert_close(mixed.weights, torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    assert mixed.index.tolist() == [[[0], [2]], [[1], [3]]]  # b's rows follow a's two
