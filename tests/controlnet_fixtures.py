"""Tiny random diffusers ControlNets for the ControlNet tests: made from a diffusers UNet as
`ControlNetModel.from_unet`, every parameter randomised (zero convs included, so the residuals matter), saved as a
diffusers folder and read back through `load_diffusers_controlnet`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sdxl_fixtures


def random_controlnet(unet: Any, seed: int, hint_channels: tuple[int, ...] = (8, 16)) -> Any:
    """A diffusers ControlNetModel copying `unet`'s encoder, with a hint encoder of `hint_channels` stages (the
    control image is 2**(len - 1) times the latents: (8, 16) for the tiny SD's f=2 VAE), all weights randomised
    from torch seed `seed`; eval mode."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
    sdxl_fixtures.randomise(net, scale=0.1)
    return net.eval()


def saved_and_loaded(net: Any, folder: Path) -> tuple[Any, Any]:
    """(ControlNetConfig, params) of diffusers ControlNet `net` saved to `folder` and loaded by ldm-jax."""
    from ldm_jax.convert.diffusers_controlnet import load_diffusers_controlnet

    net.save_pretrained(folder, safe_serialization=True)
    return load_diffusers_controlnet(folder)
