"""LightningModule for the identity-conditioned generator (Diff-ID training, SPEC.md sec. 1-2).

The module holds no architecture: the generator is built by :mod:`idforge.models.generator` from a
config, the losses come from :mod:`idforge.models.losses`, the optimiser is passed in partially
configured (LightningCLI ``optimizer`` callable) and its groups and schedule come from
:mod:`idforge.train.optim`. One training step:

    z0 = E(x);  t ~ U{0..T-1};  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    c  = Adapter(ArcFace(I_ref), CLIP_image(I_ref), CLIP_text(A))
    L  = ||target - UNet(z_t, t, c)||^2 + lambda_id * mean(W_t * L_id)      (Diff-ID eq. 5-6)

Randomness: noise, timesteps and conditioning dropout come from a generator seeded with
``seed + global_rank`` (and the global step on resume), so DDP ranks draw different (t, noise)
pairs even when ``seed_everything`` gave every rank the same global seed.

Conditioning dropout for classifier-free guidance: each sample independently falls in one of
three disjoint cases, identity only dropped (``id_drop_prob``), text only (``text_drop_prob``) or
both (``joint_drop_prob``: the null branch that guidance subtracts; with independent draws it
would be seen only p_id x p_text of the time).

Faults: a step whose loss or gradient is not finite is skipped (gradients cleared before the
optimiser sees them; identical on every DDP rank), counted in ``train/skipped_steps``, and
``max_nonfinite_steps`` such steps in a row abort the run with a message.

ReferenceNet generators (``generator.conditioning: referencenet | both``, FlashFace sec. 3.2) read
``data.mode: group`` batches: N references per target (N random in 1..4, padded by the reader's
collate with ``ref_mask``), encoded by the ReferenceNet and attended to by the main UNet. The
identity-drop cases drop the reference features and the face mask too (FlashFace: p = 0.1 each for
references and text, independent: id_drop 0.09 + text_drop 0.09 + joint 0.01 give the same cases);
in ``both`` the adapter sees the first reference photo.

Checkpoints hold only the trainable parameters (adapter, and the UNet when it trains); hyper-
parameters are plain dicts, so ``load_from_checkpoint`` rebuilds the module; a checkpoint that lacks
a trainable tensor is an error, never a silently random weight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.losses import IdentityLoss, IdentityLossConfig, diffusion_target, predict_x0
from idforge.train.optim import LRSchedule, ParamGroup, build_param_groups
from lightning.pytorch.cli import OptimizerCallable

log = logging.getLogger(__name__)

SUPPORTED_MODES = ("single",)
"""Data modes an adapter-only generator consumes; a generator with a ReferenceNet consumes ``group``."""
REFERENCE_MODES = ("group",)
GROUP_KEYS = ("refs", "ref_mask", "num_refs")


def _default_optimizer(params):
    return torch.optim.Adam(params, lr=1e-5)


def _as(cls, value):
    """A dataclass config from itself or from its dict form (as saved in checkpoint hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value


def _asdict(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class IdentityDiffusionModule(L.LightningModule):
    def __init__(
        self,
        generator: GeneratorConfig,
        identity_loss: IdentityLossConfig | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        param_groups: list[ParamGroup] | None = None,
        lr_schedule: LRSchedule | None = None,
        id_drop_prob: float = 0.0,
        text_drop_prob: float = 0.0,
        joint_drop_prob: float = 0.0,
        seed: int | None = None,
        val_seed: int = 1234,
        max_nonfinite_steps: int = 10,
    ):
        """
        Args:
            generator: component sources, adapter options and trainable parts.
            identity_loss: the time-weighted ArcFace loss (Diff-ID sec. 3.3); None disables it.
            optimizer: partially configured optimiser (Diff-ID: Adam, lr 1e-5).
            param_groups: optimiser groups with their own rates (None: one group at the optimiser's lr).
            lr_schedule: warm-up and decay (None: constant, as the paper).
            id_drop_prob: probability that a sample's identity input alone is zeroed.
            text_drop_prob: probability that a sample's caption alone becomes the empty prompt.
            joint_drop_prob: probability that both are dropped (the guidance null branch).
            seed: base of the per-rank noise/timestep/dropout seeds (None: the ``seed_everything``
                seed, else 0).
            val_seed: seed of the fixed noise/timesteps used for the validation loss.
            max_nonfinite_steps: abort after this many consecutive steps with a non-finite loss or
                gradient (each is skipped).
        """
        super().__init__()
        generator = _as(GeneratorConfig, generator)
        identity_loss = _as(IdentityLossConfig, identity_loss) if identity_loss is not None else None
        param_groups = [_as(ParamGroup, g) for g in param_groups] if param_groups else None
        lr_schedule = _as(LRSchedule, lr_schedule) if lr_schedule is not None else LRSchedule()
        probs = {
            "id_drop_prob": id_drop_prob,
            "text_drop_prob": text_drop_prob,
            "joint_drop_prob": joint_drop_prob,
        }
        for name, p in probs.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{name}: must be in [0, 1), got {p}")
        if sum(probs.values()) >= 1.0:
            raise ValueError(
                f"model.id_drop_prob + text_drop_prob + joint_drop_prob must be < 1 (disjoint cases), got "
                f"{sum(probs.values())}"
            )
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps: must be >= 1, got {max_nonfinite_steps}")
        names = [g.name for g in param_groups or []]
        if len(set(names)) != len(names):
            raise ValueError(f"model.param_groups: group names must be unique, got {names}")
        generator.validate()  # paths and options: fail before any weights load
        self.save_hyperparameters(
            {
                "generator": _asdict(generator),
                "identity_loss": _asdict(identity_loss),
                "param_groups": [_asdict(g) for g in param_groups] if param_groups else None,
                "lr_schedule": _asdict(lr_schedule),
                "id_drop_prob": id_drop_prob,
                "text_drop_prob": text_drop_prob,
                "joint_drop_prob": joint_drop_prob,
                "seed": seed,
                "val_seed": val_seed,
                "max_nonfinite_steps": max_nonfinite_steps,
            }
        )
        self.generator_config = generator
        self.model = IdentityGenerator.from_config(generator)
        self.identity_loss = None
        if identity_loss is not None:  # pixels per latent come from the codec actually loaded
            cfg = dataclasses.replace(identity_loss, latent_scale=self.model.codec.downsample)
            self.identity_loss = IdentityLoss(self.model.face_encoder, cfg)
        self.optimizer_factory = optimizer
        self.param_groups_config = param_groups
        self.lr_schedule = lr_schedule
        self.id_drop_prob, self.text_drop_prob, self.joint_drop_prob = (
            id_drop_prob,
            text_drop_prob,
            joint_drop_prob,
        )
        self.seed = seed
        self.val_seed = val_seed
        self.max_nonfinite_steps = max_nonfinite_steps
        self.strict_loading = (
            False  # frozen weights are not in checkpoints; on_load_checkpoint checks the rest
        )
        self._rng: torch.Generator | None = None
        self._nonfinite_loss = False
        self._nonfinite_run = 0
        self._nonfinite_total = 0

    # ------------------------------------------------------------------ randomness
    def base_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", "0"))  # set by seed_everything / LightningCLI

    def on_train_start(self) -> None:
        rank, world = self.global_rank, max(1, self.trainer.world_size)
        seed = self.base_seed() + rank + world * self.global_step  # fresh streams after a resume
        self._rng = torch.Generator(device=self.device).manual_seed(seed)
        restored = getattr(self, "_restored_rng_state", None)
        if restored is not None:  # exact resume: continue the stream saved in the checkpoint
            self._rng.set_state(restored.to(self._rng.get_state().device))
            self._restored_rng_state = None
            log.info("rank %d: noise/timestep/dropout stream restored from the checkpoint", rank)
        else:
            log.info("rank %d: noise/timestep/dropout seed %d", rank, seed)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        mode = getattr(datamodule, "mode", None)
        if self.model.reference_net is not None:
            if mode is not None and mode not in REFERENCE_MODES:
                raise ValueError(
                    f"data.mode: {mode!r} gives no reference groups, but generator.conditioning "
                    f"{self.generator_config.conditioning!r} needs them; use data.mode: group"
                )
        elif mode is not None and mode not in SUPPORTED_MODES:
            raise ValueError(
                f"data.mode: {mode!r} is not consumed by IdentityDiffusionModule (supports "
                f"{SUPPORTED_MODES}); use data.mode: single until a ReferenceNet model consumes groups"
            )

    # ------------------------------------------------------------------ step
    def _drop_masks(self, b: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop_id, drop_text) (B,) bool: disjoint cases id only / text only / both (see module doc)."""
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(b, generator=generator, device=device).cpu()
        both = u < self.joint_drop_prob
        id_only = (u >= self.joint_drop_prob) & (u < self.joint_drop_prob + self.id_drop_prob)
        lo = self.joint_drop_prob + self.id_drop_prob
        text_only = (u >= lo) & (u < lo + self.text_drop_prob)
        return both | id_only, both | text_only

    def _conditioning(self, batch: dict, drop: bool, generator: torch.Generator | None = None):
        """(conditioning, id_kept): id_kept is the (B,) bool mask of samples that kept their identity
        input under identity dropout (None when nothing was dropped)."""
        model = self.model
        captions = list(batch["caption"])
        if "refs" in batch:  # group batch: the adapter (``both``) sees the first reference photo
            reference, ref_landmarks = batch["refs"][:, 0], batch["ref_landmarks"][:, 0]
            ref_embeds = batch["ref_embeddings"][:, 0] if "ref_embeddings" in batch else None
        else:
            reference = batch.get("reference", batch["image"])
            ref_landmarks = batch.get("reference_landmarks", batch.get("landmarks"))
            ref_embeds = batch.get("reference_embedding")
            if ref_embeds is None and "reference" not in batch:
                ref_embeds = batch.get("embedding")  # the reference is the target photo itself
        e_arc = e_clip = None
        if model.adapter is not None:
            e_arc, e_clip = model.identity_embeds(reference, ref_landmarks, ref_embeds)
        id_kept = None
        if drop and (self.id_drop_prob or self.text_drop_prob or self.joint_drop_prob):
            drop_id, drop_text = self._drop_masks(len(captions), generator)
            captions = [c if not d else "" for c, d in zip(captions, drop_text.tolist())]
            if drop_id.any() and e_arc is None:
                id_kept = (~drop_id).to(self.device)
            elif drop_id.any():
                id_kept = (~drop_id).to(e_arc.device)
                keep = id_kept.to(e_arc.dtype)
                e_arc = e_arc * keep[:, None]
                e_clip = e_clip * keep.view(-1, *([1] * (e_clip.dim() - 1))).to(e_clip.dtype)
        if (
            "text_states" in batch
        ):  # cached by `idforge cache`; dropped captions get the empty prompt's states
            text = batch["text_states"].to(self.device)
            dropped = [i for i, c in enumerate(captions) if c == "" and batch["caption"][i] != ""]
            if dropped:
                text = text.clone()
                text[dropped] = model.encode_text([""]).to(text.dtype)
        else:
            text = model.encode_text(captions)
        return model.condition(e_arc, e_clip, text), id_kept

    def _check_batch(self, batch: dict) -> None:
        group = [k for k in GROUP_KEYS if k in batch]
        if self.model.reference_net is not None:
            if "refs" not in batch or "ref_mask" not in batch:
                raise ValueError(
                    f"batch has no 'refs'/'ref_mask': generator.conditioning "
                    f"{self.generator_config.conditioning!r} trains on reference groups; use data.mode: group"
                )
            return
        if group:
            raise ValueError(
                f"batch holds {group}: data.mode 'group' batches are not consumed by "
                "IdentityDiffusionModule; use data.mode: single until a ReferenceNet model consumes them"
            )

    def _reference_inputs(
        self,
        batch: dict,
        noisy: torch.Tensor,
        latents: torch.Tensor,
        id_kept: torch.Tensor | None,
        generator: torch.Generator | None,
    ):
        """(UNet input with the face-mask channels, ReferenceNet features) of a group batch; samples
        whose identity input was dropped lose their references (K/V = y_g) and their face mask."""
        model = self.model
        valid = batch["ref_mask"].to(self.device)  # (B, N): padding slots of the collate are False
        features = model.encode_references(batch["refs"], valid, generator=generator)
        dropped = None
        if id_kept is not None:
            dropped = ~id_kept.to(self.device)
            features = features.drop(dropped)
        noisy_in = model.unet_input(
            noisy, batch.get("box"), tuple(batch["image"].shape[-2:]), latents, dropped
        )
        return noisy_in, features

    def _losses(self, batch: dict, generator: torch.Generator | None = None, drop: bool = True) -> dict:
        self._check_batch(batch)
        model = self.model
        images = batch["image"]
        if "latent" in batch:  # cached by `idforge cache` (the VAE posterior mean)
            latents = batch["latent"].to(images.dtype)
        else:
            with torch.no_grad():
                latents = model.codec.encode(images, generator=generator)
        sched = model.scheduler
        T = sched.config.num_train_timesteps
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, T, (b,), generator=generator, device=latents.device)
        alphas = sched.alphas_cumprod.to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        cond, id_kept = self._conditioning(batch, drop, generator)
        reference = None
        if model.reference_net is not None:
            noisy_in, reference = self._reference_inputs(batch, noisy, latents, id_kept, generator)
        else:
            noisy_in = noisy
        pred = model.predict(noisy_in, t, cond, reference)
        target = diffusion_target(noise, latents, t, alphas, model.prediction_type)
        denoise = F.mse_loss(pred.float(), target.float())
        out = {"denoise": denoise, "loss": denoise, "timesteps": t}
        if self.identity_loss is not None:
            x0_hat = predict_x0(pred, noisy, t, alphas, model.prediction_type)
            ref = batch.get("embedding")
            if ref is None:
                ref = model.face_embeds(images, batch["landmarks"])
            idl = self.identity_loss(
                x0_hat=x0_hat,
                decode=model.codec.decode,
                timesteps=t,
                landmarks=batch["landmarks"].float(),
                reference_embeds=ref.float(),
                generator=generator,
                active=id_kept,
            )
            out["loss"] = denoise + idl.loss
            if idl.num_used > 0:  # the threshold / fraction knobs can leave a batch without identity terms
                out.update(identity=idl.id_loss, w_t=idl.weight_mean, id_cos=idl.id_cosine)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._rng is None:
            self.on_train_start()
        out = self._losses(batch, generator=self._rng)
        loss = out["loss"]
        self._nonfinite_loss |= not bool(torch.isfinite(loss.detach()))
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/denoise", out["denoise"], batch_size=bs)
        for key in ("identity", "w_t", "id_cos"):
            if key in out:
                self.log(f"train/{key}", out[key], batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the step when the loss or a gradient is not finite (see module docstring)."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params]
        bad_grad = bool(norms) and not bool(torch.isfinite(torch.stack(norms)).all())
        bad = self._nonfinite_loss or bad_grad
        if self._trainer is not None:  # every rank takes the same decision
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._nonfinite_loss = False
        if not bad:
            self._nonfinite_run = 0
        else:
            for p in params:
                p.grad = None  # the optimiser skips parameters without gradients: no update, no moments
            self._nonfinite_run += 1
            self._nonfinite_total += 1
            log.warning(
                "step %d: non-finite loss or gradient; step skipped (%d in a row, %d in total)",
                self.global_step,
                self._nonfinite_run,
                self._nonfinite_total,
            )
            if self._nonfinite_run >= self.max_nonfinite_steps:
                raise RuntimeError(
                    f"step {self.global_step}: {self._nonfinite_run} consecutive steps had a non-finite "
                    "loss or gradient, training is diverging; lower the learning rates, check the data "
                    "for NaN/inf (latents, embeddings), or use bf16 instead of fp16 "
                    "(model.max_nonfinite_steps sets this limit)"
                )
        self.log("train/skipped_steps", float(self._nonfinite_total), batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.val_seed + batch_idx)
        out = self._losses(batch, generator=g, drop=False)
        bs = batch["image"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/denoise", out["denoise"], batch_size=bs, sync_dist=True)

    # ------------------------------------------------------------------ optimiser / checkpoints
    def configure_optimizers(self):
        groups = build_param_groups(list(self.model.named_parameters()), self.param_groups_config)
        opt = self.optimizer_factory(groups)
        sched = self.lr_schedule
        if sched.warmup_steps == 0 and sched.decay == "constant":
            return opt
        total = sched.total_steps
        if total is None and self._trainer is not None and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        sched.factor(sched.warmup_steps, total)  # raises now, not at the first decayed step
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: sched.factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{k}" for k in self.model.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        self._save_rng_state(checkpoint)

    def _save_rng_state(self, checkpoint: dict[str, Any]) -> None:
        """This rank's noise/timestep/dropout stream, so a resumed run draws what the uninterrupted one would
        (``noise_rng``: one state per rank, gathered; rank r restores entry r)."""
        if self._rng is None:
            return
        state = self._rng.get_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            state = self.all_gather(state.to(self.device)).cpu()  # (world, n)
        else:
            state = state[None]  # (1, n)
        checkpoint["noise_rng"] = state

    def _load_rng_state(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("noise_rng")
        rank = self.global_rank if self._trainer is not None else 0
        if states is not None and rank < len(states):
            self._restored_rng_state = states[rank].cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Frozen weights come from the zoo; every trainable tensor must come from the checkpoint."""
        self._load_rng_state(checkpoint)
        if "state_dict" not in checkpoint and self._trainer is not None:
            from .strategies import engine_owns_weights

            if engine_owns_weights(self.trainer.strategy):  # DeepSpeed loads (and checks) them itself
                log.info("weights restored by %s", type(self.trainer.strategy).__name__)
                return
        state = checkpoint.setdefault("state_dict", {})
        expected = {f"model.{k}" for k in self.model.trainable_state_dict()}
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}; it was written "
                "for another generator config (adapter variant, train_unet); resume with the config it "
                "was trained with"
            )
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise KeyError(
                f"checkpoint holds {len(unknown)} tensors this module does not have, e.g. {unknown[:3]}; "
                "resume with the config it was trained with"
            )
        for k, v in self.state_dict().items():  # frozen weights: from the zoo, so loading stays strict
            state.setdefault(k, v)
