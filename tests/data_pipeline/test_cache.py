"""Cached VAE latents and text states: written beside the images, read back, used by the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from idforge.data_pipeline.cache import cache_shards
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.reader import collate_identity_samples, make_identity_dataset


@pytest.fixture(scope="module")
def cached(synthid_folder, tmp_path_factory, tiny_zoo):
    root = tmp_path_factory.mktemp("cache")
    run_curation(
        CurateConfig(
            input=str(synthid_folder),
            output=str(root / "shards"),
            resolution=32,
            filters=FilterConfig(min_resolution=32, min_face_px=8, duplicate_threshold=None),
        )
    )
    summary = cache_shards(
        root / "shards", root / "cached", {"base": f"tiny:{tiny_zoo}"}, resolution=32, dtype="float32"
    )
    return root, summary


def _items(folder, resolution):
    urls = sorted(str(p) for p in folder.glob("train-*.tar"))
    return list(make_identity_dataset(urls, resolution=resolution, shuffle_buffer=0, repeat=False))


def test_cached_latents_match_the_codec_and_text_encoder(cached, tiny_zoo):
    from idforge.models import zoo as zoo_lib

    root, summary = cached
    assert summary["images_encoded"] == 24
    items = _items(root / "cached", 32)
    assert len(items) == 16 and all("latent" in it and "text_states" in it for it in items)
    spec = zoo_lib.resolve(zoo_lib.ZooSpec(base=f"tiny:{tiny_zoo}"))
    codec = zoo_lib.load_codec(spec).eval()
    codec.sample_posterior = False
    text_encoder, tok = zoo_lib.load_text_encoder(spec), zoo_lib.load_tokenizer(spec)
    with torch.no_grad():
        z = codec.encode(torch.stack([it["image"] for it in items[:4]]))
        ids = tok(
            [it["caption"] for it in items[:4]],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        t = text_encoder(ids)[0]
    torch.testing.assert_close(torch.stack([it["latent"] for it in items[:4]]), z, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(torch.stack([it["text_states"] for it in items[:4]]), t, atol=2e-3, rtol=1e-2)
    manifest = json.loads((root / "cached" / "manifest.json").read_text())
    assert manifest["cache"]["resolution"] == 32 and manifest["images_accepted"] == 24


def test_cache_resumes_and_other_resolutions_ignore_it(cached, tiny_zoo):
    root, _ = cached
    again = cache_shards(root / "shards", root / "cached", {"base": f"tiny:{tiny_zoo}"}, resolution=32)
    assert again["images_encoded"] == 0 and len(again["skipped_existing"]) == len(again["shards"])
    assert not any("latent" in it for it in _items(root / "cached", 64))  # cached at 32 px only
    with pytest.raises(ValueError, match="new folder"):
        cache_shards(root / "shards", root / "shards", {"base": f"tiny:{tiny_zoo}"}, resolution=32)


def test_trainer_uses_cached_encodings(cached, tiny_zoo, monkeypatch):
    from idforge.models.generator import GeneratorConfig
    from idforge.models.zoo import ZooSpec
    from idforge.train.module import IdentityDiffusionModule

    root, _ = cached
    batch = collate_identity_samples(_items(root / "cached", 32)[:4])
    module = IdentityDiffusionModule(
        GeneratorConfig(zoo=ZooSpec(base=f"tiny:{tiny_zoo}")), text_drop_prob=0.5
    )

    def refuse(*a, **k):
        raise AssertionError("encoder called although the batch carries cached encodings")

    monkeypatch.setattr(module.model.codec, "encode", refuse)
    real_encode_text = module.model.encode_text
    monkeypatch.setattr(
        module.model, "encode_text", lambda caps: real_encode_text(caps) if list(caps) == [""] else refuse()
    )
    torch.manual_seed(0)
    loss = module._losses(batch)["loss"].detach()
    assert torch.isfinite(loss) and loss > 0
