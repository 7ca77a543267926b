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


def _random_fid_inception(path):
    """torch-fidelity's FID Inception-v3 with random weights, saved as a state dict like the real file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), path)
    return net


def test_inception_features_load_a_local_file_and_never_download(tmp_path, monkeypatch):
    import torch.hub
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError(f"torch-fidelity tried to download {args}")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    net = _random_fid_inception(path)
    fn = load_fid_features(f"inception:{path}")
    imgs = _images(2, 0)
    f1 = fn(imgs)
    assert f1.shape == (2, 2048) and f1.dtype == torch.float64 and torch.isfinite(f1).all()
    torch.testing.assert_close(fn(imgs[:1]), f1[:1], rtol=1e-5, atol=1e-6)  # deterministic, per image
    assert not torch.allclose(f1[0], f1[1])  # the images matter
    u8 = ((imgs + 1) * 127.5).round().to(torch.uint8)  # the file's weights, run directly
    torch.testing.assert_close(f1, net(u8)[0].double(), rtol=1e-5, atol=1e-6)


def test_inception_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"inception:.*none\.pth: no such weights file; pass torch-fidelity"
    ):
        load_fid_features(f"inception:{tmp_path / 'none.pth'}")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not torch-fidelity's FID Inception-v3 state dict"):
        load_fid_features(f"inception:{tmp_path / 'other.pth'}")
    torch.save({"x": object}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"pickled\.pth: not a plain state-dict checkpoint"):
        load_fid_features(f"inception:{tmp_path / 'pickled.pth'}")
