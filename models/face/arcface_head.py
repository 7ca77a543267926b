"""Additive angular margin head (ArcFace, Deng et al. 2019, eq. 3), as arcface_torch's ``ArcFace``.

With cos(theta_j) = <x / |x|, W_j / |W_j|> for class centres W_j (eq. 3):

    logit_j = s * cos(theta_j)          for j != y,
    logit_y = s * cos(theta_y + m)      for the label y.

cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m). Where theta_y + m would pass pi the margin
would make the logit grow again with theta_y; arcface_torch then uses cos(theta_y) - m sin(m)
(``theta = cos(pi - m)``, ``sinmm = sin(pi - m) m``), or with ``easy_margin`` applies the margin only
where cos(theta_y) > 0. Labels equal to -1 get no margin (arcface_torch's partial-FC convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFaceHead(nn.Module):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
    ):
        super().__init__()
        if num_classes < 2 or embedding_size < 1:
            raise ValueError(
                f"ArcFaceHead needs >= 2 classes and a positive embedding size, got "
                f"num_classes={num_classes}, embedding_size={embedding_size}"
            )
        if s <= 0 or not 0 <= m < math.pi / 2:
            raise ValueError(f"ArcFaceHead: scale s must be > 0 and margin m in [0, pi/2), got s={s}, m={m}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.theta = math.cos(math.pi - m)
        self.sinmm = math.sin(math.pi - m) * m

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes) cos(theta_j), clamped away from +-1 for a finite sqrt gradient."""
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(
            -1 + 1e-7, 1 - 1e-7
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings, (B,) int labels -> (B, num_classes) scaled logits for cross-entropy."""
        cos = self.cosine(embeddings)
        labels = labels.long()
        if labels.shape != cos.shape[:1] or (labels >= cos.shape[1]).any() or (labels < -1).any():
            raise ValueError(
                f"ArcFaceHead: labels must be ({cos.shape[0]},) in [-1, {cos.shape[1] - 1}], got "
                f"shape {tuple(labels.shape)}"
            )
        has_label = labels >= 0
        idx = labels.clamp_min(0).unsqueeze(1)  # (B, 1)
        target = cos.gather(1, idx)  # (B, 1) cos(theta_y)
        sin = torch.sqrt(1.0 - target**2)
        phi = target * self.cos_m - sin * self.sin_m  # cos(theta_y + m)
        if self.easy_margin:
            phi = torch.where(target > 0, phi, target)
        else:
            phi = torch.where(target > self.theta, phi, target - self.sinmm)
        phi = torch.where(has_label.unsqueeze(1), phi, target)
        return self.s * cos.scatter(1, idx, phi)
