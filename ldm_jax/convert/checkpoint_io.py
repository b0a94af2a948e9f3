"""Safe checkpoint file I/O: safetensors and PyTorch pickles -> {name: numpy array}, without torch.

`load_state_dict(path)` reads
- `.safetensors` through the safetensors numpy API (lazily, tensor by tensor);
- `.ckpt` / `.pt` / `.pth` / `.bin` written by `torch.save`: the zip format (torch >= 1.6) and the legacy
  non-zip format (a sequence of pickles followed by raw storages). Neither torch nor any code named in the
  file is imported or run: a restricted unpickler resolves only the globals needed to rebuild tensors and
  plain containers, and refuses every other global with `UnsafeCheckpointError` naming it. Classes of the
  training framework that CompVis checkpoints carry (a pytorch_lightning `ModelCheckpoint` used as the key
  of the "callbacks" entry in sd-v1-x.ckpt) become inert placeholders: their pickled arguments and state
  are kept as data, none of their code runs.

Tensors are first unpickled as references (storage key, offset, size, stride, dtype); only the tensors of
the selected state dict are read from the file, so optimizer states in a full training checkpoint cost
nothing. Every reference is checked against the size of its storage before a view is taken.

dtypes: float16, bfloat16 and float8 tensors are returned as float32 unless `keep_dtype=True` (then
float16 stays float16 and bfloat16/float8 come back as `ml_dtypes` arrays). Every bfloat16/float16/float8
value is exactly representable in float32, so the conversion loses nothing. Other dtypes (float32,
float64, integers, bool, complex) are returned unchanged. Big-endian torch files are byte-swapped.
`dtype=bfloat16` returns those float tensors and float32 ones as bfloat16 instead, each converted through float32
as it is read: bit for bit the bfloat16 cast of the float32 read, without ever holding that float32 read.

`load_torch_pickle(path)` reads a whole `torch.save` object tree the same safe way (nested dicts, lists, strings
and numbers kept, every tensor a numpy array), for files that are not a flat state dict (A1111 embeddings).

`save_safetensors(path, state_dict, metadata=None)` writes a flat state dict of arrays (atomically).
"""
from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import contextlib
import io
import json
import math
import os
import pickle
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes  # registers bfloat16/float8 with numpy (the safetensors numpy API looks dtypes up by name)
import numpy as np
import safetensors
from safetensors.numpy import save_file as _safetensors_save_file

TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTENSION = ".safetensors"
# Wrappers that hold the state dict, tried in this order (CompVis/Lightning first).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Training frameworks whose classes are replaced by inert placeholders instead of being refused.
INERT_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")

_LOW_PRECISION_FLOATS = tuple(
    np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
)
_TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # first pickle of a legacy (non-zip) torch.save file
_TORCH_PROTOCOL_VERSION = 1001


class CheckpointError(ValueError):
    """A checkpoint file is missing parts, corrupt, truncated, of an unknown format or holds no state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint names a global (function or class) that could run code; nothing was run."""


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def load_state_dict(
    path: str | os.PathLike, *, key: str | None = None, keep_dtype: bool = False, dtype: Any = None
) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into a flat {name: numpy array} state dict, running no code from the file.

    path: a `.safetensors` file or a `torch.save` file (`.ckpt`, `.pt`, `.pth`, `.bin`; zip or legacy).
    key: for pickles, the top-level entry holding the state dict (e.g. "state_dict"). By default a flat
      mapping of tensors is used as is, else the first of WRAPPER_KEYS that holds a mapping
      ({"state_dict": ..., "global_step": ..., "epoch": ...} for CompVis checkpoints), repeatedly.
    keep_dtype: keep float16 / bfloat16 / float8 arrays in their stored dtype instead of float32.
    dtype: float32 (None, the default) or bfloat16: the dtype float16 / bfloat16 / float8 / float32 tensors come
      back in, each converted as it is read (tensor by tensor: no float32 copy of the whole file is built).

    Returns arrays with the stored shapes (torch layouts, no transposes). Tensors that shared one storage in
    the file may share memory when they covered all of it, as with `torch.load`.
    Raises FileNotFoundError for a missing path, UnsafeCheckpointError for a pickle naming a forbidden
    global, CheckpointError for anything else that is wrong with the file.
    """
    path = _existing_file(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_EXTENSION:
        if key is not None:
            raise CheckpointError(f"{path}: key={key!r} applies to pickled checkpoints; safetensors files are flat")
        with small_pages():
            return _load_safetensors(path, _output_dtype(keep_dtype, dtype))
    if suffix in TORCH_EXTENSIONS:
        with small_pages():
            return _load_torch(path, key, _output_dtype(keep_dtype, dtype))
    raise CheckpointError(
        f"{path}: unknown checkpoint extension {suffix or '(none)'!r}; expected "
        f"{SAFETENSORS_EXTENSION} or one of {', '.join(TORCH_EXTENSIONS)}"
    )


def load_torch_pickle(path: str | os.PathLike, *, keep_dtype: bool = False) -> Any:
    """Reads a whole `torch.save` file (`.ckpt`, `.pt`, `.pth`, `.bin`) into its object tree, running no code from it.

    Mappings come back as dicts, lists and tuples as themselves, strings / numbers / None unchanged, every tensor
    as a numpy array (dtypes as `load_state_dict`), training-framework objects as `InertPlaceholder`s. For files
    that are not a flat state dict, e.g. A1111 embeddings {"string_to_param": {"*": tensor}, "name": str, ...}.
    Raises as `load_state_dict`; a `.safetensors` path is a CheckpointError (use `load_state_dict`).
    """
    path = _existing_file(path)
    if path.suffix.lower() not in TORCH_EXTENSIONS:
        raise CheckpointError(f"{path}: load_torch_pickle reads torch.save files ({', '.join(TORCH_EXTENSIONS)}), "
                              f"got {path.suffix or '(no extension)'!r}")
    return _load_torch(path, None, _output_dtype(keep_dtype, None), whole_tree=True)


def save_safetensors(
    path: str | os.PathLike, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes a flat {name: array} state dict to a `.safetensors` file (atomically: temp file + rename).

    Arrays (numpy or jax, any shape) are written in their own dtype, C-contiguous and little-endian; pass
    float32 arrays for float32 exports. metadata: optional {str: str} stored in the file header.
    """
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_EXTENSION:
        raise CheckpointError(f"{path}: save_safetensors writes {SAFETENSORS_EXTENSION} files, got {path.suffix!r}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: metadata must map str to str, got {dict(metadata)!r}")
    arrays = {}
    for name, value in state_dict.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{path}: state dict keys must be non-empty strings, got {name!r}")
        array = np.asarray(value)
        if array.dtype.kind not in "biufc" and array.dtype not in _LOW_PRECISION_FLOATS:
            raise CheckpointError(f"{path}: {name} has dtype {array.dtype}; expected a numeric array")
        arrays[name] = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _safetensors_save_file(arrays, tmp, metadata=dict(metadata) if metadata is not None else None)
        os.replace(tmp, path)
    except safetensors.SafetensorError as e:  # e.g. a dtype safetensors has no code for (complex128)
        raise CheckpointError(f"{path}: safetensors cannot store this state dict: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2, "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8",
    "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _load_safetensors(path: Path, out_dtype: Any) -> dict[str, np.ndarray]:
    """Tensor by tensor: safetensors checks the header and every offset; the data is then read with plain file
    reads into one new array per tensor (not through the library's memory map, whose pages would stay resident,
    and count, until the whole file is read: 1.7 GB beside the converted params for SD's fp16 UNet)."""
    try:
        with safetensors.safe_open(str(path), framework="np") as f:  # validates the header and the offsets
            names = list(f.keys())
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt): {e}") from e
    if not names:
        raise CheckpointError(f"{path}: safetensors file holds no tensors")
    out = {}
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header, start = json.loads(file.read(size)), 8 + size
        for name in names:
            info = header[name]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: not a readable safetensors file (an unsupported dtype): {name} has "
                                      f"dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            buffer = bytearray(end - begin)
            file.seek(start + begin)
            if file.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path}: truncated: {name} ends past the end of the file")
            array = np.frombuffer(buffer, np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])).reshape(info["shape"])
            out[name] = _output_array(array, out_dtype)
            del buffer, array
    return out


# ---------------------------------------------------------------------------------------------------------
# torch.save files: format detection, zip and legacy readers
# ---------------------------------------------------------------------------------------------------------


def _load_torch(path: Path, key: str | None, out_dtype: Any, whole_tree: bool = False) -> Any:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path}: file is empty (0 bytes); expected a torch.save checkpoint")
    if head[:4] == b"PK\x03\x04":
        return _load_torch_zip(path, key, out_dtype, whole_tree)
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(f"{path}: tar-format torch checkpoint (PyTorch < 0.4) is not supported")
    if head[:1] == b"\x80":
        return _load_torch_legacy(path, key, out_dtype, whole_tree)
    raise CheckpointError(
        f"{path}: not a torch.save checkpoint (expected a zip archive or a legacy torch pickle; "
        f"file starts with {head[:8]!r})"
    )


def _load_torch_zip(path: Path, key: str | None, out_dtype: Any, whole_tree: bool = False) -> Any:
    with _corruption_as_error(path, "torch zip checkpoint"), zipfile.ZipFile(path) as zf:
        prefix = _zip_prefix(zf, path)
        table = _StorageTable(path)
        tree = _unpickle(zf.read(prefix + "data.pkl"), path, table.register)
        byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in zf.NameToInfo else "little"
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}; expected 'little' or 'big'")

        def read_storage(storage_key: str, nbytes: int) -> np.ndarray:
            name = f"{prefix}data/{storage_key}"
            if name not in zf.NameToInfo:
                raise CheckpointError(f"{path}: storage record {name} is missing from the zip archive")
            return _raw_buffer(zf.read(name), nbytes, path, name)

        reader = _StorageReader(table, read_storage)
        return _read_tree(tree, key, whole_tree, reader, byteorder, out_dtype, path)


def _zip_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """The archive's top-level folder (torch.save names it after the file; any name is valid)."""
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{path}: zip archive is not a torch.save checkpoint (expected exactly one <folder>/data.pkl, "
            f"found {len(pickles)})"
        )
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "constants.pkl" in zf.NameToInfo:
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save state dict")
    return prefix


def _load_torch_legacy(path: Path, key: str | None, out_dtype: Any, whole_tree: bool = False) -> Any:
    """Legacy format: pickles of magic number, protocol version, sys info, the object and the storage key
    list, then for each listed storage an int64 little-endian element count and its raw bytes."""
    table = _StorageTable(path)
    with _corruption_as_error(path, "legacy torch checkpoint"), open(path, "rb") as f:
        magic = _unpickle(f, path, table.register)
        if not (isinstance(magic, int) and magic == _TORCH_MAGIC_NUMBER):
            raise CheckpointError(f"{path}: not a torch.save checkpoint (a plain pickle without torch's magic number)")
        version = _unpickle(f, path, table.register)
        if version != _TORCH_PROTOCOL_VERSION:
            raise CheckpointError(
                f"{path}: legacy torch protocol version {version!r}; expected {_TORCH_PROTOCOL_VERSION}"
            )
        _unpickle(f, path, table.register)  # sys info; legacy storages are always little-endian on disk
        tree = _unpickle(f, path, table.register)
        storage_keys = _unpickle(f, path, table.register)
        offsets = _legacy_storage_offsets(f, storage_keys, table, path)

        def read_storage(storage_key: str, nbytes: int) -> np.ndarray:
            f.seek(offsets[storage_key])
            return _raw_buffer(f.read(nbytes), nbytes, path, f"storage {storage_key}")

        reader = _StorageReader(table, read_storage)
        return _read_tree(tree, key, whole_tree, reader, "little", out_dtype, path)


def _legacy_storage_offsets(f, storage_keys: Any, table: _StorageTable, path: Path) -> dict[str, int]:
    """Walks the raw storages after the pickles; returns {storage key: offset of its first data byte}."""
    if not isinstance(storage_keys, list) or not all(isinstance(k, str) for k in storage_keys):
        raise CheckpointError(f"{path}: legacy storage key list is corrupt (got {type(storage_keys).__name__})")
    file_size = os.fstat(f.fileno()).st_size
    offsets = {}
    for storage_key in storage_keys:
        dtype, numel = table.root(storage_key)
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{path}: truncated: storage {storage_key} header is missing")
        (stored_numel,) = struct.unpack("<q", header)
        if stored_numel != numel:
            raise CheckpointError(
                f"{path}: storage {storage_key} holds {stored_numel} elements, the pickle says {numel}"
            )
        offsets[storage_key] = f.tell()
        end = f.tell() + numel * dtype.itemsize
        if end > file_size:
            raise CheckpointError(f"{path}: truncated: storage {storage_key} ends at byte {end} of {file_size}")
        f.seek(end)
    return offsets


class _corruption_as_error:
    """Turns the exceptions that truncated or corrupt archives and pickles raise into a CheckpointError."""

    _CORRUPTION = (
        pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, TypeError,
        ValueError, IndexError, KeyError, AttributeError, OverflowError, UnicodeDecodeError,
    )

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, CheckpointError) and not str(exc).startswith(f"{self.path}:"):
            raise type(exc)(f"{self.path}: {exc}") from exc  # raised by a rebuild helper that lacks the path
        if exc is None or isinstance(exc, CheckpointError) or not isinstance(exc, self._CORRUPTION):
            return False
        raise CheckpointError(
            f"{self.path}: {self.what} is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def _raw_buffer(data: bytes, nbytes: int, path: Path, name: str) -> np.ndarray:
    if len(data) < nbytes:
        raise CheckpointError(f"{path}: {name} holds {len(data)} bytes, expected {nbytes} (truncated?)")
    return np.frombuffer(bytearray(memoryview(data)[:nbytes]), dtype=np.uint8)  # bytearray: writable arrays


# ---------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------------------


class _StorageType(NamedTuple):
    """A torch storage class (torch.FloatStorage, ...) named in a pickle, as the numpy dtype it holds.

    A NamedTuple: shared by every load, so it must be immutable from a pickle (no __dict__/__setstate__)."""

    name: str
    dtype: np.dtype


class _StorageRef(NamedTuple):
    """A storage in the file: root storage key, its dtype, and (legacy views) an element window into it.

    This and _TensorRef are NamedTuples so that a pickle cannot change their checked fields (BUILD)."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


class _TensorRef(NamedTuple):
    """A pickled tensor: storage window, element offset, size and stride in elements of `dtype`."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


class _StorageTable:
    """Root storages named by persistent ids: key -> (dtype, numel); one dtype per key, as torch enforces."""

    def __init__(self, path: Path):
        self.path = path
        self.roots: dict[str, tuple[np.dtype, int]] = {}

    def register(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            if kind in ("module", b"module"):
                raise CheckpointError(
                    f"{self.path}: holds a pickled torch.nn.Module (torch.save(model)); save model.state_dict()"
                )
            raise CheckpointError(f"{self.path}: unknown persistent id {kind!r}; expected a torch storage")
        if len(pid) == 5:  # zip: ('storage', type, key, location, numel)
            _, storage_type, key, _, numel = pid
            view = None
        elif len(pid) == 6:  # legacy: (..., numel, view_metadata)
            _, storage_type, key, _, numel, view = pid
        else:
            raise CheckpointError(f"{self.path}: malformed storage id {pid!r}")
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_count(numel):
            raise CheckpointError(f"{self.path}: malformed storage id {pid!r}")
        known = self.roots.setdefault(key, (storage_type.dtype, numel))
        if known[0] != storage_type.dtype:
            raise CheckpointError(f"{self.path}: storage {key} is named both as {known[0]} and {storage_type.dtype}")
        if view is None:
            return _StorageRef(key, storage_type.dtype, numel)
        view_key, offset, view_numel = view if isinstance(view, tuple) and len(view) == 3 else (None, -1, -1)
        if not (isinstance(view_key, str) and _is_count(offset) and _is_count(view_numel)):
            raise CheckpointError(f"{self.path}: malformed storage view {view!r}")
        return _StorageRef(key, storage_type.dtype, view_numel, offset)

    def root(self, key: str) -> tuple[np.dtype, int]:
        if key not in self.roots:
            raise CheckpointError(f"{self.path}: storage {key} is listed but no tensor refers to it")
        return self.roots[key]


class InertPlaceholder:
    """Stands in for a training-framework class (e.g. pytorch_lightning ModelCheckpoint) named in a pickle.

    Its pickled arguments and state are kept as plain data (`args`, `state`); none of the real class's code
    is imported or run. Subclasses are made per global; `global_name` says which one.
    """

    global_name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.global_name}>"


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _int_tuple(values: Any, what: str) -> tuple[int, ...]:
    values = tuple(values) if isinstance(values, (tuple, list)) else None
    if values is None or not all(_is_count(v) for v in values):
        raise CheckpointError(f"tensor {what} must be a tuple of non-negative ints")
    return values


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, expected a torch storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or not _is_count(offset):
        raise CheckpointError(f"tensor size {size}, stride {stride} and offset {offset!r} do not agree")
    return _TensorRef(storage, offset, size, stride, storage.dtype if dtype is None else dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """Newer dtypes (uint16/32/64, float8) are pickled as a byte storage plus an explicit torch dtype."""
    if not isinstance(dtype, _TorchDType):
        raise CheckpointError(f"tensor dtype {dtype!r} is not a supported torch dtype")
    return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


class _TorchDType(NamedTuple):
    """A torch dtype (torch.float32, ...) named in a pickle, as its numpy dtype (immutable, see _StorageType)."""

    name: str
    dtype: np.dtype


def _torch_size(values=()):
    return tuple(values)


def _torch_device(*args):
    return ":".join(str(a) for a in args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    """Protocol-2 pickles store bytes as `_codecs.encode(str, 'latin1')`; only string encoding is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return _codecs.encode(text, encoding, errors)


def _numpy_dtype(name, align=False, copy=False):
    """numpy.dtype for plain numeric types only (never object or structured dtypes); always a fresh copy,
    because pickle's BUILD then sets its byte order in place."""
    if not isinstance(name, str) or len(name) < 2 or name[0] not in "biufc" or not name[1:].isdigit():
        raise CheckpointError(f"numpy dtype {name!r} is not allowed (plain numeric dtypes only)")
    return np.dtype(name, False, True)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.names or dtype.hasobject:
        raise CheckpointError(f"numpy scalar of dtype {dtype!r} is not allowed")
    dtype = np.dtype(dtype.str)  # rebuilt from its type string: ignores anything BUILD may have set
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError(f"numpy scalar of dtype {dtype} with {type(data).__name__} data")
    return np.frombuffer(data, dtype=dtype)[0]


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
}


class _Allowed:
    """An allowed function as the unpickler hands it out: callable, but with no __dict__ and no attribute
    writes, so a pickle's BUILD opcode cannot alter it (or a later load) by setting attributes on it."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setattr__(self, name, value):
        raise CheckpointError(f"pickle tried to set attribute {name!r} on {self._fn.__name__}")

    def __repr__(self):
        return f"<allowed {self._fn.__name__}>"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    functions = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }
    allowed: dict[tuple[str, str], Any] = {key: _Allowed(fn) for key, fn in functions.items()}
    # Built-in (C) types: their attributes cannot be set from a pickle.
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for name, value in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("complex", complex)):
        allowed[("builtins", name)] = value
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.storage", "torch.cuda"):
            allowed[(module, name)] = _StorageType(name, np.dtype(dtype))
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDType(name, np.dtype(dtype))
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS` and inert placeholders; never imports a module."""

    def __init__(self, file, path: Path, persistent_load: Callable[[Any], Any]):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._persistent = persistent_load
        self._inert: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol < 3 pickles name Python 2 modules (__builtin__, commands, ...): use the Python 3 names.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module.split(".")[0] in INERT_PACKAGES:
            full = f"{module}.{name}"
            if full not in self._inert:
                namespace = {"global_name": full, "__qualname__": f"InertPlaceholder[{full}]"}
                self._inert[full] = type(name, (InertPlaceholder,), namespace)
            return self._inert[full]
        raise UnsafeCheckpointError(
            f"{self._path}: refusing to unpickle the global {module}.{name}: it is not needed to rebuild "
            f"tensors and could run code. Nothing from the file was run. Only torch tensor/storage "
            f"rebuilders, plain containers, numpy scalars and inert {'/'.join(INERT_PACKAGES)} classes are "
            f"allowed; re-save the weights as .safetensors from a trusted environment if you need this file."
        )

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)


def _unpickle(data: bytes | Any, path: Path, persistent_load: Callable[[Any], Any]) -> Any:
    """Unpickles one object from bytes or a binary file positioned at a pickle."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    return _RestrictedUnpickler(file, path, persistent_load).load()


# ---------------------------------------------------------------------------------------------------------
# Selecting the state dict and reading its tensors
# ---------------------------------------------------------------------------------------------------------


def _describe(mapping: Mapping) -> str:
    items = [f"{k!r} ({'tensor' if isinstance(v, _TensorRef) else type(v).__name__})" for k, v in mapping.items()]
    return ", ".join(items[:12]) + (f", ... ({len(items)} entries)" if len(items) > 12 else "")


def _select_state_dict(tree: Any, key: str | None, path: Path) -> dict[str, _TensorRef]:
    """The flat {name: tensor} mapping inside the unpickled object (see load_state_dict for the rules)."""
    if key is not None:
        if not isinstance(tree, Mapping) or key not in tree:
            found = _describe(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise CheckpointError(f"{path}: no top-level entry {key!r}; the file holds {found}")
        tree = tree[key]
    else:
        while isinstance(tree, Mapping) and not all(isinstance(v, _TensorRef) for v in tree.values()):
            wrapper = next((k for k in WRAPPER_KEYS if isinstance(tree.get(k), Mapping)), None)
            if wrapper is None:
                break
            tree = tree[wrapper]
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of tensors (a state dict), found {type(tree).__name__}")
    bad = {k: v for k, v in tree.items() if not (isinstance(k, str) and isinstance(v, _TensorRef))}
    if bad:
        raise CheckpointError(
            f"{path}: no state dict found: expected {{str: tensor}} (pass key= to pick a top-level entry); "
            f"non-tensor entries: {_describe(bad)}"
        )
    if not tree:
        raise CheckpointError(f"{path}: the state dict is empty")
    return dict(tree)


def _read_tree(tree: Any, key: str | None, whole_tree: bool, read: _StorageReader, byteorder: str,
               out_dtype: Any, path: Path) -> Any:
    """The selected state dict's arrays, or (whole_tree) the whole tree with its tensors read."""
    if not whole_tree:
        return _materialize(_select_state_dict(tree, key, path), read, byteorder, out_dtype, path)
    refs: dict[str, _TensorRef] = {}
    _walk_tree(tree, "", lambda name, ref: refs.setdefault(name, ref))
    arrays = _materialize(refs, read, byteorder, out_dtype, path)
    return _walk_tree(tree, "", lambda name, ref: arrays[name])


def _walk_tree(tree: Any, name: str, visit: Callable[[str, _TensorRef], Any]) -> Any:
    """A copy of `tree` (mappings as dicts, lists, tuples) with each tensor reference replaced by
    visit(its path, e.g. "['string_to_param']['*']", reference)."""
    if isinstance(tree, _TensorRef):
        return visit(name, tree)
    if isinstance(tree, Mapping):
        return {k: _walk_tree(v, f"{name}[{k!r}]", visit) for k, v in tree.items()}
    if isinstance(tree, _StorageRef):
        raise CheckpointError(f"{name or 'the file'} is a bare torch storage, not a tensor")
    if isinstance(tree, (list, tuple)):
        return type(tree)(_walk_tree(v, f"{name}[{i}]", visit) for i, v in enumerate(tree))
    return tree


class _StorageReader:
    """Reads each root storage once, as raw bytes sized from the pickle (numel * itemsize)."""

    def __init__(self, table: _StorageTable, read: Callable[[str, int], np.ndarray]):
        self._table, self._read, self._cache = table, read, {}

    def __call__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            dtype, numel = self._table.root(key)
            self._cache[key] = self._read(key, numel * dtype.itemsize)
        return self._cache[key]


def _materialize(
    refs: Mapping[str, _TensorRef], read: _StorageReader, byteorder: str, out_dtype: Any, path: Path
) -> dict[str, np.ndarray]:
    out, done = {}, {}  # done: id(ref) -> array, so tensors pickled once (tied weights) stay one array
    for name, ref in refs.items():
        if id(ref) not in done:
            done[id(ref)] = _output_array(_tensor_array(name, ref, read, byteorder, path), out_dtype)
        out[name] = done[id(ref)]
    return out


def _tensor_array(name: str, ref: _TensorRef, read: _StorageReader, byteorder: str, path: Path) -> np.ndarray:
    """Builds one tensor from its storage bytes, checking that size/stride/offset stay inside the storage."""
    storage, dtype = ref.storage, ref.dtype
    raw = read(storage.key)
    start = storage.offset * storage.dtype.itemsize
    stop = min(start + storage.numel * storage.dtype.itemsize, raw.size)
    window = raw[start:stop]
    available = window.size // dtype.itemsize
    flat = window[: available * dtype.itemsize].view(dtype)
    if byteorder == "big":
        flat = _big_endian_to_native(flat)
    numel = math.prod(ref.size)
    if numel == 0:
        return np.zeros(ref.size, dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= available:
        raise CheckpointError(
            f"{path}: tensor {name} (size {ref.size}, stride {ref.stride}, offset {ref.offset}) reaches "
            f"element {last}, but its storage {storage.key} holds {available} {dtype} elements (corrupt file?)"
        )
    if ref.offset == 0 and numel == available and _is_c_contiguous(ref.size, ref.stride):
        return flat.reshape(ref.size)  # the whole storage: no copy
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], shape=ref.size, strides=[s * dtype.itemsize for s in ref.stride], writeable=False
    )
    return np.array(view)


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _big_endian_to_native(flat: np.ndarray) -> np.ndarray:
    """Byte-swaps big-endian elements (complex numbers component by component)."""
    dtype = flat.dtype
    if dtype.itemsize == 1:
        return flat
    unit = np.dtype(f"f{dtype.itemsize // 2}") if dtype.kind == "c" else np.dtype(f"u{dtype.itemsize}")
    return flat.view(unit.newbyteorder(">")).astype(unit.newbyteorder("=")).view(dtype)


@contextlib.contextmanager
def small_pages():
    """Within the block, numpy does not advise the kernel to back its new large arrays with transparent huge pages
    (numpy's default, NUMPY_MADVISE_HUGEPAGE=1). Where the kernel's THP defrag setting is "madvise" (this
    machine's), every fault on such an array may compact memory first: reading full-size SD 1.5's fp16 UNet as
    float32 took 7.4 s with the advice and 3.2 s without (the fp16 -> fp32 casts 6.6 s -> 2.2 s). Process-wide
    numpy state, restored on exit; numpy without the switch (`_set_madvise_hugepage`, numpy >= 1.20) is unchanged."""
    switch = getattr(getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None)
    previous = switch(False) if switch is not None else None
    try:
        yield
    finally:
        if switch is not None:
            switch(previous)


def _output_dtype(keep_dtype: bool, dtype: Any) -> np.dtype | None:
    """What `_output_array` turns float tensors into: None keeps them, else a float dtype."""
    if keep_dtype and dtype is not None:
        raise ValueError("keep_dtype=True and dtype= exclude each other")
    out = None if keep_dtype else np.dtype(np.float32 if dtype is None else dtype)
    if out is not None and out not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(f"dtype {out}: checkpoints are read as float32 or bfloat16")
    return out


def _output_array(array: np.ndarray, out_dtype: np.dtype | None) -> np.ndarray:
    """`array` as read: low-precision floats (and float32, when out_dtype is bfloat16) become `out_dtype`, through
    float32, so a bfloat16 read is bit for bit the bfloat16 cast of the float32 read. Other dtypes as stored."""
    if out_dtype is None or array.dtype == out_dtype:
        return array
    if array.dtype in _LOW_PRECISION_FLOATS or array.dtype == np.float32:
        # exact for float32: every low-precision value is a float32 value
        return array.astype(np.float32, copy=False).astype(out_dtype, copy=False)
    return array


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory; expected a checkpoint file ({SAFETENSORS_EXTENSION}, "
            f"{', '.join(TORCH_EXTENSIONS)})"
        )
    return path
