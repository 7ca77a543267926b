"""The training module's rules, one at a time (train/module.py): the dropout cases' exact intervals, the
per-rank seed, which inputs feed the adapter, cached text states under caption dropout, what is logged,
non-finite gradients, the validation seed, the schedule's length and the per-rank RNG on resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from idforge.models.generator import GeneratorConfig
from idforge.train.module import IdentityDiffusionModule
from idforge.train.optim import LRSchedule

from tests.builders import tiny_spec
from tests.train.test_module import _batches


@pytest.fixture(scope="module")
def module(tiny_zoo):
    return IdentityDiffusionModule(
        GeneratorConfig(zoo=tiny_spec(tiny_zoo), adapter={"variant": "final"}),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    ).eval()


@pytest.fixture()
def fresh(module):
    """The shared module with its per-test settings reset."""
    module.id_drop_prob = module.text_drop_prob = module.joint_drop_prob = 0.0
    module._rng, module.seed, module.val_seed, module._restored_rng_state = None, None, 1234, None
    module._nonfinite_loss, module._nonfinite_run, module._nonfinite_total = False, 0, 0
    module.lr_schedule = LRSchedule()
    yield module
    module._trainer = None


def _fixed_rand(monkeypatch, values):
    u = torch.tensor(values, dtype=torch.float32)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u.clone())


def _capture_log(monkeypatch, module):
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, (value, kw)))
    return logged


def test_defaults(fresh):
    m = IdentityDiffusionModule.__init__.__defaults__
    assert m[-2:] == (1234, 10)  # val_seed, max_nonfinite_steps
    assert fresh.hparams["val_seed"] == 1234 and fresh.hparams["max_nonfinite_steps"] == 10


def test_dropout_cases_are_half_open_intervals_of_one_uniform_draw(fresh, monkeypatch):
    fresh.joint_drop_prob, fresh.id_drop_prob, fresh.text_drop_prob = 0.125, 0.25, 0.25
    # both: [0, 0.125); id only: [0.125, 0.375); text only: [0.375, 0.625); nothing: [0.625, 1)
    eps = 2.0**-20
    u = [0.0, 0.125 - eps, 0.125, 0.375 - eps, 0.375, 0.625 - eps, 0.625, 0.99]
    _fixed_rand(monkeypatch, u)
    drop_id, drop_text = fresh._drop_masks(len(u), None)
    assert drop_id.tolist() == [True, True, True, True, False, False, False, False]
    assert drop_text.tolist() == [True, True, False, False, True, True, False, False]


def test_each_rank_and_step_seeds_its_own_stream(fresh, monkeypatch):
    fresh.seed = 7
    monkeypatch.setattr(IdentityDiffusionModule, "global_rank", property(lambda self: 2))
    monkeypatch.setattr(IdentityDiffusionModule, "global_step", property(lambda self: 3))
    monkeypatch.setattr(
        IdentityDiffusionModule, "trainer", property(lambda self: SimpleNamespace(world_size=4))
    )
    fresh.on_train_start()
    assert fresh._rng.initial_seed() == 7 + 2 + 4 * 3
    fresh.seed = None
    monkeypatch.setenv("PL_GLOBAL_SEED", "100")
    fresh.on_train_start()
    assert fresh._rng.initial_seed() == 100 + 2 + 12
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert fresh.base_seed() == 0


def _seen_inputs(module, monkeypatch, batch):
    seen = {}

    def identity_embeds(reference, landmarks=None, embeds=None):
        seen.update(reference=reference, landmarks=landmarks, embeds=embeds)
        b = reference.shape[0]
        return torch.ones(b, 512), torch.ones(b, module.model.image_encoder.output_dim)

    monkeypatch.setattr(module.model, "identity_embeds", identity_embeds)
    module._conditioning(batch, drop=False)
    return seen


def test_the_adapter_sees_the_reference_photo_its_landmarks_and_embedding(fresh, monkeypatch):
    batch = _batches(1)[0]
    seen = _seen_inputs(fresh, monkeypatch, batch)
    # the target photo is its own reference: its landmarks and its stored embedding
    assert seen["reference"] is batch["image"] and seen["landmarks"] is batch["landmarks"]
    assert seen["embeds"] is batch["embedding"]
    ref = dict(batch, reference=batch["image"].flip(0), reference_landmarks=batch["landmarks"] + 1)
    seen = _seen_inputs(fresh, monkeypatch, ref)
    assert seen["reference"] is ref["reference"] and seen["landmarks"] is ref["reference_landmarks"]
    assert seen["embeds"] is None  # the target's embedding is not the reference's
    ref["reference_embedding"] = batch["embedding"].flip(0)
    assert _seen_inputs(fresh, monkeypatch, ref)["embeds"] is ref["reference_embedding"]
    no_emb = {k: v for k, v in batch.items() if k != "embedding"}
    seen = _seen_inputs(fresh, monkeypatch, no_emb)
    assert seen["embeds"] is None and seen["landmarks"] is batch["landmarks"]


def test_group_batches_give_the_adapter_the_first_reference(fresh, monkeypatch):
    batch = _batches(1)[0]
    refs = torch.stack([batch["image"], batch["image"].flip(0)], 1)  # (B, 2, 3, H, W)
    lms = torch.stack([batch["landmarks"], batch["landmarks"] + 2], 1)
    seen = _seen_inputs(fresh, monkeypatch, dict(batch, refs=refs, ref_landmarks=lms))
    assert torch.equal(seen["reference"], refs[:, 0]) and torch.equal(seen["landmarks"], lms[:, 0])
    assert seen["embeds"] is None
    emb = torch.randn(2, 2, 512)
    seen = _seen_inputs(fresh, monkeypatch, dict(batch, refs=refs, ref_landmarks=lms, ref_embeddings=emb))
    assert torch.equal(seen["embeds"], emb[:, 0])


def test_cached_text_states_of_dropped_captions_become_the_empty_prompts(fresh, monkeypatch):
    batch = _batches(1, b=4)[0]
    batch["caption"] = ["a", "b", "", "d"]
    width = fresh.model.encode_text([""]).shape[-1]
    batch["text_states"] = torch.randn(4, 77, width)
    fresh.text_drop_prob = 0.5
    _fixed_rand(monkeypatch, [0.1, 0.9, 0.2, 0.7])  # text dropped for samples 0 and 2
    seen = {}
    monkeypatch.setattr(fresh.model, "condition", lambda arc, clip, text: seen.setdefault("text", text))
    fresh._conditioning(batch, drop=True)
    text = seen["text"]
    empty = fresh.model.encode_text([""])[0]
    assert torch.allclose(text[0], empty)
    assert torch.equal(text[1], batch["text_states"][1]) and torch.equal(text[3], batch["text_states"][3])
    assert torch.equal(text[2], batch["text_states"][2])  # already the empty caption: its cached states
    assert not torch.equal(batch["text_states"][0], text[0])  # the batch itself is not modified


def test_the_training_loss_is_shown_in_the_progress_bar(fresh, monkeypatch):
    logged = _capture_log(monkeypatch, fresh)
    fresh._rng = torch.Generator().manual_seed(0)
    loss = fresh.training_step(_batches(1)[0], 0)
    assert logged["train/loss"][1] == {"prog_bar": True, "batch_size": 2}
    assert torch.equal(logged["train/loss"][0], loss)
    assert logged["train/denoise"][1] == {"batch_size": 2}


def test_a_non_finite_gradient_skips_the_step_even_with_a_finite_loss(fresh, monkeypatch):
    logged = _capture_log(monkeypatch, fresh)
    a, b, c = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([1.0, float("inf")]), torch.ones(2)
    opt = SimpleNamespace(param_groups=[{"params": [a, b]}, {"params": [c]}])
    fresh.on_before_optimizer_step(opt)
    assert a.grad is None and b.grad is None
    assert (fresh._nonfinite_run, fresh._nonfinite_total) == (1, 1)
    assert logged["train/skipped_steps"][0] == 1.0
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    fresh.on_before_optimizer_step(opt)
    assert torch.equal(a.grad, torch.ones(2))
    assert (fresh._nonfinite_run, fresh._nonfinite_total) == (0, 1)
    fresh.on_before_optimizer_step(SimpleNamespace(param_groups=[{"params": [c]}]))  # no gradients at all
    assert fresh._nonfinite_run == 0


def test_validation_batches_each_have_their_own_fixed_seed(fresh, monkeypatch):
    logged = _capture_log(monkeypatch, fresh)
    batch = _batches(1)[0]
    with torch.no_grad():
        fresh.validation_step(batch, 1)
        expected = fresh._losses(batch, generator=torch.Generator().manual_seed(1235), drop=False)["loss"]
        other = fresh._losses(batch, generator=torch.Generator().manual_seed(1233), drop=False)["loss"]
    assert torch.equal(logged["val/loss"][0], expected) and not torch.equal(expected, other)
    assert logged["val/loss"][1] == {"prog_bar": True, "batch_size": 2, "sync_dist": True}


def test_the_schedule_runs_over_trainer_max_steps_unless_total_steps_is_set(fresh):
    fresh.lr_schedule = LRSchedule(warmup_steps=2, decay="cosine")
    with pytest.raises(ValueError, match="cosine decay needs total_steps"):
        fresh.configure_optimizers()  # no trainer: no max_steps to fall back on
    fresh._trainer = SimpleNamespace(max_steps=10)
    sched = fresh.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3])
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and lrs[6] == pytest.approx(0.5e-3)
    fresh._trainer = SimpleNamespace(max_steps=-1)  # max_epochs runs: total_steps must be given
    with pytest.raises(ValueError, match="cosine decay needs total_steps"):
        fresh.configure_optimizers()
    fresh.lr_schedule = LRSchedule(warmup_steps=2, decay="cosine", total_steps=6)
    fresh._trainer = SimpleNamespace(max_steps=100)
    sched = fresh.configure_optimizers()["lr_scheduler"]["scheduler"]
    for _ in range(6):
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_a_resumed_rank_restores_its_own_rng_entry(fresh):
    states = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (1, 2)])
    fresh._load_rng_state({"noise_rng": states})
    assert torch.equal(fresh._restored_rng_state, states[0])
    fresh._restored_rng_state = None
    fresh._trainer = SimpleNamespace(global_rank=1)
    fresh._load_rng_state({"noise_rng": states})
    assert torch.equal(fresh._restored_rng_state, states[1])
    fresh._restored_rng_state = None
    fresh._trainer = SimpleNamespace(global_rank=2)  # more ranks than the checkpoint had
    fresh._load_rng_state({"noise_rng": states})
    assert fresh._restored_rng_state is None


def test_a_datamodule_of_another_mode_is_refused_with_the_supported_ones(fresh):
    for ok in ("single", None):
        fresh._trainer = SimpleNamespace(datamodule=SimpleNamespace(mode=ok))
        fresh.setup("fit")
    fresh._trainer = SimpleNamespace(datamodule=SimpleNamespace(mode="group"))
    with pytest.raises(ValueError) as e:
        fresh.setup("fit")
    assert str(e.value) == (
        "data.mode: 'group' is not consumed by IdentityDiffusionModule (supports ('single',)); "
        "use data.mode: single until a ReferenceNet model consumes groups"
    )


def test_group_batches_feed_the_referencenet_their_references_and_valid_slots(fresh, monkeypatch):
    model = fresh.model
    seen = {}

    class Features:
        def drop(self, dropped):
            seen["dropped_features"] = dropped
            return "dropped features"

    def encode_references(refs, valid, generator=None):
        seen.update(refs=refs, valid=valid, generator=generator)
        return Features()

    def unet_input(noisy, box, size, latents, dropped):
        seen.update(noisy=noisy, box=box, size=size, latents=latents, dropped=dropped)
        return "unet input"

    monkeypatch.setattr(model, "encode_references", encode_references)
    monkeypatch.setattr(model, "unet_input", unet_input)
    batch = _batches(1, b=3)[0]
    batch |= {"refs": torch.randn(3, 2, 3, 32, 32), "ref_mask": torch.tensor([[1, 0], [1, 1], [1, 0]]).bool()}
    noisy, latents, g = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16), torch.Generator()
    out = fresh._reference_inputs(batch, noisy, latents, None, g)
    assert out[0] == "unet input" and isinstance(out[1], Features) and "dropped_features" not in seen
    assert seen["refs"] is batch["refs"] and torch.equal(seen["valid"], batch["ref_mask"])
    assert seen["generator"] is g and seen["noisy"] is noisy and seen["latents"] is latents
    assert seen["box"] is batch["box"] and seen["size"] == (32, 32) and seen["dropped"] is None
    kept = torch.tensor([True, False, True])
    assert fresh._reference_inputs(batch, noisy, latents, kept, g) == ("unet input", "dropped features")
    assert seen["dropped_features"].tolist() == [False, True, False]
    assert seen["dropped"].tolist() == [False, True, False]


def test_checkpoints_are_loaded_non_strictly(fresh):
    # checkpoints hold only the trainable tensors; DeepSpeed's engine (exclude_frozen_parameters) gets
    # this flag as load_module_strict, so it must be off; on_load_checkpoint does the checking instead
    assert fresh.strict_loading is False
