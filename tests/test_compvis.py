"""CompVis single-file checkpoints: our export, read by diffusers' own CompVis converters, loads strictly into the
diffusers / transformers models and reproduces our outputs; importing it gives our params back exactly.

Tiny random models shaped like SD v1 (CLIP text, conv proj_in), SD 2.x (OpenCLIP text, linear proj_in, head
dim, v-prediction) and SD v1.5-inpainting (9 input channels), configured through small yamls shaped like the
real inference yamls (the same yaml drives `ldm_yaml` and diffusers' config builders). LDM-zoo layouts (VQ
first stage, plain AttentionBlocks with the legacy fused qkv, class and BERT cond stages) are checked against
diffusers' VQModel and a numpy transcription of openaimodel's QKVAttentionLegacy.

Parity tolerance: relative 1e-5 of the reference output's largest value (float32; measured ~1e-6).
"""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from diffusers.loaders import single_file_utils as sfu
from flax import traverse_util
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_jax.config import load_config_file
from ldm_jax import presets, store
from ldm_jax.convert import compvis
from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import ConversionError
from ldm_jax.diffusion.schedule import make_schedule
from ldm_jax.convert.ldm_yaml import config_from_ldm_yaml
from ldm_jax.ldm import LoadedModel, apply_unet, ldm_config, modules, param_shapes
from ldm_jax.models.attention import AttentionBlock
from ldm_jax.models.text import ClipTextConfig
from tokenizer_fixtures import write_bert_tokenizer, write_clip_tokenizer

RTOL = 1e-5
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
IMAGE = 32  # pixels; latents are 16x16 with the f=2 tiny first stage

TEXT = {
    "hf": dict(kind="clip", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
               max_length=77, hidden_act="quick_gelu", eos_token_id=99, pooling="argmax", output_layer="last",
               pad_token_id=99, tokenizer_kind="clip"),
    "openclip": dict(kind="clip", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     max_length=77, hidden_act="gelu", eos_token_id=99, pooling="argmax", output_layer="last",
                     pad_token_id=0, tokenizer_kind="clip"),
}
_YAML = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.{target}
  params:
{extra}    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 16
    channels: 4
    cond_stage_key: txt
    conditioning_key: {key}
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 16
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 2, 1 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
{heads}        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.{cond}
"""
YAMLS = {
    "sd1": _YAML.format(target="LatentDiffusion", extra="", key="crossattn", in_channels=4,
                        heads="        num_heads: 2\n", cond="FrozenCLIPEmbedder"),
    "sd2": _YAML.format(target="LatentDiffusion", extra='    parameterization: "v"\n', key="crossattn", in_channels=4,
                        heads="        num_head_channels: 16\n        use_linear_in_transformer: True\n",
                        cond="FrozenOpenCLIPEmbedder\n      params:\n        layer: penultimate"),
    "inpaint": _YAML.format(target="LatentInpaintDiffusion", extra="", key="hybrid", in_channels=9,
                            heads="        num_heads: 2\n", cond="FrozenCLIPEmbedder"),
}
TEXT_OF = {"sd1": "hf", "sd2": "openclip", "inpaint": "hf"}


def _config(kind, **cond_overrides):
    """(the parsed yaml, our LDMConfig): the yaml's full-size text encoder swapped for a tiny one."""
    original = yaml.safe_load(YAMLS[kind])
    config = config_from_ldm_yaml(original)
    with config.unlocked():
        config.cond_stage = ml_collections.ConfigDict({**TEXT[TEXT_OF[kind]], **cond_overrides})
    return original, ldm_config(config)


def _random_params(config, seed=0):
    """Random float32 params of the right shapes: fan-in scaled kernels, norm scales near 1, small biases."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        if path[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "embedding":
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        flat[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def _assert_equal_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert np.array_equal(np.asarray(fa[key]), np.asarray(fb[key])), key


def _assert_close(ours, ref):
    ref = np.asarray(ref)
    assert np.abs(ref).max() > 0.1  # the reference output is not trivially small
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (parsed yaml, config, params, path of our CompVis export)} for sd1, sd2 and inpaint."""
    out = {}
    for i, kind in enumerate(YAMLS):
        original, config = _config(kind)
        params = _random_params(config, seed=i)
        path = tmp_path_factory.mktemp(kind) / "model.safetensors"
        compvis.save_compvis(path, params, config)
        out[kind] = (original, config, params, path)
    return out


def _diffusers_unet(original, checkpoint):
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=IMAGE)
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    return unet


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_export_loads_into_diffusers_unet_and_matches(exported, kind):
    original, config, params, path = exported[kind]
    unet = _diffusers_unet(original, load_file(path))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.unet.in_channels, 16, 16, generator=gen)
    t = torch.tensor([3, 981])
    context = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=context).sample.numpy()
    ours = jax.jit(lambda p, x, t, c: apply_unet(config, p, x, t, {"context": c}))(
        params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()))
    _assert_close(np.asarray(ours).transpose(0, 3, 1, 2), ref)


def test_nine_channel_export_loads_into_diffusers_unet(exported):
    """The inpainting UNet runs the sd1 path above; here: its strict load and the 9-channel conv_in."""
    original, config, params, path = exported["inpaint"]
    unet = _diffusers_unet(original, load_file(path))
    assert unet.config.in_channels == 9 and config.concat_channels == 5
    kernel = params["unet"]["conv_in"]["kernel"]  # (3, 3, 9, 32) HWIO
    np.testing.assert_array_equal(unet.conv_in.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1))


def test_export_loads_into_diffusers_vae_and_matches(exported):
    original, config, params, path = exported["sd1"]
    checkpoint = load_file(path)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=IMAGE)
    vae = AutoencoderKL(**vae_config).eval()
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    assert vae.config.scaling_factor == config.diffusion.scale_factor
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_mean = vae.encode(images).latent_dist.mean
        ref_decoded = vae.decode(ref_mean).sample
    model = modules(config).first_stage
    variables = {"params": params["first_stage"]}
    mean = jax.jit(lambda v, x: model.apply(v, x, method=model.encode).mode())(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    decoded = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))(variables, mean)
    _assert_close(np.asarray(mean).transpose(0, 3, 1, 2), ref_mean.numpy())
    _assert_close(np.asarray(decoded).transpose(0, 3, 1, 2), ref_decoded.numpy())


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_export_loads_into_transformers_clip_and_matches(exported, kind):
    _, config, params, path = exported[kind]
    checkpoint = load_file(path)
    cond = config.cond_stage
    reference = CLIPTextModel(CLIPTextConfig(
        vocab_size=cond.vocab_size, hidden_size=cond.hidden_size, intermediate_size=cond.intermediate_size,
        num_hidden_layers=cond.num_layers, num_attention_heads=cond.num_heads, max_position_embeddings=77,
        hidden_act=cond.hidden_act, bos_token_id=98, eos_token_id=99, pad_token_id=cond.pad_token_id)).eval()
    if kind == "sd1":
        state = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        state = sfu.convert_open_clip_checkpoint(reference, checkpoint, prefix=compvis.OPENCLIP_PREFIX)
    # transformers 5 flattened CLIPTextModel; diffusers strips the prefix the same way when loading it.
    reference.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()}, strict=True)
    ids = np.random.default_rng(2).integers(0, 98, size=(2, 77))
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    model = modules(config).cond_stage
    ours = jax.jit(model.apply)({"params": params["cond_stage"]}, jnp.asarray(ids, jnp.int32))
    _assert_close(np.asarray(ours), ref)


@pytest.mark.parametrize("kind", sorted(YAMLS))
def test_import_of_export_is_exact(exported, kind):
    _, config, params, path = exported[kind]
    _assert_equal_params(compvis.load_compvis_checkpoint(path, config), params)


def test_torch_ckpt_with_state_dict_and_old_clip_keys(exported, tmp_path):
    _, config, params, path = exported["sd1"]
    state = load_file(path)
    # A CLIP saved without the text_model level, with transformers' old persistent position_ids buffer.
    state = {k.replace(compvis.HF_CLIP_PREFIX, compvis.HF_CLIP_PREFIX_FLAT): v for k, v in state.items()}
    state[f"{compvis.HF_CLIP_PREFIX_FLAT}embeddings.position_ids"] = torch.arange(77)[None]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, ckpt)
    _assert_equal_params(compvis.load_compvis_checkpoint(ckpt, config), params)


def test_nine_channel_weights_with_four_channel_config(exported):
    _, _, _, path = exported["inpaint"]
    _, four_channel = _config("sd1")
    with pytest.raises(ConversionError) as err:
        compvis.load_compvis_checkpoint(path, four_channel)
    expected = "model.diffusion_model.input_blocks.0.0.weight: checkpoint (32, 9, 3, 3) vs model (32, 4, 3, 3)"
    assert expected in str(err.value)


def test_wrong_model_and_bad_keys_are_named(exported):
    _, sd1, params, path = exported["sd1"]
    state = {k: v.numpy() for k, v in load_file(path).items()}
    _, sd2 = _config("sd2")
    with pytest.raises(ConversionError) as err:  # SD2's linear proj_in vs SD1's 1x1 conv, head counts
        compvis.convert_compvis_state_dict(state, sd2)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight: checkpoint (32, 32, 1, 1) vs model (32, 32)" in str(
        err.value)
    broken = {k: v for k, v in state.items() if not k.startswith("first_stage_model.decoder.")}
    broken["model.diffusion_model.extra_block.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        compvis.convert_compvis_state_dict(broken, sd1)
    message = str(err.value)
    assert "missing (" in message and "first_stage_model.decoder.conv_in.weight" in message
    assert "unexpected (1): model.diffusion_model.extra_block.weight" in message


def test_schedule_buffers_are_checked(exported):
    _, config, _, path = exported["sd2"]
    state = {k: v.numpy() for k, v in load_file(path).items()}
    assert "alphas_cumprod" in state and "betas" in state
    other = dataclasses.replace(config, diffusion=dataclasses.replace(
        config.diffusion, schedule=dataclasses.replace(config.diffusion.schedule, linear_end=0.02)))
    with pytest.raises(ConversionError, match=r"buffers differ from the config .*linear_end=0.02.*betas: max"):
        compvis.convert_compvis_state_dict(state, other)


def test_ema_weights(exported):
    _, config, params, path = exported["sd1"]
    state = {k: v.numpy() for k, v in load_file(path).items()}
    ema = {compvis.ema_key(k): v + 1.0 for k, v in state.items() if k.startswith(compvis.UNET_PREFIX)}
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    full = {**state, **ema, "model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(5)}
    _assert_equal_params(compvis.convert_compvis_state_dict(full, config), params)
    with_ema = compvis.convert_compvis_state_dict(full, config, use_ema=True)
    _assert_equal_params(with_ema["first_stage"], params["first_stage"])
    _assert_equal_params(with_ema["unet"], jax.tree.map(lambda a: a + 1.0, params["unet"]))
    with pytest.raises(ConversionError, match="use_ema=True but .* EMA weights are missing"):
        compvis.convert_compvis_state_dict(state, config, use_ema=True)


def test_openclip_tower_with_the_unused_last_block(exported):
    """A CompVis SD2 file has one block more than SD2's penultimate-layer context uses, plus
    text_projection and logit_scale: it loads into the 2-block config (dropping them) and whole into
    a 3-block output_layer="penultimate" config."""
    _, three_blocks = _config("sd2", num_layers=3, output_layer="penultimate")
    params = _random_params(three_blocks, seed=7)
    state = compvis.export_compvis(params, three_blocks)
    state.update({f"{compvis.OPENCLIP_PREFIX}text_projection": np.eye(32, dtype=np.float32),
                  f"{compvis.OPENCLIP_PREFIX}logit_scale": np.float32(4.6)})
    assert f"{compvis.OPENCLIP_PREFIX}transformer.resblocks.2.attn.in_proj_weight" in state
    _, two_blocks = _config("sd2")
    loaded = compvis.convert_compvis_state_dict(state, two_blocks)
    expected = jax.tree.map(lambda a: a, params)
    del expected["cond_stage"]["encoder"]["layers_2"]
    _assert_equal_params(loaded, expected)
    whole = compvis.convert_compvis_state_dict(state, three_blocks)
    _assert_equal_params(whole, params)


@pytest.mark.parametrize("name, counts, known", [
    # Reference counts: diffusers' SD UNet (686 tensors), AutoencoderKL (248), CLIPTextModel ViT-L/14 (196);
    # OpenCLIP ViT-H/14 with the 23 blocks SD 2.x evaluates: 23 x 12 + 4.
    ("sd_v1", {"model": 686, "first_stage_model": 248, "cond_stage_model": 196}, {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # a level without attention
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}),
    ("sd_v2", {"model": 686, "first_stage_model": 248, "cond_stage_model": 280}, {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,)}),
])
def test_full_size_sd_layouts(name, counts, known):
    config = ldm_config(load_config_file(CONFIGS / f"{name}.py"))
    shapes = compvis.compvis_layout(config).torch_shapes()
    found = {}
    for key in shapes:
        found[key.split(".")[0]] = found.get(key.split(".")[0], 0) + 1
    assert found == counts
    assert {k: shapes[k] for k in known} == known


# ------------------------------------------------------------------------------------------ LDM-zoo layouts

ZOO = {
    # celebahq-ldm-vq-4-like: VQ first stage, no spatial transformer (AttentionBlock, 2 heads of 32), no cond.
    "celebahq": dict(
        first_stage=dict(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                         z_channels=3, embed_dim=3, double_z=False, n_embed=16),
        unet=dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=-1, num_head_channels=32, use_spatial_transformer=False,
                  context_dim=None),
        diffusion=dict(linear_start=0.0015, linear_end=0.0195, conditioning_key=None, channels=3, scale_factor=1.0)),
    # cin256-v2-like: class embedder as the cross-attention context.
    "cin256": dict(
        first_stage=dict(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                         z_channels=3, embed_dim=3, double_z=False, n_embed=16),
        unet=dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=1, context_dim=16),
        cond_stage=dict(kind="class", n_classes=11, embed_dim=16),
        diffusion=dict(channels=3, scale_factor=1.0)),
    # txt2img-1p4B-like: the BERT-style embedder (x-transformers names), scale_by_std buffer.
    "txt2img": dict(
        first_stage=dict(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32),
        unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
                  context_dim=32),
        cond_stage=dict(kind="bert", vocab_size=50, n_embed=32, n_layer=2, heads=2, dim_head=8),
        diffusion=dict(scale_by_std=True, scale_factor=0.25)),
}
ZOO_KEYS = {
    "celebahq": ["model.diffusion_model.input_blocks.3.1.qkv.weight", "first_stage_model.quantize.embedding.weight",
                 "first_stage_model.encoder.mid.attn_1.q.weight"],
    "cin256": ["cond_stage_model.embedding.weight", "first_stage_model.decoder.up.1.attn.0.proj_out.weight",
               "model.diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight"],
    "txt2img": ["cond_stage_model.transformer.attn_layers.layers.0.1.to_q.weight", "scale_factor",
                "cond_stage_model.transformer.attn_layers.layers.3.1.net.0.0.weight",
                "cond_stage_model.transformer.pos_emb.emb.weight", "cond_stage_model.transformer.norm.weight"],
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ldm_zoo_layouts_round_trip(name):
    config = ldm_config(ZOO[name])
    params = _random_params(config, seed=3)
    state = compvis.export_compvis(params, config)
    assert set(ZOO_KEYS[name]) <= set(state)
    if name == "txt2img":  # x-transformers' unused language-model head is dropped on import
        state["cond_stage_model.transformer.to_logits.weight"] = np.zeros((50, 32), np.float32)
    _assert_equal_params(compvis.convert_compvis_state_dict(state, config), params)


def test_legacy_qkv_attention_matches_openaimodel():
    """Our AttentionBlock with weights imported from a fused `qkv` equals openaimodel's AttentionBlock
    (QKVAttentionLegacy: per head [q, k, v] rows, both q and k scaled by head_dim ** -0.25), in numpy."""
    config = ldm_config({**ZOO["celebahq"], "unet": {**ZOO["celebahq"]["unet"], "channel_mult": (1, 4)}})
    params = _random_params(config, seed=4)  # 128 channels at the attention level: 4 heads of 32
    state = compvis.export_compvis(params, config)
    prefix = "model.diffusion_model.input_blocks.3.1."
    x = np.random.default_rng(5).standard_normal((2, 128, 16)).astype(np.float64)  # (B, C, T)
    g = x.reshape(2, 32, -1)
    g = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    h = g * state[prefix + "norm.weight"][:, None] + state[prefix + "norm.bias"][:, None]
    qkv = np.einsum("oc,bct->bot", state[prefix + "qkv.weight"][:, :, 0], h) + state[prefix + "qkv.bias"][:, None]
    q, k, v = np.split(qkv.reshape(2 * 4, 3 * 32, 16), 3, axis=1)
    scale = 32 ** -0.25
    w = np.einsum("bct,bcs->bts", q * scale, k * scale)
    w = np.exp(w - w.max(-1, keepdims=True))
    a = np.einsum("bts,bcs->bct", w / w.sum(-1, keepdims=True), v).reshape(2, 128, 16)
    out = np.einsum("oc,bct->bot", state[prefix + "proj_out.weight"][:, :, 0], a)
    ref = x + out + state[prefix + "proj_out.bias"][:, None]
    block = compvis.convert_compvis_state_dict(state, config)["unet"]["down_blocks_1"]["attentions_0"]
    x_nhwc = jnp.asarray(x.transpose(0, 2, 1).reshape(2, 4, 4, 128), jnp.float32)  # T = 16 = 4 x 4 positions
    ours = AttentionBlock(4).apply({"params": block}, x_nhwc)
    _assert_close(np.asarray(ours).reshape(2, 16, 128).transpose(0, 2, 1), ref)


def test_vq_first_stage_matches_diffusers_vqmodel():
    config = ldm_config(ZOO["celebahq"])
    params = _random_params(config, seed=6)
    checkpoint = {k: torch.from_numpy(v) for k, v in compvis.export_compvis(params, config).items()}
    fs = config.first_stage
    vq_config = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                     latent_channels=fs.z_channels, num_vq_embeddings=fs.n_embed, vq_embed_dim=fs.embed_dim,
                     norm_num_groups=32, sample_size=32)
    state = sfu.convert_ldm_vae_checkpoint(checkpoint, vq_config)
    state["quantize.embedding.weight"] = checkpoint["first_stage_model.quantize.embedding.weight"]  # not in its map
    reference = VQModel(**vq_config).eval()
    reference.load_state_dict(state, strict=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        ref_h = reference.encode(images).latents
        ref_decoded = reference.decode(ref_h).sample
    model = modules(config).first_stage
    variables = {"params": params["first_stage"]}
    h = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
    decoded = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))(variables, h)
    _assert_close(np.asarray(h).transpose(0, 3, 1, 2), ref_h.numpy())
    _assert_close(np.asarray(decoded).transpose(0, 3, 1, 2), ref_decoded.numpy())


@pytest.mark.parametrize("num_classes", [10, "sequential"])
def test_class_embedding_keys_follow_diffusers_mapping(num_classes):
    """label_emb (an Embedding, or the "sequential" MLP label_emb.0.0 / .0.2) as diffusers' converter maps it."""
    unet = dict(ZOO["celebahq"]["unet"], num_classes=num_classes, adm_in_channels=12)
    config = ldm_config({**ZOO["celebahq"], "unet": unet,
                         "diffusion": dict(ZOO["celebahq"]["diffusion"], conditioning_key="adm")})
    params = _random_params(config, seed=9)
    checkpoint = {k: torch.from_numpy(v) for k, v in compvis.export_compvis(params, config).items()}
    original = {"model": {"params": {
        "unet_config": {"params": {**unet, "channel_mult": list(unet["channel_mult"]), "transformer_depth": 1}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2]}}}}}}
    diffusers_config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=IMAGE)
    state = sfu.convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    names = {k for k in state if k.startswith("class_embedding.")}
    ours = params["unet"]["class_embedding"]
    if num_classes == "sequential":
        assert names == {f"class_embedding.linear_{i}.{leaf}" for i in (1, 2) for leaf in ("weight", "bias")}
        np.testing.assert_array_equal(state["class_embedding.linear_1.weight"].numpy(), ours["linear_1"]["kernel"].T)
    else:
        assert names == {"class_embedding.weight"}
        np.testing.assert_array_equal(state["class_embedding.weight"].numpy(), ours["embedding"])
    _assert_equal_params(compvis.convert_compvis_state_dict(checkpoint, config), params)


def test_load_compvis_model_with_tokenizer_and_trained_scale_factor(tmp_path):
    """A scale_by_std model's scale_factor buffer is what training settled on: load_compvis_model adopts it
    (the params-only converter refuses a mismatch, naming both values)."""
    config = ldm_config(ZOO["txt2img"])
    params = _random_params(config, seed=10)
    state = compvis.export_compvis(params, config)
    assert state["scale_factor"] == np.float32(0.25)
    state["scale_factor"] = np.asarray(0.3125, np.float32)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}}, path)
    with pytest.raises(ConversionError, match=r"scale_factor: checkpoint 0.3125 vs config 0.25"):
        compvis.load_compvis_checkpoint(path, config)
    loaded = compvis.load_compvis_model(path, config, tokenizer=write_bert_tokenizer(tmp_path / "tok"))
    assert loaded.config.diffusion.scale_factor == 0.3125 and loaded.model_id == str(path)
    assert loaded.tokenizer("a red circle")["input_ids"][0] == loaded.tokenizer.cls_token_id
    _assert_equal_params(loaded.params, params)


# ------------------------------------------------------------------------------ config inference (any size)

# A small KL first stage, attention at its second level, written as inference reads it (resolution 256).
SMALL_VAE = dict(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), resolution=256)
ANY_SIZE = {
    # SD 1.x-like: a 2-layer width-64 transformers CLIP, model_channels 32, SD's conventions (8 UNet heads).
    "hf": dict(
        first_stage=SMALL_VAE,
        unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1), num_heads=8,
                  context_dim=64),
        cond_stage=dict(kind="clip", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1,
                        hidden_act="quick_gelu", eos_token_id=99, pad_token_id=99),
        diffusion=dict(linear_start=0.00085, linear_end=0.012, scale_factor=0.18215, image_size=256)),
    # SD 2.x-like: OpenCLIP tower (3 blocks in the file, the penultimate layer), linear proj_in, 64-wide UNet
    # heads; a non-SD schedule, scale_by_std and a constant logvar, all read from the file's buffers.
    "openclip": dict(
        first_stage=SMALL_VAE,
        unet=dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1,), num_heads=-1,
                  num_head_channels=64, use_linear_in_transformer=True, transformer_depth=2, context_dim=64),
        cond_stage=dict(kind="clip", vocab_size=100, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=1,
                        hidden_act="gelu", eos_token_id=99, pad_token_id=0),
        diffusion=dict(num_timesteps=500, linear_start=0.0015, linear_end=0.0195, scale_by_std=True,
                       scale_factor=0.3125, image_size=256)),
}


def _any_size_file(kind, tmp_path):
    """(the explicit LDMConfig, its random params, a CompVis .safetensors written by our own save_compvis)."""
    config = ldm_config(ANY_SIZE[kind])
    params = _random_params(config, seed=11)
    path = tmp_path / f"{kind}.safetensors"
    if kind == "hf":
        compvis.save_compvis(path, params, config)
        return config, params, path
    # A CompVis SD 2.x file holds every block of the OpenCLIP tower: one more than the penultimate layer uses.
    full_tower = dataclasses.replace(config, cond_stage=dataclasses.replace(config.cond_stage, num_layers=3,
                                                                             output_layer="penultimate"))
    full_params = jax.tree.map(lambda a: a, params)
    full_params["cond_stage"]["encoder"]["layers_2"] = _random_params(full_tower, seed=12)["cond_stage"]["encoder"][
        "layers_2"]
    state = compvis.export_compvis(full_params, full_tower)
    state["logvar"] = np.zeros(500, np.float32)  # the reference's constant logvar buffer
    save_safetensors(path, state)
    return config, params, path


@pytest.mark.parametrize("kind", sorted(ANY_SIZE))
def test_any_size_file_loads_without_a_config(kind, tmp_path):
    """A non-preset-size CompVis file: the config read off its weights is the explicit one, and the model
    loaded with it equals, param for param, the model loaded with the explicit config."""
    config, params, path = _any_size_file(kind, tmp_path)
    state = load_state_dict(path)
    inferred = compvis.infer_config(state)
    assert inferred == config
    assert presets.matching_preset(inferred) is None
    loaded = compvis.loaded_model_from_state_dict(state, inferred, source=str(path))
    explicit = compvis.load_compvis_model(path, config)
    _assert_equal_params(loaded.params, explicit.params)
    _assert_equal_params(loaded.params, params)
    assert loaded.config == explicit.config


def test_half_precision_buffers_and_files_without_betas(tmp_path):
    """Half-precision files hold the schedule buffers rounded to float16: the schedule is still recognised (and
    checked at that precision); a file with alphas_cumprod but no betas gives the same schedule."""
    config, params, path = _any_size_file("hf", tmp_path)
    state = load_state_dict(path)
    half = {k: (v.astype(np.float16).astype(np.float32) if k in compvis.SCHEDULE_BUFFERS else v)
            for k, v in state.items()}
    assert not np.array_equal(half["betas"], state["betas"])
    assert compvis.infer_config(half) == config
    _assert_equal_params(compvis.convert_compvis_state_dict(half, config), params)
    no_betas = {k: v for k, v in state.items() if k != "betas"}
    assert compvis.infer_config(no_betas) == config


@pytest.mark.parametrize("name", ["sd_v1", "sd_v1_inpainting", "sd_v2", "sd_v2_768_v", "ldm_celebahq_vq4",
                                  "ldm_cin256", "ldm_txt2img_1p4b"])
def test_full_size_files_infer_their_preset(name):
    """Full-size layouts (shapes only: zero-stride arrays, nothing allocated) with the schedule buffers infer
    the preset; a 768-v file has the shapes of a 512 eps one and infers sd_v2 (v needs the explicit preset)."""
    config = ldm_config(presets.get_preset(name))
    layout_config = config
    if isinstance(config.cond_stage, ClipTextConfig) and config.cond_stage.hidden_act == "gelu":  # all 24 blocks
        layout_config = dataclasses.replace(config, cond_stage=dataclasses.replace(
            config.cond_stage, num_layers=24, output_layer="penultimate"))
    shapes = compvis.compvis_layout(layout_config).torch_shapes()
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    state["betas"] = np.asarray(make_schedule(config.diffusion.schedule).betas, np.float32)
    inferred = compvis.infer_config(state)
    expected = "sd_v2" if name == "sd_v2_768_v" else name
    assert presets.matching_preset(inferred) == expected
    assert inferred == ldm_config(presets.get_preset(expected))


def test_not_an_ldm_file_names_the_missing_key(exported):
    state = {k: v for k, v in load_file(exported["sd1"][3]).items() if not k.startswith(compvis.UNET_PREFIX)}
    with pytest.raises(ValueError, match=r"not a CompVis latent diffusion checkpoint: no "
                                         r"'model.diffusion_model.input_blocks.0.0.weight' \(a latent diffusion UNet"):
        compvis.infer_config(state)
    unet_only = {k: v for k, v in load_file(exported["sd1"][3]).items() if k.startswith(compvis.UNET_PREFIX)}
    with pytest.raises(ValueError, match=r"no 'first_stage_model.encoder.conv_in.weight'"):
        compvis.infer_config(unet_only)


def test_a_scale_factor_that_is_not_a_scalar_is_named(tmp_path):
    _, _, path = _any_size_file("hf", tmp_path)
    state = load_state_dict(path)
    state["scale_factor"] = np.ones(2, np.float32)
    with pytest.raises(ConversionError, match=r"^here: 'scale_factor' is shape \(2,\); expected a scalar buffer"):
        compvis.infer_config(state, source="here")


def test_a_config_that_does_not_fit_names_the_first_mismatch_on_the_first_line(tmp_path):
    config, _, path = _any_size_file("hf", tmp_path)
    wider = dataclasses.replace(config, unet=dataclasses.replace(config.unet, model_channels=64))
    with pytest.raises(ConversionError) as err:
        compvis.load_compvis_checkpoint(path, wider)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"checkpoint does not match the model ({path}): first mismatch model.diffusion_model.")
    assert ": checkpoint (" in first and ") vs model (" in first and "mis-shaped" in first


# ------------------------------------------------------------------------------- convert once (the store)


def test_convert_once_into_a_model_directory(exported, tmp_path):
    """A CompVis file converted once into a model directory loads back bit for bit, with its config."""
    _, config, params, path = exported["sd1"]
    model = store.load_model(path, config=config, tokenizer=write_clip_tokenizer(tmp_path / "tok"))
    out = store.save_model(model, tmp_path / "model")
    again = store.load_model(out)
    assert again.config == config
    _assert_equal_params(again.params, params)
    with pytest.raises(store.StoreError, match="not empty and is not a model directory"):
        store.save_model(model, tmp_path)  # holds other files: never written into


@pytest.mark.parametrize("name", sorted(ZOO) + ["sd2"])
def test_config_json_round_trip(name):
    config = _config(name)[1] if name in YAMLS else ldm_config(ZOO[name])
    data = json.loads(json.dumps(store.config_to_json(config)))
    assert ldm_config(data) == config


def test_store_refuses_params_of_another_shape(exported, tmp_path):
    _, config, params, _ = exported["sd1"]
    inpaint_params = exported["inpaint"][2]
    expected = r"unet/conv_in/kernel: checkpoint \(3, 3, 9, 32\) vs model \(3, 3, 4, 32\)"
    with pytest.raises(ConversionError, match=expected):
        store.save_model(LoadedModel(config=config, params=inpaint_params), tmp_path / "entry")
