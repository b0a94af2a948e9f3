"""Whole txt2img side by side: ours vs diffusers 0.39 Flax vs diffusers 0.42 PyTorch, identical weights and inputs.

One txt2img = text encoder on the prompt and the empty prompt, N-step DDIM (eta 0) with classifier-free
guidance (the UNet sees the batch twice), VAE decode. Each config's random-weight model is written once as a
diffusers folder (bench/common.py) and every side loads it: ours through our converter
(`store.load_model`), diffusers Flax through diffusers'/transformers' own PyTorch -> Flax conversion
(bench/reference_flax.py, run in .venv-ref: `bash bench/make_reference_venv.sh`), PyTorch directly.

Every side runs in its own process, one after the other, `--rounds` times in turn (timings drift +-15% on
shared machines: compare the medians, and the ratios, of one invocation). In a process: load, a first call
(compile + run), then `--runs` timed calls ("steady", median). "compile s" is JAX's own trace + lower +
compile time of the first call (jax.monitoring events) for ours and diffusers Flax ("-" for eager PyTorch).
The images of the sides are compared (max |difference| vs the first side's) to show the work is the same;
"GFLOP/s" (with --flops) is XLA's cost-analysis FLOPs of one txt2img over ours' steady time.

    .venv/bin/python bench/bench_pipeline.py --configs tiny                 # tiny, 8x8 latents, 50 steps
    .venv/bin/python bench/bench_pipeline.py --configs sd_v1 --rounds 1 --runs 1   # SD v1 UNet/VAE/CLIP, 32x32
    .venv/bin/python bench/bench_pipeline.py --configs tiny --sides ours --steps 10 --malloc tuned
    .venv/bin/python bench/bench_pipeline.py --configs sd_v1 --sides ours,flax --unet_loop --steps 3 --rounds 2

--unet_loop times only a jitted fori_loop of guided UNet calls (no text encoder, scheduler or VAE) for ours and
diffusers Flax: the UNets alone, on the same weights.

Worker mode (used by the driver): --worker ours|torch --folder F.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common

SIDES = ("ours", "flax", "torch")
DEFAULT_LATENT = {"tiny": 8, "small": 32, "sd_v1": 32}


# ------------------------------------------------------------------------------------------------- workers


def _timed_runs(run, runs: int):
    """(first call's seconds, the next `runs` calls' seconds, the last call's output)."""
    start = time.perf_counter()
    out = run()
    first_s, run_s = time.perf_counter() - start, []
    for _ in range(runs):
        start = time.perf_counter()
        out = run()
        run_s.append(time.perf_counter() - start)
    return first_s, run_s, out


def worker_ours(args) -> dict:
    """Our pipeline.txt2img on the folder's model and inputs (one device, float32)."""
    import jax

    from ldm_jax import pipeline, store
    from ldm_jax.convert.diffusers_pipeline import read_scheduler_config, sampler_options

    clock = common.CompileClock()
    start = time.perf_counter()
    model = store.load_model(args.folder, attention=args.attention)
    config, options = model.config, model.options
    params = pipeline.place_params(model.params)
    sampler = pipeline.make_model_sampler(config, "ddim", args.steps,
                                          **sampler_options(read_scheduler_config(args.folder), "ddim"))
    inputs = np.load(args.folder / common.INPUTS_FILE)
    load_s = time.perf_counter() - start

    def run():
        return np.asarray(pipeline.txt2img(config, params, sampler, inputs["cond"], inputs["uncond"],
                                           guidance_scale=args.guidance, noise=inputs["noise"], options=options))

    if args.unet_loop:
        run = _unet_loop(config, params, inputs, args.steps, args.guidance, options)

    compiled_before = clock.seconds
    first_s, run_s, images = _timed_runs(run, args.runs)
    np.save(args.folder / "out_ours.npy", images)
    result = dict(side="ours", load_s=load_s, first_s=first_s, run_s=run_s, devices=jax.device_count(),
                  compile_s=clock.seconds - compiled_before)
    if args.flops:
        result["gflop"] = pipeline_gflop(config, params, inputs, args.steps, options)
    return result


def _unet_loop(config, params, inputs, steps: int, guidance: float, options):
    """A jitted `fori_loop` of `steps` classifier-free-guided UNet calls (no scheduler, text encoder or VAE):
    the UNet alone, as bench/reference_flax.py --unet_loop runs diffusers' UNet."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import ldm

    ids = jnp.asarray(np.concatenate([inputs["uncond"], inputs["cond"]]))
    context = jax.jit(lambda p, c: ldm.encode_conditioning(config, p, c, options=options))(params, ids)

    @jax.jit
    def loop(p, x, context):
        def body(i, x):
            t = jnp.full((2 * x.shape[0],), 999 - 20 * i)
            eps = ldm.apply_unet(config, p, jnp.concatenate([x, x]), t, context, options=options)
            eps_uncond, eps_cond = jnp.split(eps, 2)
            return x - 0.01 * (eps_uncond + guidance * (eps_cond - eps_uncond))
        return jax.lax.fori_loop(0, steps, body, x)

    noise = jnp.asarray(inputs["noise"])
    return lambda: np.asarray(loop(params, noise, context))


def pipeline_gflop(config, params, inputs, steps: int, options) -> dict:
    """XLA cost-analysis GFLOP of the parts of one txt2img: text encoder (x2), UNet forward (x steps, CFG
    batch), VAE decode; and their total."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import ldm

    def flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) / 1e9

    noise, cond = jnp.asarray(inputs["noise"]), jnp.asarray(inputs["cond"])
    x2 = jnp.concatenate([noise, noise])
    context = jax.eval_shape(lambda c: ldm.encode_conditioning(config, params, c, options=options), cond)["context"]
    context2 = jnp.zeros((2 * context.shape[0], *context.shape[1:]), context.dtype)
    text = flops(lambda p, c: ldm.encode_conditioning(config, p, c, options=options), params, cond)
    unet = flops(lambda p, x, c: ldm.apply_unet(config, p, x, jnp.full((x.shape[0],), 500), {"context": c},
                                                options=options), params, x2, context2)
    vae = flops(lambda p, z: ldm.decode_first_stage(config, p, z, options=options), params, noise)
    return dict(text=text, unet=unet, vae=vae, total=2 * text + steps * unet + vae)


def worker_torch(args) -> dict:
    """diffusers PyTorch components, the loop of StableDiffusionPipeline.__call__ (eta 0, CFG), inference mode."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    folder = args.folder
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    inputs = np.load(folder / common.INPUTS_FILE)
    cond, uncond = torch.from_numpy(inputs["cond"]).long(), torch.from_numpy(inputs["uncond"]).long()
    noise = torch.from_numpy(inputs["noise"].transpose(0, 3, 1, 2).copy())
    load_s = time.perf_counter() - start

    @torch.inference_mode()
    def run():
        context = torch.cat([text_encoder(uncond)[0], text_encoder(cond)[0]])
        scheduler.set_timesteps(args.steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps_uncond, eps_cond = unet(x, t, encoder_hidden_states=context).sample.chunk(2)
            eps = eps_uncond + args.guidance * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
        return image.clamp(-1, 1).permute(0, 2, 3, 1).numpy()

    first_s, run_s, images = _timed_runs(run, args.runs)
    np.save(folder / "out_torch.npy", images)
    return dict(side="torch", load_s=load_s, first_s=first_s, run_s=run_s, threads=torch.get_num_threads())


# -------------------------------------------------------------------------------------------------- driver


def _worker_argv(side: str, folder: pathlib.Path, args, flops: bool) -> tuple[list[str], pathlib.Path]:
    common_args = ["--folder", str(folder), "--steps", str(args.steps), "--runs", str(args.runs),
                   "--guidance", str(args.guidance)] + (["--unet_loop"] if args.unet_loop else [])
    if side == "flax":
        return [str(common.ROOT / "bench" / "reference_flax.py"), *common_args], common.REF_VENV_PYTHON
    extra = ["--threads", str(args.threads), "--attention", args.attention] + (["--flops"] if flops else [])
    return [str(pathlib.Path(__file__).resolve()), "--worker", side, *common_args, *extra], common.VENV_PYTHON


def _model_folder(workdir: pathlib.Path, name: str, latent: int, batch: int) -> pathlib.Path:
    folder = workdir / f"{name}_l{latent}_b{batch}"
    if not (folder / "bench.json").is_file():
        print(f"writing random-weight {name} model to {folder} ...", flush=True)
        common.write_model_folder(name, folder, latent_size=latent, batch=batch)
    return folder


def bench_config(name: str, args, env: dict[str, str]) -> list[list]:
    """Runs every side `args.rounds` times on config `name`; returns the table rows."""
    latent = args.latent or DEFAULT_LATENT[name]
    folder = _model_folder(args.workdir, name, latent, args.batch)
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for round_ in range(args.rounds):
        for side in args.sides:
            argv, python = _worker_argv(side, folder, args, flops=args.flops and round_ == 0)
            res = common.run_worker(argv, env=env, python=python, timeout=args.timeout)
            results[side].append(res)
            steady = common.median(res["run_s"])
            print(f"  round {round_ + 1} {name} {side:5s}: first {res['first_s']:.2f} s, steady {steady:.3f} s, "
                  f"peak RSS {res['peak_rss_gib']:.1f} GiB", flush=True)
    outputs = {side: np.load(folder / f"out_{side}.npy") for side in args.sides}
    steady = {side: common.median([t for r in rs for t in r["run_s"]]) for side, rs in results.items()}
    rows = []
    for side, rs in results.items():
        # JAX sides: trace + lower + compile seconds of the first call; torch runs eagerly ("-").
        compile_s = common.median([r["compile_s"] for r in rs]) if "compile_s" in rs[0] else "-"
        diff = float(np.abs(outputs[side] - outputs[args.sides[0]]).max())
        ratio = steady["ours"] / steady[side] if "ours" in steady and side != "ours" else "-"
        gflop = rs[0].get("gflop", {}).get("total")
        rate = f"{gflop / steady[side]:.1f}" if gflop and side == "ours" else ""
        rows.append([f"{name} {latent}x{latent} b{args.batch}", side, common.median([r["load_s"] for r in rs]),
                     compile_s, steady[side], ratio, f"{diff:.1e}",
                     max(r["peak_rss_gib"] for r in rs), rate])
    if "ours" in results and results["ours"][0].get("gflop"):
        g = results["ours"][0]["gflop"]
        print(f"  {name}: XLA cost analysis GFLOP: text {g['text']:.2f} (x2), UNet {g['unet']:.1f} (x{args.steps}), "
              f"VAE decode {g['vae']:.1f}; total {g['total']:.0f}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="tiny", help=f"comma-separated, from {common.CONFIG_NAMES}")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {SIDES}; ratios need ours")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1, help="images per txt2img (the UNet sees twice as many)")
    parser.add_argument("--latent", type=int, default=0, help="latent side (default: tiny 8, sd_v1 32)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rounds", type=int, default=3, help="processes per side, alternating sides")
    parser.add_argument("--runs", type=int, default=2, help="timed calls per process after the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--attention", default="xla", help="our attention implementation")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default",
                        help="tuned: common.TUNED_MALLOC glibc settings for every side")
    parser.add_argument("--flops", action="store_true", help="ours: XLA cost-analysis GFLOP and GFLOP/s")
    parser.add_argument("--unet_loop", action="store_true",
                        help="time only a fori_loop of --steps guided UNet calls (sides ours, flax)")
    parser.add_argument("--workdir", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "ldm_jax_bench_pipeline")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    args = parser.parse_args(argv)

    if args.worker:
        common.emit_result({"ours": worker_ours, "torch": worker_torch}[args.worker](args))
        return
    args.sides = args.sides.split(",")
    bad = sorted(set(args.sides) - set(SIDES))
    if bad:
        parser.error(f"unknown sides {bad}; expected some of {SIDES}")
    if args.unet_loop and ("torch" in args.sides or args.flops):
        parser.error("--unet_loop compares the JAX UNets: use --sides ours,flax and no --flops")
    env = dict(common.TUNED_MALLOC) if args.malloc == "tuned" else {}
    header = ["config", "side", "load s", "compile s", "steady s", "ours/side", "max|diff|",
              "peak GiB", "GFLOP/s"]
    rows = []
    what = f"guided UNet loop, {args.steps} steps" if args.unet_loop else f"txt2img, DDIM {args.steps} steps"
    print(f"{what}, CFG {args.guidance}, float32, torch threads {args.threads}, "
          f"malloc {args.malloc}; {common.load_average()} at start", flush=True)
    for name in args.configs.split(","):
        rows += bench_config(name, args, env)
    print(f"\n{common.load_average()} at the end; medians of {args.rounds} process(es) x {args.runs} run(s); "
          f"max|diff| is against the first side's images")
    print(common.format_table(header, rows))


if __name__ == "__main__":
    main()
