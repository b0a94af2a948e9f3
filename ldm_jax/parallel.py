"""Parallelism, one mechanism: a `jax.sharding.Mesh` with axes ("data", "fsdp") and `NamedSharding`s.

- `make_mesh(data, fsdp)` lays `jax.devices()` out as a (data, fsdp) grid with Auto axis types (so XLA
  inserts the collectives; `jax.make_mesh` would default to Explicit axes).
- The batch's leading axis is split over both axes: every device trains on its share of the global batch.
- Parameters are placed by rules held as data: a sequence of `(regex, spec)` pairs matched with
  `re.search` against the "/"-joined parameter path (e.g. `down_blocks_0/resnets_1/conv1/kernel`); the
  first matching rule wins and every parameter must match one. `spec` is a PartitionSpec-like tuple
  (one entry per leading dimension: None, an axis name or a tuple of axis names) or the string
  `FSDP_AUTO`, which shards the largest dimension divisible by the fsdp size over "fsdp" (ties go to the
  later dimension, usually the output channels) and replicates when none divides.
- Several hosts: `initialize_distributed` first, then `host_local_to_global` turns each host's slice of
  the batch into one global array.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch's leading axis is split over every device
FSDP_AUTO = "fsdp_auto"
DEFAULT_PARAM_RULES: tuple[tuple[str, Any], ...] = ((".*", FSDP_AUTO),)

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` config section: axis sizes (-1 = all remaining devices) and the parameter rules."""

    data: int = -1
    fsdp: int = 1
    param_rules: tuple[tuple[str, Any], ...] = DEFAULT_PARAM_RULES

    def __post_init__(self):
        object.__setattr__(self, "param_rules", normalize_rules(self.param_rules))


def normalize_rules(rules: Sequence[Any]) -> tuple[tuple[str, Any], ...]:
    """Rules from a config (lists, PartitionSpecs) -> hashable `((regex, spec), ...)` with tuple specs.

    Raises ValueError naming the rule when it is not a (regex, spec) pair or the regex does not compile.
    """
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"param_rules[{i}] = {rule!r}: expected a (regex, spec) pair")
        pattern, spec = rule
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"param_rules[{i}]: bad regex {pattern!r}: {err}") from None
        if not isinstance(spec, str):
            spec = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
        out.append((pattern, spec))
    return tuple(out)


def make_mesh(data: int = -1, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes), Auto axis types.

    One of `data`/`fsdp` may be -1 (use the remaining devices); the product must equal the device count.
    Devices keep `jax.devices()` order with "fsdp" innermost, so an fsdp group is a run of neighbouring
    devices (the same host when groups are no larger than a host).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: data={data}, fsdp={fsdp}; expected positive sizes, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"make_mesh: {n} devices are not divisible by data={data}, fsdp={fsdp}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"make_mesh: data={sizes[0]} x fsdp={sizes[1]} != {n} devices")
    grid = np.array(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(cfg: MeshConfig) -> Mesh:
    """`make_mesh(cfg.data, cfg.fsdp)`."""
    return make_mesh(cfg.data, cfg.fsdp)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as the "/"-joined names the sharding rules match (`a/b_0/kernel`)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch leaf: leading axis split over ("data", "fsdp"), other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, keys, metrics)."""
    return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def spec_for(name: str, shape: Sequence[int], spec: Any, mesh: Mesh) -> P:
    """Validates one rule's `spec` for the array `name` of `shape`; resolves `FSDP_AUTO`.

    Raises ValueError naming the parameter when the spec has more entries than dimensions, names an
    axis the mesh lacks, or splits a dimension not divisible by the axis size.
    """
    shape = tuple(shape)
    if isinstance(spec, str) and spec == FSDP_AUTO:
        size = mesh.shape["fsdp"]
        if size == 1:
            return P()
        # Largest divisible dimension; on ties the later one (the output channels of kernels).
        candidates = [(d, i) for i, d in enumerate(shape) if d % size == 0]
        if not candidates:
            return P()
        _, dim = max(candidates)
        return P(*([None] * dim), "fsdp")
    if isinstance(spec, str):
        raise ValueError(f"sharding rule for {name!r}: spec {spec!r} is not a tuple of axis names or {FSDP_AUTO!r}")
    entries = tuple(tuple(e) if isinstance(e, list) else e for e in spec)  # also accepts a PartitionSpec
    if len(entries) > len(shape):
        raise ValueError(f"sharding rule for {name!r}: spec {entries} has more entries than shape {shape}")
    for dim, entry in enumerate(entries):
        if entry is None:
            continue
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis not in mesh.shape:
                raise ValueError(f"sharding rule for {name!r}: axis {axis!r} is not a mesh axis {tuple(mesh.shape)}")
        if shape[dim] % _axis_size(mesh, entry):
            raise ValueError(
                f"sharding rule for {name!r}: dimension {dim} of shape {shape} is not divisible by "
                f"{entry!r} (size {_axis_size(mesh, entry)})"
            )
    return P(*entries)


def param_specs(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
    """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs) from `(regex, spec)` rules.

    First matching rule (re.search on the "/"-joined path) wins; a parameter no rule matches is an error.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in normalize_rules(rules)]

    def one(path, leaf):
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return spec_for(name, leaf.shape, spec, mesh)
        raise ValueError(f"no sharding rule matches parameter {name!r}; rules: {[p for p, _ in rules]}")

    return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params: Any, rules: Sequence[tuple[str, Any]], mesh: Mesh) -> Any:
    """NamedShardings for a params pytree; see `param_specs`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's slice of the batch (numpy pytree, leading axis = local examples) into global
    arrays sharded by `batch_sharding(mesh)`. Process p holds the p-th contiguous block of the global batch.

    With one process the global batch is the local batch. The global leading size must divide by the
    device count.
    """
    sharding = batch_sharding(mesh)
    num_processes = jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        global_size = x.shape[0] * num_processes if x.ndim else 0
        if x.ndim == 0 or global_size % mesh.size:
            raise ValueError(
                f"batch leaf {path_str(path)!r}: local shape {x.shape} x {num_processes} process(es) gives a "
                f"global leading size of {global_size}, expected a multiple of the {mesh.size} devices"
            )
        return jax.make_array_from_process_local_data(sharding, x, (global_size, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, batch)


def fetch_replicated(tree: Any) -> Any:
    """Host numpy copy of a pytree of replicated global arrays (metrics), valid on every process."""
    def one(x):
        if not x.is_fully_replicated:
            raise ValueError(f"fetch_replicated: array of shape {x.shape} is sharded {x.sharding}, expected replicated")
        return np.asarray(x.addressable_data(0))

    return jax.tree.map(one, tree)


def resolve_distributed_args(coordinator: str | None = None, num_processes: int | None = None,
                             process_id: int | None = None,
                             environ: Mapping[str, str] | None = None) -> tuple[str | None, int | None, int | None]:
    """Flags first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; None where neither."""
    environ = os.environ if environ is None else environ

    def pick(value, var, cast):
        if value is not None:
            return value
        raw = environ.get(var)
        if raw in (None, ""):
            return None
        try:
            return cast(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}={raw!r} is not a valid {cast.__name__}") from None

    args = (pick(coordinator, "JAX_COORDINATOR_ADDRESS", str), pick(num_processes, "JAX_NUM_PROCESSES", int),
            pick(process_id, "JAX_PROCESS_ID", int))
    _check_distributed_args(*args)
    return args


def _check_distributed_args(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """ValueError naming the flag when an address is not host:port or a count / index is out of range."""
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator (JAX_COORDINATOR_ADDRESS) {coordinator!r}: expected host:port with a port in [1, 65535]")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes (JAX_NUM_PROCESSES) must be >= 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        bound = f"in [0, {num_processes})" if num_processes is not None else ">= 0"
        raise ValueError(f"--process_id (JAX_PROCESS_ID) must be {bound}, got {process_id}")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts `jax.distributed` before any other JAX call; returns whether it is running.

    Arguments come from the flags, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    When any is known, `jax.distributed.initialize` gets them (JAX detects the rest or raises). When
    nothing is given, JAX's own cluster detection runs (Slurm, Open MPI, Cloud TPU, ...); if it finds no
    cluster the run is single-process and nothing is started.
    """
    if jax.distributed.is_initialized():
        raise RuntimeError("initialize_distributed: jax.distributed is already initialized")
    args = resolve_distributed_args(coordinator, num_processes, process_id)
    if any(a is not None for a in args):
        jax.distributed.initialize(*args)
        return True
    try:
        jax.distributed.initialize()
    except ValueError as err:
        # JAX raises this exact complaint when auto-detection found no cluster to take an address from.
        if "coordinator_address should be defined" not in str(err):
            raise
        _log.debug("no distributed flags, environment or cluster found: running as a single process")
        return False
    return True
