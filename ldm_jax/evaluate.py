"""Evaluation from the command line: prompt adherence, reconstruction quality and FID.

    python -m ldm_jax.evaluate adherence --images DIR [--per-image]
    python -m ldm_jax.evaluate reconstruction --images DIR --reconstructions DIR [--lpips-vgg vgg16.pth]
    python -m ldm_jax.evaluate fid --stats A.npz B.npz

adherence: every *.png in DIR is checked against its caption (`ldm_jax.metrics.shapes_checker`); the caption
is the PNG text chunk "prompt" or a sidecar DIR/<name>.txt (when both exist they must agree).
reconstruction: PSNR and SSIM (and LPIPS with --lpips-vgg) between same-named PNGs of the two directories.
fid: the Frechet distance between two pytorch-fid --save-stats files or feature files (`metrics.fid`).
Each command prints a table and returns its numbers from the library function of the same name.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence

import numpy as np

from ldm_jax.metrics import fid, image_quality, shapes_checker

CAPTION_KEY = "prompt"


def read_png(path: pathlib.Path) -> tuple[np.ndarray, str | None]:
    """(uint8 (H, W, 3) RGB image, its "prompt" text chunk or None) of a PNG file."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as image:
        if image.format != "PNG":
            raise ValueError(f"{path}: expected a PNG file, got {image.format}")
        text = getattr(image, "text", {}).get(CAPTION_KEY)
        return np.asarray(image.convert("RGB")), text


def png_files(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The directory's *.png files, sorted by name; an error when the directory is missing or has none."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    files = sorted(directory.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"image directory {directory} holds no *.png files")
    return files


def read_captioned(path: pathlib.Path) -> tuple[np.ndarray, str]:
    """An image and its caption (PNG "prompt" text or sidecar .txt, which must agree when both exist)."""
    image, text = read_png(path)
    sidecar = path.with_suffix(".txt")
    side_text = sidecar.read_text().strip() if sidecar.is_file() else None
    if text is not None and side_text is not None and text.strip() != side_text:
        raise ValueError(f"{path}: PNG '{CAPTION_KEY}' text {text!r} differs from {sidecar.name} {side_text!r}")
    caption = text if text is not None else side_text
    if caption is None:
        raise ValueError(f"{path}: no caption; expected a PNG text chunk '{CAPTION_KEY}' or a sidecar {sidecar.name}")
    return image, caption.strip()


def adherence(images_dir: str | pathlib.Path) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Checks every captioned PNG of a directory. Returns (`summarise` dict, per-image (name, verdict, caption))."""
    results, rows = [], []
    for path in png_files(images_dir):
        image, caption = read_captioned(path)
        try:
            result = shapes_checker.check_image(image, caption)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        results.append(result)
        rows.append((path.name, _verdict(result), caption))
    return shapes_checker.summarise(results), rows


def _verdict(result: shapes_checker.CheckResult) -> str:
    if result.adheres:
        return "ok"
    problems = []
    for check in result.objects:
        wrong = [name for name in shapes_checker.ATTRIBUTES if not getattr(check, name)]
        if wrong:
            problems.append(f"{check.expected.colour} {check.expected.shape}: wrong {'/'.join(wrong)}")
    problems += [f"extra {d.colour} {d.shape or 'blob'} at {d.position}" for d in result.extras]
    return "; ".join(problems)


def reconstruction(images_dir: str | pathlib.Path, reconstructions_dir: str | pathlib.Path,
                   lpips_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (and LPIPS when lpips_fn is given) over same-named PNG pairs of two directories.

    PSNR averages finite values; identical pairs (infinite PSNR) are counted in "identical".
    """
    originals = png_files(images_dir)
    others = {p.name: p for p in png_files(reconstructions_dir)}
    missing = [p.name for p in originals if p.name not in others]
    if missing:
        raise FileNotFoundError(f"{reconstructions_dir} lacks reconstructions of {missing[:10]}"
                                + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    psnrs, ssims, distances = [], [], []
    for path in originals:
        x, y = read_png(path)[0], read_png(others[path.name])[0]
        if x.shape != y.shape:
            raise ValueError(f"{path.name}: image {x.shape} and reconstruction {y.shape} differ in shape")
        psnrs.append(image_quality.psnr(x, y))
        ssims.append(image_quality.ssim(x, y))
        if lpips_fn is not None:
            distances.append(float(lpips_fn(x[None], y[None])[0]))
    psnrs = np.array(psnrs)
    finite = psnrs[np.isfinite(psnrs)]
    out = {"num_images": len(originals), "psnr": float(finite.mean()) if finite.size else float("inf"),
           "identical": int((~np.isfinite(psnrs)).sum()), "ssim": float(np.mean(ssims))}
    if lpips_fn is not None:
        out["lpips"] = float(np.mean(distances))
    return out


def fid_from_files(stats_a: str | pathlib.Path, stats_b: str | pathlib.Path) -> float:
    """FID between two statistics/feature files (see `ldm_jax.metrics.fid.load_statistics`)."""
    return fid.frechet_distance(*fid.load_statistics(stats_a), *fid.load_statistics(stats_b))


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned plain-text table; floats with 4 decimals."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (see the module doc); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.evaluate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("adherence", help="check captioned-shapes PNGs against their captions")
    p.add_argument("--images", required=True)
    p.add_argument("--per-image", action="store_true", help="also list every image's verdict")
    p = commands.add_parser("reconstruction", help="PSNR / SSIM / LPIPS between two PNG directories")
    p.add_argument("--images", required=True)
    p.add_argument("--reconstructions", required=True)
    p.add_argument("--lpips-vgg", help="torchvision vgg16-397923af.pth; enables LPIPS")
    p.add_argument("--lpips-heads", help="lpips weights/v0.1/vgg.pth (default: the installed lpips package's)")
    p = commands.add_parser("fid", help="FID between two statistics/feature files")
    p.add_argument("--stats", nargs=2, required=True, metavar=("A", "B"))
    args = parser.parse_args(argv)
    if args.command == "reconstruction" and args.lpips_heads and not args.lpips_vgg:
        parser.error("--lpips-heads needs --lpips-vgg (LPIPS needs both the VGG16 trunk and the heads)")

    if args.command == "adherence":
        summary, rows = adherence(args.images)
        if args.per_image:
            print(format_table(rows, ("image", "verdict", "caption")) + "\n")
        print(format_table(list(summary.items()), ("metric", "value")))
    elif args.command == "reconstruction":
        lpips_fn = None
        if args.lpips_vgg:
            lpips_fn = image_quality.lpips_metric(args.lpips_vgg, args.lpips_heads)
        print(format_table(list(reconstruction(args.images, args.reconstructions, lpips_fn).items()),
                           ("metric", "value")))
    else:
        print(format_table([("fid", fid_from_files(*args.stats))], ("metric", "value")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
