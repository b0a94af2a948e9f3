"""Trains the word-level tokenizer of the captioned-shapes world and saves it as a tokenizer directory.

    python -m ldm_jax.data.train_tokenizer --out DIR

Why word-level: captions use a closed vocabulary of 22 words (`caption_words`), so one id per word is the
shortest encoding (a 3-object caption is 26 words, 28 ids with the special tokens, far under CLIP's 77), and
any other word maps to <|unk|> visibly instead of being split into pieces the model never saw.

Text handling follows CLIP: NFC, runs of whitespace -> one space, lowercase; words and punctuation runs are
separate tokens. Every encoding is "<|startoftext|> words <|endoftext|>".

Ids: 0 <|pad|>, 1 <|unk|>, then the words (most frequent first, ties alphabetical, as the `tokenizers`
WordLevelTrainer orders them), then <|startoftext|> and <|endoftext|> as the two largest ids, as in CLIP, so
both CLIP poolings (argmax of the ids, or first end-of-text) find the end token. Pad with `pad_token_id` 0.

The directory holds tokenizer.json and tokenizer_config.json (the special tokens and model_max_length 77)
and loads with `ldm_jax.models.tokenizer.load_tokenizer(DIR, "tokenizer_json")`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from ldm_jax.data import shapes

PAD, UNK, START, END = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def training_captions() -> list[str]:
    """Every one-object caption of the world, and one two-object caption for "and" (covers all caption words)."""
    captions = [shapes.caption((shapes.ShapeObject(colour, shape, size, position),))
                for colour in shapes.COLOURS for shape in shapes.SHAPES for size in shapes.SIZES
                for position in shapes.POSITIONS]
    pair = (shapes.ShapeObject("red", "circle", "small", "top left"),
            shapes.ShapeObject("blue", "square", "large", "bottom right"))
    return captions + [shapes.caption(pair)]


def caption_words() -> list[str]:
    """The sorted set of words captions are made of."""
    return sorted({word for text in training_captions() for word in text.split()})


def build_tokenizer():
    """Trains the word-level `tokenizers.Tokenizer` described in the module doc (deterministic)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK], min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(training_captions(), trainer)
    tokenizer.add_special_tokens([START, END])  # appended: the two largest ids
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", pair=f"{START} $A {END} $B {END}",
        special_tokens=[(START, tokenizer.token_to_id(START)), (END, tokenizer.token_to_id(END))])
    unknown = [w for w in caption_words() if tokenizer.token_to_id(w) is None]
    if unknown:
        raise RuntimeError(f"trained tokenizer lacks caption words {unknown}")
    return tokenizer


def train_tokenizer(out_dir: str | pathlib.Path) -> pathlib.Path:
    """Trains the tokenizer and writes tokenizer.json + tokenizer_config.json into out_dir; returns out_dir."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": START, "eos_token": END, "pad_token": PAD, "unk_token": UNK,
        "model_max_length": MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: --out DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json")
    out = train_tokenizer(parser.parse_args(argv).out)
    print(f"wrote {out / 'tokenizer.json'} ({build_tokenizer().get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
