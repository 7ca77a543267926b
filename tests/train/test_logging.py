"""Logging callbacks: the sample grid's layout and the throughput monitor's figures."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from idforge.train.logging_callbacks import TrainMonitor, grid_image


def test_grid_rows_are_reference_then_generated_per_identity():
    refs = torch.full((2, 3, 4, 4), -1.0)
    refs[1] = 1.0
    gen = torch.zeros(2, 3, 4, 4)
    grid = grid_image(refs, gen)
    assert grid.shape == (3, 8, 8) and grid.dtype == torch.uint8
    assert (grid[:, :4, :4] == 0).all() and (grid[:, 4:, :4] == 255).all()  # references on the left
    assert (grid[:, :, 4:] == 128).all()  # generated on the right


def test_train_monitor_logs_images_per_second_over_all_ranks():
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda m, **kw: logged.update(m))
    trainer = SimpleNamespace(world_size=4, log_every_n_steps=2)
    mon = TrainMonitor()
    batch = {"image": torch.zeros(8, 3, 2, 2)}
    mon.on_train_batch_start(trainer, module, batch, 0)
    mon.on_train_batch_end(trainer, module, None, batch, 0)
    assert not logged  # logs every trainer.log_every_n_steps
    mon._t0 -= 1.0  # pretend the two steps took 1 s more
    mon.on_train_batch_end(trainer, module, None, batch, 1)
    assert 0.9 * 64 / 1.0 < logged["train/images_per_s"] <= 64.0  # 16 images x 4 ranks in ~1 s
    assert 0.45 < logged["train/step_time_s"] < 0.6


def test_sample_grid_is_the_exported_pipelines_output_for_the_live_weights(tiny_zoo, tmp_path):

    from idforge.inference.export import export_generator, load_pipeline
    from idforge.inference.pipeline import IdentityEmbeds
    from idforge.train.logging_callbacks import SampleGridCallback

    from tests.builders import perturbed_generator

    model = perturbed_generator(tiny_zoo)  # trained-looking weights: the identity path matters
    g = torch.Generator().manual_seed(3)
    refs = [
        {
            "image": torch.rand(3, 32, 32, generator=g) * 2 - 1,
            "landmarks": torch.tensor([[11.0, 13], [21, 13], [16, 18], [12, 23], [20, 23]]),
            "caption": caption,
            "embedding": torch.nn.functional.normalize(torch.randn(512, generator=g), dim=-1),
        }
        for caption in ("a photo", "a face")
    ]
    cb = SampleGridCallback(steps=3, guidance_scale=2.0, seed=5)
    cb._refs = refs  # the held-out references the callback would read from the shards
    model.train()
    grid = cb.generate(None, SimpleNamespace(model=model, device=torch.device("cpu")))
    assert model.training  # the callback puts the module back in training mode

    export_generator(model.eval(), tmp_path / "m", resolution=32)
    pipe = load_pipeline(tmp_path / "m")
    images = torch.stack([r["image"] for r in refs])
    clip = pipe.image_encoder(images).float()
    out = pipe(
        [r["caption"] for r in refs],
        identity=IdentityEmbeds(torch.stack([r["embedding"] for r in refs]), clip),
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    expected = grid_image(images, out * 2 - 1)
    assert grid.shape == (3, 64, 64)
    assert (grid.int() - expected.int()).abs().max() <= 1  # uint8 rounding of equal images
    assert not torch.equal(grid[:, :, 32:], grid_image(images, torch.zeros_like(images))[:, :, 32:])
