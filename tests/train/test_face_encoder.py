"""Verification scores of a face encoder: mean same/different cosines and the ROC AUC, by hand."""

from __future__ import annotations

import numpy as np
import pytest
from idforge.train.face_encoder import verification_scores


class FixedEmbeddings:
    """An encoder stand-in whose "images" are row indices into hand-made unit embeddings."""

    def __init__(self, emb):
        self.emb = np.asarray(emb, dtype=np.float32)

    def embed_uint8(self, images):
        return self.emb[np.asarray(images)]


def test_auc_and_means_on_hand_made_embeddings():
    enc = FixedEmbeddings([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]])
    scores = verification_scores(enc, np.arange(4), ["a", "a", "b", "b"])
    # same pairs (0,1), (2,3): 0.8, 0.8; different pairs (0,2), (0,3), (1,2), (1,3): 0.6, 0, 0.96, 0.6
    assert scores["same_mean"] == pytest.approx(0.8, abs=1e-6)
    assert scores["diff_mean"] == pytest.approx((0.6 + 0 + 0.96 + 0.6) / 4, abs=1e-6)
    assert scores["auc"] == pytest.approx(6 / 8)  # each same pair beats 3 of the 4 different pairs


def test_auc_is_one_when_separated_and_a_half_when_all_pairs_tie():
    separated = FixedEmbeddings([[1, 0], [1, 0], [0, 1], [0, 1]])
    assert verification_scores(separated, np.arange(4), [0, 0, 1, 1])["auc"] == 1.0
    same = FixedEmbeddings([[1, 0]] * 4)
    assert verification_scores(same, np.arange(4), [0, 0, 1, 1])["auc"] == 0.5


def test_needs_a_same_pair_and_a_different_pair():
    enc = FixedEmbeddings([[1, 0], [0, 1], [1, 0]])
    with pytest.raises(ValueError, match="at least two identities"):
        verification_scores(enc, np.arange(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        verification_scores(enc, np.arange(3), ["a", "b"])
