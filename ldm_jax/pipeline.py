"""Sampling pipelines: txt2img, img2img and inpaint as pure functions, each jitted once per (shapes, sampler).

Every pipeline (txt2img, img2img, inpaint, refine) is a `jax.jit` of a `jax.shard_map` over the mesh: the batch is
split over the mesh's ("data", "fsdp") axes and every device generates its share with no communication (the
pmapped use); params and the sampler are replicated. Inside, per device: encode the prompt token ids (tokenised
on the host, `encode_prompts`; prompt and negative prompt in one text-encoder pass) with the cond stage, draw the
initial noise, run the sampler (one `lax.scan`) with classifier-free guidance. Decoding the latents with the first
stage is a second program of the same form (jitted per config, mesh, options and chunk size; compiled per latent
shape): every sampler, step count and pipeline kind shares it, and it compiles while the sampling program runs. Its
XLA compile is not cheaper than inside one program (full-size SD 1.5: 8.1 s for the two against 5.5 s for one,
bench_sd_scale); what it buys is the sharing and the overlap.

Params are replicated on every device (`place_params` once; numpy params are copied on every call).
Traced (changing them does not recompile): params, the sampler's tables and DDIM's `eta`, prompt token ids,
guidance scale, seed, example indices, strength, denoising fractions, micro-conditioning, init images and
masks, ControlNets' params, control images, scales and guidance fractions. Static (a new compilation each): config,
the ControlNets' configs, number and guess mode, mesh, the run-time options (`ldm.RunOptions`: attention
implementation, remat, compute and param dtypes), the sampler kind and step count, batch size and image size,
clip_skip, whether guidance runs (some scale > 1) and whether latents or images come out. `trace_count(kind)` counts
traces, for tests. Each compile is logged (logger "ldm_jax.pipeline", INFO): the program's kind, the time it took,
and whether it was compiled or read from the persistent compilation cache (`compile_cache.watch`).

Randomness, per example: example i (its global index, `first_index + position in the batch`) uses
  e_i = fold_in(key(seed), i);  initial noise = normal(e_i, latent shape);
  sampler step keys derive from fold_in(e_i, STEP_STREAM) (a counter no latent-sized draw from e_i reaches).
So image i depends only on (seed, i, prompt, settings): not on the batch size or the device count.

SDXL (two text towers and/or a "text_time" UNet, `LDMConfig.structured_conditioning`): `encode_prompts` gives
dicts of both towers' ids (and "zero_text", diffusers' force_zeros_for_empty_prompt); the pipelines add the
micro-conditioning numbers of `MicroConditioning` for the image size. An ensemble of expert denoisers (base +
refiner) is `txt2img(..., denoising_end=d, output="latents")` followed by `refine(latents, denoising_start=d)`
with the same sampler, seed and indices: the refiner continues the base's latents without adding noise.
Guidance: as diffusers' pipelines, a scale <= 1 gives the conditional prediction alone and a batch whose scales
are all <= 1 runs no unconditional branch (guidance-free distilled models such as SDXL-Turbo).

Conventions: images float32 NHWC in [-1, 1] (outputs clipped to it; `to_uint8` for files); masks
(B, H, W, 1) in [0, 1] with 1 = repaint, binarised at 0.5; H and W multiples of the first stage's factor.
ControlNets (`Control`, `ldm_jax.control`; diffusers' StableDiffusionControlNet*Pipeline): txt2img, img2img and
inpaint take `control=`; the nets' residuals, summed, are added to the UNet's at every step where each net's
guidance start / end fractions keep it (diffusers' controlnet_keep, via `sample(step_cond=...)`); their params
are replicated beside the model's (params[CONTROLNETS] inside the program).
Inpainting: models with concat channels (SD inpainting, 9-channel UNet) get [mask, masked-image latent]
appended to x; other models blend: outside the mask the latent is replaced by the noised known latent
before every step and by the known latent at the end. Init images are encoded to the posterior mode
(diffusers and CompVis draw a posterior sample; the two differ by the VAE's posterior noise).
"""
from __future__ import annotations

import collections
import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import compile_cache, ldm, parallel
from ldm_jax.control import Control, ControlKey, control_inputs, controlled_unet, keep_at_step
from ldm_jax.diffusion.guidance import classifier_free_guidance, guided_cond
from ldm_jax.diffusion.micro_conditioning import MicroConditioning  # re-exported (in __all__)
from ldm_jax.diffusion.samplers import Sampler, denoising_bounds, img2img_steps, make_sampler, sample
from ldm_jax.ldm import LDMConfig, LoadedModel, RunOptions
from ldm_jax.images import to_uint8  # re-exported: pipeline.to_uint8 (in __all__)
from ldm_jax.models.tokenizer import PromptReport, tokenize
from ldm_jax.models.tokenizer import inspect_prompts as inspect_tokens

KINDS = ("txt2img", "img2img", "inpaint", "refine")
OUTPUTS = ("images", "latents")
STEP_STREAM = 2**32 - 1
_TRACES: collections.Counter = collections.Counter()
log = logging.getLogger(__name__)


def trace_count(kind: str) -> int:
    """How many times the pipeline `kind` has been traced (compiled) in this process."""
    return _TRACES[kind]


def make_model_sampler(config: LDMConfig, name: str, steps: int, **opts: Any) -> Sampler:
    """`samplers.make_sampler` for this model: its noise schedule and prediction type (`opts` as there)."""
    opts.setdefault("prediction_type", config.diffusion.prediction_type)
    return make_sampler(name, ldm.noise_schedule(config), steps, **opts)


def encode_prompts(model: LoadedModel, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, *,
                   warn: bool = True) -> tuple[Any, Any]:
    """Tokenises prompts on the host: (cond, uncond) int32 (B, max_length) token ids.

    uncond is the negative prompts' ids, or the empty prompt's for every example. Two-tower / "text_time"
    models (SDXL, `config.structured_conditioning`) get dicts {"tokens", "tokens_2"?, "zero_text"}: each tower's
    ids padded with its own pad token to its own length, and zero_text (B,) float32, which is 1 in uncond when
    no negative prompts are given and the model sets `diffusion.force_zeros_for_empty_prompt` (the text
    conditioning is then zeros, as in diffusers; an explicit "" is encoded like any prompt). The
    micro-conditioning "time_ids" are added by the pipelines, which know the image size.
    warn: `warnings.warn` once per distinct prompt that is truncated or holds unknown words (`inspect_prompts`),
    naming its index in `prompts` (0-based; "negative prompt i" for those); callers that report
    `inspect_prompts` themselves pass False.
    """
    _text_config(model, "encode_prompts")
    zero_uncond = negative_prompts is None and model.config.diffusion.force_zeros_for_empty_prompt
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    cond, uncond = {}, {}
    for name, key, tokenizer in _towers(model):
        tower = getattr(model.config, name)
        kw = dict(pad_token_id=tower.pad_token_id, max_length=tower.max_length, warn=False)
        cond[key] = tokenize(tokenizer, list(prompts), **kw)
        uncond[key] = tokenize(tokenizer, list(negative_prompts), **kw)
    if warn:
        for what, texts in (("prompt", prompts), ("negative prompt", negative_prompts)):
            for index, report in _distinct_reports(model, texts):
                for line in report.problems(f"{what} {index}"):
                    warnings.warn(line, stacklevel=2)
    if not model.config.structured_conditioning:
        return cond["tokens"], uncond["tokens"]
    cond["zero_text"] = np.zeros(len(prompts), np.float32)
    uncond["zero_text"] = np.full(len(prompts), float(zero_uncond), np.float32)
    return cond, uncond


def _towers(model: LoadedModel) -> list[tuple[str, str, Any]]:
    """(tower name, conditioning input key, tokenizer) of each text tower."""
    towers = []
    for (name, tokenizer), key in zip(model.tokenizers().items(), ("tokens", "tokens_2")):
        if tokenizer is None:
            raise ValueError(f"model {model.model_id!r} has no tokenizer for its text tower {name} "
                             f"({'tokenizer_2' if name == 'cond_stage_2' else 'tokenizer'} is missing)")
        towers.append((name, key, tokenizer))
    return towers


def inspect_prompts(model: LoadedModel, prompts: Sequence[str]) -> list[PromptReport]:
    """`tokenizer.inspect_prompts` with the model's (first) tokenizer and max_length: per prompt, its token count
    against max_length (`.truncated`) and the words its tokenizer does not know (`.unknown_words`)."""
    cfg = _text_config(model, "inspect_prompts")
    return inspect_tokens(model.tokenizer, list(prompts), max_length=cfg.max_length)


def _text_config(model: LoadedModel, caller: str) -> LDMConfig:
    if model.tokenizer is None or model.config.tokenizer_kind is None:
        raise ValueError(f"{caller}: model {model.model_id!r} has no tokenizer / text cond stage")
    return model.config


def _distinct_reports(model: LoadedModel, prompts: Sequence[str]) -> list[tuple[int, PromptReport]]:
    """(first index, report) of each distinct prompt."""
    first: dict[str, int] = {}
    for index, prompt in enumerate(prompts):
        first.setdefault(prompt, index)
    return list(zip(first.values(), inspect_prompts(model, list(first)), strict=True))


def place_params(params: Any, mesh: Mesh | None = None, *, consume: bool = False) -> Any:
    """Puts params on every device of `mesh`, replicated, leaf by leaf (`store.place_params`: consume=True drops
    each host array from `params` as it goes); do it once, before sampling.

    The pipelines replicate their params argument on each call; already-placed params make that a no-op.
    """
    from ldm_jax import store  # noqa: PLC0415

    return store.place_params(params, mesh or parallel.make_mesh(), consume=consume)


# ----------------------------------------------------------------------------------------------- public API


def txt2img(config: LDMConfig, params: Mapping[str, Any], sampler: Sampler, cond: Any, uncond: Any = None, *,
            guidance_scale: Any = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
            first_index: int = 0, noise: Any = None, batch_size: int | None = None, mesh: Mesh | None = None,
            options: RunOptions = RunOptions(), chunk_size: int | None = None,
            micro: MicroConditioning = MicroConditioning(), clip_skip: int = 0, denoising_end: float | None = None,
            output: str = "images", control: Control | None = None) -> jax.Array:
    """Generates B images from noise. Returns (B, H, W, 3) float32 in [-1, 1], sharded over the mesh's batch.

    cond / uncond: conditioning inputs (B, L) token ids (text models, from `encode_prompts`) or (B,) labels
      (class / "adm" models); uncond None = the null class / zero vector (give it for text models).
      Unconditional models take cond=None and `batch_size` (or `noise`).
    guidance_scale: scalar or (B,); as in diffusers' pipelines, a scale <= 1 means the conditional prediction
      alone, and a batch whose scales are all <= 1 skips the unconditional evaluation (guidance-free distilled
      models such as SDXL-Turbo run at 0). Ignored by unconditional models.
    height, width: image size (default: diffusion.image_size times the first-stage factor); multiples of f.
    noise: optional (B, h, w, C) initial latent noise instead of the per-example draw (e.g. for parity tests).
    mesh: default `parallel.make_mesh()` over all devices; B must divide by its size.
    options: the run-time options of the models (`ldm.RunOptions`: attention implementation, remat, compute
      dtype, param dtype; a loaded model's are `model.options`). Norms, softmax and sampler arithmetic stay
      float32 whatever the compute dtype.
    chunk_size: examples a device processes at once (static; default its whole share). With chunk_size=1
      every image's arithmetic is the same whatever the batch size and device count, so images agree
      bitwise; larger chunks are faster and agree to float32 rounding (XLA picks kernels by shape).
    micro: SDXL micro-conditioning (`MicroConditioning`), for UNets with addition_embed_type "text_time".
    clip_skip: CLIP blocks skipped before the text towers' output layer (static; diffusers' `clip_skip`).
    denoising_end: a fraction in (0, 1): stop where the remaining noise is that fraction of the training
      timesteps, as diffusers' `denoising_end` (the base of an ensemble of expert denoisers; `refine` continues).
      Traced: changing it does not recompile.
    output: "images" (decoded, (B, H, W, 3) in [-1, 1]) or "latents" ((B, h, w, C) in the sampler's own
      coordinates, what `refine` takes; diffusers' output_type="latent").
    control: optional ControlNets (`Control`: nets, control images (B, H, W, 3) in [0, 1], per-net scales and
      guidance start / end fractions, guess mode; `ldm_jax.control`). Their configs and number are static, the
      rest traced.
    """
    inputs = _common_inputs(config, cond, uncond, guidance_scale, seed, first_index, noise, batch_from=None,
                            batch_size=batch_size)
    hw = _latent_hw(config, height, width)
    _add_time_ids(config, inputs, micro, hw, img2img=False)
    if denoising_end is not None:
        inputs["stop_step"] = _bounds(config, sampler, denoising_end=denoising_end)[1]
    nets = _add_control(config, inputs, control, sampler, hw, first_step=0)
    return _run("txt2img", config, params, sampler, inputs, hw, mesh, options, chunk_size, clip_skip, output, nets)


def refine(config: LDMConfig, params: Mapping[str, Any], sampler: Sampler, cond: Any, uncond: Any, latents: Any, *,
           denoising_start: float, guidance_scale: Any = 7.5, seed: int = 0, first_index: int = 0,
           mesh: Mesh | None = None, options: RunOptions = RunOptions(), chunk_size: int | None = None,
           micro: MicroConditioning = MicroConditioning(), clip_skip: int = 0) -> jax.Array:
    """The second expert of an ensemble (SDXL's refiner; diffusers' StableDiffusionXLImg2ImgPipeline with
    `denoising_start` and latents): continues `latents` (B, h, w, C), which `txt2img(..., denoising_end=d,
    output="latents")` left at the level of fraction d, over the remaining steps without adding noise, then
    decodes. `sampler` must be the base's (same kind, steps and schedule: the ensemble shares one); `seed` and
    `first_index` the base's, so that a stochastic sampler's step noise continues its stream. Returns (B, H, W, 3)
    float32 in [-1, 1]. Other arguments as in `txt2img`; the micro-conditioning is the img2img pipeline's
    (the refiner's aesthetic scores).
    """
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[-1] != config.latent_channels:
        raise ValueError(f"refine: latents must be (B, h, w, {config.latent_channels}); got {latents.shape}")
    inputs = _common_inputs(config, cond, uncond, guidance_scale, seed, first_index, None, batch_from=latents)
    inputs.update(latents=latents, first_step=_bounds(config, sampler, denoising_start=denoising_start)[0])
    hw = latents.shape[1:3]
    _add_time_ids(config, inputs, micro, hw, img2img=True)
    return _run("refine", config, params, sampler, inputs, hw, mesh, options, chunk_size, clip_skip)


def img2img(config: LDMConfig, params: Mapping[str, Any], sampler: Sampler, cond: Any, uncond: Any, images: Any, *,
            strength: float = 0.75, guidance_scale: Any = 7.5, seed: int = 0, first_index: int = 0,
            noise: Any = None, mesh: Mesh | None = None, options: RunOptions = RunOptions(),
            chunk_size: int | None = None, micro: MicroConditioning = MicroConditioning(),
            clip_skip: int = 0, control: Control | None = None) -> jax.Array:
    """SDEdit: encodes `images` (B, H, W, 3) in [-1, 1], noises them to `strength` in [0, 1] (the last
    int(strength * steps) steps run), denoises. Returns (B, H, W, 3) float32 in [-1, 1]. Other arguments as
    in `txt2img` (a ControlNet sees the noised latents as the UNet does)."""
    ldm.check_image_and_mask(config, images)
    inputs = _common_inputs(config, cond, uncond, guidance_scale, seed, first_index, noise, batch_from=images)
    inputs.update(image=np.asarray(images, np.float32), strength=_strength(strength))
    hw = _latent_hw(config, np.shape(images)[1], np.shape(images)[2])
    _add_time_ids(config, inputs, micro, hw, img2img=True)
    nets = _add_control(config, inputs, control, sampler, hw, first_step=_first_step(sampler, inputs["strength"]))
    return _run("img2img", config, params, sampler, inputs, hw, mesh, options, chunk_size, clip_skip, "images", nets)


def inpaint(config: LDMConfig, params: Mapping[str, Any], sampler: Sampler, cond: Any, uncond: Any, images: Any,
            mask: Any, *, strength: float = 1.0, guidance_scale: Any = 7.5, seed: int = 0, first_index: int = 0,
            noise: Any = None, mesh: Mesh | None = None, options: RunOptions = RunOptions(),
            chunk_size: int | None = None, micro: MicroConditioning = MicroConditioning(),
            clip_skip: int = 0, control: Control | None = None) -> jax.Array:
    """Repaints `images` (B, H, W, 3) in [-1, 1] where `mask` (B, H, W, 1) >= 0.5.

    Models with concat channels (SD inpainting) see [mask, masked-image latent]; others blend (module doc).
    strength < 1 starts from the image noised to that level. Returns (B, H, W, 3) float32 in [-1, 1].
    Other arguments as in `txt2img`; `control`'s nets see the latent channels only (not the 9-channel UNet's mask
    and masked-image latent), as diffusers' StableDiffusionControlNetInpaintPipeline.
    """
    ldm.check_image_and_mask(config, images, mask)
    concat = config.concat_channels
    if concat not in (0, 1 + config.latent_channels):
        raise ValueError(f"inpaint: the UNet takes {config.unet.in_channels} input channels; inpainting needs "
                         f"{config.latent_channels} (mask blending) or {2 * config.latent_channels + 1} "
                         f"(latent + mask + masked-image latent)")
    inputs = _common_inputs(config, cond, uncond, guidance_scale, seed, first_index, noise, batch_from=images)
    inputs.update(image=np.asarray(images, np.float32), mask=np.asarray(mask, np.float32),
                  strength=_strength(strength))
    hw = _latent_hw(config, np.shape(images)[1], np.shape(images)[2])
    _add_time_ids(config, inputs, micro, hw, img2img=True)
    nets = _add_control(config, inputs, control, sampler, hw, first_step=_first_step(sampler, inputs["strength"]))
    return _run("inpaint", config, params, sampler, inputs, hw, mesh, options, chunk_size, clip_skip, "images", nets)


# -------------------------------------------------------------------------------------------- input checks


def _bounds(config: LDMConfig, sampler: Sampler, **fraction: Any) -> tuple[np.ndarray, np.ndarray]:
    """(first_step, stop_step) int32 scalars of a denoising fraction (`samplers.denoising_bounds`)."""
    first, stop = denoising_bounds(sampler, config.diffusion.schedule.num_timesteps, **fraction)
    return np.asarray(first, np.int32), np.asarray(stop, np.int32)


def _first_step(sampler: Sampler, strength: np.ndarray) -> int:
    """The first step an img2img / inpaint run at `strength` takes (the driver's rule, `img2img_steps`)."""
    return sampler.num_steps - int(img2img_steps(strength, sampler.num_steps))


def _add_control(config: LDMConfig, inputs: dict[str, Any], control: Control | None, sampler: Sampler,
                 hw: tuple[int, int], first_step: int) -> tuple[ControlKey, tuple[Any, ...]] | None:
    """Adds `control`'s inputs (`control.control_inputs`) to inputs; returns (its static key, the nets' params)."""
    if control is None:
        return None
    f = config.downsample_factor
    key, net_params, extra = control_inputs(config, control, inputs["index"].shape[0], (hw[0] * f, hw[1] * f),
                                            first_step, sampler.num_steps)
    inputs.update(extra)
    return key, net_params


def _strength(strength: Any) -> np.ndarray:
    value = float(strength)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {value}")
    return np.asarray(value, np.float32)


def _latent_hw(config: LDMConfig, height: int | None, width: int | None) -> tuple[int, int]:
    f = config.downsample_factor
    height = height or config.diffusion.image_size * f
    width = width or config.diffusion.image_size * f
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not a multiple of {f} (the first stage's factor)")
    return height // f, width // f


def _common_inputs(config, cond, uncond, guidance_scale, seed, first_index, noise, batch_from, batch_size=None
                   ) -> dict[str, Any]:
    """Host-side inputs shared by every pipeline, checked; batch size from cond, noise or images."""
    inputs: dict[str, Any] = {}
    conditional = config.diffusion.conditioning_key in ("crossattn", "hybrid", "adm")
    if conditional:
        if cond is None:
            raise ValueError(f"conditioning_key={config.diffusion.conditioning_key!r}: give cond (token ids or labels)")
        if config.structured_conditioning:
            cond, uncond = _structured_cond(config, cond, "cond"), _structured_cond(config, uncond, "uncond")
        else:
            cond = np.asarray(cond)
            uncond = ldm.null_inputs(config, cond.shape[0]) if uncond is None and config.tokenizer_kind is None else uncond
            if uncond is None:
                raise ValueError("text models need uncond token ids (the empty or negative prompt; see encode_prompts)")
            uncond = np.asarray(uncond)
            _check_cond(config, cond, "cond")
        if jax.tree.map(np.shape, uncond) != jax.tree.map(np.shape, cond):
            raise ValueError(f"uncond has shape(s) {jax.tree.map(np.shape, uncond)}; expected cond's "
                             f"{jax.tree.map(np.shape, cond)}")
        inputs.update(cond=cond, uncond=uncond)
    elif cond is not None:
        raise ValueError(f"conditioning_key={config.diffusion.conditioning_key!r} takes no cond")
    first_cond = (cond["tokens"] if isinstance(cond, Mapping) else cond) if conditional else None
    batch = _batch_size(first_cond, noise, batch_from, batch_size)
    scale = np.broadcast_to(np.asarray(guidance_scale, np.float32), (batch,)).copy()
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if first_index < 0 or first_index + batch > 2**31:
        raise ValueError(f"example indices {first_index}..{first_index + batch - 1} must lie in [0, 2**31)")
    inputs.update(scale=scale, seed=np.asarray(seed, np.uint32),
                  index=np.arange(first_index, first_index + batch, dtype=np.int32))
    if noise is not None:
        inputs["noise"] = np.asarray(noise, np.float32)
    return inputs


def _structured_cond(config: LDMConfig, cond: Any, what: str) -> dict[str, np.ndarray]:
    """A two-tower / text_time model's conditioning dict (`encode_prompts`), checked; numpy arrays."""
    keys = {"tokens", "zero_text"} | ({"tokens_2"} if config.cond_stage_2 is not None else set())
    if not isinstance(cond, Mapping) or set(cond) != keys:
        got = sorted(cond) if isinstance(cond, Mapping) else type(cond).__name__
        raise ValueError(f"{what} must be a dict with {sorted(keys)} for this model (from encode_prompts); got {got}")
    out = {k: np.asarray(v) for k, v in cond.items()}
    for key, name in (("tokens", "cond_stage"), ("tokens_2", "cond_stage_2")):
        if key in out:
            length = getattr(config, name).max_length
            if out[key].ndim != 2 or out[key].shape[1] != length or not np.issubdtype(out[key].dtype, np.integer):
                raise ValueError(f"{what}[{key!r}] must be (B, {length}) token ids; got {out[key].dtype}{out[key].shape}")
    batch = out["tokens"].shape[0]
    if out.get("tokens_2", out["tokens"]).shape[0] != batch or out["zero_text"].shape != (batch,):
        raise ValueError(f"{what}: entries disagree on the batch size: {jax.tree.map(np.shape, out)}")
    out["zero_text"] = out["zero_text"].astype(np.float32)
    return out


def _add_time_ids(config: LDMConfig, inputs: dict[str, Any], micro: MicroConditioning, hw: tuple[int, int], *,
                  img2img: bool) -> None:
    """Adds the micro-conditioning "time_ids" (B, N) to inputs' cond and uncond for "text_time" UNets."""
    if not config.text_time:
        return
    if not isinstance(micro, MicroConditioning):
        raise TypeError(f"micro must be a pipeline.MicroConditioning, got {type(micro).__name__}")
    f = config.downsample_factor
    pos, neg = micro.time_ids(config.num_time_ids, hw[0] * f, hw[1] * f, img2img=img2img)
    batch = inputs["index"].shape[0]
    inputs["cond"]["time_ids"] = np.tile(pos, (batch, 1))
    inputs["uncond"]["time_ids"] = np.tile(neg, (batch, 1))


def _check_cond(config: LDMConfig, cond: np.ndarray, what: str) -> None:
    if config.tokenizer_kind is not None:
        expected = f"(B, {config.max_length}) token ids"
        ok = cond.ndim == 2 and cond.shape[1] == config.max_length and np.issubdtype(cond.dtype, np.integer)
    elif config.diffusion.conditioning_key == "adm" and config.unet.num_classes == "sequential":
        expected = f"(B, {config.unet.adm_in_channels}) vectors"
        ok = cond.ndim == 2 and cond.shape[1] == config.unet.adm_in_channels
    else:
        expected = "(B,) integer labels"
        ok = cond.ndim == 1 and np.issubdtype(cond.dtype, np.integer)
    if not ok:
        raise ValueError(f"{what} must be {expected}; got {cond.dtype}{cond.shape}")


def _batch_size(cond, noise, images, batch_size) -> int:
    sizes = {name: np.shape(x)[0] for name, x in (("cond", cond), ("noise", noise), ("images", images))
             if x is not None}
    if batch_size is not None:
        sizes["batch_size"] = batch_size
    if not sizes:
        raise ValueError("cannot tell the batch size: an unconditional txt2img needs batch_size (or noise)")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch sizes disagree: {sizes}")
    return sizes.popitem()[1]


# ---------------------------------------------------------------------------------------------- the program


def _run(kind, config, params, sampler, inputs, hw, mesh, options, chunk_size, clip_skip=0, output="images",
         nets=None) -> jax.Array:
    if kind != "inpaint" and config.concat_channels:
        raise ValueError(f"{kind}: this UNet takes {config.concat_channels} concat channels beside the latents "
                         f"(in_channels {config.unet.in_channels}); use inpaint() for inpainting models")
    mesh = mesh or parallel.make_mesh()
    batch = inputs["index"].shape[0]  # this process's examples
    if "noise" in inputs and inputs["noise"].shape != (batch, *hw, config.latent_channels):
        raise ValueError(f"noise has shape {inputs['noise'].shape}; expected {(batch, *hw, config.latent_channels)}")
    global_batch = batch * jax.process_count()
    if global_batch % mesh.size:
        raise ValueError(f"batch size {global_batch} is not divisible by the {mesh.size} devices of the mesh; "
                         f"pad the batch to a multiple of {mesh.size}")
    share = global_batch // mesh.size
    chunk = share if chunk_size is None else min(chunk_size, share)
    if chunk < 1 or share % chunk:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 and divide each device's {share} examples")
    if not isinstance(options, RunOptions):
        raise TypeError(f"{kind}: options must be an ldm.RunOptions, got {type(options).__name__}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(clip_skip, (int, np.integer)) or clip_skip < 0:
        raise ValueError(f"clip_skip must be an integer >= 0, got {clip_skip!r}")
    guided = "cond" in inputs and bool(np.any(inputs["scale"] > 1.0))
    fn = _compiled(kind, config, mesh, options, hw, chunk, jax.tree.structure(inputs), guided, int(clip_skip),
                   None if nets is None else nets[0])
    replicated = parallel.replicated(mesh)
    params, sampler = (_replicate(tree, replicated) for tree in (params, sampler))
    if nets is not None:  # the ControlNets' params travel with the model's, replicated too
        params = {**params, CONTROLNETS: _replicate(nets[1], replicated)}
    inputs = _place_inputs(inputs, mesh)
    with compile_cache.watch() as compiles:  # a first call traces and compiles (or reads the persistent cache)
        out = fn(params, sampler, inputs)
        if output == "images":
            first_stage = params.get(FIRST_STAGE, {})  # {}: a first stage without params (the identity)
            out = _compiled_decoder(config, mesh, options, chunk)(first_stage, out)
    if compiles:
        log.info("%s program: %s", kind, compiles.describe())
    return out


def _replicate(tree: Any, replicated: NamedSharding) -> Any:
    """`tree` on every device of the mesh. Already-placed trees are returned as they are: `jax.device_put`
    walks every leaf even then (10 ms for the tiny model's ~500 leaves, 50 ms for SD's, per call)."""
    if all(isinstance(x, jax.Array) and x.sharding == replicated for x in jax.tree.leaves(tree)):
        return tree
    return jax.device_put(tree, replicated)


def _place_inputs(inputs: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    batched = {k: v for k, v in inputs.items() if k not in _SCALAR_INPUTS}
    scalars = {k: v for k, v in inputs.items() if k in _SCALAR_INPUTS}
    if jax.process_count() > 1:
        batched = parallel.host_local_to_global(batched, mesh)
    else:
        batched = jax.device_put(batched, parallel.batch_sharding(mesh))
    return {**batched, **jax.device_put(scalars, parallel.replicated(mesh))}


_SCALAR_INPUTS = ("seed", "strength", "first_step", "stop_step", "control_keep")
FIRST_STAGE = "first_stage"  # the params entry the decoding program takes
CONTROLNETS = "controlnets"  # the params entry holding the ControlNets' params inside the program


@functools.lru_cache(maxsize=64)
def _compiled(kind: str, config: LDMConfig, mesh: Mesh, options: RunOptions, hw: tuple[int, int], chunk: int,
              structure: Any, guided: bool, clip_skip: int, control: ControlKey | None = None):
    """The jitted sampling program (inputs -> latents) for one (kind, config, mesh, run-time options, latent size,
    chunk size, inputs' structure, whether guidance runs the unconditional branch, clip_skip, the ControlNets'
    configs and guess mode)."""
    batch_spec, rep = P(parallel.BATCH_AXES), P()
    keys = jax.tree.unflatten(structure, [None] * structure.num_leaves).keys()
    in_specs = (rep, rep, {k: (rep if k in _SCALAR_INPUTS else batch_spec) for k in keys})
    generate = functools.partial(_generate, kind, config, options, hw, guided, clip_skip, control)

    def program(params, sampler, inputs):
        _TRACES[kind] += 1
        return _in_chunks(functools.partial(generate, params, sampler), inputs, chunk)

    per_device = jax.shard_map(program, mesh=mesh, in_specs=in_specs, out_specs=batch_spec, check_vma=False)
    return jax.jit(per_device, out_shardings=NamedSharding(mesh, batch_spec))


@functools.lru_cache(maxsize=16)
def _compiled_decoder(config: LDMConfig, mesh: Mesh, options: RunOptions, chunk: int):
    """The jitted decoding program: (first-stage params, latents (B, h, w, C) sharded over the batch) -> images
    (B, H, W, 3) in [-1, 1], each device's examples `chunk` at a time. Its own program, apart from sampling: one
    compile (and one compilation-cache entry) serves every sampler, step count and pipeline kind at a size, and it
    is compiled while the sampling program, already dispatched, runs."""
    batch_spec = P(parallel.BATCH_AXES)

    def decode(first_stage, latents):
        images = ldm.decode_first_stage(config, {FIRST_STAGE: first_stage}, latents, options=options)
        return jnp.clip(images, -1.0, 1.0)

    def program(first_stage, latents):
        _TRACES["decode"] += 1
        return _in_chunks(lambda x: decode(first_stage, x["latents"]), {"latents": latents}, chunk)

    per_device = jax.shard_map(program, mesh=mesh, in_specs=(P(), batch_spec), out_specs=batch_spec, check_vma=False)
    return jax.jit(per_device, out_shardings=NamedSharding(mesh, batch_spec))


def _in_chunks(generate, inputs: dict[str, jax.Array], chunk: int) -> jax.Array:
    """generate(inputs) over the device's examples `chunk` at a time (a `lax.map`); scalars go to every chunk."""
    scalars = {k: v for k, v in inputs.items() if k in _SCALAR_INPUTS}
    batched = {k: v for k, v in inputs.items() if k not in scalars}
    share = jax.tree.leaves(batched)[0].shape[0]
    if chunk == share:
        return generate(inputs)
    chunks = jax.tree.map(lambda x: x.reshape(share // chunk, chunk, *x.shape[1:]), batched)  # (n, chunk, ...)
    images = jax.lax.map(lambda c: generate({**c, **scalars}), chunks)
    return images.reshape(share, *images.shape[2:])


def _generate(kind, config, options, hw, guided, clip_skip, control, params, sampler, inputs) -> jax.Array:
    """One device's share: inputs hold its examples. Returns its latents (b, h, w, C)."""
    example_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(inputs["seed"]), i))(inputs["index"])
    shape = (*hw, config.latent_channels)
    if "noise" in inputs:
        noise = inputs["noise"]
    else:
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(example_keys)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, STEP_STREAM))(example_keys)
    model_fn, cond = _denoiser(config, options, params, inputs, guided, clip_skip, control)
    extra = {} if control is None else {"step_cond": keep_at_step(inputs["control_keep"])}
    if kind in ("img2img", "inpaint"):
        images = inputs["image"]
        extra.update(init_latent=ldm.encode_first_stage(config, params, images, options=options),
                     strength=inputs["strength"])
    if kind == "inpaint":
        if config.concat_channels:
            extra["extra_channels"] = ldm.inpaint_conditioning(config, params, images, inputs["mask"],
                                                               options=options)
        else:
            f = config.downsample_factor
            extra["mask"] = (inputs["mask"][:, ::f, ::f, :] >= 0.5).astype(jnp.float32)
    if "stop_step" in inputs:
        extra["stop_step"] = inputs["stop_step"]
    if kind == "refine":
        extra.update(start_latent=inputs["latents"], first_step=inputs["first_step"])
    return sample(sampler, model_fn, noise, step_keys, cond, **extra)


def _denoiser(config, options, params, inputs, guided, clip_skip, control=None):
    """(model_fn(x, t, cond), cond) for `sample`: classifier-free guided when the model is conditional and some
    scale exceeds 1 (`guided`); examples with scale <= 1 get the conditional prediction (scale 1). With ControlNets
    (`control`, a ControlKey) the UNet gets their residuals and cond is {"unet": ..., "control": ...}
    (`control.controlled_unet`)."""

    def model_fn(x, t, cond):
        return ldm.apply_unet(config, params, x, t, cond, options=options)

    if control is not None:
        model_fn = controlled_unet(config, options, control, params, params[CONTROLNETS],
                                   cond_half=guided and control.guess_mode)
    cond = uncond = None
    if guided:  # one text-encoder pass (and one traced copy of it in the program) over [cond; uncond]
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), inputs["cond"], inputs["uncond"])
        encoded = ldm.encode_conditioning(config, params, both, options=options, clip_skip=clip_skip)
        half = jax.tree.leaves(inputs["cond"])[0].shape[0]
        cond, uncond = (jax.tree.map(lambda x, s=s: x[s], encoded) for s in (slice(None, half), slice(half, None)))
    elif "cond" in inputs:
        cond = ldm.encode_conditioning(config, params, inputs["cond"], options=options, clip_skip=clip_skip)
    if control is not None:
        ctl = {"images": inputs["control_images"], "scale": inputs["control_scale"]}
        cond, uncond = ({"unet": c, "control": ctl} for c in (cond, uncond))
    if not guided:
        return model_fn, cond
    return classifier_free_guidance(model_fn), guided_cond(cond, uncond, jnp.maximum(inputs["scale"], 1.0))


__all__ = ["CONTROLNETS", "Control", "KINDS", "OUTPUTS", "STEP_STREAM", "MicroConditioning", "encode_prompts", "refine", "img2img", "inpaint", "inspect_prompts", "make_model_sampler",
           "place_params", "to_uint8", "trace_count", "txt2img"]
