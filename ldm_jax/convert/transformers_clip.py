"""transformers CLIPTextModel / CLIPTextModelWithProjection <-> our ClipTextTransformer: config and strict
state-dict conversion, both ways.

Checkpoints on disk (transformers 4.x, diffusers' SD `text_encoder/`) name keys `text_model.<rest>`;
transformers 5's CLIPTextModel.state_dict() and save_pretrained name them `<rest>` (it renames on load). Both
are accepted. CLIPTextModelWithProjection (SDXL's `text_encoder_2/`, OpenCLIP ViT-bigG/14) keeps
`text_model.<rest>` in transformers 4 and 5 alike, plus the top-level `text_projection.weight`:
  text_projection.weight                                -> text_projection/kernel (transposed)
Whether a config has the projection is `clip_text_config_from_transformers`'s decision (its `with_projection`,
by default the config's `architectures`); a projection config without `text_projection.weight` is a missing
key, a plain one given it an unexpected key.
Keys `<rest>` map onto Flax paths by `convert_state_dict` (numbered children joined with `_`):
  text_model.embeddings.token_embedding.weight          -> embeddings/token_embedding/embedding
  text_model.embeddings.position_embedding.weight       -> embeddings/position_embedding/embedding
  text_model.encoder.layers.3.self_attn.q_proj.weight   -> encoder/layers_3/self_attn/q_proj/kernel (transposed)
  text_model.encoder.layers.3.layer_norm1.weight        -> encoder/layers_3/layer_norm1/scale
  text_model.final_layer_norm.bias                      -> final_layer_norm/bias
The registered buffer `text_model.embeddings.position_ids` (present in older checkpoints) holds no parameter
and is dropped explicitly; any other key outside the model is reported as unexpected. For CompVis SD v1
checkpoints pass `prefix="cond_stage_model.transformer.text_model."` (and only the cond-stage keys).
Export, the inverse: `clip_text_to_transformers_config(config)` is the config.json and
`clip_text_to_transformers_state_dict(params, config)` the state dict (`text_model.<rest>` and, with a
projection, `text_projection.weight`) that transformers' `from_pretrained` loads strictly.

transformers CLIPModel -> our `clip_vision.ClipModel` (both towers and the projections, for the CLIP score):
`convert_clip_model_state_dict` maps the keys `CLIPModel.save_pretrained` writes (transformers 4 and 5 alike)
with the same rules, keeping the tower prefix as the Flax module name:
  text_model.<rest>                                      -> text_model/<as above>
  vision_model.embeddings.class_embedding                -> vision_model/embeddings/class_embedding
  vision_model.embeddings.patch_embedding.weight         -> vision_model/embeddings/patch_embedding/kernel (OIHW->HWIO)
  vision_model.embeddings.position_embedding.weight      -> vision_model/embeddings/position_embedding/embedding
  vision_model.pre_layrnorm.weight (sic), .post_layernorm -> vision_model/pre_layrnorm/scale, .../post_layernorm
  vision_model.encoder.layers.3.<...>                    -> vision_model/encoder/layers_3/<...> (as the text blocks)
  visual_projection.weight, text_projection.weight       -> visual_projection/kernel, text_projection/kernel (.T)
Dropped explicitly: `logit_scale` (the contrastive loss's temperature; a CLIP score does not use it) and the
`position_ids` buffers of both towers. `load_clip_model(folder)` reads such a folder (config.json,
model.safetensors or pytorch_model.bin, the tokenizer files, optional preprocessor_config.json) into a
`LoadedClip`; see its docstring for the files and the errors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.common import ConversionError, convert_state_dict, expected_shapes, params_to_state_dict
from ldm_jax.models.clip_vision import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipModel, ClipModelConfig,
                                        ClipPreprocessConfig, ClipVisionConfig)
from ldm_jax.models.text import ClipTextConfig, ClipTextTransformer

_BUFFERS = ("embeddings.position_ids",)
_EMBEDDINGS = ("token_embedding", "position_embedding")
_TOWERS = ("text_model.", "vision_model.")
_CLIP_MODEL_DROPPED = ("logit_scale",)
CLIP_MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the first one present is read
CLIP_TOKENIZER_FILES = {"clip": ("vocab.json", "merges.txt"), "tokenizer_json": ("tokenizer.json",)}
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, CLIPImageProcessor's `resample`
LEGACY_EOS_TOKEN_ID = 2  # transformers' marker for "pool at argmax(input_ids)" (configs before PR #24773)
WITH_PROJECTION = "CLIPTextModelWithProjection"  # the transformers architecture that has text_projection
_PROJECTION_KEY = "text_projection.weight"  # top level, outside `text_model.`, in every layout


def clip_text_config_from_transformers(
    hf_config: Any,
    *,
    pad_token_id: int,
    output_layer: str = "last",
    tokenizer_kind: str = "clip",
    with_projection: bool | None = None,
) -> ClipTextConfig:
    """Our ClipTextConfig from a transformers `CLIPTextConfig` (or its `to_dict()`, e.g. a config.json).

    pad_token_id: the id prompts are padded with (SD v1: 49407, SD v2/OpenCLIP: 0). Required because the
      transformers config's `pad_token_id` (1 by default) is not what SD's tokenizers pad with.
    output_layer: "last" (SD v1), "penultimate" (SD v2 with a full 24-block OpenCLIP text tower) or
      "penultimate_no_norm" (SDXL, both towers).
    with_projection: whether the model is a CLIPTextModelWithProjection (our config then gets the config's
      `projection_dim`); None: True exactly when the config's `architectures` is ["CLIPTextModelWithProjection"]
      (what save_pretrained writes). Every CLIPTextConfig carries a projection_dim (512 by default), so that
      field alone does not tell. Raises ValueError when a projection is asked for and projection_dim is absent.
    """
    cfg = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    eos = cfg.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"CLIPTextConfig.eos_token_id {eos}: expected one id, the end-of-text token")
        eos = eos[0]
    if cfg.get("attention_dropout", 0.0):
        raise ValueError(f"CLIPTextConfig.attention_dropout {cfg['attention_dropout']}: expected 0 (not implemented)")
    if with_projection is None:
        with_projection = list(cfg.get("architectures") or []) == [WITH_PROJECTION]
    if with_projection and cfg.get("projection_dim") is None:
        raise ValueError("CLIPTextConfig has no projection_dim; a CLIPTextModelWithProjection needs one")
    return ClipTextConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        max_length=cfg["max_position_embeddings"],
        hidden_act=cfg["hidden_act"],
        layer_norm_eps=cfg["layer_norm_eps"],
        eos_token_id=int(eos),
        pooling="argmax" if eos == LEGACY_EOS_TOKEN_ID else "first_eos",
        output_layer=output_layer,
        pad_token_id=pad_token_id,
        tokenizer_kind=tokenizer_kind,
        projection_dim=int(cfg["projection_dim"]) if with_projection else None,
    )


def clip_text_to_transformers_config(config: ClipTextConfig) -> dict[str, Any]:
    """The transformers CLIPTextConfig dict (config.json) of `config`: the inverse of
    `clip_text_config_from_transformers` for the architecture. `architectures` is
    ["CLIPTextModelWithProjection"] with `projection_dim` when config.projection_dim is set, else
    ["CLIPTextModel"] (projection_dim = hidden_size, unused). What the tower is read at (output_layer,
    clip_skip) and how prompts are padded are not architecture; pad_token_id is written for reference only.
    The eos_token_id is the legacy 2 for argmax pooling (what transformers keys that rule on)."""
    eos = LEGACY_EOS_TOKEN_ID if config.pooling == "argmax" else config.eos_token_id
    projection = config.projection_dim is not None
    return {
        "architectures": [WITH_PROJECTION if projection else "CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "max_position_embeddings": config.max_length,
        "hidden_act": config.hidden_act, "layer_norm_eps": config.layer_norm_eps, "eos_token_id": eos,
        "pad_token_id": config.pad_token_id, "attention_dropout": 0.0, "dropout": 0.0,
        "projection_dim": config.projection_dim if projection else config.hidden_size, "dtype": "float32",
    }


def clip_text_expected_shapes(config: ClipTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{flax path: shape} of ClipTextTransformer(config)'s params (abstract; nothing is allocated)."""
    model = ClipTextTransformer(config)
    ids = jnp.zeros((1, config.max_length), jnp.int32)
    return expected_shapes(model.init, jax.random.key(0), ids)


def convert_clip_text_state_dict(
    state_dict: Mapping[str, Any],
    config: ClipTextConfig,
    *,
    prefix: str | None = None,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Strictly converts a CLIPTextModel or CLIPTextModelWithProjection state dict (torch tensors or arrays)
    into ClipTextTransformer params (float32, or `dtype` bfloat16).

    prefix: stripped from every key of the text model; keys without it are reported as unexpected, except
      the top-level `text_projection.weight` (expected exactly when config.projection_dim is set). None:
      "text_model." when any key starts with it (checkpoint layout), else "" (transformers 5 CLIPTextModel).
    Returns the params tree (apply with `{"params": params}`). Raises ConversionError listing every missing,
    unexpected and mis-shaped key.
    """
    if prefix is None:
        prefix = "text_model." if any(k.startswith("text_model.") for k in state_dict) else ""

    def rename(key: str) -> str | None:
        if key == _PROJECTION_KEY:
            return key
        if not key.startswith(prefix):
            return key  # not part of the text model: reported as unexpected under its own name
        rest = key[len(prefix):]
        if rest.startswith("text_projection."):  # the projection is never inside the tower's prefix
            return key
        return None if rest in _BUFFERS else rest

    projection = f" + {_PROJECTION_KEY}" if config.projection_dim is not None else ""
    kind = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    return convert_state_dict(
        state_dict,
        clip_text_expected_shapes(config),
        source=f"transformers {kind} (keys {prefix}*{projection})",
        rename=rename,
        embeddings=_EMBEDDINGS,
        dtype=dtype,
    )


def clip_text_to_transformers_state_dict(params: Mapping[str, Any], config: ClipTextConfig) -> dict[str, np.ndarray]:
    """ClipTextTransformer params (no "params" level) -> the float32 numpy state dict transformers saves for
    CLIPTextModel / CLIPTextModelWithProjection in the checkpoint layout: `text_model.<rest>` and, with
    config.projection_dim, `text_projection.weight` (the inverse of `convert_clip_text_state_dict`).

    Raises ConversionError listing every missing, unexpected and mis-shaped param against `config`.
    """
    expected = clip_text_expected_shapes(config)
    flat = {path: np.shape(leaf) for path, leaf in traverse_util.flatten_dict(dict(params)).items()}
    missing = sorted("/".join(p) for p in expected if p not in flat)
    unexpected = sorted("/".join(p) for p in flat if p not in expected)
    mismatched = sorted(f"{'/'.join(p)}: params {flat[p]} vs config {expected[p]}"
                        for p in flat if p in expected and tuple(flat[p]) != tuple(expected[p]))
    if missing or unexpected or mismatched:
        lines = [f"{title} ({len(items)}): " + ", ".join(items[:20]) for title, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        raise ConversionError("params do not match the CLIP text config:\n  " + "\n  ".join(lines))
    out = {}
    for key, value in params_to_state_dict(params).items():
        out[key if key == _PROJECTION_KEY else f"text_model.{key}"] = value
    return out


# ------------------------------------------------------------------------------------ CLIPModel (two towers)


def clip_vision_config_from_transformers(hf_config: Any) -> ClipVisionConfig:
    """Our ClipVisionConfig from a transformers `CLIPVisionConfig` (or its `to_dict()`, e.g. the
    "vision_config" of a CLIPModel's config.json). Raises ValueError for attention_dropout != 0."""
    cfg = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if cfg.get("attention_dropout", 0.0):
        raise ValueError(f"CLIPVisionConfig.attention_dropout {cfg['attention_dropout']}: expected 0 "
                         "(not implemented)")
    return ClipVisionConfig(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        num_channels=cfg.get("num_channels", 3),
        hidden_act=cfg["hidden_act"],
        layer_norm_eps=cfg["layer_norm_eps"],
    )


def clip_model_config_from_transformers(hf_config: Any, *, pad_token_id: int,
                                        tokenizer_kind: str = "clip") -> ClipModelConfig:
    """Our ClipModelConfig from a transformers `CLIPConfig` (or its `to_dict()`, i.e. a CLIPModel config.json).

    pad_token_id: the id prompts are padded with (the tokenizer's pad token; OpenAI CLIP: 49407).
    Raises ValueError when model_type is not "clip" or a part is missing.
    """
    cfg = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if cfg.get("model_type") != "clip":
        raise ValueError(f"config model_type {cfg.get('model_type')!r}: expected 'clip' (a transformers CLIPModel)")
    missing = [k for k in ("text_config", "vision_config", "projection_dim") if k not in cfg]
    if missing:
        raise ValueError(f"CLIPModel config lacks {', '.join(missing)}")
    return ClipModelConfig(
        text=clip_text_config_from_transformers(cfg["text_config"], pad_token_id=pad_token_id,
                                                tokenizer_kind=tokenizer_kind, with_projection=False),
        vision=clip_vision_config_from_transformers(cfg["vision_config"]),
        projection_dim=int(cfg["projection_dim"]),
    )


def clip_model_expected_shapes(config: ClipModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{flax path: shape} of ClipModel(config)'s params (abstract; nothing is allocated)."""
    v = config.vision
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    ids = jnp.zeros((1, config.text.max_length), jnp.int32)
    return expected_shapes(ClipModel(config).init, jax.random.key(0), pixels, ids)


def convert_clip_model_state_dict(state_dict: Mapping[str, Any], config: ClipModelConfig) -> dict[str, Any]:
    """Strictly converts a transformers CLIPModel state dict (keys as on disk, see the module docstring; torch
    tensors or arrays) into ClipModel params (apply with `{"params": params}`).

    The text tower's keys follow `convert_clip_text_state_dict`'s rules under `text_model.`. Raises
    ConversionError listing every missing, unexpected and mis-shaped key of both towers in one message.
    """

    def rename(key: str) -> str | None:
        for tower in _TOWERS:
            if key.startswith(tower):
                return None if key[len(tower):] in _BUFFERS else key
        return None if key in _CLIP_MODEL_DROPPED else key

    return convert_state_dict(
        state_dict,
        clip_model_expected_shapes(config),
        source="transformers CLIPModel (keys text_model.*, vision_model.*, *_projection.weight)",
        rename=rename,
        embeddings=_EMBEDDINGS,
    )


def clip_preprocess_config(processor: Mapping[str, Any] | None, image_size: int, *,
                           where: str = "preprocessor_config.json") -> ClipPreprocessConfig:
    """The CLIPImageProcessor settings: from a preprocessor_config.json dict, or None for CLIP's defaults at
    `image_size` (shortest side and crop = image_size, OpenAI mean/std).

    Accepts `size` as an int or {"shortest_edge": n} and `crop_size` as an int or a square {"height", "width"}.
    Raises ValueError naming `where` for anything else we do not reproduce: a resize other than PIL bicubic,
    a disabled resize/crop/rescale/normalise step, a rescale factor other than 1/255, or a crop size that
    differs from the vision tower's image_size.
    """
    if processor is None:
        return ClipPreprocessConfig(shortest_edge=image_size, crop_size=image_size)
    bad = [f"{k}={processor[k]!r}" for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
           if not processor.get(k, True)]
    if processor.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
        bad.append(f"resample={processor['resample']!r} (only {PIL_BICUBIC}, PIL bicubic)")
    if not math.isclose(processor.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-9):
        bad.append(f"rescale_factor={processor['rescale_factor']!r} (only 1/255)")
    size, crop = processor.get("size", image_size), processor.get("crop_size", image_size)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge") if set(size) == {"shortest_edge"} else None
    if isinstance(crop, Mapping):
        crop = crop.get("height") if set(crop) == {"height", "width"} and crop["height"] == crop["width"] else None
    if not isinstance(size, int):
        bad.append(f"size={processor.get('size')!r} (only an int or {{'shortest_edge': n}})")
    if not isinstance(crop, int):
        bad.append(f"crop_size={processor.get('crop_size')!r} (only an int or a square {{'height', 'width'}})")
    elif crop != image_size:
        bad.append(f"crop_size {crop} != the vision model's image_size {image_size}")
    if bad:
        raise ValueError(f"{where}: unsupported CLIPImageProcessor settings: " + "; ".join(bad))
    return ClipPreprocessConfig(shortest_edge=size, crop_size=crop,
                                mean=tuple(float(m) for m in processor.get("image_mean", OPENAI_CLIP_MEAN)),
                                std=tuple(float(s) for s in processor.get("image_std", OPENAI_CLIP_STD)))


@dataclasses.dataclass(frozen=True)
class LoadedClip:
    """A CLIP model ready to embed: config, ClipModel params (no "params" level), a transformers tokenizer, the
    image preprocessing settings, and the folder it came from."""

    config: ClipModelConfig
    params: dict[str, Any]
    tokenizer: Any
    preprocess: ClipPreprocessConfig
    model_dir: str = ""


def load_clip_model(folder: str | os.PathLike) -> LoadedClip:
    """Loads a transformers CLIPModel folder (offline; no code from it runs).

    The folder holds what `CLIPModel.save_pretrained` and `CLIPProcessor.save_pretrained` write (e.g. a copy
    of openai/clip-vit-large-patch14): config.json (model_type "clip"), model.safetensors or pytorch_model.bin,
    the tokenizer as vocab.json + merges.txt or tokenizer.json, and optionally preprocessor_config.json
    (without it: CLIP's defaults at the config's image_size, see `clip_preprocess_config`).
    Raises FileNotFoundError naming the folder and the files expected when it or one of them is missing,
    ValueError (ConversionError, CheckpointError) for a config or checkpoint that does not fit.
    """
    import transformers  # noqa: PLC0415 (takes seconds; only loading a CLIP folder needs it)

    from ldm_jax.models.tokenizer import load_tokenizer  # noqa: PLC0415

    folder = pathlib.Path(folder)
    weights_names = " or ".join(CLIP_MODEL_WEIGHTS)
    tokenizer_names = " or ".join(" + ".join(files) for files in CLIP_TOKENIZER_FILES.values())
    layout = f"config.json, {weights_names}, {tokenizer_names}"
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP model directory {folder} does not exist (a transformers CLIPModel folder "
                                f"holds {layout})")
    weights = next((folder / name for name in CLIP_MODEL_WEIGHTS if (folder / name).is_file()), None)
    kind = next((k for k, files in CLIP_TOKENIZER_FILES.items() if all((folder / f).is_file() for f in files)), None)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if weights is None:
        missing.append(weights_names)
    if kind is None:
        missing.append(f"a tokenizer ({tokenizer_names})")
    if missing:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"CLIP model directory {folder} lacks {'; '.join(missing)} (a transformers "
                                f"CLIPModel folder holds {layout}; found {found})")
    hf_config = _read_json(folder / "config.json")
    if hf_config.get("model_type") != "clip":
        raise ValueError(f"{folder / 'config.json'}: model_type {hf_config.get('model_type')!r}; expected 'clip' "
                         "(a transformers CLIPModel)")
    # transformers' own parser fills the values a config.json leaves at their defaults (and reads the legacy
    # text_config_dict / vision_config_dict keys), as CLIPModel.from_pretrained would.
    hf_config = transformers.CLIPConfig.from_dict(hf_config)
    tokenizer = load_tokenizer(folder, kind)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"the tokenizer in {folder} has neither a pad nor an end-of-text token")
    config = clip_model_config_from_transformers(hf_config, pad_token_id=int(pad), tokenizer_kind=kind)
    processor_file = folder / "preprocessor_config.json"
    processor = _read_json(processor_file) if processor_file.is_file() else None
    preprocess = clip_preprocess_config(processor, config.vision.image_size, where=str(processor_file))
    params = convert_clip_model_state_dict(load_state_dict(weights), config)
    return LoadedClip(config=config, params=params, tokenizer=tokenizer, preprocess=preprocess,
                      model_dir=str(folder))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
