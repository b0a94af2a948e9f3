"""Stable Diffusion v1.x (v1-inference.yaml): 512x512 images, 64x64x4 KL-f8 latents, CLIP ViT-L/14 text context.

UNet: model_channels 320, channel_mult (1, 2, 4, 4), 2 res blocks per level, spatial transformers (depth 1,
8 heads: head dims 40/80/160) at downsampling factors 4, 2, 1; context 77 x 768; 859,520,964 parameters.
Diffusion: reference "linear" schedule (sqrt-space linspace 0.00085..0.012, diffusers "scaled_linear"),
1000 steps, eps prediction, latents scaled by 0.18215. First stage: configs/autoencoder_kl_f8.py.
cond_stage: the CLIP ViT-L/14 text transformer (last layer), prompts padded with end-of-text 49407.
The preset `sd_v1` (ldm_jax/presets/stable_diffusion.py). The attention implementation and remat are run-time
options, not model fields: `--attention` when sampling, `train.attention` / `train.remat` when training.

Sample from a CompVis file with it (a SD 1.x file's config is also inferred from its weights without --config):
    python sample.py --ckpt /models/v1-5-pruned-emaonly.safetensors --config configs/sd_v1.py \\
        --tokenizer /models/stable-diffusion-v1-5/tokenizer --prompt "a watercolour of a lighthouse"
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v1`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sd_v1")
