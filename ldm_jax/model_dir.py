"""Model directories: what training exports and what sampling loads, self-describing and strict.

An LDM model directory (`write_model_dir`, `load_model`):

    config.json          {"first_stage": ..., "cond_stage": ..., "unet": ..., "diffusion": ..., "ldm": ...}: the
                         config sections `ldm.ldm_config` reads (scale_factor resolved, e.g. by scale_by_std)
    params.safetensors   every param of the model (the EMA weights for trained parts), float32, named by their
                         "/"-joined Flax paths ("unet/conv_in/kernel", "first_stage/decoder/conv_out/bias", ...)
    tokenizer/           the tokenizer files (text models only), loaded as `cond_stage.tokenizer_kind`

A first-stage directory (`write_first_stage_dir`, `load_first_stage_dir`), what the autoencoder stage
exports and the LDM stage starts from:

    first_stage.json     the `first_stage` section (AutoencoderConfig fields)
    params.safetensors   the autoencoder's params ("encoder/conv_in/kernel", ...)

Loading checks every parameter against the shapes the config's model would create: missing, unexpected
and mis-shaped names are listed in one `ConversionError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from ldm_jax import ldm
from ldm_jax.config import build_dataclass
from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import assemble_params, expected_shapes
from ldm_jax.models.autoencoder import AutoencoderConfig, build_autoencoder, init_autoencoder
from ldm_jax.models.tokenizer import load_tokenizer

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
TOKENIZER_DIR = "tokenizer"
FIRST_STAGE_CONFIG_FILE = "first_stage.json"
LDM_SECTIONS = ("first_stage", "cond_stage", "unet", "diffusion", "ldm")


def ldm_param_shapes(config: ldm.LDMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of a fresh LDM of `config` (nothing allocated)."""
    return expected_shapes(lambda key: ldm.init_params(config, key), jax.random.key(0))


def autoencoder_param_shapes(config: AutoencoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of a fresh autoencoder of `config` (nothing allocated)."""
    model = build_autoencoder(config)
    return expected_shapes(lambda key: init_autoencoder(model, key), jax.random.key(0))


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested params -> {"a/b/kernel": float32 numpy array} (host copies)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return {name: np.asarray(jax.device_get(value), np.float32) for name, value in flat.items()}


def save_params(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """Writes nested params as one safetensors file keyed by "/"-joined paths (atomically)."""
    save_safetensors(path, flatten_params(params))


def load_params(path: str | os.PathLike, expected: Mapping[tuple[str, ...], tuple[int, ...]], *,
                source: str) -> dict[str, Any]:
    """Reads a `save_params` file and checks it strictly against `expected` {path tuple: shape}.

    Raises ConversionError listing missing, unexpected and mis-shaped names.
    """
    arrays = load_state_dict(path)
    converted = {tuple(name.split("/")): (name, array) for name, array in arrays.items()}
    return assemble_params(converted, expected, source=source)


def _section_dict(section: Any) -> dict[str, Any]:
    if isinstance(section, ml_collections.ConfigDict):
        return json.loads(section.to_json_best_effort())
    return json.loads(json.dumps(dict(section)))


def write_model_dir(out_dir: str | os.PathLike, config: Any, params: Mapping[str, Any], *,
                    tokenizer_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes an LDM model directory (module doc). `config`: a ConfigDict/mapping holding the LDM sections
    (other sections are left out); `params`: the full LDM params ({"first_stage", "cond_stage"?, "unet"}).

    Refuses params that do not match the config (ConversionError) before anything is written.
    """
    out = pathlib.Path(out_dir)
    sections = {name: _section_dict(config[name]) for name in LDM_SECTIONS if name in config}
    ldm_cfg = ldm.ldm_config(sections)
    expected = ldm_param_shapes(ldm_cfg)
    flat = flatten_params(params)
    assemble_params({tuple(k.split("/")): (k, v) for k, v in flat.items()}, expected, source="exported params")
    if ldm_cfg.tokenizer_kind is not None and tokenizer_dir is None:
        raise ValueError("write_model_dir: a text model needs tokenizer_dir (its tokenizer files are exported)")
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / PARAMS_FILE, flat)
    (out / CONFIG_FILE).write_text(json.dumps(sections, indent=2) + "\n")
    if tokenizer_dir is not None:
        target = out / TOKENIZER_DIR
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(tokenizer_dir, target)
    return out


def read_model_config(model_dir: str | os.PathLike) -> ldm.LDMConfig:
    """The LDMConfig of a model directory (FileNotFoundError naming what is missing)."""
    path = pathlib.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: {CONFIG_FILE} is missing (expected "
                                f"{CONFIG_FILE}, {PARAMS_FILE} and, for text models, {TOKENIZER_DIR}/)")
    return ldm.ldm_config(json.loads(path.read_text()))


def load_model(model_dir: str | os.PathLike) -> ldm.LoadedModel:
    """Loads a model directory into an `ldm.LoadedModel` (params as numpy float32, tokenizer when text)."""
    model_dir = pathlib.Path(model_dir)
    config = read_model_config(model_dir)
    params_path = model_dir / PARAMS_FILE
    if not params_path.is_file():
        raise FileNotFoundError(f"model directory {model_dir} lacks {PARAMS_FILE}")
    expected = ldm_param_shapes(config)
    params = load_params(params_path, expected, source=str(params_path))
    tokenizer = None
    if config.tokenizer_kind is not None:
        tokenizer = load_tokenizer(model_dir / TOKENIZER_DIR, config.tokenizer_kind)
    return ldm.LoadedModel(config=config, params=params, tokenizer=tokenizer, model_id=str(model_dir))


def write_first_stage_dir(out_dir: str | os.PathLike, first_stage: Any, params: Mapping[str, Any]) -> pathlib.Path:
    """Writes an autoencoder directory (module doc): its `first_stage` section and params (checked)."""
    out = pathlib.Path(out_dir)
    section = _section_dict(first_stage) if not isinstance(first_stage, AutoencoderConfig) else \
        dataclasses.asdict(first_stage)
    config = build_dataclass(AutoencoderConfig, section, where="first_stage")
    expected = autoencoder_param_shapes(config)
    flat = flatten_params(params)
    assemble_params({tuple(k.split("/")): (k, v) for k, v in flat.items()}, expected, source="autoencoder params")
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / PARAMS_FILE, flat)
    (out / FIRST_STAGE_CONFIG_FILE).write_text(json.dumps(section, indent=2) + "\n")
    return out


def load_first_stage_dir(path: str | os.PathLike, expected_config: AutoencoderConfig | None = None
                         ) -> tuple[AutoencoderConfig, dict[str, Any]]:
    """(config, params) of an autoencoder directory; with `expected_config`, a ValueError naming every field
    that differs (an LDM must decode with the autoencoder it was trained on)."""
    path = pathlib.Path(path)
    config_path, params_path = path / FIRST_STAGE_CONFIG_FILE, path / PARAMS_FILE
    missing = [p.name for p in (config_path, params_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an autoencoder directory: {', '.join(missing)} missing (the "
                                f"autoencoder stage writes WORKDIR/autoencoder/ when it finishes)")
    config = build_dataclass(AutoencoderConfig, json.loads(config_path.read_text()), where=str(config_path))
    if expected_config is not None and config != expected_config:
        diffs = [f"{name}: {getattr(config, name)!r} in {path}, {getattr(expected_config, name)!r} in the config"
                 for name in config.__dataclass_fields__ if getattr(config, name) != getattr(expected_config, name)]
        raise ValueError(f"the autoencoder in {path} differs from the config's first_stage: " + "; ".join(diffs))
    expected = autoencoder_param_shapes(config)
    return config, load_params(params_path, expected, source=str(params_path))
