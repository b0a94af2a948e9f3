"""Exponential moving average of parameters with the reference's warm-up (latent-diffusion `LitEma`).

After the n-th optimiser update (n = 1, 2, ...) the EMA moves towards the new parameters with
    decay_n = min(decay, (1 + n) / (10 + n)),    ema <- ema - (1 - decay_n) * (ema - params),
starting from a copy of the initial parameters. Early on the average follows the parameters closely
(decay_1 = 2/11) and approaches `decay` as training goes on. The update count is the train state's
`step`, so the warm-up resumes correctly from a checkpoint. One update per optimiser step: with
gradient accumulation LitEma under PyTorch Lightning also updated after every micro-batch (while the
parameters stood still); here the EMA sees each new set of parameters once.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(decay: float, num_updates: jax.Array) -> jax.Array:
    """The warmed-up decay after `num_updates` (>= 1) updates: min(decay, (1 + n) / (10 + n)), float32 scalar."""
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema_params: Any, params: Any, *, decay: float, num_updates: jax.Array) -> Any:
    """One EMA step of `ema_params` towards `params` (same pytree); arithmetic in float32, result in each
    EMA leaf's dtype. `num_updates` counts this update (1 for the first)."""
    d = ema_decay(decay, num_updates)

    def one(e, p):
        ef = e.astype(jnp.float32)
        return (ef - (1.0 - d) * (ef - p.astype(jnp.float32))).astype(e.dtype)

    return jax.tree.map(one, ema_params, params)
