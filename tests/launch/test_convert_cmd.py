"""``idforge convert-onnx``: the folder it writes is the ONNX recogniser, loadable as a FaceEncoder."""

from __future__ import annotations

import json

import torch
from idforge.launch.convert_cmd import convert_onnx
from idforge.models.face.face_encoder import FaceEncoder
from idforge.models.face.iresnet import IResNet, IResNetConfig

from tests.models.face.test_onnx_convert import _export, _randomize_bn


def test_converted_folder_loads_as_face_encoder(tmp_path):
    torch.manual_seed(0)
    model = IResNet(IResNetConfig(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)))
    _randomize_bn(model, 2)
    _export(model, tmp_path / "rec.onnx")
    out = convert_onnx(tmp_path / "rec.onnx", tmp_path / "enc")
    assert out == tmp_path / "enc"
    assert json.loads((out / "config.json").read_text())["widths"] == [4, 8, 8, 16]
    a = FaceEncoder.from_pretrained(out)
    b = FaceEncoder.from_pretrained(tmp_path / "rec.onnx")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert torch.allclose(a(x), b(x), atol=1e-6)
    assert torch.allclose(a(x), FaceEncoder(model.eval())(x), atol=1e-4)
