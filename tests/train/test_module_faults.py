"""Trainer robustness: per-rank seeds, dropout cases, parameter groups and schedule, non-finite steps,
unsupported data modes, configuration errors before loading, checkpoint rebuild and strict resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from idforge.models.generator import GeneratorConfig
from idforge.models.zoo import ZooSpec
from idforge.train.module import IdentityDiffusionModule
from idforge.train.optim import LRSchedule, ParamGroup
from torch.utils.data import DataLoader

from tests.train.test_module import _batches


def _spec(tiny_zoo):
    return ZooSpec(
        base=str(tiny_zoo),
        image_encoder=f"local-dir:{tiny_zoo / 'clip_image_encoder'}",
        face_encoder=str(tiny_zoo / "face_encoder"),
    )


def _module(tiny_zoo, adapter=None, **kw):
    kw.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=1e-3))
    return IdentityDiffusionModule(
        GeneratorConfig(zoo=_spec(tiny_zoo), adapter={"variant": "final", **(adapter or {})}), **kw
    )


def _trainer(tmp_path, **kw):
    kw.setdefault("max_steps", 1)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


class _FakeTrainer:
    def __init__(self, rank, world=4, step=0):
        self.global_rank, self.world_size, self.global_step = rank, world, step


def test_each_rank_draws_its_own_noise_and_timesteps(tiny_zoo, monkeypatch):
    module = _module(tiny_zoo, seed=7)
    draws = []
    for rank in range(4):
        monkeypatch.setattr(IdentityDiffusionModule, "global_rank", property(lambda self, r=rank: r))
        monkeypatch.setattr(IdentityDiffusionModule, "trainer", property(lambda self: _FakeTrainer(0)))
        monkeypatch.setattr(IdentityDiffusionModule, "global_step", property(lambda self: 0))
        module.on_train_start()
        out = module._losses(_batches(1, b=4)[0], generator=module._rng)
        draws.append(out["timesteps"])
    assert len({tuple(t.tolist()) for t in draws}) == 4  # 4 ranks, 4 different timestep draws
    monkeypatch.setattr(IdentityDiffusionModule, "global_rank", property(lambda self: 0))
    module.on_train_start()
    again = module._losses(_batches(1, b=4)[0], generator=module._rng)["timesteps"]
    assert torch.equal(again, draws[0])  # a rank's stream is reproducible


def test_dropout_cases_are_disjoint_and_the_null_branch_has_its_own_rate(tiny_zoo):
    module = _module(tiny_zoo, id_drop_prob=0.1, text_drop_prob=0.1, joint_drop_prob=0.1)
    g = torch.Generator().manual_seed(0)
    drop_id, drop_text = module._drop_masks(20000, g)
    both = (drop_id & drop_text).float().mean()
    assert abs(float(both) - 0.1) < 0.01  # independent draws would give 0.1 x 0.1 = 0.01
    assert abs(float((drop_id & ~drop_text).float().mean()) - 0.1) < 0.01
    assert abs(float((~drop_id & drop_text).float().mean()) - 0.1) < 0.01
    with pytest.raises(ValueError, match="must be < 1"):
        _module(tiny_zoo, id_drop_prob=0.5, text_drop_prob=0.3, joint_drop_prob=0.3)


def test_parameter_groups_get_their_own_rates_and_the_schedule_warms_up(tiny_zoo, tmp_path):
    groups = [
        ParamGroup(name="adapter", match=["adapter.*", "unet.*.processor.*"], lr=1e-3),
        ParamGroup(name="unet", match=["unet.*"], lr=1e-4),
        ParamGroup(name="referencenet", match=["referencenet.*"], lr=2e-5),  # none yet: left out
    ]
    module = _module(
        tiny_zoo,
        param_groups=groups,
        lr_schedule=LRSchedule(warmup_steps=4, decay="cosine", total_steps=100, min_lr_ratio=0.1),
        optimizer=lambda p: torch.optim.Adam(p, lr=5.0),  # the groups' rates win
    )
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(2), batch_size=None))
    opt = trainer.optimizers[0]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"adapter", "unet"}
    adapter_ids = {id(p) for p in module.model.adapter.parameters()}
    assert {id(p) for p in by_name["adapter"]["params"]} == adapter_ids
    assert by_name["adapter"]["lr"] == pytest.approx(1e-3 * 3 / 4)  # after 2 steps: factor (2 + 1) / 4
    assert by_name["unet"]["lr"] == pytest.approx(1e-4 * 3 / 4)
    sched = LRSchedule(warmup_steps=10, decay="cosine", total_steps=110, min_lr_ratio=0.1)
    assert sched.factor(0, 110) == pytest.approx(0.1) and sched.factor(10, 110) == pytest.approx(1.0)
    assert sched.factor(60, 110) == pytest.approx(0.55) and sched.factor(500, 110) == pytest.approx(0.1)


def test_unmatched_trainable_parameters_are_an_error(tiny_zoo, tmp_path):
    module = _module(tiny_zoo, param_groups=[ParamGroup(name="adapter", match=["adapter.*"], lr=1e-4)])
    with pytest.raises(ValueError, match="match no group, e.g. \\['unet"):
        module.configure_optimizers()


def test_nonfinite_steps_are_skipped_counted_and_abort_after_n_in_a_row(tiny_zoo, tmp_path, caplog):
    module = _module(tiny_zoo, max_nonfinite_steps=3)
    batches = _batches(4)
    batches[0]["embedding"] = batches[0]["embedding"] * float("nan")  # NaN conditioning: NaN loss
    before = {k: v.clone() for k, v in module.model.trainable_state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(batches[:1], batch_size=None))
    after = module.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped: no update
    assert all(torch.isfinite(v).all() for v in after.values())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert "non-finite loss or gradient; step skipped" in caplog.text

    module = _module(tiny_zoo, max_nonfinite_steps=3)
    good, bad = _batches(1)[0], {**_batches(1)[0]}
    bad["embedding"] = bad["embedding"] * float("inf")
    stream = [bad, bad, good, bad, bad, good]  # never 3 in a row: trains through, 4 skipped
    trainer = _trainer(tmp_path, max_steps=6)
    trainer.fit(module, train_dataloaders=DataLoader(stream, batch_size=None))
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 4.0
    module = _module(tiny_zoo, max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss or gradient"):
        _trainer(tmp_path, max_steps=6).fit(
            module, train_dataloaders=DataLoader([good, bad, bad, bad], batch_size=None)
        )


def test_group_mode_batches_and_datamodules_are_refused(tiny_zoo):
    module = _module(tiny_zoo)
    batch = {**_batches(1)[0], "refs": torch.zeros(2, 1, 3, 32, 32), "num_refs": torch.ones(2)}
    with pytest.raises(ValueError, match="data.mode 'group' batches are not consumed"):
        module._losses(batch)

    class _DM(L.LightningDataModule):
        mode = "group"

    trainer = _trainer(None)
    trainer.datamodule = _DM()
    module.trainer = trainer
    with pytest.raises(ValueError, match="data.mode: 'group' is not consumed"):
        module.setup("fit")


def test_config_errors_fail_before_any_model_loads_and_name_the_key(tiny_zoo, monkeypatch):
    from idforge.models import zoo

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(zoo, "load_unet", no_loading)
    bad_face = ZooSpec(
        base=str(tiny_zoo), image_encoder=_spec(tiny_zoo).image_encoder, face_encoder="/no/such/face"
    )
    with pytest.raises(FileNotFoundError, match="generator.zoo.face_encoder: /no/such/face does not exist"):
        IdentityDiffusionModule(GeneratorConfig(zoo=bad_face))
    local_unet = ZooSpec(**{**_spec(tiny_zoo).to_dict(), "unet": "./models/sd15-unet"})
    with pytest.raises(
        FileNotFoundError, match=r"generator.zoo.unet: ./models/sd15-unet does not exist \(a local path"
    ):
        IdentityDiffusionModule(GeneratorConfig(zoo=local_unet))
    home = ZooSpec(**{**_spec(tiny_zoo).to_dict(), "base": "~/no-such-sd15"})
    with pytest.raises(FileNotFoundError, match="generator.zoo.base: ~/no-such-sd15 does not exist"):
        IdentityDiffusionModule(GeneratorConfig(zoo=home))
    for adapter, key in (
        ({"softmax": True, "normalize_by_length": True}, "generator.adapter.normalize_by_length"),
        ({"text_start": True}, "generator.adapter.text_start"),
        ({"varient": "final"}, "generator.adapter.varient"),
        ({"variant": "best"}, "generator.adapter.variant"),
    ):
        with pytest.raises(ValueError, match=key):
            IdentityDiffusionModule(GeneratorConfig(zoo=_spec(tiny_zoo), adapter=adapter))
    with pytest.raises(FileNotFoundError, match="generator.adapter_path"):
        IdentityDiffusionModule(GeneratorConfig(zoo=_spec(tiny_zoo), adapter_path="/no/adapter"))


def test_a_hub_name_is_not_mistaken_for_a_missing_path():
    assert ZooSpec(base="stable-diffusion-v1-5/stable-diffusion-v1-5").source("unet") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "unet",
    )


def test_load_from_checkpoint_rebuilds_the_module_and_missing_trainable_keys_are_an_error(tiny_zoo, tmp_path):
    from idforge.models.losses import IdentityLossConfig

    module = _module(
        tiny_zoo,
        identity_loss=IdentityLossConfig(face_window="auto"),
        param_groups=[ParamGroup(name="all", match=["*"], lr=1e-3)],
        lr_schedule=LRSchedule(warmup_steps=2),
        joint_drop_prob=0.1,
    )
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(1), batch_size=None))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = IdentityDiffusionModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.identity_loss.config.face_window == "auto" and loaded.joint_drop_prob == 0.1
    assert loaded.lr_schedule.warmup_steps == 2 and loaded.param_groups_config[0].lr == 1e-3
    for k, v in module.model.trainable_state_dict().items():
        assert torch.equal(v, loaded.model.trainable_state_dict()[k]), k

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    dropped = next(k for k in ckpt["state_dict"] if k.startswith("model.adapter."))
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(KeyError, match="lacks 1 trainable tensors"):
        IdentityDiffusionModule.load_from_checkpoint(tmp_path / "partial.ckpt", map_location="cpu")
    resumed = _module(tiny_zoo)
    with pytest.raises(KeyError, match="lacks 1 trainable tensors"):
        _trainer(tmp_path, max_steps=2).fit(
            resumed,
            train_dataloaders=DataLoader(_batches(1), batch_size=None),
            ckpt_path=tmp_path / "partial.ckpt",
        )
