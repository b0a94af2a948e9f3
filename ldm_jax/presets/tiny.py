"""A tiny text-to-image LDM for tests and CPU experiments, and the tiny conditioning encoders.

`tiny()`: the tiny KL first stage (f=4, 32x32x3 <-> 8x8x4), SD v1's UNet at model_channels 32, channel_mult
(1, 2), 1 res block per level, spatial transformers (2 heads) at factors 1 and 2 (1,055,044 parameters), and
`cond_stage("clip")` (2 layers, width 32) as the context; SD v1's schedule and scaling.
`cond_stage(kind)`: a tiny CLIP text transformer ("clip"), LDM BERT-style embedder ("bert") or class embedder
("class"), each of context width 32.
"""
from __future__ import annotations

import ml_collections

from ldm_jax.presets import autoencoders, stable_diffusion
from ldm_jax.presets.sections import diffusion, model, section

COND_STAGES = {
    "clip": section(stable_diffusion.CLIP_L14, vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, eos_token_id=999, pad_token_id=999).to_dict(),
    "bert": dict(kind="bert", vocab_size=1000, max_length=77, n_embed=32, n_layer=2, heads=4, dim_head=8, ff_mult=4,
                 layer_norm_eps=1e-5, pad_token_id=0, tokenizer_kind="bert"),
    "class": dict(kind="class", n_classes=11, embed_dim=32),
}


def cond_stage(kind: str = "clip") -> ml_collections.ConfigDict:
    """A tiny `cond_stage` section of `kind` ("clip", "bert" or "class"); ValueError for another kind."""
    if kind not in COND_STAGES:
        raise ValueError(f"tiny cond stage: unknown kind {kind!r}; expected one of {sorted(COND_STAGES)}")
    return ml_collections.ConfigDict(COND_STAGES[kind])


def tiny() -> ml_collections.ConfigDict:
    """The tiny text-to-image model (see the module docstring)."""
    unet = section(stable_diffusion.UNET, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2, 1), num_heads=2, context_dim=32)
    return model(autoencoders.tiny_kl().first_stage, unet,
                 diffusion(**{**stable_diffusion.SD_DIFFUSION, "image_size": 8}), cond_stage("clip"))
