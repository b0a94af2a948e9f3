"""Conditioning encoders: CLIP parity with transformers, tokenisation, BERT/class embedders, bad input."""
import dataclasses
import importlib.util
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from ldm_jax.config import load_config_file
from ldm_jax.convert.common import ConversionError, convert_state_dict, expected_shapes
from ldm_jax.convert.transformers_clip import clip_text_config_from_transformers, convert_clip_text_state_dict
from ldm_jax.models.text import (BertEmbedder, BertEmbedderConfig, ClassEmbedder, ClassEmbedderConfig,
                                 ClipTextConfig, ClipTextTransformer, build_cond_stage, cond_stage_config,
                                 cond_stage_inputs_shape)
from ldm_jax.models.tokenizer import load_tokenizer, tokenize
from tokenizer_fixtures import write_bert_tokenizer, write_clip_tokenizer, write_tokenizer_json

# float32 everywhere, matmul precision "highest" (conftest): the only differences from torch are summation
# order and erf/exp implementations, ~1e-6 relative on O(1) LayerNorm outputs.
RTOL = ATOL = 1e-5
VOCAB, LENGTH = 1000, 77
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _hf_clip(hidden_act: str, eos_token_id: int, seed: int = 0) -> transformers.CLIPTextModel:
    """A tiny random-weight CLIPTextModel; LayerNorm weights/biases are randomised too."""
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=LENGTH, hidden_act=hidden_act, bos_token_id=VOCAB - 2, eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(eos: int, pad: int, lengths=(9, 30, 77), seed: int = 0) -> np.ndarray:
    """(B, 77) ids: BOS, random tokens (some above `eos` so argmax and first-eos pooling differ), EOS, pad."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), LENGTH), pad, np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, VOCAB - 2, n)
        ids[b, 0], ids[b, n - 1] = VOCAB - 2, eos
    return ids


@pytest.mark.parametrize("hidden_act,eos_token_id", [("quick_gelu", 2), ("gelu", 500)])
def test_clip_matches_transformers(hidden_act, eos_token_id):
    hf = _hf_clip(hidden_act, eos_token_id)
    # Legacy eos id 2 means "pool at argmax(ids)": the real end-of-text token then must be the largest id.
    eos = VOCAB - 1 if eos_token_id == 2 else eos_token_id
    ids = _ids(eos=eos, pad=eos)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_hidden_states=True)
        ref_penultimate_ln = hf.final_layer_norm(ref.hidden_states[-2])

    config = clip_text_config_from_transformers(hf.config, pad_token_id=eos)
    assert config.pooling == ("argmax" if eos_token_id == 2 else "first_eos")
    params = {"params": convert_clip_text_state_dict(hf.state_dict(), config)}
    model = ClipTextTransformer(config)
    out = model.apply(params, jnp.asarray(ids, jnp.int32), method=model.encode)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.penultimate_hidden_state, ref.hidden_states[-2].numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.pooled_output, ref.pooler_output.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out.context, out.last_hidden_state)

    penultimate = ClipTextTransformer(dataclasses.replace(config, output_layer="penultimate"))
    context = jax.jit(penultimate.apply)(params, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(context, ref_penultimate_ln.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("attention", ["chunked", "jax_nn"])
def test_clip_attention_implementations_and_bfloat16(attention):
    config = _tiny("clip")
    ids = jnp.asarray(_ids(eos=VOCAB - 1, pad=VOCAB - 1, lengths=(6, 40)), jnp.int32)
    params = ClipTextTransformer(config).init(jax.random.key(0), ids)
    ref = ClipTextTransformer(config).apply(params, ids)
    out = ClipTextTransformer(config, attention=attention).apply(params, ids)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    low = ClipTextTransformer(config, attention=attention, dtype=jnp.bfloat16).apply(params, ids)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=0.1)  # bf16 has 8 mantissa bits


def test_clip_pooling_rules_differ():
    """With eos 500 followed by larger ids, argmax and first-eos pooling pick different tokens."""
    ids = _ids(eos=500, pad=500)
    assert (ids.argmax(-1) != (ids == 500).argmax(-1)).any()


def test_clip_converter_accepts_checkpoint_layout_and_drops_position_ids():
    hf = _hf_clip("quick_gelu", 2)
    config = clip_text_config_from_transformers(hf.config, pad_token_id=VOCAB - 1)
    state = hf.state_dict()
    on_disk = {f"text_model.{k}": v for k, v in state.items()}
    on_disk["text_model.embeddings.position_ids"] = torch.arange(LENGTH)[None]
    a = convert_clip_text_state_dict(state, config)
    b = convert_clip_text_state_dict(on_disk, config)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(a["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"],
                                  state["encoder.layers.1.mlp.fc1.weight"].numpy().T)


def test_clip_converter_is_strict():
    hf = _hf_clip("quick_gelu", 2)
    config = clip_text_config_from_transformers(hf.config, pad_token_id=VOCAB - 1)
    state = {f"text_model.{k}": v for k, v in hf.state_dict().items()}
    broken = dict(state)
    del broken["text_model.encoder.layers.2.mlp.fc2.bias"]
    broken["text_projection.weight"] = torch.zeros(32, 32)
    with pytest.raises(ConversionError) as err:
        convert_clip_text_state_dict(broken, config)
    assert "encoder/layers_2/mlp/fc2/bias" in str(err.value) and "text_projection.weight" in str(err.value)
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_clip_text_state_dict(state, dataclasses.replace(config, intermediate_size=48))
    with pytest.raises(ConversionError, match="missing"):
        convert_clip_text_state_dict(state, dataclasses.replace(config, num_layers=4))


def test_clip_config_from_transformers():
    hf = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, hidden_act="gelu", bos_token_id=1, eos_token_id=[7])
    config = clip_text_config_from_transformers(hf, pad_token_id=0, output_layer="penultimate")
    assert (config.eos_token_id, config.pooling, config.output_layer, config.pad_token_id) == (7, "first_eos",
                                                                                               "penultimate", 0)
    with pytest.raises(ValueError, match="eos_token_id"):
        clip_text_config_from_transformers({**hf.to_dict(), "eos_token_id": [7, 8]}, pad_token_id=0)
    with pytest.raises(ValueError, match="hidden_act"):
        clip_text_config_from_transformers({**hf.to_dict(), "hidden_act": "relu"}, pad_token_id=0)


# ----------------------------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"clip": write_clip_tokenizer(root / "clip"), "bert": write_bert_tokenizer(root / "bert"),
            "tokenizer_json": write_tokenizer_json(root / "tokenizer_json")}


PROMPTS = ["a photo of a cat", "a red circle on the left, a blue square on the right!", ""]


def test_clip_tokenize_matches_transformers(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["clip"], "clip")
    eos, bos = tok.eos_token_id, tok.bos_token_id
    assert eos == len(tok) - 1 and bos == len(tok) - 2  # the OpenAI layout: end-of-text is the largest id
    ref = tok(PROMPTS, padding="max_length", max_length=LENGTH, truncation=True)["input_ids"]
    sd1 = tokenize(tok, PROMPTS, pad_token_id=eos)  # SD v1 pads with end-of-text
    assert sd1.dtype == np.int32 and sd1.shape == (3, LENGTH)
    np.testing.assert_array_equal(sd1, np.asarray(ref))
    assert sd1[0, :7].tolist() == tok("a photo of a cat")["input_ids"] and sd1[0, 1] != tok.unk_token_id
    sd2 = tokenize(tok, PROMPTS, pad_token_id=0)  # OpenCLIP pads with 0 after the end-of-text token
    first_eos = (sd1 == eos).argmax(-1)
    for b, n in enumerate(first_eos):
        np.testing.assert_array_equal(sd2[b, :n + 1], sd1[b, :n + 1])
        assert (sd2[b, n + 1:] == 0).all()


def test_long_prompt_warns_and_truncates(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["clip"], "clip")
    long_prompt = " ".join(["a green triangle"] * 40)
    n_tokens = len(tok(long_prompt)["input_ids"])
    assert n_tokens > LENGTH
    with pytest.warns(UserWarning, match=re.escape(f"prompt 1 has {n_tokens} tokens, more than max_length=77")):
        ids = tokenize(tok, ["a cat", long_prompt], pad_token_id=tok.eos_token_id)
    ref = tok(long_prompt, max_length=LENGTH, truncation=True)["input_ids"]
    assert ids[1].tolist() == ref and ids[1, -1] == tok.eos_token_id and ids[1, 0] == tok.bos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tok, ["a cat"], pad_token_id=0)  # short prompts do not warn


@pytest.mark.parametrize("kind,pad", [("bert", 0), ("tokenizer_json", 0)])
def test_other_tokenizers_match_transformers(tokenizer_dirs, kind, pad):
    tok = load_tokenizer(tokenizer_dirs[kind], kind)
    ids = tokenize(tok, PROMPTS, pad_token_id=pad, max_length=24)
    for row, prompt in zip(ids, PROMPTS, strict=True):
        ref = tok(prompt, max_length=24, truncation=True)["input_ids"]
        assert row.tolist() == ref + [pad] * (24 - len(ref))
    if kind == "bert":
        assert ids[0, 0] == tok.cls_token_id and tok.unk_token_id not in ids[0].tolist()


def test_load_tokenizer_errors(tokenizer_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*vocab\.json, merges\.txt"):
        load_tokenizer(tmp_path / "nowhere", "clip")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tokenizer_dirs["bert"], "clip")  # a BERT directory is not a CLIP one
    assert str(tokenizer_dirs["bert"]) in str(err.value) and "vocab.json, merges.txt" in str(err.value)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(tokenizer_dirs["clip"], "sentencepiece")
    empty = tmp_path / "empty_clip"
    empty.mkdir()
    (empty / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1}')
    (empty / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="empty vocabulary"):
        load_tokenizer(empty, "clip")


def test_tokenize_rejects_bad_prompts(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["clip"], "clip")
    with pytest.raises(TypeError, match="wrap a single prompt"):
        tokenize(tok, "a cat", pad_token_id=0)
    with pytest.raises(TypeError, match="prompt 1 is int"):
        tokenize(tok, ["a cat", 3], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id 49407 is outside"):
        tokenize(tok, ["a cat"], pad_token_id=49407)  # SD v1's pad id does not fit this tiny vocabulary


# ----------------------------------------------------------------------------------------------- BERT, class


def _text_tiny(kind: str):
    """configs/text_tiny.py's get_config(kind) (load_config_file calls get_config() without arguments)."""
    spec = importlib.util.spec_from_file_location("text_tiny", ROOT / "configs" / "text_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(kind)


def _tiny(kind: str):
    return cond_stage_config(_text_tiny(kind).cond_stage)


def test_bert_embedder_shapes_names_and_determinism():
    config = _tiny("bert")
    model = BertEmbedder(config)
    ids = jnp.asarray(_ids(eos=3, pad=0, lengths=(5, 77)), jnp.int32)
    params = model.init(jax.random.key(1), ids)
    flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params["params"]).items()}
    assert flat["token_emb/embedding"] == (VOCAB, 32) and flat["pos_emb/emb/embedding"] == (77, 32)
    assert flat["attn_layers/layers_2_1/to_q/kernel"] == (32, 32)  # heads*dim_head wide
    assert "attn_layers/layers_0_1/to_q/bias" not in flat and flat["attn_layers/layers_0_1/to_out/bias"] == (32,)
    assert flat["attn_layers/layers_3_1/net_0_0/kernel"] == (32, 128) and flat["norm/scale"] == (32,)
    assert len([k for k in flat if k.endswith("to_q/kernel")]) == config.n_layer
    out = model.apply(params, ids)
    assert out.shape == (2, 77, 32) and out.dtype == jnp.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, model.apply(params, ids))
    np.testing.assert_allclose(jax.jit(model.apply)(params, ids), out, rtol=RTOL, atol=ATOL)
    other = model.apply(params, ids.at[1, 2].set(7))
    assert not np.allclose(other[1], out[1]) and np.allclose(other[0], out[0])  # bidirectional, per-example
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)  # final LayerNorm (unit scale, zero bias at init)


def _x_transformers_shapes(c: BertEmbedderConfig) -> dict[str, tuple[int, ...]]:
    """Key names and torch shapes of LDM's TransformerWrapper(Encoder(dim, depth)) (ldm/modules/x_transformer.py)."""
    d, inner, hidden = c.n_embed, c.heads * c.dim_head, c.n_embed * c.ff_mult
    shapes = {"token_emb.weight": (c.vocab_size, d), "pos_emb.emb.weight": (c.max_length, d), "norm.weight": (d,),
              "norm.bias": (d,), "to_logits.weight": (c.vocab_size, d), "to_logits.bias": (c.vocab_size,)}
    for i in range(c.n_layer):
        a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        shapes.update({f"{a}.0.weight": (d,), f"{a}.0.bias": (d,), f"{a}.1.to_q.weight": (inner, d),
                       f"{a}.1.to_k.weight": (inner, d), f"{a}.1.to_v.weight": (inner, d),
                       f"{a}.1.to_out.weight": (d, inner), f"{a}.1.to_out.bias": (d,),
                       f"{f}.0.weight": (d,), f"{f}.0.bias": (d,), f"{f}.1.net.0.0.weight": (hidden, d),
                       f"{f}.1.net.0.0.bias": (hidden,), f"{f}.1.net.2.weight": (d, hidden), f"{f}.1.net.2.bias": (d,)})
    return shapes


def test_bert_names_mirror_x_transformers_keys():
    """An LDM BERTEmbedder state dict maps onto our params by the shared strict converter, prefix stripped."""
    config = dataclasses.replace(_tiny("bert"), dim_head=6)  # inner width 24 != n_embed 32, as 512 != 1280 in LDM
    rng = np.random.default_rng(0)
    state = {f"cond_stage_model.transformer.{k}": rng.standard_normal(v).astype(np.float32)
             for k, v in _x_transformers_shapes(config).items()}
    ids = jnp.zeros((1, config.max_length), jnp.int32)
    prefix = "cond_stage_model.transformer."

    def rename(key):
        key = key[len(prefix):]
        return None if key.startswith("to_logits.") else key  # the unused language-model head

    params = convert_state_dict(state, expected_shapes(BertEmbedder(config).init, jax.random.key(0), ids),
                                source="LDM BERTEmbedder", rename=rename, embeddings=("token_emb", "emb"))
    np.testing.assert_array_equal(params["attn_layers"]["layers_2_1"]["to_q"]["kernel"],
                                  state[prefix + "attn_layers.layers.2.1.to_q.weight"].T)
    assert np.isfinite(BertEmbedder(config).apply({"params": params}, ids)).all()


def test_class_embedder():
    config = _tiny("class")
    assert config.null_class == 10 and config.context_dim == 32
    model = ClassEmbedder(config)
    labels = jnp.array([0, 3, 10, 3], jnp.int32)
    params = model.init(jax.random.key(0), labels)
    out = model.apply(params, labels)
    assert out.shape == (4, 1, 32)
    np.testing.assert_array_equal(out[1], out[3])
    np.testing.assert_array_equal(out[:, 0], params["params"]["embedding"]["embedding"][np.array([0, 3, 10, 3])])
    np.testing.assert_array_equal(jax.jit(model.apply)(params, labels), out)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_token_ids_are_refused():
    config = _tiny("clip")
    model = ClipTextTransformer(config)
    good = jnp.asarray(_ids(eos=VOCAB - 1, pad=VOCAB - 1, lengths=(5,)), jnp.int32)
    params = model.init(jax.random.key(0), good)
    with pytest.raises(ValueError, match=r"value 1000 at index \(0, 3\) is outside \[0, 1000\)"):
        model.apply(params, good.at[0, 3].set(VOCAB))
    with pytest.raises(ValueError, match=r"value -1 at index \(0, 4\)"):
        model.apply(params, good.at[0, 4].set(-1))
    with pytest.raises(ValueError, match="length 78 > max_length 77"):
        model.apply(params, jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(TypeError, match="must be integers"):
        model.apply(params, good.astype(jnp.float32))
    # Under jit the values cannot be checked: out-of-range ids (negative too) give NaN, never a wrapped row.
    bad = jax.jit(model.apply)(params, good.at[0, 3].set(VOCAB).at[0, 0].set(-1))
    assert np.isnan(bad[0, 0]).all() and np.isnan(bad[0, 3:]).all()
    assert np.isfinite(jax.jit(model.apply)(params, good)).all()

    bert = BertEmbedder(_tiny("bert"))
    bert_params = bert.init(jax.random.key(0), good)
    with pytest.raises(ValueError, match="BERT input_ids: value 1000"):
        bert.apply(bert_params, good.at[0, 1].set(VOCAB))
    classes = ClassEmbedder(_tiny("class"))
    class_params = classes.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"class labels: value 11 at index \(1,\)"):
        classes.apply(class_params, jnp.array([0, 11]))
    with pytest.raises(ValueError, match="rank 1"):
        classes.apply(class_params, jnp.zeros((2, 1), jnp.int32))


# ----------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kind", ["clip", "bert", "class"])
def test_text_tiny_config_builds_and_runs(kind):
    section = _text_tiny(kind).cond_stage
    config = cond_stage_config(section)
    if kind == "clip":  # the default get_config() is what load_config_file sees
        assert cond_stage_config(load_config_file(ROOT / "configs" / "text_tiny.py").cond_stage) == config
    assert type(config) is {"clip": ClipTextConfig, "bert": BertEmbedderConfig, "class": ClassEmbedderConfig}[kind]
    model = build_cond_stage(config)
    inputs = jnp.zeros(cond_stage_inputs_shape(config, 2), jnp.int32)
    params = model.init(jax.random.key(0), inputs)
    out = model.apply(params, inputs)
    assert out.shape == (2, 1 if kind == "class" else 77, config.context_dim)


def test_cond_stage_config_errors():
    with pytest.raises(ValueError, match=r"cond_stage.kind is 't5'"):
        cond_stage_config({"kind": "t5"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hidden'\]"):
        cond_stage_config({"kind": "clip", "hidden": 3})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        cond_stage_config({"kind": "clip", "hidden_size": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="output_layer"):
        ClipTextConfig(output_layer="second")
    with pytest.raises(ValueError, match=r"build_cond_stage: attention='flash'; expected one of"):
        build_cond_stage(ClipTextConfig(), attention="flash")


def test_cond_stage_sections_of_old_configs_drop_run_time_keys():
    for kind in ("clip", "bert", "class"):
        section = _text_tiny(kind).cond_stage.to_dict()
        legacy = {**section, "attention": "chunked", "attention_implementation": "jax_nn", "implementation": "xla"}
        assert cond_stage_config(legacy) == cond_stage_config(section)


@pytest.mark.parametrize("name", ["sd_v1", "sd_v1_inpainting", "sd_v2", "ldm_cin256", "ldm_txt2img_1p4b"])
def test_model_configs_cond_stage_fits_unet(name):
    config = load_config_file(ROOT / "configs" / f"{name}.py")
    cond = cond_stage_config(config.cond_stage)
    assert cond.context_dim == config.unet.context_dim
    expected = {"sd_v1": (ClipTextConfig, 49407), "sd_v1_inpainting": (ClipTextConfig, 49407),
                "sd_v2": (ClipTextConfig, 0), "ldm_txt2img_1p4b": (BertEmbedderConfig, 0)}
    if name in expected:
        assert type(cond) is expected[name][0] and cond.pad_token_id == expected[name][1]
    else:
        assert cond == ClassEmbedderConfig(n_classes=1001, embed_dim=512)
