"""txt2img on one GPU, SD v1 at 512x512 and SDXL base at 1024x1024: latency, images/s and model FLOP utilisation,
per attention implementation.

Configs (random weights, built in memory; `GPU_CONFIGS` holds each one's defaults):
- sd_v1: the SD v1 model (UNet 860M, CLIP ViT-L/14 text encoder, KL-f8 VAE) at 512x512 (64x64 latents), 50 DDIM
  steps with classifier-free guidance 7.5, batch 1 and 8.
- sdxl_base: the SDXL base (UNet 2.57B, CLIP ViT-L/14 + OpenCLIP bigG/14 towers, KL-f8 VAE with scale 0.13025;
  the architecture bench/bench_sdxl.py writes, `bench_sdxl.ldm_config`) at 1024x1024 (128x128 latents), 50 Euler
  steps (leading spacing, offset 1: the SDXL base scheduler's), guidance 5.0 with the empty negative zeroed
  (force_zeros_for_empty_prompt), micro-conditioning at the image size, batch 1 and 4.
Compute and parameters in bfloat16 (norms, softmax, the last conv and the sampler stay float32), on the first
device. For attention "jax_nn" (`jax.nn.dot_product_attention`, which XLA lowers to cuDNN's fused attention on
GPU for bf16; the table says whether the compiled UNet contains the cuDNN call) and "xla" (einsum-softmax-einsum).
Per row: compile seconds (first call - steady), latency (median of --repeats), images/s, achieved TFLOP/s and
MFU = XLA cost-analysis FLOPs of one txt2img (text encoder(s) x2 + UNet x steps + VAE decode) / latency / peak,
with the peak from --peak_tflops or the table below (dense bf16 tensor-core TFLOP/s from the vendors' data sheets).

    bash bench/gpu.sh                                # = python bench/gpu.py (needs jax[cuda12]): both configs
    python bench/gpu.py --configs sdxl_base --batches 1,4 --attention jax_nn,xla --peak_tflops 989
    .venv/bin/python bench/gpu.py --tiny             # CPU smoke test: tiny SD and SDXL-shaped configs, 4 steps,
                                                     # float32, peak = the measured matmul rate

STATUS: written and smoke-tested on CPU (--tiny) only; it has not been run on a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_sdxl
import common

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; matched against jax's device_kind, first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """One model's defaults: image size, sampler and its options, guidance, batch sizes."""

    size: int
    steps: int
    batches: str
    sampler: str
    guidance: float
    sampler_options: dict[str, Any]


SDXL_EULER = dict(timestep_spacing="leading", steps_offset=1)  # bench_sdxl.SDXL_BASE["scheduler"]'s spacing
GPU_CONFIGS = {
    "sd_v1": GpuConfig(512, 50, "1,8", "ddim", 7.5, dict(timestep_spacing="leading", steps_offset=1)),
    "sdxl_base": GpuConfig(1024, 50, "1,4", "euler", 5.0, SDXL_EULER),
    # --tiny (CPU smoke test)
    "tiny": GpuConfig(32, 4, "1,2", "ddim", 7.5, dict(timestep_spacing="leading", steps_offset=1)),
    "sdxl_tiny": GpuConfig(64, 4, "1,2", "euler", 5.0, SDXL_EULER),
}


def peak_tflops(device_kind: str, override: float | None) -> float | None:
    """The --peak_tflops override, else the table's value for `device_kind`, else None (MFU not reported)."""
    if override:
        return override
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def build_model(name: str, size: int):
    """(LDMConfig, random float32 numpy params) of config `name` for `size` x `size` images."""
    if name.startswith("sdxl"):
        config = bench_sdxl.ldm_config(tiny=name == "sdxl_tiny")
    else:
        config = common.bench_config(name, size // (4 if name == "tiny" else 8))
    return config, common.random_params(config)


def model_inputs(config, batch: int, latent: int):
    """(cond, uncond, noise) for `batch` images: token ids (a dict per tower for SDXL, as `encode_prompts` gives
    them) and the initial latents (B, latent, latent, C)."""
    if not config.structured_conditioning:
        return common.bench_inputs(config, batch, latent)
    cond, uncond = bench_sdxl.token_inputs(config, batch)
    noise = np.random.default_rng(bench_sdxl.SEED).standard_normal((batch, latent, latent, config.latent_channels))
    return cond, uncond, noise.astype(np.float32)


def one_point(args, spec: GpuConfig, config, params, attention: str, batch: int, dtype, mesh) -> dict:
    """Compiles and times one (attention, batch) point; returns its table values."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import ldm, pipeline

    options = ldm.RunOptions(attention=attention, dtype=dtype, param_dtype=jnp.dtype(args.param_dtype))
    latent = spec.size // config.downsample_factor
    cond, uncond, noise = model_inputs(config, batch, latent)
    sampler = pipeline.make_model_sampler(config, spec.sampler, spec.steps, **spec.sampler_options)

    def run():
        return np.asarray(pipeline.txt2img(config, params, sampler, cond, uncond, guidance_scale=spec.guidance,
                                           noise=noise, height=spec.size, width=spec.size, mesh=mesh,
                                           options=options))

    first = common.timed(run)
    latency = common.median([common.timed(run) for _ in range(args.repeats)])
    images = run()
    if not np.isfinite(images).all():
        raise FloatingPointError(f"attention={attention} batch={batch}: non-finite images")

    def gflop(compiled):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) / 1e9

    def encode(p, c):
        return ldm.encode_conditioning(config, p, c, options=options)

    text_in = jax.tree.map(jnp.asarray, cond)
    if config.text_time:  # the pipelines add the micro-conditioning; encode_conditioning takes it as an input
        text_in["time_ids"] = jnp.zeros((batch, config.num_time_ids), jnp.float32)
    encoded = jax.eval_shape(encode, params, text_in)
    cond2 = {k: jnp.zeros((2 * batch, *v.shape[1:]), v.dtype) for k, v in encoded.items()}  # the guided batch
    x2 = jnp.zeros((2 * batch, latent, latent, config.latent_channels), jnp.float32)
    unet = jax.jit(lambda p, x, c: ldm.apply_unet(config, p, x, jnp.full((x.shape[0],), 500), c, options=options)
                   ).lower(params, x2, cond2).compile()
    text = gflop(jax.jit(encode).lower(params, text_in).compile())
    vae = gflop(jax.jit(lambda p, z: ldm.decode_first_stage(config, p, z, options=options)).lower(
        params, jnp.asarray(noise)).compile())
    total = 2 * text + spec.steps * gflop(unet) + vae
    return dict(compile_s=first - latency, latency_s=latency, images_per_s=batch / latency,
                tflops=total / 1e3 / latency, cudnn="cudnn" in unet.as_text().lower())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny SD and SDXL-shaped configs, "
                        "4 steps, float32")
    parser.add_argument("--configs", default="sd_v1,sdxl_base", help=f"comma-separated, from {sorted(GPU_CONFIGS)}")
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (default: the config's)")
    parser.add_argument("--steps", type=int, default=0, help="sampler steps (default: the config's, 50)")
    parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: the config's)")
    parser.add_argument("--attention", default="jax_nn,xla")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param_dtype", default="bfloat16", help="storage dtype of the weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for the MFU column")
    args = parser.parse_args(argv)
    if args.tiny:
        args.configs = "tiny,sdxl_tiny"
        args.dtype = args.param_dtype = "float32"
    names = args.configs.split(",")
    bad = sorted(set(names) - set(GPU_CONFIGS))
    if bad:
        parser.error(f"unknown configs {bad}; expected some of {sorted(GPU_CONFIGS)}")

    import jax
    import jax.numpy as jnp

    from ldm_jax import parallel, pipeline

    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, args.peak_tflops)
    if peak is None and device.platform == "cpu":
        from bench_unet import matmul_rate

        peak = matmul_rate() / 1e12  # on CPU: the measured float32 matmul rate stands in for the peak
    mesh = parallel.make_mesh(devices=[device])
    dtype = jnp.dtype(args.dtype)
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; compute {args.dtype}, weights "
          f"{args.param_dtype}; peak {'unknown (give --peak_tflops)' if peak is None else f'{peak:.3g} TFLOP/s'}",
          flush=True)
    rows = []
    for name in names:
        spec = GPU_CONFIGS[name]
        spec = dataclasses.replace(spec, size=args.size or spec.size, steps=args.steps or spec.steps,
                                   batches=args.batches or spec.batches)
        config, params = build_model(name, spec.size)
        params = jax.tree.map(lambda x: x.astype(args.param_dtype) if np.issubdtype(x.dtype, np.floating) else x,
                              params)
        params = pipeline.place_params(params, mesh)
        what = f"{name} {spec.size}px, {spec.steps} {spec.sampler} steps, CFG {spec.guidance}"
        print(f"{what}: {sum(x.size for x in jax.tree.leaves(params)) / 1e9:.3g}B params", flush=True)
        for attention in args.attention.split(","):
            for batch in (int(b) for b in spec.batches.split(",")):
                r = one_point(args, spec, config, params, attention, batch, dtype, mesh)
                mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
                rows.append([what, attention, batch, r["compile_s"], r["latency_s"], r["images_per_s"], r["tflops"],
                             mfu, "yes" if r["cudnn"] else "no"])
                print(f"  {attention} batch {batch}: latency {r['latency_s']:.3f} s", flush=True)
        del params
    print(common.format_table(["config", "attention", "batch", "compile s", "latency s", "images/s", "TFLOP/s", "MFU",
                               "cuDNN attention"], rows))


if __name__ == "__main__":
    main()
