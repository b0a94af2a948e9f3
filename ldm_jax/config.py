"""Config plumbing: python config files -> locked ConfigDicts -> frozen dataclasses at the model boundary.

A config file in `configs/` defines `get_config() -> ml_collections.ConfigDict` (locked). Its sections are
named by role: `first_stage` (autoencoder), `cond_stage` (text/class encoder), `unet`, `diffusion`,
`sampler`, `loss`, `train`, `data`, `mesh`. Each model section becomes that model's frozen dataclass
through `build_dataclass`, so a misspelt field is an error, not a silently new key.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import pathlib
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")
log = logging.getLogger(__name__)

# Run-time options that older saved model configs hold in their unet / first_stage / cond_stage sections
# (they are `ldm.RunOptions` now, given at load or call time, never architecture).
RUNTIME_KEYS = ("attention", "remat", "attention_impl", "attention_implementation", "implementation")


def drop_runtime_keys(section: Any, *, where: str = "") -> dict[str, Any]:
    """A model section (ConfigDict or mapping) as a dict without the legacy run-time keys of RUNTIME_KEYS.

    Old configs (e.g. a config.json written before run-time options left the model configs) still load;
    what was dropped is logged at debug level.
    """
    values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    dropped = {key: values.pop(key) for key in RUNTIME_KEYS if key in values}
    if dropped:
        log.debug("%s: ignoring run-time option(s) %s saved in the model config (give them at load time)",
                  where or "config", dropped)
    return values


def build_dataclass(cls: type[T], section: Any, *, where: str = "") -> T:
    """Builds the frozen dataclass `cls` from a ConfigDict/dict section, refusing unknown fields.

    Lists become tuples (dataclasses must stay hashable to be Flax module attributes). Nested dataclass
    fields are built recursively when the field's default is a dataclass instance. A float that is NaN or
    infinite is refused (no field of ours means anything by them; a NaN learning rate or guidance scale
    would only surface later as NaN params or black images).
    """
    values = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown field(s) {unknown}; {cls.__name__} accepts {sorted(fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, (dict, ml_collections.ConfigDict)):
            value = build_dataclass(type(default), value, where=f"{where}.{name}" if where else name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where + '.' if where else ''}{name} is {value}; expected a finite number")
        kwargs[name] = _freeze(value)
    return cls(**kwargs)


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`, or `get_config(ARG)` for "path:ARG" (as `ldm-jax
    train --config` reads it); a clear error when the file is not a config."""
    arg = None
    if not pathlib.Path(path).is_file() and ":" in str(path):
        path, arg = str(path).rsplit(":", 1)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"ldm_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return module.get_config() if arg is None else module.get_config(arg)
