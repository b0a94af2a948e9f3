"""diffusers Stable Diffusion folders <-> `LoadedModel`: import and export, strict, offline.

A folder as `StableDiffusionPipeline.save_pretrained` (or the Inpaint / Img2Img pipelines) writes it:

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors (or .bin)
    vae/           config.json + diffusion_pytorch_model.safetensors (or .bin)      AutoencoderKL
    text_encoder/  config.json + model.safetensors (or pytorch_model.bin)          transformers CLIPTextModel
    tokenizer/     vocab.json + merges.txt, or tokenizer.json (transformers 5 saves only that), and
                   tokenizer_config.json                                            CLIPTokenizer
    scheduler/     scheduler_config.json

`load_diffusers_pipeline(folder)` converts every part with its converter (`diffusers_unet`,
`diffusers_autoencoder`, `transformers_clip`; weights read by `checkpoint_io.load_state_dict`, no code run)
and builds the `LDMConfig`: the scheduler's schedule and prediction type (beta_schedule "scaled_linear" ->
our "linear", "linear" -> "sqrt_linear", "squaredcos_cap_v2" -> "cosine"; epsilon / v_prediction / sample
-> eps / v / x0), the VAE's `scaling_factor`, and conditioning_key "hybrid" for UNets with concat input
channels (9-channel inpainting), else "crossattn". A missing subfolder or file, an unsupported option or a
checkpoint that does not match its config raises an error naming it.

`sampler_options(scheduler_config, name)` gives the options of our sampler that reproduce the diffusers
scheduler's timesteps (spacing, steps_offset, set_alpha_to_one, clip_sample).

`save_diffusers_pipeline(model, folder)` writes the same layout back (safetensors + config.json files) so that
diffusers' `from_pretrained` loads it; converting that folder again gives the params back exactly.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import ConversionError, params_to_state_dict
from ldm_jax.convert.diffusers_autoencoder import (config_from_diffusers, convert_diffusers_autoencoder,
                                                  to_diffusers_config)
from ldm_jax.convert.diffusers_unet import convert_diffusers_unet, unet_config_from_diffusers
from ldm_jax.convert.transformers_clip import (LEGACY_EOS_TOKEN_ID, clip_text_config_from_transformers,
                                               convert_clip_text_state_dict)
from ldm_jax.diffusion.schedule import ScheduleConfig
from ldm_jax.ldm import DiffusionConfig, LDMConfig, LoadedModel
from ldm_jax.models.text import ClipTextConfig
from ldm_jax.models.tokenizer import load_tokenizer
from ldm_jax.models.unet import UNetConfig

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_COSINE_S = 0.008  # betas_for_alpha_bar's cosine offset
_LITERAL_NAMES = ("linear_1", "linear_2")  # diffusers TimestepEmbedding attributes, not numbered children
# Scheduler options that change the model's noise schedule and that we do not implement: name -> allowed.
_SCHEDULE_REQUIRED = {"trained_betas": None, "rescale_betas_zero_snr": False}
_DIFFUSERS_VERSION = "0.42.1"


# ------------------------------------------------------------------------------------------------- import


def load_diffusers_pipeline(folder: str | os.PathLike) -> LoadedModel:
    """Loads a diffusers Stable Diffusion folder into a `LoadedModel` (config, params, tokenizer, model_id),
    with the default run-time options (`ldm.RunOptions`; `store.load_model` sets others).

    Raises FileNotFoundError naming a missing subfolder/file, ConversionError / ValueError for a checkpoint
    that does not match its config or an unsupported option.
    """
    folder = pathlib.Path(folder)
    index = _read_json(folder / "model_index.json", what="a diffusers pipeline folder")
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ValueError(f"{folder}/model_index.json: _class_name {index.get('_class_name')!r} is not one of "
                         f"{PIPELINE_CLASSES}")
    for name in COMPONENTS:
        if not index.get(name) or index[name][0] is None:
            raise ValueError(f"{folder}/model_index.json has no {name!r} component (got {index.get(name)!r})")
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder} has no {name}/ subfolder (model_index.json lists {index[name]})")
    tokenizer = load_tokenizer(folder / "tokenizer", "clip")
    cond_stage, cond_params = _load_text_encoder(folder / "text_encoder", tokenizer)
    vae_config, vae_params, scale = _load_vae(folder / "vae")
    unet_json = _read_json(folder / "unet" / "config.json", what="the unet/ subfolder")
    unet_config = unet_config_from_diffusers(unet_json)
    unet_params = convert_diffusers_unet(_read_weights(folder / "unet", DIFFUSERS_WEIGHTS), unet_config)
    scheduler = read_scheduler_config(folder)
    latent = vae_config.embed_dim
    diffusion = DiffusionConfig(
        schedule=schedule_from_scheduler(scheduler),
        prediction_type=prediction_type_from_scheduler(scheduler),
        scale_factor=scale,
        conditioning_key="hybrid" if unet_config.in_channels > latent else "crossattn",
        image_size=int(np.max(unet_json.get("sample_size", 64))),
        channels=latent,
    )
    config = LDMConfig(first_stage=vae_config, unet=unet_config, diffusion=diffusion, cond_stage=cond_stage)
    params = {"first_stage": vae_params, "cond_stage": cond_params, "unet": unet_params}
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, model_id=str(folder),
                       scheduler_config=scheduler)


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The pipeline folder's scheduler/scheduler_config.json as a dict (for `sampler_options`)."""
    return _read_json(pathlib.Path(folder) / "scheduler" / "scheduler_config.json", what="the scheduler/ subfolder")


def schedule_from_scheduler(scheduler: Mapping[str, Any]) -> ScheduleConfig:
    """Our ScheduleConfig from a diffusers scheduler config (scheduler_config.json as a dict)."""
    bad = [f"{k}={scheduler[k]!r} (supported: {v!r})" for k, v in _SCHEDULE_REQUIRED.items()
           if scheduler.get(k, v) != v]
    kind = scheduler.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        bad.append(f"beta_schedule={kind!r} (supported: {sorted(BETA_SCHEDULES)})")
    if bad:
        raise ConversionError("diffusers scheduler config has unsupported options: " + "; ".join(bad))
    return ScheduleConfig(beta_schedule=BETA_SCHEDULES[kind],
                          num_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                          linear_start=float(scheduler.get("beta_start", 0.0001)),
                          linear_end=float(scheduler.get("beta_end", 0.02)), cosine_s=DIFFUSERS_COSINE_S)


def prediction_type_from_scheduler(scheduler: Mapping[str, Any]) -> str:
    """"eps", "v" or "x0" from a diffusers scheduler config's prediction_type."""
    kind = scheduler.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ConversionError(f"diffusers scheduler prediction_type={kind!r}; supported: {sorted(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[kind]


def sampler_options(scheduler: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Options for `make_sampler(name, ...)` that match a diffusers scheduler config's timesteps and
    final step: timestep_spacing and steps_offset (diffusers defaults "leading" and 0), and for "ddim"
    set_alpha_to_one (default True) and clip_sample (default on, range 1.0)."""
    spacing = scheduler.get("timestep_spacing", "leading")
    opts: dict[str, Any] = {"timestep_spacing": spacing, "prediction_type": prediction_type_from_scheduler(scheduler)}
    if spacing == "leading":
        opts["steps_offset"] = int(scheduler.get("steps_offset", 0))
    if name in ("ddim", "plms"):
        opts["set_alpha_to_one"] = bool(scheduler.get("set_alpha_to_one", True))
    if name in ("ddim", "ddpm") and scheduler.get("clip_sample", True):
        opts["clip_sample"] = float(scheduler.get("clip_sample_range", 1.0))
    return opts


def _load_text_encoder(folder: pathlib.Path, tokenizer: Any) -> tuple[ClipTextConfig, dict[str, Any]]:
    hf_config = _read_json(folder / "config.json", what="the text_encoder/ subfolder")
    if hf_config.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise ValueError(f"{folder}/config.json: model_type {hf_config.get('model_type')!r}; expected a CLIP text "
                         "model (clip_text_model)")
    hf_config = hf_config.get("text_config", hf_config)  # a full CLIPConfig nests the text part
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer beside {folder} has no pad token; Stable Diffusion pads prompts")
    config = clip_text_config_from_transformers(hf_config, pad_token_id=int(tokenizer.pad_token_id),
                                                tokenizer_kind="clip")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 10**6 and model_max != config.max_length:
        raise ValueError(f"tokenizer model_max_length {model_max} != the text encoder's max_position_embeddings "
                         f"{config.max_length}; prompts would be padded to a different length than diffusers uses")
    state_dict = _read_weights(folder, TRANSFORMERS_WEIGHTS)
    return config, convert_clip_text_state_dict(state_dict, config)


def _load_vae(folder: pathlib.Path):
    vae_json = _read_json(folder / "config.json", what="the vae/ subfolder")
    if vae_json.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{folder}/config.json: _class_name {vae_json.get('_class_name')!r}; Stable Diffusion "
                         "pipelines use AutoencoderKL")
    config = config_from_diffusers(vae_json, kind="kl")
    params = convert_diffusers_autoencoder(_read_weights(folder, DIFFUSERS_WEIGHTS), config, source=str(folder))
    return config, params, float(vae_json.get("scaling_factor", 0.18215))


def _read_json(path: pathlib.Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected in {what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _read_weights(folder: pathlib.Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The first existing weights file of `names` (safetensors first), read without running code."""
    for name in names:
        if (folder / name).is_file():
            return load_state_dict(folder / name)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder} has no weights file: expected one of {list(names)}; found {found}")


# ------------------------------------------------------------------------------------------------- export


def save_diffusers_pipeline(model: LoadedModel, folder: str | os.PathLike, *,
                            scheduler_class: str = "PNDMScheduler") -> pathlib.Path:
    """Writes `model` as a diffusers Stable Diffusion folder (see the module docstring); returns the folder.

    The pipeline class is StableDiffusionInpaintPipeline for models with concat channels, else
    StableDiffusionPipeline. The scheduler config is the model's own `scheduler_config` when it came with one
    (a diffusers folder, or a model directory converted from one); otherwise it carries the schedule and prediction type with SD's
    usual sampling options (leading spacing, steps_offset 1, set_alpha_to_one and clip_sample off).
    Raises ValueError for what a diffusers SD folder cannot hold (VQ first stage, non-CLIP text encoder, ...).
    """
    cfg, folder = model.config, pathlib.Path(folder)
    if model.tokenizer is None:
        raise ValueError("save_diffusers_pipeline: the model has no tokenizer; a diffusers folder needs one")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    params = model.params
    _write_part(folder / "unet", "diffusion_pytorch_model.safetensors", params["unet"],
                {"_class_name": "UNet2DConditionModel", **unet_to_diffusers_config(cfg.unet, cfg.diffusion.image_size)})
    vae_config = {"_class_name": "AutoencoderKL", **_vae_config(cfg), "scaling_factor": cfg.diffusion.scale_factor}
    _write_part(folder / "vae", "diffusion_pytorch_model.safetensors", params["first_stage"], vae_config)
    text_state = {f"text_model.{k}": v for k, v in params_to_state_dict(params["cond_stage"]).items()}
    save_safetensors(folder / "text_encoder" / "model.safetensors", text_state, {"format": "pt"})
    _write_json(folder / "text_encoder" / "config.json", clip_to_transformers_config(cfg.cond_stage))
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    scheduler = model.scheduler_config  # the settings the model came with, else SD's usual ones
    if scheduler is not None and scheduler.get("_class_name"):
        scheduler_class = scheduler["_class_name"]
    _write_json(folder / "scheduler" / "scheduler_config.json",
                scheduler if scheduler is not None else scheduler_config(cfg.diffusion, scheduler_class))
    pipeline = "StableDiffusionInpaintPipeline" if cfg.concat_channels else "StableDiffusionPipeline"
    _write_json(folder / "model_index.json", {
        "_class_name": pipeline, "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    return folder


def unet_to_diffusers_config(config: UNetConfig, sample_size: int = 64) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config of the same architecture (inverse of unet_config_from_diffusers).

    Raises ValueError for UNets diffusers' UNet2DConditionModel cannot express (plain self-attention
    blocks without cross-attention, avg-pool downsampling).
    """
    if not config.use_spatial_transformer or not config.conv_resample:
        raise ValueError("diffusers UNet2DConditionModel needs spatial transformers (use_spatial_transformer=True) "
                         "and conv resampling (conv_resample=True)")
    channels = [config.model_channels * m for m in config.channel_mult]
    attn = [2**level in config.attention_resolutions for level in range(len(channels))]
    if config.num_heads > 0:
        heads: Any = config.num_heads
    else:
        heads = [c // config.num_head_channels for c in channels]
    out = dict(
        sample_size=sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=channels,
        layers_per_block=config.num_res_blocks, cross_attention_dim=config.context_dim,
        attention_head_dim=heads, transformer_layers_per_block=config.transformer_depth,
        use_linear_projection=config.use_linear_in_transformer,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=int(config.freq_shift), dropout=config.dropout,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, downsample_padding=1, center_input_sample=False,
    )
    if config.num_classes == "sequential":
        out.update(class_embed_type="projection", projection_class_embeddings_input_dim=config.adm_in_channels)
    elif config.num_classes is not None:
        out.update(num_class_embeds=config.num_classes)
    return out


def clip_to_transformers_config(config: Any) -> dict[str, Any]:
    """transformers CLIPTextConfig dict (config.json) for our ClipTextConfig (inverse of
    clip_text_config_from_transformers). Only output_layer "last" is what diffusers' pipelines use."""
    if not isinstance(config, ClipTextConfig) or config.output_layer != "last":
        raise ValueError(f"a diffusers SD folder holds a CLIP text encoder read at its last layer; got {config}")
    eos = LEGACY_EOS_TOKEN_ID if config.pooling == "argmax" else config.eos_token_id
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_length, "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps, "eos_token_id": eos,
        "pad_token_id": config.pad_token_id, "attention_dropout": 0.0, "dropout": 0.0,
        "projection_dim": config.hidden_size, "dtype": "float32",
    }


def scheduler_config(diffusion: DiffusionConfig, scheduler_class: str = "PNDMScheduler") -> dict[str, Any]:
    """A diffusers scheduler config (scheduler_config.json) with our schedule and prediction type."""
    s = diffusion.schedule
    names = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
    if s.beta_schedule not in names or (s.beta_schedule == "cosine" and s.cosine_s != DIFFUSERS_COSINE_S):
        raise ValueError(f"diffusers schedulers cannot express beta_schedule={s.beta_schedule!r} "
                         f"(cosine_s={s.cosine_s})")
    if s.v_posterior:
        raise ValueError(f"diffusers schedulers have no v_posterior (got {s.v_posterior})")
    predictions = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
    return {
        "_class_name": scheduler_class, "_diffusers_version": _DIFFUSERS_VERSION,
        "beta_schedule": names[s.beta_schedule], "beta_start": s.linear_start, "beta_end": s.linear_end,
        "num_train_timesteps": s.num_timesteps, "prediction_type": predictions[diffusion.prediction_type],
        "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "skip_prk_steps": True, "trained_betas": None,
    }


def _vae_config(cfg: LDMConfig) -> dict[str, Any]:
    if cfg.first_stage.kind != "kl":
        raise ValueError("a diffusers SD folder holds an AutoencoderKL; this model's first stage is "
                         f"kind={cfg.first_stage.kind!r}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in to_diffusers_config(cfg.first_stage).items()}


def _write_part(folder: pathlib.Path, weights: str, params: Mapping[str, Any], config: dict[str, Any]) -> None:
    config = {**config, "_diffusers_version": _DIFFUSERS_VERSION}
    save_safetensors(folder / weights, params_to_state_dict(params, literal=_LITERAL_NAMES), {"format": "pt"})
    _write_json(folder / "config.json", config)


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


__all__ = ["clip_to_transformers_config", "load_diffusers_pipeline", "prediction_type_from_scheduler",
           "read_scheduler_config", "sampler_options", "save_diffusers_pipeline", "schedule_from_scheduler",
           "scheduler_config", "unet_to_diffusers_config"]
