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
from ldm_jax.convert.diffusers_unet import (LITERAL_NAMES, convert_diffusers_unet, unet_config_from_diffusers,
                                          unet_config_to_diffusers)
from ldm_jax.convert.transformers_clip import (clip_text_config_from_transformers, clip_text_to_transformers_config,
                                               clip_text_to_transformers_state_dict, convert_clip_text_state_dict)
from ldm_jax.diffusion.schedule import ScheduleConfig
from ldm_jax.ldm import DiffusionConfig, LDMConfig, LoadedModel
from ldm_jax.models.text import ClipTextConfig
from ldm_jax.models.tokenizer import load_tokenizer, save_tokenizer

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline")
TEXT_COMPONENTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
SDXL_OUTPUT_LAYER = "penultimate_no_norm"  # diffusers' SDXL pipelines: hidden_states[-2], no final LayerNorm
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_COSINE_S = 0.008  # betas_for_alpha_bar's cosine offset
# Scheduler options that change the model's noise schedule and that we do not implement: name -> allowed.
_SCHEDULE_REQUIRED = {"trained_betas": None, "rescale_betas_zero_snr": False}
DIFFUSERS_VERSION = "0.42.1"  # the `_diffusers_version` written into every exported diffusers config
CONFIG_FILE = "config.json"  # a diffusers / transformers component's config (and our model directory's: store)


# ------------------------------------------------------------------------------------------------- import


def load_diffusers_pipeline(folder: str | os.PathLike, *, param_dtype: Any = np.float32) -> LoadedModel:
    """Loads a diffusers Stable Diffusion or SDXL folder into a `LoadedModel` (config, params, tokenizers,
    model_id), with the default run-time options (`ldm.RunOptions`; `store.load_model` sets others).

    param_dtype: float32 (default) or bfloat16 numpy params; each tensor is converted from the file's dtype as it
    is read (no float32 copy of a component is built for bfloat16).

    SDXL folders (`SDXL_PIPELINE_CLASSES`): text_encoder + tokenizer (CLIP ViT-L) become cond_stage,
    text_encoder_2 + tokenizer_2 (OpenCLIP bigG with its projection) cond_stage_2; a refiner has only the second
    pair, which becomes cond_stage. Both towers are read at the penultimate block without the final LayerNorm
    (output_layer "penultimate_no_norm"), as diffusers' SDXL pipelines do; `force_zeros_for_empty_prompt` comes
    from model_index.json (diffusers' default True).
    Raises FileNotFoundError naming a missing subfolder/file, ConversionError / ValueError for a checkpoint
    that does not match its config or an unsupported option.
    """
    folder = pathlib.Path(folder)
    index = _read_json(folder / "model_index.json", what="a diffusers pipeline folder")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in PIPELINE_CLASSES + SDXL_PIPELINE_CLASSES:
        raise ValueError(f"{folder}/model_index.json: _class_name {pipeline_class!r} is not one of "
                         f"{PIPELINE_CLASSES + SDXL_PIPELINE_CLASSES}")
    sdxl = pipeline_class in SDXL_PIPELINE_CLASSES
    towers = [pair for pair in TEXT_COMPONENTS if _listed(index, pair[0])] if sdxl else [TEXT_COMPONENTS[0]]
    if sdxl and not towers:
        raise ValueError(f"{folder}/model_index.json lists neither text_encoder nor text_encoder_2")
    for name in ("unet", "vae", "scheduler") + tuple(n for pair in towers for n in pair):
        if not _listed(index, name):
            raise ValueError(f"{folder}/model_index.json has no {name!r} component (got {index.get(name)!r})")
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder} has no {name}/ subfolder (model_index.json lists {index[name]})")
    tokenizers, text_configs, text_params = [], [], []
    for encoder, tokenizer_dir in towers:
        tokenizer = load_tokenizer(folder / tokenizer_dir, "clip")
        config, params = _load_text_encoder(folder / encoder, tokenizer,
                                            output_layer=SDXL_OUTPUT_LAYER if sdxl else "last", dtype=param_dtype)
        tokenizers.append(tokenizer)
        text_configs.append(config)
        text_params.append(params)
    vae_config, vae_params, scale = _load_vae(folder / "vae", dtype=param_dtype)
    unet_json = _read_json(folder / "unet" / CONFIG_FILE, what="the unet/ subfolder")
    unet_config = unet_config_from_diffusers(unet_json)
    unet_params = convert_diffusers_unet(read_weights(folder / "unet", DIFFUSERS_WEIGHTS, dtype=param_dtype),
                                         unet_config, dtype=param_dtype)
    scheduler = read_scheduler_config(folder)
    latent = vae_config.embed_dim
    diffusion = DiffusionConfig(
        schedule=schedule_from_scheduler(scheduler),
        prediction_type=prediction_type_from_scheduler(scheduler),
        scale_factor=scale,
        conditioning_key="hybrid" if unet_config.in_channels > latent else "crossattn",
        image_size=int(np.max(unet_json.get("sample_size", 64))),
        channels=latent,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)) if sdxl else False,
    )
    config = LDMConfig(first_stage=vae_config, unet=unet_config, diffusion=diffusion, cond_stage=text_configs[0],
                       cond_stage_2=text_configs[1] if len(text_configs) > 1 else None)
    params = {"first_stage": vae_params, "unet": unet_params, "cond_stage": text_params[0]}
    if len(text_params) > 1:
        params["cond_stage_2"] = text_params[1]
    return LoadedModel(config=config, params=params, tokenizer=tokenizers[0], model_id=str(folder),
                       scheduler_config=scheduler, tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None)


def _listed(index: Mapping[str, Any], name: str) -> bool:
    """Whether model_index.json lists the component `name` (an entry [library, class], not [null, null])."""
    entry = index.get(name)
    return bool(entry) and entry[0] is not None


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
    final step: timestep_spacing and steps_offset (diffusers defaults "leading" and 0), for "ddim"
    set_alpha_to_one (default True) and clip_sample (default on, range 1.0), for "euler" and "dpm++"
    use_karras_sigmas and final_sigmas_type."""
    spacing = scheduler.get("timestep_spacing", "leading")
    opts: dict[str, Any] = {"timestep_spacing": spacing, "prediction_type": prediction_type_from_scheduler(scheduler)}
    if spacing == "leading":
        opts["steps_offset"] = int(scheduler.get("steps_offset", 0))
    if name in ("ddim", "plms"):
        opts["set_alpha_to_one"] = bool(scheduler.get("set_alpha_to_one", True))
    if name in ("ddim", "ddpm") and scheduler.get("clip_sample", True):
        opts["clip_sample"] = float(scheduler.get("clip_sample_range", 1.0))
    if name in ("euler", "dpm++"):  # the noise-level options of the schedulers that have them
        opts["use_karras_sigmas"] = bool(scheduler.get("use_karras_sigmas", False))
        if "final_sigmas_type" in scheduler:
            opts["final_sigmas_type"] = scheduler["final_sigmas_type"]
    return opts


def _load_text_encoder(folder: pathlib.Path, tokenizer: Any, *, output_layer: str, dtype: Any = np.float32
                       ) -> tuple[ClipTextConfig, dict[str, Any]]:
    hf_config = _read_json(folder / CONFIG_FILE, what="the text_encoder/ subfolder")
    if hf_config.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise ValueError(f"{folder}/config.json: model_type {hf_config.get('model_type')!r}; expected a CLIP text "
                         "model (clip_text_model)")
    hf_config = hf_config.get("text_config", hf_config)  # a full CLIPConfig nests the text part
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer beside {folder} has no pad token; Stable Diffusion pads prompts")
    config = clip_text_config_from_transformers(hf_config, pad_token_id=int(tokenizer.pad_token_id),
                                                output_layer=output_layer, tokenizer_kind="clip")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 10**6 and model_max != config.max_length:
        raise ValueError(f"tokenizer model_max_length {model_max} != the text encoder's max_position_embeddings "
                         f"{config.max_length}; prompts would be padded to a different length than diffusers uses")
    state_dict = read_weights(folder, TRANSFORMERS_WEIGHTS, dtype=dtype)
    return config, convert_clip_text_state_dict(state_dict, config, dtype=dtype)


def _load_vae(folder: pathlib.Path, *, dtype: Any = np.float32):
    vae_json = _read_json(folder / CONFIG_FILE, what="the vae/ subfolder")
    if vae_json.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{folder}/config.json: _class_name {vae_json.get('_class_name')!r}; Stable Diffusion "
                         "pipelines use AutoencoderKL")
    config = config_from_diffusers(vae_json, kind="kl")
    params = convert_diffusers_autoencoder(read_weights(folder, DIFFUSERS_WEIGHTS, dtype=dtype), config,
                                           source=str(folder), dtype=dtype)
    return config, params, float(vae_json.get("scaling_factor", 0.18215))


def _read_json(path: pathlib.Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected in {what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_weights(folder: pathlib.Path, names: tuple[str, ...], *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The weights of one component, read without running code: the first of `names` present (safetensors
    first), else its fp16 variant (`NAME.fp16.safetensors`, the hub's `variant="fp16"` files), each either one
    file or sharded (`NAME.index.json` listing the shard files, as `save_pretrained(max_shard_size=...)` writes).
    Float tensors come back as `dtype` (float32 or bfloat16), converted tensor by tensor as they are read."""
    for name in names:
        stem, suffix = name.rsplit(".", 1)
        for candidate in (name, f"{stem}.fp16.{suffix}"):
            if (folder / candidate).is_file():
                return load_state_dict(folder / candidate, dtype=dtype)
            index = folder / f"{candidate}.index.json"
            if index.is_file():
                return _read_shards(index, dtype=dtype)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder} has no weights file: expected one of {list(names)} (or their .fp16 variants "
                            f"or .index.json shards); found {found}")


def _read_shards(index: pathlib.Path, *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """A sharded checkpoint: every shard of index.json's weight_map, each key from the shard that lists it."""
    weight_map = _read_json(index, what=f"the sharded weights of {index.parent}").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map (expected {{tensor name: shard file}})")
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_state_dict(index.parent / shard, dtype=dtype)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            raise ValueError(f"{index.parent / shard}: holds {len(tensors)} tensors but {index.name} lists "
                             f"{len(listed)} for it (e.g. {sorted(set(tensors) ^ listed)[:3]})")
        state.update(tensors)
    return state


# ------------------------------------------------------------------------------------------------- export


def save_diffusers_pipeline(model: LoadedModel, folder: str | os.PathLike, *,
                            scheduler_class: str | None = None) -> pathlib.Path:
    """Writes `model` as a diffusers Stable Diffusion or SDXL folder (see the module docstring); returns it.

    The pipeline class: StableDiffusionXL(Img2Img / Inpaint)Pipeline for SDXL models (two towers or a
    "text_time" UNet; the refiner, whose UNet takes the aesthetic score, as StableDiffusionXLImg2ImgPipeline with
    its one tower as text_encoder_2), else StableDiffusionInpaintPipeline for models with concat channels or
    StableDiffusionPipeline. The scheduler config is the model's own `scheduler_config` when it came with one
    (a diffusers folder, or a model directory converted from one); otherwise it carries the schedule and
    prediction type with the family's usual sampling options (SD: PNDM, leading spacing, steps_offset 1;
    SDXL: Euler, leading, steps_offset 1).
    Raises ValueError for what a diffusers folder cannot hold (VQ first stage, non-CLIP text encoder, ...).
    """
    cfg, folder = model.config, pathlib.Path(folder)
    sdxl = cfg.structured_conditioning
    if model.tokenizer is None or (cfg.cond_stage_2 is not None and model.tokenizer_2 is None):
        raise ValueError("save_diffusers_pipeline: the model lacks a tokenizer for one of its text towers; a diffusers "
                         "folder needs them")
    scheduler_class = scheduler_class or ("EulerDiscreteScheduler" if sdxl else "PNDMScheduler")
    params = model.params
    unet_config = {"_class_name": "UNet2DConditionModel",
                   **unet_config_to_diffusers(cfg.unet, cfg.diffusion.image_size)}
    _write_part(folder / "unet", "diffusion_pytorch_model.safetensors", params["unet"], unet_config)
    vae_config = {"_class_name": "AutoencoderKL", **_vae_config(cfg), "scaling_factor": cfg.diffusion.scale_factor}
    _write_part(folder / "vae", "diffusion_pytorch_model.safetensors", params["first_stage"], vae_config)
    # (tower, subfolder, tokenizer subfolder, tokenizer): a refiner's one tower is diffusers' text_encoder_2.
    towers = [("cond_stage", "text_encoder", "tokenizer", model.tokenizer)]
    if cfg.cond_stage_2 is not None:
        towers.append(("cond_stage_2", "text_encoder_2", "tokenizer_2", model.tokenizer_2))
    elif sdxl:
        towers = [("cond_stage", "text_encoder_2", "tokenizer_2", model.tokenizer)]
    index_entries: dict[str, Any] = {}
    for name, encoder, tokenizer_dir, tokenizer in towers:
        tower = getattr(cfg, name)
        hf_config = clip_to_transformers_config(tower, sdxl=sdxl)
        (folder / encoder).mkdir(parents=True, exist_ok=True)
        save_safetensors(folder / encoder / "model.safetensors",
                         clip_text_to_transformers_state_dict(params[name], tower), {"format": "pt"})
        _write_json(folder / encoder / CONFIG_FILE, hf_config)
        save_tokenizer(tokenizer, folder / tokenizer_dir, tower.max_length)
        index_entries[encoder] = ["transformers", hf_config["architectures"][0]]
        index_entries[tokenizer_dir] = ["transformers", "CLIPTokenizer"]
    scheduler = model.scheduler_config  # the settings the model came with, else the family's usual ones
    if scheduler is not None and scheduler.get("_class_name"):
        scheduler_class = scheduler["_class_name"]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    _write_json(folder / "scheduler" / "scheduler_config.json",
                scheduler if scheduler is not None else scheduler_config(cfg.diffusion, scheduler_class))
    common = {"_diffusers_version": DIFFUSERS_VERSION, "scheduler": ["diffusers", scheduler_class],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
              "feature_extractor": [None, None], "image_encoder": [None, None]}
    if sdxl:
        refiner = cfg.num_time_ids == 5
        pipeline = ("StableDiffusionXLInpaintPipeline" if cfg.concat_channels else
                    "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline")
        index = {**common, "text_encoder": [None, None], "tokenizer": [None, None], **index_entries,
                 "force_zeros_for_empty_prompt": cfg.diffusion.force_zeros_for_empty_prompt}
        if pipeline != "StableDiffusionXLPipeline":
            index["requires_aesthetics_score"] = refiner
    else:
        pipeline = "StableDiffusionInpaintPipeline" if cfg.concat_channels else "StableDiffusionPipeline"
        index = {**common, **index_entries, "requires_safety_checker": False, "safety_checker": [None, None]}
    _write_json(folder / "model_index.json", {"_class_name": pipeline, **index})
    return folder


def clip_to_transformers_config(config: Any, *, sdxl: bool = False) -> dict[str, Any]:
    """transformers CLIPTextConfig dict (config.json) for our ClipTextConfig (inverse of
    clip_text_config_from_transformers): CLIPTextModelWithProjection when the tower has a projection.

    diffusers' pipelines choose the layer they read, so the tower must be read as they do: at its last layer
    (SD pipelines) or at the penultimate block without the final LayerNorm (`sdxl`, SDXL pipelines)."""
    layer = SDXL_OUTPUT_LAYER if sdxl else "last"
    if not isinstance(config, ClipTextConfig) or config.output_layer != layer:
        raise ValueError(f"a diffusers {'SDXL' if sdxl else 'SD'} folder holds CLIP text encoders read at "
                         f"output_layer {layer!r}; got {config}")
    return clip_text_to_transformers_config(config)


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
        "_class_name": scheduler_class, "_diffusers_version": DIFFUSERS_VERSION,
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
    config = {**config, "_diffusers_version": DIFFUSERS_VERSION}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / weights, params_to_state_dict(params, literal=LITERAL_NAMES), {"format": "pt"})
    _write_json(folder / CONFIG_FILE, config)


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


__all__ = ["CONFIG_FILE", "DIFFUSERS_VERSION", "DIFFUSERS_WEIGHTS", "clip_to_transformers_config",
           "load_diffusers_pipeline", "prediction_type_from_scheduler", "read_scheduler_config", "read_weights",
           "sampler_options", "save_diffusers_pipeline", "schedule_from_scheduler", "scheduler_config"]
