"""Every feature extractor runs offline through its real loading code with tiny random weights."""

from __future__ import annotations

import pytest
import torch
from idforge.eval.clip_score import ClipModel, clip_score
from idforge.eval.cmmd import cmmd
from idforge.eval.features import FeatureCache, load_fid_features
from idforge.eval.fid import frechet_distance
from idforge.eval.lpips_metric import load_lpips, lpips_distance


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from idforge.models.zoo import TinyConfig, _write_open_clip

    folder = tmp_path_factory.mktemp("clip") / "open_clip"
    torch.manual_seed(0)
    _write_open_clip(TinyConfig(), folder, image_size=32)
    return str(folder)


def _images(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_clip_score_fid_and_cmmd_with_tiny_open_clip(tiny_clip):
    model = ClipModel(tiny_clip)
    a, b = _images(4, 0), _images(4, 1)
    fa, fb = model.image_features(a), model.image_features(b)
    ft = model.text_features(["a photo of a person"] * 4)
    assert fa.shape == (4, ft.shape[1]) and torch.allclose(fa.norm(dim=-1), torch.ones(4), atol=1e-5)
    s = clip_score(fa, ft)
    assert s.shape == (4,) and (s >= 0).all() and (s <= 100).all()
    assert clip_score(fa, fa) == pytest.approx(torch.full((4,), 100.0), abs=1e-3)
    feats = load_fid_features(f"clip:{tiny_clip}")
    assert frechet_distance(feats(a), feats(a)) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats(a), feats(b)) > 0
    assert cmmd(fa, fb) != 0.0


def test_fid_features_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="inception:PATH"):
        load_fid_features("resnet")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_fid_features(f"inception:{tmp_path / 'missing.pth'}")


def test_feature_cache_resumes(tmp_path):
    calls = []

    def fn(x):
        calls.append(1)
        return x.flatten(1)[:, :5].double()

    x = _images(3, 2)
    first = FeatureCache(tmp_path).get("f", x, fn)
    again = FeatureCache(tmp_path)  # a new run over the same folder
    assert torch.equal(again.get("f", x, fn), first) and len(calls) == 1 and again.hits == 1
    again.get("f", _images(3, 3), fn)
    assert len(calls) == 2


def test_lpips_loads_backbone_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "squeezenet1_1.pth"
    torch.save(tv.state_dict(), path)
    model = load_lpips(path, net="squeeze")
    assert torch.equal(model.net.slices[0][0].weight, tv.features[0].weight)  # the file's weights, not random
    a, b = _images(2, 4), _images(2, 5)
    assert torch.allclose(lpips_distance(model, a, a), torch.zeros(2), atol=1e-6)
    assert (lpips_distance(model, a, b) > 0).all()
    with pytest.raises(FileNotFoundError):
        load_lpips(tmp_path / "none.pth", net="alex")
