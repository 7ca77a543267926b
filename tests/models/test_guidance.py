"""Three-branch guidance (FlashFace eq. (3)) in one batched UNet call equals the formula on three calls."""

from __future__ import annotations

import torch
from idforge.models.guidance import combine_three_branch, three_branch_predict
from idforge.models.referencenet import ReferenceNet
from idforge.models.zoo import TinyConfig, tiny_unet

UNET = TinyConfig(resolution=16, unet_channels=(16, 32), cross_attention_dim=16, attention_head_dim=8)


def test_one_batched_call_equals_the_three_branch_formula():
    unet = tiny_unet(UNET, seed=0)
    ref = ReferenceNet.from_unet(unet)
    ref.attach(unet)
    g = torch.Generator().manual_seed(3)
    x, text, null = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.zeros(1, 5, 16),
    )
    t = torch.tensor(500)
    with torch.no_grad():
        features = ref.encode_references(torch.randn(2, 2, 4, 6, 6, generator=g), null).with_lambda(0.85)

        def call(ctx, reference):
            kwargs = None if reference is None else {"reference": reference}
            return unet(x, t.expand(2), encoder_hidden_states=ctx, cross_attention_kwargs=kwargs).sample

        y_none, y_text, y_ref = call(null.expand(2, -1, -1), None), call(text, None), call(text, features)
        guided = three_branch_predict(unet, x, t, text, null, features, lambda_text=7.5, lambda_ref=2.0)
    expected = y_none + 7.5 * (y_text - y_none) + 2.0 * (y_ref - y_text)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)
    assert (y_ref - y_text).abs().max() > 1e-3  # the reference branch really differs


def test_combine_is_the_plain_formula_and_reduces_to_cfg_without_reference_guidance():
    pred = torch.randn(6, 3)
    y_none, y_text, y_ref = pred.chunk(3)
    torch.testing.assert_close(combine_three_branch(pred, 1.0, 0.0), y_text)
    torch.testing.assert_close(combine_three_branch(pred, 7.5, 0.0), y_none + 7.5 * (y_text - y_none))
    torch.testing.assert_close(combine_three_branch(pred, 1.0, 1.0), y_ref)
