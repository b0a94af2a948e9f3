"""Teaching the embedded shapes model a colour it has never seen, from a handful of rendered images: textual
inversion, LoRA and DreamBooth (with and without prior preservation), measured side by side.

    .venv/bin/python bench/adapt_shapes.py [--out runs/adapt_shapes] [--recipes ti,lora,dreambooth,dreambooth_no_prior]
        [--old-prompts runs/eval/validation/prompts.txt] [--num-prompts 64] [--picture docs/adapt_shapes.png]

The concept: "white" (`shapes.NEW_COLOURS`), the one corner of the RGB cube the captioned-shapes world leaves
unused. The embedded model's tokenizer has no word for it (it reads <|unk|>) and its UNet never drew it; its frozen
autoencoder reproduces white scenes well enough for the checker to read every one (`--ceiling` measures it), so
whatever a recipe misses is the recipe's, not the decoder's.

1. Data: OUT/instance/, `--num-instance` rendered scenes of 1-3 objects, one of them white (`shapes.
   sample_new_colour_scene`, seed 0), as NNNNN.png + NNNNN.txt captions ("a large white circle at the top left
   and ..."): the image folder every recipe's data pipeline reads (`readers.ImageFolderSource`). Textual inversion
   learns the token "white" (started from "yellow"); LoRA reads the word as <|unk|>. DreamBooth trains on the
   same captioned images (`train.dreambooth.instance_captions`) with "white" (<|unk|> to the tokenizer, as for
   LoRA) as its identifier and "yellow" (textual inversion's init word) as its class word: each class prompt is
   an instance caption with "white" replaced by "yellow", so prior preservation keeps the same layouts drawn in a
   colour the model knows (the config's 64 class images, made round-robin for the 12 class captions).
2. Prompts: `--num-prompts` new-concept prompts (seed 1, none equal to a training caption: other colours, shapes,
   sizes and cells around the white object) and the first `--num-prompts` lines of `--old-prompts` (the
   validation prompts of the README's adherence table). "taught": the instance captions every recipe trained
   on, to tell learning from generalising.
3. Before: the embedded model samples every set (DDIM 50 steps, guidance 7.5, seed 0: `ldm-jax sample`'s
   defaults, image i from noise `fold_in(seed, i)`); the checker scores them (`shapes_checker.NEW_COLOUR_CHECKER`:
   the world's colours and white, so a white object where another colour was asked is wrong).
4. Each recipe trains through the real entry point, `python -m ldm_jax train --config configs/<recipe>.py`
   (the configs' own steps and learning rates), in its own process: wall time, CPU time (user + system, all
   threads: less sensitive than wall time to other work on the machine) and peak RSS (`os.wait4`'s rusage of
   that process, started by `common.train_in_subprocess`'s small launcher so that this process's RSS is not
   counted) are its own, JAX start and compilation included. DreamBooth generates its class images inside its run
   (their cost is in its wall time). An existing OUT/<recipe> is refused (the run would resume instead).
5. After: the result through the model store (the LoRA file merged at scale 1, the embedding file added as a
   token, the fine-tuned model directory), the same prompts and seeds, the same checker.

Output: one table (recipe, trained parameters, steps, wall time, peak RSS, adherence on the taught, new-concept and
old prompts, and the fraction of stated white objects drawn white), OUT/results.json, and a picture
(`--picture`): the prompts' renders, then one row per model (before, each recipe), the same 8 new-concept and 4
old prompts in each, shown 4x enlarged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (UsageError, format_table, load_average, markdown_table, picture, sample_prompts,
                    train_in_subprocess, trained_steps)

NEW_COLOUR = "white"
TI_INIT_WORD = "yellow"  # also DreamBooth's class word: its class captions draw the instance layouts in yellow
INSTANCE_SEED, PROMPT_SEED = 0, 1
PICTURE_NEW, PICTURE_OLD = 8, 4


# ---------------------------------------------------------------------------------------------------- data


def instance_scenes(num: int, seed: int = INSTANCE_SEED) -> list[tuple]:
    """`num` scenes with distinct captions, each with one white object (`shapes.sample_new_colour_scene`)."""
    from ldm_jax.data import shapes

    rng = np.random.default_rng(seed)
    scenes: dict[str, tuple] = {}
    while len(scenes) < num:
        scene = shapes.sample_new_colour_scene(rng, NEW_COLOUR)
        scenes.setdefault(shapes.caption(scene), scene)
    return list(scenes.values())


def write_image_folder(directory: pathlib.Path, scenes: Sequence[tuple], resolution: int = 32) -> list[str]:
    """Writes each scene as NNNNN.png (its render) + NNNNN.txt (its caption); returns the captions."""
    from PIL import Image

    from ldm_jax.data import shapes

    directory.mkdir(parents=True, exist_ok=True)
    captions = []
    for index, scene in enumerate(scenes):
        Image.fromarray(shapes.render(scene, resolution)).save(directory / f"{index:05d}.png")
        captions.append(shapes.caption(scene))
        (directory / f"{index:05d}.txt").write_text(captions[-1] + "\n", encoding="utf-8")
    return captions


def new_concept_prompts(num: int, exclude: Sequence[str], seed: int = PROMPT_SEED) -> list[str]:
    """`num` distinct captions of scenes with one white object, none of them in `exclude`."""
    from ldm_jax.data import shapes

    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    while len(prompts) < num:
        text = shapes.caption(shapes.sample_new_colour_scene(rng, NEW_COLOUR))
        if text not in exclude and text not in prompts:
            prompts.append(text)
    return prompts


def old_prompts(path: pathlib.Path, num: int) -> list[str]:
    """The first `num` lines of a prompts file (the validation prompts of the README's adherence table)."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist; write the validation prompts first (README, 'The embedded model'):"
                         " python -m ldm_jax.data.captioned_shapes --data_dir runs/tfds --resolution 32 && ldm-jax "
                         "evaluate split --data_dir runs/tfds --split validation --num 256 --outdir runs/eval/validation")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < num:
        raise UsageError(f"{path} holds {len(lines)} prompts; --num-prompts {num} asks for more")
    return lines[:num]


# ------------------------------------------------------------------------------------------ sample and score


def score(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """The checker's accuracies (`shapes_checker.prompt_adherence` reading the world's colours and white), plus
    "new_colour": the fraction of stated white objects whose colour is right."""
    from ldm_jax.metrics import shapes_checker

    config = shapes_checker.NEW_COLOUR_CHECKER
    results = [shapes_checker.check_image(image, text, config) for image, text in zip(images, prompts, strict=True)]
    new = [o.colour for r in results for o in r.objects if o.expected.colour == NEW_COLOUR]
    return {**shapes_checker.summarise(results), "new_colour": float(np.mean(new)) if new else float("nan")}


def ceiling(model, prompts: Sequence[str]) -> dict[str, float]:
    """The checker's scores of the frozen autoencoder's reconstructions of the prompts' renders: what a recipe
    that leaves the autoencoder alone can reach at best."""
    import jax

    from ldm_jax import ldm, pipeline
    from ldm_jax.data import shapes

    resolution = model.config.first_stage.resolution
    renders = np.stack([shapes.render(shapes.parse_caption(p), resolution) for p in prompts])

    @jax.jit
    def reconstruct(params, x):
        return ldm.decode_first_stage(model.config, params, ldm.encode_first_stage(model.config, params, x))

    out = reconstruct({"first_stage": model.params["first_stage"]}, renders.astype(np.float32) / 127.5 - 1.0)
    return score(pipeline.to_uint8(np.asarray(out)), prompts)


# -------------------------------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training run: its config file and overrides, how to load its result, and its trained parameter count.

    load(base, workdir) -> the adapted LoadedModel; trained(base, workdir) -> the number of trained parameters.
    """

    name: str
    label: str
    config: str
    overrides: Callable[[pathlib.Path], list[str]]  # OUT -> --config.x=y
    load: Callable[[Any, pathlib.Path], Any]
    trained: Callable[[Any, pathlib.Path], int]


def _file_params(path: pathlib.Path, skip: Callable[[str], bool] = lambda key: False) -> int:
    """Elements of the tensors of a safetensors file (but those whose key `skip` names)."""
    from safetensors.numpy import load_file

    return int(sum(v.size for k, v in load_file(str(path)).items() if not skip(k)))


def _load_lora(base, workdir: pathlib.Path):
    from ldm_jax import store

    return store.apply_adapters(base, loras=[(workdir / "lora.safetensors", 1.0)])


def _load_embedding(base, workdir: pathlib.Path):
    from ldm_jax import store

    return store.apply_adapters(base, embeddings=[(workdir / "learned_embeds.safetensors", None)])


def _load_model_dir(base, workdir: pathlib.Path):
    from ldm_jax import store

    return store.load_model(workdir / "model")


def _part_params(*parts: str) -> Callable[[Any, pathlib.Path], int]:
    """Trained-parameter count of a full fine-tune of the base's `parts`."""
    def count(base, workdir: pathlib.Path) -> int:
        del workdir
        import jax

        return int(sum(np.size(x) for part in parts for x in jax.tree.leaves(base.params[part])))
    return count


def _instance(out: pathlib.Path) -> list[str]:
    return [f"--config.data.path={out / INSTANCE_DIR}"]


def _dreambooth(out: pathlib.Path) -> list[str]:
    """DreamBooth from the captioned instance images (the config's one instance / class prompt emptied)."""
    return _instance(out) + ["--config.train.dreambooth.instance_prompt=", "--config.train.dreambooth.class_prompt=",
                             "--config.train.dreambooth.instance_captions=true",
                             f"--config.train.dreambooth.identifier={NEW_COLOUR}",
                             f"--config.train.dreambooth.class_word={TI_INIT_WORD}"]


INSTANCE_DIR = "instance"
RECIPES = {
    "ti": Recipe(
        "ti", "textual inversion", "configs/textual_inversion_shapes.py",
        lambda out: _instance(out) + [f"--config.train.textual_inversion.token={NEW_COLOUR}",
                                      f"--config.train.textual_inversion.init_word={TI_INIT_WORD}"],
        _load_embedding, lambda base, workdir: _file_params(workdir / "learned_embeds.safetensors")),
    "lora": Recipe(
        "lora", "LoRA", "configs/lora_shapes.py", _instance,
        _load_lora, lambda base, workdir: _file_params(workdir / "lora.safetensors")),
    "dreambooth": Recipe(
        "dreambooth", "DreamBooth + prior preservation", "configs/dreambooth_shapes.py", _dreambooth,
        _load_model_dir, _part_params("unet")),
    "dreambooth_no_prior": Recipe(
        "dreambooth_no_prior", "DreamBooth, no prior preservation", "configs/dreambooth_shapes.py",
        lambda out: _dreambooth(out) + ["--config.train.dreambooth.prior_loss_weight=0"],
        _load_model_dir, _part_params("unet")),
}


# ---------------------------------------------------------------------------------------------- the report


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The table's rows from the per-model results (the first is the base model, "before")."""
    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return [[r["label"], r.get("trained_params", "-"), r.get("steps", "-"), number(r.get("wall_s"), 0),
             number(r.get("cpu_s"), 0), number(r.get("peak_rss_gib"), 2), pct(r["taught"]["accuracy"]), pct(r["new"]["accuracy"]),
             pct(r["new"]["new_colour"]), pct(r["old"]["accuracy"])] for r in results]


HEADER = ["recipe", "trained params", "steps", "wall s", "CPU s", "peak RSS GiB", "taught prompts", "new-concept prompts",
          "white objects white", "old prompts"]


def markdown(rows: Sequence[Sequence[Any]]) -> str:
    """The table as markdown (for the README)."""
    return markdown_table(HEADER, rows)


# -------------------------------------------------------------------------------------------------- main


def measure(model, prompt_sets: dict[str, list[str]]) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Samples and scores every prompt set: ({set: scores}, {set: images})."""
    images = {name: sample_prompts(model, prompts) for name, prompts in prompt_sets.items()}
    return {name: score(images[name], prompts) for name, prompts in prompt_sets.items()}, images


def train_recipe(recipe: Recipe, out: pathlib.Path, base) -> tuple[dict[str, Any], Any]:
    """Trains one recipe in its own process: (its result fields, the adapted model)."""
    workdir = out / recipe.name
    if workdir.exists():  # the run would resume instead of being measured
        raise UsageError(f"{workdir} exists: delete it (or give another --out) to measure {recipe.name}")
    argv = ["-m", "ldm_jax", "train", "--config", recipe.config, "--workdir", str(workdir), *recipe.overrides(out)]
    print("training:", " ".join(argv), flush=True)
    wall, peak, cpu = train_in_subprocess(argv, out / f"{recipe.name}.log")
    result = {"name": recipe.name, "label": recipe.label, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "peak_rss_gib": round(peak, 2),
              "steps": trained_steps(workdir), "trained_params": recipe.trained(base, workdir),
              "command": " ".join(argv)}
    return result, recipe.load(base, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the whole measurement (module docstring) and prints the table."""
    args = parse_args(argv)
    from ldm_jax import store
    from ldm_jax.data import shapes

    out = pathlib.Path(args.out)
    captions = write_image_folder(out / INSTANCE_DIR, instance_scenes(args.num_instance))
    sets = {"new": new_concept_prompts(args.num_prompts, captions),
            "old": old_prompts(pathlib.Path(args.old_prompts), args.num_prompts)}
    base = store.load_model()
    print(f"{len(captions)} instance images in {out / INSTANCE_DIR}; {args.num_prompts} new-concept and old prompts; "
          f"{load_average()}", flush=True)
    shown = sets["new"][:PICTURE_NEW] + sets["old"][:PICTURE_OLD]
    targets = np.stack([shapes.render(shapes.parse_caption(p), base.config.first_stage.resolution) for p in shown])
    grid_rows: list[tuple[str, np.ndarray]] = [("the prompts rendered (target)", targets)]
    if args.ceiling:
        print("autoencoder ceiling (reconstructed renders of the new-concept prompts):", ceiling(base, sets["new"]))
    results: list[dict[str, Any]] = []
    for recipe in [None, *(RECIPES[name] for name in args.recipes)]:
        result, model = ({"name": "before", "label": "before (the embedded model)"}, base) if recipe is None \
            else train_recipe(recipe, out, base)
        scores, images = measure(model, {**sets, "taught": captions})
        results.append({**result, **scores})
        grid_rows.append((result["label"], np.concatenate([images["new"][:PICTURE_NEW], images["old"][:PICTURE_OLD]])))
        print(json.dumps(results[-1]), flush=True)
    rows = table_rows(results)
    print(format_table(HEADER, rows))
    print(markdown(rows))
    (out / "results.json").write_text(json.dumps({"results": results, **sets, "instance_captions": captions,
                                                  "picture_prompts": shown, "load": load_average()}, indent=1))
    if args.picture:
        picture(grid_rows, pathlib.Path(args.picture))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/adapt_shapes", help="working folder (instance images, runs, results.json)")
    p.add_argument("--recipes", default="ti,lora,dreambooth,dreambooth_no_prior",
                   type=lambda s: [r for r in s.split(",") if r], help=f"some of {list(RECIPES)}")
    p.add_argument("--old-prompts", default="runs/eval/validation/prompts.txt")
    p.add_argument("--num-prompts", type=int, default=64, help="prompts of each set")
    p.add_argument("--num-instance", type=int, default=12, help="rendered instance images")
    p.add_argument("--picture", default="docs/adapt_shapes.png", help="'' for none")
    p.add_argument("--ceiling", action="store_true", help="also score the autoencoder's reconstructions")
    args = p.parse_args(argv)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {unknown}; expected some of {list(RECIPES)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
