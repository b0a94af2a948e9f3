"""Tiny random diffusers ControlNets and the helpers the ControlNet tests share (tests/test_controlnet*.py,
tests/test_sample_controlnet.py): a ControlNet made from a diffusers UNet as `ControlNetModel.from_unet`, every
parameter randomised (zero convs included, so the residuals matter), saved as a diffusers folder and read back
through `load_diffusers_controlnet`; the model inputs of a residual comparison, NCHW <-> NHWC, and the comparison.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import sdxl_fixtures

DIFFUSERS_HINT = (16, 32, 96, 256)  # diffusers' default hint encoder: control images 8x the latents
RTOL = 1e-5  # residuals within this of each output's largest value (float32; measured ~1e-6)


def controlnet_from_unet(unet: Any, hint_channels: tuple[int, ...] = (8, 16), **kwargs: Any) -> Any:
    """diffusers' `ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels, **kwargs)` as
    created (zero convs zero; the hint encoder from torch's current seed), in eval mode."""
    import diffusers

    return diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels,
                                               **kwargs).eval()


def random_controlnet(unet: Any, seed: int, hint_channels: tuple[int, ...] = (8, 16), **kwargs: Any) -> Any:
    """A diffusers ControlNetModel copying `unet`'s encoder (`controlnet_from_unet`), with a hint encoder of
    `hint_channels` stages (the control image is 2**(len - 1) times the latents: (8, 16) for the tiny SD's f=2 VAE),
    all weights randomised from torch seed `seed`; eval mode."""
    import torch

    torch.manual_seed(seed)
    net = controlnet_from_unet(unet, hint_channels, **kwargs)
    sdxl_fixtures.randomise(net, scale=0.1)
    return net


def saved_and_loaded(net: Any, folder: Path) -> tuple[Any, Any]:
    """(ControlNetConfig, params) of diffusers ControlNet `net` saved to `folder` and loaded by ldm-jax."""
    from ldm_jax.convert.diffusers_controlnet import load_diffusers_controlnet

    net.save_pretrained(folder, safe_serialization=True)
    return load_diffusers_controlnet(folder)


def inputs(context_dim: int, *, latent: int = 8, hint_factor: int = 8, seed: int = 1):
    """(x, t, context, control image in [0, 1]) as torch NCHW tensors, batch 2: latents (2, 4, latent, latent),
    timesteps 3 and 999, a 7-token context, the control image `hint_factor` times the latents' size."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    side = hint_factor * latent
    return (torch.randn(2, 4, latent, latent, generator=gen), torch.tensor([3, 999]),
            torch.randn(2, 7, context_dim, generator=gen), torch.rand(2, 3, side, side, generator=gen))


def nhwc(t: Any):
    """A torch NCHW tensor as a jax NHWC array."""
    import jax.numpy as jnp

    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def nchw(a: Any) -> np.ndarray:
    """An NHWC array as a numpy NCHW array."""
    return np.asarray(a).transpose(0, 3, 1, 2)


def diff(ours: Any, ref: np.ndarray) -> tuple[float, float]:
    """(max abs difference, that / the reference's largest value)."""
    err = float(np.abs(np.asarray(ours) - ref).max())
    return err, err / float(np.abs(ref).max())


def assert_residuals(ours: Any, ref: Any, what: str, rtol: float = RTOL) -> tuple[float, float]:
    """Our (down, mid) residuals (NHWC) against diffusers' (torch NCHW): every one non-trivial in the reference
    and within `rtol` of its largest value; returns the worst (max abs, relative) errors."""
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down), what
    worst = (0.0, 0.0)
    for name, a, b in [*((f"down[{j}]", a, b) for j, (a, b) in enumerate(zip(down, ref_down))), ("mid", mid, ref_mid)]:
        b = b.numpy()
        assert np.abs(b).max() > 1e-3, f"{what} {name}: reference residual trivially small"
        assert nchw(a).shape == b.shape, f"{what} {name}"
        worst = tuple(map(max, worst, diff(nchw(a), b)))
        np.testing.assert_allclose(nchw(a), b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=f"{what} {name}")
    return worst
