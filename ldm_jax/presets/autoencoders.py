"""First-stage presets: the LDM model zoo's autoencoders (KL f4/f8/f16, VQ f4/f8) and two tiny test ones.

Each function returns an unlocked config with one section, `first_stage` (`models.autoencoder.AutoencoderConfig`
fields). kl-f8 is the base (it is also Stable Diffusion's VAE); every other one is kl-f8 with what differs.
Loss and training recipes are not here: they belong to training configs (configs/shapes_autoencoder.py).
"""
from __future__ import annotations

import ml_collections

from ldm_jax.presets.sections import section

KL_F8 = dict(
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
)


def _first_stage(**changes) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"first_stage": section(KL_F8, **changes)})


def kl_f8() -> ml_collections.ConfigDict:
    """kl-f8: 256x256x3 <-> 32x32x4; ch 128, ch_mult (1, 2, 4, 4), 2 resnets per level, attention only in the
    mid blocks (83.7M parameters). Stable Diffusion's VAE."""
    return _first_stage()


def kl_f4() -> ml_collections.ConfigDict:
    """kl-f4: 256x256x3 <-> 64x64x3; ch_mult (1, 2, 4)."""
    return _first_stage(ch_mult=(1, 2, 4), z_channels=3, embed_dim=3)


def kl_f16() -> ml_collections.ConfigDict:
    """kl-f16: 256x256x3 <-> 16x16x16; ch_mult (1, 1, 2, 2, 4), attention at the 16x16 level."""
    return _first_stage(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=16, embed_dim=16)


def vq_f4() -> ml_collections.ConfigDict:
    """vq-f4: 256x256x3 <-> 64x64x3 pre-quantisation latents, 8192 codes; ch_mult (1, 2, 4), codebook beta 0.25
    (legacy loss form). The first stage of LDM-VQ-4 (celebahq, cin256)."""
    return _first_stage(kind="vq", double_z=False, ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192)


def vq_f8() -> ml_collections.ConfigDict:
    """vq-f8: 256x256x3 <-> 32x32x4, 16384 codes; ch_mult (1, 2, 2, 4), attention at the 32x32 level."""
    return _first_stage(kind="vq", double_z=False, ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), n_embed=16384)


def tiny_kl() -> ml_collections.ConfigDict:
    """Tiny KL autoencoder for tests and CPU runs: f=4, 32x32x3 <-> 8x8x4; ch 32, ch_mult (1, 2, 2), 1 resnet per
    level, attention at the 8x8 level (about 1.0M parameters)."""
    return _first_stage(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32)


def tiny_vq() -> ml_collections.ConfigDict:
    """tiny_kl as a VQ autoencoder with 256 codes."""
    config = tiny_kl()
    config.first_stage.update(dict(kind="vq", double_z=False, n_embed=256))
    return config
