"""Quality filters: each reject reason fires on the case it names, near-duplicates keep the first of
a group without an N x N matrix, the CLIP occlusion test runs end to end on a tiny random open_clip."""

from __future__ import annotations

import numpy as np
import pytest
from idforge.data_pipeline.detect import FaceDetection
from idforge.data_pipeline.filters import (
    REASONS,
    FilterConfig,
    OcclusionFilter,
    check_face,
    near_duplicates,
    sharpness,
)
from PIL import Image

RNG = np.random.default_rng(0)


def _face(x0, y0, side, score=0.9):
    lms = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]]) * side + (x0, y0)
    return FaceDetection(box=np.array([x0, y0, x0 + side, y0 + side]), landmarks=lms, score=score)


def _textured(h=128, w=128):
    return RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "case, reason",
    [
        ({"image": _textured(48, 200), "faces": [_face(0, 0, 40)]}, "resolution"),
        ({"faces": []}, "no_face"),
        ({"faces": [_face(0, 0, 50), _face(60, 60, 50)]}, "multiple_faces"),
        ({"faces": [_face(0, 0, 50, score=0.2)]}, "det_score"),
        ({"faces": [_face(0, 0, 20)]}, "face_size"),
        ({"faces": [_face(0, 0, 50)], "cfg": {"min_face_fraction": 0.5}}, "face_size"),
        (
            {
                "image": np.full((128, 128, 3), 90, np.uint8),
                "faces": [_face(10, 10, 80)],
                "cfg": {"min_sharpness": 10.0},
            },
            "blur",
        ),
    ],
)
def test_each_reason_fires_on_its_case(case, reason):
    cfg = FilterConfig(**case.get("cfg", {}))
    face, why = check_face(case.get("image", _textured()), case["faces"], cfg)
    assert face is None and why == reason and why in REASONS


def test_a_good_face_passes_and_largest_policy_keeps_the_largest():
    small, big = _face(0, 0, 40), _face(40, 40, 80)
    face, why = check_face(
        _textured(), [small, big], FilterConfig(multiple_faces="largest", min_sharpness=10.0)
    )
    assert why is None and face is big
    assert check_face(_textured(), [big], FilterConfig())[0] is big


def test_sharpness_orders_sharp_above_blurred():
    sharp = RNG.integers(0, 255, (64, 64)).astype(np.float32)
    blurred = np.asarray(
        Image.fromarray(sharp.astype(np.uint8)).resize((8, 8)).resize((64, 64), Image.BILINEAR)
    )
    assert sharpness(sharp) > 10 * sharpness(blurred) > 0
    assert sharpness(np.full((10, 10), 7.0)) == 0.0
    with pytest.raises(ValueError, match="2-D"):
        sharpness(np.zeros((4, 4, 3)))


def test_config_is_validated():
    with pytest.raises(ValueError, match="multiple_faces"):
        FilterConfig(multiple_faces="all")
    with pytest.raises(ValueError, match="duplicate_threshold"):
        FilterConfig(duplicate_threshold=1.5)
    with pytest.raises(ValueError, match="occlusion_prompts"):
        FilterConfig(occlusion=True, occlusion_prompts=())
    assert isinstance(FilterConfig(occlusion_prompts=["a hat"]).occlusion_prompts, tuple)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_near_duplicates_keep_the_first_of_each_group_across_chunks():
    base = _unit(RNG.normal(size=(20, 64)))
    # copies with tiny noise placed later, some in other chunks
    dup_of = {20: 3, 21: 3, 22: 17, 23: 0}
    extra = _unit(np.stack([base[j] + 0.01 * RNG.normal(size=64) for j in dup_of.values()]))
    emb = np.concatenate([base, extra])
    expected = np.array([True] * 20 + [False] * 4)
    for chunk in (3, 7, 64):
        np.testing.assert_array_equal(near_duplicates(emb, 0.95, chunk=chunk), expected)
    # a duplicate BEFORE the original: the earlier one is kept
    keep = near_duplicates(np.concatenate([extra[:1], base]), 0.95, chunk=4)
    assert keep[0] and not keep[1 + 3] and keep.sum() == 20


def test_near_duplicates_chain_is_greedy_not_transitive():
    # a ~ b (0.96), b ~ c (0.96), a !~ c: b is dropped, c is kept because b is not kept
    a = np.array([1.0, 0.0])
    th = np.arccos(0.96)
    b, c = np.array([np.cos(th), np.sin(th)]), np.array([np.cos(2 * th), np.sin(2 * th)])
    np.testing.assert_array_equal(near_duplicates(np.stack([a, b, c]), 0.95, chunk=2), [True, False, True])


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip
    import torch

    torch.manual_seed(0)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(**cfg)
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    return model, preprocess, tokenizer


def test_occlusion_filter_scores_every_image_with_its_prompts(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images = [Image.fromarray(_textured(40, 50)) for _ in range(5)]
    filt = OcclusionFilter(
        model, preprocess, tokenizer, prompts=("sunglasses", "a hat"), threshold=0.5, batch_size=2
    )
    p = filt.probabilities(images)
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    np.testing.assert_array_equal(filt.flags(images), p >= 0.5)
    assert OcclusionFilter(model, preprocess, tokenizer, ("a hat",), threshold=0.0).flags(images).all()
    assert not OcclusionFilter(model, preprocess, tokenizer, ("a hat",), threshold=1.0).flags(images).any()
    with pytest.raises(ValueError, match="prompt"):
        OcclusionFilter(model, preprocess, tokenizer, prompts=())
