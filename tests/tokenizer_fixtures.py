"""Tiny real tokenizer directories for tests (no downloads).

- `write_clip_tokenizer`: a CLIP byte-level BPE directory (vocab.json + merges.txt) in the OpenAI layout:
  256 byte symbols, the same with `</w>`, then merges learnt here on a small corpus, then
  <|startoftext|> and <|endoftext|> as the last two ids (so end-of-text has the largest id, as in CLIP).
- `write_bert_tokenizer`: a WordPiece vocab.txt with BERT's special tokens first ([PAD] = 0).
- `write_tokenizer_json`: a BPE tokenizer trained with the HF `tokenizers` library, saved as tokenizer.json.
"""
from __future__ import annotations

import collections
import json
import pathlib

CORPUS = (
    "a photo of a cat", "a red circle on the left", "a blue square on the right", "a green triangle",
    "two small yellow stars in the middle", "a large purple circle at the top", "an orange square below",
    "a painting of a dog riding a bicycle", "the cat sat on the mat", "shapes and colours on a white canvas",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {b: mapping[b] for b in keep + [b for b in range(256) if b not in keep]}


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent symbol pair (ties broken by first seen)."""
    counts = collections.Counter(words)
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = max(pairs, key=pairs.get)
        merges.append(best)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = tuple(out)
    return merges


def write_clip_tokenizer(directory: str | pathlib.Path, *, num_merges: int = 80,
                         corpus: tuple[str, ...] = CORPUS) -> pathlib.Path:
    """Writes vocab.json + merges.txt of a tiny CLIP BPE tokenizer; returns the directory.

    Vocabulary size: 512 + number of merges + 2 (<|startoftext|>, <|endoftext|> last).
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = _learn_merges([w for line in corpus for w in line.lower().split()], num_merges)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def write_bert_tokenizer(directory: str | pathlib.Path, *, corpus: tuple[str, ...] = CORPUS) -> pathlib.Path:
    """Writes a WordPiece vocab.txt ([PAD]=0, [UNK], [CLS], [SEP], [MASK], letters, ##letters, corpus words)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({w for line in corpus for w in line.lower().split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + words
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return directory


def write_tokenizer_json(directory: str | pathlib.Path, *, vocab_size: int = 120,
                         corpus: tuple[str, ...] = CORPUS) -> pathlib.Path:
    """Trains a small BPE with the `tokenizers` library (<pad>=0, <s>, </s>, <unk>; "<s> $A </s>" template)
    and saves it as tokenizer.json; returns the directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer.train_from_iterator(list(corpus), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.token_to_id("<s>")),
                                              ("</s>", tokenizer.token_to_id("</s>"))])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
