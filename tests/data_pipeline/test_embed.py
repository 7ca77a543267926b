"""Embedders: torch FaceEncoder folders and insightface recognition ONNX give the same L2-normalised
float32 embeddings for the same weights, independent of batch size; storage is float16."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from idforge.data_pipeline.embed import Embedder, make_embedder, to_storage

RNG = np.random.default_rng(0)
CROPS = RNG.integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def onnx_recognizer(tmp_path_factory):
    """A tiny IResNet saved both as an idforge folder and as an insightface-style recognition ONNX."""
    from idforge.models.zoo import TinyConfig, tiny_face_encoder

    enc = tiny_face_encoder(TinyConfig(face_widths=(4, 8, 8, 8)), seed=1)
    net = enc.backbone.eval()
    folder = tmp_path_factory.mktemp("rec")
    enc.save_pretrained(folder / "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            torch.randn(1, 3, 112, 112),
            str(folder / "w600k_tiny.onnx"),
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
            opset_version=13,
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        )
    return folder


def test_none_spec_gives_no_embedder():
    assert make_embedder("none") is None and make_embedder(None) is None and make_embedder("") is None


def test_face_encoder_folder_embeds_unit_vectors_independent_of_batch_size(tiny_face_encoder):
    one = make_embedder(tiny_face_encoder, batch_size=1).embed(CROPS)
    many = make_embedder(tiny_face_encoder, batch_size=64).embed(CROPS)
    assert one.dtype == np.float32 and one.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert make_embedder(tiny_face_encoder).embed(CROPS[:0]).shape == (0, 512)


def test_embed_refuses_wrong_inputs(tiny_face_encoder):
    emb = make_embedder(tiny_face_encoder)
    with pytest.raises(ValueError, match="uint8"):
        emb.embed(CROPS.astype(np.float32))
    with pytest.raises(ValueError, match="112"):
        emb.embed(CROPS[0])
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(object(), batch_size=0)


def test_onnx_recognizer_matches_the_torch_network(onnx_recognizer):
    import insightface  # noqa: F401  (required: fails, never skips)

    ref = make_embedder(str(onnx_recognizer / "torch")).embed(CROPS)
    ort = make_embedder(str(onnx_recognizer / "w600k_tiny.onnx"), batch_size=2)
    assert type(ort.backend).__name__ == "InsightFaceRecognizer"
    np.testing.assert_allclose(ort.embed(CROPS), ref, atol=1e-4)
    converted = make_embedder(str(onnx_recognizer / "w600k_tiny.onnx"), backend="torch")
    assert type(converted.backend).__name__ == "FaceEncoder"
    np.testing.assert_allclose(converted.embed(CROPS), ref, atol=1e-4)


def test_missing_recognizer_names_where_it_looked(tmp_path):
    import insightface  # noqa: F401  (required: fails, never skips)

    with pytest.raises(FileNotFoundError, match="antelopev2"):
        make_embedder("antelopev2", root=tmp_path)
    with pytest.raises(ValueError, match="backend"):
        make_embedder("x", backend="tf")


def test_storage_is_float16_unit_norm():
    emb = RNG.normal(size=(7, 512)).astype(np.float32) * 3
    stored = to_storage(emb)
    assert stored.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1, atol=1e-3)
