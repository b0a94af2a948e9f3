"""LDM model-zoo presets (CompVis latent-diffusion): LDM-VQ-4 CelebA-HQ, LDM-VQ-4 class-conditional ImageNet
(cin256-v2) and LDM-KL-8-G text-to-image 1.45B (txt2img-1p4B).

Each function returns an unlocked config with the sections first_stage, cond_stage (not for unconditional
models), unet and diffusion; each is an existing preset with what differs.
"""
from __future__ import annotations

import ml_collections

from ldm_jax.presets import autoencoders, stable_diffusion
from ldm_jax.presets.sections import diffusion, model, section

# The zoo's VQ models: linear 0.0015..0.0195, 1000 steps, eps, unscaled latents (scale_factor 1).
ZOO_DIFFUSION = dict(beta_schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195,
                     prediction_type="eps", scale_factor=1.0, image_size=64, channels=3)


def celebahq_vq4() -> ml_collections.ConfigDict:
    """LDM-VQ-4 on CelebA-HQ 256 (celebahq-ldm-vq-4.yaml): unconditional, 64x64x3 VQ-f4 latents. UNet:
    model_channels 224, channel_mult (1, 2, 3, 4), 2 res blocks, plain self-attention blocks (no spatial
    transformer, no context) with 32 channels per head at downsampling factors 8, 4, 2."""
    unet = section(stable_diffusion.UNET, in_channels=3, out_channels=3, model_channels=224,
                   channel_mult=(1, 2, 3, 4), attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32,
                   use_spatial_transformer=False, context_dim=None)
    return model(autoencoders.vq_f4().first_stage, unet, diffusion(**ZOO_DIFFUSION, conditioning_key=None))


def cin256() -> ml_collections.ConfigDict:
    """LDM-VQ-f4 class-conditional ImageNet 256 (cin256-v2.yaml): the class enters through a learnt
    ClassEmbedder (1001 classes including the unconditional one, 512-d) whose (B, 1, 512) output is the
    cross-attention context. UNet: model_channels 192, channel_mult (1, 2, 3, 5), spatial transformers with
    1 head at factors 8, 4, 2."""
    config = celebahq_vq4()
    config.unet.update(dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_heads=1, num_head_channels=-1,
                            use_spatial_transformer=True, context_dim=512))
    config.diffusion.conditioning_key = "crossattn"
    config.cond_stage = ml_collections.ConfigDict(dict(kind="class", n_classes=1001, embed_dim=512))
    return config


def txt2img_1p4b() -> ml_collections.ConfigDict:
    """LDM-KL-8-G text-to-image, 1.45B (txt2img-1p4B-eval.yaml), the paper's LAION-400M model: 256x256 images,
    32x32x4 KL-f8 latents, SD v1's UNet with context width 1280 from a BERT-style transformer (n_embed 1280,
    32 layers, bert-base-uncased tokenizer) trained jointly. Schedule and scale_factor as SD v1."""
    config = stable_diffusion.sd_v1()
    config.unet.context_dim = 1280
    config.diffusion.image_size = 32
    config.cond_stage = ml_collections.ConfigDict(dict(
        kind="bert", vocab_size=30522, max_length=77, n_embed=1280, n_layer=32, heads=8, dim_head=64, ff_mult=4,
        layer_norm_eps=1e-5, pad_token_id=0, tokenizer_kind="bert"))
    return config
