"""A ControlNet on the embedded shapes model, measured: do samples follow a layout given as an image?

    .venv/bin/python bench/controlnet_shapes.py [--out runs/controlnet_shapes] [--steps 1000] [--num-scenes 64]
        [--data-dir runs/tfds] [--picture docs/controlnet_shapes.png]

(issue 17, item 6). The control image is a scene's layout: white masks of every object on black
(`shapes.render_mask`), which fixes each object's cell, size and shape but not its colour.

1. Training: configs/controlnet_shapes.py through the real entry point, `python -m ldm_jax train` (its own
   process, started by `common.train_in_subprocess`'s launcher): wall time, CPU time (user + system, all threads)
   and peak RSS of that process alone, JAX start and compilation included; `--steps` overrides the config's 1000
   (`train.num_steps`) for a short smoke run. The data: the captioned-shapes TFDS train split in `--data-dir`
   (50,000 scenes, seed 0; `python -m ldm_jax.data.captioned_shapes --data_dir runs/tfds --resolution 32`). The
   export OUT/train/controlnet/ loads through `store.load_controlnet`. An existing OUT/train is refused (the run
   would resume instead of being measured).
2. Evaluation scenes: `--num-scenes` scenes drawn with `shapes.sample_scene` (train/validation pairs, so the base
   model knows every colour+shape) from seed `EVAL_SEED`, distinct, none holding the same objects (in any order) as
   a scene of the training split (`training_scenes` regenerates the split as the dataset's generator draws it).
   Every one-object scene occurs in the 50,000 training scenes, so the evaluation scenes have 2 or 3 objects.
3. Conditions. A caption of this world fixes the whole layout (`shapes.render` draws a caption exactly: every
   object's cell, size and shape), so with the full caption the base model needs no control, and the ControlNet
   can add little there beyond correcting the base model's misses. Where it has to carry the layout is without a
   caption: the model takes any prompt its tokenizer reads, and the empty prompt "" (the ControlNet trained with
   10% of its prompts emptied, `diffusion.cond_drop_prob`) leaves the layout to the control alone. So:
   - "full caption": prompt = scene i's caption, control = scene i's masks.
   - "empty prompt": prompt = "", control = scene i's masks. The caption adherence column scores the images
     against scene i's caption, which the prompt did not give: no signal says the colours, so it stays near
     chance; the layout columns are the measure here.
   - "conflict": prompt = the caption of another evaluation scene j (`conflict_partners`: the next one, cyclically,
     sharing the fewest cells with scene i), control = scene i's masks: which signal wins. "mask IoU" and "layout
     adherence" are against the control's scene i, "caption adherence" and "IoU to the caption's layout" against
     the caption's scene j.
   Without the ControlNet the same prompts and seeds are sampled by the base model alone, scored against the same
   targets (the layout the control would have given).
4. Sampling: the embedded model (`store.load_model()`), DDIM 50 steps, guidance 7.5, seed 0 (`ldm-jax sample`'s
   defaults; image i from noise fold_in(seed, i), the same noise without and with the ControlNet), the ControlNet
   at conditioning scale `--scale` (1.0), from the first step to the last.
5. Scores (`shapes_checker`, default config: the world's six colours):
   - mask IoU, per object of the target scene (`object_ious`): the object pixels of the sampled image are those
     the checker's pixel classification (`classify_pixels`, colour margin 0.4) reads as any of the world's colours,
     regardless of which; the object's drawn pixels are the object pixels inside its grid cell
     (`shapes.cell_bounds`: the cell holds the object's whole target mask, and no other object's); its IoU is
     |drawn & target| / |drawn | target|, target = `shapes.object_mask` of that object alone (what `render_mask`
     draws for it). Colour-blind on purpose: the control says nothing about colour. An object drawn in the wrong
     cell scores 0; noise pixels in the cell count against it. Reported: the mean over objects and the fraction of
     objects with IoU >= 0.5.
   - layout adherence (`layout_adheres`): the checker reads every object of the target scene with the right cell,
     shape and size and nothing else in the image; colours ignored.
   - caption adherence: the checker's accuracy (`prompt_adherence`: every object right in all four attributes,
     nothing else) against the caption the condition names above.
   results.json also holds, per condition, "mean_abs_change": the mean |with - without| over the pixels (0..255)
   of the images sampled from the same noise: how far the ControlNet moved them at all (0 at its zero init; a
   short smoke run's net barely moves them).

Output: one table (condition x without/with the ControlNet), its markdown, OUT/results.json, and a picture
(`--picture`): per condition the control masks, then the images without and with the ControlNet, for the first
`PICTURE_SCENES` scenes (for "conflict" also the caption's scene rendered), shown 4x enlarged.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (UsageError, format_table, load_average, markdown_table, picture, sample_prompts,
                    train_in_subprocess, trained_steps)

CONFIG = "configs/controlnet_shapes.py"
EVAL_SEED = 2026  # the evaluation scenes' draw (`evaluation_scenes`)
TRAIN_SEED, NUM_TRAIN = 0, 50_000  # the captioned_shapes res32 train split the config trains on
RESOLUTION = 32
PICTURE_SCENES = 8
CONDITIONS = ("full caption", "empty prompt", "conflict")
IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------------- data


def training_scenes(num_train: int = NUM_TRAIN, seed: int = TRAIN_SEED) -> list[tuple]:
    """The scenes of the captioned_shapes train split (`num_train` scenes, generation seed `seed`), regenerated as
    `captioned_shapes.CaptionedShapes._generate_examples` draws them: scene k from default_rng([seed, 0, k])."""
    from ldm_jax.data import captioned_shapes, shapes

    split = captioned_shapes.SPLITS.index("train")
    return [shapes.sample_scene(np.random.default_rng([seed, split, k])) for k in range(num_train)]


def evaluation_scenes(num: int, exclude: Sequence[tuple], seed: int = EVAL_SEED) -> list[tuple]:
    """`num` distinct scenes (`shapes.sample_scene`, train/validation pairs) from default_rng(seed), none holding
    the same objects, in any order, as a scene of `exclude`."""
    from ldm_jax.data import shapes

    seen = {frozenset(scene) for scene in exclude}
    rng = np.random.default_rng(seed)
    scenes: list[tuple] = []
    while len(scenes) < num:
        scene = shapes.sample_scene(rng)
        if frozenset(scene) not in seen:
            seen.add(frozenset(scene))
            scenes.append(scene)
    return scenes


def conflict_partners(scenes: Sequence[tuple]) -> list[int]:
    """For each scene i, the index j != i of the scene whose caption conflicts with i's masks: the fewest cells in
    common with scene i, then the nearest after i (cyclically)."""
    cells = [{o.position for o in scene} for scene in scenes]
    n = len(scenes)
    if n < 2:
        raise ValueError("conflict_partners: needs at least 2 scenes")
    return [min((j for j in range(n) if j != i), key=lambda j: (len(cells[i] & cells[j]), (j - i) % n))
            for i in range(n)]


# --------------------------------------------------------------------------------------------------- scores


def object_ious(image: np.ndarray, scene: Sequence[Any]) -> list[float]:
    """Per object of `scene`, the IoU of its target mask and the image's object pixels in its cell (module doc,
    step 5). image: uint8 (R, R, 3)."""
    from ldm_jax.data import shapes
    from ldm_jax.metrics.shapes_checker import CheckerConfig, classify_pixels

    resolution = image.shape[0]
    drawn = classify_pixels(image.astype(np.float64), CheckerConfig().colour_margin) != 0  # (R, R)
    ious = []
    for obj in scene:
        top, bottom, left, right = shapes.cell_bounds(obj.position, resolution)
        in_cell = np.zeros_like(drawn)
        in_cell[top:bottom, left:right] = True
        mine, target = drawn & in_cell, shapes.object_mask(obj, resolution)
        ious.append(float((mine & target).sum() / (mine | target).sum()))
    return ious


def layout_adheres(result) -> bool:
    """A `shapes_checker.CheckResult` with every stated object in its cell with its shape and size, and no extra
    detection (colours ignored)."""
    return all(o.position and o.shape and o.size for o in result.objects) and not result.extras


def score(images: np.ndarray, control_scenes: Sequence[tuple], caption_scenes: Sequence[tuple],
          conflict: bool) -> dict[str, Any]:
    """The scores of one condition and model (module doc, step 5): IoU and layout adherence against
    `control_scenes`, caption adherence against `caption_scenes`; with `conflict` also the IoU against the caption
    scenes' layouts."""
    from ldm_jax.metrics import shapes_checker

    ious = [v for image, scene in zip(images, control_scenes, strict=True) for v in object_ious(image, scene)]
    layout = [layout_adheres(shapes_checker.check_image(image, scene))
              for image, scene in zip(images, control_scenes, strict=True)]
    adherence = shapes_checker.prompt_adherence(images, list(caption_scenes))
    out = {"mean_iou": float(np.mean(ious)), "iou_ge_0.5": float(np.mean(np.asarray(ious) >= IOU_THRESHOLD)),
           "layout_adherence": float(np.mean(layout)), "caption_adherence": adherence["accuracy"],
           "caption_colour": adherence["colour"], "num_objects": len(ious)}
    if conflict:
        caption_ious = [v for image, scene in zip(images, caption_scenes, strict=True)
                        for v in object_ious(image, scene)]
        out["caption_layout_iou"] = float(np.mean(caption_ious))
    return out


# ------------------------------------------------------------------------------------------------- report

HEADER = ["condition", "ControlNet", "mask IoU", "IoU >= 0.5", "layout adherence", "caption adherence",
          "IoU to the caption's layout"]


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """The table's rows from the per-(condition, model) results."""
    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    return [[r["condition"], "with" if r["controlnet"] else "without", f"{r['mean_iou']:.3f}", pct(r["iou_ge_0.5"]),
             pct(r["layout_adherence"]), pct(r["caption_adherence"]),
             f"{r['caption_layout_iou']:.3f}" if "caption_layout_iou" in r else "-"] for r in results]


def markdown(rows: Sequence[Sequence[Any]]) -> str:
    """The table as markdown (for the README)."""
    return markdown_table(HEADER, rows)


def training_line(train: dict[str, Any]) -> str:
    """One line on the training run."""
    return (f"training: {train['steps']} steps, {train['trained_params']:,} trained parameters, wall "
            f"{train['wall_s']:.0f} s, CPU {train['cpu_s']:.0f} s, peak RSS {train['peak_rss_gib']:.2f} GiB")


# -------------------------------------------------------------------------------------------------- main


def train(out: pathlib.Path, steps: int | None, data_dir: str) -> dict[str, Any]:
    """Trains the config in its own process (module doc, step 1); returns the run's result fields."""
    workdir = out / "train"
    if workdir.exists():  # the run would resume instead of being measured
        raise UsageError(f"{workdir} exists: delete it (or give another --out) to measure the training")
    argv = ["-m", "ldm_jax", "train", "--config", CONFIG, "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}"] + ([] if steps is None else [f"--config.train.num_steps={steps}"])
    print("training:", " ".join(argv), f"(log: {out / 'train.log'})", flush=True)
    wall, peak, cpu = train_in_subprocess(argv, out / "train.log")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_gib": round(peak, 2),
            "steps": trained_steps(workdir), "command": "python " + " ".join(argv),
            "controlnet": str(workdir / "controlnet")}


def conditions(scenes: Sequence[tuple]) -> dict[str, dict[str, Any]]:
    """{condition: prompts, control scenes, caption scenes} (module doc, step 3)."""
    from ldm_jax.data import shapes

    partner = conflict_partners(scenes)
    return {
        "full caption": {"prompts": [shapes.caption(s) for s in scenes], "control": list(scenes),
                         "caption": list(scenes)},
        "empty prompt": {"prompts": [""] * len(scenes), "control": list(scenes), "caption": list(scenes)},
        "conflict": {"prompts": [shapes.caption(scenes[j]) for j in partner], "control": list(scenes),
                     "caption": [scenes[j] for j in partner]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the whole measurement (module doc) and prints the table."""
    args = parse_args(argv)
    import jax

    from ldm_jax import store
    from ldm_jax.data import shapes

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"evaluation scenes: {args.num_scenes} (seed {EVAL_SEED}), none a training scene; {load_average()}",
          flush=True)
    scenes = evaluation_scenes(args.num_scenes, training_scenes())
    run = train(out, args.steps, args.data_dir)
    base = store.load_model()
    net = store.load_controlnet(run["controlnet"], base=base)
    run["trained_params"] = int(sum(np.size(x) for x in jax.tree.leaves(net.params)))
    print(training_line(run), flush=True)
    results: list[dict[str, Any]] = []
    grid: list[tuple[str, np.ndarray]] = []
    shown = slice(0, min(PICTURE_SCENES, args.num_scenes))
    for name, cond in conditions(scenes).items():
        masks = np.stack([shapes.render_mask(s, RESOLUTION) for s in cond["control"]])
        grid.append((f"{name}: control", masks[shown]))
        if name == "conflict":
            grid.append((f"{name}: caption's scene", np.stack([shapes.render(s, RESOLUTION)
                                                               for s in cond["caption"][shown]])))
        sampled: dict[bool, np.ndarray] = {}
        for with_net in (False, True):
            label = "with" if with_net else "without"
            print(f"sampling {name}, {label} the ControlNet ({len(scenes)} images)", flush=True)
            extra = {"controlnet": (net.config, net.params), "control_images": masks,
                     "control_scale": args.scale} if with_net else {}
            sampled[with_net] = sample_prompts(base, cond["prompts"], batch=min(64, len(scenes)), **extra)
            results.append({"condition": name, "controlnet": with_net, **score(
                sampled[with_net], cond["control"], cond["caption"], conflict=name == "conflict")})
            grid.append((f"{name}: {label}", sampled[with_net][shown]))
        # how far the ControlNet moved the images sampled from the same noise (0 for a net still at its zero init)
        results[-1]["mean_abs_change"] = float(np.abs(sampled[True].astype(np.float64) - sampled[False]).mean())
        for result in results[-2:]:
            print(json.dumps(result), flush=True)
    rows = table_rows(results)
    print(training_line(run))
    print(format_table(HEADER, rows))
    print(markdown(rows))
    results_path = out / "results.json"
    results_path.write_text(json.dumps({
        "train": run, "results": results, "scale": args.scale, "eval_seed": EVAL_SEED,
        "scenes": [shapes.caption(s) for s in scenes],
        "conflict_captions": conditions(scenes)["conflict"]["prompts"], "load": load_average()}, indent=1))
    print(f"results: {results_path}")
    if args.picture:
        picture(grid, pathlib.Path(args.picture), label_width=380)
        print(f"picture: {args.picture}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/controlnet_shapes", help="working folder (train/, train.log, results.json)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's, 1000)")
    p.add_argument("--data-dir", default="runs/tfds", help="where the captioned_shapes TFDS set is prepared")
    p.add_argument("--num-scenes", type=int, default=64, help="evaluation scenes")
    p.add_argument("--scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
    p.add_argument("--picture", default="docs/controlnet_shapes.png", help="'' for none")
    args = p.parse_args(argv)
    if args.num_scenes < 2:
        p.error("--num-scenes: at least 2 (the conflict condition pairs scenes)")
    if args.steps is not None and args.steps < 1:
        p.error("--steps: at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
