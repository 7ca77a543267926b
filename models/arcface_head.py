"""Additive angular margin head (ArcFace, Deng et al. 2019, eq. 3), as in arcface_torch.

logits_j = s * cos(theta_j) for j != y and s * cos(theta_y + m) for the label y, with
cos(theta_j) = <x / |x|, W_j / |W_j|>. Where theta_y + m would pass pi the target logit falls back to
cos(theta_y) - m sin(m) (arcface_torch's threshold), keeping the logit monotone in theta_y.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFaceHead(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ArcFaceHead needs at least 2 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.s, self.m = float(s), float(m)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos**2)
        phi = cos * self.cos_m - sin * self.sin_m  # cos(theta + m)
        phi = torch.where(cos > self.th, phi, cos - self.mm)
        one_hot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.s * (one_hot * phi + (1 - one_hot) * cos)
