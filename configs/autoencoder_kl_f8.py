"""KL-regularised autoencoder, f=8, 4 latent channels: LDM model-zoo `kl-f8`, which is also Stable Diffusion's VAE.

256x256x3 images <-> 32x32x4 latents; ch 128, ch_mult (1, 2, 4, 4), 2 resnets per level, attention only in the
mid blocks (about 83.7M parameters). Loss (for the training issue): L1 + LPIPS + PatchGAN from step 50001 with
disc_weight 0.5, KL weight 1e-6, base learning rate 4.5e-6.

Training lands with the training issue; until then this config is used to build the model and to load
converted weights (`ldm_jax.convert.diffusers_autoencoder`). The other autoencoder configs override this one.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_kl_f8
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.first_stage = ml_collections.ConfigDict(
        dict(
            kind="kl",
            in_channels=3,
            out_ch=3,
            ch=128,
            ch_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attn_resolutions=(),
            resolution=256,
            z_channels=4,
            embed_dim=4,
            double_z=True,
            dropout=0.0,
            n_embed=0,
            beta=0.25,
            legacy=True,
            remat=False,
            attention_impl="xla",
        )
    )
    config.lock()
    return config
