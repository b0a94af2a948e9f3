"""UNet forward benchmark: compile time, forward time and achieved FLOP/s per attention implementation.

For each config (a tiny UNet and the SD v1 UNet) and each attention implementation ("xla", "jax_nn",
"chunked") it jit-compiles one float32 forward at the given latent size and batch, reports the compile time,
the median forward time, the XLA cost-analysis FLOPs and the achieved FLOP/s as a fraction of a large
float32 `jnp.matmul`'s rate measured in the same process. With `--torch`, diffusers' PyTorch
UNet2DConditionModel on the same config, batch and threads is timed alongside (random weights in both).

  .venv/bin/python bench/bench_unet.py                       # tiny + SD v1 at 32x32 latents, batch 2
  .venv/bin/python bench/bench_unet.py --configs=tiny --repeats=20 --torch
"""
from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.modules.setdefault("torchvision", None)  # diffusers must not import the broken torchvision wheel

from ldm_jax.config import load_config_file  # noqa: E402
from ldm_jax.models.attention import ATTENTION_IMPLS  # noqa: E402
from ldm_jax.models.unet import UNetConfig, UNetModel, init_unet, unet_config  # noqa: E402

CONFIGS = {"tiny": "unet_tiny.py", "sd_v1": "sd_v1.py"}
ROOT = pathlib.Path(__file__).resolve().parent.parent


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul (2 n^3 FLOPs), best of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _inputs(cfg: UNetConfig, batch: int, size: int, context_len: int):
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (batch, size, size, cfg.in_channels), jnp.float32)
    t = jnp.arange(batch, dtype=jnp.int32) * 97
    context = jax.random.normal(keys[1], (batch, context_len, cfg.context_dim), jnp.float32)
    return x, t, context


def bench_jax(cfg: UNetConfig, params, batch: int, size: int, context_len: int, repeats: int, peak: float):
    """One row per attention implementation: compile s, forward s, GFLOP, GFLOP/s, fraction of matmul rate."""
    rows = []
    x, t, context = _inputs(cfg, batch, size, context_len)
    for impl in ATTENTION_IMPLS:
        model = UNetModel(cfg, attention=impl)
        start = time.perf_counter()
        compiled = jax.jit(model.apply).lower(params, x, t, context).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
        compiled(params, x, t, context).block_until_ready()  # warm-up
        fwd = statistics.median(_timed(lambda c=compiled: c(params, x, t, context).block_until_ready())
                                for _ in range(repeats))
        rows.append((f"jax {impl}", compile_s, fwd, flops, flops / fwd, flops / fwd / peak))
    return rows


def bench_torch(cfg: UNetConfig, batch: int, size: int, context_len: int, repeats: int, flops: float, peak: float):
    """diffusers PyTorch UNet2DConditionModel on the same config (default attention processor, SDPA)."""
    import torch
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channel_mult)
    attn = [2**level in cfg.attention_resolutions for level in range(levels)]
    heads = [cfg.heads_at(cfg.model_channels * m)[0] for m in cfg.channel_mult]
    ref = UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim, attention_head_dim=tuple(heads),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        use_linear_projection=cfg.use_linear_in_transformer,
    ).eval()
    x = torch.randn(batch, cfg.in_channels, size, size)
    t = torch.arange(batch) * 97
    context = torch.randn(batch, context_len, cfg.context_dim)
    with torch.inference_mode():
        ref(x, t, encoder_hidden_states=context)  # warm-up
        fwd = statistics.median(_timed(lambda: ref(x, t, encoder_hidden_states=context)) for _ in range(repeats))
    return [(f"torch ({torch.get_num_threads()} threads)", float("nan"), fwd, flops, flops / fwd, flops / fwd / peak)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,sd_v1", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--context_len", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=0, help="timed forwards (default: 20 tiny, 3 SD)")
    parser.add_argument("--torch", action="store_true", help="also time diffusers' PyTorch UNet")
    args = parser.parse_args(argv)

    peak = matmul_rate()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; float32 2048^3 matmul: {peak / 1e9:.1f} GFLOP/s")
    header = f"{'config':8} {'implementation':22} {'compile s':>9} {'forward s':>10} {'GFLOP':>8} {'GFLOP/s':>8} {'of matmul':>9}"
    lines = [header, "-" * len(header)]
    for name in args.configs.split(","):
        cfg = unet_config(load_config_file(ROOT / "configs" / CONFIGS[name]).unet)
        repeats = args.repeats or (20 if name == "tiny" else 3)
        params = jax.jit(lambda key, c=cfg: init_unet(UNetModel(c), key))(jax.random.key(0))
        rows = bench_jax(cfg, params, args.batch, args.size, args.context_len, repeats, peak)
        del params
        gc.collect()
        if args.torch:
            rows += bench_torch(cfg, args.batch, args.size, args.context_len, repeats, rows[0][3], peak)
        for label, compile_s, fwd, flops, rate, frac in rows:
            lines.append(f"{name:8} {label:22} {compile_s:9.2f} {fwd:10.4f} {flops / 1e9:8.2f} {rate / 1e9:8.1f} "
                         f"{100 * frac:8.0f}%")
        print("\n".join(lines[-len(rows):]), flush=True)
    print(f"\nbatch {args.batch}, {args.size}x{args.size} latents, context {args.context_len}; float32; "
          "FLOPs from XLA cost analysis of the jax 'xla' forward (torch rows reuse it)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
