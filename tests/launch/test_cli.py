"""The `idforge` command end to end: demo, curate, train (LightningCLI), export, generate, eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from idforge.launch.cli import main, top_help

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """$IDFORGE_CACHE of this module's demos (the demo's VAE is cached there, not in the home)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, demo_cache):
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDFORGE_CACHE", str(demo_cache))
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_help_lists_the_subcommands():
    text = top_help()
    for cmd in ("demo", "curate", "cache", "train", "export", "generate", "eval", "convert-onnx"):
        assert f"  {cmd} " in text


def test_quick_demo_writes_figures_grid_shards_and_export(demo_out, capsys):
    fig = json.loads((demo_out / "demo.json").read_text())
    for key in ("fs_adapter", "fs_text_only", "fs_same_identity", "fs_different", "steps", "seconds"):
        assert key in fig
    assert -1 <= fig["fs_adapter"] <= 1 and fig["steps"] == 4
    assert fig["fs_same_identity"] > fig["fs_different"]  # the trained face encoder separates people
    assert (demo_out / "demo_grid.png").stat().st_size > 0
    manifest = json.loads((demo_out / "shards" / "manifest.json").read_text())
    assert manifest["files_seen"] == manifest["images_accepted"] + sum(manifest["rejected"].values())
    assert (demo_out / "export" / "idforge.json").is_file()
    # both judges scored the same images; the independent one is saved beside the export
    judge = fig["judges"]["judge"]
    assert judge["fs_adapter"] != fig["fs_adapter"] and (demo_out / "judge" / "config.json").is_file()
    for f in (fig, judge):
        assert f["identification"]["adapter"]["chance_top1"] == pytest.approx(1 / fig["heldout_identities"])
    for name, f in (("encoder", fig), ("judge", judge)):
        c = fig["ceilings"][name]
        assert c["generation_resolution"] == pytest.approx(f["fs_same_identity"])
        assert -1 <= c["full_resolution"] <= 1 and -1 <= c["vae_reconstruction"] <= 1
    from idforge.launch.demo import format_table

    table = format_table(fig)
    assert "judge" in table and "top-1" in table and "codec ceiling" in table
    assert f"{fig['judges']['judge']['fs_adapter']:+8.3f}" in table


def test_quick_demo_diffuses_in_the_latents_of_the_vae_it_trains(demo_out, demo_cache):
    fig = json.loads((demo_out / "demo.json").read_text())
    assert fig["resolution"] == 32
    # the generator diffuses in the trained VAE's latents, and the export carries that VAE
    vae = json.loads((demo_out / "export" / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(fig["vae"]["scaling_factor"])
    assert len(vae["block_out_channels"]) == 3  # 4x downsampling
    unet = json.loads((demo_out / "export" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 4 and unet["sample_size"] == 8
    assert not fig["vae"]["cached"] and Path(fig["vae"]["folder"]).is_relative_to(demo_cache)
    for name in ("encoder", "judge"):
        assert -1 <= fig["ceilings"][name]["vae_reconstruction"] <= 1


def test_quick_demo_with_the_referencenet_generator_scores_one_and_several_references(
    tmp_path, capsys, demo_out, demo_cache, monkeypatch
):
    monkeypatch.setenv("IDFORGE_CACHE", str(demo_cache))
    args = ["demo", "--quick", "--generator", "referencenet", "--out", str(tmp_path)]
    assert main(args) == 0
    fig = json.loads((tmp_path / "demo.json").read_text())
    # same data and VAE settings as the demo before: its VAE comes from the cache, byte for byte
    assert fig["vae"]["cached"]
    first = (demo_out / "export" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "export" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == first
    assert set(fig["by_refs"]) == {"1", "2"}  # FlashFace Table 3: one vs several references
    for n, f in fig["by_refs"].items():
        assert f["num_refs"] == int(n)
        assert f["flashface"]["paste"] == pytest.approx(
            f["flashface"]["sim_ref"] - f["flashface"]["sim_target"]
        )
    assert fig["by_refs"]["1"]["fs_adapter"] != fig["by_refs"]["2"]["fs_adapter"]
    assert (tmp_path / "export" / "reference_net").is_dir()
    out = capsys.readouterr().out
    assert "generated from 2 reference(s)" in out and "Paste, 1 reference(s)" in out


def test_curate_command_prints_a_summary(demo_out, tmp_path, capsys):
    assert (
        main(
            [
                "curate",
                "--input",
                str(demo_out / "synthid"),
                "--output",
                str(tmp_path / "c"),
                "--resolution",
                "32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "files seen" in out and "images accepted" in out
    assert (tmp_path / "c" / "manifest.json").is_file()


def test_curate_command_clusters_with_an_embedder(demo_out, tmp_path, capsys):
    assert (
        main(
            [
                "curate",
                "--input",
                str(demo_out / "synthid"),
                "--output",
                str(tmp_path / "c"),
                "--resolution",
                "32",
                "--embedder",
                str(demo_out / "zoo" / "face_encoder"),
                "--cluster",
                "unlabelled",
                "--captioner",
                "provided",
            ]
        )
        == 0
    )
    assert "identity clustering report" in capsys.readouterr().out
    assert (tmp_path / "c" / "cluster_report_train.txt").is_file()


def test_cache_command_writes_cached_shards(demo_out, tmp_path, capsys):
    assert (
        main(
            [
                "cache",
                "--shards",
                str(demo_out / "shards"),
                "--out",
                str(tmp_path / "cached"),
                "--base",
                f"tiny:{demo_out / 'zoo'}",
                "--resolution",
                "16",
            ]
        )
        == 0
    )
    assert "images encoded" in capsys.readouterr().out
    import json

    assert json.loads((tmp_path / "cached" / "manifest.json").read_text())["cache"]["resolution"] == 16


def test_train_export_generate_eval_chain(demo_out, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDFORGE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "run"
    main(
        [
            "train",
            "fit",
            "--config",
            str(ROOT / "configs" / "train" / "tiny.yaml"),
            f"--data.train_shards={demo_out / 'shards'}/train-*.tar",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_checkpointing=true",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ckpts = sorted(root.rglob("*.ckpt"))
    assert ckpts, "training wrote no checkpoint"
    assert main(["export", "--checkpoint", str(ckpts[-1]), "--out", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model_index.json").is_file()

    ref = min((demo_out / "synthid").rglob("*.png"))
    lms = json.loads((demo_out / "synthid" / "landmarks.jsonl").read_text().splitlines()[0])["landmarks"]
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "model"),
                "--ref",
                str(ref),
                "--landmarks",
                json.dumps(lms),
                "--prompt",
                "a photo of a person",
                "--prompt",
                "a face",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "gen"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "gen").glob("0*.png"))) == 2 and (tmp_path / "gen" / "grid.png").is_file()

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--shards",
                f"{demo_out / 'shards'}/heldout-*.tar",
                "--steps",
                "2",
                "--guidance",
                "3",
                "--out",
                str(tmp_path / "fig.json"),
            ]
        )
        == 0
    )
    fig = json.loads((tmp_path / "fig.json").read_text())
    assert {"fs_adapter", "fs_text_only", "fs_same_identity", "fs_different"} <= set(fig)
    assert (fig["sampling_steps"], fig["guidance_scale"]) == (2, 3.0)


def test_generate_reports_a_missing_reference_in_one_line(demo_out, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    args = ["generate", "--model", str(demo_out / "export"), "--ref", str(missing)]
    code = main([*args, "--prompt", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [
        f"idforge generate: error: reference image {missing} not found (--debug shows the traceback)"
    ]


def _two_people(demo_out):
    """(path, landmarks) of the first photo of two different SynthID people of the demo."""
    records = [
        json.loads(line) for line in (demo_out / "synthid" / "landmarks.jsonl").read_text().splitlines()
    ]
    a = records[0]
    b = next(r for r in records if r["file"].split("/")[0] != a["file"].split("/")[0])
    return [(demo_out / "synthid" / r["file"], r["landmarks"]) for r in (a, b)]


def test_morph_writes_the_frames_a_gif_and_a_strip(demo_out, tmp_path, capsys):
    from PIL import Image

    (a, lms_a), (b, lms_b) = _two_people(demo_out)
    out = tmp_path / "morph"
    args = ["morph", "--a", str(a), "--b", str(b), "--model", str(demo_out / "export"), "--out", str(out)]
    args += ["--landmarks_a", json.dumps(lms_a), "--landmarks_b", json.dumps(lms_b)]
    assert main([*args, "--frames", "3", "--steps", "2"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "strip.png"), str(out / "morph.gif")]
    res = json.loads((demo_out / "export" / "idforge.json").read_text())["resolution"]
    frames = sorted(out.glob("frame_*.png"))
    assert [f.name for f in frames] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    pics = [np.asarray(Image.open(f).convert("RGB")) for f in frames]
    assert all(p.shape == (res, res, 3) for p in pics)
    assert not np.array_equal(pics[0], pics[-1])  # A's end is not B's end
    gif = Image.open(out / "morph.gif")
    assert gif.n_frames == 3
    assert Image.open(out / "strip.png").size == (3 * res + 4 * 2, res + 2 * 2)  # nrow=frames, padding 2


def test_morph_of_a_photo_without_a_face_is_one_line_on_stderr(demo_out, tmp_path, capsys):
    from PIL import Image

    (a, lms_a), _ = _two_people(demo_out)
    wall = tmp_path / "wall.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(wall)
    args = ["morph", "--a", str(a), "--b", str(wall), "--model", str(demo_out / "export")]
    args += ["--out", str(tmp_path / "m"), "--landmarks_a", json.dumps(lms_a), "--detector", "landmarks"]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        (
            f"idforge morph: error: {wall}: no face found; pass a photo with a visible face, or its 5 "
            "landmarks with --landmarks_b (--debug shows the traceback)"
        )
    ]
    assert not (tmp_path / "m").exists()


def test_eval_progress_total_matches_the_steps_sampled(demo_out):
    from idforge.data_pipeline.align import template_for
    from idforge.eval.benchmark import benchmark_steps, identity_benchmark
    from idforge.eval.groups import load_groups
    from idforge.inference.export import load_pipeline

    pipe = load_pipeline(demo_out / "export")
    res, crop = int(pipe.config.resolution), float(pipe.config.crop_scale)
    groups = load_groups(sorted(str(p) for p in (demo_out / "shards").glob("heldout-*.tar")), res)[:3]
    calls = []
    lms = torch.as_tensor(template_for(res, crop), dtype=torch.float32)
    identity_benchmark(
        pipe, groups, pipe.face_encoder, steps=2, generated_landmarks=lms, batch_size=2, progress=calls.append
    )
    # 2 batches of identities x (adapter, text-only) x 2 steps
    assert sum(calls) == benchmark_steps(len(groups), 2, batch_size=2) == 8
