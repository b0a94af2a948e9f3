"""Transformer blocks: parity with diffusers (PyTorch, float32, random weights) and the three attention
implementations giving the same block outputs.

Tolerance: relative 1e-5 of the output's scale (float32 sums of a few hundred terms; measured ~1e-6).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ldm_jax.convert.common import convert_state_dict, expected_shapes
from ldm_jax.models.attention import ATTENTION_IMPLS, AttentionBlock, SpatialTransformer

RTOL = 1e-5


def _randomise(module: torch.nn.Module) -> None:
    """Moves norm scales/biases and any zero-initialised tensor off their defaults so the mapping is tested."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1 or not p.any():
                p.add_(0.1 * torch.randn_like(p))


def _convert(ref: torch.nn.Module, module, *inputs):
    expected = expected_shapes(lambda key: module.init(key, *inputs), jax.random.key(0))
    return {"params": convert_state_dict(ref.state_dict(), expected, source=type(ref).__name__)}


def _nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _assert_close(ours, ref_nchw: np.ndarray):
    ref = ref_nchw.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_matches_diffusers(use_linear):
    torch.manual_seed(0)
    ref = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
                             cross_attention_dim=24, norm_num_groups=32, use_linear_projection=use_linear).eval()
    _randomise(ref)
    x, context = torch.randn(2, 32, 6, 4), torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context).sample.numpy()
    ours = SpatialTransformer(heads=2, head_dim=16, depth=2, use_linear=use_linear)
    params = _convert(ref, ours, _nhwc(x), jnp.asarray(context.numpy()))
    _assert_close(ours.apply(params, _nhwc(x), jnp.asarray(context.numpy())), expected)


def test_attention_block_matches_diffusers_legacy_attention():
    torch.manual_seed(1)
    ref = Attention(query_dim=64, heads=2, dim_head=32, norm_num_groups=32, eps=1e-5, residual_connection=True,
                    bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    _randomise(ref)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        expected = ref(x).numpy()
    ours = AttentionBlock(heads=2)
    params = _convert(ref, ours, _nhwc(x))
    _assert_close(ours.apply(params, _nhwc(x)), expected)


def test_attention_implementations_agree_in_blocks():
    """48x48 = 2304 tokens: the "chunked" path runs 3 query chunks of 1024 (the last one padded)."""
    x = jax.random.normal(jax.random.key(0), (1, 48, 48, 32))
    context = jax.random.normal(jax.random.key(1), (1, 5, 16))
    blocks = {impl: SpatialTransformer(heads=2, head_dim=16, attention=impl) for impl in ATTENTION_IMPLS}
    params = blocks["xla"].init(jax.random.key(2), x, context)
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
    outs = {impl: np.asarray(jax.jit(block.apply)(params, x, context)) for impl, block in blocks.items()}
    scale = np.abs(outs["xla"] - np.asarray(x)).max()  # compare the block's own contribution
    assert scale > 1e-2
    for impl in ("jax_nn", "chunked"):
        np.testing.assert_allclose(outs[impl], outs["xla"], rtol=RTOL, atol=RTOL * scale)


def test_bf16_block_runs_with_float32_params():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 32), jnp.bfloat16)
    context = jax.random.normal(jax.random.key(1), (1, 3, 16), jnp.bfloat16)
    block = SpatialTransformer(heads=2, head_dim=16, dtype=jnp.bfloat16)
    params = block.init(jax.random.key(2), x, context)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert block.apply(params, x, context).dtype == jnp.bfloat16
