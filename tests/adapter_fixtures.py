"""Adapter fixtures shared by the sampling tests (tests/test_sample_adapters.py, tests/test_sample_controlnet.py) and
the training tests (tests/test_train_adapters.py, tests/test_train_controlnet.py)."""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from ldm_jax import ldm, store
from ldm_jax.adapters import lora as lora_lib
from ldm_jax.models.tokenizer import load_tokenizer


# Config overrides that shrink the shapes model for training tests: one UNet level (its backward pass compiles in
# about half the time of two), a one-layer text tower, batch 2, 3 steps, logs every step, no prefetch, one device.
TINY_TRAIN = {"unet.model_channels": 32, "unet.channel_mult": "(1,)", "unet.num_res_blocks": 1,
              "unet.attention_resolutions": "(1,)", "unet.num_heads": 2, "unet.num_head_channels": -1,
              "unet.context_dim": 32, "cond_stage.hidden_size": 32, "cond_stage.intermediate_size": 64,
              "cond_stage.num_layers": 1, "cond_stage.num_heads": 2, "first_stage.num_res_blocks": 1,
              "data.global_batch_size": 2, "train.num_steps": 3, "train.log_every": 1, "train.image_every": 100,
              "train.num_images": 2, "train.progress_bar": False, "mesh.data": 1, "data.prefetch": 0}

def random_attention_lora(params: Any, key: jax.Array) -> lora_lib.Lora:
    """A rank-2 LoRA on the attention of UNet and text encoder of the model `params` whose deltas are a few percent
    of the kernels (up matrices 0.3 * normal draws from `key`, so that it changes the images)."""
    modules = lora_lib.target_modules(params, lora_lib.ATTENTION_TARGETS, sections=("unet", "cond_stage"))
    fresh = lora_lib.init_lora(params, modules, rank=2, alpha=1.0, key=key)
    up = {path: {"down": pair["down"], "up": 0.3 * jax.random.normal(jax.random.fold_in(key, i), pair["up"].shape)}
          for i, (path, pair) in enumerate(fresh.modules().items())}
    return lora_lib.make_lora(up, fresh.alpha_of())


def write_tiny_model(config: ldm.LDMConfig, out: pathlib.Path) -> pathlib.Path:
    """Saves a random model directory of `config` (a tiny shapes architecture) with the shipped word-level tokenizer
    into `out`; every UNet param gets noise (0.05 normal), since a zero-initialised proj_out would stop all
    gradients. Returns `out`."""
    params = jax.tree.map(np.asarray, jax.jit(ldm.init_params, static_argnums=0)(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params["unet"] = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params["unet"])
    tokenizer = load_tokenizer(store.SHIPPED_MODELS["shapes"] / store.TOKENIZER_DIR, "tokenizer_json")
    store.save_model(ldm.LoadedModel(config=config, params=params, tokenizer=tokenizer), out)
    return out
