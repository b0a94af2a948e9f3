"""CompVis config.yaml files (the LDM model zoo, Stable Diffusion's v1/v2 inference yamls) -> our config.

`load_ldm_yaml(path, text_encoder_config=None)` reads the file with `yaml.safe_load` (no tags, no code) and
`config_from_ldm_yaml(data, text_encoder_config)` turns its `model:` entry into a locked ConfigDict with the
sections of the presets (`ldm_jax.presets`): `first_stage`, `unet`, `diffusion` (every DiffusionConfig field:
schedule, parameterization, scale_factor, conditioning key, ...) and `cond_stage` (absent for unconditional
models). `ldm_jax.ldm.ldm_config(config)` then gives the LDMConfig, e.g. for
`ldm_jax.convert.compvis.load_compvis_checkpoint`.

Understood `target:` classes (anything else is refused, naming the entry and the known targets):
- model: ldm.models.diffusion.ddpm.LatentDiffusion, LatentInpaintDiffusion (SD inpainting: concat channels
  [mask, masked-image latent]);
- unet_config: ldm.modules.diffusionmodules.openaimodel.UNetModel;
- first_stage_config: ldm.models.autoencoder.AutoencoderKL (kind "kl"), VQModelInterface / VQModel ("vq");
- cond_stage_config: ldm.modules.encoders.modules.FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, BERTEmbedder
  (LDM txt2img), ClassEmbedder (LDM cin256), or "__is_unconditional__".
A list `transformer_depth` (one per level) is one int when the attending levels (and the last, the mid block's)
agree, else our per-level tuple with 0 at the levels without attention.

SGM yamls (Stability's generative-models: configs/inference/sd_xl_base.yaml, sd_xl_refiner.yaml; classes under
`sgm.`, or `ldm.` in its first releases) are read too: model `DiffusionEngine` with
- network_config: SGM's `UNetModel` (always spatial transformers; `transformer_depth` one int per level, e.g.
  [1, 2, 10], becomes ours with 0 at the levels without attention: (0, 2, 10); num_classes "sequential" with
  adm_in_channels is SDXL's text_time embedding);
- conditioner_config: `GeneralConditioner` whose emb_models are the text towers in order (FrozenCLIPEmbedder:
  openai/clip-vit-large-patch14, layer "hidden" at layer_idx 11 (the penultimate block) -> output_layer
  "penultimate_no_norm"; FrozenOpenCLIPEmbedder2 arch ViT-bigG-14: all 32 blocks with its projection, layer
  "penultimate" with legacy False -> "penultimate_no_norm" (legacy True: "penultimate"), always_return_pooled on
  the last tower alone) and `ConcatTimestepEmbedderND` micro-conditioning inputs (outdim -> addition_time_embed_dim;
  original_size_as_tuple, crop_coords_top_left, then target_size_as_tuple (base) or aesthetic_score (refiner): the
  order of our time_ids), whose widths must add up to adm_in_channels;
- denoiser_config: `DiscreteDenoiser` over every timestep of `LegacyDDPMDiscretization` (SD's "linear" schedule
  and its end points), EpsScaling (eps) or VScaling (v);
- first_stage_config: `AutoencoderKLInferenceWrapper` / `AutoencoderKL` (ddconfig as CompVis'), scale_factor.
Images are 1024 px (SDXL's; the yaml has none); force_zeros_for_empty_prompt is True with two text towers (the base)
and False with one (the refiner), as diffusers' SDXL folders have it. The result is the preset sdxl_base /
sdxl_refiner for those yamls. Training entries (loss_fn_config, sampler_config, ucg_rate, is_trainable, ...) are
ignored; other towers or embedders are refused (text_encoder_config does not apply to SGM yamls).

Text encoders: a yaml names a CLIP text tower by `version=` (FrozenCLIPEmbedder, a Hugging Face model id) or
`arch=` (FrozenOpenCLIPEmbedder, an open_clip architecture) without its sizes. Two are known without help:
openai/clip-vit-large-patch14 (SD v1: the preset sd_v1's cond_stage) and ViT-H-14 (SD 2.x: the preset sd_v2's,
24 blocks). Any other needs `text_encoder_config`: a transformers CLIP config.json (a CLIPTextConfig, or a
CLIPConfig whose `text_config` is used; fields it leaves out take CLIPTextConfig's defaults) or a directory
holding one (its config.json, or text_encoder/config.json of a diffusers pipeline folder), e.g. the model's
Hugging Face snapshot directory, which also holds its tokenizer. Given, it describes the tower whatever the
version. How the embedders use the tower is fixed by the reference, not by the json: FrozenCLIPEmbedder pads
prompts with the end-of-text token and takes the last layer; FrozenOpenCLIPEmbedder pads with 0, and its
layer "penultimate" becomes (blocks - 1) blocks with output_layer "last" (the json counts every block of the
open_clip tower, e.g. 24 for ViT-H-14), as the preset sd_v2; a CompVis file's unused last block is dropped
on import (`ldm_jax.convert.compvis`).

Every `params` entry is either read, or listed in an explicit table of entries that do not change the model
(training-only settings such as `monitor`, `scheduler_config`, `use_ema`, `ckpt_path`), or required to have
the one value we implement (e.g. `dims: 2`); an unknown entry or an unsupported value is a ValueError naming
its place in the file (`model.params.unet_config.params.dims`).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from ldm_jax.convert.transformers_clip import LEGACY_EOS_TOKEN_ID, clip_text_config_from_transformers
from ldm_jax.presets import get_preset, sdxl
from ldm_jax.presets.sections import diffusion, section

LDM_TARGETS = ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.diffusion.ddpm.LatentInpaintDiffusion")
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
# SGM (generative-models) classes: `sgm.*`, or `ldm.*` in the configs of its first releases.
SGM_PACKAGES = ("sgm.", "ldm.")


def _sgm(name: str) -> tuple[str, ...]:
    return tuple(package + name for package in SGM_PACKAGES)


SGM_TARGETS = _sgm("models.diffusion.DiffusionEngine")
SGM_UNET_TARGETS = _sgm("modules.diffusionmodules.openaimodel.UNetModel")
SGM_DENOISER_TARGETS = _sgm("modules.diffusionmodules.denoiser.DiscreteDenoiser")
SGM_DISCRETIZATION_TARGETS = _sgm("modules.diffusionmodules.discretizer.LegacyDDPMDiscretization")
SGM_SCALINGS = {**dict.fromkeys(_sgm("modules.diffusionmodules.denoiser_scaling.EpsScaling"), "eps"),
                **dict.fromkeys(_sgm("modules.diffusionmodules.denoiser_scaling.VScaling"), "v")}
SGM_CONDITIONER_TARGETS = _sgm("modules.GeneralConditioner") + _sgm("modules.encoders.modules.GeneralConditioner")
_SGM_ENCODERS = "modules.encoders.modules."
SGM_CLIP_TARGETS = _sgm(_SGM_ENCODERS + "FrozenCLIPEmbedder")
SGM_OPENCLIP_TARGETS = _sgm(_SGM_ENCODERS + "FrozenOpenCLIPEmbedder2")
SGM_TIME_TARGETS = _sgm(_SGM_ENCODERS + "ConcatTimestepEmbedderND")
# ConcatTimestepEmbedderND inputs -> how many numbers each holds; the orders our (and diffusers') time_ids use.
SGM_TIME_INPUTS = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2,
                   "aesthetic_score": 1}
SGM_TIME_ORDERS = (("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"),  # base
                   ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"))  # refiner
SGM_IMAGE_SIZE = 1024  # pixels: SDXL's resolution (the yaml has no image size)
FIRST_STAGE_TARGETS = {"ldm.models.autoencoder.AutoencoderKL": "kl", "ldm.models.autoencoder.VQModelInterface": "vq",
                       "ldm.models.autoencoder.VQModel": "vq",
                       **dict.fromkeys(_sgm("models.autoencoder.AutoencoderKLInferenceWrapper")
                                       + _sgm("models.autoencoder.AutoencoderKL"), "kl")}
_ENCODERS = "ldm.modules.encoders.modules."
COND_TARGETS = tuple(_ENCODERS + n for n in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "BERTEmbedder",
                                               "ClassEmbedder"))
UNCONDITIONAL = "__is_unconditional__"

# Entries that do not change the model or its sampling (training, logging and loading options).
_LDM_IGNORED = {
    "first_stage_key", "cond_stage_key", "cond_stage_trainable", "log_every_t", "monitor", "use_ema",
    "scheduler_config", "ckpt_path", "ignore_keys", "load_only_unet", "clip_denoised", "reset_ema",
    "reset_num_ema_updates", "make_it_fit", "ucg_training", "load_ema", "unet_trainable",
    # LatentInpaintDiffusion: which batch entries fill the concat channels (fixed to [mask, masked image]).
    "masked_image_key", "finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end",
}
# Entries with the only value we implement (reference default first).
_LDM_REQUIRED = {
    "num_timesteps_cond": (1, None), "given_betas": (None,), "use_positional_encodings": (False,),
    "original_elbo_weight": (0.0,), "l_simple_weight": (1.0,), "cond_stage_forward": (None,),
    "concat_keys": (("mask", "masked_image"),),
}
_UNET_IGNORED = {
    "image_size",  # "unused" in the reference too: the UNet accepts any size divisible by its factor
    "use_fp16", "use_bf16",  # compute dtype is chosen at run time (`dtype=`)
    "use_checkpoint",  # remat is a run-time option (`ldm.RunOptions.remat`)
    "legacy",  # only changes how head dims are derived; with num_heads or num_head_channels both give ours
}
_UNET_REQUIRED = {
    "dims": (2,), "n_embed": (None,), "disable_self_attentions": (None,), "num_attention_blocks": (None,),
    "disable_middle_self_attn": (False,), "use_new_attention_order": (False,),
}
_FIRST_STAGE_IGNORED = {"monitor", "ckpt_path", "ignore_keys", "image_key", "lossconfig", "scheduler_config",
                        "lr_g_factor", "sane_index_shape", "use_ema", "base_learning_rate"}
_FIRST_STAGE_REQUIRED = {"colorize_nlabels": (None,), "remap": (None,), "batch_resize_range": (None,)}
_DDCONFIG_REQUIRED = {"attn_type": ("vanilla", "vanilla-xformers"), "tanh_out": (False,), "give_pre_end": (False,),
                      "resamp_with_conv": (True,), "use_linear_attn": (False,)}
_COND_IGNORED = {"device", "freeze", "key", "use_tokenizer"}
# SGM DiffusionEngine: training, logging and loading options (the model is the other entries).
_SGM_IGNORED = {
    "disable_first_stage_autocast", "loss_fn_config", "sampler_config", "optimizer_config", "scheduler_config",
    "network_wrapper", "ckpt_path", "use_ema", "ema_decay_rate", "input_key", "log_keys", "no_cond_log",
    "compile_model", "en_and_decode_n_samples_a_time", "load_ckpt_path", "remove_keys_from_weights",
}
_SGM_UNET_IGNORED = _UNET_IGNORED | {"spatial_transformer_attn_type"}  # the attention kernel: a run-time option
_SGM_UNET_REQUIRED = {**_UNET_REQUIRED, "use_spatial_transformer": (True,), "disable_middle_transformer": (False,)}
_SGM_DENOISER_REQUIRED = {"do_append_zero": (False,), "quantize_c_noise": (True,), "flip": (True,)}
# GeneralConditioner emb_models entries: training options (conditioning dropout, trainability) beside target/params.
_SGM_EMBEDDER_ENTRIES = {"target", "params", "is_trainable", "input_key", "input_keys", "ucg_rate", "legacy_ucg_value"}

CLIP_L14_VERSION = "openai/clip-vit-large-patch14"  # FrozenCLIPEmbedder's default version (SD v1)
OPENCLIP_H14_ARCH = "ViT-H-14"  # FrozenOpenCLIPEmbedder's default arch (SD 2.x)
OPENCLIP_BIGG_ARCH = "ViT-bigG-14"  # SDXL's second tower (FrozenOpenCLIPEmbedder2)
# transformers CLIPTextConfig's defaults, for the fields a saved json leaves out (a CLIPConfig's text_config
# often holds only the fields that differ from them).
CLIP_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, attention_dropout=0.0, eos_token_id=49407)
TEXT_ENCODER_CONFIG_FILES = ("config.json", "text_encoder/config.json")  # looked for in a directory, in order


def load_ldm_yaml(path: str | os.PathLike, text_encoder_config: str | os.PathLike | None = None
                  ) -> ml_collections.ConfigDict:
    """Reads a CompVis config.yaml (yaml.safe_load) and returns `config_from_ldm_yaml` of it.

    text_encoder_config: a transformers CLIP config.json, or a directory holding one, for a text encoder the
    reader does not know by name (module docstring). Errors are one-line ValueErrors naming the yaml file.
    """
    import yaml  # noqa: PLC0415 (PyYAML: only needed for this entry point)

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    try:
        text = None if text_encoder_config is None else read_text_encoder_config(text_encoder_config)
        return config_from_ldm_yaml(data, text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def read_text_encoder_config(path: str | os.PathLike) -> dict[str, Any]:
    """The transformers CLIPTextConfig fields of a config.json (or a directory holding one, see
    TEXT_ENCODER_CONFIG_FILES): a CLIPConfig's `text_config`, else the file's own fields, over
    CLIP_TEXT_DEFAULTS. ValueError (one line, naming the path) when there is no such file or it is no CLIP
    text config."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in TEXT_ENCODER_CONFIG_FILES if (path / name).is_file()]
        if not found:
            raise ValueError(f"text_encoder_config {path}: the directory holds none of "
                             f"{list(TEXT_ENCODER_CONFIG_FILES)}")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"text_encoder_config {path}: no such file or directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"text_encoder_config {path}: not a JSON file ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"text_encoder_config {path}: expected a JSON object, got {type(data).__name__}")
    if isinstance(data.get("text_config"), Mapping):
        data = data["text_config"]
    elif "hidden_size" not in data:
        raise ValueError(f"text_encoder_config {path}: neither a CLIPTextConfig (no hidden_size) nor a CLIPConfig "
                         f"(no text_config); it has {sorted(data)}")
    model_type = data.get("model_type", "clip_text_model")
    if model_type not in ("clip_text_model", "clip"):
        raise ValueError(f"text_encoder_config {path}: model_type {model_type!r} is not a CLIP text model")
    return {**CLIP_TEXT_DEFAULTS, **{k: v for k, v in data.items() if v is not None}, "source": str(path)}


def config_from_ldm_yaml(data: Mapping[str, Any], text_encoder_config: Mapping[str, Any] | None = None
                         ) -> ml_collections.ConfigDict:
    """A parsed CompVis config (a mapping with a `model` entry) -> locked ConfigDict (see module docstring).

    text_encoder_config: transformers CLIPTextConfig fields (`read_text_encoder_config`) describing the yaml's
    CLIP text tower; needed when its version/arch is not known, an error beside a non-CLIP cond stage.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise ValueError("expected a CompVis config with a top-level `model:` entry (target + params)")
    model = data["model"]
    if model.get("target") in SGM_TARGETS:
        return _config_from_sgm(model, text_encoder_config)
    params = _params(model, "model", LDM_TARGETS + SGM_TARGETS)
    p = _Section(params, "model.params", ignored=_LDM_IGNORED, required=_LDM_REQUIRED)
    cond_cfg = p.need("cond_stage_config")
    unconditional = cond_cfg == UNCONDITIONAL
    config = ml_collections.ConfigDict()
    config.first_stage = _first_stage(p.need("first_stage_config"))
    config.unet = _unet(p.need("unet_config"))
    if not unconditional:
        config.cond_stage = _cond_stage(cond_cfg, text_encoder_config)
    elif text_encoder_config is not None:
        raise ValueError(f"text_encoder_config {text_encoder_config.get('source', '')} given, but the model is "
                         f"unconditional (cond_stage_config: {UNCONDITIONAL})")
    config.diffusion = diffusion(
        beta_schedule=p.get("beta_schedule", "linear"),
        num_timesteps=int(p.get("timesteps", 1000)),
        linear_start=float(p.get("linear_start", 1e-4)),
        linear_end=float(p.get("linear_end", 2e-2)),
        cosine_s=float(p.get("cosine_s", 8e-3)),
        v_posterior=float(p.get("v_posterior", 0.0)),
        conditioning_key=_conditioning_key(p, unconditional, model.get("target")),
        prediction_type=p.get("parameterization", "eps"),
        scale_factor=float(p.get("scale_factor", 1.0)),
        scale_by_std=bool(p.get("scale_by_std", False)),
        image_size=int(p.get("image_size", 256)),
        channels=int(p.get("channels", 3)),
        loss_type=p.get("loss_type", "l2"),
        learn_logvar=bool(p.get("learn_logvar", False)),
        logvar_init=float(p.get("logvar_init", 0.0)),
    )
    p.done()
    config.lock()
    return config


def _config_from_sgm(model: Mapping[str, Any], text: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    """An SGM DiffusionEngine (SDXL: sd_xl_base.yaml, sd_xl_refiner.yaml) -> our sections (module docstring)."""
    if text is not None:
        raise ValueError(f"text_encoder_config {text.get('source', '')} given, but SGM (SDXL) yamls name their text "
                         f"towers (FrozenCLIPEmbedder {CLIP_L14_VERSION}, FrozenOpenCLIPEmbedder2 "
                         f"{OPENCLIP_BIGG_ARCH}); "
                         "other towers need a model config instead")
    p = _Section(_params(model, "model", SGM_TARGETS), "model.params", ignored=_SGM_IGNORED)
    config = ml_collections.ConfigDict()
    config.first_stage = _first_stage(p.need("first_stage_config"))
    unet = _unet(p.need("network_config"), sgm=True)
    towers, time_inputs, time_dim = _sgm_conditioner(p.need("conditioner_config"))
    config.cond_stage = ml_collections.ConfigDict(towers[0])
    if len(towers) > 1:
        config.cond_stage_2 = ml_collections.ConfigDict(towers[1])
    where = "model.params.network_config.params"
    if unet.num_classes != "sequential" or not time_inputs:
        raise ValueError(f"{where}.num_classes={unet.num_classes!r} with the conditioner's vector inputs "
                         f"{list(time_inputs)}: SDXL's text_time conditioning needs num_classes 'sequential' and "
                         f"ConcatTimestepEmbedderND embedders")
    pooled = towers[-1]["projection_dim"]
    width = pooled + sum(SGM_TIME_INPUTS[k] for k in time_inputs) * time_dim
    if unet.adm_in_channels != width:
        raise ValueError(f"{where}.adm_in_channels={unet.adm_in_channels}, but the conditioner's vector is {width} "
                         f"wide (pooled {pooled} + {list(time_inputs)} x {time_dim})")
    config.unet = section(sdxl.UNET_FIELDS, **{**unet.to_dict(), "num_classes": None,
                                               "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim})
    schedule, prediction_type = _sgm_denoiser(p.need("denoiser_config"))
    latent, factor = config.first_stage.embed_dim, 2 ** (len(config.first_stage.ch_mult) - 1)
    config.diffusion = section(
        sdxl.DIFFUSION_SDXL_FIELDS, **schedule, prediction_type=prediction_type,
        scale_factor=float(p.get("scale_factor", 1.0)),
        conditioning_key="hybrid" if unet.in_channels > latent else "crossattn",
        image_size=SGM_IMAGE_SIZE // factor, channels=latent,
        # diffusers' SDXL folders: True for the base (two towers), False for the refiner (one)
        force_zeros_for_empty_prompt=len(towers) > 1)
    p.done()
    config.lock()
    return config


def _sgm_denoiser(entry: Any) -> tuple[dict[str, Any], str]:
    """DiscreteDenoiser(num_idx, scaling, LegacyDDPMDiscretization) -> (schedule fields, prediction type)."""
    where = "model.params.denoiser_config"
    p = _Section(_params(entry, where, SGM_DENOISER_TARGETS), f"{where}.params", ignored={"weighting_config"},
                 required=_SGM_DENOISER_REQUIRED)
    scaling = p.need("scaling_config")
    _params(scaling, f"{where}.params.scaling_config", SGM_SCALINGS)
    d = _Section(_params(p.need("discretization_config"), f"{where}.params.discretization_config",
                         SGM_DISCRETIZATION_TARGETS), f"{where}.params.discretization_config.params")
    schedule = dict(beta_schedule="linear", num_timesteps=int(d.get("num_timesteps", 1000)),
                    linear_start=float(d.get("linear_start", 0.00085)), linear_end=float(d.get("linear_end", 0.012)))
    num_idx = int(p.need("num_idx"))
    if num_idx != schedule["num_timesteps"]:
        raise ValueError(f"{where}.params.num_idx={num_idx}: a denoiser over a subset of the "
                         f"{schedule['num_timesteps']} training timesteps is not supported")
    d.done()
    p.done()
    return schedule, SGM_SCALINGS[scaling["target"]]


def _sgm_conditioner(entry: Any) -> tuple[list[dict[str, Any]], tuple[str, ...], int]:
    """GeneralConditioner(emb_models) -> (text tower sections in order, micro-conditioning input keys, their
    feature width). The vector SGM builds ([pooled text embedding, features of the inputs in order]) must be the
    one our UNet builds: the last tower alone returns its pooled embedding, inputs in SGM_TIME_ORDERS."""
    where = "model.params.conditioner_config"
    p = _Section(_params(entry, where, SGM_CONDITIONER_TARGETS), f"{where}.params")
    models = p.need("emb_models")
    towers, pooled, time_inputs, dims = [], [], [], set()
    for i, model in enumerate(models if isinstance(models, tuple) else ()):
        at = f"{where}.params.emb_models[{i}]"
        if isinstance(model, Mapping):
            unknown = sorted(set(model) - _SGM_EMBEDDER_ENTRIES)
            if unknown:
                raise ValueError(f"{at}: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown}")
        e = _Section(_params({k: v for k, v in model.items() if k in ("target", "params")} if isinstance(
            model, Mapping) else model, at, SGM_CLIP_TARGETS + SGM_OPENCLIP_TARGETS + SGM_TIME_TARGETS),
            f"{at}.params", ignored=_COND_IGNORED)
        target = model["target"]
        if target in SGM_TIME_TARGETS:
            key = model.get("input_key")
            if key not in SGM_TIME_INPUTS:
                raise ValueError(f"{at}.input_key={key!r}: micro-conditioning inputs known here: "
                                 f"{list(SGM_TIME_INPUTS)}")
            time_inputs.append(key)
            dims.add(int(e.need("outdim")))
        else:
            section_, returns_pooled = (_sgm_clip if target in SGM_CLIP_TARGETS else _sgm_openclip)(e, f"{at}.params")
            towers.append(section_)
            pooled.append(returns_pooled)
        e.done()
    p.done()
    if not 1 <= len(towers) <= 2:
        raise ValueError(f"{where}: {len(towers)} text embedders; SDXL has one (refiner) or two (base)")
    if pooled != [False] * (len(towers) - 1) + [True] or towers[-1].get("projection_dim") is None:
        raise ValueError(f"{where}: the text embedders' always_return_pooled are {pooled}; SDXL's vector takes the "
                         f"pooled embedding of the last tower (an OpenCLIP one) alone")
    if time_inputs and tuple(time_inputs) not in SGM_TIME_ORDERS:
        raise ValueError(f"{where}: micro-conditioning inputs {time_inputs}; supported orders: "
                         f"{[list(order) for order in SGM_TIME_ORDERS]}")
    if len(dims) > 1:
        raise ValueError(f"{where}: ConcatTimestepEmbedderND outdims {sorted(dims)}; one width for every input")
    return towers, tuple(time_inputs), dims.pop() if dims else 0


def _sgm_clip(p: _Section, where: str) -> tuple[dict[str, Any], bool]:
    """SGM FrozenCLIPEmbedder(version, layer "last" / "hidden" with layer_idx): transformers CLIP, padded with
    end-of-text; layer "hidden" at the penultimate block (layer_idx = blocks - 1; SDXL 11) is our
    "penultimate_no_norm" (transformers' hidden_states[layer_idx], no final LayerNorm)."""
    version = p.get("version", CLIP_L14_VERSION)
    if version != CLIP_L14_VERSION:
        raise _unknown_text_encoder(where, "version", version, CLIP_L14_VERSION)
    tower = dict(sdxl.CLIP_FIELDS)
    layer, layer_idx = p.get("layer", "last"), p.get("layer_idx")
    if layer == "hidden" and layer_idx in (tower["num_layers"] - 1, -2):
        tower["output_layer"] = "penultimate_no_norm"
    elif layer != "last":
        raise ValueError(f"{where}.layer={layer!r}, layer_idx={layer_idx!r} is not supported (supported: 'last', or "
                         f"'hidden' at layer_idx {tower['num_layers'] - 1}, the penultimate block)")
    _max_length(p, where)
    return tower, bool(p.get("always_return_pooled", False))


def _sgm_openclip(p: _Section, where: str) -> tuple[dict[str, Any], bool]:
    """SGM FrozenOpenCLIPEmbedder2(arch, layer, legacy, always_return_pooled): OpenCLIP with every block kept and
    its text_projection; layer "penultimate" is "penultimate_no_norm" with legacy False (SDXL), "penultimate"
    (final LayerNorm applied) with legacy True; layer "last" needs legacy True."""
    arch = p.get("arch", OPENCLIP_H14_ARCH)
    if arch != OPENCLIP_BIGG_ARCH:
        raise _unknown_text_encoder(where, "arch", arch, OPENCLIP_BIGG_ARCH)
    p.get("version")  # the pretrained tag (laion2b_s39b_b160k): the weights come from the checkpoint
    layer, legacy = p.get("layer", "last"), bool(p.get("legacy", True))
    layers = {("penultimate", False): "penultimate_no_norm", ("penultimate", True): "penultimate",
              ("last", True): "last"}
    if (layer, legacy) not in layers:
        raise ValueError(f"{where}.layer={layer!r} with legacy={legacy} is not supported (supported: "
                         f"{[f'{a} with legacy={b}' for a, b in layers]})")
    _max_length(p, where)
    return dict(sdxl.OPENCLIP_BIGG, output_layer=layers[layer, legacy]), bool(p.get("always_return_pooled", False))


class _Section:
    """The `params` of one yaml entry: reads values, and at `done()` refuses anything unread and not ignored."""

    def __init__(self, params: Mapping[str, Any], where: str, *, ignored=frozenset(), required=None):
        self.params, self.where, self.ignored = dict(params), where, set(ignored)
        self.read: set[str] = set()
        for name, allowed in (required or {}).items():
            if name in self.params:
                value = _plain(self.params[name])
                if value not in allowed:
                    raise ValueError(f"{where}.{name}={value!r} is not supported (supported: "
                                     f"{' or '.join(repr(a) for a in allowed)})")
                self.read.add(name)

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return _plain(self.params.get(name, default))

    def need(self, name: str) -> Any:
        if self.params.get(name) is None:
            raise ValueError(f"{self.where}.{name} is missing; the reference has no default for it")
        return self.get(name)

    def done(self) -> None:
        unknown = sorted(set(self.params) - self.read - self.ignored)
        targets = [f"{n} (target {self.params[n]['target']})" for n in unknown
                   if isinstance(self.params[n], Mapping) and "target" in self.params[n]]
        if targets:
            raise ValueError(f"{self.where}: {', '.join(targets)}: not a part this reader understands")
        if unknown:
            raise ValueError(f"{self.where}: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"this reader understands {sorted(self.read | self.ignored)}")


def _plain(value: Any) -> Any:
    """YAML lists -> tuples (configs hold tuples), recursively."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _params(entry: Any, where: str, targets: Any) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping) or "target" not in entry:
        raise ValueError(f"{where}: expected a mapping with `target:` (one of {sorted(targets)}), got {entry!r}")
    target = entry["target"]
    if target not in targets:
        raise ValueError(f"{where}.target={target!r} is not a class this reader understands; known: {sorted(targets)}")
    unknown = sorted(set(entry) - {"target", "params", "base_learning_rate"})
    if unknown:
        raise ValueError(f"{where}: unknown entr{'y' if len(unknown) == 1 else 'ies'} {unknown} beside target/params")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}.params must be a mapping, got {type(params).__name__}")
    return params


def _conditioning_key(p: _Section, unconditional: bool, target: str) -> str | None:
    """LatentDiffusion.__init__: None -> "concat" if concat_mode (default True) else "crossattn";
    an unconditional cond stage forces None."""
    key = p.get("conditioning_key")
    concat_mode = p.get("concat_mode", True)
    if unconditional:
        return None
    if key is None:
        key = "concat" if concat_mode else "crossattn"
    if target.endswith("LatentInpaintDiffusion") and key != "hybrid":
        raise ValueError(f"model.params.conditioning_key={key!r}: LatentInpaintDiffusion needs 'hybrid'")
    return key


def _unet(entry: Any, *, sgm: bool = False) -> ml_collections.ConfigDict:
    """openaimodel UNetModel (CompVis), or SGM's (`sgm`: network_config; always spatial transformers)."""
    where = f"model.params.{'network_config' if sgm else 'unet_config'}"
    p = _Section(_params(entry, where, SGM_UNET_TARGETS if sgm else (UNET_TARGET,)), f"{where}.params",
                 ignored=_SGM_UNET_IGNORED if sgm else _UNET_IGNORED,
                 required=_SGM_UNET_REQUIRED if sgm else _UNET_REQUIRED)
    num_heads = int(p.get("num_heads", -1))
    upsample_heads = p.get("num_heads_upsample", -1)
    if upsample_heads not in (-1, num_heads):
        raise ValueError(f"{where}.params.num_heads_upsample={upsample_heads} != num_heads={num_heads} is not "
                         "supported")
    context_dim = p.get("context_dim")
    if isinstance(context_dim, tuple):
        if len(set(context_dim)) != 1:
            raise ValueError(f"{where}.params.context_dim={list(context_dim)}: one width per level is not supported")
        context_dim = context_dim[0]
    channel_mult = tuple(int(m) for m in p.get("channel_mult", (1, 2, 4, 8)))
    attention_resolutions = tuple(int(r) for r in p.need("attention_resolutions"))
    depth = _depth(p.get("transformer_depth", 1), channel_mult, attention_resolutions, f"{where}.params")
    section = dict(
        in_channels=int(p.need("in_channels")),
        out_channels=int(p.need("out_channels")),
        model_channels=int(p.need("model_channels")),
        channel_mult=channel_mult,
        num_res_blocks=int(p.need("num_res_blocks")),
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=int(p.get("num_head_channels", -1)),
        use_spatial_transformer=bool(p.get("use_spatial_transformer", sgm)),
        transformer_depth=depth,
        context_dim=None if context_dim is None else int(context_dim),
        use_linear_in_transformer=bool(p.get("use_linear_in_transformer", False)),
        conv_resample=bool(p.get("conv_resample", True)),
        use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        resblock_updown=bool(p.get("resblock_updown", False)),
        num_classes=p.get("num_classes"),
        adm_in_channels=p.get("adm_in_channels"),
        dropout=float(p.get("dropout", 0.0)),
        flip_sin_to_cos=True,
        freq_shift=0.0,
    )
    p.done()
    return ml_collections.ConfigDict(section)


def _depth(value: Any, channel_mult: tuple[int, ...], attention_resolutions: tuple[int, ...],
           where: str) -> int | tuple[int, ...]:
    """transformer_depth: an int as it is; a list (one int per level, SGM's [1, 2, 10]) is one int when every
    attending level and the mid block (the last level's) agree, else our per-level tuple with 0 at the levels
    without attention (the yaml's value there is unused), as `convert.diffusers_unet` reads diffusers' lists."""
    if not isinstance(value, tuple):
        return int(value)
    levels = len(channel_mult)
    if len(value) != levels:
        raise ValueError(f"{where}.transformer_depth={list(value)}: expected one depth per level ({levels} levels)")
    used = [level for level in range(levels) if 2**level in attention_resolutions or level == levels - 1]
    if len({value[level] for level in used}) == 1:
        return int(value[used[0]])
    return tuple(int(d) if level in used else 0 for level, d in enumerate(value))


def _first_stage(entry: Any) -> ml_collections.ConfigDict:
    where = "model.params.first_stage_config"
    p = _Section(_params(entry, where, FIRST_STAGE_TARGETS), f"{where}.params", ignored=_FIRST_STAGE_IGNORED,
                 required=_FIRST_STAGE_REQUIRED)
    kind = FIRST_STAGE_TARGETS[entry["target"]]
    dd = _Section(p.get("ddconfig") or {}, f"{where}.params.ddconfig", required=_DDCONFIG_REQUIRED)
    section = dict(
        kind=kind,
        in_channels=int(dd.need("in_channels")),
        out_ch=int(dd.need("out_ch")),
        ch=int(dd.need("ch")),
        ch_mult=tuple(int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))),
        num_res_blocks=int(dd.need("num_res_blocks")),
        attn_resolutions=tuple(int(r) for r in dd.need("attn_resolutions")),
        resolution=int(dd.need("resolution")),
        z_channels=int(dd.need("z_channels")),
        embed_dim=int(p.need("embed_dim")),
        double_z=bool(dd.get("double_z", True)),
        dropout=float(dd.get("dropout", 0.0)),
        n_embed=int(p.need("n_embed")) if kind == "vq" else 0,
        beta=0.25,  # taming VectorQuantizer2 default, which VQModel does not override
        legacy=True,
    )
    dd.done()
    p.done()
    return ml_collections.ConfigDict(section)


def _cond_stage(entry: Any, text: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    where = "model.params.cond_stage_config"
    if entry == "__is_first_stage__":
        raise ValueError(f"{where}=__is_first_stage__ (conditioning on the first stage's latents) is not supported")
    params = _params(entry, where, COND_TARGETS)
    name = entry["target"][len(_ENCODERS):]
    p = _Section(params, f"{where}.params", ignored=_COND_IGNORED)
    if name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"):
        section = (_clip if name == "FrozenCLIPEmbedder" else _openclip)(p, f"{where}.params", text)
    elif text is not None:
        raise ValueError(f"text_encoder_config {text.get('source', '')} given, but the yaml's text encoder is "
                         f"{name}, not a CLIP text tower")
    else:
        section = {"BERTEmbedder": _bert, "ClassEmbedder": _class}[name](p, f"{where}.params")
    p.done()
    return ml_collections.ConfigDict(section)


def _unknown_text_encoder(where: str, name: str, value: str, known: str) -> ValueError:
    return ValueError(f"{where}.{name}={value!r} is not a text encoder this reader knows (known: {known!r}); pass "
                      f"its transformers CLIP config.json, or a directory holding one (e.g. its Hugging Face "
                      f"snapshot), as text_encoder_config (ldm-jax sample --text-encoder-config)")


def _from_text_encoder_config(text: Mapping[str, Any], where: str, max_length: int, *, pad_token_id: int
                              ) -> dict[str, Any]:
    """Our cond_stage section (CLIP) from transformers CLIPTextConfig fields; the yaml's max_length must be
    the tower's number of positions (our position table is the padded length)."""
    if text["max_position_embeddings"] != max_length:
        raise ValueError(f"{where}.max_length={max_length} but text_encoder_config {text.get('source', '')} has "
                         f"max_position_embeddings={text['max_position_embeddings']}; they must be equal")
    fields = {k: v for k, v in text.items() if k != "source"}
    try:
        config = clip_text_config_from_transformers(fields, pad_token_id=pad_token_id)
    except (ValueError, KeyError) as err:
        raise ValueError(f"text_encoder_config {text.get('source', '')}: {err}") from None
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def _max_length(p: _Section, where: str, name: str = "max_length", known: bool = True) -> int:
    value = int(p.get(name, 77))
    if known and value != 77:
        raise ValueError(f"{where}.{name}={value}: the text encoders known here have 77 positions")
    return value


def _clip(p: _Section, where: str, text: Mapping[str, Any] | None) -> dict[str, Any]:
    """FrozenCLIPEmbedder(version, layer="last", max_length=77): transformers CLIPTextModel, prompts padded with
    the end-of-text token (the id `eos_token_id`, or the last id of the vocabulary for configs with the legacy
    eos_token_id 2: CLIP's BPE vocabulary ends with <|endoftext|>)."""
    version = p.get("version", CLIP_L14_VERSION)
    if text is None and version != CLIP_L14_VERSION:
        raise _unknown_text_encoder(where, "version", version, CLIP_L14_VERSION)
    layer = p.get("layer", "last")
    if layer != "last":
        raise ValueError(f"{where}.layer={layer!r} is not supported (supported: 'last')")
    p.get("layer_idx")
    max_length = _max_length(p, where, known=text is None)
    if text is None:
        return get_preset("sd_v1").cond_stage.to_dict()
    eos = text["eos_token_id"]
    end_of_text = text["vocab_size"] - 1 if eos == LEGACY_EOS_TOKEN_ID else eos
    return _from_text_encoder_config(text, where, max_length, pad_token_id=end_of_text)


def _openclip(p: _Section, where: str, text: Mapping[str, Any] | None) -> dict[str, Any]:
    """FrozenOpenCLIPEmbedder(arch, version, layer, max_length=77): open_clip's text tower, prompts padded with 0;
    layer "penultimate" drops the last block (our output_layer "last" on one block fewer)."""
    arch = p.get("arch", OPENCLIP_H14_ARCH)
    if text is None and arch != OPENCLIP_H14_ARCH:
        raise _unknown_text_encoder(where, "arch", arch, OPENCLIP_H14_ARCH)
    p.get("version")  # the pretrained tag (laion2b_s32b_b79k): the weights come from the checkpoint
    layer = p.get("layer", "last")
    if layer not in ("last", "penultimate"):
        raise ValueError(f"{where}.layer={layer!r} is not supported (supported: 'last', 'penultimate')")
    max_length = _max_length(p, where, known=text is None)
    if text is None:
        section = get_preset("sd_v2").cond_stage.to_dict()
        section["num_layers"] = 24  # ViT-H-14's text tower (the preset holds the 23 that SD 2.x evaluates)
    else:
        section = _from_text_encoder_config(text, where, max_length, pad_token_id=0)
    if layer == "penultimate":
        if section["num_layers"] < 2:
            raise ValueError(f"{where}.layer='penultimate' needs a tower of 2 or more blocks; the text encoder "
                             f"has {section['num_layers']}")
        section["num_layers"] -= 1  # the last block is never evaluated; see ldm_jax.convert.compvis
    return section


def _bert(p: _Section, where: str) -> dict[str, Any]:
    dropout = float(p.get("embedding_dropout", 0.0))
    if dropout:
        raise ValueError(f"{where}.embedding_dropout={dropout}: dropout in the BERT embedder is not implemented")
    return dict(kind="bert", vocab_size=int(p.get("vocab_size", 30522)),
                max_length=_max_length(p, where, "max_seq_len"), n_embed=int(p.need("n_embed")),
                n_layer=int(p.need("n_layer")), pad_token_id=0, tokenizer_kind="bert")


def _class(p: _Section, where: str) -> dict[str, Any]:
    rate = float(p.get("ucg_rate", 0.0))
    if rate:
        raise ValueError(f"{where}.ucg_rate={rate}: set diffusion cond_drop_prob instead (class dropout)")
    return dict(kind="class", n_classes=int(p.get("n_classes", 1000)), embed_dim=int(p.need("embed_dim")))


__all__ = ["COND_TARGETS", "FIRST_STAGE_TARGETS", "LDM_TARGETS", "SGM_TARGETS", "UNET_TARGET", "config_from_ldm_yaml",
           "load_ldm_yaml"]
