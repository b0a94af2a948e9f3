"""Attention: the one attention function of the project, and the transformer blocks built on it.

`attention(q, k, v)` is used by every model (autoencoder mid-block, UNet transformers, text encoders).
It takes heads-last tensors (batch, length, heads, head_dim), computes the softmax in float32, and has
three interchangeable implementations that agree to float tolerance:

- "xla":       plain einsum -> float32 softmax -> einsum (materialises the (Lq, Lk) logits).
- "jax_nn":    `jax.nn.dot_product_attention`, which picks cuDNN flash attention on GPU for bf16/fp16.
- "chunked":   memory-efficient form (Rabe & Staats; flash-attention style online softmax): queries in
               chunks, keys in chunks with a running max and normaliser, never the full logits.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["xla", "jax_nn", "chunked"]
ATTENTION_IMPLS = ("xla", "jax_nn", "chunked")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    implementation: AttentionImpl = "xla",
    query_chunk: int = 1024,
    key_chunk: int = 4096,
) -> jax.Array:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v.

    Args:
      q: (batch, Lq, heads, head_dim) queries.
      k: (batch, Lk, heads, head_dim) keys.
      v: (batch, Lk, heads, head_dim_v) values ("jax_nn" needs head_dim_v == head_dim).
      mask: optional boolean, broadcastable to (batch, heads, Lq, Lk); True means "may attend".
      implementation: "xla", "jax_nn" or "chunked" (see module docstring).
      query_chunk, key_chunk: chunk sizes of the "chunked" implementation.

    Returns:
      (batch, Lq, heads, head_dim_v) in q's dtype. Logits and softmax are computed in float32.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects (batch, length, heads, head_dim) tensors; got q{q.shape} k{k.shape} v{v.shape}"
        )
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention shape mismatch: q{q.shape} k{k.shape} v{v.shape}")
    if implementation == "xla":
        return _attention_xla(q, k, v, mask)
    if implementation == "jax_nn":
        return _attention_jax_nn(q, k, v, mask)
    if implementation == "chunked":
        return _attention_chunked(q, k, v, mask, query_chunk, key_chunk)
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {ATTENTION_IMPLS}")


def _attention_xla(q, k, v, mask):
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
