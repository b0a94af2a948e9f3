"""torchvision VGG16 + lpips linear heads -> `ldm_jax.losses.lpips.LPIPS` params, strictly.

Accepted keys (any mix, from one or several state dicts):
- torchvision `vgg16()` state dict: `features.N.{weight,bias}`; its `classifier.*` keys are dropped on
  purpose (LPIPS uses only the conv trunk);
- lpips heads (`lpips/weights/v0.1/vgg.pth`): `linK.model.1.weight`;
- a whole `lpips.LPIPS(net="vgg")` (or taming `LPIPS`) state dict: `net.sliceS.N.{weight,bias}` (N is the
  torchvision features index and must lie in slice S), `linK.model.1.weight`, and the `scaling_layer`
  buffers, which must equal our constants and are then dropped. lpips.LPIPS registers its heads twice
  (`linK` and the ModuleList `lins.K`): `lins.K.model.1.weight` must equal `linK.model.1.weight` when both
  are present and stands in for it otherwise.
Everything else, every missing param and every shape mismatch raises `ConversionError`.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.common import ConversionError, convert_state_dict, expected_shapes, to_numpy_state_dict
from ldm_jax.losses.lpips import LPIPS, MIN_SIZE, SCALING_SCALE, SCALING_SHIFT

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# lpips' vgg16 wrapper: slice S holds torchvision features indices [start, stop).
_SLICE_RANGES = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
_SCALING = {"scaling_layer.shift": SCALING_SHIFT, "scaling_layer.scale": SCALING_SCALE}


def _rename(key: str) -> str | None:
    """Maps a source key to our diffusers-style key (`vgg.features.N.weight`, `lin0.weight`), None to drop."""
    if key.startswith("classifier."):
        return None
    if key in _SCALING:
        return None  # checked against our constants in `_check_scaling`
    if m := re.fullmatch(r"features\.(\d+)\.(weight|bias)", key):
        return f"vgg.features.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"net\.slice(\d)\.(\d+)\.(weight|bias)", key):
        slice_id, index = int(m[1]), int(m[2])
        if index not in _SLICE_RANGES.get(slice_id, ()):
            raise ConversionError(f"{key}: features index {index} does not belong to lpips slice{slice_id}")
        return f"vgg.features.{index}.{m[3]}"
    if m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
        return f"lin{m[1]}.weight"
    return key  # unknown: reported as unexpected by the strict assembly


def _check_scaling(arrays: Mapping[str, np.ndarray]) -> None:
    for key, constant in _SCALING.items():
        if key in arrays and not np.allclose(np.reshape(arrays[key], -1), constant, rtol=0, atol=1e-7):
            raise ConversionError(f"{key} = {np.reshape(arrays[key], -1)} differs from LPIPS v0.1's {constant}")


def _fold_head_aliases(arrays: dict[str, np.ndarray]) -> None:
    """Replaces lpips' duplicate `lins.K.model.1.weight` by `linK.model.1.weight` (checking they agree)."""
    for key in [k for k in arrays if re.fullmatch(r"lins\.\d\.model\.1\.weight", k)]:
        twin = key.replace("lins.", "lin", 1)
        alias = arrays.pop(key)
        if twin not in arrays:
            arrays[twin] = alias
        elif not np.array_equal(arrays[twin], alias):
            raise ConversionError(f"{key} differs from {twin}; lpips ties the two")


def lpips_expected_shapes(widths: tuple[int, ...] | None = None) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of `LPIPS(widths)` params (default: VGG16 widths)."""
    model = LPIPS() if widths is None else LPIPS(widths)
    images = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return expected_shapes(model.init, jax.random.key(0), images, images)  # shapes only; the key is unused


def convert_lpips_state_dict(*state_dicts: Mapping[str, Any], widths: tuple[int, ...] | None = None) -> dict:
    """Converts VGG16 trunk + lpips head state dicts (torch tensors or arrays) into LPIPS params.

    Returns {"vgg": {"features_N": {"kernel", "bias"}}, "lin0": {"kernel"}, ...}, float32.
    Raises ConversionError for a key found in two dicts, unknown keys, missing params or wrong shapes.
    """
    merged: dict[str, np.ndarray] = {}
    for state_dict in state_dicts:
        arrays = to_numpy_state_dict(state_dict)
        overlap = sorted(set(arrays) & set(merged))
        if overlap:
            raise ConversionError(f"LPIPS: keys given twice: {overlap[:10]}")
        merged.update(arrays)
    _check_scaling(merged)
    _fold_head_aliases(merged)
    return convert_state_dict(merged, lpips_expected_shapes(widths), source="LPIPS (VGG16 + lpips heads)",
                              rename=_rename)


def default_heads_path() -> pathlib.Path | None:
    """The installed lpips package's `weights/v0.1/vgg.pth` (found without importing lpips), or None."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"


def load_lpips_params(vgg_path: str | pathlib.Path, heads_path: str | pathlib.Path | None = None) -> dict:
    """Loads LPIPS params from torchvision's VGG16 file and the lpips v0.1 VGG heads file.

    vgg_path: torchvision's `vgg16-397923af.pth` (or any file with `features.N.*` keys).
    heads_path: default: the installed lpips package's `weights/v0.1/vgg.pth`.
    Raises FileNotFoundError naming every missing file and where to get it.
    """
    vgg_path = pathlib.Path(vgg_path)
    heads = pathlib.Path(heads_path) if heads_path is not None else default_heads_path()
    problems = []
    if not vgg_path.is_file():
        problems.append(f"VGG16 weights {vgg_path} not found: download torchvision's vgg16-397923af.pth "
                        f"({VGG16_URL}) and pass its path")
    if heads is None:
        problems.append("LPIPS heads not given and the lpips package is not installed: `pip install lpips==0.1.4` "
                        "or pass heads_path= to lpips/weights/v0.1/vgg.pth")
    elif not heads.is_file():
        problems.append(f"LPIPS heads {heads} not found: it ships with the lpips package "
                        "(lpips/weights/v0.1/vgg.pth, `pip install lpips==0.1.4`)")
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return convert_lpips_state_dict(load_state_dict(vgg_path), load_state_dict(heads))

