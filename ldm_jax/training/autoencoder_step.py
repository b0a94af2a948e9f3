"""Autoencoder (first-stage) training: the generator and discriminator steps of the LDM/taming recipe.

One training iteration (`train_step`) is a generator update of the autoencoder (Adam, b1 0.5, b2 0.9)
followed by a discriminator update (its own Adam), as PyTorch Lightning alternates the two optimisers of
the reference; each half recomputes the reconstructions from the current autoencoder params. `step` counts
iterations: both halves read it (disc_start gating) and only `train_step` increments it. The discriminator
runs in training mode in both halves, so its BatchNorm statistics move in both, as in the reference.

Batches are {"image": (B, H, W, C) float32 in [-1, 1]} plus "cond" (B, H, W, C_c) when the discriminator
is conditional. `key` is the run's base key; step k uses fold_in(fold_in(key, k), 0) for the generator
half (the KL posterior sample, dropout) and ... 1) for the discriminator half, so a re-run reproduces.

All step functions are pure and jit-able (`jax.jit(train_step, donate_argnums=0)`). Non-finite values:
checked eagerly (ValueError) when the steps run un-jitted; under jit every metrics dict carries `finite`,
which the caller checks on the host with `check_finite(metrics, step)`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ldm_jax.losses.autoencoder_loss import AutoencoderLoss
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel, decoder_last_layer_path


class AutoencoderTrainState(struct.PyTreeNode):
    """step: int32 scalar (iterations done); ae_params: the autoencoder's params (no "params" level);
    logvar: the KL nll log-variance (float32 scalar; trained only with LossConfig.learn_logvar);
    lpips_params: frozen LPIPS params (None when perceptual_weight == 0); disc_params / disc_state: the
    discriminator's params and non-param collections; ae_opt_state over {"ae", "logvar"}, disc_opt_state.
    `model`, `loss` and the two optimisers are static."""

    step: jax.Array
    ae_params: Any
    logvar: jax.Array
    lpips_params: Any
    disc_params: Any
    disc_state: Any
    ae_opt_state: optax.OptState
    disc_opt_state: optax.OptState
    model: nn.Module = struct.field(pytree_node=False)
    loss: AutoencoderLoss = struct.field(pytree_node=False)
    ae_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    disc_tx: optax.GradientTransformation = struct.field(pytree_node=False)


def make_optimizer(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Adam with the reference's betas (0.5, 0.9), eps 1e-8, no weight decay."""
    return optax.adam(learning_rate, b1=0.5, b2=0.9, eps=1e-8)


def loss_kind(model: nn.Module) -> str:
    """"kl" for AutoencoderKL, "vq" for VQModel; TypeError otherwise."""
    if isinstance(model, AutoencoderKL):
        return "kl"
    if isinstance(model, VQModel):
        return "vq"
    raise TypeError(f"autoencoder training needs an AutoencoderKL or VQModel, got {type(model).__name__}")


def reconstruct(model: nn.Module, ae_params: Any, images: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(reconstructions (B, H, W, C) float32, regulariser scalar) in training mode.

    KL: decoded from a posterior sample (fold_in(key, 0)); regulariser sum(KL) / B.
    VQ: the codebook loss. Dropout (config.dropout > 0) draws from fold_in(key, 1).
    """
    deterministic = model.config.dropout == 0
    rngs = None if deterministic else {"dropout": jax.random.fold_in(key, 1)}
    variables = {"params": ae_params}
    if loss_kind(model) == "kl":
        recon, posterior = model.apply(variables, images, key=jax.random.fold_in(key, 0), sample_posterior=True,
                                       deterministic=deterministic, rngs=rngs)
        kl = posterior.kl()
        return recon, jnp.sum(kl) / kl.shape[0]
    recon, codebook_loss, _ = model.apply(variables, images, deterministic=deterministic, rngs=rngs)
    return recon, jnp.mean(codebook_loss)


def init_train_state(
    model: nn.Module,
    loss: AutoencoderLoss,
    *,
    ae_params: Any,
    lpips_params: Any,
    images: jax.Array,
    key: jax.Array,
    learning_rate: float | optax.Schedule,
    disc_learning_rate: float | optax.Schedule | None = None,
    cond: jax.Array | None = None,
) -> AutoencoderTrainState:
    """A fresh train state at step 0.

    ae_params: the autoencoder's params (with or without the "params" level). images: a first batch
    (B, H, W, C); the discriminator is initialised on its reconstructions (taming's ActNorm initialises on
    the first discriminator input, the first reconstructions). disc_learning_rate defaults to learning_rate.
    """
    if loss.kind != loss_kind(model):
        raise ValueError(f"AutoencoderLoss(kind={loss.kind!r}) does not fit a {type(model).__name__}")
    if loss.config.perceptual_weight > 0 and not lpips_params:
        raise ValueError("perceptual_weight > 0 needs lpips_params (see ldm_jax.convert.lpips.load_lpips_params)")
    ae_params = ae_params.get("params", ae_params) if isinstance(ae_params, Mapping) else ae_params
    recon_key, disc_key = jax.random.split(key)
    disc_input = images
    if loss.config.use_actnorm:  # data-dependent init: only ActNorm's params depend on the init batch
        disc_input, _ = jax.jit(reconstruct, static_argnums=0)(model, ae_params, images, recon_key)
    disc_params, disc_state = jax.jit(loss.init_discriminator)(disc_key, disc_input, cond)
    logvar = loss.init_logvar()
    ae_tx = make_optimizer(learning_rate)
    disc_tx = make_optimizer(learning_rate if disc_learning_rate is None else disc_learning_rate)
    return AutoencoderTrainState(
        step=jnp.zeros((), jnp.int32),
        ae_params=ae_params,
        logvar=logvar,
        lpips_params=lpips_params,
        disc_params=disc_params,
        disc_state=disc_state,
        ae_opt_state=ae_tx.init({"ae": ae_params, "logvar": logvar}),
        disc_opt_state=disc_tx.init(disc_params),
        model=model,
        loss=loss,
        ae_tx=ae_tx,
        disc_tx=disc_tx,
    )


def generator_step(state: AutoencoderTrainState, batch: Mapping[str, jax.Array], key: jax.Array
                   ) -> tuple[AutoencoderTrainState, dict[str, jax.Array]]:
    """One Adam update of the autoencoder (and logvar when learned) on the generator loss.

    Returns the new state (step unchanged) and metrics: the loss logs (total_loss, nll_loss, rec_loss,
    p_loss, kl_loss/logvar or quant_loss, d_weight, disc_factor, g_loss), ae_grad_norm, ae_param_norm, finite.
    """
    images, cond = _unpack(batch, state.loss)
    step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), 0)

    def forward(ae_params):
        return reconstruct(state.model, ae_params, images, step_key)

    _, (ae_grads, logvar_grad), logs, disc_state = state.loss.generator_loss_and_grads(
        forward, state.ae_params, state.logvar, state.lpips_params, state.disc_params, state.disc_state, images,
        state.step, cond=cond, last_layer=decoder_last_layer_path())
    if not state.loss.config.learn_logvar:
        logvar_grad = jnp.zeros_like(state.logvar)  # Adam moves nothing with a zero gradient
    trainable = {"ae": state.ae_params, "logvar": state.logvar}
    grads = {"ae": ae_grads, "logvar": logvar_grad}
    updates, ae_opt_state = state.ae_tx.update(grads, state.ae_opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(logs)
    metrics["ae_grad_norm"] = optax.tree.norm(grads)
    metrics["ae_param_norm"] = optax.tree.norm(trainable["ae"])
    metrics["finite"] = logs["finite"] & jnp.isfinite(metrics["ae_param_norm"])
    new_state = state.replace(ae_params=trainable["ae"], logvar=trainable["logvar"], disc_state=disc_state,
                              ae_opt_state=ae_opt_state)
    return new_state, metrics


def discriminator_step(state: AutoencoderTrainState, batch: Mapping[str, jax.Array], key: jax.Array
                       ) -> tuple[AutoencoderTrainState, dict[str, jax.Array]]:
    """One Adam update of the discriminator on the current reconstructions (step unchanged).

    Metrics: disc_loss, logits_real, logits_fake, disc_grad_norm, disc_param_norm, finite.
    """
    images, cond = _unpack(batch, state.loss)
    step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), 1)
    recon, _ = reconstruct(state.model, state.ae_params, images, step_key)
    grad_fn = jax.value_and_grad(state.loss.discriminator_loss, has_aux=True)
    (d_loss, (logs, disc_state)), grads = grad_fn(state.disc_params, state.disc_state, images, recon, state.step,
                                                  cond=cond)
    updates, disc_opt_state = state.disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, updates)
    metrics = dict(logs)
    metrics["disc_grad_norm"] = optax.tree.norm(grads)
    metrics["disc_param_norm"] = optax.tree.norm(disc_params)
    metrics["finite"] = jnp.isfinite(d_loss) & jnp.isfinite(metrics["disc_grad_norm"]) & jnp.isfinite(
        metrics["disc_param_norm"])
    new_state = state.replace(disc_params=disc_params, disc_state=disc_state, disc_opt_state=disc_opt_state)
    return new_state, metrics


def train_step(state: AutoencoderTrainState, batch: Mapping[str, jax.Array], key: jax.Array
               ) -> tuple[AutoencoderTrainState, dict[str, jax.Array]]:
    """generator_step, then discriminator_step, then step + 1. Metrics: both halves' (disjoint names) and
    `finite` for the two together."""
    state, gen_metrics = generator_step(state, batch, key)
    state, disc_metrics = discriminator_step(state, batch, key)
    metrics = {**gen_metrics, **disc_metrics, "finite": gen_metrics["finite"] & disc_metrics["finite"]}
    return state.replace(step=state.step + 1), metrics


def check_finite(metrics: Mapping[str, Any], step: Any = None) -> None:
    """Host-side check of a step's metrics: FloatingPointError naming every non-finite metric."""
    bad = sorted(name for name, value in metrics.items() if name != "finite" and not np.all(np.isfinite(value)))
    if bad or ("finite" in metrics and not bool(metrics["finite"])):
        where = f" at step {int(step)}" if step is not None else ""
        detail = ", ".join(bad) if bad else "gradients or parameters (every logged loss is finite)"
        raise FloatingPointError(f"autoencoder training produced NaN/inf{where}: {detail}")


def _unpack(batch: Mapping[str, jax.Array], loss: AutoencoderLoss) -> tuple[jax.Array, jax.Array | None]:
    if not isinstance(batch, Mapping) or "image" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"autoencoder training: the batch must be a mapping with an 'image' entry, got {keys}")
    cond = batch.get("cond")
    if loss.config.disc_conditional and cond is None:
        raise ValueError("autoencoder training: disc_conditional=True needs a 'cond' entry in the batch")
    return batch["image"], cond
