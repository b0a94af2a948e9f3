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
(the closing special token is kept), with a warning naming the prompt (`warn=False` silences it).

Multi-vector textual-inversion tokens follow diffusers' convention: when the tokenizer has the added tokens
"name" and "name_1", ..., "name_{n-1}", `tokenize` (and `inspect_prompts`) first rewrite each "name" in a prompt as
"name name_1 ... name_{n-1}" (`expand_multi_vector_tokens`; diffusers' `maybe_convert_prompt`).

`inspect_prompts` says what tokenising loses, per prompt: truncation (its token count against max_length)
and the words the tokenizer has no token for (mapped to its unknown token; the embedded model's small
word-level vocabulary turns "crimson" into <|unk|>). Command lines print these once per prompt themselves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
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


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike, max_length: int | None) -> None:
    """Writes a transformers tokenizer to `directory` (replacing it), with `model_max_length` = max_length when
    the tokenizer has none (diffusers' pipelines need it; ENVIRONMENT.md)."""
    directory = pathlib.Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    tokenizer.save_pretrained(str(directory))
    settings = directory / "tokenizer_config.json"
    if settings.is_file() and max_length is not None:
        data = json.loads(settings.read_text())
        if not isinstance(data.get("model_max_length"), int) or data["model_max_length"] > 10**6:
            data["model_max_length"] = max_length
            settings.write_text(json.dumps(data, indent=2) + "\n")


def _tokenizer_class(kind: str) -> type:
    import transformers  # noqa: PLC0415 (loading transformers takes seconds; most callers never tokenise)

    return {
        "clip": transformers.CLIPTokenizer,
        "bert": transformers.BertTokenizerFast,
        "tokenizer_json": transformers.PreTrainedTokenizerFast,
    }[kind]


def tokenize(tokenizer: Any, prompts: Sequence[str], *, pad_token_id: int, max_length: int = 77,
             warn: bool = True) -> np.ndarray:
    """Tokenises prompts into an int32 (B, max_length) array, special tokens included.

    Prompts longer than max_length tokens are truncated as transformers does (keeping the closing special
    token) with a `warnings.warn` naming each prompt's index in `prompts` and token count (unless warn=False:
    callers that report `inspect_prompts` themselves). Positions after a prompt's last token hold
    `pad_token_id` (SD v1: 49407, SD v2: 0, BERT: 0). Multi-vector textual-inversion tokens are expanded first
    (`expand_multi_vector_tokens`).
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
    prompts = expand_multi_vector_tokens(tokenizer, prompts)
    for i, ids in enumerate(tokenizer(prompts)["input_ids"] if warn else []):
        if len(ids) > max_length:
            warnings.warn(f"prompt {i} has {len(ids)} tokens, more than max_length={max_length}; "
                          f"truncated to {max_length} tokens", stacklevel=2)
    encoded = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
    out = np.full((len(prompts), max_length), pad_token_id, np.int32)
    for i, ids in enumerate(encoded):
        out[i, :len(ids)] = ids
    return out


def expand_multi_vector_tokens(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Prompts with each multi-vector textual-inversion token "name" rewritten as "name name_1 ... name_{n-1}".

    A token is multi-vector when the tokenizer holds the added tokens "name" and "name_1" (up to the first missing
    "name_{i}"); the rewrite is diffusers' `maybe_convert_prompt`: every added token the tokenizer finds in a prompt
    is replaced in the text (str.replace) by its expansion, tokens taken in order of first appearance. Prompts are
    returned unchanged (a new list) when the tokenizer has no multi-vector token.
    """
    added = tokenizer.get_added_vocab()
    if not any(f"{token}_1" in added for token in added):
        return list(prompts)
    out = []
    for prompt in prompts:
        for token in dict.fromkeys(t for t in tokenizer.tokenize(prompt) if t in added):
            n = 1
            while f"{token}_{n}" in added:
                n += 1
            if n > 1:
                prompt = prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, n)]))
        out.append(prompt)
    return out


# ---------------------------------------------------------------------------------------------- diagnostics


@dataclasses.dataclass(frozen=True)
class PromptReport:
    """What tokenising one prompt loses. n_tokens counts special tokens, before truncation to max_length;
    unknown_words are the prompt's words (as written, each once) that the tokenizer maps to its unknown token."""

    prompt: str
    n_tokens: int
    max_length: int
    unknown_words: tuple[str, ...] = ()

    @property
    def truncated(self) -> bool:
        return self.n_tokens > self.max_length

    def problems(self, name: str) -> list[str]:
        """One line per problem, for a prompt called `name` (e.g. "prompt 0", "--negative-prompt")."""
        lines, prompt = [], short_repr(self.prompt)
        if self.unknown_words:
            words = ", ".join(repr(w) for w in self.unknown_words)
            lines.append(f"{name} {prompt}: not in the tokenizer's vocabulary, read as its unknown token: {words}")
        if self.truncated:
            lines.append(f"{name} {prompt} has {self.n_tokens} tokens, more than max_length={self.max_length}; "
                         f"truncated to {self.max_length} tokens")
        return lines


def short_repr(text: str, limit: int = 60) -> str:
    """repr(text), its middle elided when longer than `limit` characters (for one-line messages)."""
    return repr(text) if len(text) <= limit else repr(text[:limit // 2] + " ... " + text[-limit // 2:])


def inspect_prompts(tokenizer: Any, prompts: Sequence[str], *, max_length: int = 77) -> list[PromptReport]:
    """One `PromptReport` per prompt (same order): token counts and unknown words.

    Tokenizers without an unknown token of their own report no unknown words (CLIP's byte-level BPE: its
    unk_token is the end-of-text token, which no text produces).
    """
    prompts = list(prompts)
    expanded = expand_multi_vector_tokens(tokenizer, prompts)
    counts = [len(ids) for ids in tokenizer(expanded)["input_ids"]]
    unknown = _unknown_words(tokenizer, expanded)
    return [PromptReport(p, n, max_length, words) for p, n, words in zip(prompts, counts, unknown, strict=True)]


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token, or None when it has none distinct from its start, end and pad
    tokens (CLIP's unk_token is <|endoftext|>)."""
    unk = tokenizer.unk_token_id
    others = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    return None if unk is None or unk in others else unk


def _unknown_words(tokenizer: Any, prompts: list[str]) -> list[tuple[str, ...]]:
    """Per prompt, the substrings (fast tokenizers: each unknown piece; others: each whitespace-separated word)
    that tokenise to the unknown token, in order, each once."""
    unk = unknown_token_id(tokenizer)
    if unk is None:
        return [()] * len(prompts)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [[p[a:b] for i, (a, b) in zip(ids, offsets) if i == unk]
                  for p, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"])]
    else:
        words = [p.split() for p in prompts]
        pieces = [[w for w, ids in zip(ws, tokenizer(ws, add_special_tokens=False)["input_ids"]) if unk in ids]
                  if ws else [] for ws in words]
    return [tuple(dict.fromkeys(found)) for found in pieces]
