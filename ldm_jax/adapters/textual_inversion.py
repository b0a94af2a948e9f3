"""Textual inversion as pure functions over a `LoadedModel`: new tokens whose embeddings are appended to the text
towers' token tables (params[tower]["embeddings"]["token_embedding"]["embedding"], [vocab_size, width]).

An embedding is `vectors` [n, width] (or [width], n = 1) for a one-tower model, or {tower: vectors} for SDXL's two
towers ({"cond_stage": [n, 768], "cond_stage_2": [n, 1280]}, the files' clip_l / clip_g). Multi-vector embeddings
follow diffusers: the token "name" of n vectors becomes the tokens "name", "name_1", ..., "name_{n-1}", and
`tokenizer.tokenize` rewrites a prompt's "name" as "name name_1 ... name_{n-1}" before tokenising (every prompt of
sampling, training and evaluation goes through it; `expand_prompt` shows the rewrite).

`add_tokens` returns a new model (the caller's config, params and tokenizers are never changed): each tower's table
grows by the new rows (config vocab_size with it), each tokenizer is a copy holding the new tokens, and a tower
pooling at argmax(ids) whose end-of-text token was its last id now pools at the first end-of-text token, the same
position for every prompt without the new tokens (their ids exceed end-of-text; transformers' CLIP pools the same
way unless its config carries the legacy eos_token_id 2, SDXL's text_encoder_2 does: diffusers then pools SDXL's
text_embeds at a new token that is in the prompt).

Training (`token_ids`, `init_vectors`, `set_rows`): the new rows are the trainable vectors; `set_rows` writes them
into the frozen table inside the jitted step, so gradients reach only them.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.embedding_files import load_embedding_file
from ldm_jax.ldm import LoadedModel
from ldm_jax.models.text import ClipTextConfig
from ldm_jax.models.tokenizer import expand_multi_vector_tokens, unknown_token_id

TABLE_PATH = ("embeddings", "token_embedding", "embedding")
Embedding = Any  # np.ndarray [n, width] | Mapping[tower name, np.ndarray [n, width]]


class EmbeddingError(ValueError):
    """An embedding does not fit the model (width, towers, token name); nothing was applied."""


# ------------------------------------------------------------------------------------------------ public API


def add_tokens(model: LoadedModel, embeddings: Mapping[str, Embedding], *,
               sources: Mapping[str, str] | None = None) -> LoadedModel:
    """A copy of `model` with the tokens of `embeddings` ({token name: vectors}) added to every text tower.

    vectors: [n, width] or [width] float for one-tower models; {"cond_stage": [n, w1], "cond_stage_2": [n, w2]} for
    two-tower models (SDXL base; the SDXL refiner's one bigG tower takes the "cond_stage_2" vectors). Token
    "name" with n vectors adds "name", "name_1", ..., "name_{n-1}" (ids after the tokenizer's last, in order).
    sources: {token name: where its vectors came from (a file)}, named in errors.
    Raises EmbeddingError (one line; the caller's model unchanged) for a width other than the tower's, a token
    already in a tokenizer, a one-tower embedding for a two-tower model or the reverse, a bad shape.
    """
    towers = _clip_towers(model)
    sources = dict(sources or {})
    per_tower = {name: _per_tower(model, name, value, sources.get(name, "")) for name, value in embeddings.items()}
    if not per_tower:
        raise EmbeddingError("add_tokens: no embeddings given")
    new_tokens = {name: vector_names(name, next(iter(v.values())).shape[0]) for name, v in per_tower.items()}
    _check_names(model, new_tokens, sources)
    changes, params, config = {}, dict(model.params), model.config
    for tower in towers:
        tokens = [t for name in per_tower for t in new_tokens[name]]
        vectors = np.concatenate([per_tower[name][tower] for name in per_tower])
        tokenizer, ids = _tokenizer_with(model.tokenizers()[tower], tokens, tower)
        tower_config = getattr(config, tower)
        table = _grown_table(_table(model.params, tower), tower_config.vocab_size, ids, vectors)
        params = _with_table(params, tower, table)
        grown = _grown_config(tower_config, table.shape[0], model.tokenizers()[tower].eos_token_id)
        config = dataclasses.replace(config, **{tower: grown})
        changes["tokenizer" if tower == "cond_stage" else "tokenizer_2"] = tokenizer
    return dataclasses.replace(model, config=config, params=params, **changes)


def add_embedding_files(model: LoadedModel, files: Sequence[str | os.PathLike | tuple[str | os.PathLike, str | None]]
                        ) -> LoadedModel:
    """`add_tokens` with the embeddings of files (each a path, or (path, token name or None)): every format
    `convert.embedding_files.load_embedding_file` reads; the token name overrides the file's. All files are read and
    checked before anything is added; a token in two files is an EmbeddingError."""
    embeddings, sources = {}, {}
    for item in files:
        path, token = item if isinstance(item, tuple) else (item, None)
        for name, vectors in load_embedding_file(path, token=token).items():
            if name in embeddings:
                raise EmbeddingError(f"{path}: token {name!r} is also in {sources[name]}; give one of them another "
                                     f"name (--token NAME)")
            embeddings[name], sources[name] = vectors, str(path)
    return add_tokens(model, embeddings, sources=sources)


def vector_names(name: str, num_vectors: int) -> list[str]:
    """The tokens of a `num_vectors`-vector embedding called `name`: [name, name_1, ..., name_{n-1}]."""
    return [name] + [f"{name}_{i}" for i in range(1, num_vectors)]


def expand_prompt(model: LoadedModel, prompt: str) -> str:
    """`prompt` as the tokenizers read it: each multi-vector token "name" written "name name_1 ... name_{n-1}"
    (`tokenizer.tokenize` applies this itself; for display and checks)."""
    return expand_multi_vector_tokens(_clip_tokenizer(model, _clip_towers(model)[0]), [prompt])[0]


def init_vectors(model: LoadedModel, init_word: str, num_vectors: int = 1, tower: str | None = None) -> Embedding:
    """The embedding of `init_word` repeated: float32 [num_vectors, width] for `tower`, or with tower=None the
    model's form ({tower: [num_vectors, width]} for two-tower models, one array otherwise), ready for `add_tokens`.

    Raises EmbeddingError when the word is not exactly one token of the tower's tokenizer (or is its unknown token).
    """
    if not isinstance(num_vectors, int) or isinstance(num_vectors, bool) or num_vectors < 1:
        raise EmbeddingError(f"init_vectors: num_vectors must be an integer >= 1, got {num_vectors!r}")
    towers = _clip_towers(model)
    if tower is None:
        out = {name: init_vectors(model, init_word, num_vectors, name) for name in towers}
        return out if len(towers) > 1 else out[towers[0]]
    tokenizer = _clip_tokenizer(model, tower)
    ids = tokenizer(init_word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == unknown_token_id(tokenizer):
        what = "its unknown token" if len(ids) == 1 else f"{len(ids)} tokens {ids}"
        raise EmbeddingError(f"init word {init_word!r} is {what} for the tokenizer of {tower}; choose a word that "
                             f"is one known token")
    row = np.asarray(_table(model.params, tower)[ids[0]], np.float32)
    return np.tile(row, (num_vectors, 1))


def token_ids(model: LoadedModel, names: Sequence[str]) -> dict[str, np.ndarray]:
    """{tower: int32 [sum of n] ids}: for each added token name in order, the ids of its vectors (name, name_1, ...).

    Raises EmbeddingError for a name that is not an added token of every tower's tokenizer.
    """
    if isinstance(names, str):
        names = [names]
    out = {}
    for tower in _clip_towers(model):
        tokenizer = _clip_tokenizer(model, tower)
        added = tokenizer.get_added_vocab()
        ids = []
        for name in names:
            if name not in added:
                raise EmbeddingError(f"token {name!r} was not added to the tokenizer of {tower} (see add_tokens)")
            n = 1
            while f"{name}_{n}" in added:
                n += 1
            ids += [added[t] for t in vector_names(name, n)]
        out[tower] = np.asarray(ids, np.int32)
    return out


def token_vectors(model: LoadedModel, name: str, params: Mapping[str, Any] | None = None) -> Embedding:
    """The vectors of the added token `name` read from `params` (default the model's): float32 [n, width], or
    {tower: [n, width]} for two-tower models (what `save_embedding_file` writes)."""
    params = model.params if params is None else params
    out = {tower: np.asarray(_table(params, tower), np.float32)[ids] for tower, ids in token_ids(model, [name]).items()}
    return out if len(out) > 1 else next(iter(out.values()))


def set_rows(params: Mapping[str, Any], tower: str, ids: Any, vectors: Any) -> dict[str, Any]:
    """params with rows `ids` (int [k]) of `tower`'s token table set to `vectors` ([k, width], cast to the table's
    dtype). Pure and traceable (jit / grad: the gradient reaches `vectors`, not the overwritten rows)."""
    table = jnp.asarray(_table(params, tower))
    vectors = jnp.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != table.shape[1] or vectors.shape[0] != jnp.shape(ids)[0]:
        raise EmbeddingError(f"set_rows: vectors {vectors.shape} must be [{jnp.shape(ids)[0]}, {table.shape[1]}] "
                             f"(one row per id, the width of {tower})")
    return _with_table(params, tower, table.at[jnp.asarray(ids)].set(vectors.astype(table.dtype)))


# ------------------------------------------------------------------------------------------------ helpers


def _clip_towers(model: LoadedModel) -> tuple[str, ...]:
    towers = model.config.text_towers
    if not towers:
        raise EmbeddingError(f"model {model.model_id!r} has no text encoder to add tokens to")
    for tower in towers:
        if not isinstance(getattr(model.config, tower), ClipTextConfig):
            kind = getattr(model.config, tower).kind
            raise EmbeddingError(f"textual inversion supports CLIP text towers; {tower} of model "
                                 f"{model.model_id!r} is {kind!r}")
    return towers


def _clip_tokenizer(model: LoadedModel, tower: str) -> Any:
    if tower not in model.config.text_towers:
        raise EmbeddingError(f"model {model.model_id!r} has no text tower {tower!r}; it has {model.config.text_towers}")
    tokenizer = model.tokenizers()[tower]
    if tokenizer is None:
        raise EmbeddingError(f"model {model.model_id!r} has no tokenizer for its text tower {tower}")
    return tokenizer


def _table(params: Mapping[str, Any], tower: str) -> Any:
    tree = params.get(tower)
    for key in TABLE_PATH:
        if not isinstance(tree, Mapping) or key not in tree:
            raise EmbeddingError(f"params have no token table {tower}/{'/'.join(TABLE_PATH)}")
        tree = tree[key]
    return tree


def _with_table(params: Mapping[str, Any], tower: str, table: Any) -> dict[str, Any]:
    """A shallow copy of params with the token table of `tower` replaced (the other leaves shared)."""
    def replace(tree, path):
        return table if not path else {**tree, path[0]: replace(tree[path[0]], path[1:])}
    return {**params, tower: replace(params[tower], TABLE_PATH)}


def _per_tower(model: LoadedModel, name: str, value: Embedding, source: str) -> dict[str, np.ndarray]:
    """{tower: float32 [n, width]} of one embedding, checked against the model's towers and widths."""
    where = f"{source}: " if source else ""
    towers = model.config.text_towers
    refiner = len(towers) == 1 and model.config.text_time  # SDXL refiner: its one tower is bigG (clip_g)
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"cond_stage", "cond_stage_2"} and refiner:
            value = {"cond_stage": value["cond_stage_2"]}
        elif keys != set(towers):
            kind = "a two-tower (SDXL clip_l + clip_g)" if len(keys) > 1 else f"a {sorted(keys)}"
            raise EmbeddingError(f"{where}embedding {name!r} is {kind} embedding, but the model's text towers are "
                                 f"{towers}")
    elif len(towers) > 1:
        raise EmbeddingError(f"{where}embedding {name!r} has one set of vectors, but the model has two text towers "
                             f"{towers}: it needs an SDXL embedding (clip_l and clip_g)")
    else:
        value = {towers[0]: value}
    out = {tower: _vectors(np.asarray(v), name, tower, getattr(model.config, tower).hidden_size, where)
           for tower, v in value.items()}
    counts = {tower: v.shape[0] for tower, v in out.items()}
    if len(set(counts.values())) > 1:
        raise EmbeddingError(f"{where}embedding {name!r} has different vector counts per tower {counts}")
    return out


def _vectors(array: np.ndarray, name: str, tower: str, width: int, where: str) -> np.ndarray:
    array = array[None] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[0] < 1 or array.dtype.kind not in "fiu":
        raise EmbeddingError(f"{where}embedding {name!r} for {tower} has shape {array.shape} ({array.dtype}); "
                             f"expected [n, {width}] float vectors, n >= 1")
    if array.shape[1] != width:
        raise EmbeddingError(f"{where}embedding {name!r} is {array.shape[1]} wide, but the text tower {tower} is "
                             f"{width} wide (an embedding for another model?)")
    if not np.all(np.isfinite(array)):
        raise EmbeddingError(f"{where}embedding {name!r} for {tower} holds non-finite values")
    return array.astype(np.float32)


def _check_names(model: LoadedModel, new_tokens: Mapping[str, list[str]], sources: Mapping[str, str]) -> None:
    for name in new_tokens:
        if not isinstance(name, str) or not name or name != name.strip():
            raise EmbeddingError(f"token name {name!r} must be a non-empty string without surrounding spaces")
    seen: dict[str, str] = {}
    vocabs = {tower: _clip_tokenizer(model, tower).get_vocab() for tower in model.config.text_towers}
    for name, tokens in new_tokens.items():
        where = f"{sources[name]}: " if sources.get(name) else ""
        for token in tokens:
            if token in seen:
                raise EmbeddingError(f"{where}token {token!r} of embedding {name!r} is also a token of {seen[token]!r}")
            seen[token] = name
            for tower, vocab in vocabs.items():
                if token in vocab:
                    raise EmbeddingError(f"{where}token {token!r} (embedding {name!r}) already exists in the tokenizer "
                                         f"of {tower} (id {vocab[token]}); choose another name (--token NAME)")
    added = set(seen) | {t for tower in vocabs for t in _clip_tokenizer(model, tower).get_added_vocab()}
    for name, tokens in new_tokens.items():
        where = f"{sources[name]}: " if sources.get(name) else ""
        after = f"{name}_{len(tokens)}"  # present, prompts would read it as one more vector of `name`
        if after in added:
            raise EmbeddingError(f"{where}embedding {name!r} of {len(tokens)} vector(s) cannot be added while the token "
                                 f"{after!r} exists (prompts would read it as one more vector); rename one of them")
        before = _previous_vector(name)  # present, prompts would read `name` as one more vector of it
        if before is not None and before in added:
            raise EmbeddingError(f"{where}token {name!r} cannot be added while the token {before!r} exists (prompts "
                                 f"would read it as one more vector after {before!r}); choose another name")


def _previous_vector(name: str) -> str | None:
    """For "x_1" "x", for "x_k" "x_{k-1}" (the token whose multi-vector run "x_k" would extend), else None."""
    base, _, index = name.rpartition("_")
    if not base or not index.isdigit() or index != str(int(index)) or int(index) < 1:
        return None
    return base if int(index) == 1 else f"{base}_{int(index) - 1}"


def _tokenizer_with(tokenizer: Any, tokens: list[str], tower: str) -> tuple[Any, np.ndarray]:
    """A copy of `tokenizer` holding `tokens`, and their ids; each token must tokenise to its own id."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    for token, i in zip(tokens, ids):
        got = tokenizer(token, add_special_tokens=False)["input_ids"]
        if got != [i]:
            raise EmbeddingError(f"token {token!r} added to the tokenizer of {tower} as id {i} tokenises to {got}; "
                                 f"choose another name")
    return tokenizer, np.asarray(ids, np.int64)


def _grown_table(table: Any, vocab_size: int, ids: np.ndarray, vectors: np.ndarray) -> Any:
    """The token table with rows up to max(ids) (zeros where no vector goes) and `vectors` at `ids`."""
    if table.shape[0] != vocab_size:
        raise EmbeddingError(f"token table has {table.shape[0]} rows, the config's vocab_size is {vocab_size}")
    size = max(vocab_size, int(ids.max()) + 1)
    if isinstance(table, np.ndarray):
        grown = np.concatenate([table, np.zeros((size - vocab_size, table.shape[1]), table.dtype)])
        grown[ids] = vectors.astype(table.dtype)
        return grown
    grown = jnp.concatenate([table, jnp.zeros((size - vocab_size, table.shape[1]), table.dtype)])
    return grown.at[ids].set(jnp.asarray(vectors, table.dtype))


def _grown_config(config: ClipTextConfig, vocab_size: int, eos_token_id: int | None) -> ClipTextConfig:
    """`config` with the new vocab_size. Argmax pooling becomes pooling at the first end-of-text token
    (`eos_token_id`, the tokenizer's) when that token was the last id: the same position for every prompt without
    new tokens, whose ids would otherwise win the argmax. (Configs read from transformers' legacy eos_token_id 2
    hold 2 there; the tokenizer says which id ends a prompt.)"""
    changes: dict[str, Any] = {"vocab_size": vocab_size}
    if config.pooling == "argmax" and eos_token_id == config.vocab_size - 1:
        changes.update(pooling="first_eos", eos_token_id=eos_token_id)
    return dataclasses.replace(config, **changes)
