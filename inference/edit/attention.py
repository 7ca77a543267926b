"""Image-to-concept attention captured by attention processors (FINEdits sec. 3.1, SPEC.md sec. 5).

alpha = softmax(q_z k^T / sqrt(d)) between image tokens and the prompt's tokens, restricted to the
concept tokens c*, averaged over concept tokens and heads; :class:`AttentionRecorder` sums it over
the layers it is installed on. The recording processors wrap the model's own processors: they
recompute q and k from the layer's projections (``attn.to_q`` ...) and hand the call to the wrapped
processor unchanged, so no model code is copied and outputs are bit-identical with or without them.

- UNet cross-attention (``attn2``): keys are the text (context) tokens only.
- SD3 joint attention: image and text tokens attend jointly, so the softmax runs over image + text
  keys and the concept columns sit after the image keys (offset = number of image tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def concept_token_indices(tokenizer, prompt: str, concept: str, max_length: int | None = None) -> list[int]:
    """Positions of ``concept``'s tokens inside ``prompt`` as ``tokenizer`` encodes it (special tokens
    included, so a CLIP BOS shifts them by one; T5 has none in front). The first occurrence of the
    concept's token sequence is used; a concept that is not in the prompt is an error."""
    kw = {"truncation": True, "max_length": max_length or tokenizer.model_max_length}
    ids = list(tokenizer(prompt, **kw).input_ids)
    sub = list(tokenizer(concept, add_special_tokens=False).input_ids)
    if not sub:
        raise ValueError(f"concept {concept!r} has no tokens; give the words of the prompt to edit")
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(
        f"concept {concept!r} is not in the prompt {prompt!r} (as {type(tokenizer).__name__} tokens); "
        "use words that appear verbatim in the prompt"
    )


class AttentionRecorder:
    """Sums image-to-concept attention maps (B, N_img) over the layers while ``active``."""

    def __init__(self):
        self.indices: torch.Tensor | None = None
        self.active = False
        self.maps: list[torch.Tensor] = []  # one (B, N_img) per layer call

    def start(self, indices: list[int]) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.maps = []
        self.active = True

    def stop(self) -> list[torch.Tensor]:
        self.active = False
        return self.maps

    def record(self, probs_concept: torch.Tensor) -> None:
        """``probs_concept``: (B, heads, N_img, |c*|) -> mean over heads and concept tokens."""
        self.maps.append(probs_concept.float().mean(dim=(1, 3)).detach())  # (B, N_img)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, h, N, d)


def _concept_probs(q: torch.Tensor, k: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T scale) over all keys, keeping only ``cols``; one head at a time to bound memory."""
    out = []
    for h in range(q.shape[1]):
        probs = torch.softmax((q[:, h].float() @ k[:, h].float().transpose(-1, -2)) * scale, dim=-1)
        out.append(probs[..., cols])  # (B, N_img, |c*|)
    return torch.stack(out, dim=1)  # (B, h, N_img, |c*|)


class RecordingCrossAttnProcessor(torch.nn.Module):
    """Wraps a UNet attention processor; on cross-attention calls records softmax(q k_text^T)."""

    def __init__(self, inner, recorder: AttentionRecorder):
        super().__init__()
        self.inner = inner
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.recorder.active and encoder_hidden_states is not None and hidden_states.ndim == 3:
            with torch.no_grad():
                ctx = encoder_hidden_states
                ctx = ctx[0] if isinstance(ctx, tuple) else ctx  # IP-Adapter-style (text, extra) tuple
                if attn.norm_cross:
                    ctx = attn.norm_encoder_hidden_states(ctx)
                q = _heads(attn.to_q(hidden_states), attn.heads)  # (B, h, N_img, d)
                k = _heads(attn.to_k(ctx), attn.heads)  # (B, h, L, d)
                cols = self.recorder.indices.to(q.device)
                self.recorder.record(_concept_probs(q, k, cols, 1.0 / math.sqrt(q.shape[-1])))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


class RecordingJointAttnProcessor(torch.nn.Module):
    """Wraps SD3's ``JointAttnProcessor2_0``; records the joint softmax's image -> concept columns."""

    def __init__(self, inner, recorder: AttentionRecorder):
        super().__init__()
        self.inner = inner
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self.recorder.active and encoder_hidden_states is not None:
            with torch.no_grad():
                q = _heads(attn.to_q(hidden_states), attn.heads)  # (B, h, N_img, d)
                k_img = _heads(attn.to_k(hidden_states), attn.heads)
                k_txt = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads)  # (B, h, L, d)
                if attn.norm_q is not None:
                    q = attn.norm_q(q)
                if attn.norm_k is not None:
                    k_img = attn.norm_k(k_img)
                if attn.norm_added_k is not None:
                    k_txt = attn.norm_added_k(k_txt)
                keys = torch.cat([k_img, k_txt], dim=2)  # (B, h, N_img + L, d)
                cols = self.recorder.indices.to(q.device) + hidden_states.shape[1]
                self.recorder.record(_concept_probs(q, keys, cols, 1.0 / math.sqrt(q.shape[-1])))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def install_recorder(model: torch.nn.Module, recorder: AttentionRecorder, joint: bool) -> int:
    """Wrap every cross-attention (UNet ``attn2``) or joint-attention (SD3) processor of ``model``
    with a recording one via ``set_attn_processor``; returns how many layers record."""
    procs = dict(model.attn_processors)
    n = 0
    for name, proc in procs.items():
        if isinstance(proc, (RecordingCrossAttnProcessor, RecordingJointAttnProcessor)):
            n += 1
            continue
        if joint:
            procs[name] = RecordingJointAttnProcessor(proc, recorder)
            n += 1
        elif name.endswith("attn2.processor"):
            procs[name] = RecordingCrossAttnProcessor(proc, recorder)
            n += 1
    model.set_attn_processor(procs)
    return n


def maps_to_grid(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Average per-layer (B, N) maps at the latent grid ``size`` (h, w): each layer's N tokens are
    reshaped to its own grid (same aspect as the latent) and bilinearly resized. -> (B, 1, h, w)."""
    if not maps:
        raise ValueError("no attention was recorded; the model has no cross/joint attention layers")
    h, w = size
    out = 0
    for m in maps:
        f = math.sqrt(h * w / m.shape[1])  # downsampling of this layer's token grid
        gh, gw = round(h / f), round(w / f)
        grid = m.reshape(m.shape[0], 1, gh, gw)  # (B, 1, gh, gw)
        out = out + F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    return out / len(maps)
