"""ControlNets in the sampling pipelines: the `Control` a pipeline call takes, its checks, and the denoiser that
adds the nets' residuals to the UNet (diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline and
MultiControlNetModel).

Per model evaluation at sampler step `step` (of the run's n steps, i = step - first_step), net k runs on the
latents the UNet denoises (its first `in_channels`: a 9-channel inpainting UNet's ControlNet sees the 4 latent
channels, as diffusers) with the same timestep and text conditioning, and its residuals are scaled by
scale_k * keep_k[i], keep_k[i] = 1 - (i / n < start_k or (i + 1) / n > end_k) (diffusers' `controlnet_keep`,
computed on the host in float64 as diffusers does). The nets' residuals are summed in order and added to the
UNet's skips and mid block. Guess mode (diffusers' `guess_mode`, also on when the first net has
global_pool_conditions): each net's residuals are weighted 0.1 ... 1.0 from the first skip to the mid block,
and with classifier-free guidance the nets run on the conditional half only (the unconditional half gets zero
residuals).

What is traced (changing it does not recompile): the nets' params, control images, scales (per net, scalar or
per example) and start / end fractions. Static (part of the compiled program's key): the nets' configs, their
number and guess mode.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import ldm, parallel
from ldm_jax.diffusion.guidance import GuidedCond
from ldm_jax.ldm import LDMConfig, RunOptions
from ldm_jax.models.controlnet import ControlNetConfig, build_controlnet, check_controlnet_fits


@dataclasses.dataclass(frozen=True, eq=False)
class Control:
    """One or several ControlNets for one pipeline call (txt2img, img2img, inpaint).

    nets: a sequence of (ControlNetConfig, params) pairs, params the net's params tree without a "params" level
      (a loaded net's `.config` and `.params`: `net = store.load_controlnet(path, base=model)`); several nets'
      residuals are summed.
    images: one control image per net, (B, H, W, C_k) or (H, W, C_k) / (1, H, W, C_k) (the same for every
      example), float in [0, 1] RGB (`images.prepare_control_image` makes one from a file's image), H x W the
      generated image's size, C_k the net's conditioning_channels (3). `place_control` puts them on the devices
      once for a run of same-sized batches.
    scales: diffusers' controlnet_conditioning_scale: one value for every net, or one per net; each a float or
      (B,) per example. Traced.
    starts, ends: diffusers' control_guidance_start / _end fractions, one for every net or one per net, with
      0 <= start < end <= 1. Traced.
    guess_mode: diffusers' guess_mode (static).
    """

    nets: Sequence[tuple[ControlNetConfig, Any]]
    images: Sequence[Any]
    scales: Any = 1.0
    starts: Any = 0.0
    ends: Any = 1.0
    guess_mode: bool = False

    @property
    def configs(self) -> tuple[ControlNetConfig, ...]:
        """The nets' configs, in order."""
        return tuple(config for config, _ in self.nets)


@dataclasses.dataclass(frozen=True)
class ControlKey:
    """The static part of a Control, in the compiled program's key: the nets' configs and the effective guess
    mode (guess_mode or the first net's global_pool_conditions, as diffusers)."""

    configs: tuple[ControlNetConfig, ...]
    guess_mode: bool


def control_key(control: Control) -> ControlKey:
    """The static part of `control` (`ControlKey`)."""
    guess = bool(control.guess_mode) or control.configs[0].global_pool_conditions
    return ControlKey(control.configs, guess)


def control_inputs(config: LDMConfig, control: Control, batch: int, image_hw: tuple[int, int], first_step: int,
                   num_steps: int) -> tuple[ControlKey, tuple[Any, ...], dict[str, np.ndarray]]:
    """Checks `control` against the model and the call; returns (its ControlKey, the nets' params, the pipeline
    inputs): "control_images" a tuple of (B, H, W, C_k) float32, "control_scale" (B, nets) float32 and
    "control_keep" (num_steps, nets) float32 (`keep_table` for a run of steps first_step..num_steps - 1).
    Errors are one-line ValueErrors naming the argument."""
    if not isinstance(control, Control):
        raise TypeError(f"control must be a pipeline.Control, got {type(control).__name__}")
    nets = list(control.nets)
    if not nets:
        raise ValueError("control: give at least one ControlNet (nets is empty)")
    for k, net in enumerate(nets):
        if not (isinstance(net, tuple) and len(net) == 2 and isinstance(net[0], ControlNetConfig)):
            raise ValueError(f"control: nets[{k}] must be a (ControlNetConfig, params) pair, got {type(net).__name__}")
        check_controlnet_fits(net[0], config.unet, f"control: nets[{k}]", latent_channels=config.latent_channels,
                              downsample_factor=config.downsample_factor)
    images = _control_images(control, batch, image_hw)
    scales = np.stack([np.broadcast_to(np.asarray(s, np.float32), (batch,)) for s in per_net(
        control.scales, len(nets), "control: scales", batch)], axis=1)
    starts, ends = guidance_fractions(control.starts, control.ends, [f"ControlNet {k}" for k in range(len(nets))])
    keep = keep_table(starts, ends, first_step, num_steps)
    inputs = {"control_images": images, "control_scale": scales, "control_keep": keep}
    return control_key(control), tuple(params for _, params in nets), inputs


def per_net(value: Any, n: int, name: str, batch: int | None = None) -> list[Any]:
    """`value` for each of n nets: one value for every net, or a list / tuple of n; each a number (or (batch,) per
    example, if batch). ValueError opening with `name` otherwise."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} ControlNet(s); give one value for every net or one "
                         "per net, in order")
    for k, v in enumerate(values):
        shape = np.shape(v)
        if shape != () and (batch is None or shape != (batch,)):
            want = "a number" if batch is None else f"a number or ({batch},) per example"
            raise ValueError(f"{name}[{k}] must be {want}; got shape {shape}")
    return values


def guidance_fractions(starts: Any, ends: Any, nets: Sequence[str],
                       names: tuple[str, str] = ("control: starts", "control: ends")) -> tuple[list[float], list[float]]:
    """Each net's (start, end) guidance fractions (diffusers' control_guidance_start / _end), checked: `starts` and
    `ends` are one number for every net or a list / tuple of one per net (`per_net`), and each net runs from its
    start to its end, 0 <= start < end <= 1. nets: a label per net for errors (e.g. its file); names: what
    `starts` and `ends` are called in errors (e.g. the command line's flags). ValueError otherwise."""
    starts, ends = ([float(v) for v in per_net(value, len(nets), name)] for value, name in zip((starts, ends), names))
    check_fractions(starts, ends, nets, names)
    return starts, ends


def check_fractions(starts: Sequence[float], ends: Sequence[float], nets: Sequence[str] | None = None,
                    names: tuple[str, str] = ("start", "end")) -> None:
    """ValueError naming the net (`nets`, default "ControlNet k") unless 0 <= start < end <= 1 for each."""
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if not 0.0 <= s < e <= 1.0:  # False for NaN
            raise ValueError(f"{names[0]} {s:g} and {names[1]} {e:g} of {nets[k] if nets else f'ControlNet {k}'}: a "
                             f"net runs from its start to its end fraction of the steps, 0 <= start < end <= 1")


def _control_images(control: Control, batch: int, hw: tuple[int, int]) -> tuple[Any, ...]:
    """Each net's control image as (B, H, W, C) float32, checked: an image already placed as (B, H, W, C)
    (`place_control`) as it is, on its devices; otherwise a read-only broadcast view of the image (no host copy per
    example: the pipeline's device_put copies each device's share)."""
    images = list(control.images)
    if len(images) != len(control.nets):
        raise ValueError(f"control: {len(images)} control images for {len(control.nets)} ControlNets")
    out = []
    for k, (image, config) in enumerate(zip(images, control.configs)):
        want = (batch, *hw, config.conditioning_channels)
        if isinstance(image, jax.Array) and image.shape == want and image.dtype == jnp.float32:
            out.append(image)
            continue
        image = np.asarray(image, np.float32)
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[0] not in (1, batch) or image.shape[1:] != want[1:]:
            raise ValueError(f"control image {k} has shape {np.shape(control.images[k])}; expected {want} (or "
                             f"{want[1:]}): the generated image's {hw[0]}x{hw[1]} (see images.prepare_control_image)")
        out.append(np.broadcast_to(image, want))
    return tuple(out)


def place_control(control: Control, batch: int, image_hw: tuple[int, int], mesh: jax.sharding.Mesh) -> Control:
    """`control` with each control image as a (batch, H, W, C_k) float32 array split over the mesh's batch axes, as
    the pipelines place their batched inputs (`parallel.batch_sharding`): built once for a run of batches of one
    size, each device's share made from the shared image (the host never holds batch copies), and reused by every
    pipeline call (its checks pass it through; device_put leaves it where it is). Images are checked as
    `control_inputs` checks them. With several processes (each holding a process-local batch) `control` is
    returned as it is."""
    if jax.process_count() > 1:
        return control
    sharding = parallel.batch_sharding(mesh)
    views = _control_images(control, batch, image_hw)
    placed = [view if isinstance(view, jax.Array) else jax.make_array_from_callback(
        view.shape, sharding, lambda index, view=view: np.ascontiguousarray(view[index])) for view in views]
    return dataclasses.replace(control, images=placed)


def keep_table(starts: Sequence[float], ends: Sequence[float], first_step: int, num_steps: int) -> np.ndarray:
    """(num_steps, nets) float32: 1 where net k runs at sampler step s, as diffusers' controlnet_keep over a run of
    n = num_steps - first_step steps: row s = first_step + i holds 1 - float(i / n < start_k or (i + 1) / n > end_k)
    (Python floats, as diffusers); rows before first_step (never run) are 0. 0 <= start < end <= 1 (ValueError,
    `check_fractions`)."""
    check_fractions(starts, ends)
    table = np.zeros((num_steps, len(starts)), np.float32)
    n = num_steps - first_step
    for i in range(n):
        table[first_step + i] = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(starts, ends)]
    return table


# ---------------------------------------------------------------------------------------------- in the program


def keep_at_step(control_keep: jax.Array) -> Callable[[Any, jax.Array], Any]:
    """step_cond for `samplers.sample`: the cond (a dict with "control", or a GuidedCond of two) with its
    "control"["scale"] (B, nets) multiplied by control_keep[step] (nets,)."""

    def apply(cond: dict[str, Any], keep: jax.Array) -> dict[str, Any]:
        ctl = cond["control"]
        return {**cond, "control": {**ctl, "scale": ctl["scale"] * keep}}

    def step_cond(cond: Any, step: jax.Array) -> Any:
        keep = control_keep[step]
        if isinstance(cond, GuidedCond):
            return cond.replace(cond=apply(cond.cond, keep), uncond=apply(cond.uncond, keep))
        return apply(cond, keep)

    return step_cond


def controlled_unet(config: LDMConfig, options: RunOptions, key: ControlKey, params: Any, net_params: Sequence[Any],
                    cond_half: bool) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """model_fn(x, t, cond) for `samplers.sample`: the UNet with the nets' summed residuals. cond is
    {"unet": the UNet's conditioning dict (`ldm.apply_unet`), "control": {"images": tuple of (B, H, W, C_k),
    "scale": (B, nets)}}. cond_half: x is a guidance batch [uncond; cond] (2b) and the nets run on its second
    half only, the first half getting zero residuals (guess mode with classifier-free guidance)."""
    def model_fn(x: jax.Array, t: jax.Array, cond: dict[str, Any]) -> jax.Array:
        unet_cond, ctl = cond["unet"], cond["control"]
        inputs = (x[..., :config.latent_channels], t, unet_cond, ctl["images"], ctl["scale"])
        if cond_half:
            half = x.shape[0] // 2
            inputs = jax.tree.map(lambda a: a[half:], inputs)
        down, mid = _residuals(options, key, net_params, *inputs)
        if cond_half:
            down, mid = jax.tree.map(lambda r: jnp.concatenate([jnp.zeros_like(r), r]), (down, mid))
        return ldm.apply_unet(config, params, x, t, unet_cond, options=options, residuals=(down, mid))

    return model_fn


def _residuals(options, key, net_params, x, t, unet_cond, images, scale) -> tuple[list[jax.Array], jax.Array]:
    """The nets' residuals summed in order (diffusers' MultiControlNetModel)."""
    unet_cond = unet_cond or {}
    total = None
    for k, (config, params) in enumerate(zip(key.configs, net_params)):
        model = build_controlnet(config, attention=options.attention, remat=options.remat, dtype=options.dtype,
                                 param_dtype=options.param_dtype)
        out = model.apply({"params": params}, x, t, unet_cond.get("context"), images[k], scale[:, k],
                          unet_cond.get("y"), unet_cond.get("time_ids"), guess_mode=key.guess_mode)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    return total


__all__ = ["Control", "ControlKey", "check_fractions", "control_inputs", "control_key", "controlled_unet",
           "guidance_fractions", "keep_at_step", "keep_table", "per_net", "place_control"]
