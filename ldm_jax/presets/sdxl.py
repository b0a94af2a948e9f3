"""SDXL presets (Stability's generative-models, "SGM"): `sdxl_base` (sd_xl_base_1.0), `sdxl_refiner`
(sd_xl_refiner_1.0) and `sdxl_inpainting` (sd_xl_base_1.0_inpainting_0.1).

Each function returns an unlocked config with the sections first_stage, cond_stage, (cond_stage_2,) unet,
diffusion. The base is SD v1's sections with what differs (`stable_diffusion.UNET`, `CLIP_L14`, `SD_DIFFUSION`,
kl-f8); the refiner and the inpainting model are the base with what differs. The values are those of SGM's
configs/inference/sd_xl_base.yaml and sd_xl_refiner.yaml, which `ldm_jax.convert.ldm_yaml` reads, and of
diffusers' stabilityai/stable-diffusion-xl-{base,refiner}-1.0 folders.

- Text: tower 1 (base only) is SD v1's CLIP ViT-L/14 read at its penultimate block without the final LayerNorm
  (SGM FrozenCLIPEmbedder(layer="hidden", layer_idx=11)); tower 2 is OpenCLIP ViT-bigG/14 (32 blocks, width 1280,
  gelu, prompts padded with 0), all 32 blocks kept and read at the penultimate one without the final LayerNorm
  (FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False)), with its 1280 x 1280 `text_projection` for the
  pooled prompt embedding. The contexts are concatenated: 768 + 1280 = 2048. The refiner has bigG alone (1280).
- UNet: 64-channel heads, linear proj_in, per-level transformer depths (base (0, 2, 10): none at the first level,
  whose blocks do not attend; refiner 4 everywhere), and `addition_embed_type="text_time"`: the pooled bigG
  embedding plus sinusoidal features (256 each) of the micro-conditioning numbers, through `label_emb`
  (base: 1280 + 6 x 256 = 2816 inputs; refiner: 1280 + 5 x 256 = 2560, the aesthetic score instead of the
  target size). 2,567,463,684 (base) and 2,259,526,660 (refiner) UNet parameters.
- Diffusion: SD's schedule (linear 0.00085..0.012, 1000 steps, eps), latents scaled by 0.13025 (SDXL's VAE),
  1024 x 1024 images (128 x 128 latents). force_zeros_for_empty_prompt: True for the base (diffusers' pipeline
  default: without a negative prompt the unconditional text conditioning is all zeros), False for the refiner
  (its diffusers folder sets it false).

The sections here carry the fields SDXL added to the model dataclasses (unet addition_embed_type /
addition_time_embed_dim, cond_stage projection_dim, diffusion force_zeros_for_empty_prompt) on top of SD's
complete sections, so every field stays overridable on the command line.
"""
from __future__ import annotations

import ml_collections

from ldm_jax.presets import autoencoders, stable_diffusion
from ldm_jax.presets.sections import DIFFUSION_FIELDS, model, section

# SD's complete sections plus the fields SDXL added (their defaults: what SD 1.x / 2.x have).
UNET_FIELDS = dict(stable_diffusion.UNET, addition_embed_type=None, addition_time_embed_dim=None)
CLIP_FIELDS = dict(stable_diffusion.CLIP_L14, projection_dim=None)
DIFFUSION_SDXL_FIELDS = dict(DIFFUSION_FIELDS, **stable_diffusion.SD_DIFFUSION, force_zeros_for_empty_prompt=False)

TIME_EMBED_DIM = 256  # features per micro-conditioning number (SGM ConcatTimestepEmbedderND outdim)
BASE_TIME_IDS = 6  # original height, width; crop top, left; target height, width
REFINER_TIME_IDS = 5  # original height, width; crop top, left; aesthetic score

# FrozenCLIPEmbedder(layer="hidden", layer_idx=11): openai/clip-vit-large-patch14 at its penultimate block.
CLIP_L14_SDXL = dict(CLIP_FIELDS, output_layer="penultimate_no_norm")
# FrozenOpenCLIPEmbedder2(arch="ViT-bigG-14", layer="penultimate", legacy=False, always_return_pooled=True).
OPENCLIP_BIGG = dict(CLIP_FIELDS, hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                     hidden_act="gelu", output_layer="penultimate_no_norm", pad_token_id=0, projection_dim=1280)


def _unet(**changes) -> ml_collections.ConfigDict:
    """SDXL's UNet section: what base and refiner share (64-channel heads at factors 2 and 4, linear proj_in,
    text_time conditioning) with `changes`."""
    return section(UNET_FIELDS, **dict(dict(
        channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
        use_linear_in_transformer=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM),
        **changes))


def sdxl_base() -> ml_collections.ConfigDict:
    """SDXL 1.0 base (sd_xl_base_1.0): two text towers (CLIP ViT-L 768 + OpenCLIP bigG 1280 = 2048 context),
    UNet model_channels 320, channel_mult (1, 2, 4), 2 res blocks, transformer depths (0, 2, 10) at factors 2, 4."""
    unet = _unet(model_channels=320, transformer_depth=(0, 2, 10), context_dim=2048,
                 adm_in_channels=OPENCLIP_BIGG["projection_dim"] + BASE_TIME_IDS * TIME_EMBED_DIM)
    diffusion = section(DIFFUSION_SDXL_FIELDS, scale_factor=0.13025, image_size=128,
                        force_zeros_for_empty_prompt=True)
    config = model(autoencoders.kl_f8().first_stage, unet, diffusion, section(CLIP_L14_SDXL))
    config.cond_stage_2 = section(OPENCLIP_BIGG)
    return config


def sdxl_refiner() -> ml_collections.ConfigDict:
    """SDXL 1.0 refiner (sd_xl_refiner_1.0): OpenCLIP bigG alone (1280 context), the aesthetic score instead of
    the target size; UNet model_channels 384, channel_mult (1, 2, 4, 4), depth 4 at factors 2, 4 (and mid)."""
    base = sdxl_base()
    unet = _unet(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=4, context_dim=1280,
                 adm_in_channels=OPENCLIP_BIGG["projection_dim"] + REFINER_TIME_IDS * TIME_EMBED_DIM)
    base.diffusion.force_zeros_for_empty_prompt = False
    return model(base.first_stage, unet, base.diffusion, base.cond_stage_2)


def sdxl_inpainting() -> ml_collections.ConfigDict:
    """SDXL 1.0 inpainting 0.1 (sd_xl_base_1.0_inpainting_0.1, diffusers/stable-diffusion-xl-1.0-inpainting-0.1):
    the base with a 9-channel UNet input (4 noisy-latent + 1 mask + 4 masked-image-latent channels) and
    conditioning_key "hybrid"."""
    config = sdxl_base()
    config.unet.in_channels = 9
    config.diffusion.conditioning_key = "hybrid"
    return config
