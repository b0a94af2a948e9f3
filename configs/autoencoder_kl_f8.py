"""KL-regularised autoencoder, f=8, 4 latent channels: LDM model-zoo `kl-f8`, which is also Stable Diffusion's VAE.

256x256x3 images <-> 32x32x4 latents; ch 128, ch_mult (1, 2, 4, 4), 2 resnets per level, attention only in the
mid blocks (about 83.7M parameters). The preset `autoencoder_kl_f8` (ldm_jax/presets/autoencoders.py), which the
other autoencoder presets vary. Reference loss: L1 + LPIPS + PatchGAN from step 50001 with disc_weight 0.5, KL
weight 1e-6, base learning rate 4.5e-6 (configs/shapes_autoencoder.py is the autoencoder training config).
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_kl_f8
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_kl_f8")
