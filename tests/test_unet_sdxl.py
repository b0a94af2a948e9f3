"""SDXL's UNet as config data: per-level transformer depths and the "text_time" embedding (pooled text + time ids).

Parity with diffusers' UNet2DConditionModel (PyTorch float32, every parameter randomised) for tiny SDXL-base- and
refiner-shaped configs converted by ldm_jax.convert.diffusers_unet; the config inverse (ours -> diffusers ->
ours, weights back bit for bit); the full-size SDXL base and refiner structures (shapes only); refused inputs and
configs.

Parity tolerance: relative 1e-5 of the output's largest value (float32), as tests/test_unet.py.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_jax.convert.common import ConversionError, params_to_state_dict
from ldm_jax.convert.diffusers_unet import (LITERAL_NAMES, convert_diffusers_unet, load_diffusers_unet,
                                            unet_config_from_diffusers, unet_config_to_diffusers)
from ldm_jax.models.unet import UNetConfig, UNetModel, init_unet, unet_config

RTOL = 1e-5
POOLED = 16  # width of the tiny pooled text embedding
TIME_DIM = 8  # tiny addition_time_embed_dim

# SDXL base in miniature: 3 levels, no attention at level 0, depths 1 / 2 at levels 1 / 2 (and 2 in the mid
# block), linear projections, heads of width 8 given as diffusers' per-level head counts, 6 time ids.
BASE = dict(
    sample_size=8, block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=24,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=[4, 8, 16], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
BASE_OURS = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
    transformer_depth=(0, 1, 2), num_heads=-1, num_head_channels=8, context_dim=24, use_linear_in_transformer=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM, adm_in_channels=POOLED + 6 * TIME_DIM,
)
# The refiner in miniature: 4 levels, attention at levels 1 and 2 only (the last level's blocks have none; the
# mid block attends), one depth for all, 5 time ids (sizes, crop, aesthetic score).
REFINER = dict(
    sample_size=8, block_out_channels=(32, 64, 128, 128), layers_per_block=1, cross_attention_dim=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2, attention_head_dim=[4, 8, 16, 16], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
)
TIME_IDS = {  # (original h, w, crop top, left, target h, w) / (original h, w, crop top, left, aesthetic score)
    6: [[64.0, 48.0, 0.0, 8.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 0.0, 1024.0, 1024.0]],
    5: [[64.0, 64.0, 0.0, 0.0, 6.0], [1024.0, 768.0, 16.0, 8.0, 2.5]],
}

# The real models (diffusers' stabilityai/stable-diffusion-xl-{base,refiner}-1.0 unet/config.json, the fields
# that differ from the defaults) and ours (SGM's sd_xl_base.yaml / sd_xl_refiner.yaml).
SDXL_BASE = dict(
    sample_size=128, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, addition_embed_type_num_heads=64,
)
SDXL_BASE_OURS = UNetConfig(
    model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
    transformer_depth=(0, 2, 10), num_heads=-1, num_head_channels=64, context_dim=2048,
    use_linear_in_transformer=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    adm_in_channels=2816,
)
SDXL_REFINER = dict(
    sample_size=128, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
    cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560, addition_embed_type_num_heads=64,
)
SDXL_REFINER_OURS = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2),
    transformer_depth=4, num_heads=-1, num_head_channels=64, context_dim=1280, use_linear_in_transformer=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, adm_in_channels=2560,
)


def _randomise(module: torch.nn.Module) -> None:
    """Moves every parameter off its initial value (zero-initialised conv_out, proj_out and biases included)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            scale = 0.1 if p.ndim == 1 or not p.any() else 0.02
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _inputs(cfg: UNetConfig, num_time_ids: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    t = torch.tensor([3, 999])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    pooled = torch.randn(2, POOLED, generator=gen)
    return x, t, context, pooled, torch.tensor(TIME_IDS[num_time_ids])


@functools.cache
def _jitted_apply(cfg: UNetConfig):
    """One jitted apply per config: a test's calls with new inputs of the same shapes reuse its compilation."""
    return jax.jit(UNetModel(cfg).apply)


@functools.cache
def _full_size_shapes(cfg: UNetConfig, num_time_ids: int):
    """Our full-size UNet's params, shapes only (tracing SDXL's init takes seconds: done once per config)."""
    return jax.eval_shape(lambda key: init_unet(UNetModel(cfg), key, num_time_ids=num_time_ids), jax.random.key(0))


def _ours(cfg, params, x, t, context, pooled, time_ids):
    as_jnp = lambda a: jnp.asarray(a.numpy())  # noqa: E731
    out = _jitted_apply(cfg)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                             as_jnp(t), as_jnp(context), as_jnp(pooled), as_jnp(time_ids))
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("case", ["base", "refiner"])
def test_matches_diffusers_sdxl_shaped(case, tmp_path):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**{"base": BASE, "refiner": REFINER}[case]).eval()
    _randomise(ref)
    if case == "base":  # through the folder loader: config.json + safetensors as save_pretrained writes them
        ref.save_pretrained(tmp_path)
        cfg, params = load_diffusers_unet(tmp_path)
        assert cfg == BASE_OURS
    else:
        cfg = unet_config_from_diffusers(ref.config)
        params = convert_diffusers_unet(ref.state_dict(), cfg)
        assert (cfg.transformer_depth, cfg.attention_resolutions, cfg.num_head_channels) == (2, (4, 2), 8)
    num_time_ids = 6 if case == "base" else 5
    x, t, context, pooled, time_ids = _inputs(cfg, num_time_ids)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy()
    ours = _ours(cfg, params, x, t, context, pooled, time_ids)
    assert np.abs(expected).max() > 0.1  # the reference output is not trivially small
    err = np.abs(ours - expected).max() / np.abs(expected).max()
    assert err <= RTOL, err  # measured 1.5e-6 (base), 1.2e-6 (refiner)
    # The time ids matter (a wrong sinusoid convention or order would not show with equal ids).
    other = _ours(cfg, params, x, t, context, pooled, time_ids.flip(0))
    assert np.abs(other - ours).max() > 1e-3


def test_config_round_trips_through_diffusers_and_json():
    """ours -> unet_config_to_diffusers -> UNet2DConditionModel builds -> the same UNetConfig; its weights convert
    and export back bit for bit; the JSON of our config (tuples as lists) builds the same config."""
    for ours in (BASE_OURS, dataclasses.replace(BASE_OURS, transformer_depth=3, num_heads=2, num_head_channels=-1)):
        exported = unet_config_to_diffusers(ours, sample_size=8)
        assert json.loads(json.dumps(exported)) == exported  # JSON-ready, no tuples
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**exported)
        assert unet_config_from_diffusers(ref.config) == ours
        state = {k: v.numpy() for k, v in ref.state_dict().items()}
        back = params_to_state_dict(convert_diffusers_unet(state, ours), literal=LITERAL_NAMES)
        assert sorted(back) == sorted(state)
        assert "add_embedding.linear_1.weight" in back
        for key, value in state.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert unet_config(json.loads(json.dumps(dataclasses.asdict(ours)))) == ours
    assert unet_config_to_diffusers(BASE_OURS)["transformer_layers_per_block"] == [1, 1, 2]


def test_sdxl_configs_are_diffusers_and_sgm_alike():
    """The real SDXL configs convert to ours and back; our full-size models have diffusers' parameter counts
    (shapes only: jax.eval_shape against diffusers on the meta device)."""
    for theirs, ours, count, num_time_ids in ((SDXL_BASE, SDXL_BASE_OURS, 2_567_463_684, 6),
                                              (SDXL_REFINER, SDXL_REFINER_OURS, 2_259_526_660, 5)):
        assert unet_config_from_diffusers(theirs) == ours
        exported = unet_config_to_diffusers(ours, sample_size=128)
        assert {k: exported[k] for k in theirs if k != "addition_embed_type_num_heads"} == {
            k: v for k, v in theirs.items() if k != "addition_embed_type_num_heads"}
        with torch.device("meta"):
            assert sum(p.numel() for p in UNet2DConditionModel(**theirs).parameters()) == count
        shapes = _full_size_shapes(ours, num_time_ids)
        assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes)) == count
    assert SDXL_BASE_OURS.depth_at(0) == 0 and SDXL_BASE_OURS.depth_at(2) == SDXL_BASE_OURS.mid_depth == 10


def test_sdxl_base_structure_matches_diffusers_key_by_key():
    """Zero-stride stand-ins of diffusers' SDXL base state dict go through the strict converter (every key mapped,
    shapes equal)."""
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SDXL_BASE)
    fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
    params = convert_diffusers_unet(fake, SDXL_BASE_OURS)
    shapes = _full_size_shapes(SDXL_BASE_OURS, 6)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes["params"])


def _tiny(**overrides) -> UNetConfig:
    return dataclasses.replace(BASE_OURS, num_res_blocks=1, **overrides)


@pytest.mark.parametrize("bad, message", [
    (dict(time_ids=None), r"needs time_ids \(B=2, N\) .*got None"),
    (dict(time_ids=jnp.zeros((2, 5))), r"y \(2, 16\) and time_ids \(2, 5\) give 16 \+ 5 x 8 = 56 features; "
                                       r"adm_in_channels is 64"),
    (dict(y=jnp.zeros((2, 20))), r"y \(2, 20\) and time_ids \(2, 6\) give 20 \+ 6 x 8 = 68 features"),
    (dict(y=None), r"needs y, the pooled text embedding \(B=2, P\); got None"),
    (dict(y=jnp.zeros((3, 16))), r"needs y, the pooled text embedding \(B=2, P\); got \(3, 16\)"),
    (dict(time_ids=jnp.zeros((2,))), r"needs time_ids \(B=2, N\) .*got \(2,\)"),
])
def test_bad_text_time_inputs_are_refused(bad, message):
    args = dict(dict(x=jnp.zeros((2, 8, 8, 4)), t=jnp.zeros((2,)), context=jnp.zeros((2, 3, 24)),
                     y=jnp.zeros((2, POOLED)), time_ids=jnp.zeros((2, 6))), **bad)
    model = UNetModel(_tiny())
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *args.values()))


def test_time_ids_without_text_time_are_refused():
    model = UNetModel(_tiny(addition_embed_type=None, addition_time_embed_dim=None, adm_in_channels=None))
    with pytest.raises(ValueError, match=r"time_ids \(2, 6\) given but the config has no text_time embedding"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 4)), jnp.zeros((2,)),
                                          jnp.zeros((2, 3, 24)), None, jnp.zeros((2, 6))))


@pytest.mark.parametrize("fields, message", [
    (dict(num_classes=10), r"addition_embed_type='text_time' takes y .*num_classes must be None \(got 10\)"),
    (dict(addition_embed_type="text"), r"addition_embed_type must be None or 'text_time'; got 'text'"),
    (dict(addition_time_embed_dim=None), r"needs addition_time_embed_dim >= 1 .*got None"),
    (dict(adm_in_channels=None), r"needs adm_in_channels >= 1 .*got None"),
    (dict(addition_embed_type=None), r"addition_time_embed_dim=8 needs addition_embed_type='text_time'"),
    (dict(transformer_depth=(0, 0, 2)), r"transformer_depth=\(0, 0, 2\) is 0 at level\(s\) \[1\], which attend"),
    (dict(transformer_depth=(0, 1, 0)), r"is 0 at level\(s\) \[2\], which attend .*the mid block's"),
    (dict(transformer_depth=(1, 2)), r"transformer_depth=\(1, 2\) must be an int >= 1 or one int >= 0 per level "
                                     r"\(3 levels"),
    (dict(transformer_depth=(1, -1, 2)), r"one int >= 0 per level"),
    (dict(transformer_depth=0), r"transformer_depth=0 must be >= 1"),
])
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(transformer_layers_per_block=[[1, 1], [1, 1], [2, 2]]), r"transformer_layers_per_block=\[\[1, 1\]"),
    (dict(transformer_layers_per_block=[1, 2]), r"transformer_layers_per_block=\[1, 2\] \(supported: an int, or "
                                                r"one int per level \(3 levels\)\)"),
    (dict(reverse_transformer_layers_per_block=[[2, 2, 2]] * 3), r"reverse_transformer_layers_per_block="),
    (dict(addition_embed_type="text"), r"addition_embed_type='text' \(supported: None or 'text_time'\)"),
    (dict(addition_time_embed_dim=None), r"needs addition_time_embed_dim and projection_class_embeddings_input_dim "
                                         r"\(got None, 64\)"),
    (dict(class_embed_type="projection"), r"addition_embed_type='text_time' with a class embedding"),
    (dict(attention_head_dim=[4, 8, 32]), r"heads \[8, 32\] for the attending levels' channels \[64, 128\]"),
])
def test_converter_refuses_what_it_cannot_express(fields, message):
    with pytest.raises(ConversionError, match=message):
        unet_config_from_diffusers({**BASE, **fields})
