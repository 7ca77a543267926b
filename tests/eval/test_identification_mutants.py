"""Identity metrics pinned down beyond the hand-made cases (kills mutmut survivors of
eval/identification.py): ties, an explicit ``truth``, the top-5 edge, small galleries, all-undetected."""

from __future__ import annotations

import math

import pytest
import torch
from idforge.eval.identification import face_similarity, flashface_similarity, identification, mean_embedding


def test_a_tie_with_the_true_identity_counts_as_identified():
    gallery = torch.eye(3)
    gen = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # row 0 ties ids 0 and 1
    out = identification(gen, gallery)
    assert out["top1"] == 1.0 and out["top5"] == 1.0


def test_explicit_truth_and_the_fifth_rank_edge():
    g = 7
    gallery = torch.eye(g)
    # Image 0 is ranked 5th (rank 4) for identity 6; image 1 ranked 6th (rank 5) for identity 6.
    w = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])
    gen = torch.stack([w.clone(), w.clone()])
    gen[0, 6] = 0.55
    gen[1, 6] = 0.45
    out = identification(gen, gallery, truth=torch.tensor([6, 6]))
    assert out["top1"] == 0.0
    assert out["top5"] == pytest.approx(0.5)
    assert out["chance_top1"] == pytest.approx(1 / 7) and out["chance_top5"] == pytest.approx(5 / 7)
    assert out["identities"] == 7
    assert identification(gen, gallery, truth=torch.tensor([0, 0]))["top1"] == 1.0


def test_small_gallery_caps_top5_at_gallery_size():
    gallery = torch.eye(3)
    gen = torch.tensor([[0.0, 0.2, 1.0], [1.0, 0.0, 0.0]])  # image 0 ranks its identity (0) last
    out = identification(gen, gallery, truth=torch.tensor([0, 0]))
    assert out["top1"] == pytest.approx(0.5) and out["top5"] == 1.0
    assert out["chance_top5"] == 1.0 and out["identities"] == 3


def test_identification_is_scale_invariant_per_row():
    gallery = torch.tensor([[1.0, 0.0], [10.0, 10.0]])  # unnormalised, row 1 is long
    gen = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    out = identification(gen, gallery, truth=torch.tensor([0, 1]))
    # By angle both are right; a raw dot product would give image 0 to the long row 1 (11 > 1).
    assert out["top1"] == 1.0
    out = identification(gen * torch.tensor([[100.0], [0.01]]), gallery, truth=torch.tensor([0, 1]))
    assert out["top1"] == 1.0


def test_face_similarity_all_undetected_and_unnormalised_inputs():
    nan = torch.full((2, 3), float("nan"))
    out = face_similarity(nan, torch.ones(2, 3))
    assert math.isnan(out["mean"]) and out["scored"] == 0 and out["undetected"] == 2
    gen = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    src = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 9.0]])
    assert face_similarity(gen, src)["mean"] == pytest.approx((math.sqrt(0.5) + 1) / 2)


def test_mean_embedding_normalises_each_photo_first():
    photos = torch.tensor([[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    assert torch.allclose(mean_embedding(photos), expected, atol=1e-6)


def test_flashface_skips_undetected_rows_and_takes_the_best_reference():
    gen = torch.tensor([[2.0, 0.0], [float("nan"), 0.0], [0.0, 3.0]])
    target = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    refs = torch.tensor([[[1.0, 0.0], [0.0, 5.0]], [[1.0, 0.0], [1.0, 0.0]], [[5.0, 5.0], [-1.0, 0.0]]])
    out = flashface_similarity(gen, target, refs)
    st = (math.sqrt(0.5) + 1) / 2
    sr = (1 + math.sqrt(0.5)) / 2
    assert out["scored"] == 2 and out["undetected"] == 1
    assert out["sim_target"] == pytest.approx(st)
    assert out["sim_ref"] == pytest.approx(sr)
    assert out["paste"] == pytest.approx(sr - st)


def test_rows_are_normalised_one_by_one_not_across_the_batch():
    # Rows share a feature, so normalising over the batch axis would give different cosines.
    gen = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    src = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert face_similarity(gen, src)["mean"] == pytest.approx((math.sqrt(0.5) + 1) / 2)
    refs = src[:, None, :]  # (N, R=1, D)
    out = flashface_similarity(gen, src, refs)
    assert out["sim_target"] == pytest.approx((math.sqrt(0.5) + 1) / 2)
    assert out["sim_ref"] == pytest.approx((math.sqrt(0.5) + 1) / 2)


def test_chance_levels_count_gallery_identities_not_feature_dimensions():
    gallery = torch.eye(3, 8)  # 3 identities, 8-dimensional embeddings
    out = identification(gallery.clone(), gallery)
    assert out["identities"] == 3
    assert out["chance_top1"] == pytest.approx(1 / 3) and out["chance_top5"] == 1.0
    assert out["top1"] == 1.0
