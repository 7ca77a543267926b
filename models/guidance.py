"""Three-branch classifier-free guidance, FlashFace sec. 3.3 eq. (3), batched in one UNet call.

    Y = Y_none + lambda_text (Y_text - Y_none) + lambda_ref (Y_text&ref - Y_text)      (7.5, 2.0)

The three conditions run as one forward on a 3B batch ``[none | text | text&ref]``: the null text for
the first block, the prompt for the other two, and the same cached reference features for all three
with the references masked out (dropped) in the first two blocks, so the UNet's reference attention
sees K/V = y_g there (:class:`~idforge.models.reference_attention.ReferenceFeatures`).
"""

from __future__ import annotations

import torch
from torch import nn

from .reference_attention import ReferenceFeatures

LAMBDA_TEXT = 7.5
LAMBDA_REF = 2.0


def three_branch_inputs(
    latents: torch.Tensor,
    text_states: torch.Tensor,
    null_states: torch.Tensor,
    reference: ReferenceFeatures,
) -> tuple[torch.Tensor, torch.Tensor, ReferenceFeatures]:
    """The 3B batch ``[none | text | text&ref]``: latents (3B, ...), text states (3B, T, D), references.

    ``null_states`` (1 or B, T, D) are the empty prompt's states.
    """
    b = latents.shape[0]
    if reference.batch_size != b or text_states.shape[0] != b:
        raise ValueError(
            f"three_branch_inputs: latents ({b}), text states ({text_states.shape[0]}) and references "
            f"({reference.batch_size}) must cover the same batch"
        )
    null_states = null_states.expand(b, *null_states.shape[1:])
    branch = torch.arange(3, device=reference.mask.device).repeat_interleave(b)  # (3B,) 0, 1, 2
    refs = reference.repeat(3).drop(branch < 2)
    return (
        latents.repeat(3, *([1] * (latents.ndim - 1))),
        torch.cat([null_states, text_states, text_states]),
        refs,
    )


def combine_three_branch(
    pred: torch.Tensor, lambda_text: float = LAMBDA_TEXT, lambda_ref: float = LAMBDA_REF
) -> torch.Tensor:
    """Eq. (3) on a (3B, ...) prediction laid out ``[none | text | text&ref]``."""
    y_none, y_text, y_ref = pred.chunk(3)
    return y_none + lambda_text * (y_text - y_none) + lambda_ref * (y_ref - y_text)


def three_branch_predict(
    unet: nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    text_states: torch.Tensor,
    null_states: torch.Tensor,
    reference: ReferenceFeatures,
    lambda_text: float = LAMBDA_TEXT,
    lambda_ref: float = LAMBDA_REF,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """One UNet call on the 3B batch, combined by eq. (3). ``latents`` may carry the face-mask
    channels already; extra ``cross_attention_kwargs`` must be 3B-batched."""
    x, context, refs = three_branch_inputs(latents, text_states, null_states, reference)
    t = torch.as_tensor(timestep, device=latents.device)
    t = t.expand(latents.shape[0]).repeat(3) if t.ndim == 0 or t.numel() == 1 else t.repeat(3)
    kwargs = {**(cross_attention_kwargs or {}), "reference": refs}
    pred = unet(x, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample
    return combine_three_branch(pred, lambda_text, lambda_ref)
