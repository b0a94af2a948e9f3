"""`ldm-jax`: the installed command line. Subcommands:

    ldm-jax sample   [--prompt TEXT ...] [--checkpoint MODEL] ...        images (ldm_jax.sampling)
                     [--controlnet SRC[:SCALE] --control-image IMG ...]  (steered by ControlNets)
    ldm-jax train    --config configs/X.py --workdir DIR [--config.a.b=v] training (ldm_jax.training.main)
    ldm-jax evaluate COMMAND ...                                          metrics (ldm_jax.evaluate)
    ldm-jax convert  SRC DEST --to ldm|diffusers|compvis [--dtype fp16]   one model store format to another
                     [--lora FILE[:SCALE] ...] [--embedding FILE ...]      (with LoRAs merged, tokens added)
    ldm-jax convert  --controlnet SRC DEST --to diffusers|compvis         a ControlNet (folder <-> original file)

`python -m ldm_jax` is the same command. User errors are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import uuid
from collections.abc import Sequence
from typing import NoReturn

COMMANDS = ("sample", "train", "evaluate", "convert")
PROG = "ldm-jax"


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a ConversionError lists its missing / mis-shaped keys on several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract: a bad flag is one line `PROG: error: MESSAGE` on stderr and
    exit status 2 (argparse's own prints the usage block first). Sub-parsers made by `add_subparsers` are of
    this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (argparse's `float` accepts "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def lora_spec(text: str) -> tuple[str, float]:
    """argparse type for `SRC[:SCALE]` (a --lora file, a --controlnet file or folder) -> (source, scale); scale 1.0
    when absent. A name that exists is taken whole (a colon inside a file or folder name is kept); otherwise the
    text after the last colon must be a finite number."""
    if ":" not in text or pathlib.Path(text).exists():
        return text, 1.0
    path, _, scale = text.rpartition(":")
    try:
        value = finite_float(scale)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: the scale after ':' must be a finite number, got "
                                         f"{scale!r}") from None
    return path, value


def int_in(low: int, high: int | None = None):
    """argparse type factory: an int in [low, high) (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            span = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    return parse


def writable_dir(path: str | os.PathLike, flag: str) -> pathlib.Path:
    """Creates directory `path` (and its parents) if needed and writes (then removes) a probe file in it; returns
    it. Raises ValueError, one line naming `flag` and the path, when it cannot: an existing file in the way, a
    parent that is a file, no permission, a read-only disk (the probe also catches what os.access misses)."""
    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag} {directory} is an existing file, not a folder")
    probe = directory / f".write_test.{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        blocking = next((p for p in directory.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else (error.strerror or type(error).__name__)
        raise ValueError(f"{flag} {directory} cannot be created or written: {why}") from None
    return directory


def convert_main(argv: Sequence[str] | None = None, prog: str = f"{PROG} convert") -> int:
    """`ldm-jax convert SRC DEST --to FORMAT`: load any source through the store, save it as FORMAT."""
    p = ArgumentParser(prog=prog, description="Convert a model between the formats of the model store: "
                                "our model directory (ldm), a diffusers folder, a CompVis single .safetensors file.")
    p.add_argument("source", help="a model directory, a diffusers folder, a CompVis .ckpt/.safetensors, or 'shapes'")
    p.add_argument("dest", help="the directory (ldm, diffusers) or .safetensors file (compvis) to write")
    p.add_argument("--to", required=True, choices=("ldm", "diffusers", "compvis"), help="the format to write")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="stored weight dtype")
    p.add_argument("--config", help="single files: a preset name, configs/*.py or a CompVis yaml (default: inferred)")
    p.add_argument("--tokenizer", help="single files: the local tokenizer directory of a text model")
    p.add_argument("--text-encoder-config", help="a transformers CLIP config.json for an unknown yaml text encoder")
    p.add_argument("--use-ema", action="store_true", help="single files: take the UNet's EMA weights")
    p.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the written weights at SCALE (default 1; repeatable)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="add a textual-inversion embedding's tokens to the written model (repeatable)")
    p.add_argument("--token", action="append", default=[], metavar="NAME",
                   help="the token of the --embedding in the same position (default: the file's own name)")
    p.add_argument("--controlnet", action="store_true",
                   help="SRC is a ControlNet (a diffusers ControlNet folder or an original control_*.pth/.safetensors); "
                        "--to diffusers writes a folder, --to compvis the original control_model.* single file")
    p.add_argument("--base", help="with --controlnet: the base model's config (a preset, configs/*.py, CompVis yaml or "
                                  "model directory): the ControlNet must fit it; a single file takes its heads")
    args = p.parse_args(argv)
    if args.to == "compvis" and pathlib.Path(args.dest).suffix.lower() != ".safetensors":
        p.error(f"--to compvis writes one .safetensors file; name DEST {args.dest} *.safetensors")
    if args.controlnet:
        return _convert_controlnet(p, args, prog)
    if args.base is not None:
        p.error("--base applies to --controlnet conversions")
    for flag, path in [("--lora", path) for path, _ in args.lora] + [("--embedding", e) for e in args.embedding]:
        if not pathlib.Path(path).is_file():
            p.error(f"{flag} {path}: no such file")
    if args.token and len(args.token) != len(args.embedding):
        p.error(f"--token was given {len(args.token)} time(s) for {len(args.embedding)} --embedding file(s); "
                "give one per --embedding or none")
    from ldm_jax import store  # noqa: PLC0415 (JAX starts after the arguments are checked)

    try:
        _check_destination(pathlib.Path(args.dest), args.to)
        print(f"loading {args.source} ({store.detect_format(args.source)})", file=sys.stderr)
        model = store.load_model(args.source, config=args.config, tokenizer=args.tokenizer,
                                 text_encoder_config=args.text_encoder_config, use_ema=args.use_ema)
        if args.lora or args.embedding:
            tokens = args.token or [None] * len(args.embedding)
            print(f"merging {len(args.lora)} LoRA(s), adding {len(args.embedding)} embedding(s)", file=sys.stderr)
            model = store.apply_adapters(model, loras=args.lora, embeddings=list(zip(args.embedding, tokens,
                                                                                      strict=True)))
        print(f"writing {args.to} ({args.dtype}) to {args.dest}", file=sys.stderr)
        out = store.save_model(model, args.dest, format=args.to, dtype=args.dtype)
    except (OSError, ValueError) as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {out.resolve()}")
    return 0


def _convert_controlnet(p: ArgumentParser, args: argparse.Namespace, prog: str) -> int:
    """`convert --controlnet`: a ControlNet through `store.load_controlnet` / `save_controlnet` ("compvis" is the
    original layout's name here, as for whole models)."""
    if args.to == "ldm":
        p.error("--controlnet --to ldm: a ControlNet is written as a diffusers folder (--to diffusers) or an original "
                "single file (--to compvis)")
    given = [flag for flag, value in (("--lora", args.lora), ("--embedding", args.embedding), ("--token", args.token),
                                      ("--config", args.config), ("--tokenizer", args.tokenizer),
                                      ("--text-encoder-config", args.text_encoder_config), ("--use-ema", args.use_ema))
             if value]
    if given:
        p.error(f"{given[0]} applies to whole models, not to --controlnet conversions")
    from ldm_jax import store  # noqa: PLC0415

    try:
        base = store.resolve_config(args.base) if args.base is not None else None
    except (OSError, ValueError) as error:
        print(f"{prog}: error: --base {args.base}: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        _check_destination(pathlib.Path(args.dest), args.to)
        print(f"loading ControlNet {args.source} ({store.detect_controlnet_format(args.source)})", file=sys.stderr)
        controlnet = store.load_controlnet(args.source, base=base)
        print(f"writing {args.to} ({args.dtype}) to {args.dest}", file=sys.stderr)
        out = store.save_controlnet(controlnet, args.dest, format="original" if args.to == "compvis" else "diffusers",
                                    dtype=args.dtype)
    except (OSError, ValueError) as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {out.resolve()}")
    return 0


def _check_destination(dest: pathlib.Path, to: str) -> None:
    """Before anything is loaded: DEST's folder can be written, and DEST is not a file where a directory
    goes (ldm, diffusers) nor a directory where a file goes (compvis)."""
    if to == "compvis" and dest.is_dir():
        raise ValueError(f"DEST {dest} is a directory; --to compvis writes one .safetensors file")
    if to != "compvis" and dest.exists() and not dest.is_dir():
        raise ValueError(f"DEST {dest} is a file; --to {to} writes a directory")
    writable_dir(dest.parent, "DEST's folder")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches `ldm-jax COMMAND ...` to the command's own main; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    prog = f"{PROG} {command}"
    if command == "sample":
        from ldm_jax import sampling  # noqa: PLC0415

        return sampling.main(rest, prog=prog)
    if command == "train":
        from ldm_jax.training import main as training_main  # noqa: PLC0415

        return training_main.main(rest, prog=prog)
    if command == "evaluate":
        from ldm_jax import evaluate  # noqa: PLC0415

        return evaluate.main(rest, prog=prog)
    if command == "convert":
        return convert_main(rest, prog=prog)
    print(f"{PROG}: error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
