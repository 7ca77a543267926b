"""LightningModule for the identity-conditioned generator (Diff-ID training, SPEC.md sec. 1-2).

The module holds no architecture: the generator is built by :mod:`idforge.models.generator` from a
config, the losses come from :mod:`idforge.models.losses`, and the optimiser is passed in partially
configured (LightningCLI ``optimizer`` callable). One training step:

    z0 = E(x);  t ~ U{0..T-1};  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    c  = Adapter(ArcFace(I_ref), CLIP_image(I_ref), CLIP_text(A))
    L  = ||target - UNet(z_t, t, c)||^2 + lambda_id * mean(W_t * L_id)      (Diff-ID eq. 5-6)

Identity and text inputs can be dropped with set probabilities (zeroed embeddings / empty caption)
so the model also learns the unconditional branch that classifier-free guidance needs.
Checkpoints hold only the trainable parameters (adapter, and the UNet when it trains).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from idforge.models.generator import GeneratorConfig, IdentityGenerator
from idforge.models.losses import IdentityLoss, IdentityLossConfig, diffusion_target, predict_x0
from lightning.pytorch.cli import OptimizerCallable

log = logging.getLogger(__name__)


def _default_optimizer(params):
    return torch.optim.Adam(params, lr=1e-5)


class IdentityDiffusionModule(L.LightningModule):
    def __init__(
        self,
        generator: GeneratorConfig,
        identity_loss: IdentityLossConfig | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        id_drop_prob: float = 0.0,
        text_drop_prob: float = 0.0,
        val_seed: int = 1234,
    ):
        """
        Args:
            generator: component sources, adapter options and trainable parts.
            identity_loss: the time-weighted ArcFace loss (Diff-ID sec. 3.3); None disables it.
            optimizer: partially configured optimiser (Diff-ID: Adam, lr 1e-5).
            id_drop_prob: probability of zeroing a sample's identity embeddings.
            text_drop_prob: probability of replacing a sample's caption with the empty prompt.
            val_seed: seed of the fixed noise/timesteps used for the validation loss.
        """
        super().__init__()
        for name, p in (("id_drop_prob", id_drop_prob), ("text_drop_prob", text_drop_prob)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.save_hyperparameters(
            {
                "generator": asdict(generator) if not isinstance(generator, dict) else generator,
                "identity_loss": asdict(identity_loss) if identity_loss else None,
                "id_drop_prob": id_drop_prob,
                "text_drop_prob": text_drop_prob,
            }
        )
        self.generator_config = generator
        self.model = IdentityGenerator.from_config(generator)
        if identity_loss is not None:  # pixels per latent come from the codec actually loaded
            identity_loss.latent_scale = self.model.codec.downsample
        self.identity_loss = IdentityLoss(self.model.face_encoder, identity_loss) if identity_loss else None
        self.optimizer_factory = optimizer
        self.id_drop_prob = id_drop_prob
        self.text_drop_prob = text_drop_prob
        self.val_seed = val_seed
        self.strict_loading = False  # checkpoints hold the trainable parameters only

    # ------------------------------------------------------------------ step
    def _conditioning(self, batch: dict, drop: bool):
        """(conditioning, id_kept): id_kept is the (B,) bool mask of samples that kept their identity
        input under identity dropout (None when nothing was dropped)."""
        model = self.model
        captions = list(batch["caption"])
        reference = batch.get("reference", batch["image"])
        ref_landmarks = batch.get("reference_landmarks", batch.get("landmarks"))
        ref_embeds = batch.get("reference_embedding")
        if ref_embeds is None and "reference" not in batch:
            ref_embeds = batch.get("embedding")  # the reference is the target photo itself
        e_arc, e_clip = model.identity_embeds(reference, ref_landmarks, ref_embeds)
        if drop and self.text_drop_prob > 0:
            keep = torch.rand(len(captions)) >= self.text_drop_prob
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
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
        id_kept = None
        if drop and self.id_drop_prob > 0:
            id_kept = torch.rand(e_arc.shape[0], device=e_arc.device) >= self.id_drop_prob
            keep = id_kept.to(e_arc.dtype)
            e_arc = e_arc * keep[:, None]
            e_clip = e_clip * keep.view(-1, *([1] * (e_clip.dim() - 1))).to(e_clip.dtype)
        return model.condition(e_arc, e_clip, text), id_kept

    def _losses(self, batch: dict, generator: torch.Generator | None = None, drop: bool = True) -> dict:
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
        cond, id_kept = self._conditioning(batch, drop)
        pred = model.predict(noisy, t, cond)
        target = diffusion_target(noise, latents, t, alphas, model.prediction_type)
        denoise = F.mse_loss(pred.float(), target.float())
        out = {"denoise": denoise, "loss": denoise}
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
                boxes=batch.get("box"),
                generator=generator,
                active=id_kept,
            )
            out["loss"] = denoise + idl.loss
            if idl.num_used > 0:  # the threshold / fraction knobs can leave a batch without identity terms
                out.update(identity=idl.id_loss, w_t=idl.weight_mean, id_cos=idl.id_cosine)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._losses(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log("train/denoise", out["denoise"], batch_size=bs)
        for key in ("identity", "w_t", "id_cos"):
            if key in out:
                self.log(f"train/{key}", out[key], batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.val_seed + batch_idx)
        out = self._losses(batch, generator=g, drop=False)
        bs = batch["image"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/denoise", out["denoise"], batch_size=bs, sync_dist=True)

    # ------------------------------------------------------------------ optimiser / checkpoints
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: check generator.train_unet and the adapter config")
        return self.optimizer_factory(params)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{k}" for k in self.model.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
