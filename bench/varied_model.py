"""The embedded recipe retrained on the varied captioned-shapes world (issue 19, item 3), measured as a
generative model: prompt adherence, distance to the real distribution, and diversity within a prompt.

    .venv/bin/python bench/varied_model.py --model runs/f_ablation/f4/ldm/model [--data-dir runs/tfds]
        [--num 1000] [--picture docs/varied_samples.png] [--out runs/varied_model.json]

1. Samples one image per caption of the first --num validation and --num heldout examples of
   captioned_shapes/res32_varied (`ldm-jax sample`'s defaults: DDIM 50, guidance 7.5, seed 0, image i from
   noise fold_in(0, i)); the varied world's checker scores both (the heldout captions each hold a colour + shape
   pair no training scene has).
2. FSD, precision and recall (k = 3, the shipped 32-pixel shapes classifier) of the validation samples against the
   validation images of the same captions, and of the heldout samples against the heldout images; beside them the
   same figures for fresh renders of those captions (another draw of the world: the floor at this sample size).
3. Diversity: the first --diversity-prompts validation captions drawn --diversity-samples times each; the mean
   pairwise distance between the samples of one caption (pixels: mean |a - b| / 255; features: Euclidean in the
   classifier's space) against the same figure for as many fresh renders of each caption.
4. The picture: --picture-prompts captions, for each a row of --diversity-samples samples (seeds 0, 1, ...: image i
   of `sample_prompts` is noise i) and a row of fresh renders.
Prints a table (text and markdown) and writes every number to --out.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (RENDER_SEED, diversity, format_table, fresh_renders, load_average, markdown_table, picture,
                    sample_prompts)
from f_ablation import read_split

PICTURE_PROMPTS = ("a large red circle at the top left and a large blue square at the bottom right",
                   "a small yellow triangle in the centre",
                   "a large green square at the top right and a small magenta circle at the bottom left",
                   "a small cyan triangle at the top and a large red triangle at the bottom")


def measure(model, args: argparse.Namespace) -> dict:
    """Every number of the module doc for one model."""
    from ldm_jax import evaluate
    from ldm_jax.metrics import shapes_checker

    out = {}
    for offset, split in enumerate(("validation", "heldout")):
        real, captions = read_split(args.data_dir, split, args.num)
        samples = sample_prompts(model, captions)
        renders = fresh_renders(captions, RENDER_SEED + offset)
        for name, images in (("model", samples), ("renders", renders)):
            out[f"{split}/{name}"] = {
                "adherence": shapes_checker.prompt_adherence(images, captions, shapes_checker.VARIED_CHECKER),
                **evaluate.distribution_of(images, real)}
        print(split, json.dumps(out[f"{split}/model"]), flush=True)
    _, captions = read_split(args.data_dir, "validation", args.diversity_prompts)
    repeated = [c for c in captions for _ in range(args.diversity_samples)]
    out["diversity/model"] = diversity(sample_prompts(model, repeated), args.diversity_samples)
    out["diversity/renders"] = diversity(fresh_renders(repeated, RENDER_SEED + 2), args.diversity_samples)
    return out


def table(out: dict) -> tuple[list[str], list[list]]:
    header = ["images", "split", "adherence", "colour", "shape", "size", "position", "FSD", "precision", "recall"]
    rows = []
    for key, r in out.items():
        if key.startswith("diversity"):
            continue
        split, name = key.split("/")
        a = r["adherence"]
        rows.append([name, split, f"{100 * a['accuracy']:.1f}%",
                     *(f"{100 * a[k]:.1f}%" for k in ("colour", "shape", "size", "position")),
                     f"{r['fsd']:.1f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}"])
    return header, rows


def make_picture(model, path: pathlib.Path, samples: int) -> None:
    rows = []
    for index, prompt in enumerate(PICTURE_PROMPTS):
        rows.append((f"model: {prompt[:44]}", sample_prompts(model, [prompt] * samples)))
        rows.append(("  real renders", fresh_renders([prompt] * samples, RENDER_SEED + 10 + index)))
    picture(rows, path, label_width=560)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from ldm_jax import store

    model = store.load_model(args.model)
    print(f"{args.model}: {args.num} validation and heldout captions; {load_average()}", flush=True)
    out = measure(model, args)
    header, rows = table(out)
    print(format_table(header, rows))
    print(markdown_table(header, rows))
    d_model, d_real = out["diversity/model"], out["diversity/renders"]
    print(f"diversity within a prompt ({args.diversity_prompts} prompts x {args.diversity_samples}): pixels "
          f"{d_model['pixel']:.4f} (real renders {d_real['pixel']:.4f}), features {d_model['feature']:.2f} "
          f"(real {d_real['feature']:.2f})")
    if args.picture:
        make_picture(model, pathlib.Path(args.picture), args.diversity_samples)
        print(f"wrote {args.picture}")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"model": str(args.model), "num": args.num, **out,
                                                  "load": load_average()}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model directory (or a shipped model's name)")
    p.add_argument("--data-dir", default="runs/tfds")
    p.add_argument("--num", type=int, default=1000, help="validation and heldout captions each")
    p.add_argument("--diversity-prompts", type=int, default=16)
    p.add_argument("--diversity-samples", type=int, default=8)
    p.add_argument("--picture", default="docs/varied_samples.png", help="'' for none")
    p.add_argument("--out", default="runs/varied_model.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
