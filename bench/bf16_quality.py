"""What bfloat16 costs in image quality: the embedded captioned-shapes model sampled in float32, with bfloat16
compute (`--precision bf16`), and with bfloat16 params and compute (`--param-dtype bf16 --precision bf16`), from
the same prompts, seed and initial noise (issue 18, item 3).

Prompts: `--prompts` captions of scenes from the training distribution (`shapes.sample_scene`) and as many held-out
scenes (combinations the model never saw, `heldout=True`), drawn with fixed seeds. Per variant: the largest and mean |difference| from the
float32 images (in [-1, 1], and in uint8 grey levels) and prompt adherence (`metrics.shapes_checker`: every object's
colour, shape and place as the caption says).

    .venv/bin/python bench/bf16_quality.py                  # 64 + 64 prompts, DDIM 20 steps, CFG 7.5, ~5 min
"""
from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np

from ldm_jax import pipeline, store
from ldm_jax.data import shapes
from ldm_jax.metrics.shapes_checker import prompt_adherence

VARIANTS = {"fp32": {}, "bf16 compute": {"dtype": "bf16"}, "bf16 params + compute": {"dtype": "bf16", "param_dtype": "bf16"}}


def sample(prompts: list[str], steps: int, seed: int) -> dict[str, np.ndarray]:
    """{variant: images (N, H, W, 3) in [-1, 1]} of the embedded model, the same noise for every variant."""
    out = {}
    for name, options in VARIANTS.items():
        model = store.load_model(**options)
        sampler = pipeline.make_model_sampler(model.config, "ddim", steps)
        cond, uncond = pipeline.encode_prompts(model, prompts, warn=False)
        params = pipeline.place_params(model.params)
        out[name] = np.asarray(pipeline.txt2img(model.config, params, sampler, cond, uncond, guidance_scale=7.5,
                                                seed=seed, options=model.options))
        print(f"  {name}: compute {jnp.dtype(model.options.dtype).name}, params "
              f"{jnp.dtype(model.options.param_dtype).name}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="in-distribution prompts, and as many held-out ones")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seen, unseen = np.random.default_rng(10), np.random.default_rng(11)
    validation = [shapes.caption(shapes.sample_scene(seen)) for _ in range(args.prompts)]
    heldout = [shapes.caption(shapes.sample_scene(unseen, heldout=True)) for _ in range(args.prompts)]
    print(f"{'prompts':<10} | {'variant':<22} | max diff | mean diff | max uint8 | adherence | objects")
    for split, prompts in (("seen", validation), ("held-out", heldout)):
        images = sample(prompts, args.steps, args.seed)
        reference = images["fp32"]
        for name, im in images.items():
            grey = np.abs(pipeline.to_uint8(im).astype(int) - pipeline.to_uint8(reference).astype(int)).max()
            score = prompt_adherence(im, prompts)
            print(f"{split:<10} | {name:<22} | {np.abs(im - reference).max():8.4f} | {np.abs(im - reference).mean():9.5f}"
                  f" | {grey:9d} | {score['accuracy']:9.1%} | {score['object_accuracy']:7.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
