"""Adapter fixtures shared by the sampling tests (tests/test_sample_adapters.py, tests/test_sample_controlnet.py)."""
from __future__ import annotations

from typing import Any

import jax

from ldm_jax.adapters import lora as lora_lib


def random_attention_lora(params: Any, key: jax.Array) -> lora_lib.Lora:
    """A rank-2 LoRA on the attention of UNet and text encoder of the model `params` whose deltas are a few percent
    of the kernels (up matrices 0.3 * normal draws from `key`, so that it changes the images)."""
    modules = lora_lib.target_modules(params, lora_lib.ATTENTION_TARGETS, sections=("unet", "cond_stage"))
    fresh = lora_lib.init_lora(params, modules, rank=2, alpha=1.0, key=key)
    up = {path: {"down": pair["down"], "up": 0.3 * jax.random.normal(jax.random.fold_in(key, i), pair["up"].shape)}
          for i, (path, pair) in enumerate(fresh.modules().items())}
    return lora_lib.make_lora(up, fresh.alpha_of())
