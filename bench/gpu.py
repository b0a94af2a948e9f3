"""SD-v1-shaped txt2img on one GPU: latency, images/s and model FLOP utilisation, per attention implementation.

The SD v1 model (UNet 860M, CLIP ViT-L/14 text encoder, KL-f8 VAE; random weights) at 512x512 (64x64 latents),
50 DDIM steps with classifier-free guidance, batch 1 and 8, bfloat16 compute and parameters (norms, softmax,
the last conv and the sampler stay float32), on the first device. For attention "jax_nn"
(`jax.nn.dot_product_attention`, which XLA lowers to cuDNN's fused attention on GPU for bf16; the table says
whether the compiled program contains the cuDNN call) and "xla" (einsum-softmax-einsum). Per row: compile
seconds (first call - steady), latency (median of --repeats), images/s, achieved TFLOP/s and MFU = XLA
cost-analysis FLOPs of one txt2img (text encoder x2 + UNet x steps + VAE decode) / latency / peak, with the
peak from --peak_tflops or the table below (dense bf16 tensor-core TFLOP/s from the vendors' data sheets).

    bash bench/gpu.sh                                # = python bench/gpu.py (needs jax[cuda12])
    python bench/gpu.py --batches 1,8 --attention jax_nn,xla --peak_tflops 989
    .venv/bin/python bench/gpu.py --tiny             # CPU smoke test: tiny config, 4 steps, float32 peak = matmul

STATUS: written and smoke-tested on CPU (--tiny) only; it has not been run on a GPU.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; matched against jax's device_kind, first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


def peak_tflops(device_kind: str, override: float | None) -> float | None:
    """The --peak_tflops override, else the table's value for `device_kind`, else None (MFU not reported)."""
    if override:
        return override
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def one_config(args, attention: str, batch: int, dtype, mesh) -> dict:
    """Compiles and times one (attention, batch) point; returns its table values."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import ldm, pipeline

    config = common.bench_config(args.config, args.latent)
    options = ldm.RunOptions(attention=attention, dtype=dtype, param_dtype=jnp.dtype(args.param_dtype))
    params = common.random_params(config)
    params = jax.tree.map(lambda x: x.astype(args.param_dtype) if np.issubdtype(x.dtype, np.floating) else x, params)
    params = pipeline.place_params(params, mesh)
    cond, uncond, noise = common.bench_inputs(config, batch, args.latent)
    sampler = pipeline.make_model_sampler(config, "ddim", args.steps, timestep_spacing="leading", steps_offset=1)

    def run():
        return np.asarray(pipeline.txt2img(config, params, sampler, cond, uncond, guidance_scale=7.5, noise=noise,
                                           mesh=mesh, options=options))

    first = common.timed(run)
    latency = common.median([common.timed(run) for _ in range(args.repeats)])
    images = run()
    if not np.isfinite(images).all():
        raise FloatingPointError(f"attention={attention} batch={batch}: non-finite images")

    def compiled(fn, *xs):
        return jax.jit(fn).lower(*xs).compile()

    def gflop(c):
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) / 1e9

    cond_j = jnp.asarray(cond)
    context = jax.eval_shape(lambda c: ldm.encode_conditioning(config, params, c, options=options), cond_j)["context"]
    x2 = jnp.zeros((2 * batch, args.latent, args.latent, config.latent_channels), jnp.float32)
    ctx2 = jnp.zeros((2 * batch, *context.shape[1:]), context.dtype)
    unet = compiled(lambda p, x, c: ldm.apply_unet(config, p, x, jnp.full((x.shape[0],), 500), {"context": c},
                                                   options=options), params, x2, ctx2)
    text = gflop(compiled(lambda p, c: ldm.encode_conditioning(config, p, c, options=options), params, cond_j))
    vae = gflop(compiled(lambda p, z: ldm.decode_first_stage(config, p, z, options=options), params,
                         jnp.asarray(noise)))
    total = 2 * text + args.steps * gflop(unet) + vae
    return dict(compile_s=first - latency, latency_s=latency, images_per_s=batch / latency,
                tflops=total / 1e3 / latency, cudnn="cudnn" in unet.as_text().lower())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny config, 8x8 latents, 4 steps")
    parser.add_argument("--config", default="sd_v1", help=f"one of {common.CONFIG_NAMES}")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--attention", default="jax_nn,xla")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--param_dtype", default="bfloat16", help="storage dtype of the weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for the MFU column")
    args = parser.parse_args(argv)
    if args.tiny:
        args.config, args.size, args.steps, args.batches = "tiny", 32, 4, "1,2"
        args.dtype = args.param_dtype = "float32"

    import jax
    import jax.numpy as jnp

    from ldm_jax import parallel

    factor = 4 if args.config == "tiny" else 8
    args.latent = args.size // factor
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, args.peak_tflops)
    if peak is None and device.platform == "cpu":
        sys.path.insert(0, str(common.ROOT / "bench"))
        from bench_unet import matmul_rate

        peak = matmul_rate() / 1e12  # on CPU: the measured float32 matmul rate stands in for the peak
    mesh = parallel.make_mesh(devices=[device])
    dtype = jnp.dtype(args.dtype)
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}; {args.config} at {args.size}x{args.size}, "
          f"{args.steps} DDIM steps + CFG, compute {args.dtype}, weights {args.param_dtype}; peak "
          f"{'unknown (give --peak_tflops)' if peak is None else f'{peak:.3g} TFLOP/s'}", flush=True)
    rows = []
    for attention in args.attention.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = one_config(args, attention, batch, dtype, mesh)
            mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
            rows.append([attention, batch, r["compile_s"], r["latency_s"], r["images_per_s"], r["tflops"], mfu,
                         "yes" if r["cudnn"] else "no"])
            print(f"  {attention} batch {batch}: latency {r['latency_s']:.3f} s", flush=True)
    print(common.format_table(["attention", "batch", "compile s", "latency s", "images/s", "TFLOP/s", "MFU",
                               "cuDNN attention"], rows))


if __name__ == "__main__":
    main()
