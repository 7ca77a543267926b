"""ArcFace margin head (Deng et al. 2019, eq. 3): each branch's logits against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from idforge.models.face.arcface_head import ArcFaceHead

S, M = 2.0, 0.5


def _head(easy_margin: bool = False) -> ArcFaceHead:
    """Two classes with unit centres on the axes: cos(theta_0) = x, cos(theta_1) = y for a unit (x, y)."""
    head = ArcFaceHead(2, 2, s=S, m=M, easy_margin=easy_margin)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2) * 3.0)  # the head normalises the centres
    return head


def _at(theta: float) -> torch.Tensor:
    return torch.tensor([[math.cos(theta), math.sin(theta)]]) * 5.0  # and the embeddings


@pytest.mark.parametrize(
    ("theta", "label", "easy", "expected_target"),
    [
        (0.5, 0, False, S * math.cos(0.5 + M)),  # the margin: cos(theta + m)
        (2.9, 0, False, S * (math.cos(2.9) - M * math.sin(M))),  # theta + m > pi: cos(theta) - m sin(m)
        (2.0, 0, False, S * math.cos(2.0 + M)),  # theta + m < pi (2.5 < 3.14): still the margin
        (0.5, 0, True, S * math.cos(0.5 + M)),  # easy margin, cos(theta) > 0: the margin
        (2.0, 0, True, S * math.cos(2.0)),  # easy margin, cos(theta) <= 0: no margin
    ],
)
def test_target_logit_of_each_branch(theta, label, easy, expected_target):
    logits = _head(easy)(_at(theta), torch.tensor([label]))
    assert logits[0, 0].item() == pytest.approx(expected_target, abs=1e-5)
    assert logits[0, 1].item() == pytest.approx(S * math.sin(theta), abs=1e-5)  # other class: s cos


def test_label_minus_one_gets_no_margin_and_the_other_rows_are_untouched():
    head = _head()
    x = torch.cat([_at(0.5), _at(2.9), _at(1.0)])
    logits = head(x, torch.tensor([-1, 0, 1]))
    plain = S * head.cosine(x)
    assert torch.allclose(logits[0], plain[0], atol=1e-6)
    assert logits[1, 0].item() == pytest.approx(S * (math.cos(2.9) - M * math.sin(M)), abs=1e-5)
    assert logits[2, 1].item() == pytest.approx(S * math.cos((math.pi / 2 - 1.0) + M), abs=1e-5)
    assert torch.allclose(logits[1, 1], plain[1, 1]) and torch.allclose(logits[2, 0], plain[2, 0])


def test_the_margin_lowers_the_target_logit_and_bad_labels_are_refused():
    head = _head()
    x = _at(0.3)
    assert head(x, torch.tensor([0]))[0, 0] < S * head.cosine(x)[0, 0]
    with pytest.raises(ValueError, match="labels must be"):
        head(x, torch.tensor([2]))
    with pytest.raises(ValueError, match="margin m"):
        ArcFaceHead(2, 2, m=2.0)
