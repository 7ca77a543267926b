"""Concept tokens for CLIP BPE and T5 sentencepiece; k-means mask, dilation, kernel presets."""

from __future__ import annotations

import pytest
import torch
from idforge.inference.edit.attention import concept_token_indices, maps_to_grid
from idforge.inference.edit.mask import dilate, kmeans_mask, make_mask, scaled_kernel

PROMPT = "a person's face with red hair and a hat"


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2", "tokenizer_3"])
def test_concept_token_indices_point_at_the_concept_words(tiny_sd3_dir, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_sd3_dir / name)
    ids = tok(PROMPT).input_ids
    idx = concept_token_indices(tok, PROMPT, "red hair")
    assert tok.decode([ids[i] for i in idx]).strip() == "red hair"
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    other = concept_token_indices(tok, PROMPT, "hat")
    assert tok.decode([ids[i] for i in other]).strip() == "hat" and other[0] > idx[-1]
    with pytest.raises(ValueError, match="not in the prompt"):
        concept_token_indices(tok, PROMPT, "glasses")


def test_clip_indices_are_shifted_by_bos_and_t5_has_none(tiny_sd3_dir):
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(tiny_sd3_dir / "tokenizer")
    t5 = AutoTokenizer.from_pretrained(tiny_sd3_dir / "tokenizer_3")
    # "a person ' s face" -> CLIP: BOS a person ' s face = positions 1.. ; T5: ▁a ▁person ' s ▁face
    assert concept_token_indices(clip, PROMPT, "a")[0] == 1
    assert concept_token_indices(t5, PROMPT, "a")[0] == 0


def test_kmeans_mask_recovers_a_planted_region():
    g = torch.Generator().manual_seed(0)
    att = torch.rand(2, 1, 16, 16, generator=g) * 0.3
    planted = torch.zeros(2, 1, 16, 16)
    planted[0, :, 3:8, 9:14] = 1
    planted[1, :, 10:15, 1:4] = 1
    att = att + planted * 0.5
    assert torch.equal(kmeans_mask(att), planted)
    grown = dilate(planted, 3)
    assert grown[0, 0, 2:9, 8:15].eq(1).all() and grown.sum() > planted.sum()
    assert grown[0, 0, 0, 0] == 0
    soft = make_mask(att, kernel=3, sigma=1.0)
    assert ((soft > 0) & (soft < 1)).any() and soft.max() <= 1


def test_table3_kernels_scale_to_the_grid():
    assert scaled_kernel(15, 64) == 15
    assert scaled_kernel(25, 128) == 51
    assert scaled_kernel(11, 16) == 3  # 2.75 -> 3
    assert scaled_kernel(15, 8) % 2 == 1


def test_maps_of_several_resolutions_average_on_one_grid():
    a = torch.zeros(1, 16)
    a[0, 0] = 1.0  # 4x4 grid, top-left token
    b = torch.zeros(1, 64)
    b[0, 0] = 1.0  # 8x8 grid
    out = maps_to_grid([a, b], (8, 8))
    assert out.shape == (1, 1, 8, 8)
    assert out[0, 0, 0, 0] == out.max() and out[0, 0, -1, -1] == 0
