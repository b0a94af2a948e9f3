"""How our txt2img scales: time vs number of DDIM steps, vs latent resolution, vs batch (ours only, in process).

Around a base point (DDIM `--base_steps` steps, the config's default latent size, batch 1, CFG 7.5, float32,
random weights from bench/common.py), each axis is varied alone. Every point is compiled by its first call
("compile s": JAX's trace + lower + compile seconds; 0 for a point already compiled) and the points of one axis
are then timed in turn, `--repeats` rounds, medians.
"x linear" divides the time by what linear scaling from the axis' first point predicts (steps: a fixed part
plus per-step work; resolution: pixels; batch: images), so < 1 means better than linear.

    .venv/bin/python bench/bench_scaling.py                                  # tiny and small
    .venv/bin/python bench/bench_scaling.py --configs small --latents 16,32,48 --batches 1,2,4
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common

BASE_LATENT = {"tiny": 8, "small": 32, "sd_v1": 32}


def _point(name: str, params_cache: dict, steps: int, latent: int, batch: int, attention: str):
    """A blocking txt2img call for one (steps, latent, batch) point of config `name`."""
    from ldm_jax import ldm, pipeline

    config = common.bench_config(name, latent)
    options = ldm.RunOptions(attention=attention)
    if name not in params_cache:
        params_cache[name] = pipeline.place_params(common.random_params(config))
    params = params_cache[name]
    cond, uncond, noise = common.bench_inputs(config, batch, latent)
    sampler = pipeline.make_model_sampler(config, "ddim", steps, timestep_spacing="leading", steps_offset=1)

    def run():
        return np.asarray(pipeline.txt2img(config, params, sampler, cond, uncond, guidance_scale=7.5, noise=noise,
                                           options=options))

    return run


def sweep(name: str, axis: str, values: list[int], base: dict, args, params_cache: dict) -> list[list]:
    """Rows for one axis of config `name`: the other two settings stay at `base`."""
    points = [dict(base, **{axis: v}) for v in values]
    runs = [_point(name, params_cache, p["steps"], p["latent"], p["batch"], args.attention) for p in points]
    compile_s = []
    for run in runs:  # the first call of each point compiles it (a point seen before costs nothing)
        before = args.clock.seconds
        run()
        compile_s.append(args.clock.seconds - before)
    steady = [common.median(ts) for ts in common.alternating(runs, args.repeats, warmup=False)]
    rows = []
    for p, c, s in zip(points, compile_s, steady, strict=True):
        p0, s0 = points[0], steady[0]
        if axis == "steps":  # fit fixed + per-step from the first and last points
            per_step = (steady[-1] - s0) / (points[-1]["steps"] - p0["steps"]) if len(points) > 1 else s0 / p0["steps"]
            predicted = s0 + per_step * (p["steps"] - p0["steps"])
        elif axis == "latent":
            predicted = s0 * (p["latent"] / p0["latent"]) ** 2
        else:
            predicted = s0 * p["batch"] / p0["batch"]
        per = s / (p["batch"] * p["steps"]) * 1e3
        rows.append([name, axis, p[axis], f"{p['latent'] * (4 if name == 'tiny' else 8)}px", c, s, per, s / predicted])
        print(f"  {name} {axis}={p[axis]}: compile {c:.2f} s, steady {s:.3f} s", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small", help=f"comma-separated, from {common.CONFIG_NAMES}")
    parser.add_argument("--steps", default="10,25,50,100")
    parser.add_argument("--latents", default="", help="latent sides (default: tiny 8,16,32; small 16,32,64)")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--base_steps", type=int, default=25, help="steps of the resolution and batch sweeps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="xla")
    args = parser.parse_args(argv)
    args.clock = common.CompileClock()

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    rows = []
    print(f"{common.load_average()} at start", flush=True)
    for name in args.configs.split(","):
        base_latent = BASE_LATENT[name]
        latents = ints(args.latents) if args.latents else [base_latent // 2, base_latent, base_latent * 2]
        base = dict(steps=args.base_steps, latent=base_latent, batch=1)
        cache: dict = {}
        rows += sweep(name, "steps", ints(args.steps), base, args, cache)
        rows += sweep(name, "latent", latents, base, args, cache)
        rows += sweep(name, "batch", ints(args.batches), base, args, cache)
    print(f"\n{common.load_average()} at the end; DDIM + CFG 7.5, float32, attention {args.attention}; "
          f"base point {args.base_steps} steps, batch 1; medians of {args.repeats}")
    print(common.format_table(["config", "axis", "value", "image", "compile s", "steady s", "ms/(image*step)",
                               "x linear"], rows))


if __name__ == "__main__":
    main()
