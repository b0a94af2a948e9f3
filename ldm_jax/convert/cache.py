"""A cache of converted params: convert a checkpoint once, then load the orbax copy (no key mapping, no pickles).

One cache entry is a directory `<cache_dir>/<source name>-<key>/` holding
- `params/`: the LDM params ({"first_stage", "unet", "cond_stage"?, "logvar"?}) saved with orbax;
- `config.json`: the LDMConfig they were converted for (`dataclasses.asdict`; `ldm_config_from_json` reads it);
- `source.json`: the source path, its fingerprint, the converter and its options. Written last: an entry
  without it is incomplete and is rebuilt.
The key hashes the source's absolute path and fingerprint (size and modification time of the file, or of
every file of a directory; contents are not hashed), the config, the converter's name and its options, so a
changed file, config or option makes a new entry. Old entries are not deleted.

`load_or_convert(path, config, cache_dir=...)` returns the cached params when their entry exists, else
converts (default: `compvis.load_compvis_checkpoint`), saves, and returns the converted params. Loaded params
are checked against the config's param shapes (`common.assemble_params`), whatever orbax read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from ldm_jax.convert.common import assemble_params
from ldm_jax.convert.compvis import as_ldm_config, load_compvis_checkpoint, model_shapes
from ldm_jax.ldm import LDMConfig, LoadedModel, ldm_config

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
PARAMS_DIR, CONFIG_FILE, SOURCE_FILE = "params", "config.json", "source.json"


def ldm_config_to_json(config: LDMConfig) -> dict[str, Any]:
    """An LDMConfig as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def ldm_config_from_json(data: Mapping[str, Any]) -> LDMConfig:
    """The LDMConfig of `ldm_config_to_json` data."""
    return ldm_config(dict(data))


def source_fingerprint(path: str | os.PathLike) -> list[list[Any]]:
    """[[relative name, size, mtime_ns], ...] of a file, or of every file under a directory (sorted)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(path: str | os.PathLike, config: LDMConfig, converter: str, options: Mapping[str, Any]) -> str:
    """Hex digest naming the cache entry of (source path + fingerprint, config, converter, options)."""
    payload = dict(format=CACHE_FORMAT, source=str(pathlib.Path(path).resolve()), fingerprint=source_fingerprint(path),
                   config=ldm_config_to_json(config), converter=converter, options=dict(options))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_converted(directory: str | os.PathLike, params: Mapping[str, Any], config: LDMConfig,
                   source: Mapping[str, Any] | None = None) -> None:
    """Writes one cache entry: params (orbax), config.json, then source.json (the completion marker).

    An earlier entry in `directory` is replaced; any other non-empty directory is refused (FileExistsError).
    params must match `config` (checked first).
    """
    directory = pathlib.Path(directory).resolve()
    flat = _check(params, config, f"params to cache in {directory}")
    if directory.exists() and any(directory.iterdir()):
        if not ((directory / CONFIG_FILE).exists() or (directory / PARAMS_DIR).exists()):
            raise FileExistsError(f"{directory} exists and is not a converted-params cache entry; not replacing it")
        shutil.rmtree(directory)  # an earlier (possibly incomplete) entry
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, traverse_util.unflatten_dict(flat))
    checkpointer.wait_until_finished()
    (directory / CONFIG_FILE).write_text(json.dumps(ldm_config_to_json(config), indent=1))
    (directory / SOURCE_FILE).write_text(json.dumps(dict(source or {}, format=CACHE_FORMAT), indent=1))


def load_converted(directory: str | os.PathLike, config: LDMConfig | Any = None) -> tuple[LDMConfig, dict[str, Any]]:
    """Reads a cache entry -> (its LDMConfig, params as float32 numpy arrays).

    config: when given, must equal the entry's config (ValueError naming both otherwise). The params are
    checked against the config's shapes (ConversionError listing missing / unexpected / mis-shaped ones).
    """
    directory = pathlib.Path(directory).resolve()
    if not (directory / SOURCE_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete converted-params cache entry (no {SOURCE_FILE})")
    stored = ldm_config_from_json(json.loads((directory / CONFIG_FILE).read_text()))
    if config is not None and as_ldm_config(config) != stored:
        raise ValueError(f"{directory} holds params for another config:\n  cached: {stored}\n  wanted: "
                         f"{as_ldm_config(config)}")
    restored = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR)
    flat = _check(restored, stored, str(directory / PARAMS_DIR))
    return stored, traverse_util.unflatten_dict(flat)


def is_cache_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a complete cache entry (has its source.json, config.json and params/)."""
    directory = pathlib.Path(directory)
    return all((directory / name).exists() for name in (SOURCE_FILE, CONFIG_FILE, PARAMS_DIR))


def load_cached_model(directory: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> LoadedModel:
    """A cache entry as a `LoadedModel`; text models need `tokenizer`, a local tokenizer directory."""
    config, params = load_converted(directory)
    tok = None
    if config.tokenizer_kind is not None:
        if tokenizer is None:
            raise ValueError(f"{directory}: a text model; give the tokenizer directory (--tokenizer)")
        from ldm_jax.models.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer, config.tokenizer_kind)
    return LoadedModel(config=config, params=params, tokenizer=tok, model_id=str(directory))


def load_or_convert(path: str | os.PathLike, config: LDMConfig | Any, *, cache_dir: str | os.PathLike,
                    convert: Callable[..., Mapping[str, Any]] = load_compvis_checkpoint,
                    **options: Any) -> dict[str, Any]:
    """LDM params of the checkpoint at `path` for `config`: from the cache when present, else
    `convert(path, config, **options)` (default: a CompVis single file), saved to the cache first.

    options must be JSON-serialisable (they are part of the cache key), e.g. use_ema=True.
    """
    config = as_ldm_config(config)
    name = f"{getattr(convert, '__module__', '')}.{getattr(convert, '__qualname__', repr(convert))}"
    key = cache_key(path, config, name, options)
    entry = pathlib.Path(cache_dir) / f"{pathlib.Path(path).name}-{key[:16]}"
    if (entry / SOURCE_FILE).is_file():
        log.info("%s: loading converted params from %s", path, entry)
        return load_converted(entry, config)[1]
    log.info("%s: converting (cache entry %s)", path, entry)
    params = convert(path, config, **options)
    save_converted(entry, params, config, source=dict(source=str(pathlib.Path(path).resolve()), key=key,
                                                      converter=name, options=options))
    return params


def _check(params: Mapping[str, Any], config: LDMConfig, source: str) -> dict[tuple[str, ...], np.ndarray]:
    """{path: float32 array} of params after a strict shape check against `config`."""
    flat = {p: np.asarray(v, np.float32) for p, v in traverse_util.flatten_dict(dict(params)).items()}
    assemble_params({p: ("/".join(p), a) for p, a in flat.items()}, model_shapes(config), source=source)
    return flat


__all__ = ["cache_key", "ldm_config_from_json", "ldm_config_to_json", "load_converted", "load_or_convert",
           "save_converted", "source_fingerprint"]
