"""transformers CLIPTextModel -> our ClipTextTransformer: config and strict state-dict conversion.

Checkpoints on disk (transformers 4.x, diffusers' SD `text_encoder/`) name keys `text_model.<rest>`;
transformers 5's CLIPTextModel.state_dict() names them `<rest>` (it renames on load). Both are accepted.
Keys `<rest>` map onto Flax paths by `convert_state_dict` (numbered children joined with `_`):
  text_model.embeddings.token_embedding.weight          -> embeddings/token_embedding/embedding
  text_model.embeddings.position_embedding.weight       -> embeddings/position_embedding/embedding
  text_model.encoder.layers.3.self_attn.q_proj.weight   -> encoder/layers_3/self_attn/q_proj/kernel (transposed)
  text_model.encoder.layers.3.layer_norm1.weight        -> encoder/layers_3/layer_norm1/scale
  text_model.final_layer_norm.bias                      -> final_layer_norm/bias
The registered buffer `text_model.embeddings.position_ids` (present in older checkpoints) holds no parameter
and is dropped explicitly; any other key outside the model (e.g. `text_projection.weight` of
CLIPTextModelWithProjection) is reported as unexpected. For CompVis SD v1 checkpoints pass
`prefix="cond_stage_model.transformer.text_model."` (and only the cond-stage keys).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.convert.common import convert_state_dict, expected_shapes
from ldm_jax.models.text import ClipTextConfig, ClipTextTransformer

_BUFFERS = ("embeddings.position_ids",)
LEGACY_EOS_TOKEN_ID = 2  # transformers' marker for "pool at argmax(input_ids)" (configs before PR #24773)


def clip_text_config_from_transformers(
    hf_config: Any,
    *,
    pad_token_id: int,
    output_layer: str = "last",
    tokenizer_kind: str = "clip",
) -> ClipTextConfig:
    """Our ClipTextConfig from a transformers `CLIPTextConfig` (or its `to_dict()`).

    pad_token_id: the id prompts are padded with (SD v1: 49407, SD v2/OpenCLIP: 0). Required because the
      transformers config's `pad_token_id` (1 by default) is not what SD's tokenizers pad with.
    output_layer: "last" (SD v1) or "penultimate" (SD v2 with a full 24-block OpenCLIP text tower).
    """
    cfg = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    eos = cfg.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"CLIPTextConfig.eos_token_id {eos}: expected one id, the end-of-text token")
        eos = eos[0]
    if cfg.get("attention_dropout", 0.0):
        raise ValueError(f"CLIPTextConfig.attention_dropout {cfg['attention_dropout']}: expected 0 (not implemented)")
    return ClipTextConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        max_length=cfg["max_position_embeddings"],
        hidden_act=cfg["hidden_act"],
        layer_norm_eps=cfg["layer_norm_eps"],
        eos_token_id=int(eos),
        pooling="argmax" if eos == LEGACY_EOS_TOKEN_ID else "first_eos",
        output_layer=output_layer,
        pad_token_id=pad_token_id,
        tokenizer_kind=tokenizer_kind,
    )


def clip_text_expected_shapes(config: ClipTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{flax path: shape} of ClipTextTransformer(config)'s params (abstract; nothing is allocated)."""
    model = ClipTextTransformer(config)
    ids = jnp.zeros((1, config.max_length), jnp.int32)
    return expected_shapes(model.init, jax.random.key(0), ids)


def convert_clip_text_state_dict(
    state_dict: Mapping[str, Any],
    config: ClipTextConfig,
    *,
    prefix: str | None = None,
) -> dict[str, Any]:
    """Strictly converts a CLIPTextModel state dict (torch tensors or arrays) into ClipTextTransformer params.

    prefix: stripped from every key; keys without it are reported as unexpected. None: "text_model." when
      any key starts with it (checkpoint layout), else "" (transformers 5 in-memory layout).
    Returns the params tree (apply with `{"params": params}`). Raises ConversionError listing every missing,
    unexpected and mis-shaped key.
    """
    if prefix is None:
        prefix = "text_model." if any(k.startswith("text_model.") for k in state_dict) else ""

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return key  # not part of the text model: reported as unexpected under its own name
        rest = key[len(prefix):]
        return None if rest in _BUFFERS else rest

    return convert_state_dict(
        state_dict,
        clip_text_expected_shapes(config),
        source=f"transformers CLIPTextModel (keys {prefix}*)",
        rename=rename,
        embeddings=("token_embedding", "position_embedding"),
    )
