"""The one attention function: its three implementations agree, masks work, bad shapes are refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import ATTENTION_IMPLS, attend


def _reference(q, k, v, mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("attention", ATTENTION_IMPLS)
def test_attention_matches_float64_reference(attention):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 37, 3, 8))
    k = jax.random.normal(kk, (2, 21, 3, 8))
    v = jax.random.normal(kv, (2, 21, 3, 8))
    causal = np.tril(np.ones((37, 21), bool))[None, None]
    for mask in (None, causal):
        out = attend(q, k, v, mask=mask, attention=attention, query_chunk=16, key_chunk=8)
        np.testing.assert_allclose(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_attention_bf16_keeps_float32_softmax():
    q = jax.random.normal(jax.random.key(1), (1, 64, 2, 16), jnp.bfloat16)
    out = attend(q, q, q)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, q, q), atol=3e-2)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heads, head_dim"):
        attend(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"attend: attention='flash'; expected one of \('xla', 'jax_nn', 'chunked'\)"):
        attend(jnp.zeros((1, 2, 1, 4)), jnp.zeros((1, 2, 1, 4)), jnp.zeros((1, 2, 1, 4)), attention="flash")
