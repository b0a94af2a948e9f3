"""SDXL's two text towers against transformers (PyTorch, float32, CPU), computed the way diffusers does.

Tower 1: CLIPTextModel (quick_gelu, legacy eos id 2: argmax pooling), as SD 1's CLIP ViT-L/14.
Tower 2: CLIPTextModelWithProjection (gelu, legacy eos id 2, a projection narrower than the width), as SDXL's
OpenCLIP ViT-bigG/14. Both tiny (width 32, 4 heads, 4 blocks) with random LayerNorm weights.
Checked: every output of `encode`, the context of every output_layer at clip_skip 0..2 against diffusers'
rules (SD 1/2: hidden_states[-(clip_skip + 1)] then final_layer_norm; SDXL: hidden_states[-(clip_skip + 2)]
as it is), the converter both ways (strict keys, save_pretrained / from_pretrained round trips), bad clip_skip.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.transformers_clip import (clip_text_config_from_transformers, clip_text_to_transformers_config,
                                               clip_text_to_transformers_state_dict, convert_clip_text_state_dict)
from ldm_jax.models.text import ClipTextConfig, ClipTextOutput, ClipTextTransformer, cond_stage_config

# Relative to the reference's largest magnitude (O(1) LayerNorm outputs; the raw block outputs are larger).
REL_TOL = 1e-5
VOCAB, LENGTH, LAYERS, PROJECTION = 1000, 77, 4, 24
EOS = VOCAB - 1  # legacy eos id 2 pools at argmax(ids): the end-of-text token is the largest id


def _hf_tower(projection: bool, seed: int = 0):
    """Tower 2 (CLIPTextModelWithProjection, gelu) when `projection`, else tower 1 (CLIPTextModel, quick_gelu)."""
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=LENGTH, hidden_act="gelu" if projection else "quick_gelu", bos_token_id=VOCAB - 2,
        eos_token_id=2, pad_token_id=0, projection_dim=PROJECTION,
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _final_layer_norm(hf) -> torch.nn.Module:
    """transformers 5 CLIPTextModel holds the LayerNorm itself; CLIPTextModelWithProjection's text_model does."""
    return getattr(hf, "text_model", hf).final_layer_norm


def _ids(pad: int, lengths=(9, 30, 77), seed: int = 0) -> np.ndarray:
    """(B, 77) ids: BOS, random tokens below EOS, EOS, then `pad`."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), LENGTH), pad, np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, VOCAB - 2, n)
        ids[b, 0], ids[b, n - 1] = VOCAB - 2, EOS
    return ids


def _close(actual, expected, what: str) -> None:
    expected = np.asarray(expected)
    err = np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))
    assert err <= REL_TOL, f"{what}: max abs diff / max abs ref = {err:.2e} > {REL_TOL}"


def _ours(hf, output_layer: str):
    config = clip_text_config_from_transformers(hf.config, pad_token_id=0, output_layer=output_layer,
                                                with_projection=isinstance(hf, transformers.CLIPTextModelWithProjection))
    return ClipTextTransformer(config), {"params": convert_clip_text_state_dict(hf.state_dict(), config)}


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("projection", [False, True], ids=["tower1_clip_l", "tower2_bigg"])
def test_towers_match_transformers_the_diffusers_way(projection):
    hf = _hf_tower(projection)
    ids = _ids(pad=EOS if not projection else 0)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_hidden_states=True)
        hidden = [h.numpy() for h in ref.hidden_states]
        assert len(hidden) == LAYERS + 1
        ln = _final_layer_norm(hf)
        # The contexts per diffusers: SD 1/2 pipelines (hidden_states[-(k + 1)] -> final_layer_norm; "last"
        # at k = 0 is last_hidden_state; SD 2 reads one block earlier), SDXL (hidden_states[-(k + 2)], no LN).
        expected = {
            "last": [ln(ref.hidden_states[-(k + 1)]).numpy() for k in range(3)],
            "penultimate": [ln(ref.hidden_states[-(k + 2)]).numpy() for k in range(3)],
            "penultimate_no_norm": [hidden[-(k + 2)] for k in range(3)],
        }
    # CLIPTextModelWithProjection's output has no pooler_output: the last hidden state at argmax(ids).
    pooled = ref.pooler_output if not projection else ref.last_hidden_state[np.arange(3), ids.argmax(-1)]

    for output_layer, contexts in expected.items():
        model, params = _ours(hf, output_layer)
        assert model.config.projection_dim == (PROJECTION if projection else None)
        for clip_skip, context in enumerate(contexts):
            out = model.apply(params, jnp.asarray(ids, jnp.int32), clip_skip, method=model.encode)
            _close(out.context, context, f"{output_layer} clip_skip={clip_skip} context")
            if clip_skip == 0 and output_layer == "last":
                _close(out.last_hidden_state, ref.last_hidden_state.numpy(), "last_hidden_state")
                _close(out.penultimate_hidden_state, hidden[-2], "hidden_states[-2]")
                _close(out.pooled_output, pooled.numpy(), "pooled output")
                if projection:
                    assert out.text_embeds.shape == (3, PROJECTION)
                    _close(out.text_embeds, ref.text_embeds.numpy(), "text_embeds")
                else:
                    assert out.text_embeds is None
        # The deepest clip_skip reads the embeddings (transformers' hidden_states[0]).
        deepest = model.apply(params, jnp.asarray(ids, jnp.int32), clip_skip=model.config.max_clip_skip)
        with torch.no_grad():
            embeddings = hidden[0] if output_layer == "penultimate_no_norm" else ln(ref.hidden_states[0]).numpy()
        _close(deepest, embeddings, f"{output_layer} clip_skip={model.config.max_clip_skip}")


def test_jit_with_static_clip_skip_and_output_pytree():
    """clip_skip is static under jit; ClipTextOutput (text_embeds None or set) passes through jit."""
    hf = _hf_tower(projection=True)
    model, params = _ours(hf, "penultimate_no_norm")
    ids = jnp.asarray(_ids(pad=0, lengths=(5, 12)), jnp.int32)
    encode = jax.jit(lambda p, i, k: model.apply(p, i, k, method=model.encode), static_argnums=2)
    eager = model.apply(params, ids, 1, method=model.encode)
    jitted = encode(params, ids, 1)
    assert isinstance(jitted, ClipTextOutput)
    np.testing.assert_allclose(jitted.context, eager.context, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jitted.text_embeds, eager.text_embeds, rtol=1e-6, atol=1e-6)
    plain = ClipTextTransformer(dataclasses.replace(model.config, projection_dim=None))
    plain_params = {"params": {k: v for k, v in params["params"].items() if k != "text_projection"}}
    out = jax.jit(lambda p, i: plain.apply(p, i, method=plain.encode))(plain_params, ids)
    assert out.text_embeds is None
    np.testing.assert_allclose(out.context, plain.apply(plain_params, ids), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ converter


def test_converter_projection_is_strict():
    hf = _hf_tower(projection=True)
    state = hf.state_dict()
    assert "text_projection.weight" in state and any(k.startswith("text_model.") for k in state)
    projected = clip_text_config_from_transformers(hf.config, pad_token_id=0, with_projection=True)
    plain = clip_text_config_from_transformers(hf.config, pad_token_id=0, with_projection=False)
    # In memory the config has no `architectures`: no projection unless asked for.
    assert clip_text_config_from_transformers(hf.config, pad_token_id=0).projection_dim is None
    no_projection = {k: v for k, v in state.items() if k != "text_projection.weight"}
    with pytest.raises(ConversionError, match="text_projection"):
        convert_clip_text_state_dict(no_projection, projected)
    with pytest.raises(ConversionError, match=r"unexpected key text_projection\.weight"):
        convert_clip_text_state_dict(state, plain)
    convert_clip_text_state_dict(no_projection, plain)  # the tower alone is a CLIPTextModel
    # The transformers-5 CLIPTextModel layout (no text_model. prefix) with the projection beside it.
    unprefixed = {k.removeprefix("text_model."): v for k, v in state.items()}
    a, b = convert_clip_text_state_dict(unprefixed, projected), convert_clip_text_state_dict(state, projected)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(a["text_projection"]["kernel"], state["text_projection.weight"].numpy().T)
    # The projection belongs at the top level, never inside the tower's prefix.
    nested = {**no_projection, "text_model.text_projection.weight": state["text_projection.weight"]}
    with pytest.raises(ConversionError, match=r"text_model\.text_projection\.weight"):
        convert_clip_text_state_dict(nested, projected)
    with pytest.raises(ConversionError, match="text_projection.weight: checkpoint"):
        convert_clip_text_state_dict(state, dataclasses.replace(projected, projection_dim=PROJECTION + 1))
    with pytest.raises(ValueError, match="projection_dim"):
        clip_text_config_from_transformers({k: v for k, v in hf.config.to_dict().items() if k != "projection_dim"},
                                           pad_token_id=0, with_projection=True)


def test_save_pretrained_folder_round_trips(tmp_path):
    """CLIPTextModelWithProjection.save_pretrained -> our config (from `architectures`) and params -> our
    export -> CLIPTextModelWithProjection.from_pretrained, with no missing or unexpected key either way."""
    hf = _hf_tower(projection=True)
    hf.save_pretrained(tmp_path / "saved")
    hf_json = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert hf_json["architectures"] == ["CLIPTextModelWithProjection"]
    config = clip_text_config_from_transformers(hf_json, pad_token_id=0, output_layer="penultimate_no_norm")
    assert config.projection_dim == PROJECTION and config.pooling == "argmax" and config.hidden_act == "gelu"
    params = convert_clip_text_state_dict(load_state_dict(tmp_path / "saved" / "model.safetensors"), config)

    out_dir = tmp_path / "exported"
    out_dir.mkdir()
    exported = clip_text_to_transformers_state_dict(params, config)
    assert set(exported) == set(load_state_dict(tmp_path / "saved" / "model.safetensors"))
    save_safetensors(out_dir / "model.safetensors", exported, {"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(clip_text_to_transformers_config(config)))
    back, info = transformers.CLIPTextModelWithProjection.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert clip_text_config_from_transformers(back.config, pad_token_id=0, output_layer="penultimate_no_norm",
                                              with_projection=True) == config
    ids = _ids(pad=0)
    with torch.no_grad():
        ref, again = hf(torch.from_numpy(ids)), back.eval()(torch.from_numpy(ids))
    np.testing.assert_array_equal(again.text_embeds.numpy(), ref.text_embeds.numpy())
    model = ClipTextTransformer(config)
    out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=model.encode)
    _close(out.text_embeds, ref.text_embeds.numpy(), "text_embeds after save_pretrained")


def test_plain_tower_exports_as_clip_text_model(tmp_path):
    hf = _hf_tower(projection=False)
    model, params = _ours(hf, "penultimate_no_norm")
    config = clip_text_to_transformers_config(model.config)
    assert config["architectures"] == ["CLIPTextModel"]
    state = clip_text_to_transformers_state_dict(params["params"], model.config)
    assert "text_projection.weight" not in state and all(k.startswith("text_model.") for k in state)
    save_safetensors(tmp_path / "model.safetensors", state, {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    back, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert clip_text_config_from_transformers(config, pad_token_id=0, output_layer="penultimate_no_norm") == \
        model.config
    with pytest.raises(ConversionError, match="text_projection"):
        clip_text_to_transformers_state_dict(params["params"], dataclasses.replace(model.config, projection_dim=8))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("output_layer,allowed", [("last", LAYERS), ("penultimate", LAYERS - 1),
                                                  ("penultimate_no_norm", LAYERS - 1)])
def test_bad_clip_skip_is_a_value_error(output_layer, allowed):
    config = ClipTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_heads=4,
                            max_length=16, eos_token_id=EOS, pad_token_id=0, output_layer=output_layer)
    assert config.max_clip_skip == allowed
    model = ClipTextTransformer(config)
    ids = jnp.zeros((1, 16), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    for bad in (-1, allowed + 1):
        with pytest.raises(ValueError, match=rf"clip_skip {bad} is outside \[0, {allowed}\]"):
            model.apply(params, ids, clip_skip=bad)
    with pytest.raises(TypeError, match="clip_skip"):
        model.apply(params, ids, clip_skip=1.0)
    with pytest.raises(TypeError, match="clip_skip"):
        jax.jit(lambda k: model.apply(params, ids, clip_skip=k))(1)


def test_config_fields():
    with pytest.raises(ValueError, match="projection_dim"):
        ClipTextConfig(projection_dim=0)
    with pytest.raises(ValueError, match="projection_dim"):
        ClipTextConfig(projection_dim=True)
    with pytest.raises(ValueError, match="penultimate_no_norm"):
        ClipTextConfig(output_layer="hidden")
    section = {"kind": "clip", "output_layer": "penultimate_no_norm", "projection_dim": 1280, "hidden_size": 1280,
               "intermediate_size": 5120, "num_layers": 32, "num_heads": 20, "hidden_act": "gelu", "pad_token_id": 0}
    assert cond_stage_config(section) == ClipTextConfig(**{k: v for k, v in section.items()})
    assert ClipTextConfig().projection_dim is None  # existing configs keep their meaning
