"""UNetModel: parity with diffusers' UNet2DConditionModel / UNet2DModel (PyTorch float32, random weights,
converted through ldm_jax.convert.diffusers_unet), the full SD v1 parameter structure, bf16, remat, bad input.

Parity tolerance: relative 1e-5 of the output's largest value (float32; the UNet chains ~20 convs, norms and
attentions; measured ~1e-6).
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from ldm_jax.config import build_dataclass, load_config_file
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.diffusers_unet import convert_diffusers_unet, load_diffusers_unet, unet_config_from_diffusers
from ldm_jax.models.unet import UNetConfig, UNetModel, build_unet, init_unet, unet_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
RTOL = 1e-5

TINY = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
            cross_attention_dim=16)
CASES = {
    # SD v1-like: conv proj_in/out, fixed head count, attention at factor 1 (+ mid), 2 res blocks, depth 2.
    "sd1": dict(TINY, layers_per_block=2, attention_head_dim=2, transformer_layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2-like: linear proj_in/out, fixed head dim 16 (2 and 4 heads), attention at every level.
    "sd2": dict(TINY, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # Class-conditional (label embedding added to temb), scale-shift norm, attention only at factor 2.
    "class": dict(TINY, attention_head_dim=2, num_class_embeds=10, resnet_time_scale_shift="scale_shift",
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    # 9 input channels (inpainting concat), vector ("sequential"/adm) conditioning, the other sinusoid convention.
    "nine_channel_adm": dict(TINY, in_channels=9, attention_head_dim=2, class_embed_type="projection",
                             projection_class_embeddings_input_dim=12, flip_sin_to_cos=False, freq_shift=1,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}


def _randomise(module: torch.nn.Module) -> None:
    """Moves norm scales/biases and any zero-initialised tensor off their defaults so the mapping is tested."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1 or not p.any():
                p.add_(0.1 * torch.randn_like(p))


def _inputs(cfg: UNetConfig, y_kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    t = torch.tensor([3, 999])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen) if cfg.use_spatial_transformer else None
    y = {None: None, "class": torch.tensor([1, 7]), "vector": torch.randn(2, 12, generator=gen)}[y_kind]
    return x, t, context, y


def _ours(cfg, params, x, t, context, y):
    as_jnp = lambda a: None if a is None else jnp.asarray(a.numpy())  # noqa: E731
    out = jax.jit(UNetModel(cfg).apply)(
        {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), as_jnp(t), as_jnp(context), as_jnp(y)
    )
    return np.asarray(out).transpose(0, 3, 1, 2)


def _assert_close(ours, ref):
    assert np.abs(ref).max() > 0.1  # the reference output is not trivially small
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_unet2dcondition(case, tmp_path):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**CASES[case]).eval()
    _randomise(ref)
    if case == "sd1":  # through the folder loader: config.json + safetensors as written by save_pretrained
        ref.save_pretrained(tmp_path)
        cfg, params = load_diffusers_unet(tmp_path)
    else:
        cfg = unet_config_from_diffusers(ref.config)
        params = convert_diffusers_unet(ref.state_dict(), cfg)
    y_kind = {"class": "class", "nine_channel_adm": "vector"}.get(case)
    x, t, context, y = _inputs(cfg, y_kind)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, class_labels=y).sample.numpy()
    _assert_close(_ours(cfg, params, x, t, context, y), expected)


@pytest.mark.parametrize("size", [(9, 7), (6, 10)])
def test_matches_diffusers_where_halvings_are_not_exact(size):
    """Latent sides the UNet's downsamplings do not divide (9x7: 9 -> 5 -> 3; 6x10 -> 3x5 -> 2x3): a halving
    rounds up and the decoder upsamples to its skip's size, as diffusers' `upsample_size`. Three levels."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**dict(CASES["sd2"], block_out_channels=(32, 32, 64),
                                      attention_head_dim=(2, 2, 4),
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))).eval()
    _randomise(ref)
    cfg = unet_config_from_diffusers(ref.config)
    params = convert_diffusers_unet(ref.state_dict(), cfg)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, *size, generator=gen)
    t = torch.tensor([3, 999])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample.numpy()
    assert expected.shape[2:] == size
    _assert_close(_ours(cfg, params, x, t, context, None), expected)


def test_matches_diffusers_unet2d_unconditional_attention_blocks():
    """The celebahq-style UNet (plain attention blocks, no context) against diffusers' UNet2DModel."""
    torch.manual_seed(0)
    ref = UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=16,
                      down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D")).eval()
    _randomise(ref)
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1,), num_heads=-1, num_head_channels=16, use_spatial_transformer=False,
                     context_dim=None)
    params = convert_diffusers_unet(ref.state_dict(), cfg)
    x, t, _, _ = _inputs(cfg, None)
    with torch.no_grad():
        expected = ref(x, t).sample.numpy()
    _assert_close(_ours(cfg, params, x, t, None, None), expected)


def test_sd_v1_structure_matches_diffusers_without_allocating():
    """The SD v1 config has diffusers' 859,520,964 parameters, key by key and shape by shape."""
    sd1 = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    with torch.device("meta"):  # shapes only: no 3.4 GB allocation
        ref = UNet2DConditionModel(**sd1)
    assert sum(p.numel() for p in ref.parameters()) == 859_520_964
    cfg = build_dataclass(UNetConfig, load_config_file(CONFIGS / "sd_v1.py").unet)
    assert unet_config_from_diffusers(ref.config) == cfg
    shapes = jax.eval_shape(lambda key: init_unet(UNetModel(cfg), key), jax.random.key(0))
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes)) == 859_520_964
    # Zero-stride stand-ins of the right shapes go through the strict converter (every key mapped, shapes equal).
    fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
    params = convert_diffusers_unet(fake, cfg)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes["params"])


def _tiny(**overrides) -> UNetConfig:
    return UNetConfig(**dict(dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(1, 2), num_heads=2, context_dim=16), **overrides))


def _one_level(**overrides) -> UNetConfig:
    """The smallest UNet with every block kind (ResnetBlock, SpatialTransformer; no resampling): cheap to compile."""
    return _tiny(channel_mult=(1,), attention_resolutions=(1,), **overrides)


def _tiny_inputs(batch=2):
    keys = jax.random.split(jax.random.key(5), 2)
    return (jax.random.normal(keys[0], (batch, 8, 8, 4)), jnp.array([10, 900][:batch]),
            jax.random.normal(keys[1], (batch, 5, 16)))


def _random_params(model, x, t, context):
    """Random params of the right shapes without compiling an init (numpy draws; kernels scaled by fan-in)."""
    shapes = jax.eval_shape(lambda key: model.init(key, x, t, context), jax.random.key(0))
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name, noise = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1 + 0.1 * noise if name == "scale" else 0.1 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_bfloat16_compute_with_float32_params_is_close_to_float32():
    x, t, context = _tiny_inputs()
    params = _random_params(UNetModel(_one_level()), x, t, context)
    out32 = jax.jit(UNetModel(_one_level()).apply)(params, x, t, context)
    out16 = jax.jit(UNetModel(_one_level(), dtype=jnp.bfloat16).apply)(params, x, t, context)
    assert out16.dtype == jnp.float32  # the output head runs in float32
    # bf16 keeps 8 mantissa bits (~4e-3 relative per op); over ~20 layers, 5% of the output scale is loose but safe.
    err = float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max())
    assert err < 5e-2, err


def test_remat_gives_the_same_loss_and_gradients():
    x, t, context = _tiny_inputs(batch=1)
    params = _random_params(UNetModel(_one_level()), x, t, context)

    def loss_and_grad(remat):
        model = build_unet(_one_level(dropout=0.1), remat=remat)
        loss = lambda p: jnp.mean(  # noqa: E731
            model.apply(p, x, t, context, deterministic=False, rngs={"dropout": jax.random.key(3)}) ** 2
        )
        return jax.jit(jax.value_and_grad(loss))(params)

    loss, grads = loss_and_grad(False)
    loss_r, grads_r = loss_and_grad("dots_saveable")
    np.testing.assert_allclose(loss_r, loss, rtol=1e-5)
    for g_r, g in zip(jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads), strict=True):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(context=jnp.zeros((2, 5, 12))), r"context must be \(B=2, L, context_dim=16\); got \(2, 5, 12\)"),
    (dict(context=None), r"context must be .* got None"),
    (dict(x=jnp.zeros((2, 8, 8, 3))), r"in_channels=4\); got \(2, 8, 8, 3\)"),
    (dict(x=jnp.zeros((2, 0, 8, 4))), r"in_channels=4\); got \(2, 0, 8, 4\)"),
    (dict(y=jnp.zeros((2,), jnp.int32)), r"num_classes=None"),
    (dict(t=jnp.zeros((3,))), r"timesteps must be a scalar or \(B=2,\)"),
])
def test_bad_inputs_are_refused(bad, message):
    x, t, context = _tiny_inputs()
    args = dict(dict(x=x, t=t, context=context, y=None), **bad)
    model = UNetModel(_tiny())
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.key(0), args["x"], args["t"], args["context"], args["y"]))


def test_missing_class_labels_are_refused():
    x, t, context = _tiny_inputs()
    for num_classes, adm, message in ((10, None, "num_classes=10 needs y"), ("sequential", 6, "needs y")):
        model = UNetModel(_tiny(num_classes=num_classes, adm_in_channels=adm))
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, t, context))
    model = UNetModel(_tiny(num_classes="sequential", adm_in_channels=6))
    with pytest.raises(ValueError, match=r"adm_in_channels=6\); got \(2, 5\)"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context, jnp.zeros((2, 5))))


@pytest.mark.parametrize("fields, message", [
    (dict(num_heads=8, num_head_channels=64), "exactly one of num_heads"),
    (dict(num_heads=-1, num_head_channels=-1), "exactly one of num_heads"),
    (dict(num_classes="sequential"), "adm_in_channels"),
    (dict(attention_resolutions=(3,)), r"attention_resolutions \[3\]"),
    (dict(context_dim=None), "needs context_dim"),
    (dict(resblock_updown=True), "resblock_updown"),
])
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**fields)


@pytest.mark.parametrize("options, message", [
    (dict(attention="flash"), r"build_unet: attention='flash'; expected one of \('xla', 'jax_nn', 'chunked'\)"),
    (dict(remat="sometimes"), r"build_unet: remat='sometimes'; expected False, True or one of"),
])
def test_bad_run_time_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_unet(_tiny(), **options)


def test_run_time_keys_of_old_configs_are_dropped():
    """A `unet` section saved when attention and remat were config fields builds the same UNetConfig."""
    fields = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                  num_heads=2, context_dim=16)
    assert unet_config({**fields, "attention": "chunked", "remat": True}) == unet_config(fields) == _tiny()
    assert build_unet({**fields, "attention": "chunked"}).attention == "xla"  # the saved value is not an option
    with pytest.raises(ValueError, match=r"unet: unknown field\(s\) \['atention'\]"):
        unet_config({**fields, "atention": "xla"})


def test_converter_refuses_unsupported_options_and_mismatched_weights():
    with pytest.raises(ConversionError, match="addition_embed_type='text_time'"):
        unet_config_from_diffusers(dict(addition_embed_type="text_time"))
    with pytest.raises(ConversionError, match="up_block_types"):
        unet_config_from_diffusers(dict(up_block_types=("UpBlock2D",) * 4))
    with pytest.raises(ConversionError, match="unknown option frobnicate"):
        unet_config_from_diffusers(dict(frobnicate=1))
    with torch.device("meta"):
        ref = UNet2DConditionModel(**CASES["sd1"])
    cfg = unet_config_from_diffusers(ref.config)
    fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
    del fake["conv_in.bias"]
    fake["conv_in.extra"] = np.zeros(3, np.float32)
    fake["conv_out.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ConversionError, match=r"(?s)missing \(1\): conv_in/bias.*unexpected \(1\): conv_in.extra"
                                              r".*conv_out.bias: checkpoint \(5,\) vs model \(4,\)"):
        convert_diffusers_unet(fake, cfg)


def test_position_embedding_is_added_after_conv_in_and_checks_the_size():
    x, t, context = _tiny_inputs()
    plain, positioned = UNetModel(_one_level()), UNetModel(_one_level(position_embedding=(8, 8)))
    params = _random_params(positioned, x, t, context)["params"]
    assert params["position_embedding"].shape == (8, 8, 32)
    table = params["position_embedding"]
    without = {k: v for k, v in params.items() if k != "position_embedding"}
    zero = dict(without, position_embedding=jnp.zeros_like(table))
    np.testing.assert_array_equal(positioned.apply({"params": zero}, x, t, context),
                                  plain.apply({"params": without}, x, t, context))
    assert not np.allclose(positioned.apply({"params": params}, x, t, context),
                           plain.apply({"params": without}, x, t, context))
    assert init_unet(positioned, jax.random.key(0))["params"]["position_embedding"].shape == (8, 8, 32)
    with pytest.raises(ValueError, match=r"inputs are 4x4 latents but the learned position embedding is 8x8"):
        positioned.apply({"params": params}, x[:, :4, :4], t, context)


@pytest.mark.parametrize("fields, message", [
    (dict(model_channels=0), r"model_channels=0 and channel_mult=\(1, 2\) must be >= 1"),
    (dict(channel_mult=()), r"channel_mult=\(\) must be >= 1 \(channel_mult non-empty\)"),
    (dict(num_res_blocks=0), r"num_res_blocks=0 and transformer_depth=1 must be >= 1"),
    (dict(num_heads=-1, num_head_channels=7), r"num_head_channels=7 does not divide the 32 channels of level 0"),
])
def test_sizes_and_heads_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**fields)
