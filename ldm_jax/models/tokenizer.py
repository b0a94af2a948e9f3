"""Tokenisation for the text encoders: local tokenizer directories -> int32 (B, max_length) id arrays.

Kinds of tokenizer directory (all loaded offline, `local_files_only=True`):
- "clip":           vocab.json + merges.txt (SD v1/v2 `tokenizer/` folders), via transformers CLIPTokenizer.
                    (transformers 5 ignores `CLIPTokenizer(vocab_file=...)` and yields an empty vocabulary;
                    `from_pretrained(directory)` reads the files correctly, and an empty result is refused.)
                    A CLIP tokenizer saved by transformers 5 (`save_pretrained`: tokenizer.json only) is read as
                    "tokenizer_json", which tokenises identically.
- "bert":           vocab.txt (bert-base-uncased WordPiece), via transformers BertTokenizerFast.
- "tokenizer_json": tokenizer.json written by the HF `tokenizers` library, via PreTrainedTokenizerFast
                    (an optional tokenizer_config.json beside it declares special tokens).

`tokenize` pads every prompt to `max_length` with an explicit pad id (SD v1 pads with the end-of-text id
49407, OpenCLIP/SD v2 with 0, BERT with [PAD] = 0) and truncates longer prompts the way transformers does
(the closing special token is kept), with a warning naming the prompt.
"""
from __future__ import annotations

import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

EXPECTED_FILES: dict[str, tuple[str, ...]] = {
    "clip": ("vocab.json", "merges.txt"),
    "bert": ("vocab.txt",),
    "tokenizer_json": ("tokenizer.json",),
}


def load_tokenizer(directory: str | pathlib.Path, kind: str) -> Any:
    """Loads a tokenizer of `kind` ("clip", "bert" or "tokenizer_json") from a local directory.

    Raises ValueError for an unknown kind, FileNotFoundError naming the directory and the files expected
    when it or they are missing, and ValueError when the vocabulary loads empty.
    """
    if kind not in EXPECTED_FILES:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(EXPECTED_FILES)}")
    directory = pathlib.Path(directory)
    if kind == "clip" and not (directory / "vocab.json").is_file() and (directory / "tokenizer.json").is_file():
        kind = "tokenizer_json"  # transformers 5 saves CLIP tokenizers this way
    expected = EXPECTED_FILES[kind]
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist (a {kind!r} tokenizer "
                                f"directory holds {', '.join(expected)})")
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"tokenizer directory {directory} lacks {', '.join(missing)} (a {kind!r} tokenizer "
                                f"directory holds {', '.join(expected)}; found {found})")
    tokenizer = _tokenizer_class(kind).from_pretrained(str(directory), local_files_only=True)
    n_special = len(set(tokenizer.all_special_tokens))
    if len(tokenizer) <= n_special:
        raise ValueError(f"tokenizer in {directory} loaded with an empty vocabulary ({len(tokenizer)} tokens, "
                         f"all special); check {', '.join(expected)}")
    return tokenizer


def _tokenizer_class(kind: str) -> type:
    import transformers  # noqa: PLC0415 (loading transformers takes seconds; most callers never tokenise)

    return {
        "clip": transformers.CLIPTokenizer,
        "bert": transformers.BertTokenizerFast,
        "tokenizer_json": transformers.PreTrainedTokenizerFast,
    }[kind]


def tokenize(tokenizer: Any, prompts: Sequence[str], *, pad_token_id: int, max_length: int = 77) -> np.ndarray:
    """Tokenises prompts into an int32 (B, max_length) array, special tokens included.

    Prompts longer than max_length tokens are truncated as transformers does (keeping the closing special
    token) with a `warnings.warn` naming each prompt's index and token count. Positions after a prompt's
    last token hold `pad_token_id` (SD v1: 49407, SD v2: 0, BERT: 0).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}"
                        + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else ""))
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if not prompts:
        raise ValueError("prompts is empty")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (start and end tokens), got {max_length}")
    if not 0 <= pad_token_id < len(tokenizer):
        raise ValueError(f"pad_token_id {pad_token_id} is outside the tokenizer's vocabulary [0, {len(tokenizer)})")
    prompts = list(prompts)
    for i, ids in enumerate(tokenizer(prompts)["input_ids"]):
        if len(ids) > max_length:
            warnings.warn(f"prompt {i} has {len(ids)} tokens, more than max_length={max_length}; "
                          f"truncated to {max_length} tokens", stacklevel=2)
    encoded = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
    out = np.full((len(prompts), max_length), pad_token_id, np.int32)
    for i, ids in enumerate(encoded):
        out[i, :len(ids)] = ids
    return out
