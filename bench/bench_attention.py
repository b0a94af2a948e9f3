"""The attention function alone at the UNets' shapes: our "xla" implementation (on CPU: per (batch, head) and
query block above 2^16 logits), the plain batched einsum-softmax-einsum it replaced there ("dense"),
"jax_nn", "chunked", and torch's fused scaled_dot_product_attention (same threads). float32, heads-last
(B, L, heads, d) inputs; alternating calls, medians.

    .venv/bin/python bench/bench_attention.py
    .venv/bin/python bench/bench_attention.py --shapes 2x4096x8x40x4096 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common

# B x Lq x heads x d x Lk: SD v1 at 32x32 latents with CFG (batch 2): self-attention per level, cross-attention
# on 77 tokens; the tiny UNet's level 0; SD at 64x64 latents (512 px) level 0.
DEFAULT_SHAPES = "2x1024x8x40x1024,2x1024x8x40x77,2x256x8x80x256,2x64x8x160x64,2x64x2x16x64,2x4096x8x40x4096"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxLqxHxDxLk")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--impls", default="xla,dense,jax_nn,chunked,torch")
    args = parser.parse_args(argv)

    import jax
    import torch

    from ldm_jax.models import attention as attn

    torch.set_num_threads(os.cpu_count())
    impls = args.impls.split(",")
    rows = []
    print(common.load_average(), flush=True)
    for shape in args.shapes.split(","):
        b, lq, h, d, lk = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((b, n, h, d), np.float32) for n in (lq, lk, lk))
        fns, outs = [], {}
        for impl in impls:
            if impl == "torch":
                tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                fn = lambda tq=tq, tk=tk, tv=tv, sdpa=sdpa: sdpa(tq, tk, tv)  # noqa: E731
                outs[impl] = fn().numpy().transpose(0, 2, 1, 3)
            else:
                if impl == "dense":
                    f = jax.jit(lambda q, k, v: attn._attention_dense(q, k, v, mask=None))
                else:
                    f = jax.jit(lambda q, k, v, impl=impl: attn.attend(q, k, v, attention=impl))
                jq, jk, jv = jax.device_put((q, k, v))
                fn = lambda f=f, jq=jq, jk=jk, jv=jv: f(jq, jk, jv).block_until_ready()  # noqa: E731
                outs[impl] = np.asarray(fn())
            fns.append(fn)
        times = [common.median(t) for t in common.alternating(fns, args.repeats)]
        ref = outs[impls[0]]
        for impl, t in zip(impls, times, strict=True):
            gflops = 4 * b * h * lq * lk * d / t / 1e9
            rows.append([shape, impl, t * 1e3, float(np.abs(outs[impl] - ref).max()), gflops])
        print(f"  {shape}: " + ", ".join(f"{i} {t * 1e3:.2f} ms" for i, t in zip(impls, times, strict=True)), flush=True)
    print(f"\n{common.load_average()}; medians of {args.repeats}; max|diff| vs {impls[0]}; "
          "GFLOP/s counts the two matmuls")
    print(common.format_table(["B x Lq x H x d x Lk", "implementation", "ms", "max|diff|", "GFLOP/s"], rows))


if __name__ == "__main__":
    main()
