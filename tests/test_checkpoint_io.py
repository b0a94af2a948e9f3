"""Safe checkpoint I/O (ldm_jax/convert/checkpoint_io.py) against torch.load / safetensors on files torch writes.

Equality is exact (bitwise): reading a file involves no arithmetic, and float16/bfloat16 -> float32 is exact.
"""
import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from ldm_jax.convert import checkpoint_io
from ldm_jax.convert.checkpoint_io import (
    CheckpointError,
    InertPlaceholder,
    UnsafeCheckpointError,
    load_state_dict,
    save_safetensors,
)


def _reference_state_dict():
    """Several dtypes, scalars, and views that share storages (offset, strided, transposed, expanded)."""
    torch.manual_seed(0)
    base = torch.randn(24)
    halves = torch.randn(10).half()
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(4, 3, 3, 3)
    sd["half"] = torch.randn(5, 3).half()
    sd["bf16"] = torch.randn(2, 7).bfloat16()
    sd["bf16_transposed"] = torch.randn(4, 3).bfloat16().t()
    sd["half_offset_view"] = halves[3:7]
    sd["half_whole"] = halves
    sd["f64"] = torch.randn(3, dtype=torch.float64)
    sd["int64"] = torch.arange(6, dtype=torch.int64).view(2, 3) - 3
    sd["int32"] = torch.tensor([1, -2], dtype=torch.int32)
    sd["int8"] = torch.tensor([-128, 5], dtype=torch.int8)
    sd["uint8"] = torch.tensor([0, 255], dtype=torch.uint8)
    sd["uint16"] = torch.tensor([1, 65535]).to(torch.uint16)  # pickled through _rebuild_tensor_v3
    sd["bool"] = torch.tensor([True, False, True])
    sd["complex"] = torch.randn(2, dtype=torch.complex64)
    sd["scalar"] = torch.tensor(3.5)
    sd["int_scalar"] = torch.tensor(7)
    sd["offset_view"] = base[5:17].view(3, 4)
    sd["strided"] = base.view(4, 6)[:, ::2]
    sd["transposed"] = base.view(4, 6).t()
    sd["whole"] = base
    sd["expanded"] = torch.randn(1, 3).expand(4, 3)
    sd["empty"] = torch.zeros(0, 3)
    sd["parameter"] = torch.nn.Parameter(torch.randn(2, 2))
    sd["tied"] = sd["conv.weight"]
    return sd


def _as_numpy(tensor, keep_dtype=False):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        if keep_dtype:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.float().numpy()
    if tensor.dtype == torch.float16 and not keep_dtype:
        return tensor.float().numpy()
    return tensor.numpy()


def _assert_same(ours, reference, keep_dtype=False):
    assert list(ours) == list(reference)
    for name, tensor in reference.items():
        expected = _as_numpy(tensor, keep_dtype)
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


class ModelCheckpoint:
    """Stands in for `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` when torch.save pickles it.

    Its __init__/__setstate__ create a marker file: loading must never run them.
    """

    marker = None

    def __init__(self, dirpath):
        self.dirpath = dirpath

    def __setstate__(self, state):
        self.marker.write_text("lightning code ran")


@pytest.fixture
def fake_lightning(monkeypatch, tmp_path):
    """Registers the stand-in class under its Lightning module path; returns (class, marker path)."""
    marker = tmp_path / "lightning_code_ran"
    monkeypatch.setattr(ModelCheckpoint, "marker", marker)
    monkeypatch.setattr(ModelCheckpoint, "__module__", "pytorch_lightning.callbacks.model_checkpoint")
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint, marker


def _compvis_checkpoint(state_dict, model_checkpoint_class):
    """What a CompVis/Lightning 1.4 training checkpoint (sd-v1-x.ckpt) holds besides the weights."""
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        # Lightning 1.4 keys callback states by the callback class itself.
        "callbacks": {
            model_checkpoint_class: {
                "monitor": None,
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "",
                "current_score": np.float64(0.125),  # a numpy scalar: numpy.dtype + multiarray.scalar
                "dirpath": "/logs/checkpoints",
            }
        },
        "callback_instance": model_checkpoint_class("/logs"),  # pickled with NEWOBJ + BUILD
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [{"last_epoch": 3, "_step_count": {1, 2}}],
    }


# --- torch.save files read back equal to torch.load -------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_file_matches_torch_load(tmp_path, zip_format):
    sd = _reference_state_dict()
    path = tmp_path / "weights.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)

    ours = load_state_dict(path)
    _assert_same(ours, sd)
    if not zip_format:
        # torch 2.13 cannot read back its own legacy file holding a uint16 tensor (an UntypedStorage with
        # no .dtype); compare with torch.load on a file without it.
        del sd["uint16"]
        torch.save(sd, path, _use_new_zipfile_serialization=False)
        ours = load_state_dict(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    assert ours["tied"] is ours["conv.weight"]  # one pickled tensor -> one array, as torch.load
    assert all(array.flags.writeable for array in ours.values())
    assert not np.shares_memory(ours["offset_view"], ours["whole"])  # partial views are copies


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_keep_dtype(tmp_path, zip_format):
    sd = _reference_state_dict()
    path = tmp_path / "weights.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    ours = load_state_dict(path, keep_dtype=True)
    _assert_same(ours, sd, keep_dtype=True)
    assert ours["half"].dtype == np.float16 and ours["bf16"].dtype == ml_dtypes.bfloat16


def test_compvis_checkpoint_with_lightning_callbacks(tmp_path, fake_lightning):
    model_checkpoint_class, marker = fake_lightning
    sd = _reference_state_dict()
    path = tmp_path / "sd-v1-x.ckpt"
    torch.save(_compvis_checkpoint(sd, model_checkpoint_class), path)

    # torch's own safe loader refuses this file outright (the reason a restricted loader is needed here).
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):
        torch.load(path, weights_only=True)
    _assert_same(load_state_dict(path), sd)
    _assert_same(load_state_dict(path, key="state_dict"), sd)
    assert not marker.exists()

    with pytest.raises(CheckpointError, match=r"no top-level entry 'ema'; the file holds .*'state_dict' \(Ordered"):
        load_state_dict(path, key="ema")
    with pytest.raises(CheckpointError, match=r"non-tensor entries: <class .*InertPlaceholder\[pytorch_lightning"):
        load_state_dict(path, key="callbacks")  # keys are the inert class -> reported, not run


def test_training_checkpoint_values_unpickle_as_data(fake_lightning):
    """Lightning classes become inert placeholders; numpy scalars, sets, bytes, torch.Size/device are data."""
    from ldm_jax.convert import checkpoint_io

    model_checkpoint_class, marker = fake_lightning
    values = {
        "cls": model_checkpoint_class,
        "obj": model_checkpoint_class("/logs"),
        "f64": np.float64(0.125),
        "i64": np.int64(-3),
        "set": {1, 2},
        "bytes": b"\x00\xff",
        "complex": 1 + 2j,
        "size": torch.Size([2, 3]),
        "device": torch.device("cuda", 0),
    }
    tree = checkpoint_io._unpickle(pickle.dumps(values, protocol=2), "inline.ckpt", lambda pid: pid)
    assert issubclass(tree["cls"], InertPlaceholder)
    assert tree["cls"].global_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert isinstance(tree["obj"], tree["cls"]) and tree["obj"].state == {"dirpath": "/logs"}
    assert not marker.exists()
    assert tree["f64"] == 0.125 and tree["f64"].dtype == np.float64
    assert tree["i64"] == -3 and tree["i64"].dtype == np.int64
    assert tree["set"] == {1, 2} and tree["bytes"] == b"\x00\xff" and tree["complex"] == 1 + 2j
    assert tree["size"] == (2, 3) and tree["device"] == "cuda:0"


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_common_wrappers_are_unwrapped(tmp_path, wrapper):
    sd = collections.OrderedDict(a=torch.randn(2, 3), b=torch.arange(3))
    path = tmp_path / "wrapped.bin"
    torch.save({wrapper: sd, "meta": {"step": 1}}, path)
    _assert_same(load_state_dict(path), sd)


def test_non_tensor_entries_are_reported(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"mixed\.pt.*non-tensor entries: 'step' \(int\)"):
        load_state_dict(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="state dict is empty"):
        load_state_dict(path)


def test_big_endian_zip(tmp_path):
    """A zip checkpoint written on a big-endian machine: byteorder record 'big', storages byte-swapped."""
    torch.manual_seed(1)
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5)[1:4], "c": torch.randn(2, dtype=torch.complex64)}
    little, big = tmp_path / "little.pt", tmp_path / "big.pt"
    torch.save(sd, little)
    element = {"0": ">f4", "1": ">f4", "2": ">c8"}  # storage keys in pickling order
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            folder, _, leaf = info.filename.rpartition("/")
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif folder.endswith("/data"):
                native = np.frombuffer(data, element[leaf].replace(">", "<"))
                data = native.astype(element[leaf]).tobytes()
            dst.writestr(info.filename, data)
    _assert_same(load_state_dict(big), sd)
    _assert_same(load_state_dict(big), torch.load(big, weights_only=True))


# --- safetensors ----------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3), dtype=np.float32),
        "dense.kernel": rng.standard_normal((8, 6), dtype=np.float32).T,  # non-contiguous input
        "scalar": np.float32(2.5),
        "steps": np.arange(4, dtype=np.int64),
        "half_big_endian": np.arange(3, dtype=">f2"),  # written little-endian, read back float32
    }
    path = tmp_path / "export.safetensors"
    save_safetensors(path, arrays, metadata={"format": "ldm_jax"})
    ours = load_state_dict(path)
    assert set(ours) == set(arrays)
    for name, array in arrays.items():
        expected_dtype = np.float32 if name == "half_big_endian" else np.asarray(array).dtype
        assert ours[name].dtype == expected_dtype, name
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    reference = safetensors.torch.load_file(str(path))
    for name, array in arrays.items():
        np.testing.assert_array_equal(reference[name].numpy(), array, err_msg=name)
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "ldm_jax"}
    assert [p.name for p in tmp_path.iterdir()] == ["export.safetensors"]  # no temp file left behind


def test_safetensors_written_by_torch(tmp_path):
    torch.manual_seed(2)
    sd = {"h": torch.randn(3, 2).half(), "bf": torch.randn(4).bfloat16(), "f": torch.randn(2), "i": torch.arange(3)}
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(sd, str(path))
    ours = load_state_dict(path)
    for name, tensor in sd.items():
        np.testing.assert_array_equal(ours[name], _as_numpy(tensor), err_msg=name)
        assert ours[name].dtype == _as_numpy(tensor).dtype
    kept = load_state_dict(path, keep_dtype=True)
    assert kept["h"].dtype == np.float16 and kept["bf"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kept["bf"], _as_numpy(sd["bf"], keep_dtype=True))
    with pytest.raises(CheckpointError, match="key='state_dict' applies to pickled"):
        load_state_dict(path, key="state_dict")


def test_save_safetensors_rejects_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match=r"writes \.safetensors files"):
        save_safetensors(tmp_path / "x.ckpt", {"a": np.ones(2)})
    with pytest.raises(CheckpointError, match="'a' has dtype object|a has dtype object"):
        save_safetensors(tmp_path / "x.safetensors", {"a": np.array([None])})
    with pytest.raises(CheckpointError, match=r"x\.safetensors: safetensors cannot store .*complex128"):
        save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(2, np.complex128)})
    assert list(tmp_path.iterdir()) == []  # no partial or temp file left behind
    with pytest.raises(CheckpointError, match="metadata must map str to str"):
        save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(2)}, metadata={"step": 3})


# --- code-running pickles are refused, and nothing runs ----------------------------------------------------


def _payload(kind, marker):
    """An object whose unpickling would create `marker` (through os.system, builtins.exec or subprocess)."""
    reducers = {
        "posix.system": lambda: (os.system, (f"touch {marker}",)),
        "builtins.exec": lambda: (exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.check_call": lambda: (subprocess.check_call, (["touch", str(marker)],)),
    }
    return type("Payload", (), {"__reduce__": lambda self: reducers[kind]()})()


@pytest.mark.parametrize("kind", ["posix.system", "builtins.exec", "subprocess.check_call"])
@pytest.mark.parametrize("container", ["zip", "legacy", "plain_pickle"])
def test_code_running_pickle_is_refused(tmp_path, kind, container):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.ones(2)}, "evil": _payload(kind, marker)}
    if container == "plain_pickle":
        path.write_bytes(pickle.dumps(obj["evil"], protocol=2))
        pickle.loads(path.read_bytes())  # control: the payload is real and does create the marker
        assert marker.exists()
        marker.unlink()
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")

    with pytest.raises(UnsafeCheckpointError, match=rf"evil\.ckpt: refusing to unpickle the global {kind}"):
        load_state_dict(path)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # torch's safe loader agrees
    assert not marker.exists()


@pytest.mark.parametrize(
    "state", [b"}X\x05\x00\x00\x00dtypeK\x01s", b"N}X\x0c\x00\x00\x00__defaults__)s\x86"],
    ids=["dict_state", "slot_state"],
)
def test_pickle_cannot_alter_allowed_globals(tmp_path, state):
    """BUILD on an allowed global (setting attributes on an object every load shares) fails, and later
    loads are unaffected."""
    path = tmp_path / "tamper.pt"
    rebuilt_tensor = (  # _rebuild_tensor_v2(persistent storage id, 0, (1,), (1,), False, None)
        b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpuK\x01tQK\x00K\x01\x85K\x01\x85\x89Nt"
    )
    targets = [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n",
               b"c__builtin__\nset\n", rebuilt_tensor + b"R"]
    for target in targets:
        # PROTO 2, <target>, <state: {'dtype': 1} or (None, {'__defaults__': ()})>, BUILD, STOP
        path.write_bytes(b"\x80\x02" + target + state + b"b.")
        refused = r"tamper\.pt: .*(no attribute '__|tried to set attribute|not support item assignment|cannot set)"
        with pytest.raises(CheckpointError, match=refused):
            load_state_dict(path)
    sd = _reference_state_dict()
    torch.save(sd, path)
    _assert_same(load_state_dict(path), sd)


def test_tensor_layout_outside_its_storage_is_refused(tmp_path):
    """A crafted pickle whose tensor claims more elements than its storage holds must not read past it."""

    class Storage:
        pass

    storage = Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 2, (3, 2), (2, 1), False, collections.OrderedDict())

    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump({"w": Tensor()})
        zf.writestr("crafted/data.pkl", buffer.getvalue())
        zf.writestr("crafted/data/0", np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(CheckpointError, match=r"tensor w \(size \(3, 2\), stride \(2, 1\), offset 2\) reaches elem"):
        load_state_dict(path)
    with pytest.raises((RuntimeError, pickle.UnpicklingError)):
        torch.load(path, weights_only=True)


# --- missing, truncated, corrupt and unknown files --------------------------------------------------------


def _saved(tmp_path, name, zip_format=True):
    path = tmp_path / name
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    if name.endswith(".safetensors"):
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    return path


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(directory, name, data):
    path = directory / name
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _write(d, "empty.ckpt", b""), r"empty\.ckpt: file is empty"),
        (lambda d: _write(d, "empty.safetensors", b""), r"empty\.safetensors: not a readable safetensors file"),
        (lambda d: _write(d, "noise.pt", os.urandom(4096)),
         r"noise\.pt: (not a torch\.save checkpoint|legacy torch checkpoint is truncated or corrupt)"),
        (lambda d: _write(d, "noise.safetensors", os.urandom(4096)), r"noise\.safetensors: not a readable safetensors"),
        (lambda d: _cut_in_half(_saved(d, "half.ckpt")), r"half\.ckpt: torch zip checkpoint is truncated or corrupt"),
        (lambda d: _cut_in_half(_saved(d, "half.pt", zip_format=False)),
         r"half\.pt: (truncated: storage|legacy torch checkpoint is truncated or corrupt)"),
        (lambda d: _cut_in_half(_saved(d, "half.safetensors")), r"half\.safetensors: not a readable safetensors"),
        (lambda d: _write(d, "plain.pt", pickle.dumps({"w": 1}, protocol=2)),
         r"plain\.pt: not a torch\.save checkpoint \(a plain pickle"),
        (lambda d: _write(d, "model.onnx", b"x"),
         r"model\.onnx: unknown checkpoint extension '\.onnx'; expected \.safetensors or one of \.ckpt"),
        (lambda d: _write(d, "folder.ckpt", None), r"folder\.ckpt: is a directory"),
    ],
    ids=["zero_byte_ckpt", "zero_byte_safetensors", "random_pt", "random_safetensors", "truncated_zip",
         "truncated_legacy", "truncated_safetensors", "plain_pickle", "unknown_extension", "directory"],
)
def test_bad_files_give_clear_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(path)


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    path = _saved(tmp_path, "flipped.ckpt")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("flipped/data/0")
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 100] ^= 0xFF  # a byte of storage 0
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt: torch zip checkpoint is truncated or corrupt.*CRC"):
        load_state_dict(path)


def test_missing_storage_record(tmp_path):
    path = _saved(tmp_path, "partial.ckpt")
    stripped = tmp_path / "stripped.ckpt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if info.filename != "partial/data/1":
                dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match=r"stripped\.ckpt: storage record partial/data/1 is missing"):
        load_state_dict(stripped)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*nowhere\.safetensors"):
        load_state_dict(tmp_path / "nowhere.safetensors")


def test_reads_without_numpy_huge_page_advice(tmp_path, monkeypatch):
    """Files are read with numpy's transparent-huge-page advice off (`small_pages`: compaction stalls made the
    fp16 -> fp32 casts of a full-size UNet 3x slower), and the process's setting is restored afterwards, also
    when the read fails."""
    multiarray = np._core.multiarray
    seen = []
    real = checkpoint_io._output_array

    def spy(array, out_dtype):
        previous = multiarray._set_madvise_hugepage(False)  # reads the setting in force (and keeps it off)
        multiarray._set_madvise_hugepage(previous)
        seen.append(previous)
        return real(array, out_dtype)

    monkeypatch.setattr(checkpoint_io, "_output_array", spy)
    path = tmp_path / "w.safetensors"
    checkpoint_io.save_safetensors(path, {"a": np.ones((4, 4), np.float16)})
    before = multiarray._set_madvise_hugepage(True)
    try:
        assert checkpoint_io.load_state_dict(path)["a"].dtype == np.float32
        assert seen == [False]
        with pytest.raises(checkpoint_io.CheckpointError):
            checkpoint_io.load_state_dict(tmp_path / "w.safetensors", key="state_dict")
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        with pytest.raises(checkpoint_io.CheckpointError):
            checkpoint_io.load_state_dict(path)
        assert multiarray._set_madvise_hugepage(True) is True  # restored after a failed read too
    finally:
        multiarray._set_madvise_hugepage(before)
