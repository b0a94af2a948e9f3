"""First-stage autoencoders: Encoder, Decoder, DiagonalGaussian, AutoencoderKL, VectorQuantizer, VQModel, and the
identity first stage (`IdentityFirstStage`, kind "identity": a pixel-space diffusion model, the paper's LDM-1).

Semantics are those of CompVis latent-diffusion (`ldm/modules/diffusionmodules/model.py`,
`ldm/models/autoencoder.py`) and taming-transformers' `VectorQuantizer2`; module names are those of
diffusers' `AutoencoderKL` / `VQModel` (`encoder/down_blocks_0/resnets_1/conv1`, `mid_block/attentions_0/to_q`,
`quantize/embedding`, ...), so `ldm_jax.convert.diffusers_autoencoder` maps diffusers keys mechanically.

Images are NHWC float32 in [-1, 1], (B, H, W, in_channels) with H and W divisible by the downsampling
factor f = 2**(len(ch_mult) - 1). Latents are (B, H/f, W/f, embed_dim). Norms, the attention softmax, the
encoder's moment convs, the vector quantiser and the decoder's last conv run in float32 whatever `dtype`.
Run-time options (`attention`, `remat`, `dtype`, `param_dtype`) are module attributes given to
`build_autoencoder`, not fields of `AutoencoderConfig` (which describes the weights only).

The identity first stage is a config value, not a model family of its own: `AutoencoderConfig(kind="identity",
ch_mult=(1,), double_z=False, z_channels=3, embed_dim=3)` (f = 1, no params, the other fields unused). Its
"latents" are the images themselves ([-1, 1], NHWC, 3 channels), so an LDM on it diffuses in pixel space; every
LDM function (`ldm_jax.ldm`) takes it through the same paths as a VQ model's pre-quantisation h.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from ldm_jax.config import build_dataclass, drop_runtime_keys
from ldm_jax.models.attention import attend, check_attention
from ldm_jax.models.layers import Downsample, GroupNorm32, ResnetBlock, Upsample, check_remat, conv, maybe_remat

Dtype = Any

KINDS = ("kl", "vq", "identity")
DECODER_LAST_LAYER_PATH = ("decoder", "conv_out", "kernel")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Hyper-parameters of a first-stage autoencoder (the LDM `ddconfig` plus `embed_dim`/`n_embed`).

    kind: "kl" (AutoencoderKL, needs double_z), "vq" (VQModel, needs n_embed > 0 and not double_z) or "identity"
      (`IdentityFirstStage`: encode and decode are the identity, no params; needs ch_mult=(1,), no
      attn_resolutions, not double_z, n_embed 0 and in_channels == out_ch == z_channels == embed_dim; the other
      fields are unused).
    ch * m must be divisible by 32 for every m in ch_mult (GroupNorm with 32 groups). attn_resolutions
    lists feature-map sizes (relative to `resolution`) that get a self-attention block after each resnet.
    beta weights the VQ codebook (legacy=True) or commitment (legacy=False) term.
    """

    kind: str = "kl"
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    dropout: float = 0.0
    n_embed: int = 0
    beta: float = 0.25
    legacy: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        errors = self._errors()
        if errors:
            raise ValueError("invalid AutoencoderConfig: " + "; ".join(errors))

    def _errors(self) -> list[str]:
        errors = []
        if self.kind not in KINDS:
            errors.append(f"kind={self.kind!r}, expected one of {KINDS}")
        for name in ("in_channels", "out_ch", "ch", "num_res_blocks", "resolution", "z_channels", "embed_dim"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            errors.append(f"ch_mult={self.ch_mult} must be a non-empty tuple of positive ints")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            errors.append(f"ch * ch_mult gives {bad} channels, not divisible by GroupNorm's 32 groups")
        if self.resolution % self.downsample_factor:
            errors.append(f"resolution={self.resolution} is not divisible by the factor {self.downsample_factor}")
        levels = self.level_resolutions
        stray = [r for r in self.attn_resolutions if r not in levels]
        if stray:
            errors.append(f"attn_resolutions {stray} match no level; the levels' resolutions are {levels}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.kind == "kl" and not self.double_z:
            errors.append("kind='kl' needs double_z=True (the encoder predicts mean and log-variance)")
        if self.kind == "kl" and self.n_embed:
            errors.append(f"n_embed={self.n_embed} is only used by kind='vq'; set 0 for kind='kl'")
        if self.kind == "vq" and self.double_z:
            errors.append("kind='vq' needs double_z=False")
        if self.kind == "vq" and self.n_embed < 1:
            errors.append(f"kind='vq' needs n_embed >= 1, got {self.n_embed}")
        if self.beta < 0:
            errors.append(f"beta={self.beta} must be >= 0")
        if self.kind == "identity":
            errors += self._identity_errors()
        return errors

    def _identity_errors(self) -> list[str]:
        errors = []
        if self.ch_mult != (1,) or self.attn_resolutions:
            errors.append(f"kind='identity' needs ch_mult=(1,) (f = 1) and attn_resolutions=(); got ch_mult="
                          f"{self.ch_mult}, attn_resolutions={self.attn_resolutions}")
        if self.double_z or self.n_embed:
            errors.append(f"kind='identity' needs double_z=False and n_embed=0; got double_z={self.double_z}, "
                          f"n_embed={self.n_embed}")
        channels = (self.in_channels, self.out_ch, self.z_channels, self.embed_dim)
        if len(set(channels)) != 1:
            errors.append(f"kind='identity' needs in_channels == out_ch == z_channels == embed_dim (its latents are "
                          f"the images); got {channels}")
        return errors

    @property
    def has_params(self) -> bool:
        """False for the identity first stage (nothing to load, save or train), True for KL and VQ."""
        return self.kind != "identity"

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each encoder level for a `resolution`-sized input."""
        return tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))

    def level_has_attention(self, level: int) -> bool:
        """Whether encoder level `level` (0 = full resolution) has attention after its resnets."""
        return self.level_resolutions[level] in self.attn_resolutions


# ----------------------------------------------------------------------------------------------------------
# Blocks (names mirror diffusers' DownEncoderBlock2D / UNetMidBlock2D / UpDecoderBlock2D / Attention).


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions with a residual: x + to_out(attn(GN(x))).

    Input and output (B, H, W, C). `attention`: the implementation (`ldm_jax.models.attention`).
    """

    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = GroupNorm32(name="group_norm", **kw)(x).reshape(b, h * w, 1, c)  # one head
        q = nn.Dense(c, name="to_q", **kw)(y)
        k = nn.Dense(c, name="to_k", **kw)(y)
        v = nn.Dense(c, name="to_v", **kw)(y)
        out = attend(q, k, v, attention=self.attention).reshape(b, h * w, c)
        out = nn.Dense(c, name="to_out_0", **kw)(out)
        return x + out.reshape(b, h, w, c)


class LevelBlock(nn.Module):
    """One encoder or decoder level: `num_layers` resnets (each followed by attention if `add_attention`),
    then an optional resample: "down" (asymmetric stride-2 conv, `downsamplers_0`), "up" (nearest x2 + conv,
    `upsamplers_0`) or None. (B, H, W, C_in) -> (B, H', W', out_channels)."""

    out_channels: int
    num_layers: int
    add_attention: bool
    resample: str | None
    dropout: float = 0.0
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.dropout, name=f"resnets_{j}", **kw)(x, deterministic=deterministic)
            if self.add_attention:
                x = SpatialSelfAttention(self.attention, name=f"attentions_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(with_conv=True, asymmetric_padding=True, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample(with_conv=True, name="upsamplers_0", **kw)(x)
        return x


class MidBlock(nn.Module):
    """resnet -> self-attention -> resnet at constant width. (B, H, W, C) -> (B, H, W, C)."""

    dropout: float = 0.0
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.dropout, name="resnets_0", **kw)(x, deterministic=deterministic)
        x = SpatialSelfAttention(self.attention, name="attentions_0", **kw)(x)
        return ResnetBlock(c, self.dropout, name="resnets_1", **kw)(x, deterministic=deterministic)


def _maybe_remat(cls: type[nn.Module], remat: bool | str) -> type[nn.Module]:
    # static_argnums counts `self`: argument 2 is the Python bool `deterministic`.
    return maybe_remat(cls, remat, static_argnums=(2,))


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> (B, H/f, W/f, 2*z_channels if double_z else z_channels), float32.

    attention: the implementation of the attention blocks; remat: False, True (recompute each down/mid block
    in the backward pass) or a `jax.checkpoint_policies` name.
    """

    config: AutoencoderConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(dropout=cfg.dropout, attention=self.attention, **kw)
        x = conv(cfg.ch, 3, name="conv_in", **kw)(x)
        down_cls, mid_cls = _maybe_remat(LevelBlock, self.remat), _maybe_remat(MidBlock, self.remat)
        for i, mult in enumerate(cfg.ch_mult):
            x = down_cls(
                cfg.ch * mult,
                cfg.num_res_blocks,
                add_attention=cfg.level_has_attention(i),
                resample="down" if i != len(cfg.ch_mult) - 1 else None,
                name=f"down_blocks_{i}",
                **block_kw,
            )(x, deterministic)
        x = mid_cls(name="mid_block", **block_kw)(x, deterministic)
        x = nn.silu(GroupNorm32(name="conv_norm_out", **kw)(x))
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return conv(out, 3, name="conv_out", dtype=jnp.float32, param_dtype=self.param_dtype)(x)


class Decoder(nn.Module):
    """Latent (B, h, w, z_channels) -> image (B, h*f, w*f, out_ch), float32 (last conv in float32).

    attention, remat: as in `Encoder`.
    """

    config: AutoencoderConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(dropout=cfg.dropout, attention=self.attention, **kw)
        x = conv(cfg.ch * cfg.ch_mult[-1], 3, name="conv_in", **kw)(z)
        up_cls, mid_cls = _maybe_remat(LevelBlock, self.remat), _maybe_remat(MidBlock, self.remat)
        x = mid_cls(name="mid_block", **block_kw)(x, deterministic)
        n = len(cfg.ch_mult)
        for i in range(n):  # up_blocks_0 is the deepest level
            level = n - 1 - i
            x = up_cls(
                cfg.ch * cfg.ch_mult[level],
                cfg.num_res_blocks + 1,
                add_attention=cfg.level_has_attention(level),
                resample="up" if level != 0 else None,
                name=f"up_blocks_{i}",
                **block_kw,
            )(x, deterministic)
        x = nn.silu(GroupNorm32(name="conv_norm_out", **kw)(x))
        return conv(cfg.out_ch, 3, name="conv_out", dtype=jnp.float32, param_dtype=self.param_dtype)(x)


# ----------------------------------------------------------------------------------------------------------
# KL autoencoder.


@struct.dataclass
class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; mean and logvar (B, h, w, C) float32, logvar in [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """moments (B, h, w, 2C): the first C channels are the mean, the last C the log-variance."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        """exp(logvar / 2), shape of `mean`."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """exp(logvar), shape of `mean`."""
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps with eps ~ N(0, I) drawn from `key`; shape of `mean`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The mean (B, h, w, C)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """KL(self || other), other = N(0, I) when None, summed over all but the batch axis -> (B,)."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            axis=axes,
        )

    def nll(self, sample: jax.Array, dims: tuple[int, ...] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of `sample` (shape of `mean`), summed over `dims`."""
        return 0.5 * jnp.sum(
            jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(sample - self.mean) / self.var, axis=tuple(dims)
        )


def _check_images(x: jax.Array, cfg: AutoencoderConfig, where: str) -> None:
    f = cfg.downsample_factor
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % f or x.shape[2] % f:
        hint = " (NHWC expected; this looks like NCHW)" if x.ndim == 4 and x.shape[1] == cfg.in_channels else ""
        raise ValueError(
            f"{where}: expected images of shape (batch, H, W, {cfg.in_channels}) with H and W divisible by the "
            f"downsampling factor {f}; got shape {tuple(x.shape)}{hint}"
        )


def _check_latents(z: jax.Array, channels: int, where: str) -> None:
    if z.ndim != 4 or z.shape[-1] != channels:
        raise ValueError(f"{where}: expected latents of shape (batch, h, w, {channels}); got shape {tuple(z.shape)}")


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM `AutoencoderKL`).

    encode(x) -> DiagonalGaussian over (B, H/f, W/f, embed_dim); decode(z) -> (B, H, W, out_ch) float32;
    __call__(x, key=, sample_posterior=True) -> (reconstruction, posterior).
    Run-time options: attention, remat (as in `Encoder`), dtype, param_dtype.
    """

    config: AutoencoderConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if cfg.kind != "kl":
            raise ValueError(f"AutoencoderKL needs config.kind='kl', got {cfg.kind!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention, self.remat, **kw)
        self.decoder = Decoder(cfg, self.attention, self.remat, **kw)
        self.quant_conv = conv(2 * cfg.embed_dim, 1, dtype=jnp.float32, param_dtype=self.param_dtype)
        self.post_quant_conv = conv(cfg.z_channels, 1, **kw)

    def encode(self, x: jax.Array, deterministic: bool = True) -> DiagonalGaussian:
        """x (B, H, W, in_channels) in [-1, 1] -> posterior over (B, H/f, W/f, embed_dim)."""
        _check_images(x, self.config, "AutoencoderKL.encode")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x, deterministic)))

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """z (B, h, w, embed_dim) -> image (B, h*f, w*f, out_ch) float32."""
        _check_latents(z, self.config.embed_dim, "AutoencoderKL.decode")
        return self.decoder(self.post_quant_conv(z), deterministic)

    def __call__(
        self,
        x: jax.Array,
        *,
        key: jax.Array | None = None,
        sample_posterior: bool = True,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstructs x from a posterior sample (needs `key`) or, with sample_posterior=False, its mode."""
        if sample_posterior and key is None:
            raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG `key`")
        posterior = self.encode(x, deterministic)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z, deterministic), posterior


# ----------------------------------------------------------------------------------------------------------
# Vector-quantised autoencoder.


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser with a straight-through estimator (taming `VectorQuantizer2`).

    __call__(z (B, h, w, embed_dim)) -> (z_q like z, loss scalar, info) with
      loss = mse(sg(z_q), z) + beta * mse(z_q, sg(z))   (legacy=True, the reference's default), or
      loss = beta * mse(sg(z_q), z) + mse(z_q, sg(z))   (legacy=False),
      info = {"indices": (B, h, w) int32, "perplexity": scalar, "codebook_usage": number of codes used}.
    Distances, codebook and loss are float32 (`dtype` is accepted for uniformity; nothing here runs in it).
    """

    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        bound = 1.0 / self.n_embed

        def init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        self.embedding = nn.Embed(
            self.n_embed, self.embed_dim, embedding_init=init, dtype=jnp.float32, param_dtype=self.param_dtype
        )

    def codebook(self) -> jax.Array:
        """The (n_embed, embed_dim) codebook in float32."""
        return self.embedding.embedding.astype(jnp.float32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices (...) int -> codebook vectors (..., embed_dim) float32."""
        return jnp.take(self.codebook(), indices, axis=0)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        _check_latents(z, self.embed_dim, "VectorQuantizer")
        e = self.codebook()
        zf = z.astype(jnp.float32)
        flat = zf.reshape(-1, self.embed_dim)
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, for every (position, code) pair.
        dist = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            + jnp.sum(e**2, axis=1)[None, :]
            - 2.0 * jnp.dot(flat, e.T, precision=jax.lax.Precision.HIGHEST)
        )
        indices = jnp.argmin(dist, axis=1)
        z_q = jnp.take(e, indices, axis=0).reshape(zf.shape)
        commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - zf))
        codebook = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(zf)))
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = self.beta * commitment + codebook
        z_q = zf + jax.lax.stop_gradient(z_q - zf)  # straight-through: d z_q / d z = I
        perplexity, usage = codebook_perplexity(indices, self.n_embed)
        info = {"indices": indices.reshape(z.shape[:-1]).astype(jnp.int32), "perplexity": perplexity,
                "codebook_usage": usage}
        return z_q.astype(z.dtype), loss, info


def codebook_perplexity(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """exp(entropy) of the code histogram and the number of codes used (LDM `measure_perplexity`).

    indices: integer array of any shape with values in [0, n_embed). Returns two scalars (float32, int32).
    """
    probs = jnp.bincount(indices.reshape(-1), length=n_embed).astype(jnp.float32) / indices.size
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return perplexity, jnp.sum(probs > 0).astype(jnp.int32)


class VQModel(nn.Module):
    """Vector-quantised autoencoder (LDM `VQModelInterface`; the quantiser is folded into the decoder).

    encode(x) -> pre-quantisation h (B, H/f, W/f, embed_dim) float32 after quant_conv;
    decode(h, force_not_quantize=False) -> image: quantise h (unless forced not to), post_quant_conv, decoder;
    decode_indices(indices (B, h, w)) -> image from codebook entries (diffusers `lookup_from_codebook`);
    __call__(x) -> (reconstruction, vq_loss, info) with info as in `VectorQuantizer`.
    Run-time options: attention, remat (as in `Encoder`), dtype, param_dtype.
    """

    config: AutoencoderConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if cfg.kind != "vq":
            raise ValueError(f"VQModel needs config.kind='vq', got {cfg.kind!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention, self.remat, **kw)
        self.decoder = Decoder(cfg, self.attention, self.remat, **kw)
        self.quant_conv = conv(cfg.embed_dim, 1, dtype=jnp.float32, param_dtype=self.param_dtype)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy, **kw)
        self.post_quant_conv = conv(cfg.z_channels, 1, **kw)

    def encode(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x (B, H, W, in_channels) in [-1, 1] -> h (B, H/f, W/f, embed_dim) float32, not yet quantised."""
        _check_images(x, self.config, "VQModel.encode")
        return self.quant_conv(self.encoder(x, deterministic))

    def decode(self, h: jax.Array, force_not_quantize: bool = False, deterministic: bool = True) -> jax.Array:
        """h (B, h, w, embed_dim) -> image (B, h*f, w*f, out_ch) float32; quantises h first unless forced not to."""
        _check_latents(h, self.config.embed_dim, "VQModel.decode")
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant), deterministic)

    def decode_indices(self, indices: jax.Array, deterministic: bool = True) -> jax.Array:
        """Codebook indices (B, h, w) int in [0, n_embed) -> image (B, h*f, w*f, out_ch) float32."""
        if indices.ndim != 3 or not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(f"VQModel.decode_indices: expected integer indices (batch, h, w); got "
                             f"{indices.dtype}{tuple(indices.shape)}")
        quant = self.quantize.lookup(indices)
        return self.decoder(self.post_quant_conv(quant), deterministic)

    def __call__(
        self, x: jax.Array, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """x (B, H, W, in_channels) -> (reconstruction (B, H, W, out_ch), vq_loss scalar, info)."""
        h = self.encode(x, deterministic)
        quant, loss, info = self.quantize(h)
        return self.decoder(self.post_quant_conv(quant), deterministic), loss, info


# ----------------------------------------------------------------------------------------------------------
# The identity first stage (pixel space).


class IdentityFirstStage(nn.Module):
    """The first stage of a pixel-space diffusion model (kind "identity"): no params, f = 1.

    encode(x (B, H, W, C) in [-1, 1]) -> x as float32, the "latents"; decode(z (B, h, w, C)) -> z as float32;
    __call__(x) -> (x, None), a reconstruction and no posterior. C is the config's in_channels (= embed_dim).
    The run-time options are accepted for uniformity with the autoencoders; nothing here uses them.
    """

    config: AutoencoderConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def encode(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x (B, H, W, in_channels) -> the same array in float32."""
        del deterministic
        _check_images(x, self.config, "IdentityFirstStage.encode")
        return x.astype(jnp.float32)

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """z (B, h, w, embed_dim) -> the same array in float32."""
        del deterministic
        _check_latents(z, self.config.embed_dim, "IdentityFirstStage.decode")
        return z.astype(jnp.float32)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, None]:
        """(reconstruction = x in float32, None)."""
        return self.decode(self.encode(x, deterministic), deterministic), None


# ----------------------------------------------------------------------------------------------------------
# Construction helpers.


def autoencoder_config(section: Mapping[str, Any] | Any, *, where: str = "first_stage") -> AutoencoderConfig:
    """AutoencoderConfig from a `first_stage` section (ConfigDict or mapping); unknown fields are a ValueError.
    Run-time keys that old saved configs hold (attention_impl, remat; `config.RUNTIME_KEYS`) are dropped."""
    return build_dataclass(AutoencoderConfig, drop_runtime_keys(section, where=where), where=where)


def build_autoencoder(
    section_or_config: AutoencoderConfig | Mapping[str, Any] | Any,
    *,
    attention: str = "xla",
    remat: bool | str = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> AutoencoderKL | VQModel | IdentityFirstStage:
    """Builds AutoencoderKL (kind "kl"), VQModel (kind "vq") or IdentityFirstStage (kind "identity") from an
    AutoencoderConfig, or a dict / `first_stage` ConfigDict section (`autoencoder_config`).

    Run-time options: `attention` ("xla", "jax_nn", "chunked"), `remat` (False, True or a policy name),
    `dtype` (compute), `param_dtype` (storage). A bad attention or remat value is a ValueError.
    """
    cfg = section_or_config
    if not isinstance(cfg, AutoencoderConfig):
        cfg = autoencoder_config(cfg)
    cls = {"kl": AutoencoderKL, "vq": VQModel, "identity": IdentityFirstStage}[cfg.kind]
    return cls(cfg, attention=check_attention(attention, "build_autoencoder"),
               remat=check_remat(remat, "build_autoencoder"), dtype=dtype, param_dtype=param_dtype)


def init_autoencoder(model: AutoencoderKL | VQModel | IdentityFirstStage, key: jax.Array) -> dict[str, Any]:
    """Initialises `model`'s variables ({"params": ...}) from `key`; works under jax.eval_shape and jit.
    The identity first stage has none: {} (no "params" entry).

    Parameter shapes do not depend on the image size, so the smallest valid image (f x f) is used.
    """
    cfg = model.config
    x = jnp.zeros((1, cfg.downsample_factor, cfg.downsample_factor, cfg.in_channels), jnp.float32)
    if isinstance(model, AutoencoderKL):
        return model.init(key, x, sample_posterior=False)
    return model.init(key, x)


def decoder_last_layer_path() -> tuple[str, ...]:
    """Path of the decoder's last conv kernel inside the params tree: ("decoder", "conv_out", "kernel").

    The adaptive GAN weight of the autoencoder loss takes gradients with respect to this kernel.
    """
    return DECODER_LAST_LAYER_PATH


def decoder_last_layer(params: Mapping[str, Any]) -> jax.Array:
    """The decoder's last conv kernel (3, 3, C, out_ch) from `params` (with or without the "params" level)."""
    tree = params.get("params", params)
    for name in DECODER_LAST_LAYER_PATH:
        if name not in tree:
            raise KeyError(f"params have no {'/'.join(DECODER_LAST_LAYER_PATH)} (missing {name!r})")
        tree = tree[name]
    return tree
