"""Whole sampler runs with the tiny UNet (configs/unet_tiny.py) and classifier-free guidance: compile time and
run time at 10 and 50 steps, for every sampler. The driver is one lax.scan, so compile time should not grow
with the number of steps; run time should grow linearly, close to evaluations x one guided UNet call.

Shared machines drift: compile is reported as wall and process CPU seconds, and each row times the sampler
run and a lone guided UNet call alternately (medians), so "overhead/eval" compares like with like.

    .venv/bin/python bench/bench_samplers.py                  # all samplers, 10 and 50 steps
    .venv/bin/python bench/bench_samplers.py --samplers ddim,dpm++ --steps 10,50,100 --batch 4
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from ldm_jax.config import build_dataclass, load_config_file
from ldm_jax.diffusion import guidance, samplers
from ldm_jax.diffusion.schedule import ScheduleConfig, make_schedule
from ldm_jax.models.unet import build_unet, init_unet

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _alternating(fns, repeats: int) -> list[float]:
    """Median wall seconds of each fn() over `repeats` rounds that run them in turn (after a warm-up round)."""
    times = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            if round_:
                ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default=",".join(sorted(samplers.SAMPLERS)))
    parser.add_argument("--steps", default="10,50")
    parser.add_argument("--batch", type=int, default=2, help="images per run (the UNet sees 2x for CFG)")
    parser.add_argument("--context_len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = load_config_file(ROOT / "configs" / "unet_tiny.py")
    unet = build_unet(config.unet)
    params = init_unet(unet, jax.random.key(0), size=config.diffusion.image_size)
    schedule = make_schedule(build_dataclass(ScheduleConfig, config.diffusion, where="diffusion"))
    size, channels = config.diffusion.image_size, config.unet.in_channels
    noise = jax.random.normal(jax.random.key(1), (args.batch, size, size, channels))
    context = jax.random.normal(jax.random.key(2), (args.batch, args.context_len, config.unet.context_dim))
    uncond = jnp.zeros_like(context)

    @jax.jit
    def run(params, sampler, noise, key, context, uncond, scale):
        guided = guidance.classifier_free_guidance(lambda x, t, c: unet.apply(params, x, t, c))
        return samplers.sample(sampler, guided, noise, key, guidance.guided_cond(context, uncond, scale))

    unet_call = jax.jit(lambda p, x, t, c: unet.apply(p, x, t, c))
    x2, c2 = jnp.concatenate([noise, noise]), jnp.concatenate([uncond, context])
    t2 = jnp.full((2 * args.batch,), 500)

    def forward():
        return unet_call(params, x2, t2, c2)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; tiny UNet "
          f"({sum(x.size for x in jax.tree.leaves(params)):,} params), {args.batch}x{size}x{size}x{channels} "
          f"latents, CFG batch {2 * args.batch}, context {args.context_len}x{config.unet.context_dim}")
    print(f"{'sampler':8s} {'steps':>5s} {'evals':>5s} {'compile s':>9s} {'(cpu s)':>8s} {'run ms':>8s} "
          f"{'ms/eval':>8s} {'UNet ms':>8s} {'overhead/eval':>13s}")
    for name in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            sampler = samplers.make_sampler(name, schedule, steps)
            inputs = (params, sampler, noise, jax.random.key(3), context, uncond, 7.5)
            start, start_cpu = time.perf_counter(), time.process_time()
            compiled = run.lower(*inputs).compile()
            compile_s, compile_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            run_s, unet_s = _alternating([lambda run=compiled, args=inputs: run(*args), forward], args.repeats)
            per_eval = run_s / sampler.num_evals
            print(f"{name:8s} {steps:5d} {sampler.num_evals:5d} {compile_s:9.2f} {compile_cpu:8.2f} "
                  f"{run_s * 1e3:8.1f} {per_eval * 1e3:8.2f} {unet_s * 1e3:8.2f} {(per_eval - unet_s) * 1e3:10.2f} ms")


if __name__ == "__main__":
    main()
