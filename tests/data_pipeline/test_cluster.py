"""Identity clustering: both modes recover identities (adjusted Rand index) on separated synthetic
embeddings and on SynthID faces embedded by a face encoder trained on other images of them; chunking
changes nothing; refinement undoes a chain; the report is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from idforge.data_pipeline.cluster import (
    ClusterResult,
    cluster_labelled,
    cluster_unlabelled,
    spherical_kmeans,
    threshold_components,
    write_report,
)
from sklearn.metrics import adjusted_rand_score


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _identities(n_id=12, per=9, dim=64, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(n_id, dim)))
    labels = np.repeat(np.arange(n_id), per)
    emb = _unit(
        centres[labels] + noise * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    )  # same-identity cos ~0.8
    perm = rng.permutation(len(labels))
    return emb[perm], labels[perm]


def test_unlabelled_recovers_separated_identities_for_any_chunk():
    emb, labels = _identities()
    results = [cluster_unlabelled(emb, threshold=0.5, chunk=c) for c in (7, 32, 10_000)]
    for r in results:
        assert isinstance(r, ClusterResult) and r.keep.all()
        assert adjusted_rand_score(labels, r.identity) == pytest.approx(1.0)
        np.testing.assert_array_equal(r.identity, results[0].identity)
    assert results[0].report["clusters"] == 12 and results[0].report["cluster_sizes"] == [9] * 12


def test_threshold_components_compacts_edges_without_changing_the_answer():
    # one big identity of 300 near-identical vectors: many edges per block, forces compaction
    emb = _unit(np.ones((300, 8)) + 0.01 * np.random.default_rng(1).normal(size=(300, 8)))
    assert (threshold_components(emb, 0.9, chunk=16) == 0).all()


def test_min_size_drops_small_clusters():
    emb, _labels = _identities(n_id=3, per=5)
    lone = _unit(np.random.default_rng(5).normal(size=(2, 64)))
    r = cluster_unlabelled(np.concatenate([emb, lone]), threshold=0.5, min_size=2)
    assert not r.keep[-2:].any() and r.keep[:-2].all() and (r.identity[-2:] == -1).all()
    assert r.report["clusters"] == 3 and r.report["dropped_small"] == 2


def test_refinement_splits_two_identities_joined_by_a_chain():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    group_a = _unit(a + 0.05 * rng.normal(size=(20, 3)))
    group_b = _unit(b + 0.05 * rng.normal(size=(20, 3)))
    bridge = _unit(np.stack([a * np.cos(t) + b * np.sin(t) for t in np.linspace(0.25, 1.3, 8)]))
    emb = np.concatenate([group_a, group_b, bridge])
    truth = np.r_[np.zeros(20), np.ones(20)]
    plain = cluster_unlabelled(emb, threshold=0.9)
    assert plain.report["clusters"] == 1  # single linkage chained them
    refined = cluster_unlabelled(emb, threshold=0.9, refine=True)
    assert adjusted_rand_score(truth, refined.identity[:40]) == pytest.approx(1.0)
    assert len(set(refined.identity[:40].tolist())) == 2


def test_labelled_keeps_the_majority_and_drops_intruders():
    emb, labels = _identities(n_id=6, per=10, seed=2)
    noisy = labels.copy()
    intruders = np.arange(0, 60, 10)  # relabel one image of each person as the next person
    noisy[intruders] = (labels[intruders] + 1) % 6
    r = cluster_labelled(emb, noisy, k="auto", min_similarity=0.6)
    assert not r.keep[intruders].any()
    assert r.keep.sum() == 54
    assert adjusted_rand_score(labels[r.keep], r.identity[r.keep]) == pytest.approx(1.0)
    assert set(r.centres) == set(range(6)) and r.report["persons"] == 6
    fixed = cluster_labelled(emb, noisy, k=3)  # FlashFace's fixed k also splits clean persons: fewer kept
    assert not fixed.keep[intruders].any() and 0 < fixed.keep.sum() <= 54
    with pytest.raises(ValueError, match="person labels"):
        cluster_labelled(emb, noisy[:-1])


def test_spherical_kmeans_is_deterministic_and_separates():
    emb, labels = _identities(n_id=3, per=6)
    l1, c1 = spherical_kmeans(emb, 3, seed=4)
    l2, _ = spherical_kmeans(emb, 3, seed=4)
    np.testing.assert_array_equal(l1, l2)
    assert adjusted_rand_score(labels, l1) == pytest.approx(1.0)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1, atol=1e-5)


def test_report_has_sizes_and_histograms(tmp_path):
    emb, _labels = _identities(n_id=4, per=5)
    r = cluster_unlabelled(emb, threshold=0.5)
    js = write_report(r, tmp_path / "rep" / "cluster_report")
    data = json.loads(js.read_text())
    assert data["cluster_sizes"] == [5] * 4
    assert sum(data["within_similarity"]["counts"]) == 20 and sum(data["between_similarity"]["counts"]) == 6
    assert data["within_similarity"]["mean"] > 0.5 > data["between_similarity"]["mean"]
    text = (tmp_path / "rep" / "cluster_report.txt").read_text()
    assert "within similarity" in text and "between similarity" in text and "4 clusters" in text


@pytest.fixture(scope="module")
def synthid_embeddings():
    """SynthID faces aligned from their landmarks; a face encoder fitted on images 0-5 of each identity
    embeds the unseen images 6-9 (and all, for the labelled mode)."""
    import torch
    from idforge.data_pipeline.align import align_face
    from idforge.data_pipeline.synthid import SynthID, SynthIDConfig
    from idforge.models.face.iresnet import IResNetConfig
    from idforge.train.face_encoder import fit_face_encoder

    torch.manual_seed(0)
    n_id, per = 8, 10
    sid = SynthID(
        SynthIDConfig(
            num_identities=n_id, images_per_identity=per, resolution=112, heldout_identities=0, seed=3
        )
    )
    crops, labels, index = [], [], []
    for i in range(n_id):
        for j in range(per):
            s = sid.render(i, j)
            crops.append(align_face(np.asarray(s.image.convert("RGB")), s.landmarks, size=112)[0])
            labels.append(i)
            index.append(j)
    crops, labels, index = np.stack(crops), np.array(labels), np.array(index)
    seen = index < 6
    enc, _ = fit_face_encoder(
        crops[seen],
        labels[seen],
        IResNetConfig(layers=(1, 1, 1, 1), widths=(8, 16, 32, 32)),
        epochs=12,
        batch_size=16,
        seed=0,
    )
    emb = enc.embed_uint8(crops)
    return emb, labels, seen


def test_synthid_identities_are_recovered_in_both_modes(synthid_embeddings):
    emb, labels, seen = synthid_embeddings
    # threshold from the encoder's TRAINING images only: above every different-identity pair there
    sims = emb[seen] @ emb[seen].T
    different = labels[seen][:, None] != labels[seen][None, :]
    threshold = float(sims[different].max()) + 0.02
    unseen = ~seen
    r = cluster_unlabelled(emb[unseen], threshold=threshold, refine=True)
    ari_unlabelled = adjusted_rand_score(labels[unseen], r.identity)
    # labelled mode: each person's folder also holds two images of other people
    noisy = labels.copy()
    rng = np.random.default_rng(0)
    intruders = rng.choice(len(labels), 16, replace=False)
    noisy[intruders] = (labels[intruders] + 1 + rng.integers(0, 7, 16)) % 8
    lab = cluster_labelled(emb, noisy, k="auto", min_similarity=0.6)
    fixed_k = cluster_labelled(emb, noisy, k=3, min_similarity=0.6)  # FlashFace's k drops genuine images too
    assert not fixed_k.keep[intruders].any()
    ari_labelled = adjusted_rand_score(labels[lab.keep], lab.identity[lab.keep])
    print(
        f"SynthID ARI unlabelled {ari_unlabelled:.3f} (threshold {threshold:.2f}), labelled {ari_labelled:.3f}, "
        f"labelled kept {lab.keep.sum()}/{len(labels)} (k=3: {fixed_k.keep.sum()}), intruders kept {lab.keep[intruders].sum()}/16"
    )
    assert ari_unlabelled >= 0.9
    assert ari_labelled >= 0.95 and lab.keep[intruders].sum() <= 1 and lab.keep.sum() >= 0.7 * len(labels)


def test_ivf_index_finds_the_same_identities_as_exact_search():
    emb, labels = _identities(n_id=40, per=10, seed=3)
    exact = cluster_unlabelled(emb, threshold=0.5, k=8)
    ivf = cluster_unlabelled(emb, threshold=0.5, k=8, flat_max=0, nprobe=4)  # sqrt(400) = 20 lists
    assert exact.report["index"] == "flat" and ivf.report["index"] == "ivf20,pq4fs+refine,nprobe4"
    for r in (exact, ivf):
        assert adjusted_rand_score(labels, r.identity) == pytest.approx(1.0)


def test_the_graph_only_links_each_image_to_its_k_nearest_neighbours():
    # five pairs along an arc: partners 0.01 rad apart, pairs 0.03 rad apart, every cosine > 0.98
    t = np.concatenate([[s, s + 0.01] for s in np.arange(5) * 0.04])
    emb = _unit(np.stack([np.cos(t), np.sin(t)], 1))
    assert cluster_unlabelled(emb, threshold=0.9, k=9).report["clusters"] == 1  # the complete graph
    assert cluster_unlabelled(emb, threshold=0.9, k=1).report["clusters"] == 5  # nearest = partner


def test_refinement_separates_a_few_images_chained_onto_a_large_identity():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    rng = np.random.default_rng(1)
    big = _unit(a + 0.05 * rng.normal(size=(60, 3)))
    small = _unit(b + 0.05 * rng.normal(size=(5, 3)))
    bridge = _unit(np.stack([a * np.cos(t) + b * np.sin(t) for t in np.linspace(0.25, 1.3, 8)]))
    emb = np.concatenate([big, small, bridge])
    refined = cluster_unlabelled(emb, threshold=0.9, refine=True, k=8)
    assert cluster_unlabelled(emb, threshold=0.9, k=8).report["clusters"] == 1
    assert refined.report["suspect_components"] >= 1 and refined.report["splits"] >= 1
    assert not set(refined.identity[:60].tolist()) & set(refined.identity[60:65].tolist())


def test_cuda_device_falls_back_to_the_cpu_index_when_faiss_has_no_gpu(caplog):
    import faiss

    emb, labels = _identities(n_id=4, per=5)
    if faiss.get_num_gpus() > 0:
        pytest.skip("faiss has a GPU here: the fallback is not taken")
    with caplog.at_level("INFO"):
        r = cluster_unlabelled(emb, threshold=0.5, device="cuda")
    assert adjusted_rand_score(labels, r.identity) == pytest.approx(1.0) and "no GPU" in caplog.text
