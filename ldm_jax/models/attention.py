"""Attention: the one attention function of the project, and the transformer blocks built on it.

`attend(q, k, v, attention=...)` is used by every model (autoencoder mid-block, UNet transformers, text
encoders). It takes heads-last tensors (batch, length, heads, head_dim), computes the softmax in float32, and
has three interchangeable implementations that agree to float tolerance, picked by the run-time option
`attention` (`ldm.RunOptions.attention`; every module that attends has an `attention` attribute):

- "xla":       plain einsum -> float32 softmax -> einsum (materialises the (Lq, Lk) logits); on CPU the same
               formula per (batch, head) and block of queries in a sequential loop (see `_attention_xla`).
- "jax_nn":    `jax.nn.dot_product_attention`, which picks cuDNN flash attention on GPU for bf16/fp16.
- "chunked":   memory-efficient form (Rabe & Staats; flash-attention style online softmax): queries in
               chunks, keys in chunks with a running max and normaliser, never the full logits.

Below it, the transformer blocks of the UNet (CompVis `ldm/modules/attention.py` semantics, diffusers
`Transformer2DModel` submodule names): CrossAttention, GEGLU/FeedForward, BasicTransformerBlock,
SpatialTransformer, and the plain AttentionBlock of UNets without a spatial transformer.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, GroupNorm32, conv

AttentionImpl = Literal["xla", "jax_nn", "chunked"]
ATTENTION_IMPLS = ("xla", "jax_nn", "chunked")


def check_attention(attention: str, where: str) -> str:
    """Returns `attention` if it names an implementation, else a ValueError naming `where`, it and the choices."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"{where}: attention={attention!r}; expected one of {ATTENTION_IMPLS}")
    return attention


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    attention: AttentionImpl = "xla",
    query_chunk: int = 1024,
    key_chunk: int = 4096,
) -> jax.Array:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v.

    Args:
      q: (batch, Lq, heads, head_dim) queries.
      k: (batch, Lk, heads, head_dim) keys.
      v: (batch, Lk, heads, head_dim_v) values ("jax_nn" needs head_dim_v == head_dim).
      mask: optional boolean, broadcastable to (batch, heads, Lq, Lk); True means "may attend".
      attention: the implementation, "xla", "jax_nn" or "chunked" (see module docstring).
      query_chunk, key_chunk: chunk sizes of the "chunked" implementation.

    Returns:
      (batch, Lq, heads, head_dim_v) in q's dtype. Logits and softmax are computed in float32.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attend expects (batch, length, heads, head_dim) tensors; got q{q.shape} k{k.shape} v{v.shape}"
        )
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attend: shape mismatch: q{q.shape} k{k.shape} v{v.shape}")
    check_attention(attention, "attend")
    if attention == "jax_nn":
        return _attention_jax_nn(q, k, v, mask)
    if attention == "chunked":
        return _attention_chunked(q, k, v, mask, query_chunk, key_chunk)
    return _attention_xla(q, k, v, mask)


def _attention_xla(q, k, v, mask):
    # Same formula on every platform; on CPU, from _CPU_MIN_LOGITS logits per head up, it runs one (batch, head)
    # and block of queries at a time, which is 2-4x faster there than XLA's batched heads-last dots over the whole
    # (B, H, Lq, Lk) logits (bench/README.md); below, the batched form is as fast or faster.
    if q.shape[1] * k.shape[1] < _CPU_MIN_LOGITS:
        return _attention_dense(q, k, v, mask=mask)
    return jax.lax.platform_dependent(q, k, v, cpu=functools.partial(_attention_per_head, mask=mask),
                                      default=functools.partial(_attention_dense, mask=mask))


# Logits elements per block of the CPU path (8 MiB of float32). 2^21 ran SD's 4096-token self-attention (batch 2,
# 8 heads of 40) 10-20% faster than 2^20 and 2^19 on an AVX-512 Xeon, 2^18 slowest (bench/bench_attention.py).
_CPU_BLOCK_ELEMENTS = 2**21
# Smallest Lq * Lk (one head's logits) that takes the CPU path: 512 x 512 tokens; SD's 1024- and 4096-token
# self-attention gain, its 256-token and cross-attention do not (measured in bench/bench_attention.py).
_CPU_MIN_LOGITS = 2**18


def _attention_per_head(q, k, v, *, mask):
    """`_attention_dense` as a sequential `lax.map` over batch x heads, each over blocks of queries (when one
    head's logits exceed _CPU_BLOCK_ELEMENTS): 2-D matmuls on contiguous (L, d) slices, logits in cache. The
    scale goes on q (L x d values, not L x Lk logits) and the softmax's normalisation on the (block, dv) output:
    exp(logits - max) @ v / sum(exp), one pass over the logits fewer (SD's 4096-token self-attention 12-20%
    faster); the same softmax up to float32 rounding."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    block = min(lq, max(_CPU_BLOCK_ELEMENTS // lk, 1))
    n_blocks = -(-lq // block)
    pad = n_blocks * block - lq
    scale = 1.0 / math.sqrt(d)

    def per_head(x, length):  # (B, L, H, d) -> (B * H, L, d)
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, length, x.shape[-1])

    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh = per_head(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), lq + pad).reshape(batch * heads, n_blocks, block, d)
    kh, vh = per_head(k, lk), per_head(v, lk)
    if mask is None:
        mh = jnp.ones((batch * heads, n_blocks, 1, 1), bool)
    else:
        mh = jnp.broadcast_to(mask, (batch, heads, lq, lk)).reshape(batch * heads, lq, lk)
        mh = jnp.pad(mh, ((0, 0), (0, pad), (0, 0)), constant_values=True).reshape(batch * heads, n_blocks, block, lk)

    def one_head(args):
        q_h, k_h, v_h, m_h = args  # (n_blocks, block, d), (Lk, d), (Lk, dv), (n_blocks, block or 1, Lk or 1)

        def one_block(q_b, m_b):
            logits = jnp.dot(q_b, k_h.T, preferred_element_type=jnp.float32)
            if mask is not None:
                logits = jnp.where(m_b, logits, jnp.finfo(jnp.float32).min)
            weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
            out = jnp.dot(weights.astype(v_h.dtype), v_h, preferred_element_type=jnp.float32)
            return out / weights.sum(axis=-1, keepdims=True)

        if n_blocks == 1:
            return one_block(q_h[0], m_h[0])[None]
        return jax.lax.map(lambda qm: one_block(*qm), (q_h, m_h))

    out = jax.lax.map(one_head, (qh, kh, vh, mh))  # (B * H, n_blocks, block, dv)
    out = out.reshape(batch, heads, n_blocks * block, -1)[:, :, :lq].transpose(0, 2, 1, 3)
    return out.astype(q.dtype)


def _attention_dense(q, k, v, *, mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _attention_jax_nn(q, k, v, mask):
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(q.dtype)


def _attention_chunked(q, k, v, mask, query_chunk, key_chunk):
    batch, lq, heads, _ = q.shape
    lk = k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    qc, kc = min(query_chunk, lq), min(key_chunk, lk)
    lq_pad, lk_pad = -lq % qc, -lk % kc
    full_mask = jnp.ones((1, 1, lq, lk), bool) if mask is None else jnp.broadcast_to(mask, (batch, heads, lq, lk))
    full_mask = jnp.pad(full_mask, ((0, 0), (0, 0), (0, lq_pad), (0, lk_pad)))  # padded keys never attend
    q = jnp.pad(q, ((0, 0), (0, lq_pad), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, lk_pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, lk_pad), (0, 0), (0, 0)))
    n_q, n_k = q.shape[1] // qc, k.shape[1] // kc
    # (n_k, batch, kc, heads, d) so that lax.scan walks the key chunks.
    k_chunks = k.reshape(batch, n_k, kc, heads, -1).swapaxes(0, 1)
    v_chunks = v.reshape(batch, n_k, kc, heads, -1).swapaxes(0, 1)
    neg = jnp.finfo(jnp.float32).min

    def one_query_chunk(i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * qc, qc, axis=1)
        mask_i = jax.lax.dynamic_slice_in_dim(full_mask, i * qc, qc, axis=2)
        mask_chunks = mask_i.reshape(*mask_i.shape[:3], n_k, kc).transpose(3, 0, 1, 2, 4)

        def step(carry, chunk):
            running_max, normaliser, acc = carry
            k_j, v_j, m_j = chunk
            logits = jnp.einsum("bqhd,bkhd->bhqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
            logits = jnp.where(m_j, logits, neg)
            new_max = jnp.maximum(running_max, logits.max(-1))
            correction = jnp.exp(running_max - new_max)
            p = jnp.exp(logits - new_max[..., None]) * m_j
            normaliser = normaliser * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bhqk,bkhd->bhqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
            )
            return (new_max, normaliser, acc), None

        init = (
            jnp.full((batch, heads, qc), neg, jnp.float32),
            jnp.zeros((batch, heads, qc), jnp.float32),
            jnp.zeros((batch, heads, qc, v.shape[-1]), jnp.float32),
        )
        (_, normaliser, acc), _ = jax.lax.scan(step, init, (k_chunks, v_chunks, mask_chunks))
        out = acc / jnp.maximum(normaliser, jnp.finfo(jnp.float32).tiny)[..., None]
        return out.transpose(0, 2, 1, 3)  # (batch, qc, heads, d)

    out = jax.lax.map(one_query_chunk, jnp.arange(n_q))  # (n_q, batch, qc, heads, d)
    out = out.swapaxes(0, 1).reshape(batch, n_q * qc, heads, -1)[:, :lq]
    return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Transformer blocks (CompVis `ldm/modules/attention.py`; submodule names of diffusers' Transformer2DModel).
# --------------------------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (self-attention when context is None).

    x: (B, Lq, query_dim); context: (B, Lk, context_dim). Returns (B, Lq, query_dim).
    to_q/to_k/to_v are bias-free projections to heads * head_dim; to_out_0 projects back, with bias.
    """

    heads: int
    head_dim: int
    attention: AttentionImpl = "xla"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(inner, use_bias=False, name="to_q")(x)
        k = dense(inner, use_bias=False, name="to_k")(context)
        v = dense(inner, use_bias=False, name="to_v")(context)
        q, k, v = (t.reshape(*t.shape[:2], self.heads, self.head_dim) for t in (q, k, v))  # (B, L, heads, d)
        out = attend(q, k, v, attention=self.attention).reshape(*x.shape[:2], inner)
        out = dense(x.shape[-1], name="to_out_0")(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLU(nn.Module):
    """Gated GELU: proj to 2 * features, split into (value, gate), value * gelu(gate) with the exact (erf) GELU.

    Input (..., C); output (..., features). The reference uses torch's default `F.gelu` (approximate="none").
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net_0 (GEGLU to mult * C), dropout, net_2 (Dense back to C). (..., C) -> (..., C)."""

    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


def _layer_norm(name: str, x: jax.Array, *, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """LayerNorm over the last axis (eps 1e-5, torch's default) computed in float32, returned in `dtype`.

    Call inside a compact method: creates the submodule `name` in the calling module.
    """
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, name=name)(x).astype(dtype)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).

    x: (B, L, C); context: (B, Lk, context_dim) or None (attn2 then attends over x). Returns (B, L, C).
    """

    heads: int
    head_dim: int
    attention: AttentionImpl = "xla"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = functools.partial(CrossAttention, self.heads, self.head_dim, self.attention, self.dropout, **kw)
        norm = functools.partial(_layer_norm, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + attn(name="attn1")(norm("norm1", x), None, deterministic)
        x = x + attn(name="attn2")(norm("norm2", x), context, deterministic)
        return x + FeedForward(dropout=self.dropout, name="ff", **kw)(norm("norm3", x), deterministic)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` by cross-attention.

    GroupNorm (32 groups, eps 1e-6) -> proj_in (1x1 conv, or Dense when `use_linear`) to heads * head_dim ->
    `depth` BasicTransformerBlocks over the H*W tokens -> proj_out (zero-initialised) -> + input.
    x: (B, H, W, C); context: (B, Lk, context_dim) or None. Returns (B, H, W, C).
    """

    heads: int
    head_dim: int
    depth: int = 1
    use_linear: bool = False
    attention: AttentionImpl = "xla"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm32(epsilon=1e-6, name="norm", **kw)(x)
        if self.use_linear:
            h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(batch, height * width, channels))
        else:
            h = conv(inner, 1, name="proj_in", **kw)(h).reshape(batch, height * width, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(
                self.heads, self.head_dim, self.attention, self.dropout, name=f"transformer_blocks_{i}", **kw
            )(h, context, deterministic)
        zeros = nn.initializers.zeros_init()
        if self.use_linear:
            h = nn.Dense(channels, kernel_init=zeros, name="proj_out", **kw)(h).reshape(x.shape)
        else:
            h = conv(channels, 1, kernel_init=zeros, name="proj_out", **kw)(h.reshape(batch, height, width, inner))
        return x + h


class AttentionBlock(nn.Module):
    """The UNet's plain self-attention block (CompVis `AttentionBlock`, used without a spatial transformer).

    GroupNorm (32 groups, eps `epsilon`) -> to_q/to_k/to_v (with bias) -> attention over the H*W tokens ->
    to_out_0 (zero-initialised) -> + input. x: (B, H, W, C) with C = heads * head_dim; returns (B, H, W, C).
    Names follow diffusers' converted attention block (`group_norm`, `to_q`, ..., `to_out.0`).
    """

    heads: int
    epsilon: float = 1e-5
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        del context, deterministic  # same call signature as SpatialTransformer; this block has neither
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        if channels % self.heads:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by {self.heads} heads")
        h = GroupNorm32(epsilon=self.epsilon, name="group_norm", **kw)(x).reshape(batch, height * width, channels)
        q, k, v = (
            nn.Dense(channels, name=n, **kw)(h).reshape(batch, height * width, self.heads, channels // self.heads)
            for n in ("to_q", "to_k", "to_v")
        )
        out = attend(q, k, v, attention=self.attention).reshape(batch, height * width, channels)
        out = nn.Dense(channels, kernel_init=nn.initializers.zeros_init(), name="to_out_0", **kw)(out)
        return x + out.reshape(x.shape)
