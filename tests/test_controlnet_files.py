"""ControlNet checkpoints: the original single files (lllyasviel's `control_model.*` layout, `.safetensors` and `.pth`)
and diffusers ControlNet folders, through `convert.compvis_controlnet` and `store.load_controlnet` /
`save_controlnet`, against diffusers 0.42 (PyTorch, CPU) on a tiny random ControlNet.

The original-layout reference file is written here from the diffusers state dict by a hand table (`_original_key`),
independently of the converter; the table itself is checked against diffusers' own
`single_file_utils.convert_controlnet_checkpoint`, which must map it back to the diffusers state dict exactly.
Residual tolerance 1e-5 relative to each output's largest value (float32; as tests/test_controlnet.py).
"""
import json
import logging
import pickle
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

import controlnet_fixtures
from ldm_jax import cli, store
from ldm_jax.convert.checkpoint_io import CheckpointError
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.compvis_controlnet import (PREFIX, controlnet_prefix, convert_original_controlnet,
                                                export_original_controlnet, load_original_controlnet)
from ldm_jax.convert.diffusers_controlnet import load_diffusers_controlnet
from ldm_jax.models.controlnet import ControlNetModel as OurControlNet, _param_shapes, controlnet_param_shapes
from ldm_jax.models.unet import UNetConfig

RTOL = controlnet_fixtures.RTOL
LATENT = 8
LAYERS = 1  # layers_per_block
TINY = dict(block_out_channels=(32, 64), layers_per_block=LAYERS, cross_attention_dim=16, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
         "controlnet_cond_embedding.conv_out": "input_hint_block.14", "controlnet_mid_block": "middle_block_out.0",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}


def _original_key(key: str) -> str:
    """A diffusers ControlNetModel key -> lllyasviel's name (without `control_model.`), by the documented table."""
    for ours, theirs in FIXED.items():
        if key.startswith(ours + "."):
            key = theirs + key[len(ours):]
            break
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        k, rest = 1 + int(m[1]) * (LAYERS + 1) + int(m[3]), m[4]
        return f"input_blocks.{k}.1.{rest}" if m[2] == "attentions" else f"input_blocks.{k}.0.{_resnet(rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (LAYERS + 1) + LAYERS}.0.op.{m[2]}"
    if key.startswith("middle_block.0.") or key.startswith("middle_block.2."):
        head, rest = key[:len("middle_block.0")], key[len("middle_block.0."):]
        return f"{head}.{_resnet(rest)}"
    return key


def _resnet(rest: str) -> str:
    name, leaf = rest.rsplit(".", 1)
    return f"{RESNET[name]}.{leaf}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers ControlNetModel, its saved folder, the original-layout file written by the table, its state dict)."""
    torch.manual_seed(0)
    model = ControlNetModel(**TINY).eval()
    with torch.no_grad():  # the zero-initialised convs random, so every residual is non-trivial
        for name, param in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.normal_(0.0, 0.2)
    root = tmp_path_factory.mktemp("controlnet_files")
    model.save_pretrained(root / "diffusers")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    original = {f"control_model.{_original_key(k)}": v for k, v in sd.items()}
    save_file(original, str(root / "control_tiny.safetensors"))
    return model, root / "diffusers", root / "control_tiny.safetensors", original


def _assert_same_residuals(model: ControlNetModel, config, params) -> float:
    """Our residuals within RTOL of `model`'s (diffusers) on the same inputs; returns the worst relative error."""
    x, t, context, cond = controlnet_fixtures.inputs(16, latent=LATENT)
    with torch.no_grad():
        ref = model(x, t, context, cond, conditioning_scale=0.7, return_dict=False)
    nhwc = controlnet_fixtures.nhwc
    ours = OurControlNet(config).apply({"params": params}, nhwc(x), jnp.asarray(t.numpy()),
                                       jnp.asarray(context.numpy()), nhwc(cond), 0.7)
    return controlnet_fixtures.assert_residuals(ours, ref, "residuals", RTOL)[1]


def _assert_params_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg="/".join(path))


def test_hand_table_is_diffusers_own_mapping(tiny):
    """diffusers' convert_controlnet_checkpoint maps the hand-written original file back to the diffusers weights."""
    model, folder, _, original = tiny
    back = convert_controlnet_checkpoint(original, json.loads((folder / "config.json").read_text()))
    ref = model.state_dict()
    assert back.keys() == ref.keys()
    for key, value in ref.items():
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_original_file_loads_as_the_diffusers_weights(tiny):
    """Original file -> ours: the config inferred from the weights is the diffusers folder's, params bitwise equal."""
    model, folder, path, _ = tiny
    config, params = load_original_controlnet(path)
    ref_config, ref_params = load_diffusers_controlnet(folder)
    assert config == ref_config
    _assert_params_equal(params, ref_params)
    _assert_same_residuals(model, config, params)


def test_export_loads_in_diffusers_from_single_file(tiny, tmp_path):
    """Ours -> original file -> diffusers' ControlNetModel.from_single_file (offline, config from the local folder):
    the same weights exactly and residuals within RTOL of ours."""
    model, folder, _, original = tiny
    config, params = load_diffusers_controlnet(folder)
    exported = export_original_controlnet(params, config)
    assert exported.keys() == original.keys()
    path = tmp_path / "exported.safetensors"
    store.save_controlnet(store.LoadedControlNet(config, params), path, format="original")
    reloaded = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True).eval()
    ref = model.state_dict()
    assert reloaded.state_dict().keys() == ref.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ref[key]), key
    _assert_same_residuals(reloaded, config, params)


def test_pth_files_read_without_pickle_code(tiny, tmp_path, monkeypatch, caplog):
    """torch.save'd .pth files, bare keys (SD 2.1-style) and a whole-model 1.0-style checkpoint (base keys dropped,
    logged), load with no call into torch.load or pickle's own loaders."""
    _, folder, _, original = tiny
    bare = {k[len("control_model."):]: torch.from_numpy(v) for k, v in original.items()}
    whole = {**{k: torch.from_numpy(v) for k, v in original.items()},
             "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
             "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "betas": torch.zeros(1000)}
    torch.save(bare, tmp_path / "control_bare.pth")
    torch.save({"state_dict": whole}, tmp_path / "control_sd15_whole.pth")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle code ran")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    _, ref = load_diffusers_controlnet(folder)
    with caplog.at_level(logging.INFO):
        for name in ("control_bare.pth", "control_sd15_whole.pth"):
            _assert_params_equal(store.load_controlnet(tmp_path / name).params, ref)
    assert "dropped 3 base-model key(s)" in caplog.text


def test_bin_saved_folder_loads_through_the_one_reader(tiny, tmp_path):
    """A diffusers ControlNet folder saved as .bin (safe_serialization=False) loads through `load_diffusers_controlnet`
    (`diffusers_pipeline.read_weights`), the reader `store.load_controlnet` uses: the safetensors folder's params."""
    model, folder, _, _ = tiny
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    ref_config, ref = load_diffusers_controlnet(folder)
    config, params = load_diffusers_controlnet(tmp_path / "bin")
    assert config == ref_config
    _assert_params_equal(params, ref)
    _assert_params_equal(store.load_controlnet(tmp_path / "bin").params, ref)


def test_store_round_trips(tiny, tmp_path):
    """diffusers folder -> original file (fp32 and fp16) -> ours -> diffusers folder (strict from_pretrained)."""
    model, folder, _, _ = tiny
    first = store.load_controlnet(folder)
    assert store.detect_controlnet_format(folder) == "diffusers"
    store.save_controlnet(first, tmp_path / "cn.safetensors", format="original")
    second = store.load_controlnet(tmp_path / "cn.safetensors")
    assert second.config == first.config
    _assert_params_equal(second.params, first.params)
    store.save_controlnet(second, tmp_path / "cn_folder")
    third = store.load_controlnet(tmp_path / "cn_folder")
    _assert_params_equal(third.params, first.params)
    reloaded = ControlNetModel.from_pretrained(tmp_path / "cn_folder", local_files_only=True)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    store.save_controlnet(first, tmp_path / "half.safetensors", format="original", dtype="fp16")
    half = store.load_controlnet(tmp_path / "half.safetensors")
    for path, value in traverse_util.flatten_dict(half.params).items():
        want = traverse_util.flatten_dict(first.params)[path].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(value, want)


def test_base_heads_and_fit(tiny):
    """`base` gives a single file its heads; a ControlNet for another base is one line naming the file and shapes."""
    _, _, path, _ = tiny
    base = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                      num_heads=-1, num_head_channels=4, context_dim=16)
    loaded = store.load_controlnet(path, base=base)
    assert (loaded.config.unet.num_heads, loaded.config.unet.num_head_channels) == (-1, 4)
    wider = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                       context_dim=32)
    with pytest.raises(store.StoreError, match=r"control_tiny.safetensors: .*context width 16, the base UNet's 32"):
        store.load_controlnet(path, base=wider)
    other = UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(1,),
                       context_dim=16)
    with pytest.raises(store.StoreError, match=r"^\S*control_tiny.safetensors: a ControlNet for another base "
                                               r"architecture: residual channels \[32, 32, 32, 64\], the base UNet's "
                                               r"\[32, 32, 32, 32\]$"):
        store.load_controlnet(path, base=other)


def test_bad_input(tiny, tmp_path):
    """A UNet file given as a ControlNet, a diffusers-layout single file, a truncated file, a whole model's loader
    given a ControlNet: one-line errors naming the file."""
    model, folder, path, original = tiny
    unet_file = tmp_path / "unet.safetensors"
    save_file({k.replace("control_model.", "model.diffusion_model."): v for k, v in original.items()
               if "input_blocks" in k}, str(unet_file))
    with pytest.raises(ConversionError, match=r"unet.safetensors: not a ControlNet: .*a UNet / Stable Diffusion"):
        store.load_controlnet(unet_file)
    diffusers_file = tmp_path / "flat.safetensors"
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(diffusers_file))
    with pytest.raises(ConversionError, match="flat.safetensors: a diffusers-layout ControlNet state dict"):
        store.load_controlnet(diffusers_file)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        store.load_controlnet(truncated)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in original.items() if "zero_convs.1." not in k}, str(missing))
    with pytest.raises(ConversionError, match=r"missing.safetensors.*zero_convs\.1\.0"):
        store.load_controlnet(missing)
    with pytest.raises(store.StoreError, match="a ControlNet file, not a whole model"):
        store.load_model(path)
    with pytest.raises(store.StoreError, match="a diffusers ControlNet folder, not a whole model"):
        store.load_model(folder)


def test_save_writes_only_into_a_controlnet_folder(tiny, tmp_path, capsys):
    """save_controlnet (and `convert --controlnet ... --to diffusers`) writes into a missing or empty folder or a
    diffusers ControlNet folder, never over a model directory's or a diffusers UNet folder's config.json / weights."""
    _, folder, path, _ = tiny
    net = store.load_controlnet(folder)
    model_dir = store.save_model(store.load_model("shapes"), tmp_path / "model")
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (unet_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    before = {p: p.read_bytes() for d in (model_dir, unet_dir) for p in d.rglob("*") if p.is_file()}
    for dest, what in ((model_dir, "it has no config.json with _class_name"),
                       (unet_dir, "its config.json is a UNet2DConditionModel's")):
        with pytest.raises(store.StoreError, match=rf"^\S*{dest.name}: not a diffusers ControlNet folder \({what};.*"
                                                   r"; not writing into it$"):
            store.save_controlnet(net, dest)
        assert cli.main(["convert", "--controlnet", str(path), str(dest), "--to", "diffusers"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].endswith("not writing into it"), errors
    assert {p: p.read_bytes() for d in (model_dir, unet_dir) for p in d.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    for dest in (tmp_path / "empty", tmp_path / "new", tmp_path / "empty"):  # the last: over a ControlNet folder
        store.save_controlnet(net, dest)
        _assert_params_equal(store.load_controlnet(dest).params, net.params)


def test_one_controlnet_predicate(tiny, tmp_path):
    """`compvis_controlnet.controlnet_prefix` is the one "does this file hold a ControlNet?": find_prefix and the
    store's load_model use it; a ControlNet 1.0 whole-model file (base model beside it) is refused by load_model."""
    model, _, _, original = tiny
    bare = {k[len(PREFIX):]: v for k, v in original.items()}
    unet = {k.replace(PREFIX, "model.diffusion_model."): v for k, v in original.items() if "input_blocks" in k}
    assert controlnet_prefix(original) == PREFIX and controlnet_prefix(bare) == ""
    assert controlnet_prefix(unet) is None and controlnet_prefix(model.state_dict()) is None
    whole = tmp_path / "control_sd15_whole.safetensors"
    save_file({**original, **unet}, str(whole))
    with pytest.raises(store.StoreError, match=r"control_sd15_whole.safetensors: a ControlNet file, not a whole "
                                               r"model; load it with load_controlnet") as e:
        store.load_model(whole)
    assert "\n" not in str(e.value)


def test_hint_encoder_keys_that_do_not_fit(tiny):
    """hint_widths reads the modules off their .weight keys: a file with only biases, a non-numeric module index and a
    conv weight of the wrong rank are one-line ConversionErrors naming the key; config with hint_overrides is refused."""
    _, _, path, original = tiny
    hint = PREFIX + "input_hint_block."
    biases_only = {k: v for k, v in original.items() if not (k.startswith(hint) and k.endswith(".weight"))}
    with pytest.raises(ConversionError, match=r"input_hint_block\.\*\.weight has modules \[\]; expected 0, 2") as e:
        convert_original_controlnet(biases_only)
    assert "\n" not in str(e.value)
    with pytest.raises(ConversionError, match=r"key 'control_model.input_hint_block.foo.weight' is not a hint-encoder "
                                              r"conv's") as e:
        convert_original_controlnet({**original, f"{hint}foo.weight": np.zeros(3, np.float32)})
    assert "\n" not in str(e.value)
    flat = {**original, f"{hint}0.weight": np.zeros(16, np.float32)}
    with pytest.raises(ConversionError, match=r"input_hint_block.0.weight is \(16,\); a hint-encoder conv weight is 4-D"):
        convert_original_controlnet(flat)
    config, _ = load_original_controlnet(path)
    with pytest.raises(ValueError, match="global_pool_conditions apply to a config inferred from the weights"):
        load_original_controlnet(path, config, global_pool_conditions=True)
    assert load_original_controlnet(path, global_pool_conditions=True)[0].global_pool_conditions


def test_param_shapes_are_traced_once_per_config(tiny, tmp_path):
    """controlnet_param_shapes (a jax.eval_shape of the whole init) is cached per config: a load + export traces it
    once; each call still returns its own dicts."""
    _, folder, _, _ = tiny
    _param_shapes.cache_clear()
    net = store.load_controlnet(folder)
    store.save_controlnet(net, tmp_path / "cn.safetensors", format="original")
    info = _param_shapes.cache_info()
    assert (info.misses, info.hits >= 1) == (1, True), info
    first = controlnet_param_shapes(net.config)
    first.pop("conv_in")
    assert "conv_in" in controlnet_param_shapes(net.config)


def test_convert_command_dtypes_and_early_refusal(tiny, tmp_path, capsys, monkeypatch):
    """`convert --controlnet --to diffusers --dtype fp16` writes an fp16 folder that diffusers loads strictly; a
    `--to compvis` DEST not named *.safetensors is refused before anything is loaded (exit 2, one line)."""
    model, folder, path, _ = tiny
    assert cli.main(["convert", "--controlnet", str(path), str(tmp_path / "half"), "--to", "diffusers",
                     "--dtype", "fp16"]) == 0
    with safe_open(tmp_path / "half" / "diffusion_pytorch_model.safetensors", "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    reloaded, info = ControlNetModel.from_pretrained(tmp_path / "half", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value.half()), key
    ref = traverse_util.flatten_dict(store.load_controlnet(folder).params)
    for p, value in traverse_util.flatten_dict(store.load_controlnet(tmp_path / "half").params).items():
        np.testing.assert_array_equal(value, ref[p].astype(np.float16).astype(np.float32))
    capsys.readouterr()

    def never(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(store, "load_controlnet", never)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--controlnet", str(folder), str(tmp_path / "cn.pth"), "--to", "compvis"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--to compvis writes one .safetensors file" in err


def test_load_controlnet_param_dtype(tiny):
    """store.load_controlnet(param_dtype=) as load_model's: bfloat16 params, exactly the bfloat16 cast of the float32
    load, from a diffusers folder and from an original file; a bad value is a ValueError naming the choices."""
    _, folder, path, _ = tiny
    for source in (folder, path):
        ref = traverse_util.flatten_dict(store.load_controlnet(source).params)
        half = traverse_util.flatten_dict(store.load_controlnet(source, param_dtype="bf16").params)
        assert half.keys() == ref.keys()
        for p, value in half.items():
            assert value.dtype == jnp.bfloat16, p
            np.testing.assert_array_equal(value.view(np.uint16), ref[p].astype(jnp.bfloat16).view(np.uint16))
    with pytest.raises(ValueError, match="param_dtype is 'fp16'; expected one of"):
        store.load_controlnet(folder, param_dtype="fp16")


def test_convert_command(tiny, tmp_path, capsys):
    """`ldm-jax convert --controlnet SRC DEST --to compvis|diffusers`; --to ldm and a non-ControlNet are one line."""
    _, folder, path, _ = tiny
    assert cli.main(["convert", "--controlnet", str(folder), str(tmp_path / "out.safetensors"), "--to", "compvis"]) == 0
    assert cli.main(["convert", "--controlnet", str(tmp_path / "out.safetensors"), str(tmp_path / "out"),
                     "--to", "diffusers"]) == 0
    _assert_params_equal(store.load_controlnet(tmp_path / "out").params, store.load_controlnet(path).params)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--controlnet", str(folder), str(tmp_path / "x"), "--to", "ldm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--controlnet" in err and "--to ldm" in err
    assert cli.main(["convert", "--controlnet", str(path), str(tmp_path / "y"), "--to", "diffusers",
                     "--base", "sd_v1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "control_tiny.safetensors: a ControlNet for another base architecture" in errors[0]
