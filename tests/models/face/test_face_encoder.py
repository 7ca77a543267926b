"""FaceEncoder: unit embeddings, differentiable when frozen, one loader for every checkpoint form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from idforge.models.face.face_encoder import FaceEncoder
from idforge.models.face.iresnet import IResNet, IResNetConfig

TINY = IResNetConfig(layers=(1, 2, 1, 1), widths=(4, 8, 8, 16))


def _encoder(seed: int = 0) -> FaceEncoder:
    torch.manual_seed(seed)
    enc = FaceEncoder(IResNet(TINY))
    with torch.no_grad():  # non-trivial BN statistics so a wrong load would show
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return enc.freeze()


def _crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_embeddings_are_unit_length_and_512_d():
    out = _encoder()(torch.rand(3, 3, 112, 112) * 2 - 1)
    assert out.shape == (3, 512) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_frozen_encoder_has_no_weight_gradients_but_passes_gradient_to_its_input():
    enc = _encoder()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = (torch.rand(2, 3, 112, 112) * 2 - 1).requires_grad_(True)
    target = enc(torch.rand(2, 3, 112, 112) * 2 - 1)
    (1 - (enc(x) * target).sum(-1)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_embed_uint8_equals_forward_on_normalised_crops_for_any_batch_size():
    enc = _encoder()
    crops = _crops(5)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    ref = enc(x).detach().numpy()
    got1, got4 = enc.embed_uint8(crops, batch_size=1), enc.embed_uint8(crops, batch_size=4)
    assert got1.dtype == np.float32 and got1.shape == (5, 512)
    assert np.abs(got1 - ref).max() < 1e-5 and np.abs(got4 - ref).max() < 1e-5
    assert enc.embed_uint8(crops[:0]).shape == (0, 512)


def test_embed_uint8_uses_eval_statistics_and_restores_training_mode():
    enc = _encoder()
    enc.train()
    crops = _crops(3)
    a = enc.embed_uint8(crops)
    assert enc.training
    enc.eval()
    assert np.allclose(a, enc.embed_uint8(crops), atol=1e-6)


def test_embed_uint8_refuses_float_or_unaligned_input():
    enc = _encoder()
    with pytest.raises(ValueError, match="uint8"):
        enc.embed_uint8(_crops(2).astype(np.float32))
    with pytest.raises(ValueError, match="112, 112, 3"):
        enc.embed_uint8(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(ValueError, match="warp_to_template"):
        enc(torch.zeros(1, 3, 128, 128))


def test_save_and_reload_reproduces_embeddings_exactly(tmp_path):
    enc = _encoder()
    folder = enc.save_pretrained(tmp_path / "enc")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["arch"] == "iresnet" and cfg["layers"] == [1, 2, 1, 1] and cfg["widths"] == [4, 8, 8, 16]
    from safetensors.torch import load_file

    assert set(load_file(folder / "model.safetensors")) == set(enc.backbone.state_dict())  # backbone.pth keys
    back = FaceEncoder.from_pretrained(folder)
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    assert np.array_equal(back.embed_uint8(_crops(3)), enc.embed_uint8(_crops(3)))


def test_arcface_torch_backbone_pth_loads_with_inferred_or_named_arch(tmp_path):
    enc = _encoder()
    ddp = {f"module.{k}": v for k, v in enc.backbone.state_dict().items()}
    torch.save(ddp, tmp_path / "backbone.pth")
    loaded = FaceEncoder.from_pretrained(tmp_path / "backbone.pth")
    assert loaded.backbone.config.layers == (1, 2, 1, 1)
    assert np.array_equal(loaded.embed_uint8(_crops(2)), enc.embed_uint8(_crops(2)))
    with pytest.raises(ValueError, match="arch='r50' has layers"):
        FaceEncoder.from_pretrained(tmp_path / "backbone.pth", arch="r50")


def test_a_folder_holding_only_backbone_pth_loads(tmp_path):
    enc = _encoder()
    torch.save(enc.backbone.state_dict(), tmp_path / "backbone.pth")
    assert np.array_equal(
        FaceEncoder.from_pretrained(tmp_path).embed_uint8(_crops(1)), enc.embed_uint8(_crops(1))
    )


def test_pickled_objects_are_refused_not_executed(tmp_path):
    torch.save({"net": IResNet(TINY)}, tmp_path / "full_model.pth")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match="weights_only"):
        FaceEncoder.from_pretrained(tmp_path / "full_model.pth")


def test_unsupported_or_missing_paths_say_what_to_pass(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported face-encoder file '.txt'"):
        FaceEncoder.from_pretrained(tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FaceEncoder.from_pretrained(tmp_path / "missing.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        FaceEncoder.from_pretrained(tmp_path / "empty")


def test_folder_config_with_unknown_keys_is_refused(tmp_path):
    folder = _encoder().save_pretrained(tmp_path / "enc")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "depth": 50}))
    with pytest.raises(ValueError, match="unknown IResNetConfig keys"):
        FaceEncoder.from_pretrained(folder)
