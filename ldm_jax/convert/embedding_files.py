"""Textual-inversion embedding files <-> {token name: vectors} (read without running pickle code).

Read (`load_embedding_file`), by content:
- diffusers `learned_embeds.safetensors` / `.bin`: {token: [n, width] or [width]} (one or more tokens);
- A1111 `.pt`: {"string_to_param": {"*": [n, width]}, "name": str, "string_to_token": ..., "step": ...};
- kohya / A1111 `.safetensors` (or `.pt`): {"emb_params": [n, width]};
- SDXL (`.safetensors`): {"clip_l": [n, 768], "clip_g": [n, 1280]} -> {"cond_stage": clip_l, "cond_stage_2": clip_g};
- a bare tensor saved with torch.save.
The token name: `token=` when given (`--token NAME`), else diffusers' key, A1111's "name", the "token" entry of a
safetensors header (what `save_embedding_file` writes), else the file's stem.

Write (`save_embedding_file`): diffusers' format, which `pipe.load_textual_inversion(path)` reads: {token: [n, width]}
for one tower, {"clip_l", "clip_g"} for SDXL (diffusers loads those per tower: `load_textual_inversion(
state["clip_g"], token=..., text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`), float32 safetensors.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors

from ldm_jax.convert.checkpoint_io import (
    SAFETENSORS_EXTENSION,
    TORCH_EXTENSIONS,
    CheckpointError,
    load_state_dict,
    load_torch_pickle,
    save_safetensors,
)

SDXL_KEYS = {"clip_l": "cond_stage", "clip_g": "cond_stage_2"}
TOKEN_METADATA_KEY = "token"


class EmbeddingFileError(CheckpointError):
    """An embedding file of no known layout, or a bad argument for it."""


def load_embedding_file(path: str | os.PathLike, token: str | None = None) -> dict[str, Any]:
    """Reads an embedding file (module docstring) into {token name: vectors}.

    vectors: float32 [n, width] ([width] is read as n = 1), or {"cond_stage": [n, w1], "cond_stage_2": [n, w2]} for
    SDXL files. token: the name to use instead of the file's (refused when the file holds several tokens).
    Raises FileNotFoundError, CheckpointError (unreadable / unsafe file), EmbeddingFileError (unknown layout).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_EXTENSION:
        tree, default = load_state_dict(path), _header_token(path) or path.stem
    elif suffix in TORCH_EXTENSIONS:
        tree, default = load_torch_pickle(path), path.stem
    else:
        raise EmbeddingFileError(f"{path}: unknown embedding file extension {suffix or '(none)'!r}; expected "
                                 f"{SAFETENSORS_EXTENSION} or one of {', '.join(TORCH_EXTENSIONS)}")
    found = _entries(tree, default, path)
    if token is not None:
        if len(found) != 1:
            raise EmbeddingFileError(f"{path}: holds {len(found)} tokens {sorted(found)}; a token name applies to a "
                                     f"file of one")
        found = {token: next(iter(found.values()))}
    return {name: _as_vectors(v, name, path) for name, v in found.items()}


def save_embedding_file(path: str | os.PathLike, token: str, vectors: Any) -> None:
    """Writes one token's vectors as diffusers' learned_embeds `.safetensors`: {token: float32 [n, width]}, or for a
    two-tower embedding ({"cond_stage": [n, w1], "cond_stage_2": [n, w2]}) {"clip_l", "clip_g"}, with the token name
    in the header's metadata ("token")."""
    path = pathlib.Path(path)
    if path.suffix.lower() != SAFETENSORS_EXTENSION:
        raise EmbeddingFileError(f"{path}: embeddings are written as {SAFETENSORS_EXTENSION}, got {path.suffix!r}")
    if not isinstance(token, str) or not token:
        raise EmbeddingFileError(f"{path}: the token name must be a non-empty string, got {token!r}")
    if isinstance(vectors, Mapping):
        names = {tower: key for key, tower in SDXL_KEYS.items()}
        if set(vectors) != set(names):
            raise EmbeddingFileError(f"{path}: a two-tower embedding has {sorted(names)}, got {sorted(vectors)}")
        state = {names[tower]: _as_vectors(v, token, path) for tower, v in vectors.items()}
    else:
        state = {token: _as_vectors(vectors, token, path)}
    save_safetensors(path, state, metadata={TOKEN_METADATA_KEY: token})


def _header_token(path: pathlib.Path) -> str | None:
    with safetensors.safe_open(str(path), framework="np") as f:
        return (f.metadata() or {}).get(TOKEN_METADATA_KEY)


def _entries(tree: Any, default: str, path: pathlib.Path) -> dict[str, Any]:
    """{name: array or {tower: array}} by the file's layout."""
    if isinstance(tree, np.ndarray):
        return {default: tree}
    if not isinstance(tree, Mapping) or not tree:
        raise EmbeddingFileError(f"{path}: expected a mapping of embeddings, found {type(tree).__name__}")
    if "string_to_param" in tree:
        params = tree["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingFileError(f"{path}: A1111 'string_to_param' must hold one tensor, found "
                                     f"{_describe(params)}")
        name = tree.get("name")
        return {name if isinstance(name, str) and name else default: next(iter(params.values()))}
    if set(SDXL_KEYS) & set(tree):
        missing = sorted(set(SDXL_KEYS) - set(tree))
        if missing:
            raise EmbeddingFileError(f"{path}: an SDXL embedding needs clip_l and clip_g; {missing} is missing")
        return {default: {tower: tree[key] for key, tower in SDXL_KEYS.items()}}
    if "emb_params" in tree:
        return {default: tree["emb_params"]}
    bad = [k for k, v in tree.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise EmbeddingFileError(f"{path}: not an embedding file (diffusers {{token: tensor}}, A1111 string_to_param, "
                                 f"emb_params or clip_l/clip_g); found {_describe(tree)}")
    return dict(tree)


def _as_vectors(value: Any, name: str, path: pathlib.Path) -> Any:
    """float32 [n, width] (a [width] vector as n = 1), or a dict of them."""
    if isinstance(value, Mapping):
        return {k: _as_vectors(v, name, path) for k, v in value.items()}
    array = np.asarray(value) if isinstance(value, np.ndarray) else None
    if array is None or array.ndim not in (1, 2) or array.dtype.kind != "f" or 0 in array.shape:
        what = f"shape {array.shape} ({array.dtype})" if array is not None else type(value).__name__
        raise EmbeddingFileError(f"{path}: embedding {name!r} is {what}; expected float vectors [n, width]")
    return np.ascontiguousarray(array.reshape(-1, array.shape[-1]), np.float32)


def _describe(tree: Any) -> str:
    if not isinstance(tree, Mapping):
        return type(tree).__name__
    items = [f"{k!r} ({f'array {v.shape}' if isinstance(v, np.ndarray) else type(v).__name__})" for k, v in tree.items()]
    return ", ".join(items[:8]) + (f", ... ({len(items)} entries)" if len(items) > 8 else "")
