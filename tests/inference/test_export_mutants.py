"""What an export folder holds (inference/export.py): the manifest, the model card, the IP-Adapter file and
its key rule, the loaders' errors, and the training-side view of a loaded pipeline."""

from __future__ import annotations

import json
import re

import pytest
import torch
from idforge.inference import export
from idforge.inference.export import (
    export_generator,
    ip_adapter_image_embeds,
    ip_adapter_state_dict,
    load_exported,
    load_pipeline,
    model_card,
    pipeline_from_generator,
)

from idforge import __version__
from tests.builders import perturbed_generator


def _exactly(message: str) -> str:
    """A pytest.raises pattern that matches ``message`` and nothing more."""
    return f"^{re.escape(message)}$"


@pytest.fixture(scope="module")
def models(tiny_zoo):
    return {
        "final": perturbed_generator(tiny_zoo, {"variant": "final"}),
        "decoupled": perturbed_generator(tiny_zoo, {"variant": "decoupled"}),
    }


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        "final": export_generator(
            models["final"],
            root / "final",
            resolution=32,
            extra={"crop_scale": 0.8, "weights": "ema"},
            card={"steps": 1234, "metrics": {"fs": 0.5}},
        ),
        "decoupled": export_generator(models["decoupled"], root / "dec", resolution=32, scheduler="euler"),
    }


def test_manifest_records_resolution_crop_variant_scheduler_and_extra(folders, tiny_zoo):
    assert json.loads((folders["final"] / "idforge.json").read_text()) == {
        "format": "idforge-pipeline",
        "version": __version__,
        "resolution": 32,
        "crop_scale": 0.8,
        "variant": "final",
        "scheduler": "ddim",
        "weights": "ema",
    }
    dec = json.loads((folders["decoupled"] / "idforge.json").read_text())
    assert (dec["variant"], dec["scheduler"], dec["crop_scale"]) == ("decoupled", "euler", 1.0)
    assert load_pipeline(folders["decoupled"]).config.crop_scale == 1.0


def test_model_card_of_an_export(folders, tiny_zoo):
    card = (folders["final"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    assert "Diff-ID adapter, variant `final`" in card and f"exported by idforge\n{__version__}." in card
    assert f"| base model | {tiny_zoo} |" in card
    assert "| training steps | 1234 |" in card and "| training data | unknown |" in card
    assert "| resolution | 32 px |" in card and "crop_scale 0.8 |" in card
    assert "| scheduler | ddim (inference; the training noise schedule) |" in card
    assert "\n| fs | 0.5 |\n" in card and "IP-Adapter format" not in card
    dec = (folders["decoupled"] / "README.md").read_text()
    assert "variant `decoupled`" in dec and "| scheduler | euler (inference" in dec
    assert dec.endswith(
        'weight_name="ip-adapter.safetensors", image_encoder_folder=None)`, image embeddings = '
        "concat(ArcFace, CLIP image embedding) of one person, shape (1, 1, D), the zero embedding stacked "
        "first when guidance_scale > 1 (`idforge.inference.export.ip_adapter_image_embeds`).\n"
    )


def test_model_card_defaults():
    card = model_card({})
    for line in (
        "| base model | unknown |",
        "| training data | unknown |",
        "| training steps | unknown |",
        "| weights | live (as trained) |",
        "| scheduler | ddim (inference; the training noise schedule) |",
        "| (none recorded) | |",
    ):
        assert f"\n{line}\n" in card, line
    assert "IP-Adapter" not in card
    assert "| a | 1 |\n| b | x |" in model_card({"metrics": {"a": 1, "b": "x"}, "weights": "ema"})
    assert "| weights | ema |" in model_card({"weights": "ema"})


def test_ip_adapter_file_holds_the_projection_and_one_kv_pair_per_cross_attention(folders, models):
    from idforge.models.attention import processor_key
    from safetensors.torch import load_file

    assert not (folders["final"] / "ip_adapter").exists()
    state = load_file(folders["decoupled"] / "ip_adapter" / "ip-adapter.safetensors")
    model = models["decoupled"]
    a = model.adapter
    assert torch.equal(state["image_proj.proj.weight"], a.proj_decoupled.weight)
    assert torch.equal(state["image_proj.proj.bias"], a.proj_decoupled.bias)
    assert torch.equal(state["image_proj.norm.weight"], a.norm_decoupled.weight)
    assert torch.equal(state["image_proj.norm.bias"], a.norm_decoupled.bias)
    cross = [n for n in model.unet.attn_processors if not n.endswith("attn1.processor")]
    assert len(cross) > 1
    assert set(state) - {k for k in state if k.startswith("image_proj.")} == {
        f"ip_adapter.{2 * k + 1}.{w}_ip.weight" for k in range(len(cross)) for w in ("to_k", "to_v")
    }
    for k, name in enumerate(cross):
        proc = model.unet.attn_processors[name]
        assert float(proc.gate.detach()) != 0.0
        assert torch.equal(state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"], proc.to_k_id.weight)
        assert torch.allclose(
            state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"], proc.gate * proc.to_v_id.weight
        )
        assert processor_key(name) in live_pipeline_processors(model)
    assert all(v.dtype == torch.float32 and not v.requires_grad and v.is_contiguous() for v in state.values())


def live_pipeline_processors(model):
    return pipeline_from_generator(model, 32).adapter.processors


def test_ip_adapter_state_dict_refuses_adapters_without_an_ip_adapter_form(models, tiny_zoo, tmp_path):
    with pytest.raises(
        ValueError,
        match=_exactly("only the decoupled variant has an IP-Adapter form, this adapter is 'final'"),
    ):
        ip_adapter_state_dict(pipeline_from_generator(models["final"], 32))
    for opts, msg in (
        (
            {"input_layernorm": True},
            "an adapter with input_layernorm has no IP-Adapter form (ImageProjection has no input norm)",
        ),
        (
            {"num_decoupled_tokens": 2},
            "diffusers' IP-Adapter loader assumes 4 image tokens; this adapter has 2",
        ),
    ):
        model = perturbed_generator(tiny_zoo, {"variant": "decoupled", **opts})
        with pytest.raises(ValueError, match=_exactly(msg)):
            ip_adapter_state_dict(pipeline_from_generator(model, 32))
        out = export_generator(model, tmp_path / str(len(opts)) / next(iter(opts)), resolution=32)
        assert not (out / "ip_adapter").exists()
        assert "IP-Adapter format" not in (out / "README.md").read_text()
        assert json.loads((out / "idforge.json").read_text())["variant"] == "decoupled"


def test_ip_adapter_image_embeds_concatenate_arcface_and_the_mean_clip_token():
    arc, clip = torch.randn(2, 5), torch.randn(2, 3)
    out = ip_adapter_image_embeds(arc, clip)
    assert out.shape == (2, 1, 8) and torch.equal(out[:, 0], torch.cat([arc, clip], -1))
    patches = torch.randn(2, 4, 3)
    out = ip_adapter_image_embeds(arc, patches)
    assert out.shape == (2, 1, 8) and torch.allclose(out[:, 0, 5:], patches.mean(1))


def test_load_pipeline_explains_what_is_wrong_with_a_folder(folders, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=_exactly(f"{tmp_path}: not a model folder; write one with `idforge export`")
    ):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_pipeline(tmp_path)  # no idforge.json
    (tmp_path / "idforge.json").write_text("{}")
    with pytest.raises(
        ValueError,
        match=_exactly(
            f"{tmp_path}: written by an older idforge export (StableDiffusionPipeline); re-export it"
        ),
    ):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "IdentityPipeline"}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: has no vae/ (a pixel-space model")):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_pipeline(tmp_path)  # no model_index.json


def test_load_pipeline_dtype_scheduler_and_quiet_progress(folders):
    pipe = load_pipeline(folders["decoupled"], dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe._progress_bar_config == {"disable": True}
    assert load_pipeline(folders["final"]).unet.dtype == torch.float32


def test_load_exported_gives_the_training_side_view(folders):
    gen, manifest = load_exported(folders["final"])
    assert manifest["weights"] == "ema" and manifest["resolution"] == 32
    assert not gen.training and not gen.train_unet
    assert type(gen.scheduler).__name__ == "DDPMScheduler"
    assert type(gen.codec).__name__ == "VaeCodec" and gen.codec.sample_posterior is False
    assert gen.image_encoder_model is not None
    assert gen.image_encoder is gen.image_encoder_model.encoder


def test_pipeline_from_generator_without_a_clip_config_is_an_error(models):
    model = models["final"]
    spec, model.zoo_spec = model.zoo_spec, None
    try:
        with pytest.raises(
            ValueError,
            match=_exactly(
                "pipeline_from_generator: the generator has no zoo_spec to read its CLIP config from"
            ),
        ):
            pipeline_from_generator(model, 32)
    finally:
        model.zoo_spec = spec


def test_pipeline_from_generator_takes_resolution_crop_scale_and_scheduler(models):
    pipe = pipeline_from_generator(models["final"], 48, crop_scale=0.7, scheduler="dpm++")
    assert pipe.config.resolution == 48 and pipe.config.crop_scale == 0.7
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.vae is models["final"].codec.vae and pipe.adapter.adapter is models["final"].adapter
    assert export.MANIFEST == "idforge.json"
