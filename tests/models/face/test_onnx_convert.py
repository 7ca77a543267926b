"""ONNX -> torch IResNet conversion, checked against onnxruntime on the same input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from idforge.models.face.face_encoder import FaceEncoder
from idforge.models.face.iresnet import IResNet, IResNetConfig
from idforge.models.face.onnx_convert import onnx_to_iresnet


def _export(model: torch.nn.Module, path, dynamic: bool = True):
    """arcface_torch's torch2onnx export: TorchScript exporter (the dynamo one needs onnxscript), eval mode."""
    model.eval()
    axes = {"input": {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            torch.randn(1, 3, 112, 112),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=13,
            do_constant_folding=True,
        )


def _randomize_bn(model: IResNet, seed: int):
    """Random BN statistics and PReLU slopes, and convs scaled by 1/sqrt(fan_in) so activations stay O(1)
    at any depth (like trained weights) and an absolute error bound means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 1.0 / m.weight[0].numel() ** 0.5, generator=g)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                if m.weight.requires_grad:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.1, 0.4, generator=g)


@pytest.mark.parametrize(
    "cfg",
    [
        IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)),
        IResNetConfig(layers=(1, 3, 2, 1), widths=(8, 8, 16, 16), embedding_size=128),
        IResNetConfig.named("r18"),
    ],
    ids=["tiny", "uneven-stages", "iresnet18"],
)
def test_onnx_to_torch_matches_onnxruntime(cfg, tmp_path, record_property):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = IResNet(cfg)
    _randomize_bn(model, 1)
    _export(model, tmp_path / "rec.onnx")
    converted, report = onnx_to_iresnet(tmp_path / "rec.onnx")
    assert report["arch"]["layers"] == list(cfg.layers) and report["arch"]["widths"] == list(cfg.widths)
    assert report["arch"]["embedding_size"] == cfg.embedding_size and not report["input_normalized_in_graph"]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "rec.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        got = converted(torch.from_numpy(x)).numpy()
    err = float(np.abs(got - ref).max())
    record_property("max_abs_error", err)
    print(
        f"ONNX -> torch IResNet {report['arch']}: max abs error {err:.2e} (outputs up to {np.abs(ref).max():.2f})"
    )
    assert np.abs(ref).max() > 0.1  # a meaningful, non-vanishing output
    assert err < 1e-4


def test_arcface_torch_backbone_pth_loads_with_inferred_architecture(tmp_path):
    torch.manual_seed(0)
    model = IResNet(IResNetConfig(layers=(1, 2, 1, 1), widths=(4, 8, 8, 16))).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    enc = FaceEncoder.from_pretrained(tmp_path / "backbone.pth")
    assert enc.backbone.config.layers == (1, 2, 1, 1)
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    assert torch.allclose(enc(x), FaceEncoder(model)(x), atol=1e-6)


def test_non_iresnet_onnx_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(4, 2), torch.randn(1, 4), str(tmp_path / "lin.onnx"), dynamo=False)
    with pytest.raises(ValueError, match="IResNet"):
        onnx_to_iresnet(tmp_path / "lin.onnx")


def test_insightface_loader_embeds_a_batch_like_the_torch_encoder(tmp_path):
    from idforge.models.face.insightface_encoder import InsightFaceRecognizer

    torch.manual_seed(0)
    model = IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)))
    _randomize_bn(model, 3)
    _export(model, tmp_path / "w600k_r50.onnx")
    rec = InsightFaceRecognizer(str(tmp_path / "w600k_r50.onnx"))
    crops = np.random.default_rng(0).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    got = rec.embed(crops, batch_size=2)
    ref = FaceEncoder(model.eval()).embed_uint8(crops)
    assert got.shape == (5, 512)
    assert np.abs(got - ref).max() < 1e-3


def test_missing_insightface_pack_says_where_it_looked(tmp_path):
    from idforge.models.face.insightface_encoder import find_recognizer

    with pytest.raises(FileNotFoundError, match="never downloads"):
        find_recognizer("antelopev2", root=tmp_path)
