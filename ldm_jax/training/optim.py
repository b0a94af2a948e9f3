"""The optimiser of both stages: AdamW with a linear warm-up, gradient clipping in the optax chain, the
reference's learning-rate scaling rule, and the gradient-accumulation setting; `partitioned` puts several of
them (the autoencoder stage's generator and discriminator optimisers) over the parts of one params dict.

Gradient accumulation is an explicit micro-batch `lax.scan` inside the train step
(`ldm_jax.training.loop.make_train_step`), not `optax.MultiSteps`: one train step is one optimiser
update, so `step`, the learning-rate schedule, the EMA warm-up and checkpoints all count updates, the
batch a step receives is the whole global batch of the update, and only one micro-batch's activations
are alive at a time. Clipping then acts on the averaged gradient, as in PyTorch Lightning.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The `optimizer` config section.

    learning_rate: the base rate; with `scale_lr` it is per example (see `scaled_learning_rate`).
    warmup_steps: linear warm-up from 0 to the rate over this many updates (0 = none), then constant.
    b1, b2, eps, weight_decay: AdamW's (PyTorch defaults; decoupled decay on every parameter, as torch).
    grad_clip_norm: clip the global gradient norm to this (0 = no clipping).
    accumulate_grad_batches: micro-batches per update (the step's batch is split into this many).
    """

    learning_rate: float = 1e-4
    scale_lr: bool = True
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float = 0.0
    accumulate_grad_batches: int = 1

    def __post_init__(self):
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"optimizer.accumulate_grad_batches={self.accumulate_grad_batches}, expected >= 1")
        if self.warmup_steps < 0 or self.grad_clip_norm < 0:
            raise ValueError(f"optimizer: warmup_steps={self.warmup_steps} and grad_clip_norm={self.grad_clip_norm}"
                             " must be >= 0")
        if not self.learning_rate >= 0 or not self.weight_decay >= 0 or not self.eps > 0:
            raise ValueError(f"optimizer: learning_rate={self.learning_rate} and weight_decay={self.weight_decay} "
                             f"must be >= 0 and eps={self.eps} > 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"optimizer: b1={self.b1} and b2={self.b2} must be in [0, 1)")


def scaled_learning_rate(base_lr: float, *, batch_size: int, num_devices: int, accumulate_grad_batches: int) -> float:
    """The reference's `--scale_lr` rule: lr = accumulate_grad_batches * num_devices * batch_size * base_lr.

    `batch_size` is the per-device micro-batch, as in latent-diffusion's `main.py`; the product is the number
    of examples per optimiser update, i.e. the global batch a train step receives.
    """
    return accumulate_grad_batches * num_devices * batch_size * base_lr


def learning_rate(cfg: OptimizerConfig, *, global_batch_size: int, num_devices: int) -> float:
    """The peak learning rate: scaled by the examples per update when `cfg.scale_lr`, else `cfg.learning_rate`.

    `global_batch_size` is the batch of one update (all micro-batches, all devices).
    """
    if not cfg.scale_lr:
        return cfg.learning_rate
    per_update = cfg.accumulate_grad_batches * num_devices
    if global_batch_size % per_update:
        raise ValueError(f"data.global_batch_size={global_batch_size} is not divisible by optimizer."
                         f"accumulate_grad_batches={cfg.accumulate_grad_batches} x {num_devices} devices")
    return scaled_learning_rate(cfg.learning_rate, batch_size=global_batch_size // per_update,
                                num_devices=num_devices, accumulate_grad_batches=cfg.accumulate_grad_batches)


def make_schedule(cfg: OptimizerConfig, peak_lr: float) -> optax.Schedule:
    """lr(n) = peak_lr * min(n / warmup_steps, 1) for update n = 0, 1, ... (constant when warmup_steps == 0)."""
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(peak_lr)
    return optax.warmup_constant_schedule(0.0, peak_lr, cfg.warmup_steps)


def make_optimizer(cfg: OptimizerConfig, peak_lr: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax chain: clip_by_global_norm(grad_clip_norm) (identity when 0) -> AdamW(schedule); returns (tx, schedule)."""
    schedule = make_schedule(cfg, peak_lr)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    # The same chain structure with and without clipping, so the optimiser state keeps one checkpoint layout.
    clip = optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def partitioned(parts: Mapping[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimiser over params {part: subtree} with its own transformation (and state) per part.

    State: {part: that part's state}. `update(grads, state, params)` updates the parts that `grads` holds and
    only those: the other parts' states stay as they are and their updates are zeros, so `optax.apply_updates`
    leaves them unchanged (an Adam fed a zero gradient instead would still move them by its momentum). This is
    how a stage updates its parts in turn within one train step (the autoencoder's generator, then its
    discriminator on the new reconstructions); grads holding every part update them all at once. `params` is
    required.
    """
    def init(params):
        if set(params) != set(parts):
            raise ValueError(f"partitioned optimiser over parts {sorted(parts)} got params with parts {sorted(params)}")
        return {name: tx.init(params[name]) for name, tx in parts.items()}

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("the partitioned optimiser needs params (to give the parts without grads zero updates)")
        unknown = set(grads) - set(parts)
        if unknown:
            raise ValueError(f"gradients for unknown part(s) {sorted(unknown)}; the parts are {sorted(parts)}")
        updates, new_state = {}, dict(state)
        for name, tx in parts.items():
            if name in grads:
                updates[name], new_state[name] = tx.update(grads[name], state[name], params[name])
            else:
                updates[name] = jax.tree.map(jnp.zeros_like, params[name])
        return updates, new_state

    return optax.GradientTransformation(init, update)
