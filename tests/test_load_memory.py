"""Loading without two full copies of the params (issue 18, item 3).

- `store.load_model(..., param_dtype="bf16")` reads each tensor straight into bfloat16 (model directories and
  diffusers folders, tensor by tensor; single files are cast after conversion): the params are exactly the
  bfloat16 cast of the float32 load, in every format, from float32 and from float16 files.
- The float32 default is unchanged: float32 params, `options.param_dtype` float32, the same values as an explicit
  `param_dtype="fp32"`; the safetensors reader returns what the safetensors library returns, bit for bit.
- `store.place_params(params, consume=True)` (also `pipeline.place_params`) puts the params on the devices leaf
  by leaf and drops every host array from the given tree as it goes: the returned device arrays equal the host
  ones and, once the caller drops its own references, no host array is alive (weak references).

The measured effect on a full-size SD 1.5-shaped folder is in ldm_jax/store.py (`load_model`, `place_params`).

Run: .venv/bin/python -m pytest -q tests/test_load_memory.py
"""
import gc
import shutil
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from ldm_jax import ldm, pipeline, store
from ldm_jax.convert.checkpoint_io import load_state_dict

BF16 = ml_dtypes.bfloat16


def _items(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _items(value, prefix + (name,))
        else:
            yield "/".join(prefix + (name,)), value


def _assert_bf16_cast(bf16_model, fp32_model):
    got, want = dict(_items(bf16_model.params)), dict(_items(fp32_model.params))
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert value.dtype == np.float32, name
        assert got[name].dtype == BF16, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name].view(np.uint16), value.astype(BF16).view(np.uint16), err_msg=name)
    assert bf16_model.options.param_dtype == ldm.COMPUTE_DTYPES["bf16"]
    assert fp32_model.options.param_dtype == ldm.COMPUTE_DTYPES["fp32"]


def _fp16_copy(folder, dest):
    """`folder` (a diffusers pipeline) with every safetensors file rewritten in float16, as the hub's files are."""
    shutil.copytree(folder, dest)
    for path in dest.rglob("*.safetensors"):
        arrays = safetensors.numpy.load_file(str(path))
        safetensors.numpy.save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v
                                     for k, v in arrays.items()}, str(path))
    return dest


@pytest.mark.parametrize("stored", ["fp32", "fp16"])
def test_diffusers_bf16_load_is_the_cast_of_the_fp32_load(sd, tmp_path, stored):
    _, folder = sd
    if stored == "fp16":
        folder = _fp16_copy(folder, tmp_path / "fp16")
    fp32 = store.load_model(folder)
    _assert_bf16_cast(store.load_model(folder, param_dtype="bf16"), fp32)
    explicit = store.load_model(folder, param_dtype="fp32")  # the default, spelled out: the same params
    for name, value in _items(fp32.params):
        np.testing.assert_array_equal(dict(_items(explicit.params))[name], value)


def test_model_dir_and_single_file_bf16_loads(sd, tmp_path):
    _, folder = sd
    model = store.load_model(folder)
    for fmt, dest, dtype in (("ldm", tmp_path / "ldm16", "fp16"), ("ldm", tmp_path / "ldm32", "fp32"),
                             ("compvis", tmp_path / "sd.safetensors", "fp16")):
        store.save_model(model, dest, format=fmt, dtype=dtype)
        kwargs = dict(config=model.config, tokenizer=folder / "tokenizer") if fmt == "compvis" else {}
        _assert_bf16_cast(store.load_model(dest, param_dtype="bf16", **kwargs), store.load_model(dest, **kwargs))


def test_bad_param_dtype():
    with pytest.raises(ValueError, match="param_dtype is 'fp16'"):
        store.load_model("shapes", param_dtype="fp16")


def test_safetensors_reader_matches_the_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "f16": rng.normal(size=(7,)).astype(np.float16),
              "bf16": rng.normal(size=(2, 2, 3)).astype(BF16), "f64": rng.normal(size=(4,)),
              "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "u8": np.arange(5, dtype=np.uint8),
              "empty": np.zeros((0, 3), np.float32), "scalar": np.array(2.5, np.float32)}
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    kept = load_state_dict(path, keep_dtype=True)
    reference = safetensors.numpy.load_file(str(path))
    assert kept.keys() == reference.keys()
    for name, value in reference.items():
        assert kept[name].dtype == value.dtype and kept[name].shape == value.shape, name
        assert kept[name].tobytes() == value.tobytes(), name
    default, bf16 = load_state_dict(path), load_state_dict(path, dtype=BF16)
    for name, value in reference.items():
        low = value.dtype in (np.float16, BF16)
        want = value.astype(np.float32) if low else value
        assert default[name].dtype == want.dtype and default[name].tobytes() == want.tobytes(), name
        cast = want.astype(BF16) if want.dtype == np.float32 else want  # float64 and integers stay as stored
        assert bf16[name].dtype == cast.dtype and bf16[name].tobytes() == cast.tobytes(), name


def test_check_finite_sees_bf16_nan_and_inf(tmp_path):
    params = {"unet": {"a": np.ones(3, BF16), "b": np.array([1.0, np.inf, np.nan], np.float32).astype(BF16)}}
    with pytest.raises(store.StoreError, match="unet/b holds 1 NaN / 1 inf"):
        store.check_finite(params, "f")
    store.check_finite({"unet": {"a": np.ones(3, BF16)}}, "f")


def test_place_params_leaf_by_leaf_drops_the_host_arrays():
    rng = np.random.default_rng(1)
    params = {"unet": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                                "bias": np.zeros(8, np.float32)}},
              "first_stage": {"w": rng.normal(size=(5,)).astype(np.float32).astype(BF16)}}
    copies = {name: value.copy() for name, value in _items(params)}
    refs = {name: weakref.ref(value) for name, value in _items(params)}
    placed = store.place_params(params, consume=True)
    assert params == {}  # emptied as it went
    gc.collect()
    got = dict(_items(placed))
    assert got.keys() == copies.keys()
    for name, ref in refs.items():  # no host copy is alive: freed, or it is the device array's own buffer (the CPU
        # client may adopt an aligned numpy array without copying it; then it holds the only reference)
        buffers = {shard.data.unsafe_buffer_pointer() for shard in got[name].addressable_shards}
        assert ref() is None or ref().ctypes.data in buffers, name
    for name, value in copies.items():
        assert isinstance(got[name], jax.Array) and got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
    # consume=False (the default) leaves the given tree as it was
    again = {"a": {"b": np.ones(2, np.float32)}}
    placed = pipeline.place_params(again)  # the same function
    assert again["a"]["b"].shape == (2,) and isinstance(placed["a"]["b"], jax.Array)
