"""Where one `ldm-jax sample` run's time and memory go (issue 18, item 2): the same work as the command, phase by
phase, in one process, on a model folder (e.g. the full-size SD 1.5-shaped one of `bench_sd_scale.py
--write-model`).

Phases, in the order the command runs them (wall seconds, and the process's peak RSS after each):
- import: jax, ldm_jax and the libraries they pull in (from the interpreter's start);
- load: `store.load_model` (read the files, convert each tensor to the param dtype, map the keys);
- place: `store.place_params` (host numpy -> device arrays, consuming the host copies);
- the whole txt2img program: trace (Python -> jaxpr), lower (jaxpr -> StableHLO) and XLA compile (or the
  persistent compilation cache's read), from JAX's own `jax.monitoring` durations, then its run;
- with `--parts`, each part of that program jitted and timed alone on the same params: the text encoder on cond
  and uncond ids, one guided UNet evaluation (batch 2), the VAE decoder (compile time, and the median of
  `--repeats` runs) and XLA's temporary memory for it.

    .venv/bin/python bench/profile_sample.py --folder /tmp/sd15 --steps 3 --parts
    .venv/bin/python bench/profile_sample.py --folder /tmp/sd15 --param-dtype bf16

The whole-run phases add up to what `ldm-jax sample` spends before its PNGs are written (bench_sd_scale.py
times the command itself). The persistent compilation cache is off unless `--cache-dir` is given.
"""
from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import compile_cache, ldm, parallel, pipeline, store  # noqa: E402
from ldm_jax.convert import diffusers_pipeline  # noqa: E402

IMPORTED = time.perf_counter()
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "XLA compile"}
_durations: collections.Counter = collections.Counter()
_peak_after_compile: list[float] = []  # the process's peak RSS when each XLA compile (or cache read) ended


def _listen(event: str, duration: float, **_: object) -> None:
    if event in EVENTS:
        _durations[EVENTS[event]] += duration
    if EVENTS.get(event) == "XLA compile":
        _peak_after_compile.append(peak_gib())


def peak_gib() -> float:
    """This process's peak resident memory so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def add(self, phase: str, seconds: float, note: str = "") -> None:
        self.rows.append((phase, seconds, note))
        print(f"  {phase:<34} {seconds:8.2f} s  peak RSS {peak_gib():5.2f} GiB  {note}", flush=True)

    def print(self, title: str) -> None:
        print(f"\n{title}\n{'phase':<34} | {'seconds':>8} | note\n{'-' * 34}-+-{'-' * 8}-+-----")
        for phase, seconds, note in self.rows:
            print(f"{phase:<34} | {seconds:8.2f} | {note}")
        print(f"{'total':<34} | {sum(s for _, s, _ in self.rows):8.2f} |")


def timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def compile_part(table: Table, name: str, fn, args, repeats: int) -> None:
    """Jits fn alone: trace + lower, XLA compile, then the median of `repeats` runs."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    xla = time.perf_counter() - start
    memory = compiled.memory_analysis()
    timed(compiled, *args)  # a first run (allocations, page faults) before the timed ones
    runs = [timed(compiled, *args)[1] for _ in range(repeats)]
    table.add(f"{name}: trace + lower", traced)
    table.add(f"{name}: XLA compile", xla)
    temp = f", XLA temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB" if memory is not None else ""
    table.add(f"{name}: run", statistics.median(runs), f"median of {repeats}{temp}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--param-dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--parts", action="store_true", help="also jit and time the program's parts alone")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="the persistent compilation cache (default: off)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        compile_cache.enable(args.cache_dir)
    jax.monitoring.register_event_duration_secs_listener(_listen)
    table = Table()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.folder} at {args.size}x{args.size}, "
          f"DDIM {args.steps} steps, CFG {args.guidance}, params {args.param_dtype}", flush=True)
    table.add("import", IMPORTED - START, "jax, ldm_jax and what they import")

    start = time.perf_counter()
    model = store.load_model(args.folder, param_dtype=args.param_dtype,
                             dtype="bf16" if args.param_dtype == "bf16" else None)
    n = sum(x.size for x in jax.tree.leaves(model.params))
    table.add("load (read + convert)", time.perf_counter() - start, f"{n:,} params")
    start = time.perf_counter()
    mesh = parallel.make_mesh()
    params = pipeline.place_params(model.params, mesh, consume=True)
    table.add("place on the device", time.perf_counter() - start)

    config, options = model.config, model.options
    opts = {} if model.scheduler_config is None else diffusers_pipeline.sampler_options(model.scheduler_config, "ddim")
    opts.pop("prediction_type", None)
    sampler = pipeline.make_model_sampler(config, "ddim", args.steps, **opts)
    cond, uncond = pipeline.encode_prompts(model, ["a photo of a cat"], warn=False)
    f = config.downsample_factor
    noise = np.random.default_rng(0).standard_normal((1, args.size // f, args.size // f, config.latent_channels),
                                                     dtype=np.float32)

    def run():
        return pipeline.txt2img(config, params, sampler, cond, uncond, guidance_scale=args.guidance, noise=noise,
                                height=args.size, width=args.size, options=options, mesh=mesh)

    _durations.clear()
    _peak_after_compile.clear()
    start = time.perf_counter()
    images = run()
    dispatched = time.perf_counter() - start
    jax.block_until_ready(images)
    total = time.perf_counter() - start
    compiling = {k: _durations[k] for k in EVENTS.values()}
    for phase, seconds in compiling.items():
        note = f"peak RSS by then {max(_peak_after_compile):.2f} GiB" if phase == "XLA compile" else ""
        table.add(f"txt2img program: {phase}", seconds, note)
    table.add("txt2img program: rest of dispatch", dispatched - sum(compiling.values()), "placing inputs, cache I/O")
    table.add("txt2img program: run", total - dispatched, "text encoder, steps, VAE decode")
    _, again = timed(run)
    table.print("the command's phases")
    print(f"second txt2img call (compiled, run only): {again:.2f} s")

    if args.parts:
        parts = Table()
        print("\nparts, each jitted alone:", flush=True)
        ids = jnp.concatenate([cond, uncond])
        compile_part(parts, "text encoder (cond + uncond)",
                     lambda p, i: ldm.encode_conditioning(config, p, i, options=options), (params, ids), args.repeats)
        context = ldm.encode_conditioning(config, params, ids, options=options)
        x = jnp.asarray(np.concatenate([noise, noise]))
        t = jnp.full((2,), 500, jnp.int32)
        compile_part(parts, "UNet, one guided evaluation",
                     lambda p, x, t, c: ldm.apply_unet(config, p, x, t, c, options=options),
                     (params, x, t, context), args.repeats)
        compile_part(parts, "VAE decoder",
                     lambda p, z: ldm.decode_first_stage(config, p, z, options=options),
                     (params, jnp.asarray(noise)), args.repeats)
        parts.print("parts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
