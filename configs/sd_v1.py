"""Stable Diffusion v1.x (v1-inference.yaml): 512x512 images, 64x64x4 KL-f8 latents, CLIP ViT-L/14 text context.

UNet: model_channels 320, channel_mult (1, 2, 4, 4), 2 res blocks per level, spatial transformers (depth 1,
8 heads: head dims 40/80/160) at downsampling factors 4, 2, 1; context 77 x 768; 859,520,964 parameters.
Diffusion: reference "linear" schedule (sqrt-space linspace 0.00085..0.012, diffusers "scaled_linear"),
1000 steps, eps prediction, latents scaled by 0.18215. First stage: configs/autoencoder_kl_f8.py.
cond_stage: the CLIP ViT-L/14 text transformer (last layer), prompts padded with end-of-text 49407.

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v1`; weights load with
`ldm_jax.convert.diffusers_unet.load_diffusers_unet(folder)`. Override fields as `--config.unet.attention=chunked`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_kl_f8.py"))
    with config.unlocked():
        config.unet = ml_collections.ConfigDict(dict(
            in_channels=4,
            out_channels=4,
            model_channels=320,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(4, 2, 1),
            num_heads=8,
            num_head_channels=-1,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=768,
            use_linear_in_transformer=False,
            conv_resample=True,
            use_scale_shift_norm=False,
            dropout=0.0,
            flip_sin_to_cos=True,
            freq_shift=0.0,
            attention="xla",
            remat=True,  # the reference trains with use_checkpoint=True; a no-op when sampling
        ))
        config.diffusion = ml_collections.ConfigDict(dict(
            beta_schedule="linear",
            num_timesteps=1000,
            linear_start=0.00085,
            linear_end=0.012,
        ))
        config.cond_stage = ml_collections.ConfigDict(dict(
            kind="clip",
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_layers=12,
            num_heads=12,
            max_length=77,
            hidden_act="quick_gelu",
            eos_token_id=49407,
            pooling="argmax",  # its transformers config carries the legacy eos_token_id 2
            output_layer="last",
            pad_token_id=49407,
            tokenizer_kind="clip",
        ))
        config.ldm = ml_collections.ConfigDict(dict(
            conditioning_key="crossattn",
            prediction_type="eps",
            scale_factor=0.18215,
            image_size=64,  # latent H = W at the native 512x512
            channels=4,
        ))
    return config
