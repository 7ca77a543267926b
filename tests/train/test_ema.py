"""EMA callback: the average follows the closed form, lives in checkpoints under ``ema`` with the
generator's trainable keys, is restored on load, and validation can run with it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from idforge.train.checkpointing import AtomicCheckpointIO
from idforge.train.ema import EMA, trainable_tensors
from torch.utils.data import DataLoader


class Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
        self.seen_in_val: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        return self.frozen(self.lin(batch)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_in_val.append(self.lin.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.lin.parameters(), lr=0.1)


def test_ema_after_n_updates_equals_the_closed_form():
    torch.manual_seed(0)
    toy, d = Toy(), 0.9
    ema = EMA(decay=d, device="cpu")
    w0 = toy.lin.weight.detach().clone()
    ema._init_shadow(toy)
    ws = []
    for _ in range(5):
        with torch.no_grad():
            toy.lin.weight.add_(torch.randn_like(toy.lin.weight))
        ws.append(toy.lin.weight.detach().clone())
        ema.update(toy)
    n = len(ws)
    closed = d**n * w0 + (1 - d) * sum(d ** (n - k) * w for k, w in enumerate(ws, start=1))
    torch.testing.assert_close(ema.shadow["lin.weight"], closed, rtol=1e-6, atol=1e-6)
    assert set(ema.shadow) == {"lin.weight", "lin.bias"}  # frozen weights are not averaged
    assert ema.num_updates == 5


def _fit(tmp_path, callbacks, steps=4, ckpt_path=None, val=False):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO(adapter_safetensors=False)],
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True), *callbacks],
        limit_val_batches=1 if val else 0,
        val_check_interval=2 if val else None,
        num_sanity_val_steps=0,
    )
    model = Toy()
    data = DataLoader(torch.randn(64, 3), batch_size=4)
    trainer.fit(model, data, val_dataloaders=DataLoader(torch.randn(4, 3), batch_size=4) if val else None,
                ckpt_path=ckpt_path)  # fmt: skip
    return trainer, model


def test_ema_is_saved_under_ema_and_restored_on_resume(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.5, every_n_steps=2)
    _, model = _fit(tmp_path, [ema], steps=4)
    assert ema.num_updates == 2  # steps 2 and 4
    assert not torch.equal(ema.shadow["lin.weight"], model.lin.weight.detach())
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["ema"]) == {"lin.weight", "lin.bias"}
    torch.testing.assert_close(ckpt["ema"]["lin.weight"], ema.shadow["lin.weight"], rtol=0, atol=0)

    resumed = EMA(decay=0.5, every_n_steps=2)
    _fit(tmp_path, [resumed], steps=4, ckpt_path=tmp_path / "last.ckpt")  # nothing left to train
    assert resumed.num_updates == 2
    torch.testing.assert_close(resumed.shadow["lin.weight"], ema.shadow["lin.weight"], rtol=0, atol=0)


def test_validation_runs_with_the_average_and_training_continues_with_the_live_weights(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.9, validate_with_ema=True)
    _, model = _fit(tmp_path, [ema], steps=2, val=True)
    assert len(model.seen_in_val) == 1
    torch.testing.assert_close(model.seen_in_val[0], ema.shadow["lin.weight"], rtol=0, atol=0)
    assert not torch.equal(model.lin.weight.detach(), ema.shadow["lin.weight"])  # live weights back


def test_ema_keys_are_the_generator_trainable_state_dict(tiny_zoo):
    from tests.train.test_module_faults import _module

    module = _module(tiny_zoo)
    assert set(trainable_tensors(module)) == set(module.model.trainable_state_dict())


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="EMA.decay"):
        EMA(decay=1.0)


def test_apply_to_puts_the_average_in_the_module_for_good(tmp_path):
    ema = EMA(decay=0.5, device="cpu")
    _, model = _fit(tmp_path, [ema], steps=4)
    live = model.lin.weight.detach().clone()
    assert not torch.allclose(live, ema.shadow["lin.weight"])  # 4 SGD steps: the average lags
    ema.apply_to(model)
    torch.testing.assert_close(model.lin.weight, ema.shadow["lin.weight"])
    torch.testing.assert_close(model.lin.bias, ema.shadow["lin.bias"])
    with pytest.raises(RuntimeError, match="no average yet"):
        EMA().apply_to(Toy())
