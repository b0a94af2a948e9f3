"""SGM single files (SDXL: Stability's generative-models layout, sd_xl_base_1.0 / sd_xl_refiner_1.0): export, import,
config inference, against diffusers 0.42's own single-file loader.

diffusers ships only the SGM -> diffusers direction, so the file is ours: tiny random StableDiffusionXLPipeline (base:
CLIP ViT-L-like + OpenCLIP bigG-like towers, text_time UNet) and StableDiffusionXLImg2ImgPipeline (refiner: the bigG
tower alone) are saved by diffusers, loaded through the store, written as SGM files by `compvis.save_compvis`; then
- diffusers' `from_single_file(file, config=<the diffusers folder>, local_files_only=True)` reads that file and gives
  every weight of the original pipeline back bit for bit (UNet, VAE, both text encoders; same key sets);
- `compvis.infer_config` reads the file's config off its shapes; importing the file gives our params back exactly;
- strictness, the known extras, denoiser.sigmas, and the one-line refusals of the wrong family / towers.
Full size (no weights: zero-stride arrays / torch meta tensors of the preset's key -> shape table): infer_config gives
the presets sdxl_base / sdxl_refiner / sdxl_inpainting, diffusers' model-type detection agrees, and diffusers' own
SGM converters turn our table into exactly the keys and shapes of diffusers' / transformers' full-size models.
SGM yamls (sd_xl_base.yaml, sd_xl_refiner.yaml) read by `ldm_yaml` give the presets.

Tiny text widths are multiples of 64 (inference takes CLIP heads as width / 64) and differ between the towers
(diffusers tells SDXL's towers apart by width). Run: .venv/bin/python -m pytest -q tests/test_sgm_single_file.py
"""
import dataclasses
import logging

import numpy as np
import pytest
import yaml
from flax import traverse_util

from ldm_jax import ldm, presets, store
from ldm_jax.convert import compvis
from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.ldm_yaml import config_from_ldm_yaml
from ldm_jax.diffusion.schedule import ScheduleConfig
from ldm_jax.ldm import ldm_config, param_shapes
import sdxl_fixtures as parts

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

TIME_DIM = 8  # addition_time_embed_dim of the tiny UNets (SDXL: 256)
POOLED = 32  # projection_dim of the tiny bigG tower (SDXL: 1280)
PIPELINES = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline"}


# ------------------------------------------------------------------------------------------- tiny models


def _unet(refiner: bool):
    """SDXL-shaped: no attention at the first level, 64-channel heads, linear proj_in, text_time; the base with
    per-level depths (1, 2 at levels 1, 2), the refiner 4 levels with depth 2 everywhere."""
    if refiner:
        kw = dict(block_out_channels=(32, 64, 128, 128), attention_head_dim=(1, 1, 2, 2),
                  transformer_layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=128, projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)
    else:
        kw = dict(block_out_channels=(32, 64, 128), attention_head_dim=(1, 1, 2),
                  transformer_layers_per_block=(1, 1, 2),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=64 + 128, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          use_linear_projection=True, addition_embed_type="text_time",
                                          addition_time_embed_dim=TIME_DIM, **kw)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """{"base" / "refiner": (diffusers pipeline, its folder, our LoadedModel of it, our SGM file of it)}."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sgm")
    tok, tok_2 = parts.tokenizers(root / "tok")
    # 64-wide heads: what inferring the towers' head counts from the weights needs
    clip_l, big_g = parts.text_encoders(tok, widths=(64, 128), heads=(1, 2), projection_dim=POOLED)
    unet, refiner_unet, vae = _unet(False), _unet(True), parts.vae()
    parts.randomise(clip_l, big_g, unet, refiner_unet, vae)
    scheduler = parts.scheduler()
    pipes = {
        "base": diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tok,
                                                    tokenizer_2=tok_2, unet=unet, scheduler=scheduler),
        "refiner": diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=tok_2, unet=refiner_unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False),
    }
    out = {}
    for name, pipe in pipes.items():
        folder = root / name
        pipe.save_pretrained(folder, safe_serialization=True)
        model = store.load_model(folder)
        path = root / f"{name}.safetensors"
        compvis.save_compvis(path, model.params, model.config)
        out[name] = (pipe, folder, model, path)
    return out


def _assert_equal_params(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert np.array_equal(np.asarray(fa[key]), np.asarray(fb[key])), key


# ------------------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("config_folder", ["diffusers", "ours"])
@pytest.mark.parametrize("name", ["base", "refiner"])
def test_diffusers_single_file_loader_reads_our_sgm_export(sdxl, name, config_folder, tmp_path):
    """config=: the folder diffusers saved, or the one our store writes (format="diffusers"): both hold every
    config diffusers needs offline (model_index, unet, vae, text_encoder(_2), tokenizer(_2), scheduler)."""
    pipe, folder, model, path = sdxl[name]
    if config_folder == "ours":
        folder = store.save_model(model, tmp_path / "folder", format="diffusers")
    cls = getattr(diffusers, PIPELINES[name])
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    components = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if name == "base" else [])
    for component in components:
        ours, theirs = getattr(loaded, component).state_dict(), getattr(pipe, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), f"{component}.{key}"
    # diffusers recognises the layout by these keys (CHECKPOINT_KEY_NAMES: clip_sdxl, open_clip_sdxl(_refiner))
    keys = load_state_dict(path).keys()
    expected = (["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                 "conditioner.embedders.1.model.positional_embedding"] if name == "base"
                else ["conditioner.embedders.0.model.text_projection"])
    assert set(expected) <= set(keys)


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_infer_config_reads_the_tiny_sdxl(sdxl, name):
    """The config read off the file is the diffusers folder's, but for what the weights cannot tell, which follows
    SDXL's conventions: 1024 px images, VAE resolution 256, towers padded and pooled as SGM's (the diffusers tower
    configs carry eos 2 / first-eos pooling; with CLIP's vocabulary, end-of-text last, both pick the same token)."""
    _, _, model, path = sdxl[name]
    inferred = compvis.infer_config(load_state_dict(path))
    c = model.config
    towers = {"cond_stage": c.cond_stage, "cond_stage_2": c.cond_stage_2}
    vocab = c.cond_stage.vocab_size
    towers = {k: None if t is None else dataclasses.replace(t, eos_token_id=vocab - 1, pooling="argmax")
              for k, t in towers.items()}
    expected = dataclasses.replace(
        c, first_stage=dataclasses.replace(c.first_stage, resolution=256),
        diffusion=dataclasses.replace(c.diffusion, image_size=1024 // c.downsample_factor), **towers)
    assert inferred == expected
    # ... and the towers read the same prompts the same way (context, pooled embedding): end-of-text is the last id
    eos = vocab - 1
    ids = np.full((2, 77), eos, np.int32)
    ids[:, :4] = [[eos - 1, 5, 9, eos], [eos - 1, 300, 301, 302]]
    ids[1, 4] = eos
    inputs = {"tokens": ids, "time_ids": np.ones((2, c.num_time_ids), np.float32)}
    if c.cond_stage_2 is not None:
        first_eos = np.argmax(ids == eos, axis=1)
        inputs["tokens_2"] = np.where(np.arange(77) > first_eos[:, None], 0, ids)  # OpenCLIP pads with 0
    ours, theirs = (ldm.encode_conditioning(cfg, model.params, inputs) for cfg in (inferred, c))
    assert ours.keys() == theirs.keys() == {"context", "y", "time_ids"}
    for key in ours:
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)
    assert inferred.unet.transformer_depth == ((0, 1, 2) if name == "base" else 2)
    assert inferred.unet.addition_time_embed_dim == TIME_DIM and inferred.num_time_ids == (6 if name == "base" else 5)
    assert inferred.diffusion.force_zeros_for_empty_prompt == (name == "base")
    assert inferred.diffusion.scale_factor == 0.13025
    assert presets.matching_preset(inferred) is None


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_sgm_file_imports_exactly(sdxl, name, caplog):
    """Importing with the inferred config or the diffusers folder's gives our params back bit for bit; the known
    extras of real SGM files (position_ids, logit_scale, denoiser.sigmas) are dropped with a logged count."""
    _, _, model, path = sdxl[name]
    state = load_state_dict(path)
    assert compvis.SGM_SIGMAS in state  # written by the export
    inferred = compvis.infer_config(state)
    _assert_equal_params(compvis.loaded_model_from_state_dict(state, inferred).params, model.params)
    _assert_equal_params(compvis.convert_compvis_state_dict(state, model.config), model.params)
    bigg = "conditioner.embedders.1.model." if name == "base" else "conditioner.embedders.0.model."
    extras = {f"{bigg}logit_scale": np.float32(4.6)}
    if name == "base":
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    with caplog.at_level(logging.INFO, logger="ldm_jax.convert.compvis"):
        params = compvis.convert_compvis_state_dict({**state, **extras}, inferred, source="file.safetensors")
    _assert_equal_params(params, model.params)
    log = caplog.text
    assert "file.safetensors: dropped 1 key(s) (OpenCLIP logit scale" in log
    assert "dropped 1 key(s) (SGM DiscreteDenoiser sigmas, equal to the config's schedule)" in log
    assert (name != "base") or "dropped 1 key(s) (transformers CLIP buffer (position indices)" in log


def test_import_is_strict(sdxl):
    _, _, model, path = sdxl["base"]
    state = load_state_dict(path)
    config = model.config
    gone = "model.diffusion_model.label_emb.0.2.bias"
    with pytest.raises(ConversionError, match=r"missing.*model\.diffusion_model\.label_emb\.0\.2\.bias"):
        compvis.convert_compvis_state_dict({k: v for k, v in state.items() if k != gone}, config)
    extra = "conditioner.embedders.1.model.transformer.resblocks.3.ln_1.weight"  # a 4th block of a 3-block tower
    with pytest.raises(ConversionError, match=r"unexpected.*conditioner\.embedders\.1\.model\.transformer\."
                                              r"resblocks\.3\.ln_1\.weight"):
        compvis.convert_compvis_state_dict({**state, extra: np.ones(128, np.float32)}, config)
    projection = "conditioner.embedders.1.model.text_projection"  # (width 128, projection 32), never transposed
    with pytest.raises(ConversionError, match=r"conditioner\.embedders\.1\.model\.text_projection: checkpoint "
                                              r"\(32, 128\) vs model \(128, 32\)"):
        compvis.convert_compvis_state_dict({**state, projection: state[projection].T}, config)


def test_denoiser_sigmas_are_checked_and_read(sdxl):
    _, _, model, path = sdxl["base"]
    state = load_state_dict(path)
    other = ScheduleConfig(beta_schedule="linear", num_timesteps=1000, linear_start=1e-4, linear_end=2e-2)
    wrong = {**state, compvis.SGM_SIGMAS: compvis.sgm_sigmas(other)}
    with pytest.raises(ConversionError, match=r"diffusion buffers differ from the config .*denoiser\.sigmas: max "
                                              r"relative difference"):
        compvis.convert_compvis_state_dict(wrong, model.config)
    assert compvis.infer_config(wrong).diffusion.schedule == other  # read off the buffer when a file has it
    half = {**state, compvis.SGM_SIGMAS: state[compvis.SGM_SIGMAS].astype(np.float16).astype(np.float32)}
    assert compvis.infer_config(half).diffusion.schedule == model.config.diffusion.schedule
    compvis.convert_compvis_state_dict(half, model.config)  # checked at float16's precision
    no_sigmas = {k: v for k, v in state.items() if k != compvis.SGM_SIGMAS}  # sd_xl_base_1.0 has none
    assert compvis.infer_config(no_sigmas) == compvis.infer_config(state)
    with pytest.raises(ValueError, match=r"an EDM-trained SDXL-shaped file \(Playground v2\.5"):
        compvis.infer_config({**state, "edm_mean": np.zeros((1, 4, 1, 1), np.float32)})


def test_wrong_family_or_towers_is_one_line(sdxl, tmp_path):
    """An SGM file given an SD config (or the reverse), or a refiner given where a base is expected (or the
    reverse): one line naming the file and what is missing."""
    base_path, refiner_path = sdxl["base"][3], sdxl["refiner"][3]
    base, refiner = sdxl["base"][2].config, sdxl["refiner"][2].config
    sd = ldm_config(presets.get_preset("tiny"))
    cases = [
        (base_path, sd, r"an SGM \(SDXL\) file \(text towers under conditioner\.embedders\.\*, e\.g\. "
                        r"'conditioner\.embedders\.0\.transformer\.text_model\.[^']*'\), but the config is a CompVis"),
        (refiner_path, base, r"it has no conditioner\.embedders\.0\.transformer\.text_model\.\* \(cond_stage\), "
                             r"conditioner\.embedders\.1\.model\.\* \(cond_stage_2\) keys; it has "
                             r"conditioner\.embedders\.0\.model\.\* keys, which the config has no tower for"),
        (base_path, refiner, r"it has no conditioner\.embedders\.0\.model\.\* \(cond_stage\) keys; it has "
                             r"conditioner\.embedders\.0\.transformer\.text_model\.\*, conditioner\.embedders\.1\."
                             r"model\.\* keys"),
    ]
    sd_file = tmp_path / "sd.safetensors"
    compvis.save_compvis(sd_file, _zeros(sd), sd)
    cases.append((sd_file, base, r"a CompVis \(SD 1\.x / 2\.x\) file \(text encoder under cond_stage_model\.\*, e\.g\. "
                                 r"'cond_stage_model\.transformer\.text_model\.[^']*'\), but the config is an SDXL"))
    for path, config, message in cases:
        with pytest.raises(ConversionError, match=message) as err:
            compvis.load_compvis_checkpoint(path, config)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConversionError, match=r"an SGM \(SDXL\) file"):  # the same through the store
        store.load_model(base_path, config="tiny", tokenizer=sdxl["base"][1] / "tokenizer")


def _zeros(config):
    return traverse_util.unflatten_dict({p: np.zeros(s, np.float32) for p, s in param_shapes(config).items()})


def test_store_loads_and_saves_sgm_files(sdxl, tmp_path):
    """The store infers the config of an SGM file and loads it with --tokenizer a folder holding tokenizer/ and
    tokenizer_2/ (the base takes both, the refiner tokenizer_2/); format="compvis" writes the SGM layout."""
    for name in ("base", "refiner"):
        _, folder, model, path = sdxl[name]
        loaded = store.load_model(path, tokenizer=folder)
        assert loaded.config == compvis.infer_config(load_state_dict(path))
        assert (loaded.tokenizer_2 is not None) == (name == "base") and loaded.tokenizer is not None
        _assert_equal_params(loaded.params, model.params)
        out = store.save_model(model, tmp_path / f"{name}.safetensors", format="compvis")
        assert load_state_dict(out).keys() == load_state_dict(path).keys()
    _, folder, model, path = sdxl["base"]
    both = compvis.load_compvis_model(path, model.config, tokenizer=folder / "tokenizer",
                                      tokenizer_2=folder / "tokenizer_2")
    assert both.tokenizer is not None and both.tokenizer_2 is not None
    with pytest.raises(ValueError, match=r"an SDXL base has two text towers: give both tokenizer .* got only "
                                         r"tokenizer$"):
        compvis.load_compvis_model(path, model.config, tokenizer=folder / "tokenizer")


def test_layout_options(sdxl):
    config = sdxl["base"][2].config
    assert [(t.name, t.layout, t.prefix) for t in compvis.sgm_towers(config)] == [
        ("cond_stage", "hf", "conditioner.embedders.0.transformer.text_model."),
        ("cond_stage_2", "openclip", "conditioner.embedders.1.model.")]
    with pytest.raises(ValueError, match=r"clip_layout='hf': an SDXL \(SGM\) layout stores each text tower in its "
                                         r"fixed layout \(cond_stage: hf, cond_stage_2: openclip\)"):
        compvis.compvis_layout(config, clip_layout="hf")


# ------------------------------------------------------------------------------------------- full size


FULL = {"sdxl_base": ("xl_base", 2513), "sdxl_refiner": ("xl_refiner", 1857), "sdxl_inpainting": ("xl_inpaint", 2513)}


def _full_size_state(name):
    config = ldm_config(presets.get_preset(name))
    shapes = compvis.compvis_layout(config).torch_shapes()
    return config, shapes, {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_sgm_layout_infers_the_preset(name):
    """The preset's SGM key -> shape table (shapes only: zero-stride arrays, nothing allocated), with the extras of
    the released files (CLIP position_ids, OpenCLIP logit_scale), infers the preset; diffusers' model-type
    detection (infer_diffusers_model_type) reads it as the same SDXL model."""
    config, shapes, state = _full_size_state(name)
    model_type, count = FULL[name]
    assert len(shapes) == count
    bigg = "conditioner.embedders.0.model." if name == "sdxl_refiner" else "conditioner.embedders.1.model."
    state[f"{bigg}logit_scale"] = np.float32(4.6)
    if name != "sdxl_refiner":
        state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    inferred = compvis.infer_config(state)
    assert inferred == config
    assert presets.matching_preset(inferred) == name
    assert sfu.infer_diffusers_model_type(state) == model_type
    assert shapes[f"{bigg}text_projection"] == (1280, 1280)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (4 * config.unet.model_channels,
                                                                   config.unet.adm_in_channels)
    assert config.unet.adm_in_channels == (2560 if name == "sdxl_refiner" else 2816)


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_full_size_keys_are_what_diffusers_converts(name):
    """diffusers' SGM converters (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint) applied to our full-size table (torch meta tensors) give exactly the key -> shape
    set of diffusers' / transformers' full-size models (built on the meta device)."""
    from ldm_jax.convert.diffusers_autoencoder import to_diffusers_config
    from ldm_jax.convert.diffusers_pipeline import clip_to_transformers_config
    from ldm_jax.convert.diffusers_unet import unet_config_to_diffusers

    config, shapes, _ = _full_size_state(name)
    checkpoint = {k: torch.empty(s, device="meta") for k, s in shapes.items()}

    def same(converted, module, what):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        assert got == want, what

    with torch.device("meta"):
        unet_cfg = unet_config_to_diffusers(config.unet, 128)
        same(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg), diffusers.UNet2DConditionModel(**unet_cfg), "unet")
        vae_cfg = {k: list(v) if isinstance(v, tuple) else v
                   for k, v in to_diffusers_config(config.first_stage).items()}
        same(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg), diffusers.AutoencoderKL(**vae_cfg), "vae")
        for tower in compvis.sgm_towers(config):
            hf = clip_to_transformers_config(getattr(config, tower.name), sdxl=True)
            cls = getattr(transformers, hf["architectures"][0])
            model = cls(transformers.CLIPTextConfig(**hf))
            converted = (sfu.convert_ldm_clip_checkpoint(checkpoint) if tower.layout == "hf"
                         else sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=tower.prefix))
            if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (as diffusers does)
                converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
            same(converted, model, tower.name)


# ------------------------------------------------------------------------------------------- SGM yamls

_SGM_YAML = """
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config: {{target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling}}
        discretization_config: {{target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization}}
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm}
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: {channels}
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: {mult}
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: {depth}
        context_dim: {context}
        spatial_transformer_attn_type: softmax-xformers
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
{embedders}
    first_stage_config:
      target: sgm.models.autoencoder.{autoencoder}
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig: {{attn_type: vanilla-xformers, double_z: true, z_channels: 4, resolution: 256, in_channels: 3,
                   out_ch: 3, ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}}
        lossconfig: {{target: torch.nn.Identity}}
"""
_ENC = "sgm.modules.encoders.modules."
_CLIP_L = (f"          - {{is_trainable: False, input_key: txt, target: {_ENC}FrozenCLIPEmbedder,"
           f" params: {{layer: hidden, layer_idx: 11}}}}")
_BIGG = (f"          - {{is_trainable: False, input_key: txt, target: {_ENC}FrozenOpenCLIPEmbedder2, params: {{arch: "
         f"ViT-bigG-14, version: laion2b_s39b_b160k, freeze: True, layer: penultimate, always_return_pooled: True, "
         f"legacy: False}}}}")


def _time(key):
    return (f"          - {{is_trainable: False, input_key: {key}, target: {_ENC}ConcatTimestepEmbedderND, "
            f"params: {{outdim: 256}}}}")


SGM_YAMLS = {
    "sdxl_base": _SGM_YAML.format(
        adm=2816, channels=320, mult="[1, 2, 4]", depth="[1, 2, 10]", context=2048,
        autoencoder="AutoencoderKLInferenceWrapper",
        embedders="\n".join([_CLIP_L, _BIGG] + [_time(k) for k in ("original_size_as_tuple", "crop_coords_top_left",
                                                                     "target_size_as_tuple")])),
    "sdxl_refiner": _SGM_YAML.format(
        adm=2560, channels=384, mult="[1, 2, 4, 4]", depth=4, context="[1280, 1280, 1280, 1280]",
        autoencoder="AutoencoderKL",
        embedders="\n".join([_BIGG] + [_time(k) for k in ("original_size_as_tuple", "crop_coords_top_left",
                                                          "aesthetic_score")])),
}


@pytest.mark.parametrize("name", sorted(SGM_YAMLS))
def test_sgm_yaml_is_the_preset(name):
    config = config_from_ldm_yaml(yaml.safe_load(SGM_YAMLS[name]))
    assert config.to_dict() == presets.get_preset(name).to_dict()
    assert presets.matching_preset(ldm_config(config)) == name


@pytest.mark.parametrize("old, new, message", [
    ("layer_idx: 11", "layer_idx: 5", r"layer='hidden', layer_idx=5 is not supported"),
    ("legacy: False", "legacy: False, layer: last", r"layer='last' with legacy=False is not supported"),
    ("always_return_pooled: True", "always_return_pooled: False", r"the text embedders' always_return_pooled are "
                                                                  r"\[False, False\]"),
    ("input_key: crop_coords_top_left", "input_key: target_size_as_tuple",
     r"micro-conditioning inputs \['original_size_as_tuple', 'target_size_as_tuple', 'target_size_as_tuple'\]"),
    ("adm_in_channels: 2816", "adm_in_channels: 2560", r"adm_in_channels=2560, but the conditioner's vector is 2816"),
    ("FrozenCLIPEmbedder,", "FrozenT5Embedder,", r"emb_models\[0\]\.target='sgm\.modules\.encoders\.modules\."
                                                  r"FrozenT5Embedder' is not a class this reader understands"),
    ("num_idx: 1000", "num_idx: 500", r"num_idx=500: a denoiser over a subset"),
    ("spatial_transformer_attn_type", "made_up_option", r"unknown entry \['made_up_option'\]"),
])
def test_sgm_yaml_refusals(old, new, message):
    text = SGM_YAMLS["sdxl_base"].replace(old, new, 1)
    assert text != SGM_YAMLS["sdxl_base"]
    with pytest.raises(ValueError, match=message):
        config_from_ldm_yaml(yaml.safe_load(text))


def test_sgm_yaml_legacy_openclip_is_the_normed_penultimate_layer():
    """FrozenOpenCLIPEmbedder2(legacy=True) applies ln_final to the penultimate block: our "penultimate"."""
    text = SGM_YAMLS["sdxl_base"].replace("legacy: False", "legacy: True")
    assert config_from_ldm_yaml(yaml.safe_load(text)).cond_stage_2.output_layer == "penultimate"


def test_compvis_yaml_takes_a_depth_per_level():
    """A CompVis yaml's list transformer_depth: one int when the attending levels agree, else per level with 0
    where a level does not attend."""
    base = yaml.safe_load(SGM_YAMLS["sdxl_base"])
    unet = base["model"]["params"]["network_config"]
    from ldm_jax.convert import ldm_yaml

    assert ldm_yaml._unet(unet, sgm=True).transformer_depth == (0, 2, 10)
    unet["params"]["transformer_depth"] = [7, 3, 3]
    assert ldm_yaml._unet(unet, sgm=True).transformer_depth == 3
