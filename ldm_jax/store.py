"""The one model store: every model enters and leaves the code here.

`load_model(source)` and `save_model(model, dest, format=...)`; `detect_format(source)` is the only place
that decides what a path is. Sources:

- "ldm": our model directory, the one on-disk format of our own:

      config.json           the model sections {"first_stage", "cond_stage"?, "cond_stage_2"?, "unet", "diffusion"} (architecture
                            and diffusion settings only; run-time options are never written here)
      params.safetensors    every param, named by its "/"-joined Flax path ("unet/conv_in/kernel", ...), in
                            float32, float16 or bfloat16 (loaded as float32, or as `param_dtype`)
      tokenizer/            the tokenizer files (text models)
      tokenizer_2/          the second text tower's tokenizer (SDXL)
      scheduler_config.json the diffusers scheduler settings the model came with (optional)

  An autoencoder directory is the same with only a "first_stage" section (`save_first_stage`,
  `load_first_stage`); directories written before the store (`first_stage.json`) are read too.
  A pixel-space model (first_stage kind "identity", `models.autoencoder`) has its first_stage section in
  config.json and no "first_stage/..." params; only this format stores it.
- "diffusers": a diffusers Stable Diffusion or SDXL folder (`model_index.json`, unet/, vae/, text_encoder/,
  text_encoder_2/, ...).
- "compvis": a CompVis / SGM single file (`.ckpt`, `.safetensors`, `.pt`, `.pth`, `.bin`). Its config is the
  `config` argument, else `config.yaml` beside it (the LDM-zoo layout), else inferred from the weights'
  shapes (`compvis.infer_config`, any size); text models need `tokenizer`, a local tokenizer directory.
- "shipped": a model shipped inside the package, by name (`SHIPPED_MODELS`; None means "shapes").

"Convert once" is `save_model(load_model(src), dest)`: later loads of `dest` skip every key mapping.
`config` arguments (`resolve_config`) may be an LDMConfig, a ConfigDict, a preset name (`ldm_jax.presets`),
a configs/*.py file, a CompVis yaml, or a model directory (its config.json).

Errors are plain exceptions naming the path and what was expected: `StoreError` (a ValueError) for sources
the store cannot place, FileNotFoundError for missing files, and the converters' ConversionError /
CheckpointError (ValueErrors) for weights that do not fit. Weights that hold NaN or inf are refused at load
time (`check_finite`: a StoreError naming the file and the first such tensor), whatever the source format.
Command lines print them as one line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ldm_jax import ldm
from ldm_jax.convert.checkpoint_io import TORCH_EXTENSIONS, load_state_dict, save_safetensors
from ldm_jax.convert.common import assemble_params, expected_shapes
from ldm_jax.convert.diffusers_controlnet import (CONTROLNET_CLASS, load_diffusers_controlnet,
                                                  save_diffusers_controlnet)
from ldm_jax.convert.diffusers_pipeline import CONFIG_FILE
from ldm_jax.models import tokenizer as tokenizer_lib
from ldm_jax.models.autoencoder import AutoencoderConfig, autoencoder_config
from ldm_jax.models.controlnet import check_controlnet_fits

log = logging.getLogger(__name__)

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
SHIPPED_MODELS = {"shapes": PACKAGE_DIR / "assets" / "shapes_model"}
DEFAULT_MODEL = "shapes"
FORMATS = ("ldm", "diffusers", "compvis")  # what save_model writes; load_model also reads "shipped"
SINGLE_FILE_SUFFIXES = (".safetensors", *TORCH_EXTENSIONS)

PARAMS_FILE = "params.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"
SCHEDULER_FILE = "scheduler_config.json"
LEGACY_FIRST_STAGE_FILE = "first_stage.json"  # autoencoder directories written before the store
MODEL_SECTIONS = ("first_stage", "cond_stage", "cond_stage_2", "unet", "diffusion")
DIFFUSERS_FOLDERS = {"first_stage": "vae", "cond_stage": "text_encoder", "cond_stage_2": "text_encoder_2",
                     "unet": "unet"}  # param tree -> subfolder
STORED_DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16,
                 "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}  # what save_model may write params as


class StoreError(ValueError):
    """A source the store cannot load or a destination it cannot write, with the path and what was expected."""


# ------------------------------------------------------------------------------------------------ detection


def detect_format(source: str | os.PathLike | None) -> str:
    """"ldm", "diffusers", "compvis" or "shipped" for a source (see the module docstring).

    Raises FileNotFoundError for a path that does not exist and StoreError for one of no known kind.
    """
    if source is None or str(source) in SHIPPED_MODELS:
        return "shipped"
    path = pathlib.Path(source)
    if not path.exists():
        hint = f" (shipped models: {', '.join(SHIPPED_MODELS)})" if os.sep not in str(source) else ""
        raise FileNotFoundError(f"{source}: no such file or directory{hint}")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "diffusers"
        if _config_class(path) == CONTROLNET_CLASS:
            raise StoreError(f"{path}: a diffusers ControlNet folder, not a whole model; load it with "
                             "load_controlnet (ldm-jax convert --controlnet)")
        if (path / CONFIG_FILE).is_file() or (path / LEGACY_FIRST_STAGE_FILE).is_file():
            return "ldm"
        raise StoreError(f"{path}: a directory, but neither a model directory ({CONFIG_FILE} + {PARAMS_FILE}) nor "
                         f"a diffusers folder (model_index.json)")
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "compvis"
    raise StoreError(f"{path}: unknown kind of file {path.suffix or '(no extension)'!r}; expected a single-file "
                     f"checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) or a model / diffusers directory")


# ------------------------------------------------------------------------------------------------- configs


def resolve_config(config: Any, *, text_encoder_config: str | os.PathLike | None = None) -> ldm.LDMConfig:
    """An LDMConfig from an LDMConfig, a ConfigDict / mapping with the model sections, a preset name, a
    configs/*.py file or a CompVis yaml (whose text encoder may need `text_encoder_config`)."""
    if isinstance(config, ldm.LDMConfig):
        return config
    if isinstance(config, (ml_collections.ConfigDict, Mapping)):
        return ldm.ldm_config(config)
    from ldm_jax import presets  # noqa: PLC0415

    text = str(config)
    if text in presets.PRESET_NAMES:
        return ldm.ldm_config(presets.get_preset(text))
    path = pathlib.Path(text)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config {path}: no such file")
        from ldm_jax.convert.ldm_yaml import load_ldm_yaml  # noqa: PLC0415

        return ldm.ldm_config(load_ldm_yaml(path, text_encoder_config=text_encoder_config))
    if path.suffix == ".json" or path.is_dir():  # a model directory's config.json (or the directory)
        path = path / CONFIG_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"config {path}: no such file")
        return ldm.ldm_config(_read_json(path))
    if path.suffix == ".py":
        if not path.is_file():
            raise FileNotFoundError(f"config {path}: no such file")
        from ldm_jax.config import load_config_file  # noqa: PLC0415

        return ldm.ldm_config(load_config_file(path))
    raise StoreError(f"config {text!r}: not a preset ({', '.join(presets.PRESET_NAMES)}), a configs/*.py file, "
                     f"a CompVis .yaml or a model directory's config.json")


def config_to_json(config: ldm.LDMConfig) -> dict[str, Any]:
    """An LDMConfig as the JSON sections of a model directory's config.json (`ldm.ldm_config` reads it)."""
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    for name in ("cond_stage", "cond_stage_2"):
        if data.get(name) is None:
            data.pop(name, None)
    return {name: data[name] for name in MODEL_SECTIONS if name in data}


# -------------------------------------------------------------------------------------------------- params


param_shapes = ldm.param_shapes  # the params contract: {path: shape} of a config's fresh LDM


def flatten_params(params: Mapping[str, Any], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Nested params -> {"a/b/kernel": numpy array of `dtype`} (host copies)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return {name: np.asarray(jax.device_get(value)).astype(dtype) for name, value in flat.items()}


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *, dtype: Any = np.float32) -> None:
    """Writes nested params as one safetensors file keyed by "/"-joined paths (atomically), in `dtype`."""
    save_safetensors(path, flatten_params(params, dtype))


def load_params(path: str | os.PathLike, expected: Mapping[tuple[str, ...], tuple[int, ...]], *,
                source: str | None = None, dtype: Any = np.float32) -> dict[str, Any]:
    """Reads a `save_params` file (any float dtype, returned as float32, or as `dtype` bfloat16, tensor by tensor)
    and checks it strictly against `expected` {path tuple: shape}: a ConversionError lists missing, unexpected and
    mis-shaped names."""
    arrays = load_state_dict(path, dtype=dtype)
    converted = {tuple(name.split("/")): (name, array) for name, array in arrays.items()}
    return assemble_params(converted, expected, source=source or str(path), dtype=dtype)


def check_params(params: Mapping[str, Any], expected: Mapping[tuple[str, ...], tuple[int, ...]], *,
                 source: str) -> dict[str, Any]:
    """Nested params as float32 numpy arrays, after the same strict check as `load_params`."""
    flat = flatten_params(params)
    return assemble_params({tuple(k.split("/")): (k, v) for k, v in flat.items()}, expected, source=source)


def check_finite(params: Mapping[str, Any], where: str | os.PathLike | Mapping[str, str]) -> None:
    """Raises StoreError "<where>: weights are not finite: <path> holds N NaN / M inf values" for the first
    tensor (in tree order) holding NaN or inf. `where`: the file the params came from, or {top-level name:
    file} for sources whose parts live in several files (diffusers' unet/, vae/, text_encoder/).

    Cheap: a min and a max per array (NaN propagates through both, +-inf shows in one), no copies; the
    counts are taken for the bad tensor only."""
    for name, value in traverse_util.flatten_dict(dict(params), sep="/").items():
        array = np.asarray(value)
        if array.size == 0 or not jnp.issubdtype(array.dtype, jnp.inexact):  # jnp's: bfloat16 is inexact
            continue
        if array.dtype == jnp.bfloat16:  # the exponent bits (ml_dtypes' min / max are 8x slower than this)
            if not np.any(array.view(np.uint16) & 0x7F80 == 0x7F80):
                continue
            array = array.astype(np.float32)  # the bad tensor only, for the counts below
        elif np.isfinite(array.min()) and np.isfinite(array.max()):
            continue
        file = where.get(name.split("/")[0], "the model") if isinstance(where, Mapping) else where
        raise StoreError(f"{file}: weights are not finite: {name} holds {int(np.isnan(array).sum())} NaN / "
                         f"{int(np.isinf(array).sum())} inf values")


def place_params(params: Any, mesh: Any = None, *, consume: bool = False) -> Any:
    """Puts params (nested dicts of numpy or jax arrays) on every device of `mesh` (default
    `parallel.make_mesh()`), replicated, leaf by leaf; returns a new tree of dicts of `jax.Array`s in the
    params' own dtypes (load them in bfloat16 with `load_model(param_dtype=)`; nothing is cast here).

    consume=True empties the given dicts as it goes: each host array is dropped from `params` once it is put, so
    when nothing else references them (`params = place_params(model.params, consume=True)` after which the model's
    dict is empty, or a LoadedModel replaced by one with `params={}`) each host array is freed before the next
    is put and the process never holds two full copies (full-size SD 1.5 in float32: peak 4.4 GiB for load +
    place, against 8.2 GiB for one `jax.device_put` of the whole tree). consume=False leaves `params` as it was.
    `pipeline.place_params` is this function.
    """
    from ldm_jax import parallel  # noqa: PLC0415

    replicated = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())

    def place(tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            return jax.device_put(tree, replicated)
        out = {}
        for name in list(tree):
            value = tree.pop(name) if consume else tree[name]
            out[name] = place(value)
            del value  # consumed: the last reference, so the host array goes before the next leaf is put
        return out

    return jax.block_until_ready(place(params))


# --------------------------------------------------------------------------------------------------- models


def load_model(source: str | os.PathLike | None = None, *, config: Any = None,
               tokenizer: str | os.PathLike | None = None, dtype: Any = None, attention: str | None = None,
               remat: bool | str | None = None, text_encoder_config: str | os.PathLike | None = None,
               use_ema: bool = False, param_dtype: Any = None) -> ldm.LoadedModel:
    """Loads any source (module docstring) into an `ldm.LoadedModel`: config, numpy params (float32, or
    `param_dtype`), tokenizer.

    config: the architecture, for sources that do not carry one (single files); for the others it must agree
      with the source's own. tokenizer: a local tokenizer directory (single files; overrides a directory's), or
      for single files a folder holding tokenizer/ and tokenizer_2/ (an SDXL base's two towers: a diffusers SDXL
      folder or a model directory).
    dtype / attention / remat / param_dtype: run-time options (`ldm.RunOptions`), kept in `model.options`, never
      saved. param_dtype "float32" (default) or "bfloat16" ("fp32", "bf16" or a jnp dtype): the params' dtype.
      Model directories and diffusers folders convert each tensor from the file's dtype as it is read (a bfloat16
      load never holds a float32 copy: about 2 bytes per param); single files are converted in float32 (their
      schedule buffers are checked at that precision), then cast leaf by leaf. The bfloat16 params are exactly
      the bfloat16 cast of the float32 load. Place them on the devices with `place_params(..., consume=True)`.
      Measured on a full-size SD 1.5-shaped diffusers folder (fp16 safetensors, 2.1 GB): peak RSS of the load
      4.24 GiB in float32 (5.83 GiB before safetensors files were read without their memory map), 2.39 GiB in
      bfloat16; load + place 4.42 / 2.44 GiB. Sampling at 512x512 (2 DDIM steps, CFG) then peaked at 5.81 GiB in
      float32 but 6.82 GiB with bfloat16 params and compute: on XLA:CPU any bfloat16 in the UNet makes its program
      hold every weight in float32 as temporaries (compiled memory_analysis, SD UNet at 32x32 latents: temp 0.07
      GiB float32, 3.22 GiB with bfloat16 params or compute), so bfloat16 saves memory on CPU only up to sampling.
    text_encoder_config: a transformers CLIP config.json (or its directory) for a CompVis yaml whose text
      encoder is not a known version. use_ema: single files: take the UNet from its EMA copy.
    """
    options = ldm.run_options(dtype=dtype, attention=attention, remat=remat, param_dtype=param_dtype)
    read_dtype = np.dtype(options.param_dtype)
    kind = detect_format(source)
    if text_encoder_config is not None and not pathlib.Path(text_encoder_config).exists():
        raise StoreError(f"text encoder config {text_encoder_config}: no such file or directory (a transformers "
                         "CLIP config.json or its directory)")
    if kind in ("shipped", "ldm"):
        path = SHIPPED_MODELS[DEFAULT_MODEL if source is None else str(source)] if kind == "shipped" else source
        model = _load_model_dir(pathlib.Path(path), tokenizer=tokenizer, dtype=read_dtype)
        where: Any = pathlib.Path(path) / PARAMS_FILE
    elif kind == "diffusers":
        from ldm_jax.convert.diffusers_pipeline import load_diffusers_pipeline  # noqa: PLC0415

        model = load_diffusers_pipeline(source, param_dtype=read_dtype)
        if tokenizer is not None:
            model = dataclasses.replace(model, tokenizer=_load_tokenizer(tokenizer, model.config.tokenizer_kind))
        where = {name: str(pathlib.Path(source) / folder) for name, folder in DIFFUSERS_FOLDERS.items()}
    else:
        model = _load_single_file(pathlib.Path(source), config=config, tokenizer=tokenizer,
                                  text_encoder_config=text_encoder_config, use_ema=use_ema)
        if read_dtype != np.float32:
            model = dataclasses.replace(model, params=_cast_params(model.params, read_dtype))
        config, where = None, source  # config consumed
    check_finite(model.params, where)
    if config is not None:
        _check_same_config(resolve_config(config, text_encoder_config=text_encoder_config), model.config,
                           str(source or DEFAULT_MODEL))
    return dataclasses.replace(model, options=options)


def apply_adapters(model: ldm.LoadedModel, *, loras: Sequence[tuple[str | os.PathLike, float]] = (),
                   embeddings: Sequence[tuple[str | os.PathLike, str | None]] = ()) -> ldm.LoadedModel:
    """`model` with textual-inversion embeddings added and LoRAs merged into its weights (a new LoadedModel; the
    given one is not changed).

    loras: (LoRA file, scale) pairs, diffusers/PEFT or kohya safetensors (`convert.lora_files`), merged in order
      at their scales (`adapters.lora.apply_loras`); unmerging with the same list restores the weights.
    embeddings: (embedding file, token name or None for the file's own) pairs (`convert.embedding_files`:
      diffusers learned_embeds, A1111 .pt / .safetensors, SDXL clip_l / clip_g), added as new tokens
      (`adapters.textual_inversion.add_tokens`).
    Every file is read and checked against the model before anything is applied: a bad file raises (one line
    naming it) and nothing is half-applied. `model.adapters` records what was applied, in order.
    """
    from ldm_jax.adapters import lora as lora_lib, textual_inversion  # noqa: PLC0415 (JAX-heavy, on demand)
    from ldm_jax.convert.lora_files import load_lora_file  # noqa: PLC0415

    loaded = [(load_lora_file(path, model.config), float(scale)) for path, scale in loras]
    lora_lib.check_fits(model.params, [lora for lora, _ in loaded])
    if embeddings:
        model = textual_inversion.add_embedding_files(model, list(embeddings))
    if loaded:
        merged = lora_lib.apply_loras(model.params, loaded)
        model = dataclasses.replace(model, params=jax.tree.map(np.asarray, merged))
    applied = tuple(("lora", str(p), float(s)) for p, s in loras) + tuple(
        ("embedding", str(p), t or "") for p, t in embeddings)
    return dataclasses.replace(model, adapters=model.adapters + applied)


def _cast_params(params: dict[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """`params` (nested dicts of numpy arrays) with every float array cast to `dtype`, leaf by leaf: each source
    array is dropped from the tree as it is cast (the given dicts are emptied), so its memory can go at once."""
    out = {}
    for name in list(params):
        value = params.pop(name)
        if isinstance(value, dict):
            out[name] = _cast_params(value, dtype)
        else:
            out[name] = value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
        del value
    return out


def _load_model_dir(path: pathlib.Path, *, tokenizer: str | os.PathLike | None,
                    dtype: Any = np.float32) -> ldm.LoadedModel:
    sections = _read_config_json(path)
    if "unet" not in sections:
        raise StoreError(f"{path} holds only an autoencoder (sections {sorted(sections)}); load it with "
                         f"load_first_stage, or give a whole model (first_stage, unet, diffusion)")
    config = ldm.ldm_config(sections)
    params_path = path / PARAMS_FILE
    if not params_path.is_file():
        raise FileNotFoundError(f"model directory {path} lacks {PARAMS_FILE}")
    params = load_params(params_path, param_shapes(config), dtype=dtype)
    tok = tok_2 = None
    if config.tokenizer_kind is not None:
        tok = _load_tokenizer(tokenizer if tokenizer is not None else path / TOKENIZER_DIR, config.tokenizer_kind)
    if config.cond_stage_2 is not None:
        tok_2 = _load_tokenizer(path / TOKENIZER_2_DIR, config.cond_stage_2.tokenizer_kind)
    scheduler = path / SCHEDULER_FILE
    scheduler_config = json.loads(scheduler.read_text()) if scheduler.is_file() else None
    return ldm.LoadedModel(config=config, params=params, tokenizer=tok, model_id=str(path),
                           scheduler_config=scheduler_config, tokenizer_2=tok_2)


def _read_config_json(path: pathlib.Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        legacy = path / LEGACY_FIRST_STAGE_FILE
        if legacy.is_file():
            return {"first_stage": _read_json(legacy)}
        raise FileNotFoundError(f"{path} is not a model directory: {CONFIG_FILE} is missing (expected "
                                f"{CONFIG_FILE}, {PARAMS_FILE} and, for text models, {TOKENIZER_DIR}/)")
    return _read_json(config_path)


def _config_class(path: pathlib.Path) -> str | None:
    """The `_class_name` of a folder's config.json (diffusers' component class: ControlNetModel for a ControlNet
    folder), None without one (our model directories have none)."""
    return _read_json(path / CONFIG_FILE).get("_class_name") if (path / CONFIG_FILE).is_file() else None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object of config sections, got {type(data).__name__}")
    return data


def _load_tokenizer(directory: str | os.PathLike, kind: str | None):
    if kind is None:
        raise StoreError(f"tokenizer {directory} given, but this model has no text encoder")
    return tokenizer_lib.load_tokenizer(directory, kind)


def _load_single_file(path: pathlib.Path, *, config: Any, tokenizer: str | os.PathLike | None,
                      text_encoder_config: str | os.PathLike | None, use_ema: bool) -> ldm.LoadedModel:
    from ldm_jax.convert import compvis  # noqa: PLC0415
    from ldm_jax.convert.compvis_controlnet import controlnet_prefix  # noqa: PLC0415

    state_dict = load_state_dict(path)
    if controlnet_prefix(state_dict) is not None:  # also a ControlNet 1.0 file, which holds its base model beside it
        raise StoreError(f"{path}: a ControlNet file, not a whole model; load it with load_controlnet "
                         "(ldm-jax convert --controlnet; a ControlNet 1.0 file's copy of its base model is dropped "
                         "there: load the base from its own file)")
    if config is not None:
        resolved, where = resolve_config(config, text_encoder_config=text_encoder_config), str(config)
    elif (path.parent / "config.yaml").is_file():
        yaml = path.parent / "config.yaml"
        resolved, where = resolve_config(yaml, text_encoder_config=text_encoder_config), str(yaml)
    else:
        from ldm_jax import presets  # noqa: PLC0415

        resolved = compvis.infer_config(state_dict)
        preset = presets.matching_preset(resolved)
        where = f"{preset or 'a custom size'} (inferred from the weights)"
    log.info("%s: config %s", path, where)
    if resolved.tokenizer_kind is not None and tokenizer is None:
        example = ("stabilityai/stable-diffusion-xl-base-1.0 (its tokenizer/ and tokenizer_2/)"
                   if resolved.structured_conditioning else "openai/clip-vit-large-patch14 for SD 1.x")
        raise StoreError(f"{path} is a single file with a {resolved.tokenizer_kind} text encoder: give a local "
                         f"tokenizer directory (tokenizer=DIR, --tokenizer DIR; e.g. a Hugging Face snapshot of "
                         f"{example})")
    tok_dir, tok_2_dir = _single_file_tokenizers(pathlib.Path(tokenizer), resolved) if tokenizer else (None, None)
    if tok_dir is not None and resolved.tokenizer_kind is None:
        raise StoreError(f"tokenizer {tokenizer} given, but this model has no text encoder")
    return compvis.loaded_model_from_state_dict(state_dict, resolved, tokenizer=tok_dir, tokenizer_2=tok_2_dir,
                                                use_ema=use_ema, source=str(path))


def _single_file_tokenizers(directory: pathlib.Path, config: ldm.LDMConfig) -> tuple[pathlib.Path, pathlib.Path | None]:
    """(tokenizer dir, tokenizer_2 dir) of a single file's text towers from --tokenizer DIR: a tokenizer directory,
    or a folder holding tokenizer/ (and tokenizer_2/: a diffusers SD / SDXL folder or a model directory). An SDXL
    base needs both; a refiner's one tower (bigG) takes tokenizer_2/ when there is no tokenizer/."""
    sub, sub_2 = directory / TOKENIZER_DIR, directory / TOKENIZER_2_DIR
    if config.cond_stage_2 is not None:
        if not (sub.is_dir() and sub_2.is_dir()):
            raise StoreError(f"{directory}: an SDXL base single file has two text towers; give a folder holding "
                             f"{TOKENIZER_DIR}/ (CLIP ViT-L) and {TOKENIZER_2_DIR}/ (OpenCLIP bigG), e.g. a snapshot "
                             "of stabilityai/stable-diffusion-xl-base-1.0")
        return sub, sub_2
    if sub.is_dir():
        return sub, None
    if sub_2.is_dir():  # a diffusers refiner folder holds only tokenizer_2/
        return sub_2, None
    return directory, None


def _check_same_config(wanted: ldm.LDMConfig, found: ldm.LDMConfig, source: str) -> None:
    if wanted == found:
        return
    diffs = [name for name in MODEL_SECTIONS if getattr(wanted, name) != getattr(found, name)]
    raise StoreError(f"{source}: the given config differs from the model's own in {', '.join(diffs)}; "
                     f"leave config out for model directories and diffusers folders")


def save_model(model: ldm.LoadedModel, dest: str | os.PathLike, *, format: str = "ldm",
               dtype: Any = None) -> pathlib.Path:
    """Writes `model` to `dest` as "ldm" (a model directory), "diffusers" (a folder diffusers'
    `from_pretrained` loads) or "compvis" (one `.safetensors` file the CompVis / SGM code and diffusers'
    single-file loader read; no tokenizer). dtype: the stored dtype of the weights ("fp32" default, "fp16",
    "bf16"). Returns `dest`. Params that do not fit the config are refused before anything is written."""
    if format not in FORMATS:
        raise StoreError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    if isinstance(dtype, str) and dtype not in STORED_DTYPES:
        raise StoreError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16")
    store_dtype = np.dtype(STORED_DTYPES[dtype] if isinstance(dtype, str) else (dtype or np.float32))
    config, dest = model.config, pathlib.Path(dest)
    if format != "ldm" and not config.first_stage.has_params:
        raise StoreError(f"{dest}: the {format} format has no identity first stage (this model diffuses in pixel "
                         f"space, first_stage.kind={config.first_stage.kind!r}); save it with format 'ldm'")
    if format != "ldm" and config.unet.position_embedding is not None:
        height, width = config.unet.position_embedding
        unet = {"compvis": "the CompVis UNetModel", "diffusers": "diffusers' UNet2DConditionModel"}[format]
        raise StoreError(f"{dest}: the {format} format has no place for unet.position_embedding (this model's "
                         f"learned {height}x{width} latent position table; {unet} has no learned position "
                         f"embedding); save it with format 'ldm' (ldm-jax convert --to ldm)")
    check_params(model.params, param_shapes(config), source=f"the params of {model.model_id or 'the model'}")
    if format == "ldm" and config.tokenizer_kind is not None and model.tokenizer is None:
        raise StoreError(f"{dest}: a text model needs its tokenizer to be saved; load it with tokenizer=DIR")
    if format in ("ldm", "diffusers") and config.cond_stage_2 is not None and model.tokenizer_2 is None:
        raise StoreError(f"{dest}: this model has a second text tower (cond_stage_2) but no tokenizer_2 to save")
    if format == "compvis":
        if dest.suffix.lower() != ".safetensors":
            raise StoreError(f"{dest}: a CompVis export is one .safetensors file; name it *.safetensors")
        from ldm_jax.convert.compvis import save_compvis  # noqa: PLC0415

        dest.parent.mkdir(parents=True, exist_ok=True)
        save_compvis(dest, model.params, config, dtype=store_dtype)
        return dest
    _prepare_dir(dest)
    if format == "diffusers":
        from ldm_jax.convert.diffusers_pipeline import save_diffusers_pipeline  # noqa: PLC0415

        cast = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in
                                             flatten_params(model.params, store_dtype).items()})
        return save_diffusers_pipeline(dataclasses.replace(model, params=cast), dest)
    save_params(dest / PARAMS_FILE, model.params, dtype=store_dtype)
    (dest / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    if model.tokenizer is not None:
        tokenizer_lib.save_tokenizer(model.tokenizer, dest / TOKENIZER_DIR, config.max_length)
    if model.tokenizer_2 is not None and config.cond_stage_2 is not None:
        tokenizer_lib.save_tokenizer(model.tokenizer_2, dest / TOKENIZER_2_DIR, config.cond_stage_2.max_length)
    if model.scheduler_config is not None:
        (dest / SCHEDULER_FILE).write_text(json.dumps(model.scheduler_config, indent=2) + "\n")
    return dest


def _prepare_dir(dest: pathlib.Path) -> None:
    """Creates `dest`; refuses a non-empty directory that is not a model directory (nothing is overwritten
    but a model's own files)."""
    if dest.exists() and not dest.is_dir():
        raise StoreError(f"{dest} exists and is a file; a model directory is written there")
    if dest.is_dir() and any(dest.iterdir()) and not ((dest / CONFIG_FILE).is_file()
                                                       or (dest / "model_index.json").is_file()):
        raise StoreError(f"{dest} exists, is not empty and is not a model directory; not writing into it")
    dest.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- first stage


def autoencoder_param_shapes(config: AutoencoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of a fresh autoencoder of `config`, without the "first_stage" prefix."""
    from ldm_jax.models.autoencoder import build_autoencoder, init_autoencoder  # noqa: PLC0415

    model = build_autoencoder(config)
    return expected_shapes(lambda key: init_autoencoder(model, key), jax.random.key(0))


def save_first_stage(dest: str | os.PathLike, config: AutoencoderConfig, params: Mapping[str, Any]) -> pathlib.Path:
    """Writes an autoencoder directory: config.json {"first_stage": ...} and params.safetensors
    ("first_stage/encoder/...", the LDM names). `params`: the autoencoder's own tree ("encoder", ...)."""
    dest = pathlib.Path(dest)
    checked = check_params(params, autoencoder_param_shapes(config), source="autoencoder params")
    _prepare_dir(dest)
    save_params(dest / PARAMS_FILE, {"first_stage": checked})
    section = json.loads(json.dumps(dataclasses.asdict(config)))
    (dest / CONFIG_FILE).write_text(json.dumps({"first_stage": section}, indent=2) + "\n")
    return dest


def load_first_stage(source: str | os.PathLike, *, expected: AutoencoderConfig | None = None
                     ) -> tuple[AutoencoderConfig, dict[str, Any]]:
    """(config, params) of the first stage of any source: an autoencoder directory, or any whole model
    (`load_model`'s sources; its autoencoder is taken). With `expected`, a ValueError naming every field that
    differs (an LDM must decode with the autoencoder it was trained on)."""
    kind = detect_format(source)
    path = pathlib.Path(source) if kind != "shipped" else SHIPPED_MODELS[str(source or DEFAULT_MODEL)]
    sections = _read_config_json(path) if kind in ("ldm", "shipped") else None
    if sections is not None and "unet" not in sections:
        if "first_stage" not in sections:
            raise StoreError(f"{path}/{CONFIG_FILE} has no first_stage section (it has {sorted(sections)})")
        config = autoencoder_config(sections["first_stage"], where=f"{path} first_stage")
        params = _read_first_stage_params(path, config)
    else:
        model = load_model(source)
        config, params = model.config.first_stage, model.params.get("first_stage", {})  # {}: the identity's
    if expected is not None and config != expected:
        diffs = [f"{name}: {getattr(config, name)!r} in {source}, {getattr(expected, name)!r} in the config"
                 for name in config.__dataclass_fields__ if getattr(config, name) != getattr(expected, name)]
        raise ValueError(f"the autoencoder in {source} differs from the config's first_stage: " + "; ".join(diffs))
    return config, params


def _read_first_stage_params(path: pathlib.Path, config: AutoencoderConfig) -> dict[str, Any]:
    params_path = path / PARAMS_FILE
    if not params_path.is_file():
        raise FileNotFoundError(f"autoencoder directory {path} lacks {PARAMS_FILE}")
    shapes = autoencoder_param_shapes(config)
    if (path / CONFIG_FILE).is_file():
        params = load_params(params_path, {("first_stage", *p): s for p, s in shapes.items()})
    else:
        params = {"first_stage": load_params(params_path, shapes)}  # a legacy directory: names without the prefix
    check_finite(params, params_path)
    return params["first_stage"]


# ---------------------------------------------------------------------------------------------- ControlNets

CONTROLNET_FORMATS = ("diffusers", "original")  # what save_controlnet writes and load_controlnet reads


@dataclasses.dataclass(frozen=True)
class LoadedControlNet:
    """A ControlNet: its config (`models.controlnet.ControlNetConfig`), params (our tree of numpy arrays, float32 or
    `load_controlnet`'s param_dtype, no "params" level; names of diffusers' ControlNetModel) and where it came from
    (`source`)."""

    config: Any
    params: dict[str, Any]
    source: str = ""


def detect_controlnet_format(source: str | os.PathLike) -> str:
    """"diffusers" for a diffusers ControlNet folder (config.json whose `_class_name` is ControlNetModel), "original"
    for a single file (.safetensors, .pth, .ckpt, ...: lllyasviel's ControlNet 1.0 / 1.1 layout). FileNotFoundError
    for a missing path; StoreError for anything else (a whole model's folder names load_model)."""
    path = pathlib.Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory (expected a ControlNet file or folder)")
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return "original"
        raise StoreError(f"{path}: unknown kind of file {path.suffix or '(no extension)'!r}; a ControlNet is a "
                         f"single file ({', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers ControlNet folder")
    class_name = _config_class(path)
    if class_name == CONTROLNET_CLASS:
        return "diffusers"
    what = f"its {CONFIG_FILE} is a {class_name}'s" if class_name else f"it has no {CONFIG_FILE} with _class_name"
    raise StoreError(f"{path}: not a diffusers ControlNet folder ({what}; expected _class_name "
                     f"{CONTROLNET_CLASS!r} and diffusion_pytorch_model.safetensors)")


def load_controlnet(source: str | os.PathLike, *, base: Any = None, param_dtype: Any = None,
                    **hint_overrides: Any) -> LoadedControlNet:
    """Loads a ControlNet from a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors, .bin,
    their .fp16 variants or shards) or an original single file (`convert.compvis_controlnet`: control_model.* or bare
    keys, a whole-model 1.0 checkpoint's base-model keys dropped; .pth / .ckpt read without running pickle code).

    base: the base model the ControlNet will steer (a LoadedModel, LDMConfig, UNetConfig, or anything
      `resolve_config` takes): a single file's heads and timestep convention come from its UNet (else the SD
      family's), and a ControlNet that does not fit its UNet (`models.controlnet.check_controlnet_fits`: residual
      channels, context width, class and addition embeddings) is a one-line StoreError naming the file and both.
    hint_overrides: single files: ControlNetConfig hint fields no weight shows (global_pool_conditions=True for
      ControlNet 1.1 shuffle, controlnet_conditioning_channel_order="bgr").
    param_dtype: the params' dtype, "float32" (default) or "bfloat16" ("fp32", "bf16" or a jnp dtype), as
      `load_model`'s: each tensor is converted from the file's dtype as it is read (no float32 copy is held).
    Weights holding NaN / inf are refused (`check_finite`)."""
    read_dtype = np.dtype(ldm.run_options(param_dtype=param_dtype).param_dtype)
    kind = detect_controlnet_format(source)
    base_unet = _base_unet(base)
    path = pathlib.Path(source)
    if kind == "diffusers":
        if hint_overrides:
            raise StoreError(f"{path}: {sorted(hint_overrides)} apply to single files; a diffusers folder's "
                             f"{CONFIG_FILE} holds them")
        config, params = load_diffusers_controlnet(path, dtype=read_dtype)
    else:
        from ldm_jax.convert.compvis_controlnet import load_original_controlnet  # noqa: PLC0415

        config, params = load_original_controlnet(path, unet=base_unet, dtype=read_dtype, **hint_overrides)
    check_finite(params, path)
    if base_unet is not None:
        try:
            check_controlnet_fits(config, base_unet, str(path))
        except ValueError as err:
            raise StoreError(str(err)) from None
    return LoadedControlNet(config=config, params=params, source=str(path))


def _base_unet(base: Any):
    """The UNetConfig of `base` (None, a UNetConfig, a LoadedModel, an LDMConfig or a `resolve_config` argument)."""
    from ldm_jax.models.unet import UNetConfig  # noqa: PLC0415

    if base is None or isinstance(base, UNetConfig):
        return base
    if isinstance(base, ldm.LoadedModel):
        return base.config.unet
    return resolve_config(base).unet


def save_controlnet(controlnet: LoadedControlNet, dest: str | os.PathLike, *, format: str = "diffusers",
                    dtype: Any = None) -> pathlib.Path:
    """Writes a ControlNet as "diffusers" (a folder `ControlNetModel.from_pretrained` loads strictly) or "original"
    (one `.safetensors` file in the `control_model.*` layout that diffusers' `ControlNetModel.from_single_file` and
    the reference code read). dtype: the stored dtype, "fp32" (default), "fp16", "bf16" (either format). Params that do
    not fit the config are refused before anything is written. A folder is written only where there is none, an
    empty one or a diffusers ControlNet folder (`detect_controlnet_format`); anything else (a model directory, a
    diffusers unet/ folder) is a one-line StoreError and nothing in it is touched. Returns `dest`."""
    if format not in CONTROLNET_FORMATS:
        raise StoreError(f"format {format!r}: a ControlNet is written as one of {', '.join(CONTROLNET_FORMATS)}")
    if isinstance(dtype, str) and dtype not in STORED_DTYPES:
        raise StoreError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16")
    store_dtype = np.dtype(STORED_DTYPES[dtype] if isinstance(dtype, str) else (dtype or np.float32))
    dest = pathlib.Path(dest)
    if format == "original":
        from ldm_jax.convert.compvis_controlnet import save_original_controlnet  # noqa: PLC0415

        if dest.suffix.lower() != ".safetensors":
            raise StoreError(f"{dest}: an original ControlNet export is one .safetensors file; name it *.safetensors")
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_original_controlnet(dest, controlnet.config, controlnet.params, dtype=store_dtype)
        return dest
    if dest.exists() and not dest.is_dir():
        raise StoreError(f"{dest} exists and is a file; a diffusers ControlNet folder is written there")
    if dest.is_dir() and any(dest.iterdir()):  # only a ControlNet folder is overwritten, never a model's config.json
        try:
            detect_controlnet_format(dest)
        except StoreError as error:
            raise StoreError(f"{error}; not writing into it") from None
    save_diffusers_controlnet(dest, controlnet.config, controlnet.params, dtype=store_dtype)
    return dest


__all__ = ["CONTROLNET_FORMATS", "FORMATS", "LoadedControlNet", "SHIPPED_MODELS", "StoreError",
           "check_finite", "check_params", "config_to_json", "detect_controlnet_format", "detect_format",
           "load_controlnet", "load_first_stage", "load_model", "load_params", "param_shapes", "place_params",
           "resolve_config", "save_controlnet", "save_first_stage", "save_model", "save_params"]
