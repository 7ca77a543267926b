"""The CLIP zero-shot occlusion test with a stand-in CLIP whose features, hence logits, are chosen by hand.

p(occluded) = sum over occlusion prompts of softmax(logit_scale * <image, prompt>) over
[occlusion prompts..., clean prompt]; flagged when it reaches the threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from idforge.data_pipeline.filters import OcclusionFilter

PROMPTS = ("a face with sunglasses", "a face with a hat")
CLEAN = "a clear face"
TEXT = {PROMPTS[0]: [1.0, 0.0, 0.0], PROMPTS[1]: [0.0, 1.0, 0.0], CLEAN: [0.0, 0.0, 1.0]}


class HandClip(torch.nn.Module):
    """encode_text: a fixed unit vector per prompt; encode_image: the "image" is its own feature."""

    def __init__(self, logit_scale: float):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.order: list[str] = []

    def encode_text(self, tokens):
        return torch.tensor([TEXT[self.order[int(i)]] for i in tokens]) * 2.0  # normalised by the filter

    def encode_image(self, images):
        return images


def _filter(threshold: float, scale: float = 2.0) -> OcclusionFilter:
    model = HandClip(scale)

    def tokenizer(texts):
        model.order = list(texts)
        return torch.arange(len(texts))

    return OcclusionFilter(
        model, lambda im: torch.as_tensor(im, dtype=torch.float32), tokenizer, PROMPTS, threshold, CLEAN
    )


def _softmax(logits):
    e = np.exp(np.asarray(logits, dtype=np.float64))
    return e / e.sum()


IMAGES = [
    np.array([1.0, 0.0, 0.0]),  # sunglasses
    np.array([0.0, 0.0, 1.0]),  # clean
    np.array([0.0, 0.6, 0.8]),  # a little hat
]


def test_probability_is_the_summed_softmax_of_the_occlusion_prompts():
    probs = _filter(0.5).probabilities(IMAGES)
    expected = [
        _softmax([2.0, 0.0, 0.0])[:2].sum(),
        _softmax([0.0, 0.0, 2.0])[:2].sum(),
        _softmax([0.0, 1.2, 1.6])[:2].sum(),
    ]
    assert probs == pytest.approx(expected, abs=1e-6)
    assert probs[0] > 0.5 > probs[1]  # not the clean prompt's probability


def test_flags_follow_the_threshold():
    p_hat = _softmax([0.0, 1.2, 1.6])[:2].sum()  # ~0.478
    assert _filter(0.5).flags(IMAGES).tolist() == [True, False, False]
    assert _filter(p_hat - 0.01).flags(IMAGES).tolist() == [True, False, True]
    assert _filter(0.5, scale=100.0).flags(IMAGES).tolist() == [True, False, False]
