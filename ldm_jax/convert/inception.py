"""pytorch-fid's Inception-v3 state dict -> `ldm_jax.models.inception.InceptionV3` variables, strictly.

Source: `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's FID weights, ported from TensorFlow's
2015-12-05 Inception graph), i.e. the state dict of `pytorch_fid.inception.fid_inception_v3()`: a
torchvision `Inception3(num_classes=1008, aux_logits=False)`. Its keys and where they go:

    <module>.conv.weight (O, I, kH, kW)   -> params/<module>/conv/kernel (kH, kW, I, O)
    <module>.bn.weight / .bn.bias          -> params/<module>/bn/scale / bias
    <module>.bn.running_mean / running_var -> batch_stats/<module>/bn/mean / var
    <module>.bn.num_batches_tracked        -> dropped (a training counter; inference BatchNorm ignores it)
    fc.weight (1008, 2048), fc.bias (1008,) -> dropped (the classifier after pool3), after a shape check:
                                             another class count means another network's weights

with <module> e.g. `Conv2d_1a_3x3` or `Mixed_5b.branch5x5_1`. BatchNorm is kept as BatchNorm (running
statistics in the `batch_stats` collection), not folded into the convs, so every array maps one to one onto
a key of the file. Every other key (e.g. torchvision's `AuxLogits.*`: torchvision's own ImageNet Inception
weights are not the FID network), every missing parameter and every shape mismatch raise one
`ConversionError` listing them all.
"""
from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.common import ConversionError, assemble_params, conv_kernel, to_numpy_state_dict
from ldm_jax.models.inception import FEATURE_DIM, INPUT_SIZE, InceptionV3

SOURCE = "pytorch-fid Inception-v3 (pt_inception-2015-12-05)"
FID_NUM_CLASSES = 1008  # pytorch-fid's classifier width (TensorFlow's 1008-way graph)
_LEAVES = {
    "conv.weight": ("params", "conv", "kernel"),
    "bn.weight": ("params", "bn", "scale"),
    "bn.bias": ("params", "bn", "bias"),
    "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var"),
}
_CLASSIFIER_SHAPES = {"fc.weight": (FID_NUM_CLASSES, FEATURE_DIM), "fc.bias": (FID_NUM_CLASSES,)}


def inception_expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {(collection, *path): shape} of InceptionV3's variables ("params" and "batch_stats")."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(InceptionV3().init, jax.random.key(0), images)  # shapes only; the key is unused
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}


def _check_classifier(arrays: Mapping[str, np.ndarray]) -> None:
    wrong = [f"{key}: {arrays[key].shape}, expected {shape}" for key, shape in _CLASSIFIER_SHAPES.items()
             if key in arrays and tuple(arrays[key].shape) != shape]
    if wrong:
        raise ConversionError(f"{SOURCE}: classifier shape differs from pytorch-fid's {FID_NUM_CLASSES}-way FID "
                              f"network ({'; '.join(wrong)}); these are not pt_inception-2015-12-05 weights")


def convert_inception_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid's `fid_inception_v3()` state dict (torch tensors or numpy arrays) -> InceptionV3 variables.

    Returns {"params": {...}, "batch_stats": {...}} of float32 numpy arrays, ready for
    `InceptionV3().apply(variables, images)`. Raises ConversionError (see the module doc).
    """
    arrays = to_numpy_state_dict(state_dict)
    _check_classifier(arrays)
    converted: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}
    for key, array in arrays.items():
        if key in _CLASSIFIER_SHAPES or key.endswith(".bn.num_batches_tracked"):
            continue
        match = re.fullmatch(r"(.+)\.((?:conv|bn)\.\w+)", key)
        if match is None or match[2] not in _LEAVES:
            converted[("unknown", key)] = (key, array)  # reported as unexpected by assemble_params
            continue
        collection, *leaf = _LEAVES[match[2]]
        path = (collection, *match[1].split("."), *leaf)
        converted[path] = (key, conv_kernel(array) if leaf[-1] == "kernel" and array.ndim == 4 else array)
    return assemble_params(converted, inception_expected_shapes(), source=SOURCE)


def load_inception_variables(path: str | pathlib.Path) -> dict:
    """Reads pytorch-fid's weights file (torch.save, zip or legacy format; no torch needed) and converts it.

    Raises FileNotFoundError for a missing file, CheckpointError for an unreadable one, ConversionError when
    its keys or shapes are not pytorch-fid's FID Inception.
    """
    return convert_inception_state_dict(load_state_dict(path))
