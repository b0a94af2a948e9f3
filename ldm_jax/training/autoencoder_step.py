"""The autoencoder (first-stage) iteration of the LDM/taming recipe, as an `update_fn` of the one train step
builder (`ldm_jax.training.loop.make_train_step(update_fn=make_update(model, loss), frozen=lpips_params)`).

State: the shared `TrainState` with params {"generator": {"autoencoder": the autoencoder's params,
"logvar": the KL nll log-variance (float32 scalar; trained only with LossConfig.learn_logvar)},
"discriminator": the PatchGAN's params}, model_state {"discriminator": its non-param collections (BatchNorm
statistics; {} with ActNorm)} and an `optim.partitioned` optimiser over "generator" and "discriminator"
(`init_variables` makes the first two).

One iteration (one train step) is a generator update of the autoencoder, then a discriminator update on
reconstructions by the *updated* autoencoder, as PyTorch Lightning alternates the two optimisers of the
reference (each half runs the autoencoder forward). Both halves read the same `state.step` (disc_start
gating); the builder advances it once afterwards. The discriminator runs in training mode in both halves, so
its BatchNorm statistics move in both, as in the reference. With `disc_factor == 0` the discriminator half is
skipped (it would only ever see a zero loss): its params and optimiser state stay as initialised.

Batches are {"image": (B, H, W, C) float32 in [-1, 1]} plus "cond" (B, H, W, C_c) when the discriminator is
conditional. Randomness: the builder's step key fold_in(key, step), then fold_in(., 0) for the generator half
(the KL posterior sample, dropout) and fold_in(., 1) for the discriminator half.

Metrics: loss (the generator's total loss), nll_loss, rec_loss, p_loss, kl_loss + logvar or quant_loss,
d_weight, disc_factor, g_loss, ae_grad_norm and, with the GAN, disc_loss, logits_real, logits_fake,
disc_grad_norm. NaN/Inf is never checked inside the step: `loop.check_finite` does it on the host.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ldm_jax.losses.autoencoder_loss import AutoencoderLoss
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel, decoder_last_layer_path, init_autoencoder
from ldm_jax.training.loop import UpdateFn
from ldm_jax.training.state import TrainState


def loss_kind(model: nn.Module) -> str:
    """"kl" for AutoencoderKL, "vq" for VQModel; TypeError otherwise."""
    if isinstance(model, AutoencoderKL):
        return "kl"
    if isinstance(model, VQModel):
        return "vq"
    raise TypeError(f"autoencoder training needs an AutoencoderKL or VQModel, got {type(model).__name__}")


def reconstruct(model: nn.Module, ae_params: Any, images: jax.Array, key: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """(reconstructions (B, H, W, C) float32, regulariser scalar).

    With `key` (training): KL decodes a posterior sample (fold_in(key, 0)), regulariser sum(KL) / B; dropout
    (config.dropout > 0) draws from fold_in(key, 1). Without (evaluation): the posterior mode, no dropout.
    VQ: the codebook loss as regulariser, `key` only for dropout.
    """
    deterministic = key is None or model.config.dropout == 0
    rngs = None if deterministic else {"dropout": jax.random.fold_in(key, 1)}
    variables = {"params": ae_params}
    if loss_kind(model) == "kl":
        sample = key is not None
        recon, posterior = model.apply(variables, images, key=jax.random.fold_in(key, 0) if sample else None,
                                       sample_posterior=sample, deterministic=deterministic, rngs=rngs)
        kl = posterior.kl()
        return recon, jnp.sum(kl) / kl.shape[0]
    recon, codebook_loss, _ = model.apply(variables, images, deterministic=deterministic, rngs=rngs)
    return recon, jnp.mean(codebook_loss)


def init_variables(model: nn.Module, loss: AutoencoderLoss, key: jax.Array, *, resolution: int
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, model_state) of a fresh stage (traceable; for `state.init_train_state(with_model_state=True)`).

    The autoencoder from fold_in(key, 0), the discriminator from fold_in(key, 1) on zeros of
    (1, resolution, resolution, disc_in_channels) (its BatchNorm statistics start at 0 / 1; a data-dependent
    ActNorm init is not done, so `loss.config.use_actnorm` must be False).
    """
    if loss.kind != loss_kind(model):
        raise ValueError(f"AutoencoderLoss(kind={loss.kind!r}) does not fit a {type(model).__name__}")
    if loss.config.use_actnorm:
        raise ValueError("loss.use_actnorm=True needs a data-dependent discriminator init, which autoencoder "
                         "training does not do; the LDM autoencoder configs use BatchNorm (use_actnorm=False)")
    disc_input = jnp.zeros((1, resolution, resolution, loss.config.disc_in_channels), jnp.float32)
    disc_params, disc_state = loss.init_discriminator(jax.random.fold_in(key, 1), disc_input)
    params = {"generator": {"autoencoder": init_autoencoder(model, jax.random.fold_in(key, 0))["params"],
                            "logvar": loss.init_logvar()},
              "discriminator": disc_params}
    return params, {"discriminator": disc_state}


def make_update(model: nn.Module, loss: AutoencoderLoss) -> UpdateFn:
    """The iteration as `update(state, batch, step_key, lpips_params=None) -> (state, metrics)` (see the module
    docstring). lpips_params: the frozen LPIPS params (needed when perceptual_weight > 0)."""
    gan = loss.config.disc_factor > 0
    last_layer = decoder_last_layer_path()

    def update(state: TrainState, batch: Mapping[str, jax.Array], step_key: jax.Array, lpips_params: Any = None):
        if loss.config.perceptual_weight > 0 and not lpips_params:
            raise ValueError("perceptual_weight > 0 needs lpips_params (see ldm_jax.convert.lpips.load_lpips_params)")
        images, cond = _unpack(batch, loss)
        gen, disc = state.params["generator"], state.params["discriminator"]

        # 1. The generator half: the autoencoder (and logvar) on the generator loss.
        gen_key = jax.random.fold_in(step_key, 0)
        _, (ae_grads, logvar_grad), logs, disc_state = loss.generator_loss_and_grads(
            lambda ae: reconstruct(model, ae, images, gen_key), gen["autoencoder"], gen["logvar"], lpips_params,
            disc, state.model_state["discriminator"], images, state.step, cond=cond, last_layer=last_layer)
        if not loss.config.learn_logvar:
            logvar_grad = jnp.zeros_like(gen["logvar"])  # Adam moves nothing with a zero gradient
        grads = {"autoencoder": ae_grads, "logvar": logvar_grad}
        state = state.update_params({"generator": grads}).replace(model_state={"discriminator": disc_state})
        metrics = {name: value for name, value in logs.items() if name not in ("total_loss", "finite")}
        metrics.update(loss=logs["total_loss"], ae_grad_norm=optax.tree.norm(grads))
        if not gan:
            return state, metrics

        # 2. The discriminator half, on reconstructions by the updated autoencoder.
        recon, _ = reconstruct(model, state.params["generator"]["autoencoder"], images,
                               jax.random.fold_in(step_key, 1))
        grad_fn = jax.value_and_grad(loss.discriminator_loss, has_aux=True)
        (_, (disc_logs, disc_state)), disc_grads = grad_fn(disc, disc_state, images, recon, state.step, cond=cond)
        state = state.update_params({"discriminator": disc_grads}).replace(model_state={"discriminator": disc_state})
        metrics.update(disc_logs, disc_grad_norm=optax.tree.norm(disc_grads))
        return state, metrics

    return update


def _unpack(batch: Mapping[str, jax.Array], loss: AutoencoderLoss) -> tuple[jax.Array, jax.Array | None]:
    if not isinstance(batch, Mapping) or "image" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"autoencoder training: the batch must be a mapping with an 'image' entry, got {keys}")
    cond = batch.get("cond")
    if loss.config.disc_conditional and cond is None:
        raise ValueError("autoencoder training: disc_conditional=True needs a 'cond' entry in the batch")
    return batch["image"], cond
