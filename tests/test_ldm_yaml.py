"""CompVis config.yaml -> our config: the SD v1/v2 inference yamls and LDM-zoo yamls give the presets.

The yamls below are shaped like the real ones (CompVis/stable-diffusion configs/, Stability-AI/stablediffusion
configs/stable-diffusion/), training-only entries included, so that the reader's explicit ignore lists are
exercised; each must build the same LDMConfig as the matching preset (`ldm_jax.presets`). A yaml whose text
encoder is not known by name is read with a local transformers CLIP config (written here with transformers).
"""
import dataclasses
import json

import pytest
import yaml
from transformers import CLIPConfig, CLIPTextConfig

from ldm_jax import presets
from ldm_jax.convert.ldm_yaml import config_from_ldm_yaml, load_ldm_yaml, read_text_encoder_config
from ldm_jax.ldm import ldm_config

_KL_F8 = """
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: {resolution}
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""
_VQ_F4 = """
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ckpt_path: models/first_stage_models/vq-f4/model.ckpt
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""
_SD_HEAD = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.{target}
  params:
{extra}    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: {key}
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        f_start: [ 1.e-6 ]
"""
_SD_UNET = """
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
{heads}        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {context}
        use_checkpoint: True
        legacy: False
"""
V1_INFERENCE = (_SD_HEAD.format(target="LatentDiffusion", extra="", key="crossattn")
                + _SD_UNET.format(in_channels=4, heads="        num_heads: 8\n", context=768)
                + _KL_F8.format(resolution=512) + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
""")
V1_INPAINTING = (_SD_HEAD.format(target="LatentInpaintDiffusion", extra="", key="hybrid")
                 + _SD_UNET.format(in_channels=9, heads="        num_heads: 8\n", context=768)
                 + _KL_F8.format(resolution=256) + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
""")
V2_INFERENCE_V = (_SD_HEAD.format(target="LatentDiffusion", extra='    parameterization: "v"\n', key="crossattn")
                  + _SD_UNET.format(in_channels=4, context=1024, heads=(
                      "        use_fp16: True\n        num_head_channels: 64\n"
                      "        use_linear_in_transformer: True\n"))
                  + _KL_F8.format(resolution=256) + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
""")
V2_INPAINTING = (_SD_HEAD.format(target="LatentInpaintDiffusion", extra="", key="hybrid")
                 + _SD_UNET.format(in_channels=9, context=1024, heads=(
                     "        num_head_channels: 64\n        use_linear_in_transformer: True\n"))
                 + _KL_F8.format(resolution=256) + V2_INFERENCE_V[V2_INFERENCE_V.index("    cond_stage_config:"):])
V2_INFERENCE = V2_INFERENCE_V.replace('    parameterization: "v"\n', "")  # v2-inference.yaml (512, eps)
CIN256_V2 = """
model:
  base_learning_rate: 0.0001
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    cond_stage_key: class_label
    image_size: 64
    channels: 3
    cond_stage_trainable: true
    conditioning_key: crossattn
    monitor: val/loss
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 192
        attention_resolutions: [8, 4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 5]
        num_heads: 1
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 512
""" + _VQ_F4 + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.ClassEmbedder
      params:
        n_classes: 1001
        embed_dim: 512
        key: class_label
"""
CELEBAHQ_VQ4 = """
model:
  base_learning_rate: 2.0e-06
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    linear_end: 0.0195
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: image
    image_size: 64
    channels: 3
    monitor: val/loss_simple_ema
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 64
        in_channels: 3
        out_channels: 3
        model_channels: 224
        attention_resolutions:
        # the downsampling factor, not the resolution
        - 8
        - 4
        - 2
        num_res_blocks: 2
        channel_mult: [1, 2, 3, 4]
        num_head_channels: 32
""" + _VQ_F4 + """
    cond_stage_config: __is_unconditional__
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 48
lightning:
  trainer:
    benchmark: True
"""
TXT2IMG_1P4B = (_SD_HEAD.format(target="LatentDiffusion", extra="", key="crossattn").replace("image_size: 64",
                                                                                           "image_size: 32")
                + _SD_UNET.format(in_channels=4, heads="        num_heads: 8\n", context=1280)
                + _KL_F8.format(resolution=256) + """
    cond_stage_config:
      target: ldm.modules.encoders.modules.BERTEmbedder
      params:
        n_embed: 1280
        n_layer: 32
""")


def _ours(name):
    return ldm_config(presets.get_preset(name))


def _from_yaml(text):
    config = config_from_ldm_yaml(yaml.safe_load(text))
    assert config.is_locked
    return ldm_config(config)


def _replace(config, **parts):
    """config with fields of its parts replaced: _replace(c, first_stage={"resolution": 256})."""
    return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in parts.items()})


@pytest.mark.parametrize("text, name, differences", [
    # v1-inference.yaml describes the VAE at resolution 512 (only attn_resolutions depend on it: none).
    (V1_INFERENCE, "sd_v1", dict(first_stage={"resolution": 256})),
    (V1_INPAINTING, "sd_v1_inpainting", {}),
    # The 768-v yaml keeps image_size 64 (sampling passes --H 768 --W 768); the preset says 96.
    (V2_INFERENCE_V, "sd_v2_768_v", dict(diffusion={"image_size": 96})),
    (V2_INFERENCE, "sd_v2", {}),
    (CIN256_V2, "ldm_cin256", {}),
    (CELEBAHQ_VQ4, "ldm_celebahq_vq4", {}),
    (TXT2IMG_1P4B, "ldm_txt2img_1p4b", {}),
], ids=["v1-inference", "v1-inpainting", "v2-inference-v", "v2-inference", "cin256-v2", "celebahq-vq4",
        "txt2img-1p4B"])
def test_yaml_gives_our_config(text, name, differences):
    assert _replace(_from_yaml(text), **differences) == _ours(name)


def test_yaml_defaults_follow_the_reference():
    config = _from_yaml(CELEBAHQ_VQ4)
    assert config.diffusion.conditioning_key is None  # cond_stage_config: __is_unconditional__
    assert config.diffusion.scale_factor == 1.0  # LatentDiffusion's default, not SD's 0.18215
    assert config.cond_stage is None
    assert set(config_from_ldm_yaml(yaml.safe_load(CELEBAHQ_VQ4))) == {"first_stage", "unet", "diffusion"}
    v2 = _from_yaml(V2_INFERENCE_V)
    assert v2.diffusion.prediction_type == "v"
    assert (v2.cond_stage.num_layers, v2.cond_stage.output_layer, v2.cond_stage.pad_token_id) == (23, "last", 0)
    last = _from_yaml(V2_INFERENCE_V.replace('layer: "penultimate"', 'layer: "last"'))
    assert last.cond_stage.num_layers == 24
    inpaint = _from_yaml(V2_INPAINTING)  # v2-inpainting-inference.yaml: SD 2 base + 9 channels, eps
    assert inpaint == _replace(_ours("sd_v2"), unet={"in_channels": 9}, diffusion={
        "conditioning_key": "hybrid", "prediction_type": "eps", "image_size": 64})
    # No conditioning_key: the reference picks "concat" when concat_mode (default True), else "crossattn".
    no_key = V1_INFERENCE.replace("conditioning_key: crossattn\n", "concat_mode: false\n")
    assert _from_yaml(no_key).diffusion.conditioning_key == "crossattn"


def test_load_ldm_yaml_file(tmp_path):
    path = tmp_path / "v1-inference.yaml"
    path.write_text(V1_INFERENCE)
    assert ldm_config(load_ldm_yaml(path)) == _from_yaml(V1_INFERENCE)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(yaml.YAMLError):
        load_ldm_yaml(unsafe)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("edit, message", [
    (("target: ldm.modules.encoders.modules.FrozenCLIPEmbedder", "target: my.module.CustomEmbedder"),
     "cond_stage_config.target='my.module.CustomEmbedder' is not a class"),
    (("target: ldm.models.diffusion.ddpm.LatentDiffusion", "target: ldm.models.diffusion.ddpm.DDPM"),
     "model.target='ldm.models.diffusion.ddpm.DDPM'"),
    (("    use_ema: False\n", "    use_ema: False\n    personalization_config:\n      target: "
                               "ldm.modules.embedding_manager.EmbeddingManager\n"),
     "personalization_config (target ldm.modules.embedding_manager.EmbeddingManager)"),
    (("        legacy: False\n", "        legacy: False\n        dims: 3\n"),
     "unet_config.params.dims=3 is not supported"),
    (("        legacy: False\n", "        legacy: False\n        spatial_magic: 1\n"),
     "unet_config.params: unknown entry ['spatial_magic']"),
    (("          dropout: 0.0\n", "          dropout: 0.0\n          attn_type: linear\n"),
     "ddconfig.attn_type='linear' is not supported"),
    (("        model_channels: 320\n", ""), "unet_config.params.model_channels is missing"),
    (("target: ldm.modules.encoders.modules.FrozenCLIPEmbedder",
      "target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n      params:\n        version: openai/clip-vit-base"),
     "version='openai/clip-vit-base' is not a text encoder this reader knows (known: 'openai/clip-vit-large-patch14'"
     "); pass its transformers CLIP config.json, or a directory holding one"),
    (("    timesteps: 1000\n", "    timesteps: 1000\n    original_elbo_weight: 0.5\n"),
     "original_elbo_weight=0.5 is not supported"),
], ids=["cond-target", "model-target", "personalization", "dims", "unknown-param", "attn-type", "missing",
        "clip-version", "elbo"])
def test_bad_yaml_is_refused(edit, message):
    old, new = edit
    assert old in V1_INFERENCE
    with pytest.raises(ValueError) as err:
        config_from_ldm_yaml(yaml.safe_load(V1_INFERENCE.replace(old, new, 1)))
    assert message in str(err.value)


# ------------------------------------------------------------------------------ text encoders by local config

SMALL_CLIP = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=998, pad_token_id=0)
# SD v1's yaml with a small CLIP of another version (and a UNet context width that fits it).
V1_BASE_CLIP = V1_INFERENCE.replace("context_dim: 768", "context_dim: 64").replace(
    "target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n",
    "target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n      params:\n        version: my-org/clip-small\n")
V2_OTHER_ARCH = V2_INFERENCE.replace('        layer: "penultimate"\n',
                                     '        layer: "penultimate"\n        arch: ViT-bigG-14\n')


def _write_clip_config(directory, **fields):
    """A transformers CLIPTextConfig saved as config.json in `directory` (transformers writes it)."""
    CLIPTextConfig(**{**SMALL_CLIP, **fields}).save_pretrained(directory)
    return directory


def test_any_clip_version_with_a_local_text_encoder_config(tmp_path):
    yaml_path = tmp_path / "v1-small.yaml"
    yaml_path.write_text(V1_BASE_CLIP)
    with pytest.raises(ValueError) as err:
        load_ldm_yaml(yaml_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{yaml_path}: ") and "version='my-org/clip-small'" in message
    assert "text_encoder_config" in message
    # A CLIPTextConfig directory, its config.json file, and a CLIPConfig (text_config) all describe the tower.
    directory = _write_clip_config(tmp_path / "clip-small", eos_token_id=999)
    config = ldm_config(load_ldm_yaml(yaml_path, text_encoder_config=directory))
    cond = config.cond_stage
    assert (cond.vocab_size, cond.hidden_size, cond.intermediate_size, cond.num_layers, cond.num_heads) == (
        1000, 64, 128, 3, 4)
    assert (cond.hidden_act, cond.output_layer, cond.pad_token_id, cond.eos_token_id, cond.max_length) == (
        "quick_gelu", "last", 999, 999, 77)  # FrozenCLIPEmbedder pads with the end-of-text token
    assert ldm_config(load_ldm_yaml(yaml_path, text_encoder_config=directory / "config.json")) == config
    both = tmp_path / "clip-model"
    CLIPConfig(text_config={**SMALL_CLIP, "eos_token_id": 999}).save_pretrained(both)
    assert ldm_config(load_ldm_yaml(yaml_path, text_encoder_config=both)) == config
    # The rest of the model is the yaml's.
    assert config.unet == dataclasses.replace(_ours("sd_v1").unet, context_dim=64)
    assert config.diffusion == _ours("sd_v1").diffusion


def test_local_config_gives_legacy_eos_pooling_and_the_known_version_unchanged(tmp_path):
    legacy = _write_clip_config(tmp_path / "legacy", eos_token_id=2)  # transformers' pre-2023 CLIP configs
    cond = config_from_ldm_yaml(yaml.safe_load(V1_BASE_CLIP), read_text_encoder_config(legacy)).cond_stage
    assert (cond.eos_token_id, cond.pooling, cond.pad_token_id) == (2, "argmax", 999)  # pad: the last id, EOT
    assert _from_yaml(V1_INFERENCE).cond_stage == _ours("sd_v1").cond_stage  # no local config needed


def test_any_openclip_arch_with_a_local_text_encoder_config(tmp_path):
    with pytest.raises(ValueError, match=r"arch='ViT-bigG-14' is not a text encoder this reader knows \(known: "
                                         r"'ViT-H-14'\)"):
        config_from_ldm_yaml(yaml.safe_load(V2_OTHER_ARCH))
    # A diffusers pipeline folder: text_encoder/config.json. The json counts every block of the open_clip tower;
    # layer "penultimate" evaluates one fewer.
    _write_clip_config(tmp_path / "pipeline" / "text_encoder", hidden_act="gelu", hidden_size=1024,
                       intermediate_size=4096, num_attention_heads=16, num_hidden_layers=32, vocab_size=49408)
    text = read_text_encoder_config(tmp_path / "pipeline")
    section = config_from_ldm_yaml(yaml.safe_load(V2_OTHER_ARCH), text).cond_stage
    assert (section.num_layers, section.output_layer, section.hidden_act, section.pad_token_id) == (
        31, "last", "gelu", 0)
    assert ldm_config(config_from_ldm_yaml(yaml.safe_load(V2_OTHER_ARCH), text)).unet == _ours("sd_v2").unet


@pytest.mark.parametrize("case, message", [
    ("missing", "text_encoder_config {tmp}/nothing: no such file or directory"),
    ("empty-dir", "the directory holds none of ['config.json', 'text_encoder/config.json']"),
    ("not-clip", "neither a CLIPTextConfig (no hidden_size) nor a CLIPConfig (no text_config)"),
    ("positions", "max_length=64 but text_encoder_config"),
    ("bert", "but the yaml's text encoder is BERTEmbedder, not a CLIP text tower"),
    ("unconditional", "given, but the model is unconditional"),
])
def test_bad_text_encoder_configs_are_named(tmp_path, case, message):
    good = _write_clip_config(tmp_path / "clip-small")
    text, path = V1_BASE_CLIP, good
    if case == "missing":
        path = tmp_path / "nothing"
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        path = tmp_path / "empty"
    elif case == "not-clip":
        path = tmp_path / "other.json"
        path.write_text(json.dumps({"model_type": "t5", "d_model": 64}))
    elif case == "positions":
        text = V1_BASE_CLIP.replace("version: my-org/clip-small\n",
                                    "version: my-org/clip-small\n        max_length: 64\n")
    elif case == "bert":
        text = TXT2IMG_1P4B
    else:
        text = CELEBAHQ_VQ4
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_ldm_yaml(yaml_path, text_encoder_config=path)
    assert message.format(tmp=tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{yaml_path}: ")
