"""SDXL base at full size on this CPU: load time, compile time, seconds per step and peak memory, ours vs
diffusers' PyTorch StableDiffusionXLPipeline on the same files (issue 15, item 7).

The model is the SDXL base architecture (UNet 2,567,463,684 params, CLIP ViT-L/14 and OpenCLIP bigG/14 text
towers, SD's KL-f8 VAE with scaling_factor 0.13025) with random weights, built by diffusers' and transformers'
own classes from the literal configs below (`SDXL_BASE`, those of stabilityai/stable-diffusion-xl-base-1.0) and
saved by `StableDiffusionXLPipeline.save_pretrained` as float16 safetensors. The tokenizers are a small real CLIP
BPE (tests/tokenizer_fixtures.py; no download); the embedding tables keep CLIP's 49,408 rows. `--tiny` is the
same code with `TINY_CHANGES` applied to those configs (a few MB, 64x64 images): the CPU smoke test.

One txt2img per call: both text towers, Euler (the folder's EulerDiscreteScheduler: leading spacing, offset 1)
with classifier-free guidance 5.0 (the UNet sees batch 2), the negative branch zeroed (SDXL's
force_zeros_for_empty_prompt, no negative prompt), micro-conditioning at the image size, VAE decode; batch 1,
the same prompt and initial latents on both sides. Each (side, dtype) runs in its own process, one after the
other, never two at once. In a process, after loading:
  1. first call: `--steps` N steps (ours: trace + compile + run; "compile s" is JAX's own compile time);
  2. `--runs` times: a short call that stops after 1 step, then a full N-step call (steady).
Both calls pass diffusers' `denoising_end` (ours: `txt2img(denoising_end=)`, traced, one compiled program for
both; the full call's fraction keeps all N steps), so s/step = (full - short) / (N - 1) on both sides, and
"fixed s" = short - s/step is the text towers + VAE decode + per-call overhead. PyTorch also reports its steps
timed by `callback_on_step_end` ("cb s/step", a cross-check). Memory is the process's peak resident set
(VmHWM) during loading and, reset after loading (Linux clear_refs), during the calls.

What each side holds: diffusers PyTorch loads its modules in the given torch_dtype (fp32 or bf16; the fp16 files
are upcast or recast). Ours: `store.load_model(folder, dtype=...)` converts to float32 numpy params (its contract;
so loading peaks at 4 bytes/param whatever the dtype) and sets the compute dtype; this bench then places them on
the device one leaf at a time, releasing each numpy array (so fp32 does not hold two copies), and for bf16 casts
them to bfloat16 with `RunOptions.param_dtype` bfloat16 (`--param-dtype fp32` keeps them float32 instead).

    .venv/bin/python bench/bench_sdxl.py --tiny                                # smoke test, 1-2 min
    .venv/bin/python bench/bench_sdxl.py --write-model /tmp/sdxl_base          # full size: 6.9 GB of fp16 files
    .venv/bin/python bench/bench_sdxl.py --folder /tmp/sdxl_base --flops       # the table (run alone!)
    .venv/bin/python bench/bench_sdxl.py --folder /tmp/sdxl_base --sides ours --dtypes bf16 --steps 3

Results go to a JSON file (`--out`, default runs/bench_sdxl_<time>.json, rewritten after every process).
A (side, dtype) whose estimated peak exceeds the memory available is skipped with the estimate printed
(`--force` runs it anyway); a worker that fails (e.g. killed for memory) is reported and the rest go on.

Worker mode (used by the driver): --worker ours|torch|flops --folder F --dtype fp32|bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common

SIDES = ("ours", "torch")
DTYPES = ("fp32", "bf16")
BYTES = {"fp32": 4, "bf16": 2}
PROMPT = "a photo of a cat"  # words of tests/tokenizer_fixtures.py's corpus: no unknown-word warning
GUIDANCE = 5.0
SEED = 0
INFO_FILE = "bench_sdxl.json"  # written beside the model: tiny or not, image size, param counts
GIB = 2**30

# ------------------------------------------------------------------------------------------------ configs

# stabilityai/stable-diffusion-xl-base-1.0's component configs (the constructor arguments that differ from the
# classes' defaults or that define the architecture).
SDXL_BASE = {
    "unet": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[5, 10, 20], use_linear_projection=True, cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu"),
    "text_encoder": dict(  # CLIP ViT-L/14's text tower (transformers CLIPTextModel)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "text_encoder_2": dict(  # OpenCLIP ViT-bigG/14's text tower (CLIPTextModelWithProjection)
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
        bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "vae": dict(  # SD's KL-f8 autoencoder with SDXL's scale factor
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
        act_fn="silu", norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "scheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False),
}
# --tiny: the same configs with these entries replaced (widths 32/48 text towers, context 32 + 48 = 80, pooled 48
# + 6 time ids x 8 = 96 add-embedding inputs, 64 px images -> 8x8 latents).
TINY_CHANGES = {
    "unet": dict(sample_size=8, layers_per_block=1, block_out_channels=[32, 64, 64],
                 transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 2], cross_attention_dim=80,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=96),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
    "text_encoder_2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           projection_dim=48),
    "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64),
}


def component_configs(tiny: bool) -> dict[str, dict]:
    """The diffusers / transformers constructor arguments of every component (deep copies)."""
    return common.component_configs(SDXL_BASE, TINY_CHANGES, tiny)


def image_size(tiny: bool) -> int:
    return component_configs(tiny)["vae"]["sample_size"]


def ldm_config(tiny: bool, *, pad_token_id: int = 49407):
    """Our LDMConfig of the same model, built in memory from the configs above by the converters that
    `load_diffusers_pipeline` uses (for bench/gpu.py and the FLOP count: no files, no torch). pad_token_id: the
    first tokenizer's (its end-of-text id); the second pads with 0. The ours worker checks that it equals the
    config the store reads from the written folder."""
    from ldm_jax.convert.diffusers_autoencoder import config_from_diffusers
    from ldm_jax.convert.diffusers_pipeline import (SDXL_OUTPUT_LAYER, prediction_type_from_scheduler,
                                                    schedule_from_scheduler)
    from ldm_jax.convert.diffusers_unet import unet_config_from_diffusers
    from ldm_jax.convert.transformers_clip import clip_text_config_from_transformers
    from ldm_jax.ldm import DiffusionConfig, LDMConfig

    c = component_configs(tiny)
    towers = [clip_text_config_from_transformers(c[name], pad_token_id=pad, output_layer=SDXL_OUTPUT_LAYER,
                                                 with_projection=projection)
              for name, pad, projection in (("text_encoder", pad_token_id, False), ("text_encoder_2", 0, True))]
    scheduler = c["scheduler"]
    diffusion = DiffusionConfig(
        schedule=schedule_from_scheduler(scheduler), prediction_type=prediction_type_from_scheduler(scheduler),
        scale_factor=c["vae"]["scaling_factor"], conditioning_key="crossattn", image_size=c["unet"]["sample_size"],
        channels=c["vae"]["latent_channels"], force_zeros_for_empty_prompt=True)
    return LDMConfig(first_stage=config_from_diffusers(c["vae"], kind="kl"), unet=unet_config_from_diffusers(c["unet"]),
                     diffusion=diffusion, cond_stage=towers[0], cond_stage_2=towers[1])


def token_inputs(config, batch: int, seed: int = SEED) -> tuple[dict, dict]:
    """(cond, uncond) as `pipeline.encode_prompts` gives them for an SDXL config without a tokenizer: random prompt
    ids [BOS, 10 tokens, EOS, pad...] per tower, the empty negative zeroed (force_zeros_for_empty_prompt)."""
    rng = np.random.default_rng(seed + 2)
    cond = {}
    for key, tower in (("tokens", config.cond_stage), ("tokens_2", config.cond_stage_2)):
        ids = np.full((batch, tower.max_length), tower.pad_token_id, np.int32)
        ids[:, 0], ids[:, 11] = 49406, 49407
        ids[:, 1:11] = rng.integers(0, 49406, (batch, 10))
        cond[key] = ids
    uncond = {k: v.copy() for k, v in cond.items()}
    cond["zero_text"], uncond["zero_text"] = np.zeros(batch, np.float32), np.ones(batch, np.float32)
    return cond, uncond


def initial_latents(size: int, seed: int = SEED) -> np.ndarray:
    """N(0, 1) initial latents (1, size/8, size/8, 4) float32 NHWC, the same for both sides."""
    return np.random.default_rng(seed).standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)


# ------------------------------------------------------------------------------------------ writing the model


def write_model(folder: str | os.PathLike, *, tiny: bool, seed: int = SEED) -> dict:
    """Builds the random-weight SDXL base with diffusers' / transformers' classes (their default init, then cast
    to float16 one module at a time) and saves it with StableDiffusionXLPipeline.save_pretrained (safetensors;
    `common.write_random_diffusers_folder`). Writes INFO_FILE beside it; returns that dict (param counts, seconds
    per phase)."""
    return common.write_random_diffusers_folder(
        folder, component_configs(tiny), scheduler_class="EulerDiscreteScheduler", info_file=INFO_FILE,
        info=dict(tiny=tiny, size=image_size(tiny)), seed=seed)


def read_info(folder: pathlib.Path) -> dict:
    """The INFO_FILE that `write_model` wrote in `folder`."""
    return common.read_info(folder, INFO_FILE)


# ---------------------------------------------------------------------------------------------- measurement


def stop_fractions(kept, num_train_timesteps: int, steps: int) -> tuple[float, float]:
    """(full, short) denoising_end fractions: full keeps all `steps` steps, short only the first. `kept(d)` is the
    side's own count of the steps its pipeline runs with denoising_end=d. diffusers' cutoff is
    round(T - d * T) (timesteps >= it run): a cutoff c is reached with d = (T - c + 0.25) / T."""
    T = num_train_timesteps
    full = (T - 0.25) / T  # cutoff 0: every timestep (>= 0) runs
    short = next((T - c + 0.25) / T for c in range(T, 0, -1) if kept((T - c + 0.25) / T) >= 1)
    if kept(full) != steps or kept(short) != 1:
        raise RuntimeError(f"denoising_end fractions: full {full} keeps {kept(full)} of {steps} steps, "
                           f"short {short} keeps {kept(short)} (expected {steps} and 1)")
    return full, short


def _calls(run, full: float, short: float, runs: int) -> dict:
    """The call sequence of both workers: a first full call, then `runs` x (short, full). run(end) -> images."""
    start = time.perf_counter()
    images = run(full)
    first_s, short_s, full_s = time.perf_counter() - start, [], []
    for _ in range(runs):
        for end, times in ((short, short_s), (full, full_s)):
            start = time.perf_counter()
            images = run(end)
            times.append(time.perf_counter() - start)
    return dict(first_s=first_s, short_s=short_s, full_s=full_s, images=images)


def worker_ours(args) -> dict:
    """Our pipeline.txt2img on the folder's model (one device)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from ldm_jax import parallel, pipeline, store
    from ldm_jax.convert.diffusers_pipeline import read_scheduler_config, sampler_options
    from ldm_jax.diffusion.samplers import denoising_bounds

    memory, clock = common.PeakMemory(), common.CompileClock()
    start = time.perf_counter()
    model = store.load_model(args.folder, dtype=args.dtype, attention=args.attention)
    convert_s = time.perf_counter() - start
    config = model.config
    built = ldm_config(read_info(args.folder)["tiny"], pad_token_id=config.cond_stage.pad_token_id)
    param_dtype = jnp.bfloat16 if args.dtype == "bf16" and args.param_dtype == "compute" else jnp.float32
    options = dataclasses.replace(model.options, param_dtype=param_dtype)
    flat = traverse_util.flatten_dict(model.params)
    model = dataclasses.replace(model, params={})  # `flat` now holds the only reference to each array
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    replicated = parallel.replicated(mesh)
    placed = {}
    for path in list(flat):  # one leaf at a time: at most one array exists twice
        array = flat.pop(path)
        placed[path] = jax.device_put(array.astype(param_dtype) if array.dtype != param_dtype else array, replicated)
        del array
    params = jax.block_until_ready(traverse_util.unflatten_dict(placed))
    del placed
    load_s = time.perf_counter() - start
    peak_load = memory.mark("load")
    rss_loaded = memory.current("VmRSS")

    sampler = pipeline.make_model_sampler(config, "euler", args.steps,
                                          **sampler_options(read_scheduler_config(args.folder), "euler"))
    T = config.diffusion.schedule.num_timesteps
    full, short = stop_fractions(lambda d: denoising_bounds(sampler, T, denoising_end=d)[1], T, args.steps)
    cond, uncond = pipeline.encode_prompts(model, [PROMPT])
    noise = initial_latents(args.size, args.seed)

    def run(end):
        return np.asarray(pipeline.txt2img(config, params, sampler, cond, uncond, guidance_scale=args.guidance,
                                           noise=noise, height=args.size, width=args.size, mesh=mesh,
                                           options=options, denoising_end=end))

    compiled_before = clock.seconds
    result = _calls(run, full, short, args.runs)
    np.save(_output_path(args), result.pop("images"))
    return dict(result, side="ours", dtype=args.dtype, params_held=jnp.dtype(param_dtype).name,
                compute_dtype=jnp.dtype(options.dtype).name, load_s=load_s, convert_s=convert_s,
                compile_s=clock.seconds - compiled_before, traces=pipeline.trace_count("txt2img"),
                peak_load_gib=peak_load, rss_loaded_gib=rss_loaded, peak_run_gib=memory.mark("run"),
                hwm_resettable=memory.resettable, devices=jax.device_count(), backend=jax.default_backend(),
                config_matches_ldm_config=built == config)


def worker_torch(args) -> dict:
    """diffusers' StableDiffusionXLPipeline on the folder, in the given torch_dtype, inference mode."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import is_accelerate_available

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    memory = common.PeakMemory()
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(args.folder, torch_dtype=dtype, local_files_only=True)
    load_s = time.perf_counter() - start
    peak_load = memory.mark("load")
    rss_loaded = memory.current("VmRSS")
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    T = scheduler.config.num_train_timesteps
    scheduler.set_timesteps(args.steps)
    timesteps = scheduler.timesteps.numpy()
    # diffusers' own rule (StableDiffusionXLPipeline.__call__): the timesteps >= round(T - d * T) run.
    full, short = stop_fractions(lambda d: int((timesteps >= int(round(T - d * T))).sum()), T, args.steps)
    # The latents go in the pipeline's dtype (its UNet does not cast its input).
    latents = torch.from_numpy(initial_latents(args.size, args.seed).transpose(0, 3, 1, 2).copy()).to(dtype)
    stamps: list[float] = []
    step_s: list[float] = []

    def on_step(pipe, i, t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    def run(end):
        stamps.clear()
        with torch.inference_mode():
            out = pipe(prompt=[PROMPT], height=args.size, width=args.size, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, latents=latents, denoising_end=end, output_type="np",
                       callback_on_step_end=on_step).images
        if end == full:
            step_s.extend(np.diff(stamps).tolist())
        return out * 2.0 - 1.0

    result = _calls(run, full, short, args.runs)
    np.save(_output_path(args), result.pop("images").astype(np.float32))
    return dict(result, side="torch", dtype=args.dtype, params_held=str(pipe.unet.dtype).replace("torch.", ""),
                compute_dtype=str(dtype).replace("torch.", ""), load_s=load_s, callback_step_s=step_s,
                peak_load_gib=peak_load, rss_loaded_gib=rss_loaded, peak_run_gib=memory.mark("run"),
                hwm_resettable=memory.resettable, threads=torch.get_num_threads(),
                low_cpu_mem_usage=is_accelerate_available(), torch_version=torch.__version__)


def worker_flops(args) -> dict:
    """XLA cost-analysis GFLOP of one txt2img's parts, lowered (not compiled) on abstract params: both text towers,
    one guided UNet call (batch 2), VAE decode. Attention "jax_nn" (XLA's count of "xla"'s per-head loop on CPU
    would count a loop body once)."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import ldm

    config = ldm_config(read_info(args.folder)["tiny"])
    options = ldm.RunOptions(attention="jax_nn")
    params = jax.eval_shape(lambda k: ldm.init_params(config, k), jax.random.key(0))
    cond, _ = token_inputs(config, 1)
    cond["time_ids"] = np.zeros((1, config.num_time_ids), np.float32)

    def gflop(fn, *xs):
        cost = jax.jit(fn).lower(*xs).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) / 1e9

    def encode(p, c):
        return ldm.encode_conditioning(config, p, c, options=options)

    encoded = jax.eval_shape(encode, params, cond)
    cond2 = {k: jax.ShapeDtypeStruct((2, *v.shape[1:]), v.dtype) for k, v in encoded.items()}
    h = args.size // config.downsample_factor
    x2 = jax.ShapeDtypeStruct((2, h, h, config.latent_channels), jnp.float32)
    z = jax.ShapeDtypeStruct((1, h, h, config.latent_channels), jnp.float32)
    text = gflop(encode, params, cond)
    unet = gflop(lambda p, x, c: ldm.apply_unet(config, p, x, jnp.full((2,), 500), c, options=options),
                 params, x2, cond2)
    vae = gflop(lambda p, z: ldm.decode_first_stage(config, p, z, options=options), params, z)
    return dict(side="flops", text_gflop=text, unet_step_gflop=unet, vae_gflop=vae)


def _output_path(args) -> pathlib.Path:
    return args.folder / f"out_{args.worker}_{args.dtype}.npy"


# --------------------------------------------------------------------------------------------------- driver


def memory_estimate_gib(side: str, dtype: str, info: dict, size: int, param_dtype: str) -> float:
    """A rough peak of one worker, to skip what cannot fit. Loading: ours converts to float32 numpy whatever the
    dtype (store.load_model); diffusers reads each module's fp16 state dict beside the module (2 bytes/param of the
    largest module on top). Sampling: the params held plus working memory, proportional to the pixels; at 1024x1024
    from XLA's memory_analysis of our compiled SDXL txt2img (2026-12): 3.5 GiB temporaries in float32, 10.6 GiB in
    bfloat16, of which ~9.6 GiB are float32 copies of the UNet's weights (XLA on CPU computes bf16 convolutions and
    matmuls in float32 and holds the converted weights); PyTorch guessed at 3 / 2 GiB."""
    n, pixels = info["total_params"], (size / 1024) ** 2
    held = n * (4 if dtype == "fp32" or (side == "ours" and param_dtype == "fp32") else 2)
    if side == "ours":
        load = 4 * n
        work = 3.5 * GIB * pixels if dtype == "fp32" else 4 * info["params"]["unet"] + 1.0 * GIB * pixels
    else:
        load = held + 2 * max(info["params"].values())
        work = (3 if dtype == "fp32" else 2) * GIB * pixels
    return max(load, held + work) / GIB + 0.5  # + interpreter and libraries


def _worker_argv(side: str, dtype: str, args) -> list[str]:
    return [str(pathlib.Path(__file__).resolve()), "--worker", side, "--folder", str(args.folder), "--dtype", dtype,
            "--size", str(args.size), "--steps", str(args.steps), "--runs", str(args.runs), "--guidance",
            str(args.guidance), "--threads", str(args.threads), "--seed", str(args.seed), "--attention",
            args.attention, "--param-dtype", args.param_dtype]


def _row(res: dict, flops: dict | None, diff: str) -> list:
    full = common.median(res["full_s"]) if res["full_s"] else float("nan")
    short = common.median(res["short_s"]) if res["short_s"] else float("nan")
    step = (full - short) / (res["steps"] - 1) if res["steps"] > 1 else float("nan")
    res.update(step_s=step, fixed_s=short - step)
    rate = f"{flops['unet_step_gflop'] / step:.0f}" if flops and step == step else ""
    cb = f"{common.median(res['callback_step_s']):.3g}" if res.get("callback_step_s") else "-"
    compile_s = res.get("compile_s", "-")
    return [res["side"], res["dtype"], res["params_held"], res["load_s"], res["first_s"], compile_s, full, step, cb,
            short - step, rate, res["peak_load_gib"], res["peak_run_gib"], diff]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("ours", "torch", "flops"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--write-model", type=pathlib.Path, metavar="DIR",
                        help="write the random-weight model (fp16 safetensors) to DIR and exit")
    parser.add_argument("--folder", type=pathlib.Path, help="a folder written by --write-model")
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL-shaped model (written to a temp dir "
                        "unless --folder / --write-model say where)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {SIDES}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {DTYPES}")
    parser.add_argument("--steps", type=int, default=2, help="Euler steps of a full call (>= 2)")
    parser.add_argument("--runs", type=int, default=1, help="(short, full) call pairs after the first call")
    parser.add_argument("--size", type=int, default=0, help="image side (default: the model's, 1024 / tiny 64)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--attention", default="xla", help="our attention implementation")
    parser.add_argument("--param-dtype", choices=("compute", "fp32"), default="compute",
                        help="ours: params held in the compute dtype (default) or float32")
    parser.add_argument("--flops", action="store_true", help="XLA cost-analysis GFLOP per step (a short process)")
    parser.add_argument("--force", action="store_true", help="run configurations the memory estimate would skip")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results JSON (default runs/bench_sdxl_*.json)")
    args = parser.parse_args(argv)

    if args.worker:
        args.size = args.size or read_info(args.folder)["size"]
        worker = {"ours": worker_ours, "torch": worker_torch, "flops": worker_flops}[args.worker]
        common.emit_result(dict(worker(args), steps=args.steps, size=args.size))
        return
    if args.steps < 2:
        parser.error("--steps must be >= 2 (s/step is the difference of an N-step and a 1-step call)")
    if args.write_model:
        print(f"writing the random-weight SDXL base{' (tiny)' if args.tiny else ''} to {args.write_model} ...",
              flush=True)
        info = write_model(args.write_model, tiny=args.tiny, seed=args.seed)
        print(f"{info['total_params']:,} params, {info['bytes_on_disk'] / 1e9:.2f} GB on disk "
              f"(tokenizer vocabulary {info['tokenizer_vocab']}); {json.dumps(info['seconds'])}")
        if not args.folder:
            return
    if args.folder is None:
        if not args.tiny:
            parser.error("give --folder (written by --write-model DIR) or --tiny")
        args.folder = pathlib.Path(tempfile.gettempdir()) / "ldm_jax_bench_sdxl" / "tiny"
        if not (args.folder / INFO_FILE).is_file():
            print(f"writing the tiny model to {args.folder} ...", flush=True)
            write_model(args.folder, tiny=True, seed=args.seed)
    info = read_info(args.folder)
    args.size = args.size or info["size"]
    sides, dtypes = args.sides.split(","), args.dtypes.split(",")
    bad = sorted(set(sides) - set(SIDES)) + sorted(set(dtypes) - set(DTYPES))
    if bad:
        parser.error(f"unknown sides/dtypes {bad}; expected some of {SIDES} / {DTYPES}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or common.ROOT / "runs" / f"bench_sdxl_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(folder=str(args.folder), info=info, size=args.size, steps=args.steps, runs=args.runs,
                  guidance=args.guidance, threads=args.threads, attention=args.attention,
                  param_dtype=args.param_dtype, started=stamp, load_average_start=common.load_average(),
                  results=[], skipped=[], failed=[])

    def save():
        out.write_text(json.dumps(record, indent=1))

    name = "tiny SDXL-shaped" if info["tiny"] else "SDXL base"
    print(f"{name} ({info['total_params'] / 1e9:.3g}B params: {info['params']}) at {args.size}x{args.size}, "
          f"Euler {args.steps} steps, CFG {args.guidance}, batch 1; torch threads {args.threads}; "
          f"{common.load_average()} at start", flush=True)
    flops = None
    if args.flops:
        flops = common.run_worker([str(pathlib.Path(__file__).resolve()), "--worker", "flops", "--folder",
                                   str(args.folder), "--size", str(args.size)], timeout=args.timeout)
        record["flops"] = flops
        print(f"  XLA cost analysis GFLOP: text towers {flops['text_gflop']:.3g}, guided UNet step "
              f"{flops['unet_step_gflop']:.4g}, VAE decode {flops['vae_gflop']:.4g}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for dtype in dtypes:
        for side in sides:
            need, have = memory_estimate_gib(side, dtype, info, args.size, args.param_dtype), common.available_gib()
            if need > have - 0.5 and not args.force:
                reason = f"estimated peak {need:.1f} GiB > {have:.1f} GiB available - 0.5"
                print(f"  {side} {dtype}: skipped ({reason}; --force runs it)", flush=True)
                record["skipped"].append(dict(side=side, dtype=dtype, reason=reason))
                save()
                continue
            print(f"  {side} {dtype}: running (estimated peak {need:.1f} GiB, {have:.1f} available) ...", flush=True)
            try:
                res = common.run_worker(_worker_argv(side, dtype, args), timeout=args.timeout)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                message = str(e).strip().splitlines()
                print(f"  {side} {dtype}: FAILED: {message[0] if message else e}\n    "
                      + "\n    ".join(message[-6:]), flush=True)
                record["failed"].append(dict(side=side, dtype=dtype, error=str(e)[-4000:]))
                save()
                continue
            results[(side, dtype)] = res
            if res.get("config_matches_ldm_config") is False:
                print("  WARNING: bench_sdxl.ldm_config (used by gpu.py and --flops) differs from the config the "
                      "store read from the folder", flush=True)
            record["results"].append(res)
            save()
            print(f"  {side} {dtype}: load {res['load_s']:.1f} s, first call {res['first_s']:.1f} s, full "
                  f"{res['full_s']} s, short {res['short_s']} s; peak load {res['peak_load_gib']:.2f} / run "
                  f"{res['peak_run_gib']:.2f} GiB", flush=True)
    rows = []
    for (side, dtype), res in results.items():
        diff = "-"
        if side != "ours" and ("ours", dtype) in results:
            ours_images = np.load(args.folder / f"out_ours_{dtype}.npy")
            diff = f"{float(np.abs(np.load(args.folder / f'out_{side}_{dtype}.npy') - ours_images).max()):.1e}"
        rows.append(_row(res, flops, diff))
    record["load_average_end"] = common.load_average()
    save()
    print(f"\n{common.load_average()} at the end; results in {out}")
    print("s/step = (full - short) / (steps - 1); fixed = short call - s/step (text towers, VAE decode, overhead); "
          "cb s/step: PyTorch's steps timed by callback; max|diff|: images vs ours at the same dtype")
    print(common.format_table(["side", "dtype", "params", "load s", "first call s", "compile s", "full call s",
                               "s/step", "cb s/step", "fixed s", "GFLOP/s", "peak load GiB", "peak run GiB",
                               "max|diff|"], rows))
    for entry in record["skipped"] + record["failed"]:
        print(f"{entry['side']} {entry['dtype']}: {entry.get('reason') or 'failed (see ' + str(out) + ')'}")


if __name__ == "__main__":
    main()
