"""ControlNet training in the ldm stage (`train.adapter="controlnet"`, options in `train.controlnet`).

What trains is a ControlNet (`ldm_jax.models.controlnet`): the trained params are {"controlnet": tree}, started as
diffusers' `ControlNetModel.from_unet` does (`controlnet_params_from_unet`: the base UNet's conv_in, embeddings,
down blocks and mid block copied, zero convolutions zero, the hint encoder drawn from the run's key) or from a
ControlNet `store.load_controlnet` reads (`train.controlnet.init_from`: a diffusers ControlNet folder or an original
control_*.safetensors / .pth file), which must fit the base model (`models.controlnet.check_controlnet_fits`).
The whole base model (train.init_from) is a frozen input of the step, as for the other adapters (optionally held
in bfloat16, `train.frozen_dtype`).

Architecture of a fresh ControlNet: the base UNet's encoder and mid block, without a learned position table
(`unet.position_embedding`, the captioned-shapes UNet's: diffusers' ControlNetModel has none, and the control image
already says where things are), and a hint encoder of `train.controlnet.conditioning_embedding_out_channels`
widths, whose 2**(n - 1) downsampling must equal the first stage's factor (the control image has the training
image's size: (16, 32, 96, 256) for SD's f = 8, three widths for the shapes world's f = 4).

Loss (`train_ldm.make_stage_loss`): the stage's own `ldm.training_loss` (eps / x0 / v, weighting, logvar term,
PRNG streams) with `residuals_fn`: the frozen UNet adds the ControlNet's residuals (conditioning scale 1) on the
batch's "control" images (B, H, W, 3) in [0, 1]. Prompt dropout is `diffusion.cond_drop_prob`: each caption
replaced by "" with that probability while its control image stays, which is diffusers' train_controlnet.py
`--proportion_empty_prompts` (one knob under the stage's existing name). At initialisation the residuals are zero,
so the loss equals the base model's `ldm.training_loss` on the same batch and key, bit for bit.

Data: batches of ("image", "tokens", "control"): `data.control_key` names the control images (a file beside each
image, a TFDS feature, or "shapes_mask" for the captioned-shapes scenes' object masks; `ldm_jax.data.readers`).
Export: WORKDIR/controlnet/ (`write_controlnet`, `store.save_controlnet`), a diffusers ControlNet folder of the EMA
(or live) params that `ControlNetModel.from_pretrained` and `store.load_controlnet` read.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm, store
from ldm_jax.models.controlnet import (ControlNetConfig, build_controlnet, check_controlnet_fits,
                                       controlnet_params_from_unet)

CONTROLNET_DIR = "controlnet"
TRAINED_KEY = "controlnet"

log = logging.getLogger("ldm_jax.train")


@dataclasses.dataclass(frozen=True)
class ControlNetTrainConfig:
    """`train.controlnet`: init_from: "" (start from the base UNet, diffusers' from_unet) or a ControlNet to continue
    from (a diffusers ControlNet folder or an original single file, `store.load_controlnet`);
    conditioning_embedding_out_channels: a fresh ControlNet's hint encoder widths (n widths
    downsample the control image by 2**(n - 1), which must be the first stage's factor; ignored with init_from)."""

    init_from: str = ""
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)


def check(train: Any, data: Any, model: ldm.LDMConfig) -> None:
    """ValueError naming the config field when a ControlNet run (`train.adapter="controlnet"`) cannot run: no
    control images, a hint encoder that does not downsample by the first stage's factor, options that mean
    nothing for a ControlNet (precomputed latents, a merged export, DreamBooth)."""
    if not data.control_key:
        raise ValueError("train.adapter='controlnet' trains on control images: set data.control_key (the name of "
                         "the control image beside each image, e.g. 'conditioning_image', or 'shapes_mask' for the "
                         "captioned-shapes scenes)")
    widths = train.controlnet.conditioning_embedding_out_channels
    if not train.controlnet.init_from and 2 ** (len(widths) - 1) != model.downsample_factor:
        raise ValueError(f"train.controlnet.conditioning_embedding_out_channels={tuple(widths)} downsamples the "
                         f"control image by {2 ** (len(widths) - 1)}; the first stage's factor is "
                         f"{model.downsample_factor} (give {int(np.log2(model.downsample_factor)) + 1} widths)")
    refused = {"train.precompute_latents": train.precompute_latents, "train.export_merged": train.export_merged,
               "train.dreambooth": train.dreambooth.enabled}
    for name, value in refused.items():
        if value:
            raise ValueError(f"{name} is not supported with train.adapter='controlnet' (turn it off)")


def architecture(model: ldm.LDMConfig, cfg: ControlNetTrainConfig) -> ControlNetConfig:
    """A fresh ControlNet's config for `model`'s UNet (module doc: its encoder without a learned position table)."""
    unet = dataclasses.replace(model.unet, position_embedding=None)
    return ControlNetConfig(unet=unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))


def prepare(stage: Any, frozen: Mapping[str, Any], key: jax.Array) -> Any:
    """The run's `adapters.Adapter` (kind "controlnet"): its ControlNetConfig and initial numpy params
    {"controlnet": tree} (module doc). Deterministic given `key`, so a resumed run prepares the same start."""
    from ldm_jax.training.adapters import Adapter  # noqa: PLC0415 (adapters imports this module lazily)

    cfg = stage.train.controlnet
    if cfg.init_from:
        what = f"train.controlnet.init_from={cfg.init_from!r}"
        try:
            loaded = store.load_controlnet(cfg.init_from, base=stage.model.unet)
        except (ValueError, OSError) as err:
            raise ValueError(f"{what}: {err}") from None
        config, params = loaded.config, loaded.params
        check_controlnet_fits(config, stage.model.unet, what, latent_channels=stage.model.latent_channels,
                              downsample_factor=stage.model.downsample_factor)
        source = cfg.init_from
    else:
        config = architecture(stage.model, cfg)
        params = controlnet_params_from_unet(frozen["unet"], config, key)
        source = "the base UNet (from_unet)"
    initial = {TRAINED_KEY: jax.tree.map(lambda x: np.array(x, np.float32), params)}
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(initial))
    log.info("ControlNet: from %s, hint widths %s, %d trained parameters", source,
             config.conditioning_embedding_out_channels, count)
    return Adapter(kind="controlnet", initial=initial, controlnet=config)


def residuals_fn(stage: Any, trained: Mapping[str, Any]) -> ldm.ResidualsFn:
    """`ldm.training_loss`'s residuals_fn of the stage's ControlNet (params `trained["controlnet"]`, the stage's
    run-time options): its residuals at conditioning scale 1 on the batch's "control" images (B, H, W, 3) in [0, 1]
    (the image's size: the ControlNet's hint factor times the latents'), from the UNet's noisy latents, timesteps and
    (dropped-out) conditioning. The stage's loss is `ldm.training_loss` of the frozen model with this hook
    (`train_ldm.make_stage_loss`); gradients reach only `trained`."""
    options = stage.options
    module = build_controlnet(stage.adapter.controlnet, attention=options.attention, remat=options.remat,
                              dtype=options.dtype, param_dtype=options.param_dtype)

    def residuals(x_t, t, cond, batch, key, deterministic):
        return module.apply({"params": trained[TRAINED_KEY]}, x_t, t, cond.get("context"),
                            jnp.asarray(batch["control"]), 1.0, cond.get("y"), cond.get("time_ids"),
                            deterministic=deterministic, rngs={"dropout": key})

    return residuals


def write_controlnet(stage: Any, trained: Mapping[str, Any], out_dir: pathlib.Path) -> pathlib.Path:
    """Writes `trained["controlnet"]` (numpy; the EMA or live params) as a diffusers ControlNet folder `out_dir`
    (`store.save_controlnet`: config.json + diffusion_pytorch_model.safetensors, float32) on the primary process;
    returns `out_dir`."""
    if jax.process_index() == 0:
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(trained[TRAINED_KEY]))
        store.save_controlnet(store.LoadedControlNet(config=stage.adapter.controlnet, params=params), out_dir)
        log.info("exported the ControlNet to %s (a diffusers ControlNet folder: ControlNetModel.from_pretrained, "
                 "store.load_controlnet), for the base model %s", out_dir, stage.train.init_from)
    return out_dir


__all__ = ["CONTROLNET_DIR", "ControlNetTrainConfig", "architecture", "check", "prepare", "residuals_fn",
           "write_controlnet"]
