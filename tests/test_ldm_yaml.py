"""CompVis config.yaml -> our config: the SD v1/v2 inference yamls and LDM-zoo yamls give the configs/ files.

The yamls below are shaped like the real ones (CompVis/stable-diffusion configs/, Stability-AI/stablediffusion
configs/stable-diffusion/), training-only entries included, so that the reader's explicit ignore lists are
exercised; each must build the same LDMConfig as the matching python config file.
"""
import dataclasses
import pathlib

import pytest
import yaml

from ldm_jax.config import load_config_file
from ldm_jax.convert.ldm_yaml import config_from_ldm_yaml, load_ldm_yaml
from ldm_jax.ldm import ldm_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

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
    return ldm_config(load_config_file(CONFIGS / f"{name}.py"))


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
    # The 768-v yaml keeps image_size 64 (sampling passes --H 768 --W 768); configs/sd_v2.py says 96.
    (V2_INFERENCE_V, "sd_v2", dict(diffusion={"image_size": 96})),
    (CIN256_V2, "ldm_cin256", {}),
    (CELEBAHQ_VQ4, "ldm_celebahq_vq4", {}),
    (TXT2IMG_1P4B, "ldm_txt2img_1p4b", {}),
], ids=["v1-inference", "v1-inpainting", "v2-inference-v", "cin256-v2", "celebahq-vq4", "txt2img-1p4B"])
def test_yaml_gives_our_config(text, name, differences):
    assert _replace(_from_yaml(text), **differences) == _ours(name)


def test_yaml_defaults_follow_the_reference():
    config = _from_yaml(CELEBAHQ_VQ4)
    assert config.diffusion.conditioning_key is None  # cond_stage_config: __is_unconditional__
    assert config.diffusion.scale_factor == 1.0  # LatentDiffusion's default, not SD's 0.18215
    assert config.cond_stage is None and config.unet.remat is False
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
     "version='openai/clip-vit-base'"),
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
