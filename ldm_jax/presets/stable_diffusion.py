"""Stable Diffusion presets: 1.x (`sd_v1`), 1.x inpainting, 2.x 512 (`sd_v2`, eps) and 2.x 768-v (`sd_v2_768_v`).

Each function returns an unlocked config with the sections first_stage, cond_stage, unet, diffusion. SD v1 is
the base; the others are SD v1 (or SD 2.x 512) with what differs. `UNET` (SD v1's UNet) and `CLIP_L14` are also
the bases of the LDM-zoo text model (`ldm_zoo.py`) and of the tiny test model (`tiny.py`).
"""
from __future__ import annotations

import ml_collections

from ldm_jax.presets import autoencoders
from ldm_jax.presets.sections import diffusion, model, section

# v1-inference.yaml's UNetModel: 859,520,964 parameters.
UNET = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(4, 2, 1),  # downsampling factors
    num_heads=8,  # head dims 40 / 80 / 160
    num_head_channels=-1,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_linear_in_transformer=False,
    conv_resample=True,
    use_scale_shift_norm=False,
    resblock_updown=False,
    num_classes=None,
    adm_in_channels=None,
    dropout=0.0,
    flip_sin_to_cos=True,
    freq_shift=0.0,
    position_embedding=None,
)

# FrozenCLIPEmbedder: openai/clip-vit-large-patch14's text tower, last layer; prompts padded with end-of-text.
CLIP_L14 = dict(
    kind="clip",
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    max_length=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
    pooling="argmax",  # its transformers config carries the legacy eos_token_id 2
    output_layer="last",
    pad_token_id=49407,
    tokenizer_kind="clip",
)

# SD's diffusion: the reference's "linear" schedule (sqrt-space linspace 0.00085..0.012, diffusers'
# "scaled_linear"), 1000 steps, eps prediction, latents scaled by 0.18215, text by cross-attention.
SD_DIFFUSION = dict(beta_schedule="linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012,
                    prediction_type="eps", scale_factor=0.18215, conditioning_key="crossattn", image_size=64,
                    channels=4)


def sd_v1() -> ml_collections.ConfigDict:
    """Stable Diffusion v1.x (v1-inference.yaml): 512x512 images, 64x64x4 KL-f8 latents, CLIP ViT-L/14 context
    (77 x 768). UNet: model_channels 320, channel_mult (1, 2, 4, 4), 2 res blocks, spatial transformers (depth 1,
    8 heads) at factors 4, 2, 1, conv proj_in."""
    return model(autoencoders.kl_f8().first_stage, section(UNET), diffusion(**SD_DIFFUSION), section(CLIP_L14))


def sd_v1_inpainting() -> ml_collections.ConfigDict:
    """SD v1.5 inpainting (v1-inpainting-inference.yaml): conditioning_key "hybrid", a 9-channel UNet input
    (4 noisy-latent + 1 mask + 4 masked-image-latent channels, in that order)."""
    config = sd_v1()
    config.unet.in_channels = 9
    config.diffusion.conditioning_key = "hybrid"
    return config


def sd_v2() -> ml_collections.ConfigDict:
    """Stable Diffusion 2.x at 512x512 (v2-inference.yaml, "2-base"): eps prediction, 64x64x4 latents.

    Differs from SD v1 by head width 64 (num_head_channels=64: 5/10/20 heads), linear proj_in/proj_out, context
    width 1024 (865,910,724 UNet parameters) and the OpenCLIP ViT-H/14 text tower as diffusers ships it: 23 of
    its 24 blocks, then the final LN (= the reference's layer="penultimate"; `convert.compvis` drops a CompVis
    file's 24th block), GELU, prompts padded with 0.
    """
    config = sd_v1()
    config.unet.update(dict(num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024))
    config.cond_stage.update(dict(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16,
                                  hidden_act="gelu", pad_token_id=0))
    return config


def sd_v2_768_v() -> ml_collections.ConfigDict:
    """Stable Diffusion 2.x 768-v (v2-inference-v.yaml): sd_v2 with v-prediction at 768x768 (96x96x4 latents).
    The weights cannot tell v from eps: a 768-v file needs this preset named explicitly."""
    config = sd_v2()
    config.diffusion.prediction_type = "v"
    config.diffusion.image_size = 96
    return config
