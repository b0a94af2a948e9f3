"""LoRA core (ldm_jax/adapters/lora.py) on the params of a tiny random diffusers SD pipeline: merge then unmerge
gives the params back, stacking LoRAs adds their deltas, a conv (LoCon) delta is the two-conv LoRA branch, and the
gradient w.r.t. the factors of a loss of the merged params (a real text-encoder + UNet forward) is the full-parameter
gradient projected on the factors.

Run: .venv/bin/python -m pytest -q tests/test_lora.py
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax import ldm, store
from ldm_jax.adapters import lora as lora_lib

TARGETS = (*lora_lib.ATTENTION_TARGETS, *lora_lib.FEED_FORWARD_TARGETS, *lora_lib.CONV_TARGETS)
DELTA_FRACTION = 0.01  # each module's delta norm, relative to its kernel's norm (realistic LoRA magnitudes)
FLOAT32_ULP = 2.0**-23  # the spacing of float32 numbers in [1, 2): one rounding of (W + d) - d, relative
merge = jax.jit(lora_lib.apply_loras)  # one program for all modules (eager: one small compile per shape)
unmerge = jax.jit(lora_lib.unmerge)


@pytest.fixture(scope="module")
def model(sd):
    """The tiny SD pipeline (conftest `sd`) loaded through the store."""
    return store.load_model(sd[1])


def _random_lora(params, seed, rank=4, alpha=6.0, fraction=DELTA_FRACTION, sections=("unet", "cond_stage")):
    """A LoRA on every attention, feed-forward and conv module of the UNet and the text tower: random normal
    factors (float32), the up factor scaled so that each delta's norm is `fraction` of its kernel's."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    factors = {}
    for path in lora_lib.target_modules(params, TARGETS, sections=sections):
        kernel = np.asarray(flat[(*path, "kernel")])
        down = rng.standard_normal((*kernel.shape[:-1], rank)).astype(np.float32)
        up = rng.standard_normal((rank, kernel.shape[-1])).astype(np.float32)
        norm = fraction * np.linalg.norm(kernel) / np.linalg.norm(alpha / rank * np.tensordot(down, up, 1))
        factors[path] = {"down": down, "up": (up * norm).astype(np.float32)}
    return lora_lib.make_lora(factors, {path: alpha for path in factors})


def _kernels(params):
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "kernel"}


def test_merge_then_unmerge_returns_the_params(model):
    params = model.params
    lora = _random_lora(params, 0)
    loras = [(lora, 0.8), (_random_lora(params, 1, rank=2, alpha=1.0), -0.5)]
    merged = merge(params, loras)
    back = unmerge(merged, loras)
    before, after, changed = _kernels(params), _kernels(back), _kernels(merged)
    touched = {(*p, "kernel") for p in lora.modules()}
    worst_norm = worst_max = 0.0
    for path, kernel in before.items():
        if path in touched:
            assert np.linalg.norm(changed[path] - kernel) > 1e-3 * np.linalg.norm(kernel), path  # it did change
        else:
            np.testing.assert_array_equal(after[path], kernel)
        worst_norm = max(worst_norm, float(np.linalg.norm(after[path] - kernel) / np.linalg.norm(kernel)))
        worst_max = max(worst_max, float(np.abs(after[path] - kernel).max() / np.abs(kernel).max()))
    # Each kernel within 1e-7 relative (Frobenius; measured 9.9e-9); no element off by more than one float32
    # rounding of the kernel's largest values (measured 1.1e-7 of max |W|).
    print(f"merge/unmerge: worst kernel error {worst_norm:.2e} (Frobenius), {worst_max:.2e} of max |W|")
    assert worst_norm <= 1e-7 and worst_max <= FLOAT32_ULP, (worst_norm, worst_max)
    jax.tree.map(np.testing.assert_array_equal, unmerge(merge(params, []), []), params)


def test_stacked_loras_add_their_scaled_deltas(model):
    params = model.params
    a, b = _random_lora(params, 2), _random_lora(params, 3, rank=3, alpha=2.0)
    stacked = _kernels(merge(params, [(a, 0.7), (b, -0.3)]))
    one_by_one = _kernels(merge(merge(params, [(a, 0.7)]), [(b, -0.3)]))
    base = _kernels(params)
    for path, kernel in base.items():
        exact = kernel.astype(np.float64)
        for lora, scale in ((a, 0.7), (b, -0.3)):
            pair = lora.modules().get(path[:-1])
            if pair is not None:  # alpha / rank * scale * down @ up, in float64
                down, up = np.asarray(pair["down"], np.float64), np.asarray(pair["up"], np.float64)
                exact = exact + lora.alpha_of()[path[:-1]] / up.shape[0] * scale * np.tensordot(down, up, 1)
        scale_of = np.abs(exact).max()
        np.testing.assert_allclose(stacked[path], exact, rtol=0, atol=2e-7 * scale_of, err_msg=str(path))
        np.testing.assert_allclose(one_by_one[path], exact, rtol=0, atol=2e-7 * scale_of, err_msg=str(path))


def test_conv_delta_equals_the_two_conv_lora_branch(model):
    """LoCon: conv(x, W + coef * tensordot(down, up)) = conv(x, W) + coef * conv1x1(conv(x, down), up)."""
    params = model.params
    path = ("unet", "down_blocks_0", "resnets_0", "conv1")
    lora = lora_lib.init_lora(params, [path], rank=4, alpha=3.0, key=jax.random.key(4))
    pair = lora.modules()[path]
    up = jax.random.normal(jax.random.key(5), pair["up"].shape)
    lora = lora_lib.make_lora({path: {"down": pair["down"], "up": up}}, lora.alpha_of())
    kernel = traverse_util.flatten_dict(params)[(*path, "kernel")]
    merged = traverse_util.flatten_dict(lora_lib.apply_loras(params, [(lora, 0.5)]))[(*path, "kernel")]
    x = jax.random.normal(jax.random.key(6), (2, 8, 8, kernel.shape[2]))

    def conv(inputs, w):
        return jax.lax.conv_general_dilated(inputs, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")

    branch = conv(conv(x, pair["down"]), up[None, None])  # (B, H, W, r) -> 1x1 conv -> (B, H, W, out)
    expected = conv(x, kernel) + 3.0 / 4 * 0.5 * branch
    got = conv(x, merged)
    err = float(jnp.abs(got - expected).max() / jnp.abs(expected).max())
    print(f"LoCon branch: relative error {err:.2e}")
    assert float(jnp.abs(branch).max()) > 0.1 and err < 1e-5, err  # measured 3.7e-7


def test_factor_gradients_are_the_projected_full_gradient(model):
    """dL/d down = coef * dL/dW @ up^T and dL/d up = coef * down^T @ dL/dW (convs: contracted over the window),
    for L a loss of a UNet's output with the LoRA merged (attention, feed-forward and conv modules), both
    gradients from one backward pass (dL/dW is the gradient w.r.t. the base kernel, which enters the merged kernel
    with coefficient 1). The UNet is the tiny model's with one level (conv_in, a ResNet and a spatial transformer
    per block, the mid block, conv_out; random weights): its backward pass compiles in half the time."""
    cfg = dataclasses.replace(model.config, unet=dataclasses.replace(model.config.unet, channel_mult=(1,),
                                                                     attention_resolutions=(1,)))
    rng = np.random.default_rng(10)
    params = traverse_util.unflatten_dict({path: (0.2 * rng.standard_normal(shape)).astype(np.float32)
                                           for path, shape in ldm.param_shapes(cfg).items() if path[0] == "unet"})
    lora = _random_lora(params, 7, rank=4, alpha=6.0, fraction=0.1, sections=("unet",))
    scale = 0.75
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 4))
    t = jnp.array([10, 500])
    cond = {"context": jax.random.normal(jax.random.key(9), (2, 7, cfg.unet.context_dim))}
    target = jax.random.normal(jax.random.key(11), x.shape)

    @jax.jit
    def grads(base, factors):
        def loss(base, factors):
            merged = lora_lib.apply_loras(base, [(lora_lib.Lora(factors, lora.alphas), scale)])
            return jnp.mean((ldm.apply_unet(cfg, merged, x, t, cond) - target) ** 2)

        return jax.grad(loss, argnums=(0, 1))(base, factors)

    d_base, d_factors = grads(params, lora.factors)
    d_base, got = traverse_util.flatten_dict(d_base), traverse_util.flatten_dict(d_factors)
    alpha_of = lora.alpha_of()
    worst = 0.0
    assert any(np.ndim(pair["down"]) == 4 for pair in lora.modules().values())  # convs are covered
    for path, pair in lora.modules().items():
        d_w = np.asarray(d_base[(*path, "kernel")], np.float64)
        down, up = np.asarray(pair["down"], np.float64), np.asarray(pair["up"], np.float64)
        coef = alpha_of[path] / up.shape[0] * scale
        want_down = coef * np.tensordot(d_w, up, axes=([-1], [1]))  # [..., in, out] x [r, out] -> [..., in, r]
        window = tuple(range(down.ndim - 1))
        want_up = coef * np.tensordot(down, d_w, axes=(window, window))  # [..., in, r] x [..., in, out] -> [r, out]
        assert np.abs(d_w).max() > 0, path
        for want, name in ((want_down, "down"), (want_up, "up")):
            have = np.asarray(got[(*path, name)], np.float64)
            worst = max(worst, float(np.abs(have - want).max() / np.abs(want).max()))
    print(f"factor gradients: worst relative error {worst:.2e}")
    assert worst < 1e-5, worst  # measured 6.6e-7
