"""Conditioning encoders tau_theta: the CLIP text transformer, the LDM BERT-style embedder, the class embedder.

Every cond-stage module maps integer inputs to a cross-attention context:
- `ClipTextTransformer`  token ids (B, L<=max_length) -> (B, L, hidden_size)   (SD v1 / v2)
- `BertEmbedder`         token ids (B, L<=max_length) -> (B, L, n_embed)       (LDM txt2img-1p4B)
- `ClassEmbedder`        labels (B,)                  -> (B, 1, embed_dim)     (LDM cin256)
`build_cond_stage(config, attention=...)` builds the right one from its config; `cond_stage_config(section)`
turns a `cond_stage` config section into the matching frozen dataclass (dispatching on `kind`). The attention
implementation is a run-time option (module attribute `attention`), not a config field.

CLIP follows transformers' `CLIPTextModel` (module names mirror its keys, see convert/transformers_clip.py):
token + position embedding, pre-LN blocks (causal self-attention, MLP with quick_gelu or gelu), final
LayerNorm; with `projection_dim` set it is `CLIPTextModelWithProjection` (SDXL's second tower, OpenCLIP
ViT-bigG/14): a bias-free `text_projection` of the pooled output. The blocks (`ClipEncoder`, whose
`causal=False` drops the causal mask) are shared with the CLIP vision tower in models/clip_vision.py.
`ClipTextTransformer.encode(input_ids, clip_skip=0)` returns all of:
- last_hidden_state:        final LN of the last block's output (transformers' `last_hidden_state`);
- penultimate_hidden_state: the second-to-last block's output WITHOUT the final LN (transformers'
                            `hidden_states[-2]`; with one block, the embeddings);
- pooled_output:            last_hidden_state at the end-of-text token (transformers' `pooler_output`);
- text_embeds:              text_projection(pooled_output), (B, projection_dim); None without a projection
                            (CLIPTextModelWithProjection's `text_embeds`, SDXL's pooled prompt embedding);
- context:                  what the UNet cross-attends to, chosen by `config.output_layer`:
    "last"        -> last_hidden_state (SD v1, FrozenCLIPEmbedder);
    "penultimate" -> final LN applied to penultimate_hidden_state. This is SD v2's
                     FrozenOpenCLIPEmbedder(layer="penultimate"), which stops one block early and then
                     applies `ln_final`; diffusers gets the same numbers by shipping SD2's text encoder with
                     23 of OpenCLIP's 24 blocks (or `clip_skip=1`: hidden_states[-2] -> final_layer_norm).
                     We keep all blocks so that full checkpoints load; the last block's output is unused.
    "penultimate_no_norm" -> penultimate_hidden_state as it is, no final LN (SDXL, both towers: diffusers'
                     `hidden_states[-2]`; SGM's FrozenCLIPEmbedder(layer="hidden", layer_idx=-2) and
                     FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False)).
`clip_skip` (a static Python int, a run-time argument rather than config) takes the context from `clip_skip`
blocks earlier than the configured layer, normalised by the same rule, exactly as diffusers' pipelines do:
SD 1/2 `hidden_states[-(clip_skip + 1)]` then `final_layer_norm` (our "last"; SD 2 with all 24 blocks and
"penultimate" gives diffusers' 23-block numbers), SDXL `hidden_states[-(clip_skip + 2)]` without it
("penultimate_no_norm"). transformers' hidden_states has num_layers + 1 entries (the embeddings first), so
clip_skip ranges over [0, num_layers - depth], depth 0 for "last" and 1 for the penultimate layers (the
maximum reads the embeddings); anything else is a ValueError. Pooling and text_embeds ignore clip_skip.

Pooling follows transformers 5 `CLIPTextTransformer`: configs whose eos_token_id is the legacy 2 take the
token at argmax(input_ids) (the EOT token has the largest id in the OpenAI vocabulary); newer configs take
the first position where input_ids == eos_token_id. Here the rule is explicit: `pooling="argmax"` or
`pooling="first_eos"` (the converter picks it from the transformers config).

The BERT-style embedder mirrors LDM's `BERTEmbedder` = x-transformers (vendored in latent-diffusion as
ldm/modules/x_transformer.py) `TransformerWrapper(num_tokens, max_seq_len, Encoder(dim, depth))` called with
`return_embeddings=True`: token embedding + learned absolute position embedding (no scaling), pre-LN blocks
alternating self-attention (8 heads of 64 dims by default, so inner width 512 != dim; q/k/v Linear without
bias, out Linear with bias; bidirectional, no padding mask: BERTEmbedder passes none) and a feed-forward
(Linear(dim, 4 dim), exact GELU, Linear(4 dim, dim)), plain residual adds, final LayerNorm (eps 1e-5).
Dropout is 0 in LDM's configs and omitted. Module names mirror its torch keys (`token_emb`, `pos_emb/emb`,
`attn_layers/layers_{2i}_0` norm + `layers_{2i}_1/to_q...` attention, `layers_{2i+1}_0` norm +
`layers_{2i+1}_1/net_0_0, net_2` feed-forward, `norm`), so `convert_state_dict` maps a CompVis checkpoint's
`cond_stage_model.transformer.*` onto it by stripping that prefix (its unused `to_logits` is to be dropped).

Bad ids: when the ids are concrete (eager `apply`), an id outside [0, vocab_size) (or a label outside
[0, n_classes)) raises ValueError naming its position. Under `jax.jit` the values are unknown at trace time
and cannot be checked; there an out-of-range id (negative ones included) looks up a NaN embedding row, so
the output turns NaN instead of silently wrapping or clipping. Check ids before jitting (`tokenize` output
from a tokenizer whose vocabulary fits the model always passes).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config import build_dataclass, drop_runtime_keys
from ldm_jax.models.attention import AttentionImpl, attend, check_attention

Dtype = Any

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
CLIP_POOLINGS = ("argmax", "first_eos")
# output_layer -> (blocks before the last one it reads, whether the final LayerNorm is applied)
CLIP_OUTPUT_LAYERS: dict[str, tuple[int, bool]] = {
    "last": (0, True), "penultimate": (1, True), "penultimate_no_norm": (1, False),
}
TOKENIZER_KINDS = ("clip", "bert", "tokenizer_json")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """CLIP text transformer. Defaults: SD v1's openai/clip-vit-large-patch14 text tower.

    SD v2 (OpenCLIP ViT-H/14): hidden_size=1024, intermediate_size=4096, num_layers=24 (23 in diffusers'
    copy), num_heads=16, hidden_act="gelu", output_layer="penultimate", pad_token_id=0.
    SDXL: tower 1 is these defaults with output_layer="penultimate_no_norm"; tower 2 (OpenCLIP ViT-bigG/14)
    is hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
    output_layer="penultimate_no_norm", projection_dim=1280, pad_token_id=0.
    `projection_dim`: None for CLIPTextModel; set, the module has `text_projection` (hidden_size ->
    projection_dim, no bias) and `encode` returns `text_embeds` (CLIPTextModelWithProjection).
    `pad_token_id`, `max_length` and `tokenizer_kind` say how prompts are tokenised for this model
    (SD v1 pads with the end-of-text id 49407, OpenCLIP pads with 0).
    """

    kind: str = "clip"
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pooling: str = "argmax"
    output_layer: str = "last"
    pad_token_id: int = 49407
    tokenizer_kind: str = "clip"
    projection_dim: int | None = None

    def __post_init__(self):
        _require(self.kind == "clip", f"ClipTextConfig.kind must be 'clip', got {self.kind!r}")
        for name in ("hidden_size", "intermediate_size", "num_heads", "max_length", "vocab_size"):
            _require(getattr(self, name) >= 1, f"ClipTextConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.layer_norm_eps > 0, f"ClipTextConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        _require(0 <= self.eos_token_id < self.vocab_size,
                 f"ClipTextConfig.eos_token_id {self.eos_token_id} is outside [0, vocab_size={self.vocab_size})")
        _require(self.hidden_size % self.num_heads == 0,
                 f"ClipTextConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _require(self.hidden_act in ACTIVATIONS,
                 f"ClipTextConfig.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        _require(self.pooling in CLIP_POOLINGS, f"ClipTextConfig.pooling {self.pooling!r} not in {CLIP_POOLINGS}")
        _require(self.output_layer in CLIP_OUTPUT_LAYERS,
                 f"ClipTextConfig.output_layer {self.output_layer!r} not in {tuple(CLIP_OUTPUT_LAYERS)}")
        _require(self.num_layers >= 1, f"ClipTextConfig.num_layers must be >= 1, got {self.num_layers}")
        _require(0 <= self.pad_token_id < self.vocab_size,
                 f"ClipTextConfig.pad_token_id {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")
        _require(self.tokenizer_kind in TOKENIZER_KINDS,
                 f"ClipTextConfig.tokenizer_kind {self.tokenizer_kind!r} not in {TOKENIZER_KINDS}")
        _require(self.projection_dim is None or (_is_int(self.projection_dim) and self.projection_dim >= 1),
                 f"ClipTextConfig.projection_dim must be None or an integer >= 1, got {self.projection_dim!r}")

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context."""
        return self.hidden_size

    @property
    def max_clip_skip(self) -> int:
        """The largest `clip_skip` this config allows: num_layers - the depth of output_layer (see module
        docstring); at it, the context is read from the embeddings."""
        return self.num_layers - CLIP_OUTPUT_LAYERS[self.output_layer][0]


@dataclasses.dataclass(frozen=True)
class BertEmbedderConfig:
    """LDM's BERT-style text transformer trained from scratch. Defaults: LDM-KL-8 txt2img-1p4B.

    Tokenised with the bert-base-uncased WordPiece tokenizer ([CLS] ... [SEP], padded with [PAD] = 0).
    """

    kind: str = "bert"
    vocab_size: int = 30522
    max_length: int = 77
    n_embed: int = 1280
    n_layer: int = 32
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0
    tokenizer_kind: str = "bert"

    def __post_init__(self):
        _require(self.kind == "bert", f"BertEmbedderConfig.kind must be 'bert', got {self.kind!r}")
        _require(self.n_layer >= 1, f"BertEmbedderConfig.n_layer must be >= 1, got {self.n_layer}")
        _require(0 <= self.pad_token_id < self.vocab_size,
                 f"BertEmbedderConfig.pad_token_id {self.pad_token_id} is outside [0, vocab_size={self.vocab_size})")
        _require(self.tokenizer_kind in TOKENIZER_KINDS,
                 f"BertEmbedderConfig.tokenizer_kind {self.tokenizer_kind!r} not in {TOKENIZER_KINDS}")

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context."""
        return self.n_embed


@dataclasses.dataclass(frozen=True)
class ClassEmbedderConfig:
    """Class-label embedding. `n_classes` counts the null class used for classifier-free guidance, which is
    the last one (`null_class`); LDM cin256: 1000 ImageNet classes + 1 null class, embed_dim 512."""

    kind: str = "class"
    n_classes: int = 1001
    embed_dim: int = 512

    def __post_init__(self):
        _require(self.kind == "class", f"ClassEmbedderConfig.kind must be 'class', got {self.kind!r}")
        _require(self.n_classes >= 1, f"ClassEmbedderConfig.n_classes must be >= 1, got {self.n_classes}")

    @property
    def null_class(self) -> int:
        """The label of the unconditional (null) class."""
        return self.n_classes - 1

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context."""
        return self.embed_dim


CondStageConfig = ClipTextConfig | BertEmbedderConfig | ClassEmbedderConfig
COND_STAGE_CONFIGS: dict[str, type] = {"clip": ClipTextConfig, "bert": BertEmbedderConfig,
                                       "class": ClassEmbedderConfig}


def cond_stage_config(section: Any) -> CondStageConfig:
    """Builds the frozen config of a `cond_stage` section (ConfigDict or mapping), dispatching on its `kind`.

    Raises ValueError when `kind` is missing or unknown, or when the section has a field the kind lacks.
    Run-time keys that old saved configs hold (`config.RUNTIME_KEYS`) are dropped.
    """
    values = drop_runtime_keys(section, where="cond_stage")
    kind = values.get("kind")
    if kind not in COND_STAGE_CONFIGS:
        raise ValueError(f"cond_stage.kind is {kind!r}; expected one of {sorted(COND_STAGE_CONFIGS)}")
    return build_dataclass(COND_STAGE_CONFIGS[kind], values, where="cond_stage")


def build_cond_stage(
    config: CondStageConfig,
    *,
    attention: AttentionImpl = "xla",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Module:
    """The cond-stage module for `config`; its `__call__` maps ids/labels to a (B, L, context_dim) context.

    Run-time options: `attention` ("xla", "jax_nn", "chunked"; unused by the class embedder; a bad value is
    a ValueError), `dtype` (compute), `param_dtype` (storage).
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    check_attention(attention, "build_cond_stage")
    if isinstance(config, ClipTextConfig):
        return ClipTextTransformer(config, attention=attention, **kw)
    if isinstance(config, BertEmbedderConfig):
        return BertEmbedder(config, attention=attention, **kw)
    if isinstance(config, ClassEmbedderConfig):
        return ClassEmbedder(config, **kw)
    raise TypeError(f"build_cond_stage: unsupported config type {type(config).__name__}")


# ----------------------------------------------------------------------------------------------- helpers


def check_ids(ids: jax.Array, limit: int, *, what: str, ndim: int, max_length: int | None = None) -> None:
    """Checks an integer id array: rank `ndim`, length <= max_length, and (when concrete) values in [0, limit).

    Under tracing (jit) the values cannot be read; only dtype and shape are checked (see module docstring).
    """
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
    if ids.ndim != ndim:
        raise ValueError(f"{what} must have rank {ndim}, got shape {ids.shape}")
    if max_length is not None and ids.shape[-1] > max_length:
        raise ValueError(f"{what} has length {ids.shape[-1]} > max_length {max_length} (the position embedding size)")
    try:
        values = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return
    bad = (values < 0) | (values >= limit)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what}: value {int(values[where])} at index {where} is outside [0, {limit}); "
            f"{int(bad.sum())} value(s) out of range in total"
        )


def _lookup(table: nn.Embed, ids: jax.Array) -> jax.Array:
    """Embedding lookup whose out-of-range ids (negative too) give NaN rows instead of wrapping."""
    ids = jnp.where((ids < 0) | (ids >= table.num_embeddings), table.num_embeddings, ids)
    return table(ids)  # jnp.take's default mode "fill" gives NaN for index == num_embeddings


def float32_layer_norm(eps: float, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis with float32 statistics and float32 output (cast by the caller)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)  # (B, L, H*D) -> (B, L, H, D)


# ----------------------------------------------------------------------------------------------- CLIP


@flax.struct.dataclass
class ClipTextOutput:
    """Outputs of `ClipTextTransformer.encode`: (B, L, D) hidden states, (B, D) pooled, (B, L, D) context,
    (B, projection_dim) text_embeds or None (a config without projection_dim)."""

    last_hidden_state: jax.Array
    penultimate_hidden_state: jax.Array
    pooled_output: jax.Array
    context: jax.Array
    text_embeds: jax.Array | None = None


class ClipAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (with bias). (B, L, D) -> (B, L, D)."""

    num_heads: int
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        width = x.shape[-1]
        dense = lambda name: nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        q, k, v = (_split_heads(dense(n)(x), self.num_heads) for n in ("q_proj", "k_proj", "v_proj"))
        out = attend(q, k, v, mask=mask, attention=self.attention)
        return dense("out_proj")(out.reshape(x.shape))


class ClipMLP(nn.Module):
    """fc1 -> activation -> fc2. (B, L, D) -> (B, L, D)."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, name="fc1", **kw)(x))
        return nn.Dense(x.shape[-1], name="fc2", **kw)(h)


class ClipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x)). (B, L, D) -> (B, L, D).

    config: a ClipTextConfig or `clip_vision.ClipVisionConfig` (reads num_heads, intermediate_size,
    hidden_act, layer_norm_eps). mask: boolean, broadcastable to (B, heads, L, L), or None (no mask).
    """

    config: Any
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = float32_layer_norm(c.layer_norm_eps, self.param_dtype, "layer_norm1")(x).astype(self.dtype)
        x = x + ClipAttention(c.num_heads, self.attention, name="self_attn", **kw)(h, mask)
        h = float32_layer_norm(c.layer_norm_eps, self.param_dtype, "layer_norm2")(x).astype(self.dtype)
        return x + ClipMLP(c.intermediate_size, c.hidden_act, name="mlp", **kw)(h)


class ClipEncoder(nn.Module):
    """The stack of `num_layers` blocks. (B, L, D) -> (last block output, hidden_states).

    hidden_states is transformers' `output_hidden_states` tuple: num_layers + 1 arrays (B, L, D), the input
    (embeddings) first, then each block's output; no final norm anywhere (the last one is the first result).

    causal=True (the text tower): position i attends to positions <= i. causal=False (the vision tower,
    `clip_vision.ClipVisionTransformer`): every position attends to every position. config: a ClipTextConfig
    or `clip_vision.ClipVisionConfig` (reads num_layers and what `ClipEncoderLayer` reads).
    """

    config: Any
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        length = x.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if self.causal else None  # (1, 1, Lq, Lk)
        hidden_states = [x]
        for i in range(self.config.num_layers):
            x = ClipEncoderLayer(self.config, self.attention, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"layers_{i}")(x, mask)
            hidden_states.append(x)
        return x, tuple(hidden_states)


class ClipTextEmbeddings(nn.Module):
    """token_embedding(ids) + position_embedding(0..L-1). (B, L) int -> (B, L, D)."""

    config: ClipTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        token = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         name="token_embedding", **kw)
        position = nn.Embed(c.max_length, c.hidden_size, embedding_init=nn.initializers.normal(0.01),
                            name="position_embedding", **kw)
        return _lookup(token, input_ids) + position(jnp.arange(input_ids.shape[1]))[None]


class ClipTextTransformer(nn.Module):
    """CLIP text encoder (transformers CLIPTextModel semantics, CLIPTextModelWithProjection's with
    `config.projection_dim`; see the module docstring).

    `encode(input_ids, clip_skip=0)` -> ClipTextOutput; `__call__(input_ids, clip_skip=0)` -> the context
    (B, L, hidden_size). input_ids: (B, L) integers in [0, vocab_size), L <= max_length (77). clip_skip: a
    static Python int in [0, config.max_clip_skip].
    """

    config: ClipTextConfig
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = ClipTextEmbeddings(c, **kw)
        self.encoder = ClipEncoder(c, self.attention, **kw)
        self.final_layer_norm = float32_layer_norm(c.layer_norm_eps, self.param_dtype)
        if c.projection_dim is not None:
            self.text_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)

    def encode(self, input_ids: jax.Array, clip_skip: int = 0) -> ClipTextOutput:
        """All outputs: (B, L, D) last/penultimate hidden states and context, (B, D) pooled output,
        (B, projection_dim) text_embeds (None without projection_dim). clip_skip moves only the context."""
        c = self.config
        depth, normed = CLIP_OUTPUT_LAYERS[c.output_layer]
        if not _is_int(clip_skip):
            raise TypeError(f"clip_skip must be a static Python int, got {type(clip_skip).__name__}")
        if not 0 <= clip_skip <= c.max_clip_skip:
            raise ValueError(f"clip_skip {clip_skip} is outside [0, {c.max_clip_skip}] (num_layers {c.num_layers}, "
                             f"output_layer {c.output_layer!r})")
        check_ids(input_ids, c.vocab_size, what="CLIP input_ids", ndim=2, max_length=c.max_length)
        # 1. blocks; 2. final LN and pooling at the end-of-text token; 3. projection; 4. the context layer.
        _, hidden_states = self.encoder(self.embeddings(input_ids))  # num_layers + 1 entries
        last = self.final_layer_norm(hidden_states[-1]).astype(self.dtype)
        if c.pooling == "argmax":
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of eos_token_id (index 0 if absent, as in transformers)
            eos_index = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos_index]
        text_embeds = self.text_projection(pooled) if c.projection_dim is not None else None
        index = -1 - depth - int(clip_skip)  # transformers' hidden_states[-(clip_skip + 1 + depth)]
        if index == -1 and normed:
            context = last
        elif normed:
            context = self.final_layer_norm(hidden_states[index]).astype(self.dtype)
        else:
            context = hidden_states[index]
        return ClipTextOutput(last_hidden_state=last, penultimate_hidden_state=hidden_states[-2],
                              pooled_output=pooled, context=context, text_embeds=text_embeds)

    def __call__(self, input_ids: jax.Array, clip_skip: int = 0) -> jax.Array:
        """input_ids (B, L) -> context (B, L, hidden_size) per `config.output_layer` and `clip_skip`."""
        return self.encode(input_ids, clip_skip).context


# ----------------------------------------------------------------------------------------------- BERT-style


class XAttention(nn.Module):
    """x-transformers Attention: to_q/to_k/to_v (no bias, heads*dim_head wide), to_out (bias). (B,L,D)->(B,L,D)."""

    heads: int
    dim_head: int
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        q, k, v = (_split_heads(nn.Dense(inner, use_bias=False, name=n, **kw)(x), self.heads)
                   for n in ("to_q", "to_k", "to_v"))
        out = attend(q, k, v, attention=self.attention)
        return nn.Dense(x.shape[-1], name="to_out", **kw)(out.reshape(*x.shape[:-1], inner))


class XFeedForward(nn.Module):
    """x-transformers FeedForward: net_0_0 Linear(D, mult*D), exact GELU, net_2 Linear(mult*D, D)."""

    mult: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = jax.nn.gelu(nn.Dense(x.shape[-1] * self.mult, name="net_0_0", **kw)(x), approximate=False)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class XEncoder(nn.Module):
    """x-transformers Encoder(dim, depth): depth x (pre-LN attention, pre-LN feed-forward) with residual adds."""

    config: BertEmbedderConfig
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(c.n_layer):
            a, f = 2 * i, 2 * i + 1  # x-transformers numbers attention and feed-forward layers in one list
            h = float32_layer_norm(c.layer_norm_eps, self.param_dtype, f"layers_{a}_0")(x).astype(self.dtype)
            x = x + XAttention(c.heads, c.dim_head, self.attention, name=f"layers_{a}_1", **kw)(h)
            h = float32_layer_norm(c.layer_norm_eps, self.param_dtype, f"layers_{f}_0")(x).astype(self.dtype)
            x = x + XFeedForward(c.ff_mult, name=f"layers_{f}_1", **kw)(h)
        return x


class XPositionalEmbedding(nn.Module):
    """Learned absolute positions (`pos_emb/emb`): length L -> (1, L, D)."""

    max_length: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        emb = nn.Embed(self.max_length, self.features, embedding_init=nn.initializers.normal(0.02),
                       dtype=self.dtype, param_dtype=self.param_dtype, name="emb")
        return emb(jnp.arange(length))[None]


class BertEmbedder(nn.Module):
    """LDM BERT-style transformer embedder (see the module docstring for the x-transformers details).

    input_ids: (B, L) integers in [0, vocab_size), L <= max_length. Returns (B, L, n_embed).
    """

    config: BertEmbedderConfig
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_ids(input_ids, c.vocab_size, what="BERT input_ids", ndim=2, max_length=c.max_length)
        token = nn.Embed(c.vocab_size, c.n_embed, embedding_init=nn.initializers.normal(0.02), name="token_emb", **kw)
        x = _lookup(token, input_ids) + XPositionalEmbedding(c.max_length, c.n_embed, name="pos_emb", **kw)(
            input_ids.shape[1])
        x = XEncoder(c, self.attention, name="attn_layers", **kw)(x)
        return float32_layer_norm(c.layer_norm_eps, self.param_dtype, "norm")(x).astype(self.dtype)


# ----------------------------------------------------------------------------------------------- classes


class ClassEmbedder(nn.Module):
    """Class-label embedding for cross-attention: labels (B,) in [0, n_classes) -> (B, 1, embed_dim).

    The last class (`config.null_class`) is the unconditional label for classifier-free guidance.
    """

    config: ClassEmbedderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        c = self.config
        check_ids(labels, c.n_classes, what="class labels", ndim=1)
        table = nn.Embed(c.n_classes, c.embed_dim, embedding_init=nn.initializers.normal(1.0),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")
        return _lookup(table, labels[:, None])


def cond_stage_inputs_shape(config: CondStageConfig, batch: int) -> tuple[int, ...]:
    """Shape of the integer inputs the cond stage takes: (batch, max_length) ids or (batch,) labels."""
    return (batch,) if isinstance(config, ClassEmbedderConfig) else (batch, config.max_length)


__all__ = [
    "BertEmbedder", "BertEmbedderConfig", "ClassEmbedder", "ClassEmbedderConfig", "ClipTextConfig",
    "ClipTextOutput", "ClipTextTransformer", "CondStageConfig", "build_cond_stage", "check_ids",
    "cond_stage_config", "cond_stage_inputs_shape",
]
