"""Tiny model zoo: every component is written in its library's format and loads back through the
same loaders real weights use."""

from __future__ import annotations

import json

import pytest
import torch
from idforge.models import zoo


def test_every_component_loads_through_the_real_loaders(tiny_zoo):
    spec = zoo.ZooSpec(**json.loads((tiny_zoo / "zoo_spec.json").read_text()))
    unet = zoo.load_unet(spec)
    codec = zoo.load_codec(spec)
    text = zoo.load_text_encoder(spec)
    tok = zoo.load_tokenizer(spec)
    sched = zoo.load_scheduler(spec)
    image = zoo.load_image_encoder(spec)
    face = zoo.load_face_encoder(spec)

    ids = tok(
        ["a photo of a person with a round face"],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (1, 77)
    states = text(ids)[0]
    assert states.shape == (1, 77, unet.config.cross_attention_dim)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 16, 16)
    eps = unet(z, torch.tensor([10, 500]), encoder_hidden_states=states.expand(2, -1, -1)).sample
    assert eps.shape == z.shape
    assert codec.decode(z).shape == x.shape
    assert sched.config.num_train_timesteps == 1000

    e_i = image(x)
    assert e_i.shape == (2, image.output_dim)
    e_arc = face(torch.rand(2, 3, 112, 112) * 2 - 1)
    assert e_arc.shape == (2, 512)
    assert torch.allclose(e_arc.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_tiny_tokenizer_keeps_caption_words_whole(tiny_zoo):
    spec = zoo.ZooSpec(**json.loads((tiny_zoo / "zoo_spec.json").read_text()))
    tok = zoo.load_tokenizer(spec)
    pieces = tok.tokenize("a close-up photo of a person with large green eyes")
    assert "photo</w>" in pieces and "green</w>" in pieces and "eyes</w>" in pieces
    # words outside the list still tokenize into known pieces
    assert tok.unk_token_id not in tok("zebra xylophone").input_ids[1:-1]


def test_loading_is_deterministic(tiny_zoo):
    spec = zoo.ZooSpec(**json.loads((tiny_zoo / "zoo_spec.json").read_text()))
    a, b = zoo.load_unet(spec), zoo.load_unet(spec)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_diffusers_pipeline_loads_the_tiny_folder(tiny_zoo):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_zoo, safety_checker=None, feature_extractor=None)
    assert pipe.unet.config.in_channels == 4


def test_a_three_level_vae_zoo_diffuses_on_4x_smaller_latents(tmp_path):
    spec = zoo.build_tiny(
        tmp_path / "z4",
        zoo.TinyConfig(
            resolution=64,
            vae_channels=(8, 16, 16),
            vae_attention=False,
            unet_channels=(16, 32),
            unet_attention=(False, True),
        ),
    )
    codec, unet = zoo.load_codec(spec), zoo.load_unet(spec)
    assert codec.downsample == 4 and unet.config.sample_size == 16
    assert codec.vae.encoder.mid_block.attentions[0] is None  # no mid-block self-attention
    z = codec.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert z.shape == (1, 4, 16, 16) and codec.decode(z).shape == (1, 3, 64, 64)
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D"]


def test_resolve_tiny_builds_once(tmp_path):
    spec = zoo.resolve(zoo.ZooSpec(base=f"tiny:{tmp_path / 'z'}"))
    assert (tmp_path / "z" / "zoo_spec.json").is_file()
    mtime = (tmp_path / "z" / "unet" / "config.json").stat().st_mtime_ns
    again = zoo.resolve(zoo.ZooSpec(base=f"tiny:{tmp_path / 'z'}"))
    assert again == spec
    assert (tmp_path / "z" / "unet" / "config.json").stat().st_mtime_ns == mtime


def test_bad_specs_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny zoo"):
        zoo.resolve(zoo.ZooSpec(base="tiny-huge"))
    with pytest.raises(ValueError, match="use 'tiny' or 'tiny:/folder'"):
        zoo.resolve(zoo.ZooSpec(base="tiny-pixel"))  # pixel-space diffusion is gone
    with pytest.raises(ValueError, match="vae_channels"):
        zoo.TinyConfig(vae_channels=(8,))
    with pytest.raises(ValueError, match="not divisible"):
        zoo.TinyConfig(resolution=36, vae_channels=(8, 16, 16))  # 36 px: 9 latents, not even
    from idforge.models.image_encoder import ClipImageEncoder

    with pytest.raises(FileNotFoundError, match="local-dir"):
        ClipImageEncoder.from_pretrained(str(tmp_path / "missing"))


def test_build_tiny_writes_what_the_in_memory_builders_make(tiny_zoo):
    spec = zoo.ZooSpec(**json.loads((tiny_zoo / "zoo_spec.json").read_text()))
    written = zoo.load_unet(spec).state_dict()
    built = zoo.tiny_unet(zoo.TinyConfig(), seed=zoo.TinyConfig().seed).state_dict()
    assert written.keys() == built.keys()
    assert all(torch.equal(written[k], built[k]) for k in written)


def test_tiny_builders_follow_the_config_and_the_seed():
    cfg = zoo.TinyConfig(
        resolution=16, unet_channels=(16, 32), unet_attention=(True, False), vae_channels=(8, 16)
    )
    unet = zoo.tiny_unet(cfg, seed=0)
    assert (unet.config.sample_size, unet.config.in_channels) == (8, 4)  # latents of 16 px images
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    four = zoo.tiny_unet(zoo.TinyConfig(resolution=32, vae_channels=(8, 16, 16), unet_channels=(16, 32)))
    assert (four.config.sample_size, four.config.in_channels) == (8, 4)  # 4x downsampling
    assert tuple(zoo.tiny_vae(cfg).config.block_out_channels) == (8, 16)

    face = zoo.tiny_face_encoder(zoo.TinyConfig(face_widths=(4, 8, 8, 8)), seed=0)
    assert face.backbone.config.widths == (4, 8, 8, 8) and face.embedding_size == 512
    again = zoo.tiny_face_encoder(zoo.TinyConfig(face_widths=(4, 8, 8, 8)), seed=0)
    other = zoo.tiny_face_encoder(zoo.TinyConfig(face_widths=(4, 8, 8, 8)), seed=1)
    w = "backbone.conv1.weight"
    assert torch.equal(face.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(face.state_dict()[w], other.state_dict()[w])
    assert tuple(zoo.tiny_vae(zoo.TinyConfig(vae_channels=(8, 16, 32))).config.block_out_channels) == (
        8,
        16,
        32,
    )
