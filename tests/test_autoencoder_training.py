"""Autoencoder train steps: the tiny KL and VQ autoencoders (configs/autoencoder_tiny_*.py) overfit four
synthetic 16x16 images through the jitted generator + discriminator steps, with LPIPS (narrow, random
weights) and the PatchGAN switched on part-way (disc_start); plus state bookkeeping and NaN reporting."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config import load_config_file
from ldm_jax.losses.autoencoder_loss import AutoencoderLoss, LossConfig
from ldm_jax.losses.lpips import LPIPS
from ldm_jax.models.autoencoder import build_autoencoder, init_autoencoder
from ldm_jax.training import autoencoder_step

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
STEPS, DISC_START, SIZE = 40, 30, 16
# Initial / final L1 error of the deterministic reconstruction (KL: posterior mode) after 40 steps at lr 2e-3,
# measured on CPU: KL 2.94x, VQ 3.02x with these seeds (2.40x, 2.97x with other seeds); asserted with margin.
MIN_IMPROVEMENT = 1.8


def synthetic_images(n=4, size=SIZE):
    """Smooth colour ramps with a disc of another colour: (n, size, size, 3) float32 in [-1, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for i in range(n):
        c = np.random.default_rng(i).uniform(-0.8, 0.8, (3, 3))
        disc = (xx - 0.25 - 0.15 * i) ** 2 + (yy - 0.5) ** 2 < 0.04
        out.append(np.stack([c[0, 0] + c[0, 1] * xx + c[0, 2] * yy, c[1, 0] + c[1, 1] * xx * yy,
                             np.where(disc, c[2, 0], c[2, 1])], axis=-1))
    return np.clip(np.stack(out), -1, 1).astype(np.float32)


def setup(kind, **loss_overrides):
    model = build_autoencoder(load_config_file(CONFIGS / f"autoencoder_tiny_{kind}.py").first_stage)
    x = synthetic_images()
    lpips = LPIPS(widths=(8,) * 5)
    loss_cfg = dict(disc_start=DISC_START, disc_num_layers=2, disc_ndf=8, kl_weight=1e-6, disc_weight=0.1,
                    perceptual_weight=0.1)
    loss = AutoencoderLoss(LossConfig(**{**loss_cfg, **loss_overrides}), kind, lpips=lpips)
    params = jax.jit(init_autoencoder, static_argnums=0)(model, jax.random.key(1))
    lpips_params = jax.jit(lpips.init)(jax.random.key(2), x, x)["params"]
    state = autoencoder_step.init_train_state(model, loss, ae_params=params, lpips_params=lpips_params, images=x,
                                              key=jax.random.key(3), learning_rate=2e-3)
    return model, x, state


def l1_error(model, params, x):
    if autoencoder_step.loss_kind(model) == "kl":
        recon, _ = model.apply({"params": params}, x, sample_posterior=False)
    else:
        recon, _, _ = model.apply({"params": params}, x)
    return jnp.mean(jnp.abs(recon - x))


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_overfits_synthetic_images(kind):
    model, x, state = setup(kind)
    error = jax.jit(l1_error, static_argnums=0)
    traces = []

    def counted_step(state, batch, key):
        traces.append(1)
        return autoencoder_step.train_step(state, batch, key)

    step = jax.jit(counted_step, donate_argnums=0)
    key, batch = jax.random.key(4), {"image": x}
    before = float(error(model, state.ae_params, x))
    logvar0 = float(state.logvar)
    disc_before = None
    for i in range(STEPS):
        if i == DISC_START:
            disc_before = jax.tree.map(np.array, state.disc_params)
        state, metrics = step(state, batch, key)
        autoencoder_step.check_finite(metrics, i)
        if i == DISC_START - 1:  # the discriminator has not learnt (zero loss, zero gradient) before disc_start
            assert float(metrics["disc_loss"]) == 0.0 and float(metrics["disc_factor"]) == 0.0
            assert float(metrics["disc_grad_norm"]) == 0.0
    after = float(error(model, state.ae_params, x))
    assert len(traces) == 1 and int(state.step) == STEPS
    assert float(metrics["disc_factor"]) == 1.0 and float(metrics["d_weight"]) > 0
    assert float(metrics["disc_loss"]) > 0 and float(metrics["disc_grad_norm"]) > 0
    assert float(state.logvar) == logvar0  # not learnt unless LossConfig.learn_logvar
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.disc_params, disc_before)
    assert max(jax.tree.leaves(moved)) > 0
    improvement = before / after
    print(f"{kind}: L1 {before:.4f} -> {after:.4f} ({improvement:.2f}x)")
    assert improvement > MIN_IMPROVEMENT, f"{kind}: L1 {before:.4f} -> {after:.4f}, {improvement:.2f}x"

    # A NaN in the batch: no error inside jit, `finite` is False and the host check names the step.
    bad = x.copy()
    bad[1, 2, 3, 0] = np.nan
    _, metrics = step(state, {"image": bad}, key)
    assert len(traces) == 1 and not bool(metrics["finite"])
    with pytest.raises(FloatingPointError, match=f"at step {STEPS}: .*total_loss"):
        autoencoder_step.check_finite(metrics, STEPS)
    with pytest.raises(ValueError, match="'image'"):
        autoencoder_step.train_step(state, x, key)
