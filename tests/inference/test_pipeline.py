"""IdentityPipeline: registered components round-trip, stock loading of UNet/VAE/IP-Adapter, guidance."""

from __future__ import annotations

import json

import pytest
import torch
from idforge.inference.export import export_generator, ip_adapter_image_embeds, load_pipeline
from idforge.inference.pipeline import IdentityEmbeds, IdentityPipeline, mix_identities, slerp
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.zoo import ZooSpec


def _model(tiny_zoo, variant="final"):
    spec = ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )
    torch.manual_seed(0)
    model = IdentityGenerator.from_config(GeneratorConfig(zoo=spec, adapter={"variant": variant}))
    with torch.no_grad():  # move every trainable weight away from its initial value (gates included)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _identity(model, b=2):
    arc = torch.nn.functional.normalize(
        torch.randn(b, 512, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    clip = torch.randn(b, model.image_encoder.output_dim, generator=torch.Generator().manual_seed(2))
    return arc, clip


@torch.no_grad()
def _reference_ddim(model, captions, arc, clip, resolution, steps, guidance, seed=0):
    """The test's oracle: DDIM (eta 0) written out, with CFG against the null identity and the empty
    prompt, eps = eps_null + s (eps_cond - eps_null), on the generator's own condition/predict."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    b, size = len(captions), resolution // model.codec.downsample
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((b, model.codec.latent_channels, size, size), generator=g) * sched.init_noise_sigma
    cond = model.condition(arc, clip, model.encode_text(captions))
    null = model.condition(arc * 0, clip * 0, model.encode_text([""] * b))
    for t in sched.timesteps:
        x, tt = sched.scale_model_input(z, t), t.expand(b)
        e_c, e_n = model.predict(x, tt, cond), model.predict(x, tt, null)
        z = sched.step(e_n + guidance * (e_c - e_n), t, z).prev_sample
    return model.codec.decode(z).clamp(-1, 1)


def _run(pipe, arc, clip, **kw):
    kw.setdefault("guidance_scale", 2.0)
    return pipe(
        ["a photo", "a face"],
        identity=IdentityEmbeds(arc, clip),
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kw,
    ).images


@pytest.fixture(scope="module")
def exported(tiny_zoo, tmp_path_factory):
    out = {}
    for variant in ("final", "decoupled"):
        model = _model(tiny_zoo, variant)
        folder = tmp_path_factory.mktemp(variant) / "model"
        export_generator(model, folder, resolution=32, extra={"crop_scale": 0.8})
        out[variant] = (model, folder)
    return out


@pytest.mark.parametrize("variant", ["final", "decoupled"])
def test_pipeline_matches_a_written_out_ddim_loop_and_round_trips(exported, variant):
    from idforge.inference.export import pipeline_from_generator

    model, folder = exported[variant]
    arc, clip = _identity(model)
    old = _reference_ddim(model, ["a photo", "a face"], arc, clip, 32, steps=3, guidance=2.0)
    pipe = load_pipeline(folder)
    new = _run(pipe, arc, clip)
    assert (new * 2 - 1 - old).abs().max() < 1e-4
    live = pipeline_from_generator(model, 32)  # around the live modules (sample grids, the demo)
    assert live.image_encoder.encoder is model.image_encoder  # shared, not copied
    assert live.face_encoder.encoder is model.face_encoder and live.unet is model.unet
    live.set_progress_bar_config(disable=True)
    assert (_run(live, arc, clip) - new).abs().max() < 1e-5
    again = IdentityPipeline.from_pretrained(folder)
    assert torch.equal(_run(again, arc, clip), new)
    saved = folder.parent / "resaved"
    pipe.save_pretrained(saved)
    assert torch.equal(_run(IdentityPipeline.from_pretrained(saved), arc, clip), new)


def test_plain_diffusers_loads_unet_and_vae_equal_to_the_trained_weights(exported):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model, folder = exported["decoupled"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    trained = {k: v for k, v in model.unet.state_dict().items() if ".processor." not in k}
    assert set(unet.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    assert all(torch.equal(v, model.codec.vae.state_dict()[k]) for k, v in vae.state_dict().items())
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))


def test_identity_pipeline_from_pretrained_loads_an_export_in_a_fresh_interpreter(exported):
    """Users write ``IdentityPipeline.from_pretrained(DIR)`` after importing only the pipeline module:
    the adapter, image- and face-encoder components that model_index.json names must load too."""
    import subprocess
    import sys

    _, folder = exported["final"]
    code = (
        "import sys; from idforge.inference.pipeline import IdentityPipeline; "
        "p = IdentityPipeline.from_pretrained(sys.argv[1]); "
        "print(type(p.adapter).__name__, type(p.face_encoder).__name__, type(p.image_encoder).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["IdentityAdapterModel", "FaceEncoderModel", "ImageEncoderModel"]


def test_crop_scale_and_inference_scheduler_survive_export(exported):
    _, folder = exported["final"]
    pipe = load_pipeline(folder)
    assert pipe.config.crop_scale == 0.8 and pipe.config.resolution == 32
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert json.loads((folder / "idforge.json").read_text())["crop_scale"] == 0.8
    assert "crop_scale 0.8" in (folder / "README.md").read_text()


def _stock_beside_ours(folder):
    """(IdentityPipeline, stock StableDiffusionPipeline) of one export, on the export's timesteps
    (StableDiffusionPipeline rewrites steps_offset to 1, SD1.5's value)."""
    from diffusers import StableDiffusionPipeline

    ours = load_pipeline(folder)
    stock = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, image_encoder=None
    )
    stock.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    return ours, stock


def test_ip_adapter_file_loads_into_a_stock_pipeline_and_reproduces_the_identity_path(exported):
    model, folder = exported["decoupled"]
    arc, clip = _identity(model)
    ours, stock = _stock_beside_ours(folder)

    def run(**kw):
        return stock(
            ["a photo", "a face"],
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            height=32,
            width=32,
            **kw,
        ).images

    plain = run()
    stock.load_ip_adapter(
        folder, subfolder="ip_adapter", weight_name="ip-adapter.safetensors", image_encoder_folder=None
    )
    with_id = run(ip_adapter_image_embeds=[ip_adapter_image_embeds(arc, clip)])
    assert (with_id - plain).abs().max() > 1e-3
    # the stock UNet with the IP-Adapter computes what idforge's identity processors compute
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor(500)
    text = ours.encode_text(["a photo", "a face"])
    context, tokens = ours.condition(IdentityEmbeds(arc, clip), text)
    with torch.no_grad():
        mine = ours.unet(
            x, t, encoder_hidden_states=context, cross_attention_kwargs={"id_tokens": tokens}
        ).sample
        theirs = stock.unet(
            x,
            t,
            encoder_hidden_states=text,
            added_cond_kwargs={"image_embeds": [ip_adapter_image_embeds(arc, clip)]},
        ).sample
    assert (mine - theirs).abs().max() < 1e-5


def test_stock_pipeline_with_the_ip_adapter_file_samples_what_idforge_samples(exported):
    """One person per stock call (the pipeline repeats the embedding over its batch), the null identity
    stacked first for guidance: the stock denoising loop equals IdentityPipeline's over 10 steps."""
    model, folder = exported["decoupled"]
    arc, clip = _identity(model)
    ours, stock = _stock_beside_ours(folder)
    stock.load_ip_adapter(
        folder, subfolder="ip_adapter", weight_name="ip-adapter.safetensors", image_encoder_folder=None
    )
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = {"num_inference_steps": 10, "output_type": "latent", "height": 32, "width": 32}
    kw["num_images_per_prompt"] = 2
    for g in (1.0, 2.0):
        mine = ours(["a face"], identity=IdentityEmbeds(arc[1:], clip[1:]), latents=z, guidance_scale=g, **kw)
        embeds = ip_adapter_image_embeds(arc[1:], clip[1:], classifier_free_guidance=g > 1)
        theirs = stock(["a face"], ip_adapter_image_embeds=[embeds], latents=z, guidance_scale=g, **kw)
        assert (mine.images - theirs.images).abs().max() < 1e-3 * mine.images.abs().max()
    with pytest.raises(ValueError, match="one identity per call"):
        ip_adapter_image_embeds(arc, clip, classifier_free_guidance=True)


def test_guidance_branches_run_in_one_unet_call_per_step(exported):
    model, folder = exported["final"]
    pipe = load_pipeline(folder)
    arc, clip = _identity(model)
    batches = []
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        classic = _run(pipe, arc, clip, guidance_scale=2.0)
        assert batches == [4, 4, 4]  # (identity, null) x 2 prompts, 3 steps
        batches.clear()
        split = _run(pipe, arc, clip, guidance_scale=2.0, identity_guidance_scale=4.0)
        assert batches == [6, 6, 6]  # (text&id, text, null) x 2 prompts
    finally:
        hook.remove()
    assert (split - classic).abs().max() > 1e-4
    same = _run(pipe, arc, clip, guidance_scale=2.0, identity_guidance_scale=2.0)
    assert torch.equal(same, classic)


def test_adapter_scale_zero_is_the_null_identity(exported):
    model, folder = exported["final"]
    pipe = load_pipeline(folder)
    arc, clip = _identity(model)
    zero = _run(pipe, arc, clip, adapter_scale=0.0, guidance_scale=1.0)
    null = _run(pipe, arc * 0, clip * 0, guidance_scale=1.0)
    assert torch.equal(zero, null)
    assert (_run(pipe, arc, clip, guidance_scale=1.0) - zero).abs().max() > 1e-4


def test_slerp_endpoints_equal_the_inputs_and_midpoint_keeps_the_norm():
    a = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.5).norm(dim=-1), torch.ones(3), atol=1e-5)
    mixed = mix_identities(IdentityEmbeds(a, b), IdentityEmbeds(b, a), 1.0)
    assert torch.allclose(mixed.arcface, b, atol=1e-6) and torch.allclose(mixed.clip, a, atol=1e-6)


def test_several_references_give_the_mean_embedding(exported):
    _, folder = exported["final"]
    pipe = load_pipeline(folder)
    refs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    both = pipe.encode_identity(refs)
    one = [pipe.encode_identity(refs[i : i + 1]) for i in range(3)]
    mean_arc = torch.nn.functional.normalize(
        torch.cat([o.arcface for o in one]).mean(0, keepdim=True), dim=-1
    )
    assert torch.allclose(both.arcface, mean_arc, atol=1e-5)
    assert torch.allclose(both.clip, torch.cat([o.clip for o in one]).mean(0, keepdim=True), atol=1e-5)
