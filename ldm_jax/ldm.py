"""LatentDiffusion: first stage + cond stage + UNet as pure functions over (config, params).

Config: `LDMConfig` (frozen) holds the four parts: `first_stage` (AutoencoderConfig), `cond_stage`
(ClipTextConfig | BertEmbedderConfig | ClassEmbedderConfig | None), `unet` (UNetConfig) and `diffusion`
(DiffusionConfig: the noise schedule, prediction type, latent scaling, conditioning key and training-loss
options). `ldm_config(config)` builds it from a config's `first_stage`, `cond_stage`, `unet` and `diffusion`
sections (model configs written before the one `diffusion` section may also hold an `ldm` section; merged).

Params: a dict {"first_stage": ..., "cond_stage": ..., "unet": ...} of Flax param trees without the
"params" level (what the converters return), plus "logvar" (T,) when `diffusion.learn_logvar`. The
"cond_stage" entry is absent when the model has no cond stage, the "first_stage" entry when its first stage has
no params (the identity).

Latents: KL first stages are sampled (or their mode taken) and multiplied by `scale_factor` (0.18215 for SD);
VQ first stages give the pre-quantisation h, multiplied by `scale_factor` (1.0 in every LDM VQ config);
decoding divides by it and the VQ decoder quantises. The identity first stage (`first_stage.kind="identity"`, f = 1,
no params) makes a pixel-space diffusion model (the paper's LDM-1): its latents are the images in [-1, 1] times
`scale_factor` (1.0 for pixel space; scale_by_std works as for any first stage: 1 / std of the first batch's
images), taken through the same functions as VQ's h (encode, decode, precomputed moments).

Run-time options (`RunOptions`: attention implementation, remat, compute and param dtypes) are not part of
LDMConfig: `modules(config, options)` builds the modules with them, and every function here that runs a
module takes `options=`.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.config import build_dataclass
from ldm_jax.diffusion.guidance import inpaint_channels
from ldm_jax.diffusion.micro_conditioning import MicroConditioning, last_entry
from ldm_jax.diffusion.schedule import (LOSS_WEIGHTINGS, PREDICTION_TYPES, NoiseSchedule, ScheduleConfig,
                                        logvar_weighted_loss, loss_weights, make_schedule, q_sample,
                                        training_target)
from ldm_jax.models.attention import check_attention
from ldm_jax.models.autoencoder import (AutoencoderConfig, DiagonalGaussian, autoencoder_config, build_autoencoder,
                                        init_autoencoder)
from ldm_jax.models.text import (ClassEmbedderConfig, ClipTextConfig, CondStageConfig, build_cond_stage,
                                 cond_stage_config, cond_stage_inputs_shape)
from ldm_jax.models.layers import check_remat
from ldm_jax.models.tokenizer import tokenize
from ldm_jax.models.unet import UNetConfig, build_unet, init_unet, unet_config

CONDITIONING_KEYS = ("crossattn", "concat", "hybrid", "adm", None)
LOSS_TYPES = ("l2", "l1")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion stage: schedule, what the UNet predicts, latent scaling, conditioning and loss options.

    schedule: the beta schedule (`ldm_jax.diffusion.schedule.ScheduleConfig`).
    prediction_type: "eps", "x0" or "v" (the reference's parameterization eps / x0 / v).
    scale_factor: latents are multiplied by it after encoding (SD: 0.18215; VQ models: 1.0).
    scale_by_std: the reference's option to set scale_factor = 1 / std of the first training batch's
      latents (`ldm_jax.training.train_ldm.first_batch_scale`), then stored in the config the run saves.
    conditioning_key: "crossattn" (context by cross-attention), "concat" (channels appended to x),
      "hybrid" (both), "adm" (class labels / vectors added to the time embedding) or None (unconditional).
    cond_drop_prob: per-example probability of replacing the conditioning by the null conditioning
      (empty-prompt context, null class, zero vector) during training, for classifier-free guidance.
    loss_type: "l2" (mean squared error) or "l1" per element, averaged per example.
    loss_weighting: "uniform" or "min_snr" (with `min_snr_gamma`), see `schedule.loss_weights`.
    learn_logvar / logvar_init: the reference's per-timestep log-variance (loss / exp(logvar) + logvar).
    image_size, channels: the latent side and channel count (what the sampler draws by default).
    force_zeros_for_empty_prompt: without a negative prompt, classifier-free guidance's unconditional text
      conditioning is all zeros (context and pooled embedding) instead of the encoded empty prompt (SDXL base,
      diffusers' pipeline option of that name); an explicit negative prompt, even "", is encoded as usual.
    """

    schedule: ScheduleConfig = ScheduleConfig()
    prediction_type: str = "eps"
    scale_factor: float = 0.18215
    scale_by_std: bool = False
    conditioning_key: str | None = "crossattn"
    cond_drop_prob: float = 0.0
    loss_type: str = "l2"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    learn_logvar: bool = False
    logvar_init: float = 0.0
    image_size: int = 64
    channels: int = 4
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self):
        errors = []
        if self.prediction_type not in PREDICTION_TYPES:
            errors.append(f"prediction_type={self.prediction_type!r}, expected one of {PREDICTION_TYPES}")
        if self.conditioning_key not in CONDITIONING_KEYS:
            errors.append(f"conditioning_key={self.conditioning_key!r}, expected one of {CONDITIONING_KEYS}")
        if not self.scale_factor > 0:
            errors.append(f"scale_factor={self.scale_factor} must be > 0")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            errors.append(f"cond_drop_prob={self.cond_drop_prob} must be in [0, 1]")
        if self.loss_type not in LOSS_TYPES:
            errors.append(f"loss_type={self.loss_type!r}, expected one of {LOSS_TYPES}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            errors.append(f"loss_weighting={self.loss_weighting!r}, expected one of {LOSS_WEIGHTINGS}")
        if not self.min_snr_gamma > 0:
            errors.append(f"min_snr_gamma={self.min_snr_gamma} must be > 0")
        if self.image_size < 1 or self.channels < 1:
            errors.append(f"image_size={self.image_size} and channels={self.channels} must be >= 1")
        if errors:
            raise ValueError("invalid DiffusionConfig: " + "; ".join(errors))


LEGACY_DIFFUSION_SECTION = "ldm"  # read by `ldm_config` from old saved configs, never written


def diffusion_config(*sections: Any) -> DiffusionConfig:
    """DiffusionConfig from a flat `diffusion` config section (ConfigDict or mapping).

    Fields of ScheduleConfig (beta_schedule, num_timesteps, linear_start, ...) go to `schedule` (a nested
    `schedule` mapping or ScheduleConfig is accepted too); the others must be DiffusionConfig fields. Several
    sections are merged: `ldm_config` passes a legacy `ldm` section this way. A field given by two sections, or
    known to neither, is a ValueError.
    """
    schedule_fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
    merged: dict[str, Any] = {}
    for section in sections:
        values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        twice = sorted(set(values) & set(merged))
        if twice:
            raise ValueError(f"diffusion config: field(s) {twice} are set in two sections (diffusion and ldm)")
        merged.update(values)
    schedule = {k: merged.pop(k) for k in list(merged) if k in schedule_fields}
    if isinstance(merged.get("schedule"), ScheduleConfig):
        if schedule:
            raise ValueError(f"diffusion config: schedule fields {sorted(schedule)} given beside a ScheduleConfig")
        schedule_obj = merged.pop("schedule")
    else:
        schedule_obj = build_dataclass(ScheduleConfig, {**merged.pop("schedule", {}), **schedule},
                                       where="diffusion.schedule")
    config = build_dataclass(DiffusionConfig, merged, where="diffusion")
    return dataclasses.replace(config, schedule=schedule_obj)


@dataclasses.dataclass(frozen=True)
class LDMConfig:
    """A whole latent diffusion model: first stage, up to two text towers, UNet and diffusion settings.

    `cond_stage_2` is SDXL's second text tower (OpenCLIP ViT-bigG, diffusers' text_encoder_2): both towers read
    the prompt (each with its own tokenizer) and their contexts are concatenated on the feature axis (768 + 1280
    = 2048 for SDXL). A UNet with `addition_embed_type="text_time"` also takes the last tower's projected pooled
    output (`text_embeds`) and `num_time_ids` micro-conditioning numbers (SDXL base: 6 sizes / crops; refiner:
    5, with the aesthetic score). The SDXL refiner has one tower (bigG) in `cond_stage`.

    Checked on construction: the UNet's output channels equal the latent channels (first_stage.embed_dim ==
    diffusion.channels); "crossattn"/"hybrid" need a cond stage whose context width (summed over the towers) is
    the UNet's context_dim; "concat"/"hybrid" need UNet in_channels > latent channels, the others equality;
    "adm" needs UNet num_classes; "text_time" needs a projecting last tower whose width fits adm_in_channels.
    """

    first_stage: AutoencoderConfig
    unet: UNetConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    cond_stage: CondStageConfig | None = None
    cond_stage_2: ClipTextConfig | None = None

    def __post_init__(self):
        errors = _ldm_config_errors(self)
        if errors:
            raise ValueError("invalid LDMConfig: " + "; ".join(errors))

    @property
    def latent_channels(self) -> int:
        """Channels of the (scaled) latents the UNet denoises."""
        return self.first_stage.embed_dim

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (the first stage's f)."""
        return self.first_stage.downsample_factor

    @property
    def concat_channels(self) -> int:
        """Channels the caller appends to x for "concat"/"hybrid" models (SD inpainting: 5), else 0."""
        return self.unet.in_channels - self.latent_channels

    @property
    def tokenizer_kind(self) -> str | None:
        """"clip", "bert" or "tokenizer_json" for text cond stages, None otherwise."""
        return getattr(self.cond_stage, "tokenizer_kind", None)

    @property
    def max_length(self) -> int | None:
        """Token length prompts are padded to (77 for CLIP), None without a text cond stage."""
        return getattr(self.cond_stage, "max_length", None) if self.tokenizer_kind else None

    @property
    def pad_token_id(self) -> int | None:
        """Id prompts are padded with (SD v1: 49407, SD v2 / BERT: 0), None without a text cond stage."""
        return getattr(self.cond_stage, "pad_token_id", None) if self.tokenizer_kind else None

    @property
    def text_towers(self) -> tuple[str, ...]:
        """Names of the text towers' param trees in order: ("cond_stage",), ("cond_stage", "cond_stage_2") or ()."""
        if self.tokenizer_kind is None:
            return ()
        return ("cond_stage",) + (("cond_stage_2",) if self.cond_stage_2 is not None else ())

    @property
    def text_time(self) -> bool:
        """Whether the UNet takes SDXL's pooled text embedding and micro-conditioning (`addition_embed_type`)."""
        return self.unet.addition_embed_type == "text_time"

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding a "text_time" UNet takes (the last tower's projection_dim)."""
        if not self.text_time:
            return None
        return getattr(getattr(self, self.text_towers[-1]), "projection_dim", None) if self.text_towers else None

    @property
    def num_time_ids(self) -> int:
        """Micro-conditioning numbers a "text_time" UNet takes (SDXL base 6, refiner 5), else 0."""
        if not self.text_time or self.pooled_dim is None:
            return 0
        return (self.unet.adm_in_channels - self.pooled_dim) // self.unet.addition_time_embed_dim

    @property
    def structured_conditioning(self) -> bool:
        """Whether conditioning inputs are a dict ("tokens", "tokens_2", "time_ids", "zero_text"; SDXL) rather
        than one array of token ids or labels."""
        return self.cond_stage_2 is not None or self.text_time


def _ldm_config_errors(cfg: LDMConfig) -> list[str]:
    errors = []
    key, unet, latent = cfg.diffusion.conditioning_key, cfg.unet, cfg.first_stage.embed_dim
    if cfg.diffusion.channels != latent:
        errors.append(f"diffusion.channels={cfg.diffusion.channels} but the first stage's latents have "
                      f"embed_dim={latent} channels")
    if unet.out_channels != latent:
        errors.append(f"unet.out_channels={unet.out_channels} but the latents have {latent} channels")
    if key in ("concat", "hybrid"):
        if unet.in_channels <= latent:
            errors.append(f"conditioning_key={key!r} needs unet.in_channels > {latent} latent channels "
                          f"(the concat channels come after them), got {unet.in_channels}")
    elif unet.in_channels != latent:
        errors.append(f"unet.in_channels={unet.in_channels} != {latent} latent channels; with "
                      f"conditioning_key={key!r} nothing is concatenated (9-channel inpainting UNets need "
                      f"conditioning_key='hybrid')")
    if cfg.cond_stage_2 is not None and not (isinstance(cfg.cond_stage_2, ClipTextConfig)
                                             and isinstance(cfg.cond_stage, ClipTextConfig)):
        errors.append("cond_stage_2 (a second text tower) needs CLIP text towers in cond_stage and cond_stage_2; got "
                      f"{type(cfg.cond_stage).__name__} and {type(cfg.cond_stage_2).__name__}")
    if key in ("crossattn", "hybrid"):
        width = sum(getattr(cfg, name).context_dim for name in ("cond_stage", "cond_stage_2")
                    if getattr(cfg, name) is not None)
        if cfg.cond_stage is None:
            errors.append(f"conditioning_key={key!r} needs a cond_stage")
        elif not unet.use_spatial_transformer or unet.context_dim != width:
            errors.append(f"the text towers' context width {width} != unet.context_dim "
                          f"{unet.context_dim} (use_spatial_transformer={unet.use_spatial_transformer})")
    elif unet.use_spatial_transformer:
        errors.append(f"unet.use_spatial_transformer=True needs conditioning_key 'crossattn' or 'hybrid', "
                      f"got {key!r}")
    if key == "adm" and unet.num_classes is None:
        errors.append("conditioning_key='adm' needs unet.num_classes (labels or 'sequential' vectors)")
    if key != "adm" and unet.num_classes is not None:
        errors.append(f"unet.num_classes={unet.num_classes!r} needs conditioning_key='adm', got {key!r}")
    if key == "adm" and cfg.cond_stage is not None:
        errors.append("conditioning_key='adm' passes labels straight to the UNet; cond_stage must be None")
    if isinstance(cfg.cond_stage, ClassEmbedderConfig) and key not in ("crossattn", "hybrid"):
        errors.append(f"a class cond stage gives a cross-attention context; conditioning_key={key!r}")
    errors += _text_time_errors(cfg)
    return errors


def _text_time_errors(cfg: LDMConfig) -> list[str]:
    if not cfg.text_time:
        return []
    last = cfg.text_towers[-1] if cfg.text_towers else None
    pooled = getattr(getattr(cfg, last), "projection_dim", None) if last else None
    if pooled is None:
        return [f"unet.addition_embed_type='text_time' needs a text tower with a projection (projection_dim) as "
                f"the last tower; got {last or 'no text tower'}"]
    rest = cfg.unet.adm_in_channels - pooled
    if rest < 1 or rest % cfg.unet.addition_time_embed_dim:
        return [f"unet.adm_in_channels={cfg.unet.adm_in_channels} must be the pooled width {pooled} ({last}."
                f"projection_dim) + N x addition_time_embed_dim {cfg.unet.addition_time_embed_dim}"]
    return []


def ldm_config(config: Any) -> LDMConfig:
    """LDMConfig from a ConfigDict (or mapping: a config file's, a preset's, a saved config.json) with the
    sections first_stage, unet, diffusion and optionally cond_stage and cond_stage_2. Unknown fields raise ValueError.

    Legacy: configs saved before the one `diffusion` section (e.g. a model directory's config.json) may hold
    the DiffusionConfig fields split over `diffusion` (the schedule) and `ldm` (the rest); `ldm` is merged into
    `diffusion` (a field in both is a ValueError). Nothing writes an `ldm` section any more.
    """
    missing = [name for name in ("first_stage", "unet", "diffusion") if name not in config]
    if missing:
        raise ValueError(f"ldm_config: the config lacks section(s) {missing}; it has {sorted(config.keys())}")
    cond = config["cond_stage"] if "cond_stage" in config else None
    cond_2 = config["cond_stage_2"] if "cond_stage_2" in config else None
    diffusion_sections = [config["diffusion"]] + ([config[LEGACY_DIFFUSION_SECTION]]
                                                  if LEGACY_DIFFUSION_SECTION in config else [])
    return LDMConfig(
        first_stage=autoencoder_config(config["first_stage"]),
        unet=unet_config(config["unet"]),
        diffusion=diffusion_config(*diffusion_sections),
        cond_stage=None if cond is None else cond_stage_config(cond),
        cond_stage_2=None if cond_2 is None else cond_stage_config(cond_2),
    )


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Run-time choices that are not architecture: never saved in a model's config, given at load or call time.

    attention: the attention implementation of every block (UNet, autoencoder, text encoder): "xla",
      "jax_nn" or "chunked" (`ldm_jax.models.attention`).
    remat: False, True (recompute each block in the backward pass) or a `jax.checkpoint_policies` name.
    dtype: the compute dtype (float32 or bfloat16); norms, softmax and sampler arithmetic stay float32.
    param_dtype: the dtype params are stored in while training or sampling (float32 or bfloat16; for sampling,
      `store.load_model(param_dtype=)` reads them in it, and the modules compute in `dtype`, norms, softmax and the
      last convs in float32, whatever the params' dtype).
    """

    attention: str = "xla"
    remat: bool | str = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32


COMPUTE_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def run_options(*, attention: str | None = None, remat: bool | str | None = None, dtype: Any = None,
                param_dtype: Any = None, where: str = "", base: RunOptions = RunOptions()) -> RunOptions:
    """`base` with the given run-time options replaced, each checked (the one way to build RunOptions from
    user input: `store.load_model` and the training configs). dtype, param_dtype: a name in COMPUTE_DTYPES or a
    jnp dtype (float32 or bfloat16).
    `where` prefixes the option names in errors (e.g. "train." names train.attention); a bad value is a
    ValueError naming the option, the value and the choices."""
    changes: dict[str, Any] = {}
    if attention is not None:
        changes["attention"] = check_attention(attention, f"{where}attention")
    if remat is not None:
        changes["remat"] = check_remat(remat, f"{where}remat")
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is None:
            continue
        if isinstance(value, str):
            if value not in COMPUTE_DTYPES:
                raise ValueError(f"{where}{name} is {value!r}; expected one of {sorted(COMPUTE_DTYPES)}")
            value = COMPUTE_DTYPES[value]
        elif name == "param_dtype" and jnp.dtype(value) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"{where}{name} is {value!r}; expected float32 or bfloat16")
        changes[name] = value
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample or fine-tune: its config, params (layout in the module docstring), a
    tokenizer (transformers tokenizer object) or None, where it came from (`model_id`, e.g. a path) and the
    run-time options it was loaded with (`options`). `scheduler_config`: the diffusers scheduler_config.json
    the model came with (its sampling timesteps, spacing and offset), or None. `tokenizer_2`: the second text
    tower's tokenizer (SDXL's tokenizer_2), None for one-tower models. `adapters`: what `store.apply_adapters`
    applied, in order: ("lora", file, scale) and ("embedding", file, token) entries (run-time, never saved)."""

    config: LDMConfig
    params: dict[str, Any]
    tokenizer: Any = None
    model_id: str = ""
    options: RunOptions = RunOptions()
    scheduler_config: dict[str, Any] | None = None
    tokenizer_2: Any = None
    adapters: tuple[tuple[str, str, Any], ...] = ()

    def tokenizers(self) -> dict[str, Any]:
        """{text tower name: its tokenizer} for `config.text_towers` (cond_stage -> tokenizer, cond_stage_2 ->
        tokenizer_2)."""
        return {name: self.tokenizer if name == "cond_stage" else self.tokenizer_2 for name in self.config.text_towers}


# ---------------------------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def modules(config: LDMConfig, options: RunOptions = RunOptions()) -> LDMModules:
    """The Flax modules of `config` built with the run-time `options` (cached: both are hashable).

    `options.attention` and the dtypes reach all three modules; `options.remat` the UNet and the first stage
    (the text encoder has no remat). A bad attention or remat value is a ValueError.
    """
    kw = dict(attention=options.attention, dtype=options.dtype, param_dtype=options.param_dtype)
    cond = None if config.cond_stage is None else build_cond_stage(config.cond_stage, **kw)
    cond_2 = None if config.cond_stage_2 is None else build_cond_stage(config.cond_stage_2, **kw)
    return LDMModules(first_stage=build_autoencoder(config.first_stage, remat=options.remat, **kw), cond_stage=cond,
                      unet=build_unet(config.unet, remat=options.remat, **kw), cond_stage_2=cond_2)


@dataclasses.dataclass(frozen=True)
class LDMModules:
    """The Flax modules of a latent diffusion model (cond_stage None when unconditional/"adm"; cond_stage_2 the
    second text tower of SDXL, else None)."""

    first_stage: nn.Module
    cond_stage: nn.Module | None
    unet: nn.Module
    cond_stage_2: nn.Module | None = None


def init_params(config: LDMConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh random params in the LDM layout ({"first_stage"?, "cond_stage"?, "unet", "logvar"?}), float32.

    Works under `jax.eval_shape` (shapes only) and `jax.jit` (sharded init).
    """
    m = modules(config)
    k_fs, k_cs, k_unet = jax.random.split(key, 3)
    k_cs2 = jax.random.fold_in(key, 3)  # a fourth stream that leaves the first three (older models' init) alone
    unet_kw = {"num_time_ids": config.num_time_ids} if config.text_time else {}
    params = {"unet": init_unet(m.unet, k_unet, **unet_kw)["params"]}
    if config.first_stage.has_params:  # (the identity first stage has none: no entry, as a saved model has none)
        params = {"first_stage": init_autoencoder(m.first_stage, k_fs)["params"], **params}
    for name, module, k in (("cond_stage", m.cond_stage, k_cs), ("cond_stage_2", m.cond_stage_2, k_cs2)):
        if module is not None:
            inputs = jnp.zeros(cond_stage_inputs_shape(getattr(config, name), 1), jnp.int32)
            params[name] = module.init(k, inputs)["params"]
    if config.diffusion.learn_logvar:
        params["logvar"] = jnp.full((config.diffusion.schedule.num_timesteps,), config.diffusion.logvar_init,
                                    jnp.float32)
    return params


def param_shapes(config: LDMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of `init_params(config)`, computed abstractly (nothing allocated) and cached per
    config: the contract every loader and converter checks params against."""
    return dict(_param_shapes(config))


@functools.lru_cache(maxsize=16)
def _param_shapes(config: LDMConfig) -> Mapping[tuple[str, ...], tuple[int, ...]]:
    tree = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return types.MappingProxyType({path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()})


def noise_schedule(config: LDMConfig) -> NoiseSchedule:
    """The model's `NoiseSchedule` (float32 tables of length num_timesteps)."""
    return make_schedule(config.diffusion.schedule)


def _part(params: Mapping[str, Any], name: str) -> Any:
    if name not in params:
        raise KeyError(f"LDM params have no {name!r} entry; they have {sorted(params)} (expected "
                       f"first_stage, unet, and cond_stage for conditional models)")
    return params[name]


# ------------------------------------------------------------------------------------------- first stage


def _first_stage_variables(config: LDMConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """The first stage's Flax variables: {"params": params["first_stage"]}, or {} for the identity (no params; a
    params dict without a "first_stage" entry is then fine)."""
    return {"params": _part(params, "first_stage")} if config.first_stage.has_params else {}


def encode_first_stage(config: LDMConfig, params: Mapping[str, Any], images: jax.Array,
                       key: jax.Array | None = None, *, options: RunOptions = RunOptions()) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> scaled latents (B, H/f, W/f, C) float32.

    KL: a posterior sample when `key` is given (the reference's `get_first_stage_encoding`), else its mode;
    VQ: the pre-quantisation h (`key` unused); identity: the images. All times `diffusion.scale_factor`. `options`:
    the run-time options of the modules (attention, remat, dtypes), as in every function below.
    """
    model = modules(config, options).first_stage
    variables = _first_stage_variables(config, params)
    if config.first_stage.kind == "kl":
        posterior = model.apply(variables, images, method=model.encode)
        z = posterior.mode() if key is None else posterior.sample(key)
    else:
        z = model.apply(variables, images, method=model.encode)
    return z.astype(jnp.float32) * config.diffusion.scale_factor


def decode_first_stage(config: LDMConfig, params: Mapping[str, Any], latents: jax.Array, *,
                       options: RunOptions = RunOptions()) -> jax.Array:
    """Scaled latents (B, h, w, C) -> images (B, h*f, w*f, 3) float32 (about [-1, 1], not clipped).

    Divides by `diffusion.scale_factor` first; a VQ decoder quantises to its codebook; the identity returns it.
    """
    model = modules(config, options).first_stage
    return model.apply(_first_stage_variables(config, params), latents / config.diffusion.scale_factor,
                       method=model.decode).astype(jnp.float32)


def first_stage_moments(config: LDMConfig, params: Mapping[str, Any], images: jax.Array, *,
                        options: RunOptions = RunOptions()) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> what the encoder determines, unscaled float32: KL: the posterior's
    [mean, logvar] (B, H/f, W/f, 2C) (logvar clipped as DiagonalGaussian does); VQ: the pre-quantisation h
    (B, H/f, W/f, C); identity: the images. Precomputed-latent training stores these (`latents_from_moments`)."""
    model = modules(config, options).first_stage
    encoded = model.apply(_first_stage_variables(config, params), images, method=model.encode)
    if config.first_stage.kind == "kl":
        return jnp.concatenate([encoded.mean, encoded.logvar], axis=-1).astype(jnp.float32)
    return encoded.astype(jnp.float32)


def latents_from_moments(config: LDMConfig, moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """`first_stage_moments` output -> scaled latents (B, h, w, C) float32, exactly as `encode_first_stage`:
    KL: a posterior sample when `key` is given, else the mean; VQ: h; identity: the images. All times
    `diffusion.scale_factor`."""
    moments = jnp.asarray(moments, jnp.float32)
    if config.first_stage.kind == "kl":
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.mode() if key is None else posterior.sample(key)
    else:
        z = moments
    return z * config.diffusion.scale_factor


# ------------------------------------------------------------------------------------------- conditioning


def encode_conditioning(config: LDMConfig, params: Mapping[str, Any], inputs: Any, *,
                        options: RunOptions = RunOptions(), clip_skip: int = 0) -> dict[str, jax.Array]:
    """Conditioning inputs -> the UNet conditioning dict.

    inputs: token ids (B, L) int for a text cond stage, labels (B,) int for a class cond stage (context
    (B, 1, D)) or for "adm" with int num_classes, vectors (B, adm_in_channels) for "adm" "sequential".
    Models with `structured_conditioning` (SDXL) take a dict: "tokens" (B, L) ids for cond_stage, "tokens_2"
    (B, L2) for cond_stage_2, "time_ids" (B, num_time_ids) float micro-conditioning ("text_time" UNets), and
    optionally "zero_text" (B,) float, 1 where the text conditioning (context and pooled) is replaced by zeros
    (diffusers' force_zeros_for_empty_prompt).
    clip_skip: CLIP blocks to skip before the configured output layer (static; diffusers' `clip_skip`).
    Returns {"context": (B, L, D)} for "crossattn"/"hybrid" (the towers' contexts concatenated on the feature
    axis), plus {"y": (B, pooled), "time_ids": (B, N)} for "text_time" UNets; {"y": ...} for "adm". Concat
    channels are not made here (see `inpaint_conditioning`).
    """
    key = config.diffusion.conditioning_key
    if key == "adm":
        return {"y": inputs}
    if key not in ("crossattn", "hybrid"):
        raise ValueError(f"encode_conditioning: conditioning_key={key!r} has no cond stage to encode with")
    m = modules(config, options)
    if not config.structured_conditioning:
        kw = {"clip_skip": clip_skip} if clip_skip else {}
        return {"context": m.cond_stage.apply({"params": _part(params, "cond_stage")}, inputs, **kw)}
    _check_structured(config, inputs)
    contexts, pooled = [], None
    for name, ids in zip(config.text_towers, ("tokens", "tokens_2")):
        module = getattr(m, name)
        out = module.apply({"params": _part(params, name)}, inputs[ids], clip_skip=clip_skip, method=module.encode)
        contexts.append(out.context)
        pooled = out.text_embeds
    cond = {"context": jnp.concatenate(contexts, axis=-1) if len(contexts) > 1 else contexts[0]}
    if config.text_time:
        cond.update(y=pooled, time_ids=jnp.asarray(inputs["time_ids"], jnp.float32))
    if "zero_text" in inputs:
        keep = 1.0 - jnp.asarray(inputs["zero_text"], jnp.float32)
        for name in ("context", "y"):
            if name in cond:
                cond[name] = cond[name] * keep.reshape((-1,) + (1,) * (cond[name].ndim - 1)).astype(cond[name].dtype)
    return cond


def _check_structured(config: LDMConfig, inputs: Any) -> None:
    """ValueError unless `inputs` is the dict `encode_conditioning` expects for this model."""
    wanted = {"tokens"} | ({"tokens_2"} if config.cond_stage_2 is not None else set())
    if config.text_time:
        wanted.add("time_ids")
    if not isinstance(inputs, Mapping) or not wanted <= set(inputs) or set(inputs) - wanted - {"zero_text"}:
        got = sorted(inputs) if isinstance(inputs, Mapping) else f"an array of shape {jnp.shape(inputs)}"
        raise ValueError(f"encode_conditioning: this model (text towers {config.text_towers}, text_time="
                         f"{config.text_time}) takes a dict with {sorted(wanted)} (and optionally zero_text); "
                         f"got {got}")
    if config.text_time and jnp.shape(inputs["time_ids"])[-1] != config.num_time_ids:
        raise ValueError(f"encode_conditioning: time_ids must be (B, {config.num_time_ids}) (micro-conditioning "
                         f"numbers of this UNet); got {jnp.shape(inputs['time_ids'])}")


def null_inputs(config: LDMConfig, batch: int, empty_prompt_ids: Any = None) -> Any:
    """The unconditional inputs for classifier-free guidance, leading size `batch`.

    Text cond stages: `empty_prompt_ids` (L,) or (1, L) (the tokenised "" from `empty_prompt_ids`) repeated;
    models with `structured_conditioning` (SDXL): a dict {"tokens": (B, L), "tokens_2": (B, L2)?} of each tower's
    empty prompt repeated (from the dict `empty_prompt_ids` gives; the micro-conditioning is not part of it);
    class cond stage / "adm" labels: the null class (the last one); "adm" vectors: zeros.
    """
    cond = config.cond_stage
    if config.tokenizer_kind is not None:
        if empty_prompt_ids is None:
            raise ValueError("null_inputs: a text cond stage needs empty_prompt_ids (the tokenised empty prompt; "
                             "see ldm_jax.ldm.empty_prompt_ids)")
        if config.structured_conditioning:
            wanted = _token_keys(config)
            if not isinstance(empty_prompt_ids, Mapping) or set(empty_prompt_ids) != set(wanted):
                got = sorted(empty_prompt_ids) if isinstance(empty_prompt_ids, Mapping) else "an array"
                raise ValueError(f"null_inputs: this model's empty prompt is a dict with {sorted(wanted)} (one "
                                 f"entry per text tower, see ldm_jax.ldm.empty_prompt_ids); got {got}")
            return {key: _repeat_ids(empty_prompt_ids[key], batch, getattr(config, name).max_length, key)
                    for key, name in wanted.items()}
        return _repeat_ids(empty_prompt_ids, batch, config.max_length, "empty_prompt_ids")
    if isinstance(cond, ClassEmbedderConfig):
        return jnp.full((batch,), cond.null_class, jnp.int32)
    if config.diffusion.conditioning_key == "adm":
        if config.unet.num_classes == "sequential":
            return jnp.zeros((batch, config.unet.adm_in_channels), jnp.float32)
        return jnp.full((batch,), config.unet.num_classes - 1, jnp.int32)
    raise ValueError(f"null_inputs: conditioning_key={config.diffusion.conditioning_key!r} has no conditioning "
                     "inputs")


def _token_keys(config: LDMConfig) -> dict[str, str]:
    """{conditioning input key: text tower name}: {"tokens": "cond_stage", "tokens_2": "cond_stage_2"?}."""
    return dict(zip(("tokens", "tokens_2"), config.text_towers))


def _repeat_ids(ids: Any, batch: int, max_length: int, what: str) -> jax.Array:
    ids = jnp.asarray(ids, jnp.int32).reshape(1, -1)
    if ids.shape[1] != max_length:
        raise ValueError(f"null_inputs: {what} has length {ids.shape[1]}; expected max_length {max_length}")
    return jnp.broadcast_to(ids, (batch, ids.shape[1]))


def empty_prompt_ids(config: LDMConfig, tokenizer: Any, tokenizer_2: Any = None) -> Any:
    """The tokenised empty prompt "" (1, max_length) int32, padded as the model expects (host only).

    Models with `structured_conditioning` (SDXL) get a dict {"tokens": (1, L), "tokens_2": (1, L2)?}: each text
    tower's "" with its own tokenizer, pad id and length (tokenizer_2 is the second tower's, required when the
    model has cond_stage_2).
    """
    if config.tokenizer_kind is None:
        raise ValueError("empty_prompt_ids: the model has no text cond stage")
    if not config.structured_conditioning:
        return tokenize(tokenizer, [""], pad_token_id=config.pad_token_id, max_length=config.max_length)
    tokenizers = {"cond_stage": tokenizer, "cond_stage_2": tokenizer_2}
    out = {}
    for key, name in _token_keys(config).items():
        if tokenizers[name] is None:
            raise ValueError(f"empty_prompt_ids: the text tower {name} needs its tokenizer "
                             f"({'tokenizer_2' if name == 'cond_stage_2' else 'tokenizer'} is None)")
        tower = getattr(config, name)
        out[key] = tokenize(tokenizers[name], [""], pad_token_id=tower.pad_token_id, max_length=tower.max_length)
    return out


def inpaint_conditioning(config: LDMConfig, params: Mapping[str, Any], images: jax.Array, mask: jax.Array, *,
                         options: RunOptions = RunOptions()) -> jax.Array:
    """The concat channels of an SD inpainting UNet: [mask, masked-image latent], (B, h, w, 1 + C).

    images (B, H, W, 3) in [-1, 1]; mask (B, H, W, 1) in [0, 1], 1 = repaint. As diffusers/CompVis: the mask
    is binarised at 0.5, the masked image is images * (mask < 0.5), encoded to its (scaled) mode, and the mask
    is resized to the latent grid with nearest-neighbour sampling.
    """
    check_image_and_mask(config, images, mask)
    binary = (mask >= 0.5).astype(jnp.float32)
    latents = encode_first_stage(config, params, images * (1.0 - binary), options=options)
    f = config.downsample_factor
    small = binary[:, ::f, ::f, :]  # nearest-neighbour downsampling: F.interpolate(size=(h, w)) picks these
    return inpaint_channels(small, latents)


def check_image_and_mask(config: LDMConfig, images: Any, mask: Any = None) -> None:
    """ValueError unless images are (B, H, W, 3) with H, W multiples of the first-stage factor and the mask
    (if any) is (B, H, W, 1), single-channel and the images' size."""
    f, ch = config.downsample_factor, config.first_stage.in_channels
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != ch:
        raise ValueError(f"images must be (batch, H, W, {ch}) NHWC; got shape {shape}")
    if shape[1] % f or shape[2] % f:
        raise ValueError(f"image size {shape[1]}x{shape[2]} is not a multiple of {f} (the first stage's "
                         f"downsampling factor)")
    if mask is None:
        return
    mshape = tuple(np.shape(mask))
    if len(mshape) != 4 or mshape[-1] != 1:
        raise ValueError(f"mask must be single-channel (batch, H, W, 1) in [0, 1]; got shape {mshape}")
    if mshape[:3] != shape[:3]:
        raise ValueError(f"mask size {mshape[:3]} does not match the image's {shape[:3]} (batch, H, W)")


# ---------------------------------------------------------------------------------------------------- UNet


def apply_unet(config: LDMConfig, params: Mapping[str, Any], x: jax.Array, t: jax.Array,
               cond: Mapping[str, jax.Array] | None, *, options: RunOptions = RunOptions(), rngs: Any = None,
               deterministic: bool = True, residuals: tuple[list[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The denoiser: x (B, h, w, C) latents, t (B,) timesteps, cond {"context"?, "y"?, "time_ids"?, "concat"?}.

    "concat" channels (B, h, w, C_extra) are appended to x; "context" is cross-attended; "y" goes to the
    class embedding ("adm") or, with "time_ids", to SDXL's text_time embedding. Returns the prediction (B, h, w, C) float32 (of `diffusion.prediction_type`).
    residuals: optional (down residuals, mid residual) of ControlNets (`ControlNetModel`'s output, summed over
    nets), added where diffusers adds them.
    """
    cond = dict(cond or {})
    if "concat" in cond:
        x = jnp.concatenate([x, cond.pop("concat").astype(x.dtype)], axis=-1)
    unknown = sorted(set(cond) - {"context", "y", "time_ids"})
    if unknown:
        raise ValueError(f"apply_unet: unknown conditioning entries {unknown}; expected context, y, time_ids, concat")
    model = modules(config, options).unet
    extra = {"time_ids": cond["time_ids"]} if "time_ids" in cond else {}
    if residuals is not None:
        extra.update(down_residuals=residuals[0], mid_residual=residuals[1])
    return model.apply({"params": _part(params, "unet")}, x, t, cond.get("context"), cond.get("y"),
                       deterministic=deterministic, rngs=rngs, **extra).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------- loss


# (x_t, t, cond, batch, key, deterministic) -> (down residuals, mid residual): `training_loss(residuals_fn=)`
ResidualsFn = Callable[[jax.Array, jax.Array, dict[str, jax.Array], Mapping[str, Any], jax.Array, bool],
                       tuple[list[jax.Array], jax.Array]]
# the refiner's micro-conditioning when the batch has no "aesthetic_score": sampling's default (diffusers')
DEFAULT_AESTHETIC_SCORE = MicroConditioning.aesthetic_score


def conditioning_inputs(config: LDMConfig, batch: Mapping[str, Any], *, target_size: tuple[int, int] | None = None,
                        aesthetic_score: float = DEFAULT_AESTHETIC_SCORE) -> Any:
    """The batch entries the conditioning is made from: "tokens" (text), "label" (class / adm labels) or
    "y" ("adm" vectors); None for models without conditioning inputs ("concat"-only or unconditional).

    Models with `structured_conditioning` (SDXL) get the dict `encode_conditioning` takes: "tokens" and
    "tokens_2" (each tower's ids) and, for "text_time" UNets, "time_ids" (B, num_time_ids) float32 made by
    `micro_conditioning` from the batch's "original_size" / "crop_top_left" and `target_size` (the training
    image's (height, width); required then) or the aesthetic score.
    """
    key = config.diffusion.conditioning_key
    labels = isinstance(config.cond_stage, ClassEmbedderConfig) or (key == "adm" and config.unet.num_classes != "sequential")
    if config.structured_conditioning:
        _require_keys(config, batch, tuple(_token_keys(config)))
        inputs = {name: jnp.asarray(batch[name]) for name in _token_keys(config)}
        if config.text_time:
            if target_size is None:
                raise ValueError("conditioning_inputs: a text_time UNet's micro-conditioning needs target_size")
            inputs["time_ids"] = micro_conditioning(config, batch, target_size, aesthetic_score)
        return inputs
    if config.tokenizer_kind is not None:
        name = "tokens"
    elif labels:
        name = "label"
    elif key == "adm":
        name = "y"
    else:
        return None
    _require_keys(config, batch, (name,))
    return jnp.asarray(batch[name])


def _require_keys(config: LDMConfig, batch: Mapping[str, Any], names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in batch]
    if missing:
        what = ", ".join(repr(name) for name in missing)
        raise KeyError(f"the batch has no {what} entr{'ies' if len(missing) > 1 else 'y'}, which this model "
                       f"(conditioning_key={config.diffusion.conditioning_key!r}, text towers {config.text_towers}, "
                       f"text_time={config.text_time}) is conditioned on; it has {sorted(batch)}")


def micro_conditioning(config: LDMConfig, batch: Mapping[str, Any], target_size: tuple[int, int],
                       aesthetic_score: float = DEFAULT_AESTHETIC_SCORE) -> jax.Array:
    """SDXL's micro-conditioning of a training batch: "time_ids" (B, num_time_ids) float32.

    Base (6 numbers): [original height, width, crop top, left, target height, width] (SGM's
    original_size_as_tuple, crop_coords_top_left, target_size_as_tuple; diffusers' add_time_ids), from the batch's
    "original_size" (B, 2) and "crop_top_left" (B, 2) (`ldm_jax.data.pipeline` records them) and `target_size`.
    Refiner (5): [original height, width, crop top, left, aesthetic score], the score from batch
    "aesthetic_score" (B,) when present, else `aesthetic_score` for every example.
    """
    last_name = last_entry(config.num_time_ids)
    _require_keys(config, batch, ("original_size", "crop_top_left"))
    original = jnp.asarray(batch["original_size"], jnp.float32).reshape(-1, 2)
    crop = jnp.asarray(batch["crop_top_left"], jnp.float32).reshape(-1, 2)
    b = original.shape[0]
    if last_name == "target_size":
        last = jnp.broadcast_to(jnp.asarray(target_size, jnp.float32), (b, 2))
    elif "aesthetic_score" in batch:
        last = jnp.asarray(batch["aesthetic_score"], jnp.float32).reshape(b, 1)
    else:
        last = jnp.full((b, 1), aesthetic_score, jnp.float32)
    return jnp.concatenate([original, crop, last], axis=-1)


def drop_conditioning(inputs: Any, null: Any, prob: float, key: jax.Array) -> tuple[Any, jax.Array]:
    """Replaces each example's conditioning inputs (B, ...) by `null` (same shape) with probability `prob`.

    `inputs` and `null` may be arrays or dicts of arrays with the same keys (two text towers' ids): one draw per
    example replaces all of its entries. Returns (inputs, dropped (B,) bool). Dropping the token ids of a prompt
    equals dropping its context, since the text encoder treats every example separately.
    """
    dropped = jax.random.bernoulli(key, prob, (jax.tree.leaves(inputs)[0].shape[0],))

    def one(x, n):
        keep = dropped.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, n.astype(x.dtype), x)

    return jax.tree.map(one, inputs, null), dropped


def training_loss(config: LDMConfig, params: Mapping[str, Any], batch: Mapping[str, Any], key: jax.Array, *,
                  empty_prompt: Any = None, options: RunOptions = RunOptions(), train: bool = True,
                  sample_posterior: bool = True, aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
                  residuals_fn: ResidualsFn | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The LDM training loss of one batch; returns (loss scalar, metrics {name: scalar}).

    batch: "image" (B, H, W, 3) in [-1, 1]; the conditioning entries (`conditioning_inputs`: "tokens" (B, L),
    "label" (B,) or "y" (B, D); SDXL: "tokens", "tokens_2", "original_size" (B, 2), "crop_top_left" (B, 2), for a
    refiner optionally "aesthetic_score" (B,)); for "concat"/"hybrid" models either "concat" (B, h, w, C_extra)
    latent-space channels or "mask" (B, H, W, 1) in [0, 1] (then the SD-inpainting channels of
    `inpaint_conditioning`).
    key: one PRNG key, split here into the posterior sample, timesteps, noise, conditioning dropout and
    UNet dropout.
    empty_prompt: the ids of "" for text models trained with cond_drop_prob > 0 (`empty_prompt_ids`: (1, L), or
    SDXL's dict of both towers'; not needed when SDXL drops to zeros, see below).
    batch["moments"] (precomputed `first_stage_moments`) replaces encoding batch["image"] when present.
    sample_posterior: False takes KL latents' mean instead of a posterior sample (both paths alike).
    options: the run-time options (attention, remat, compute / param dtypes) of every module.
    aesthetic_score: a refiner's score for batches without "aesthetic_score" (`micro_conditioning`).
    residuals_fn: optional `(x_t, t, cond, batch, key, deterministic) -> (down residuals, mid residual)`, residuals
    the UNet adds (`apply_unet(residuals=)`; a ControlNet's, `ldm_jax.training.controlnet`), from the noisy latents,
    timesteps, the UNet conditioning after dropout (`apply_unet`'s cond), the batch and a dropout key of its own
    (fold_in(UNet dropout key, 1)). None: the plain loss, unchanged.
    batch["loss_weight"] (B,) float32, optional: per-example weights; the loss is then mean(weight * loss_e)
    instead of mean(loss_e) (DreamBooth: instance weight B / n_instance and class weight prior_loss_weight * B /
    n_class give instance MSE + prior_loss_weight * class MSE). Without it the loss is computed exactly as before.
    Steps: latents z = scale * sample(E(image)) (no gradient into the first stage); t ~ U{0..T-1}; x_t =
    q_sample(z, t, noise); per-example conditioning dropout with prob cond_drop_prob; prediction vs target
    (eps, x0 or v); per-example mean l2/l1 times the loss weight (uniform / min-SNR); then the reference's
    loss / exp(logvar_t) + logvar_t (logvar learned or the constant logvar_init); mean over the batch.
    SDXL: the target size of the micro-conditioning is the training image's (H, W) (z's size times the first
    stage's factor); dropout drops both towers' text of an example together (one draw) and keeps its
    micro-conditioning (SGM's size and crop embedders have ucg_rate 0): with
    `diffusion.force_zeros_for_empty_prompt` the text conditioning becomes zeros, context and pooled (SGM's
    ucg zeroing of the embedders' outputs, diffusers' force_zeros), else each tower reads the empty prompt.
    """
    d = config.diffusion
    k_post, k_t, k_noise, k_drop, k_dropout = jax.random.split(key, 5)
    post_key = k_post if sample_posterior else None
    if "moments" in batch:
        z = jax.lax.stop_gradient(latents_from_moments(config, batch["moments"], post_key))
    else:
        z = jax.lax.stop_gradient(encode_first_stage(config, params, jnp.asarray(batch["image"]), post_key,
                                                     options=options))
    b = z.shape[0]
    schedule = noise_schedule(config)
    t = jax.random.randint(k_t, (b,), 0, d.schedule.num_timesteps)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    x_t = q_sample(schedule, z, t, noise)
    target_size = (z.shape[1] * config.downsample_factor, z.shape[2] * config.downsample_factor)
    cond, metrics = _training_conditioning(config, params, batch, k_drop, empty_prompt, options, target_size,
                                           aesthetic_score)
    residuals = None
    if residuals_fn is not None:
        residuals = residuals_fn(x_t, t, cond, batch, jax.random.fold_in(k_dropout, 1), not train)
    pred = apply_unet(config, params, x_t, t, cond, options=options, rngs={"dropout": k_dropout},
                      deterministic=not train, residuals=residuals)
    target = training_target(schedule, z, noise, t, d.prediction_type)
    err = pred - target
    per_example = jnp.mean(jnp.square(err) if d.loss_type == "l2" else jnp.abs(err), axis=(1, 2, 3))
    loss_simple = per_example * loss_weights(schedule, t, d.prediction_type, d.loss_weighting, d.min_snr_gamma)
    logvar_t = params["logvar"][t] if d.learn_logvar else jnp.full((b,), d.logvar_init, jnp.float32)
    weighted = logvar_weighted_loss(loss_simple, logvar_t)
    if "loss_weight" in batch:  # per-example weights (DreamBooth's prior preservation); absent: the plain mean
        weighted = weighted * jnp.asarray(batch["loss_weight"], jnp.float32).reshape(b)
    loss = jnp.mean(weighted)
    metrics.update(loss=loss, loss_simple=jnp.mean(loss_simple), loss_unweighted=jnp.mean(per_example))
    if d.learn_logvar:
        metrics["logvar"] = jnp.mean(params["logvar"])
    return loss, metrics


def _training_conditioning(config, params, batch, key, empty_prompt, options, target_size=None,
                           aesthetic_score=DEFAULT_AESTHETIC_SCORE):
    """(UNet conditioning dict, metrics) for a training batch, with conditioning dropout."""
    d, cond, metrics = config.diffusion, {}, {}
    inputs = conditioning_inputs(config, batch, target_size=target_size, aesthetic_score=aesthetic_score)
    if inputs is not None:
        if d.cond_drop_prob > 0:
            inputs, dropped = _drop(config, inputs, empty_prompt, key)
            metrics["cond_dropped"] = jnp.mean(dropped.astype(jnp.float32))
        cond.update(encode_conditioning(config, params, inputs, options=options))
    if d.conditioning_key in ("concat", "hybrid"):
        if "concat" in batch:
            cond["concat"] = jnp.asarray(batch["concat"], jnp.float32)
        elif "mask" in batch:
            concat = inpaint_conditioning(config, params, jnp.asarray(batch["image"]), jnp.asarray(batch["mask"]),
                                          options=options)
            cond["concat"] = jax.lax.stop_gradient(concat)
        else:
            raise KeyError(f"conditioning_key={d.conditioning_key!r} needs batch['concat'] (latent-space channels) "
                           f"or batch['mask'] (inpainting); the batch has {sorted(batch)}")
        if cond["concat"].shape[-1] != config.concat_channels:
            raise ValueError(f"concat conditioning has {cond['concat'].shape[-1]} channels; the UNet expects "
                             f"{config.concat_channels} (in_channels {config.unet.in_channels} - latent channels)")
    return cond, metrics


def _drop(config: LDMConfig, inputs: Any, empty_prompt: Any, key: jax.Array) -> tuple[Any, jax.Array]:
    """Conditioning dropout (see `training_loss`): (inputs with the dropped examples' conditioning replaced,
    dropped (B,) bool)."""
    prob = config.diffusion.cond_drop_prob
    if not config.structured_conditioning:
        leading = jax.tree.leaves(inputs)[0].shape[0]
        return drop_conditioning(inputs, null_inputs(config, leading, empty_prompt), prob, key)
    text = {name: inputs[name] for name in _token_keys(config)}
    b = text["tokens"].shape[0]
    if config.diffusion.force_zeros_for_empty_prompt:
        dropped = jax.random.bernoulli(key, prob, (b,))  # the draw drop_conditioning makes
        return {**inputs, "zero_text": dropped.astype(jnp.float32)}, dropped
    text, dropped = drop_conditioning(text, null_inputs(config, b, empty_prompt), prob, key)
    return {**inputs, **text}, dropped


def needs_empty_prompt(config: LDMConfig) -> bool:
    """Whether the training loss needs `empty_prompt` (the tokenised ""): text models with cond_drop_prob > 0,
    except SDXL-style models that drop to zeros (`diffusion.force_zeros_for_empty_prompt`)."""
    d = config.diffusion
    zeros = config.structured_conditioning and d.force_zeros_for_empty_prompt
    return config.tokenizer_kind is not None and d.cond_drop_prob > 0 and not zeros


def make_loss_fn(config: LDMConfig, *, empty_prompt: Any = None, options: RunOptions = RunOptions(),
                 sample_posterior: bool = True, aesthetic_score: float = DEFAULT_AESTHETIC_SCORE):
    """`loss_fn(params, batch, key, residuals_fn=None) -> (loss, metrics)` for `ldm_jax.training.loop.make_train_step`
    (`training_loss`; residuals_fn: a ControlNet's residuals, as there).

    empty_prompt: `empty_prompt_ids(config, tokenizer[, tokenizer_2])` when `needs_empty_prompt(config)`.
    aesthetic_score: a refiner's micro-conditioning for batches without "aesthetic_score".
    """
    if needs_empty_prompt(config) and empty_prompt is None:
        raise ValueError("cond_drop_prob > 0 with a text cond stage needs empty_prompt (see empty_prompt_ids)")
    empty = None if empty_prompt is None else jax.tree.map(lambda x: np.asarray(x, np.int32), empty_prompt)

    def loss_fn(params, batch, key, residuals_fn=None):
        return training_loss(config, params, batch, key, empty_prompt=empty, options=options,
                             sample_posterior=sample_posterior, aesthetic_score=aesthetic_score,
                             residuals_fn=residuals_fn)

    return loss_fn
