"""ControlNet: parity with diffusers 0.42's ControlNetModel (PyTorch float32, random weights, converted through
ldm_jax.convert.diffusers_controlnet), the UNet taking its residuals as diffusers' UNet2DConditionModel does,
initialisation from a UNet as ControlNetModel.from_unet, export that diffusers loads strictly, an SDXL-style
(text_time) ControlNet with global pooling and BGR order, and refused inputs.

Tolerance: 1e-5 relative to each output's largest value (float32; the encoder chains ~10 convs, norms and
attentions as the UNet's tests do; measured 2.5e-6 with the shared fixture's randomisation, 0.1 x N(0, 1) on
every parameter). One compile per model config: conditioning scale and guess mode are traced arguments. The tiny
models, inputs and the residual comparison are tests/controlnet_fixtures.py's, shared with the other ControlNet tests.
"""
import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from flax import traverse_util

import controlnet_fixtures
import sdxl_fixtures
from controlnet_fixtures import assert_residuals, diff, nchw, nhwc
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.diffusers_controlnet import (controlnet_config_from_diffusers, controlnet_config_to_diffusers,
                                                  convert_diffusers_controlnet, load_diffusers_controlnet,
                                                  save_diffusers_controlnet)
from ldm_jax.convert.diffusers_unet import convert_diffusers_unet, unet_config_from_diffusers
from ldm_jax.models.controlnet import (ControlNetConfig, ControlNetModel as OurControlNet, controlnet_param_shapes,
                                       controlnet_params_from_unet)
from ldm_jax.models.unet import UNetConfig, UNetModel, init_unet

RTOL = controlnet_fixtures.RTOL
LATENT = 8  # latent side; control images are 8x larger (the hint encoder's default 4 stages)
SD_UNET = dict(sample_size=LATENT, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
               attention_head_dim=2, transformer_layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SCALES = ((1.0, False), (0.5, False), (1.0, True), (0.7, True))  # (conditioning_scale, guess_mode)


def _inputs(context_dim: int, seed: int = 1):
    """(x, t, context, control image in [0, 1]) as torch NCHW tensors, batch 2 (`controlnet_fixtures.inputs`)."""
    return controlnet_fixtures.inputs(context_dim, latent=LATENT, seed=seed)


def _traced_controlnet(config: ControlNetConfig):
    """A jitted ControlNet apply with scale and guess mode traced, and a list counting its traces."""
    traces = []

    def run(params, x, t, context, cond, scale, guess, y=None, time_ids=None):
        traces.append(1)
        return OurControlNet(config).apply({"params": params}, x, t, context, cond, scale, y, time_ids,
                                           guess_mode=guess)

    return jax.jit(run), traces


# ------------------------------------------------------------------------------------- SD-style models, shared


@pytest.fixture(scope="module")
def sd():
    """A random diffusers UNet, ControlNetModel.from_unet(unet) as created (zero convs zero) and the same ControlNet
    with every parameter randomised; our configs and converted params."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_UNET)
    sdxl_fixtures.randomise(unet)
    fresh_state = controlnet_fixtures.controlnet_from_unet(unet, controlnet_fixtures.DIFFUSERS_HINT).state_dict()
    # the zero convs and the hint encoder's conv_out random too
    net = controlnet_fixtures.random_controlnet(unet, 1, controlnet_fixtures.DIFFUSERS_HINT)
    config, unet_config = controlnet_config_from_diffusers(net.config), unet_config_from_diffusers(unet.config)
    return dict(unet=unet, controlnet=net, fresh_state=fresh_state, config=config, unet_config=unet_config,
                params=convert_diffusers_controlnet(net.state_dict(), config),
                unet_params=convert_diffusers_unet(unet.state_dict(), unet_config))


@pytest.fixture(scope="module")
def sd_residuals(sd):
    """diffusers' and our residuals for SCALES on the same inputs (ours: one compile)."""
    x, t, context, cond = _inputs(SD_UNET["cross_attention_dim"])
    run, traces = _traced_controlnet(sd["config"])
    out = {}
    for scale, guess in SCALES:
        with torch.no_grad():
            ref = sd["controlnet"](x, t, context, cond, conditioning_scale=scale, guess_mode=guess, return_dict=False)
        ours = run(sd["params"], nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()), nhwc(cond),
                   jnp.float32(scale), jnp.bool_(guess))
        out[scale, guess] = ours, ref
    assert len(traces) == 1  # scale and guess mode traced: no retrace
    return out


@pytest.mark.parametrize("scale,guess", SCALES)
def test_residuals_match_diffusers_controlnet(sd_residuals, scale, guess):
    err, rel = assert_residuals(*sd_residuals[scale, guess], f"scale {scale} guess {guess}")
    print(f"ControlNet scale {scale} guess_mode {guess}: max abs {err:.2e}, relative {rel:.2e}")


def test_guess_mode_scales_are_diffusers_logspace(sd_residuals):
    """Guess mode at scale 1 is 0.1 ... 1.0 times the plain residuals (a check of the test's premise)."""
    (down, mid), _ = sd_residuals[1.0, False]
    (g_down, g_mid), _ = sd_residuals[1.0, True]
    ramp = np.logspace(-1, 0, len(down) + 1)
    for k, (a, b) in enumerate(zip([*down, mid], [*g_down, g_mid])):
        np.testing.assert_allclose(np.asarray(b), ramp[k] * np.asarray(a), rtol=1e-5, atol=1e-6)


def test_unet_with_residuals_matches_diffusers(sd, sd_residuals):
    """Our UNet given the ControlNet's residuals equals UNet2DConditionModel(down_block_additional_residuals=...,
    mid_block_additional_residual=...); the residuals change the output (they are not negligible)."""
    x, t, context, _ = _inputs(SD_UNET["cross_attention_dim"])
    _, (ref_down, ref_mid) = sd_residuals[0.5, False]
    with torch.no_grad():
        expected = sd["unet"](x, t, context, down_block_additional_residuals=ref_down,
                              mid_block_additional_residual=ref_mid).sample.numpy()
        plain = sd["unet"](x, t, context).sample.numpy()
    assert np.abs(expected - plain).max() > 0.1 * np.abs(expected).max()
    apply = jax.jit(lambda p, x, t, c, down, mid: UNetModel(sd["unet_config"]).apply(
        {"params": p}, x, t, c, down_residuals=down, mid_residual=mid))
    ours = nchw(apply(sd["unet_params"], nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()),
                       [nhwc(r) for r in ref_down], nhwc(ref_mid)))
    err, rel = diff(ours, expected)
    print(f"UNet with residuals: max abs {err:.2e}, relative {rel:.2e}")
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_params_from_unet_match_diffusers_from_unet(sd):
    """controlnet_params_from_unet equals ControlNetModel.from_unet's weights: the copied encoder and embeddings
    exactly, the zero convs and the hint encoder's conv_out zero; the rest of the hint encoder drawn as torch's
    default conv init (uniform within +-1/sqrt(fan_in))."""
    assert sd["config"] == ControlNetConfig(unet=sd["unet_config"])
    ours = traverse_util.flatten_dict(controlnet_params_from_unet(sd["unet_params"], sd["config"], jax.random.key(3)))
    ref = traverse_util.flatten_dict(convert_diffusers_controlnet(sd["fresh_state"], sd["config"]))
    assert ours.keys() == ref.keys()
    for path, value in ref.items():
        if path[0] == "controlnet_cond_embedding" and path[1] != "conv_out":
            bound = 1 / np.sqrt(np.prod(ref[(*path[:-1], "kernel")].shape[:-1]))  # fan_in = 3 * 3 * C_in
            assert np.shape(ours[path]) == value.shape and np.abs(ours[path]).max() <= bound, path
            assert np.abs(value).max() <= bound * (1 + 1e-6), path  # diffusers' own draw obeys the same bound
            if path[-1] == "kernel" and value.size >= 1000:
                assert abs(float(np.std(ours[path])) / (bound / np.sqrt(3)) - 1) < 0.1, path
        else:
            np.testing.assert_array_equal(np.asarray(ours[path]), value, err_msg="/".join(path))
    assert not np.any(ref[("controlnet_mid_block", "kernel")]) and not np.any(ref[("controlnet_cond_embedding",
                                                                                    "conv_out", "kernel")])


def test_params_from_unet_copy_a_learned_position_embedding():
    """A UNet with our learned position embedding (no diffusers equivalent) hands it to its ControlNet."""
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                     num_heads=2, context_dim=16, position_embedding=(4, 4))
    shapes = jax.eval_shape(lambda k: init_unet(UNetModel(cfg), k), jax.random.key(0))["params"]
    unet_params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
    config = ControlNetConfig(unet=cfg, conditioning_embedding_out_channels=(8, 16))
    params = controlnet_params_from_unet(unet_params, config, jax.random.key(1))
    assert params["position_embedding"] is unet_params["position_embedding"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(controlnet_param_shapes(config))
    with pytest.raises(ValueError, match="diffusers UNet2DConditionModel needs"):
        controlnet_config_to_diffusers(config)


def test_export_loads_in_diffusers_strictly(sd, sd_residuals, tmp_path):
    """save_diffusers_controlnet -> ControlNetModel.from_pretrained: no missing, unexpected or mis-shaped keys, no
    config key diffusers would ignore, the same weights bit for bit, the same residuals; and back here."""
    save_diffusers_controlnet(tmp_path, sd["config"], sd["params"])
    config = {k: v for k, v in controlnet_config_to_diffusers(sd["config"]).items()}
    assert set(config) <= set(inspect.signature(ControlNetModel.__init__).parameters)
    loaded, info = ControlNetModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    reference = sd["controlnet"].state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t, context, cond = _inputs(SD_UNET["cross_attention_dim"])
    with torch.no_grad():
        down, mid = loaded.eval()(x, t, context, cond, conditioning_scale=0.5, return_dict=False)
    ours = sd_residuals[0.5, False][0]
    assert_residuals(ours, (down, mid), "exported")
    config_back, params_back = load_diffusers_controlnet(tmp_path)
    assert config_back == sd["config"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_back, sd["params"])


def test_sd_v1_controlnet_structure_matches_diffusers_without_allocating():
    """ControlNetConfig() is SD v1's ControlNet: diffusers' 361,279,120 parameters, key by key and shape by shape."""
    with torch.device("meta"):  # shapes only
        reference = ControlNetModel(cross_attention_dim=768)
    assert sum(p.numel() for p in reference.parameters()) == 361_279_120
    assert controlnet_config_from_diffusers(reference.config) == ControlNetConfig()
    shapes = controlnet_param_shapes(ControlNetConfig())
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes)) == 361_279_120
    fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in reference.state_dict().items()}
    params = convert_diffusers_controlnet(fake, ControlNetConfig())
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)


# ------------------------------------------------------------------------------ SDXL-style (text_time) ControlNet


def test_sdxl_style_controlnet_with_global_pooling_and_bgr_matches_diffusers():
    """A ControlNet of a tiny SDXL-shaped UNet (text_time addition embedding, per-level depths and heads, a level
    without attention), with global_pool_conditions and BGR channel order: residuals as diffusers', guess mode
    without effect (diffusers ignores it when pooling)."""
    torch.manual_seed(0)
    unet = sdxl_fixtures.unet(size=2 * LATENT)
    base = controlnet_fixtures.controlnet_from_unet(unet, controlnet_fixtures.DIFFUSERS_HINT,
                                                    controlnet_conditioning_channel_order="bgr")
    config = {k: v for k, v in base.config.items() if k != "_use_default_values"}  # else defaults win
    reference = ControlNetModel.from_config({**config, "global_pool_conditions": True})
    sdxl_fixtures.randomise(reference)
    config = controlnet_config_from_diffusers(reference.config)
    assert config.unet.addition_embed_type == "text_time" and config.global_pool_conditions
    assert controlnet_config_from_diffusers(controlnet_config_to_diffusers(config)) == config
    params = convert_diffusers_controlnet(reference.state_dict(), config)
    x, t, context, cond = _inputs(unet.config.cross_attention_dim, seed=2)
    gen = torch.Generator().manual_seed(3)
    text_embeds = torch.randn(2, 24, generator=gen)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 24, 4, 2, 16, 16]])
    run, traces = _traced_controlnet(config)
    worst = (0.0, 0.0)
    for scale, guess in ((0.8, False), (0.8, True)):
        with torch.no_grad():
            ref = reference(x, t, context, cond, conditioning_scale=scale, guess_mode=guess, return_dict=False,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        ours = run(params, nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()), nhwc(cond),
                   jnp.float32(scale), jnp.bool_(guess), jnp.asarray(text_embeds.numpy()),
                   jnp.asarray(time_ids.numpy()))
        assert all(r.shape[1:3] == (1, 1) for r in [*ours[0], ours[1]])
        worst = tuple(map(max, worst, assert_residuals(ours, ref, f"SDXL guess {guess}")))
    assert len(traces) == 1
    print(f"SDXL-style pooled BGR ControlNet: max abs {worst[0]:.2e}, relative {worst[1]:.2e}")


# ------------------------------------------------------------------------------------------------- bad input


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_a_state_dict_of_another_layout_is_refused_by_the_strict_check(sd, tmp_path):
    """A UNet's state dict is one line saying so; other misfits go through the converters' strict check, whose first
    line names the first mis-shaped, else missing, else unexpected key."""
    with pytest.raises(ConversionError, match=r"decoder keys \('up_blocks\..*a UNet's state dict") as e:
        convert_diffusers_controlnet(sd["unet"].state_dict(), sd["config"])
    _one_line(e)
    other = ControlNetConfig(unet=sd["unet_config"], conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(ConversionError) as e:
        convert_diffusers_controlnet(sd["controlnet"].state_dict(), other)
    first = str(e.value).splitlines()[0]
    assert "first mismatch controlnet_cond_embedding.conv_out.weight" in first, first
    assert "unexpected" in first and "controlnet_cond_embedding.blocks.2.weight" in str(e.value)
    state = dict(sd["controlnet"].state_dict())
    del state["controlnet_mid_block.bias"]
    with pytest.raises(ConversionError, match=r"first missing key controlnet_mid_block/bias \(1 missing\)"):
        convert_diffusers_controlnet(state, sd["config"])
    wider = ControlNetConfig(unet=sd["unet_config"], conditioning_channels=1)
    with pytest.raises(ConversionError, match=r"first mismatch controlnet_cond_embedding.conv_in.weight: checkpoint "
                                              r"\(3, 3, 3, 16\) vs model \(3, 3, 1, 16\) \(1 mis-shaped\)"):
        convert_diffusers_controlnet(sd["controlnet"].state_dict(), wider)
    extra = {**sd["params"], "controlnet_down_blocks_9": sd["params"]["controlnet_down_blocks_0"]}
    with pytest.raises(ConversionError, match=r"ControlNet params\): first unexpected key controlnet_down_blocks_9/"):
        save_diffusers_controlnet(tmp_path / "out", sd["config"], extra)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_configs_diffusers_controlnets_cannot_have_are_refused(sd):
    with pytest.raises(ConversionError, match="up_block_types, out_channels: a UNet2DConditionModel config"):
        controlnet_config_from_diffusers(sd["unet"].config)
    with pytest.raises(ConversionError, match="mid_block_type='UNetMidBlock2D'"):
        controlnet_config_from_diffusers({**sd["controlnet"].config, "mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order='rbg' must be one of"):
        controlnet_config_from_diffusers({**sd["controlnet"].config, "controlnet_conditioning_channel_order": "rbg"})


def test_bad_call_inputs_are_refused_before_running(sd):
    """Shapes are checked while tracing (jax.eval_shape: nothing compiled or run)."""
    model, cfg = OurControlNet(sd["config"]), sd["config"]
    x, t, ctx = jnp.zeros((2, LATENT, LATENT, 4)), jnp.zeros((2,)), jnp.zeros((2, 7, 16))
    params = {"params": sd["params"]}

    def residuals(cond, scale=1.0):
        return jax.eval_shape(lambda c: model.apply(params, x, t, ctx, c, scale), cond)

    with pytest.raises(ValueError, match=r"control image must be \(2, 64, 64, 3\) .* got \(2, 32, 32, 3\)") as e:
        residuals(jnp.zeros((2, 32, 32, 3)))
    _one_line(e)
    with pytest.raises(ValueError, match=r"conditioning_scale must be a scalar or \(B=2,\); got \(3,\)"):
        residuals(jnp.zeros((2, 64, 64, 3)), jnp.ones(3))
    down, mid = residuals(jnp.zeros((2, 64, 64, 3)), jnp.array([1.0, 0.0]))  # per-example scales are fine
    assert [r.shape[-1] for r in down] == cfg.residual_channels and mid.shape == (2, 4, 4, 64)

    unet_params = {"params": sd["unet_params"]}
    unet = UNetModel(sd["unet_config"])
    with pytest.raises(ValueError, match=r"3 down_residuals for 4 skips .* another base UNet") as e:
        jax.eval_shape(lambda d, m: unet.apply(unet_params, x, t, ctx, down_residuals=d, mid_residual=m),
                       down[:3], mid)
    _one_line(e)
    with pytest.raises(ValueError, match=r"down_residuals\[3\] is \(2, 4, 4, 32\) but its skip is \(2, 4, 4, 64\)"):
        jax.eval_shape(lambda d, m: unet.apply(unet_params, x, t, ctx, down_residuals=d, mid_residual=m),
                       [*down[:3], jnp.zeros((2, 4, 4, 32))], mid)
    with pytest.raises(ValueError, match="down_residuals and mid_residual come together"):
        jax.eval_shape(lambda d: unet.apply(unet_params, x, t, ctx, down_residuals=d), down)

    wider = dataclasses.replace(sd["unet_config"], model_channels=64, num_heads=4)
    with pytest.raises(ValueError, match=r"UNet param conv_in/bias is \(32,\); the ControlNet config needs "
                                         r"\(64,\)") as e:
        controlnet_params_from_unet(sd["unet_params"], ControlNetConfig(unet=wider), jax.random.key(0))
    _one_line(e)
