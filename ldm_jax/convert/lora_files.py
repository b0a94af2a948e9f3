"""LoRA files, the one entry point: which format a file is, load it as a `Lora` for a model, save one.

Formats (`LORA_FORMATS`):
- "peft": diffusers' `save_lora_weights` files (`unet.<module>.lora_A.weight`, ...; alpha in the metadata), see
  `lora_peft`;
- "kohya": kohya-ss sd-scripts files (`lora_unet_<module>.lora_down.weight`, `.alpha`, `lora_te*_`), see
  `lora_kohya`.
The format is read off the keys (`detect_lora_format`); `load_lora_file(path, config)` converts the whole file and
checks it against the model (`ldm_jax.adapters.lora.check_fits`) before returning, so a bad file is refused
whole, with one line (LoraError, a ValueError) naming the file and the first problem: a key of neither format, a
key that matches no module of this model (and the model's kind: an SDXL LoRA on SD 1.5), a missing lora_A /
lora_B / down / up partner, a rank mismatch, a delta whose shape differs from the module's kernel (both shapes).
Files are `.safetensors` or, for reading, torch pickles (`.pt`, `.ckpt`, ...; read by `checkpoint_io` without
running code).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import safetensors
from flax import traverse_util

from ldm_jax.adapters.lora import Lora, LoraError, check_fits
from ldm_jax.convert.checkpoint_io import SAFETENSORS_EXTENSION, load_state_dict, save_safetensors
from ldm_jax.convert.lora_kohya import lora_from_kohya, lora_to_kohya, parse_kohya_key
from ldm_jax.convert.lora_peft import METADATA_KEY, lora_from_peft, lora_to_peft, parse_peft_key
from ldm_jax.ldm import LDMConfig, param_shapes

LORA_FORMATS = ("peft", "kohya")
_KEY_FORMS = "diffusers/PEFT <component>.<module>.lora_A.weight / lora_B.weight, or kohya lora_unet_* / lora_te*_* " \
             "with .lora_down.weight / .lora_up.weight / .alpha"


def lora_format_of_keys(keys: Iterable[str], source: str = "LoRA") -> str:
    """"peft" or "kohya" for a LoRA state dict's keys. Raises LoraError naming `source` and the first key (sorted)
    that is of neither format, or of the other format than the keys before it, or when there are no keys."""
    found = None
    for key in sorted(keys):
        form = "peft" if parse_peft_key(key) else "kohya" if parse_kohya_key(key) else None
        if form is None:
            raise LoraError(f"{source}: key {key} is of no known LoRA key family (expected {_KEY_FORMS})")
        if found not in (None, form):
            raise LoraError(f"{source}: key {key} is a {form} key in a file of {found} keys")
        found = form
    if found is None:
        raise LoraError(f"{source}: holds no tensors (expected {_KEY_FORMS})")
    return found


def detect_lora_format(path: str | os.PathLike) -> str:
    """"peft" or "kohya": the format of the LoRA file at `path` (see the module docstring), read off its keys.
    Raises FileNotFoundError for a missing file, LoraError (naming the file and key) for keys of no LoRA format."""
    path = pathlib.Path(path)
    if path.suffix.lower() == SAFETENSORS_EXTENSION and path.is_file():
        with safetensors.safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
    else:
        keys = list(load_state_dict(path))
    return lora_format_of_keys(keys, str(path))


def read_lora_file(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(state dict of float32 numpy arrays in torch layout, the safetensors header metadata ({} for pickles))."""
    path = pathlib.Path(path)
    state = load_state_dict(path)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == SAFETENSORS_EXTENSION:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
    return state, metadata


def load_lora_file(path: str | os.PathLike, config: LDMConfig) -> Lora:
    """The LoRA in the file at `path` (format detected from its keys) as a `Lora` for the model `config`:
    factors in our layout (down [in, r] / [kh, kw, in, r], up [r, out], float32), each module's alpha (the file's
    metadata or `.alpha` keys; alpha = rank where the file has none). Apply with `lora.apply_loras`.

    Raises FileNotFoundError for a missing file and one-line LoraError naming the file for a file that does not
    fit the model (see the module docstring); nothing is returned half-converted.
    """
    state, metadata = read_lora_file(path)
    try:
        if lora_format_of_keys(state, "file") == "peft":
            lora = lora_from_peft(state, metadata, config)
        else:
            lora = lora_from_kohya(state, config)
        check_fits(_shape_tree(config), [lora])
    except LoraError as err:
        raise LoraError(f"LoRA file {path}: {err}") from err
    return lora


def save_lora_file(lora: Lora, path: str | os.PathLike, config: LDMConfig, format: str = "peft",
                   metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """Writes `lora` (for the model `config`) as a `.safetensors` LoRA file in `format` ("peft": what diffusers'
    `load_lora_weights` loads strictly, with its alpha metadata; "kohya": sd-scripts' keys, CompVis UNet names for
    SDXL, diffusers names otherwise) in float32; `metadata` {str: str} is added to the file's header. Returns the
    path.

    Raises ValueError for an unknown format or metadata that is not {str: str} or sets `lora_adapter_metadata`,
    LoraError when `lora` does not fit the model, CheckpointError for a path that is not `.safetensors`.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"LoRA format {format!r}; expected one of {LORA_FORMATS}")
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()) or METADATA_KEY in extra:
        raise ValueError(f"LoRA file metadata must map str to str and leave {METADATA_KEY} to the writer; got "
                         f"{sorted(extra)}")
    check_fits(_shape_tree(config), [lora])
    header = {"format": "pt"}
    if format == "peft":
        state, adapter_metadata = lora_to_peft(lora, config)
        header[METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True)
    else:
        state = lora_to_kohya(lora, config)
    path = pathlib.Path(path)
    save_safetensors(path, state, {**header, **extra})
    return path


def _shape_tree(config: LDMConfig) -> dict:
    """The model's params as a tree of ShapeDtypeStructs (what `check_fits` reads; nothing allocated)."""
    return traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, jnp.float32)
                                         for path, shape in param_shapes(config).items()})
