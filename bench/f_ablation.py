"""The LDM paper's f-ablation (Rombach et al. 2022, Sec. 4.1, Fig. 6 and 7) at small scale, on the varied
captioned-shapes world: first stages with downsampling factor f, each LDM trained with the same recipe for the
same wall-clock budgets on this machine, every point measured by the same evaluation.

    .venv/bin/python bench/f_ablation.py --f 1,2,4,8 [--budgets 300,600,1200,1800] [--out runs/f_ablation]
        [--data-dir runs/tfds] [--first-stage 4=runs/varied_autoencoder] [--results docs/reproduction/f_ablation.json]
    .venv/bin/python bench/f_ablation.py --plot        # only the tables and plots from the results file

One point (f, budget) is one command: `--f 2 --budgets 600` (a workdir already trained to a smaller budget
continues from its checkpoint; one that ended at this budget is evaluated again; one past it is refused).

1. Data: captioned_shapes/res32_varied in --data-dir (prepare it first: `python -m ldm_jax.data.captioned_shapes
   --data_dir runs/tfds --resolution 32 --varied`). The evaluation's references are its first --num-eval validation
   examples (images and captions) and first --num-heldout heldout captions (each holds a colour + shape pair no
   training scene has).
2. First stage of f > 1: `python -m ldm_jax train --config configs/f_ablation.py:autoencoderF` in OUT/fF/autoencoder
   (skipped when its export exists, or given with --first-stage F=WORKDIR); measured before the LDM trains:
   reconstruction PSNR of the validation references, the checker's adherence of the reconstructions, and their FSD
   / precision / recall against the references (what the LDM can reach at best through this first stage: "rFSD").
3. LDM: `python -m ldm_jax train --config configs/f_ablation.py:ldmF --config.train.max_train_seconds=B` (and
   num_steps lifted to UNCAPPED_STEPS: the budget ends the run) in OUT/fF/ldm, for each budget B in order (seconds
   of training steps, `loop.TrainTime`: compilation, latent precomputation, sample grids and checkpoints excluded);
   each budget continues the run of the one before.
4. Each export is evaluated (`evaluate_model`): one sample per validation caption and per heldout caption (DDIM,
   --sample-steps 25 (LDM-1 samples 17x slower than LDM-4: 238 against 14 GFLOP per UNet call of 128), guidance 7.5,
   seed 0: `ldm-jax sample`'s others, image i from noise fold_in(0, i)); adherence on both
   (`shapes_checker.VARIED_CHECKER`); FSD, precision and recall of the validation samples against the validation
   images (`evaluate.distribution_of`, the shipped 32-pixel shapes classifier, k = 3); diversity: --diversity-prompts
   validation captions drawn --diversity-samples times each, the mean pairwise distance between the samples of one
   caption (pixels: mean absolute difference / 255; features: Euclidean in the classifier's space), next to the same
   figure for as many fresh renders of the caption; sampling throughput (images / s of a second, compiled batch of
   64 through the same sampler).
5. The references once (`reference_rows`): fresh renders of the validation captions (another random draw of the
   world) scored the same way: the checker's ceiling and the FSD / precision / recall floor at this sample size.

Every finished point is written to --results at once (a rerun replaces the point), then the tables (text and
markdown) and docs/reproduction/*.png are made from the whole file (`--plot` alone remakes them).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (RENDER_SEED, ROOT, UsageError, diversity, format_table, fresh_renders, last_logged,
                    load_average, markdown_table, measure_process, sample_prompts, trained_steps)

DATASET = "captioned_shapes/res32_varied"
CONFIG = "configs/f_ablation.py"


# ------------------------------------------------------------------------------------------------ references


def read_split(data_dir: str, split: str, num: int) -> tuple[np.ndarray, list[str]]:
    """The first `num` images uint8 (num, 32, 32, 3) and captions of a split of res32_varied
    (`evaluate.read_split`); UsageError (exit 2) when the split is smaller."""
    from ldm_jax import evaluate

    images, captions = evaluate.read_split(data_dir, split, num=num, name=DATASET)
    if len(captions) < num:
        raise UsageError(f"{data_dir}: {DATASET} {split} has {len(captions)} examples, fewer than the {num} asked")
    return images, captions


class References:
    """The evaluation's fixed inputs: validation images + captions, heldout captions, the diversity captions."""

    def __init__(self, data_dir: str, num_eval: int, num_heldout: int, diversity_prompts: int, samples: int):
        self.images, self.captions = read_split(data_dir, "validation", num_eval)
        _, self.heldout = read_split(data_dir, "heldout", num_heldout)
        self.samples = samples
        self.diversity_captions = [c for c in self.captions[:diversity_prompts] for _ in range(samples)]


def scores(refs: References, validation: np.ndarray, heldout: np.ndarray | None,
           repeated: np.ndarray) -> dict[str, Any]:
    """The measurements of one model (or of fresh renders): adherence, FSD / P / R against refs.images, diversity."""
    from ldm_jax import evaluate
    from ldm_jax.metrics import shapes_checker

    def adherence(images, captions):
        return shapes_checker.prompt_adherence(images, captions, shapes_checker.VARIED_CHECKER)

    out: dict[str, Any] = {"adherence_validation": adherence(validation, refs.captions)}
    if heldout is not None:
        out["adherence_heldout"] = adherence(heldout, refs.heldout)
    out.update(evaluate.distribution_of(validation, refs.images))
    out["diversity"] = diversity(repeated, refs.samples)
    return out


def reference_rows(refs: References) -> dict[str, Any]:
    """Fresh renders of the same captions scored as a model is: the ceilings and floors at this sample size."""
    return scores(refs, fresh_renders(refs.captions), fresh_renders(refs.heldout, RENDER_SEED + 1),
                  fresh_renders(refs.diversity_captions, RENDER_SEED + 2))


# ------------------------------------------------------------------------------------------------ runs


UNCAPPED_STEPS = 1_000_000  # the learning rate is constant after warm-up, so num_steps changes nothing else


def train(config: str, workdir: pathlib.Path, overrides: Sequence[str]) -> dict[str, float]:
    """One `python -m ldm_jax train` in its own process (log: WORKDIR.log, appended to on continuation); its wall
    and CPU seconds. SystemExit with the log's tail when it fails."""
    argv = [sys.executable, "-m", "ldm_jax", "train", "--config", config, "--workdir", str(workdir),
            "--config.train.progress_bar=false", *overrides]
    log = workdir.parent / f"{workdir.name}.{int(time.time())}.log"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    print(" ".join(argv[1:]), f"(log: {log})", flush=True)
    run = measure_process(argv, log)
    if run.returncode:
        raise SystemExit(f"training failed (exit {run.returncode}); {log}:\n"
                         + log.read_text(encoding="utf-8", errors="replace")[-3000:])
    return {"wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1)}


def first_stage(factor: int, args: argparse.Namespace, out: pathlib.Path) -> pathlib.Path | None:
    """The autoencoder workdir of LDM-`factor` (trained here unless given or exported already); None for f = 1."""
    if factor == 1:
        return None
    if factor in args.first_stage:
        return args.first_stage[factor]
    workdir = out / f"f{factor}" / "autoencoder"
    if not (workdir / "autoencoder" / "config.json").is_file():
        train(f"{CONFIG}:autoencoder{factor}", workdir, [f"--config.data.data_dir={args.data_dir}"])
    return workdir


def evaluate_model(model, refs: References, steps: int) -> dict[str, Any]:
    """Samples the references' captions with `model` (DDIM `steps`) and scores them (module doc, step 4)."""
    validation = sample_prompts(model, refs.captions, steps=steps)
    start = time.perf_counter()
    sample_prompts(model, refs.captions[:64], steps=steps)  # compiled already: the throughput of one batch of 64
    throughput = 64 / (time.perf_counter() - start)
    held = sample_prompts(model, refs.heldout, steps=steps)
    out = scores(refs, validation, held, sample_prompts(model, refs.diversity_captions, steps=steps))
    out.update(images_per_s=round(throughput, 3), sample_steps=steps)
    return out


def first_stage_row(factor: int, stage_dir: pathlib.Path, refs: References) -> dict[str, Any]:
    """PSNR, adherence (the varied checker) and rFSD / precision / recall of the reconstructions of the validation
    references by the first stage exported in STAGE_DIR/autoencoder."""
    from ldm_jax import evaluate, store
    from ldm_jax.metrics import image_quality, shapes_checker

    recon = evaluate.reconstruct(store.load_first_stage(stage_dir / "autoencoder"), refs.images)
    psnr = float(np.mean(image_quality.psnr(recon, refs.images)))
    adherence = shapes_checker.prompt_adherence(recon, refs.captions, shapes_checker.VARIED_CHECKER)
    return {"f": factor, "first_stage": str(stage_dir), "psnr": psnr, "adherence": adherence,
            **evaluate.distribution_of(recon, refs.images)}


def run_point(factor: int, budget: float, stage_dir: pathlib.Path | None, args: argparse.Namespace,
              out: pathlib.Path, refs: References) -> dict[str, Any]:
    """Trains LDM-`factor` up to `budget` seconds of training and evaluates the export: its row."""
    from ldm_jax import store

    workdir = out / f"f{factor}" / "ldm"
    done = last_logged(workdir, "train_seconds", 0.0)
    run = None
    if done >= budget + max(60.0, 0.05 * budget):
        raise UsageError(f"{workdir} has trained {done:.0f} s already, past the budget {budget:.0f} s: give a larger "
                         "budget or another --out")
    if done < budget:
        overrides = [f"--config.data.data_dir={args.data_dir}", f"--config.train.max_train_seconds={budget}",
                     f"--config.train.num_steps={UNCAPPED_STEPS}"]  # the budget, not the recipe's 6000, ends a run
        if stage_dir is not None:
            overrides.append(f"--config.train.first_stage={stage_dir}")
        run = train(f"{CONFIG}:ldm{factor}", workdir, overrides)
    else:  # this budget's run ended (its last step overshoots a little): evaluate its export again
        print(f"{workdir}: trained {done:.0f} s for the budget {budget:.0f} s already; evaluating its export", flush=True)
    model = store.load_model(workdir / "model")
    row = {"f": factor, "budget_s": budget, "train_seconds": round(last_logged(workdir, "train_seconds", 0.0), 1),
           "steps": trained_steps(workdir), "last_run": run, **evaluate_model(model, refs, args.sample_steps),
           "first_stage": str(stage_dir) if stage_dir else None,
           "command": f".venv/bin/python bench/f_ablation.py --f {factor} --budgets {budget:g} --out {out}"}
    return row


# ------------------------------------------------------------------------------------------------ results


EVALUATION_FLAGS = ("num_eval", "num_heldout", "sample_steps", "diversity_prompts", "diversity_samples")


def load_results(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"points": [], "first_stages": [], "reference": None}


def save_results(path: pathlib.Path, results: dict[str, Any]) -> None:
    results["points"].sort(key=lambda r: (r["f"], r["budget_s"]))
    results["first_stages"].sort(key=lambda r: r["f"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def replace(rows: list[dict[str, Any]], row: dict[str, Any], keys: Sequence[str]) -> None:
    rows[:] = [r for r in rows if any(r[k] != row[k] for k in keys)] + [row]


POINT_HEADER = ["f", "budget s", "steps", "adherence val", "adherence heldout", "FSD", "precision", "recall",
                "diversity px (real)", "images/s"]


def point_rows(results: dict[str, Any]) -> list[list[Any]]:
    real = results["reference"]["diversity"]["pixel"] if results["reference"] else float("nan")
    rows = []
    for r in results["points"]:
        rows.append([r["f"], f"{r['budget_s']:.0f}", r["steps"],
                     f"{100 * r['adherence_validation']['accuracy']:.1f}%",
                     f"{100 * r['adherence_heldout']['accuracy']:.1f}%", f"{r['fsd']:.1f}",
                     f"{r['precision']:.2f}", f"{r['recall']:.2f}",
                     f"{r['diversity']['pixel']:.3f} ({real:.3f})", f"{r['images_per_s']:.1f}"])
    if results["reference"]:
        ref = results["reference"]
        rows.append(["real", "-", "-", f"{100 * ref['adherence_validation']['accuracy']:.1f}%",
                     f"{100 * ref['adherence_heldout']['accuracy']:.1f}%", f"{ref['fsd']:.1f}",
                     f"{ref['precision']:.2f}", f"{ref['recall']:.2f}", f"{real:.3f}", "-"])
    return rows


STAGE_HEADER = ["f", "latent", "PSNR dB", "adherence", "shape", "rFSD", "precision", "recall"]


def stage_rows(results: dict[str, Any]) -> list[list[Any]]:
    def percent(r, key):
        return f"{100 * r['adherence'][key]:.1f}%" if "adherence" in r else "-"
    return [[r["f"], f"{32 // r['f']}x{32 // r['f']}x4", f"{r['psnr']:.1f}", percent(r, "accuracy"),
             percent(r, "shape"), f"{r['fsd']:.1f}", f"{r['precision']:.2f}", f"{r['recall']:.2f}"]
            for r in results["first_stages"]]


def report(results: dict[str, Any], plot_dir: pathlib.Path | None) -> None:
    """Prints the tables (text, then markdown) and writes the plots."""
    for header, rows in ((STAGE_HEADER, stage_rows(results)), (POINT_HEADER, point_rows(results))):
        if rows:
            print(format_table(header, rows))
            print(markdown_table(header, rows))
    if plot_dir is not None and results["points"]:
        for path in plot(results, plot_dir):
            print(f"wrote {path}")


FSD_TITLE = "FSD (lower is better)"


def plot(results: dict[str, Any], plot_dir: pathlib.Path) -> list[pathlib.Path]:
    """docs/reproduction/training.png (FSD, adherence, precision, recall against training minutes, one line per f)
    and throughput.png (FSD and adherence at the largest budget every f has reached against sampling images / s)."""
    from ldm_jax.training.curves import plot_series

    by_f: dict[int, list[dict[str, Any]]] = {}
    for r in results["points"]:
        by_f.setdefault(r["f"], []).append(r)

    def series(key):
        return [(f"f={f}", [r["train_seconds"] / 60 for r in rows], [key(r) for r in rows])
                for f, rows in sorted(by_f.items())]

    metrics = {FSD_TITLE: lambda r: r["fsd"],
               "adherence, validation (%)": lambda r: 100 * r["adherence_validation"]["accuracy"],
               "precision": lambda r: r["precision"], "recall": lambda r: r["recall"]}
    training = plot_series([(title, series(key)) for title, key in metrics.items()], plot_dir / "training.png",
                           x_label="training minutes", log_x=True, log_y=[FSD_TITLE])
    budget = max(set.intersection(*({r["budget_s"] for r in rows} for rows in by_f.values())), default=None)
    if budget is None:
        return [training]
    at = {f: next(r for r in rows if r["budget_s"] == budget) for f, rows in sorted(by_f.items())}
    panels = {f"{title.split(' (')[0]}, {budget / 60:.0f} min training":
              [(f"f={f}", [r["images_per_s"]], [key(r)]) for f, r in at.items()]
              for title, key in list(metrics.items())[:2]}  # FSD, adherence
    through = plot_series(list(panels.items()), plot_dir / "throughput.png",
                          x_label="sampling images / s (DDIM, CFG)", log_x=True, log_y=list(panels)[:1])
    return [training, through]


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results_path = pathlib.Path(args.results)
    results = load_results(results_path)
    plot_dir = pathlib.Path(args.plot_dir) if args.plot_dir else None
    if args.plot:
        report(results, plot_dir)
        return 0
    out = pathlib.Path(args.out)
    refs = References(args.data_dir, args.num_eval, args.num_heldout, args.diversity_prompts, args.diversity_samples)
    print(f"{len(refs.captions)} validation and {len(refs.heldout)} heldout captions; {load_average()}", flush=True)
    settings = {k: getattr(args, k) for k in EVALUATION_FLAGS}
    if results.setdefault("evaluation", settings) != settings:
        raise UsageError(f"{results_path} holds points evaluated with {results['evaluation']}, not {settings}: give "
                         "the same flags or another --results (points of one file must be comparable)")
    if results["reference"] is None:
        results["reference"] = reference_rows(refs)
        save_results(results_path, results)
    for factor in args.f:
        stage_dir = first_stage(factor, args, out)
        if stage_dir is not None:
            replace(results["first_stages"], first_stage_row(factor, stage_dir, refs), ["f"])
            print(json.dumps(results["first_stages"][-1]), flush=True)
            save_results(results_path, results)
        for budget in [] if args.first_stages_only else args.budgets:
            row = run_point(factor, budget, stage_dir, args, out, refs)
            print(json.dumps(row), flush=True)
            replace(results["points"], row, ["f", "budget_s"])
            save_results(results_path, results)
    report(results, plot_dir)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--f", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8],
                   help="downsampling factors, comma-separated (1, 2, 4, 8)")
    p.add_argument("--budgets", type=lambda s: sorted(float(v) for v in s.split(",")), default=[300, 600, 1200, 1800],
                   help="training seconds, comma-separated")
    p.add_argument("--out", default="runs/f_ablation")
    p.add_argument("--data-dir", default="runs/tfds")
    p.add_argument("--first-stage", action="append", default=[], metavar="F=WORKDIR",
                   help="use this autoencoder workdir for f = F instead of training one (repeatable)")
    p.add_argument("--results", default=str(ROOT / "docs/reproduction/f_ablation.json"))
    p.add_argument("--plot-dir", default=str(ROOT / "docs/reproduction"), help="'' for no plots")
    p.add_argument("--plot", action="store_true", help="only print the tables and plot the results file")
    p.add_argument("--first-stages-only", action="store_true",
                   help="train (or take) and measure the first stages of --f, no LDM")
    p.add_argument("--num-eval", type=int, default=256, help="validation captions sampled per point")
    p.add_argument("--num-heldout", type=int, default=128, help="heldout captions sampled per point")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of every sample")
    p.add_argument("--diversity-prompts", type=int, default=4)
    p.add_argument("--diversity-samples", type=int, default=8)
    args = p.parse_args(argv)
    bad = [f for f in args.f if f not in (1, 2, 4, 8)]
    if bad:
        p.error(f"--f: {bad} not in 1, 2, 4, 8 (configs/f_ablation.py)")
    if any(b <= 0 for b in args.budgets):
        p.error(f"--budgets: {args.budgets}; expected seconds > 0")
    stages = {}
    for spec in args.first_stage:
        factor, sep, path = spec.partition("=")
        if not sep or not factor.isdigit() or int(factor) not in (2, 4, 8):
            p.error(f"--first-stage {spec!r}: expected F=WORKDIR with F in 2, 4, 8")
        if not (pathlib.Path(path) / "autoencoder" / "config.json").is_file():
            p.error(f"--first-stage {spec!r}: {path}/autoencoder/config.json does not exist (not a trained workdir)")
        stages[int(factor)] = pathlib.Path(path)
    args.first_stage = stages
    return args


if __name__ == "__main__":
    sys.exit(main())
