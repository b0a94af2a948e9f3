"""Evaluation from the command line: prompt adherence, reconstruction quality, FID and CLIP score.

    ldm-jax evaluate split --data_dir D --split validation [--num N] --outdir DIR
    ldm-jax evaluate autoencode [--checkpoint M|AE_DIR] --images DIR --outdir DIR2
    ldm-jax evaluate adherence --images DIR [--per-image] [--world exact|varied]
    ldm-jax evaluate reconstruction --images DIR --reconstructions DIR [--lpips-vgg vgg16.pth]
    ldm-jax evaluate fid --stats A.npz B.npz
    ldm-jax evaluate fid --images DIR_A DIR_B --inception pt_inception.pth [--batch-size N]
    ldm-jax evaluate clip-score --images DIR --clip CLIP_DIR [--per-image] [--batch-size N]
    ldm-jax evaluate sensitivity [--checkpoint M] --images DIR [--timesteps 50,300,600,850,950]
    ldm-jax evaluate distribution --images DIR --reference DIR2 [--resolution R] [--k 3] [--batch-size N]

split: writes a prepared captioned-shapes split as captioned PNGs (text chunk "prompt") plus DIR/prompts.txt,
one caption per line in file order (`sample.py --prompts-file DIR/prompts.txt` samples them in that order).
autoencode: the first-stage reconstructions (posterior mode; VQ: quantised) of every PNG in DIR, same names, by
an autoencoder directory (what the autoencoder stage exports) or a model's first stage (`sample.py`'s --checkpoint
kinds; the embedded model when omitted).
adherence: every *.png in DIR is checked against its caption (`ldm_jax.metrics.shapes_checker`); the caption
is the PNG text chunk "prompt" or a sidecar DIR/<name>.txt (when both exist they must agree); --world varied reads
images of the varied world (`shapes.VARIED`, `shapes_checker.VARIED_CHECKER`), exact (the default) the exact one.
reconstruction: PSNR and SSIM (and LPIPS with --lpips-vgg) between same-named PNGs of the two directories.
fid: the Frechet distance between two pytorch-fid --save-stats files or feature files (`metrics.fid`), or standard
FID between the PNGs of two directories (pytorch-fid's Inception-v3 pool3 features, images resized to 299 x 299, as
`python -m pytorch_fid DIR_A DIR_B`) with pytorch-fid's weights file pt_inception-2015-12-05-6726825d.pth, which
you download yourself (`metrics.fid.INCEPTION_URL`).
clip-score: the CLIP score (torchmetrics' 100 * max(cos, 0), `metrics.clip_score`) of every captioned PNG in DIR
against its caption (found as for adherence), with a CLIP model from CLIP_DIR, a local transformers CLIPModel
folder (config.json, model.safetensors or pytorch_model.bin, vocab.json + merges.txt or tokenizer.json, optional
preprocessor_config.json; e.g. a copy of openai/clip-vit-large-patch14); prints the mean and standard deviation.
sensitivity: the denoising loss of a model on the captioned PNGs of DIR (e.g. a split written by `split`) at fixed
timesteps and noise, with the true captions, with each attribute made wrong, and with the empty prompt
(`metrics.prompt_sensitivity`): which words the model reads.
distribution: how well the PNGs of DIR (generated) match the distribution of the captioned-shapes PNGs of DIR2
(reference, e.g. a split written by `split`), in the feature space of the shipped shapes classifier for their size
(`metrics.shapes_features`, 32 or 64 pixels): FSD (Frechet Shapes Distance, lower is better) and improved precision
and recall (`metrics.precision_recall`, k-NN balls, k = 3). Captions are not read.
Each command prints a table and returns its numbers from the library function of the same name.
The commands that run JAX programs (autoencode, reconstruction, fid, clip-score, sensitivity, distribution) use the
persistent compilation cache as `ldm-jax sample` does (`ldm_jax.compile_cache`; quietly: stderr gets a line only when
its directory cannot be written); `--no-compile-cache` turns it off.
"""
from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ldm_jax import compile_cache, ldm, pipeline, store
from ldm_jax.cli import ArgumentParser, int_in, one_line, writable_dir
from ldm_jax.data import readers
from ldm_jax.images import open_image, to_rgb
from ldm_jax.sampling import GRID_FILE
from ldm_jax.metrics import fid, image_quality, precision_recall, prompt_sensitivity, shapes_checker

CAPTION_KEY = "prompt"
SHAPES_DATASET = "captioned_shapes/res32"


def read_split(data_dir: str | pathlib.Path, split: str, *, num: int | None = None,
               name: str = SHAPES_DATASET) -> tuple[np.ndarray, list[str]]:
    """The first `num` (all when None) examples of a prepared TFDS captioned-shapes split: (uint8 images
    (N, R, R, 3), their captions)."""
    source = readers.TfdsSource(name, data_dir=data_dir, split=split)
    count = len(source) if num is None else min(num, len(source))
    examples = [source[index] for index in range(count)]
    return np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]


def write_split(data_dir: str | pathlib.Path, split: str, outdir: str | pathlib.Path, *, num: int | None = None,
                name: str = SHAPES_DATASET) -> int:
    """Writes the first `num` (all when None) examples of a prepared TFDS split (`read_split`) as OUTDIR/%05d.png
    with their captions as the "prompt" text chunk, and OUTDIR/prompts.txt; returns the number written."""
    from PIL import Image, PngImagePlugin  # noqa: PLC0415

    images, captions = read_split(data_dir, split, num=num, name=name)
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for index, (image, caption) in enumerate(zip(images, captions)):
        info = PngImagePlugin.PngInfo()
        info.add_text(CAPTION_KEY, caption)
        Image.fromarray(image).save(outdir / f"{index:05d}.png", pnginfo=info)
    (outdir / "prompts.txt").write_text("\n".join(captions) + "\n")
    return len(captions)


def autoencode(first_stage: tuple[Any, Any], images_dir: str | pathlib.Path, outdir: str | pathlib.Path, *,
               attention: str = "xla", batch_size: int = 64) -> int:
    """Writes the first-stage reconstruction (`reconstruct`) of every PNG of `images_dir` (uint8, same names) into
    `outdir`. first_stage: (AutoencoderConfig, params) as `store.load_first_stage` returns them. Images must share
    one size, a multiple of the downsampling factor. Returns the number written."""
    from PIL import Image  # noqa: PLC0415

    files = png_files(images_dir)
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = reconstruct(first_stage, np.stack([read_png(path)[0] for path in files]), attention=attention,
                      batch_size=batch_size)
    for path, image in zip(files, out):
        Image.fromarray(image).save(outdir / path.name)
    return len(files)


def reconstruct(first_stage: tuple[Any, Any], images: np.ndarray, *, attention: str = "xla",
                batch_size: int = 64) -> np.ndarray:
    """Reconstructions uint8 (N, H, W, 3) of uint8 images (N, H, W, 3) (H, W multiples of the downsampling factor)
    by a first stage (AutoencoderConfig, params) (`store.load_first_stage`: an autoencoder directory or any whole
    model's): KL decodes the posterior mode, VQ quantises. One program for every chunk of `batch_size` (the last
    one padded)."""
    import jax  # noqa: PLC0415

    from ldm_jax.models.autoencoder import build_autoencoder  # noqa: PLC0415
    from ldm_jax.training import autoencoder_step  # noqa: PLC0415

    config, params = first_stage
    module = build_autoencoder(config, attention=attention)
    autoencode_batch = jax.jit(lambda p, x: autoencoder_step.reconstruct(module, p, x)[0])
    params = jax.device_put(params)  # an argument, not baked-in constants
    chunks = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        chunks.append(pipeline.to_uint8(autoencode_batch(params, padded))[:len(chunk)])
    return np.concatenate(chunks)


def read_png(path: pathlib.Path) -> tuple[np.ndarray, str | None]:
    """(uint8 (H, W, 3) RGB image, its "prompt" text chunk or None) of a PNG file, decoded by
    `images.open_image` (a file PIL cannot decode is an ImageFileError, a ValueError naming it). Alpha is dropped
    as pytorch-fid's convert("RGB") does, so FID between directories matches `python -m pytorch_fid`."""
    with open_image(path) as image:
        if image.format != "PNG":
            raise ValueError(f"{path}: expected a PNG file, got {image.format}")
        text = getattr(image, "text", {}).get(CAPTION_KEY)
        return to_rgb(image, alpha="drop"), text


def png_files(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The directory's *.png files but sample.py's grid.png, sorted by name; an error when the directory is
    missing or has none."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    files = sorted(p for p in directory.glob("*.png") if p.name != GRID_FILE)
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


WORLDS = {"exact": shapes_checker.CheckerConfig(), "varied": shapes_checker.VARIED_CHECKER}


def adherence(images_dir: str | pathlib.Path, world: str = "exact"
              ) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Checks every captioned PNG of a directory with the checker of `world` ("exact" or "varied", `WORLDS`).
    Returns (`summarise` dict, per-image (name, verdict, caption))."""
    if world not in WORLDS:
        raise ValueError(f"adherence: world {world!r}; expected one of {list(WORLDS)}")
    results, rows = [], []
    for path in png_files(images_dir):
        image, caption = read_captioned(path)
        try:
            result = shapes_checker.check_image(image, caption, WORLDS[world])
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


def fid_from_images(images_a: str | pathlib.Path, images_b: str | pathlib.Path, weights: str | pathlib.Path, *,
                    batch_size: int = 50) -> float:
    """Standard FID between the PNGs of two directories with pytorch-fid's Inception weights file (see
    `ldm_jax.metrics.fid.inception_feature_fn`). Images are read `batch_size` at a time (at most the number of
    files, as pytorch-fid does); a batch holds images of one size (a change of size starts a new batch) and short
    batches are padded by repeating their last image (outputs dropped), so one program serves every batch of one
    image size."""
    files = [png_files(images_a), png_files(images_b)]
    batch_size = min(batch_size, max(len(f) for f in files))
    feature_fn = fid.inception_feature_fn(weights)

    def batches(paths):
        chunk: list[np.ndarray] = []
        for path in paths:
            image = read_png(path)[0]
            if chunk and (len(chunk) == batch_size or image.shape != chunk[0].shape):
                yield chunk
                chunk = []
            chunk.append(image)
        yield chunk

    def features(chunk):
        padded = np.stack(chunk + [chunk[-1]] * (batch_size - len(chunk)))
        return feature_fn(padded)[:len(chunk)]

    return fid.fid_from_features(*(np.concatenate([features(chunk) for chunk in batches(paths)])
                                   for paths in files))


def clip_scores(images_dir: str | pathlib.Path, clip_dir: str | pathlib.Path, *, batch_size: int = 32
                ) -> tuple[dict[str, float], list[tuple[str, float, str]]]:
    """CLIP score of every captioned PNG of a directory against its caption, with the CLIP model of `clip_dir`
    (`metrics.clip_score.clip_score`). Images are read and scored `batch_size` at a time.

    Returns ({"num_images", "clip_score" (mean), "std" (population)}, per-image (name, score in [0, 100], caption)).
    """
    from ldm_jax.convert.transformers_clip import load_clip_model  # noqa: PLC0415 (imports transformers)
    from ldm_jax.metrics import clip_score  # noqa: PLC0415

    files = png_files(images_dir)
    model = load_clip_model(clip_dir)
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images, captions = zip(*(read_captioned(path) for path in chunk))
        scores = clip_score.clip_score(list(images), list(captions), model, batch_size=batch_size)
        rows += [(path.name, float(score), caption) for path, score, caption in zip(chunk, scores, captions)]
    values = np.array([row[1] for row in rows])
    return {"num_images": len(rows), "clip_score": float(values.mean()), "std": float(values.std())}, rows


def sensitivity(model: ldm.LoadedModel, images_dir: str | pathlib.Path, timesteps: Sequence[int], *,
                seed: int = 0) -> dict[str, list[float]]:
    """`prompt_sensitivity.prompt_sensitivity` of the captioned PNGs of a directory (one batch)."""
    pairs = [read_captioned(path) for path in png_files(images_dir)]
    images = np.stack([image for image, _ in pairs]).astype(np.float32) / 127.5 - 1.0
    return prompt_sensitivity.prompt_sensitivity(model, images, [caption for _, caption in pairs], timesteps,
                                                 seed=seed)


def distribution(images_dir: str | pathlib.Path, reference_dir: str | pathlib.Path, *, resolution: int | None = None,
                 k: int = precision_recall.DEFAULT_K, batch_size: int = 250) -> dict[str, float]:
    """FSD, precision and recall of the PNGs of `images_dir` (generated) against those of `reference_dir` (real), in
    the shapes classifier's feature space (`metrics.shapes_features`, `metrics.precision_recall`).

    All images of both directories must be R x R with R = `resolution` (when given) and shipped weights for R;
    each directory needs more than k images. Returns {"num_images", "num_reference", "fsd" (>= 0), "precision",
    "recall" (in [0, 1])}. Raises FileNotFoundError / ValueError naming the directory and what is wrong.
    """
    directories = (images_dir, reference_dir)
    files = [png_files(directory) for directory in directories]  # both exist and hold PNGs before anything is read
    sets = []
    for directory, paths in zip(directories, files):
        images = [read_png(path)[0] for path in paths]
        sizes = sorted({image.shape[:2] for image in images})
        if len(sizes) > 1:
            raise ValueError(f"{directory}: images of several sizes {sizes[:4]}; the distribution metrics need one")
        side = sizes[0][0]
        if sizes[0][0] != sizes[0][1] or (resolution is not None and side != resolution):
            expected = f"{resolution}x{resolution}" if resolution is not None else "square"
            raise ValueError(f"{directory}: images are {sizes[0][0]}x{sizes[0][1]}, expected {expected}")
        if len(images) <= k:
            raise ValueError(f"{directory}: {len(images)} image(s); precision and recall with k = {k} need more than k")
        sets.append(np.stack(images))
    if sets[0].shape[1] != sets[1].shape[1]:
        raise ValueError(f"{images_dir} holds {sets[0].shape[1]}-pixel images, {reference_dir} "
                         f"{sets[1].shape[1]}-pixel ones; they must match")
    return distribution_of(sets[0], sets[1], k=k, batch_size=batch_size)


def distribution_of(generated: np.ndarray, real: np.ndarray, *, k: int = precision_recall.DEFAULT_K,
                    batch_size: int = 250) -> dict[str, float]:
    """`distribution` of two uint8 image arrays (N, R, R, 3) and (M, R, R, 3), generated and real (N, M > k):
    {"num_images", "num_reference", "fsd", "precision", "recall"}."""
    from ldm_jax.metrics import shapes_features  # noqa: PLC0415 (imports flax and the classifier only when asked)

    generated, real = (shapes_features.features(images, batch_size=batch_size) for images in (generated, real))
    precision, recall = precision_recall.precision_recall(real, generated, k)
    return {"num_images": len(generated), "num_reference": len(real), "fsd": fid.fid_from_features(generated, real),
            "precision": precision, "recall": recall}


# the commands that run JAX programs
COMPILING = ("autoencode", "reconstruction", "fid", "clip-score", "sensitivity", "distribution")


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned plain-text table; floats with 4 decimals."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: Sequence[str] | None = None, prog: str = "ldm-jax evaluate") -> int:
    """Command-line entry (see the module doc); returns the exit status (2 with one line on a bad input)."""
    try:
        return _main(argv, prog)
    except (OSError, ValueError) as error:  # the store's and the converters' errors name the file and key
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2


def build_parser(prog: str = "ldm-jax evaluate") -> ArgumentParser:
    """The evaluate command's parser: one sub-parser per metric command."""
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("split", help="write a prepared captioned-shapes split as captioned PNGs")
    p.add_argument("--data_dir", required=True, help="where the TFDS dataset was prepared")
    p.add_argument("--split", default="validation", help="train, validation or heldout")
    p.add_argument("--name", default=SHAPES_DATASET, help="TFDS dataset name")
    p.add_argument("--num", type=int_in(1), help="only the first NUM examples")
    p.add_argument("--outdir", required=True)
    p = commands.add_parser("autoencode", help="first-stage reconstructions of a PNG directory")
    p.add_argument("--checkpoint", help="an autoencoder directory or a model (sample.py's --checkpoint kinds; its "
                   "first stage); the embedded model if omitted")
    p.add_argument("--attention", help="attention implementation: xla, jax_nn or chunked")
    p.add_argument("--images", required=True)
    p.add_argument("--outdir", required=True)
    p = commands.add_parser("adherence", help="check captioned-shapes PNGs against their captions")
    p.add_argument("--images", required=True)
    p.add_argument("--per-image", action="store_true", help="also list every image's verdict")
    p.add_argument("--world", choices=sorted(WORLDS), default="exact",
                   help="the captioned-shapes world the images show (default: exact)")
    p = commands.add_parser("reconstruction", help="PSNR / SSIM / LPIPS between two PNG directories")
    p.add_argument("--images", required=True)
    p.add_argument("--reconstructions", required=True)
    p.add_argument("--lpips-vgg", help="torchvision vgg16-397923af.pth; enables LPIPS")
    p.add_argument("--lpips-heads", help="lpips weights/v0.1/vgg.pth (default: the installed lpips package's)")
    p = commands.add_parser("fid", help="FID between two statistics/feature files or two PNG directories")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--stats", nargs=2, metavar=("A", "B"), help="pytorch-fid --save-stats or feature files")
    source.add_argument("--images", nargs=2, metavar=("DIR_A", "DIR_B"), help="PNG directories (needs --inception)")
    p.add_argument("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (with --images)")
    p.add_argument("--batch-size", type=int_in(1), default=50, help="images per forward pass (with --images)")
    p = commands.add_parser("clip-score", help="CLIP score of captioned PNGs against their captions")
    p.add_argument("--images", required=True)
    p.add_argument("--clip", required=True, help="a local transformers CLIPModel folder (see the module doc)")
    p.add_argument("--per-image", action="store_true", help="also list every image's score")
    p.add_argument("--batch-size", type=int_in(1), default=32, help="images per forward pass")
    p = commands.add_parser("sensitivity", help="denoising loss with true, corrupted and empty captions")
    p.add_argument("--checkpoint", help="a model (sample.py's --checkpoint kinds); the embedded model if omitted")
    p.add_argument("--attention", help="attention implementation: xla, jax_nn or chunked")
    p.add_argument("--images", required=True, help="captioned PNGs (e.g. from `split`)")
    p.add_argument("--timesteps", default="50,300,600,850,950", help="comma-separated training timesteps")
    p.add_argument("--seed", type=int_in(0, 2**32), default=0, help="draws the noise and the corruptions")
    p = commands.add_parser("distribution", help="FSD, precision and recall of shapes PNGs against a reference set")
    p.add_argument("--images", required=True, help="generated PNGs")
    p.add_argument("--reference", required=True, help="real captioned-shapes PNGs (e.g. from `split`)")
    p.add_argument("--resolution", type=int_in(1), help="expected image side (default: the images' own)")
    p.add_argument("--k", type=int_in(1), default=precision_recall.DEFAULT_K, help="k of the k-NN balls")
    p.add_argument("--batch-size", type=int_in(1), default=250, help="images per forward pass")
    for name in COMPILING:
        commands.choices[name].add_argument(
            "--no-compile-cache", dest="compile_cache", action="store_false",
            help="do not read or write the persistent compilation cache (see ldm-jax sample --help)")
    return parser


def _main(argv: Sequence[str] | None, prog: str) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "reconstruction" and args.lpips_heads and not args.lpips_vgg:
        parser.error("--lpips-heads needs --lpips-vgg (LPIPS needs both the VGG16 trunk and the heads)")
    if args.command == "fid" and args.images and not args.inception:
        parser.error("--images needs --inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    if args.command == "fid" and args.stats and args.inception:
        parser.error("--inception applies to --images, not to --stats")
    if getattr(args, "outdir", None):
        writable_dir(args.outdir, "--outdir")
    if args.command == "sensitivity":
        try:
            timesteps = [int(t) for t in args.timesteps.split(",")]
        except ValueError:
            parser.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if args.command in COMPILING:
        compile_cache.setup(args.compile_cache, switch="--no-compile-cache")

    if args.command == "split":
        count = write_split(args.data_dir, args.split, args.outdir, num=args.num, name=args.name)
        print(f"wrote {count} captioned PNG(s) and prompts.txt to {pathlib.Path(args.outdir).resolve()}")
    elif args.command == "autoencode":
        count = autoencode(store.load_first_stage(args.checkpoint), args.images, args.outdir,
                           attention=args.attention or "xla")
        print(f"wrote {count} reconstruction(s) to {pathlib.Path(args.outdir).resolve()}")
    elif args.command == "adherence":
        summary, rows = adherence(args.images, args.world)
        if args.per_image:
            print(format_table(rows, ("image", "verdict", "caption")) + "\n")
        print(format_table(list(summary.items()), ("metric", "value")))
    elif args.command == "reconstruction":
        lpips_fn = None
        if args.lpips_vgg:
            lpips_fn = image_quality.lpips_metric(args.lpips_vgg, args.lpips_heads)
        print(format_table(list(reconstruction(args.images, args.reconstructions, lpips_fn).items()),
                           ("metric", "value")))
    elif args.command == "sensitivity":
        table = sensitivity(store.load_model(args.checkpoint, attention=args.attention), args.images, timesteps,
                            seed=args.seed)
        rows = [(t, *(values[i] for values in table.values())) for i, t in enumerate(timesteps)]
        print(format_table(rows, ("t", *table)))
    elif args.command == "clip-score":
        summary, rows = clip_scores(args.images, args.clip, batch_size=args.batch_size)
        if args.per_image:
            print(format_table(rows, ("image", "clip_score", "caption")) + "\n")
        print(format_table(list(summary.items()), ("metric", "value")))
    elif args.command == "distribution":
        summary = distribution(args.images, args.reference, resolution=args.resolution, k=args.k,
                               batch_size=args.batch_size)
        print(format_table(list(summary.items()), ("metric", "value")))
    else:
        value = fid_from_files(*args.stats) if args.stats else fid_from_images(*args.images, args.inception,
                                                                                 batch_size=args.batch_size)
        print(format_table([("fid", value)], ("metric", "value")))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m ldm_jax.evaluate"))
