"""Strict state-dict -> Flax params mapping shared by every converter.

A converter turns a PyTorch-layout state dict (name -> numpy array) into our Flax params in three steps:
1. `rename(key)` maps each source key to a Flax path (a tuple of names) or raises for keys it does not know;
2. `torch_to_flax_array` transposes layouts (conv OIHW -> HWIO, Linear (out, in) -> (in, out));
3. `assemble_params` checks the result against the expected param shapes (from `jax.eval_shape` of the
   module's init) and raises one `ConversionError` listing every missing key, unexpected key and shape
   mismatch. Nothing is skipped silently.

Our module names mirror diffusers' (`down_blocks_0/resnets_1/conv1/kernel` for
`down_blocks.0.resnets.1.conv1.weight`), so `diffusers_key_to_path` is the default renaming.
Export runs the same mapping backwards: `params_to_state_dict` (`flax_to_torch_leaf`, `path_to_diffusers_key`).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the model it is loaded into; the message lists every offending key."""


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Turns a state dict of torch tensors or arrays into float32/int numpy arrays (no torch import needed)."""
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu()
            if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
                value = value.float()
            value = value.numpy()
        out[key] = np.asarray(value)
    return out


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kH, kW) -> Flax kernel (kH, kW, I, O)."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.transpose(weight)


def diffusers_key_to_path(key: str, *, embeddings: Iterable[str] = ()) -> tuple[Path, str]:
    """Maps a diffusers/transformers-style key to (Flax path, kind).

    `down_blocks.0.resnets.1.conv1.weight` -> (("down_blocks_0", "resnets_1", "conv1", "weight"), ...):
    a numeric part is joined to the name before it (`resnets.1` -> `resnets_1`). The leaf is renamed by
    `torch_to_flax_leaf` once the array's rank is known. `embeddings` names modules whose 2-D `weight`
    is an embedding table rather than a Linear weight.
    """
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    kind = "embedding" if len(parts) >= 2 and parts[-2] in set(embeddings) else "param"
    return tuple(parts), kind


def torch_to_flax_leaf(path: Path, array: np.ndarray, kind: str = "param") -> tuple[Path, np.ndarray]:
    """Renames a torch leaf (weight/bias) to Flax's (kernel/scale/embedding/bias) and transposes its layout.

    4-D weight -> conv `kernel` (HWIO); 2-D weight -> Dense `kernel` (transposed) or `embedding` when
    kind == "embedding"; 1-D weight -> norm `scale`; biases unchanged.
    """
    *prefix, leaf = path
    if leaf != "weight":
        return path, array
    if kind == "embedding":
        return (*prefix, "embedding"), array
    if array.ndim == 4:
        return (*prefix, "kernel"), conv_kernel(array)
    if array.ndim == 2:
        return (*prefix, "kernel"), dense_kernel(array)
    if array.ndim == 1:
        return (*prefix, "scale"), array
    raise ConversionError(f"cannot map weight {'.'.join(path)} of rank {array.ndim}")


def expected_shapes(init_fn: Callable[..., Any], *args, **kwargs) -> dict[Path, tuple[int, ...]]:
    """Flat {path: shape} of the params `init_fn(*args, **kwargs)` would create, without allocating them."""
    tree = jax.eval_shape(init_fn, *args, **kwargs)
    tree = tree.get("params", tree) if isinstance(tree, Mapping) else tree
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


def assemble_params(
    converted: Mapping[Path, tuple[str, np.ndarray]],
    expected: Mapping[Path, tuple[int, ...]],
    *,
    source: str,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Checks converted arrays against the expected param shapes and nests them into a Flax params dict.

    converted: {flax_path: (source_key, array)}; expected: {flax_path: shape}.
    dtype: the params' dtype, float32 (default) or bfloat16 (a run-time `param_dtype`); arrays already in it
      are kept as they are (views, no copies), so a reader that reads them in `dtype` never holds float32 copies.
    Raises ConversionError listing every missing, unexpected and mis-shaped key (by source key name: `check_shapes`).
    """
    check_shapes(converted, expected, source=source)
    flat = {p: np.asarray(arr, dtype=dtype) for p, (_, arr) in converted.items()}
    return traverse_util.unflatten_dict(flat)


def check_shapes(found: Mapping[Path, tuple[str, Any]], expected: Mapping[Path, tuple[int, ...]], *,
                 source: str) -> None:
    """The strict check of `assemble_params` alone (nothing copied or built): found {path: (source key, array or
    anything with a .shape)} against expected {path: shape}. Raises ConversionError listing every missing,
    unexpected and mis-shaped key (by source key name); its first line says it all."""
    missing = sorted("/".join(p) for p in expected if p not in found)
    unexpected = sorted(f"{key} (-> {'/'.join(p)})" for p, (key, _) in found.items() if p not in expected)
    mismatched = sorted(
        f"{key}: checkpoint {tuple(np.shape(arr))} vs model {tuple(expected[p])}"
        for p, (key, arr) in found.items()
        if p in expected and tuple(np.shape(arr)) != tuple(expected[p])
    )
    if missing or unexpected or mismatched:
        raise ConversionError(_report(source, missing, unexpected, mismatched))


def convert_state_dict(
    state_dict: Mapping[str, Any],
    expected: Mapping[Path, tuple[int, ...]],
    *,
    source: str,
    rename: Callable[[str], str | None] = lambda key: key,
    embeddings: Iterable[str] = (),
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Converts a diffusers/transformers-layout state dict strictly into Flax params (of `dtype`, float32 or
    bfloat16: the mapping only renames and transposes, so it is the same in either).

    rename: applied to each source key first (return None to drop a key that holds no parameter,
      e.g. a registered buffer such as `position_ids`; such drops are explicit in the converter).
    """
    arrays = to_numpy_state_dict(state_dict)
    converted: dict[Path, tuple[str, np.ndarray]] = {}
    for key, array in arrays.items():
        new_key = rename(key)
        if new_key is None:
            continue
        path, kind = diffusers_key_to_path(new_key, embeddings=embeddings)
        path, array = torch_to_flax_leaf(path, array, kind)
        if path in converted:
            raise ConversionError(f"{source}: keys {converted[path][0]} and {key} both map to {'/'.join(path)}")
        converted[path] = (key, array)
    return assemble_params(converted, expected, source=source, dtype=dtype)


def _report(source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """The first line says it all (the first mis-shaped key with both shapes, else the first missing or
    unexpected key, and the counts); the lines below list the keys (20 of each kind at most)."""
    if mismatched:
        first = f"first mismatch {mismatched[0]}"
    elif missing:
        first = f"first missing key {missing[0]}"
    else:
        first = f"first unexpected key {unexpected[0]}"
    counts = ", ".join(f"{len(items)} {title}" for title, items in (
        ("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected)) if items)
    lines = [f"checkpoint does not match the model ({source}): {first} ({counts})"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------ export (inverse)


def flax_to_torch_leaf(path: Path, array: np.ndarray) -> tuple[Path, np.ndarray]:
    """Inverse of `torch_to_flax_leaf`: conv kernel (HWIO) -> OIHW `weight`, Dense kernel -> transposed
    `weight`, norm `scale` and `embedding` -> `weight`; biases unchanged."""
    *prefix, leaf = path
    array = np.asarray(array)
    if leaf == "kernel" and array.ndim == 4:
        return (*prefix, "weight"), np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return (*prefix, "weight"), np.transpose(array)
    if leaf in ("scale", "embedding"):
        return (*prefix, "weight"), array
    if leaf == "bias":
        return tuple(path), array
    raise ConversionError(f"cannot map param {'/'.join(path)} of rank {array.ndim} to a torch leaf")


def path_to_diffusers_key(path: Path, *, literal: Iterable[str] = ()) -> str:
    """Inverse of `diffusers_key_to_path`: ("down_blocks_0", "resnets_1", "conv1", "weight") ->
    "down_blocks.0.resnets.1.conv1.weight". Names in `literal` (torch attribute names that themselves end in
    `_<digits>`, such as diffusers' `linear_1`) are kept as they are."""
    parts = []
    for name in path:
        match = None if name in set(literal) else re.fullmatch(r"(.+?)((?:_\d+)+)", name)
        parts.extend([match.group(1), *match.group(2)[1:].split("_")] if match else [name])
    return ".".join(parts)


def params_to_state_dict(params: Mapping[str, Any], *, literal: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Our Flax params (no "params" level) -> a diffusers/transformers-layout state dict of float32 numpy
    arrays: the inverse of `convert_state_dict` with the default renaming (see `path_to_diffusers_key`)."""
    out = {}
    for path, array in traverse_util.flatten_dict(dict(params)).items():
        torch_path, torch_array = flax_to_torch_leaf(path, np.asarray(array, np.float32))
        out[path_to_diffusers_key(torch_path, literal=literal)] = torch_array
    return out
