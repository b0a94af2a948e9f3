"""`train_and_evaluate(config, workdir)`: runs the training stage a config names (`config.stage`).

Stages:
- "autoencoder" (`ldm_jax.training.train_autoencoder`): a KL or VQ first stage with the adversarial-perceptual
  loss; exports WORKDIR/autoencoder/ (a first-stage directory, `ldm_jax.model_dir`) at the end.
- "ldm" (`ldm_jax.training.train_ldm`): the diffusion model on a frozen first stage; exports WORKDIR/model/
  (a model directory `ldm_jax.model_dir.load_model` and sample.py read) at the end.

Both write under WORKDIR: checkpoints/ (orbax; a rerun with the same WORKDIR resumes), tensorboard/,
metrics.jsonl (one line per logged step) and images/ (reconstruction or sample grids as PNG).

Config sections shared by the stages (each becomes a frozen dataclass, so a misspelt field fails):
`data` (pipeline.DataConfig), `checkpoint` (checkpoint.CheckpointConfig), `mesh` (parallel.MeshConfig),
`optimizer` and `train` (stage-specific dataclasses, see each stage).
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import parallel
from ldm_jax.config import build_dataclass, load_config_file
from ldm_jax.data import pipeline
from ldm_jax.training.checkpoint import CheckpointConfig

STAGES = ("autoencoder", "ldm")
OVERRIDE_PREFIX = "--config."
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

log = logging.getLogger("ldm_jax.train")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
    """Runs `config.stage` in `workdir` (created if needed; resumed when it holds checkpoints).

    Returns the stage's result (`train_autoencoder.Result` / `train_ldm.Result`). Raises ValueError for an
    unknown stage or config field.
    """
    stage = config.get("stage")
    if stage not in STAGES:
        raise ValueError(f"config.stage is {stage!r}; expected one of {STAGES}")
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if stage == "autoencoder":
        from ldm_jax.training import train_autoencoder as module  # noqa: PLC0415 (each stage imports its own deps)
    else:
        from ldm_jax.training import train_ldm as module  # noqa: PLC0415
    return module.train_and_evaluate(config, workdir)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies `--config.a.b=value` overrides (also "--config.a.b value" pairs).

    Values are parsed by the field's type: strings verbatim, bools from true/false/1/0, numbers and tuples as
    Python literals. An unknown field, a value of the wrong type or a stray argument is a ValueError naming
    it and what was expected. Returns the locked ConfigDict.
    """
    config = load_config_file(path)
    args = list(overrides)
    while args:
        arg = args.pop(0)
        if not arg.startswith(OVERRIDE_PREFIX):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --config.section.field=value")
        name, sep, value = arg[len(OVERRIDE_PREFIX):].partition("=")
        if not sep:
            if not args:
                raise ValueError(f"override {arg!r} has no value (use {arg}=VALUE)")
            value = args.pop(0)
        apply_override(config, name, value)
    return config


def apply_override(config: ml_collections.ConfigDict, name: str, text: str) -> None:
    """Sets config field `name` ("a.b.c") from its command-line text (see `load_config`)."""
    *parents, leaf = name.split(".")
    node, where = config, "the config"
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"unknown config field {name!r}: {where} has no section {part!r} "
                             f"(it has {sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []})")
        node, where = node[part], f"section {part!r}"
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"unknown config field {name!r}: {where} has no field {leaf!r}; its fields are {keys}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ValueError(f"config field {name!r} is a section; override its fields ({name}.FIELD=VALUE)")
    kind = node.get_ref(leaf).get_type()
    value = _parse_value(name, text, kind)
    try:
        node[leaf] = value
    except TypeError as err:
        raise ValueError(f"config field {name!r}: cannot set {text!r}: {err}") from None


def _parse_value(name: str, text: str, kind: type | None) -> Any:
    if kind is str:
        return text
    if kind is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"config field {name!r} is a bool; got {text!r} (use true or false)")
        return lowered in ("true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if kind in (int, float, tuple, list):
            raise ValueError(f"config field {name!r} expects a {kind.__name__}; got {text!r}") from None
        return text  # a field without a fixed type (None so far): a plain string
    if kind in (tuple, list) and isinstance(value, (tuple, list)):
        return kind(value)
    return value


# ------------------------------------------------------------------------------------- shared by the stages


def section(cls: type, config: ml_collections.ConfigDict, name: str) -> Any:
    """The frozen dataclass `cls` of `config[name]` (defaults when the config has no such section)."""
    return build_dataclass(cls, config[name], where=name) if name in config else cls()


def compute_dtype(name: str) -> Any:
    """"float32" or "bfloat16" -> the jnp dtype (ValueError otherwise)."""
    if name not in DTYPES:
        raise ValueError(f"train.dtype is {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def run_options(train: Any) -> Any:
    """`ldm.RunOptions` from a train section's `attention`, `remat` and `dtype` (params stay float32);
    a bad value is a ValueError naming the train field."""
    from ldm_jax.ldm import RunOptions  # noqa: PLC0415
    from ldm_jax.models.attention import check_attention  # noqa: PLC0415
    from ldm_jax.models.layers import check_remat  # noqa: PLC0415

    return RunOptions(attention=check_attention(train.attention, "train.attention"),
                      remat=check_remat(train.remat, "train.remat"), dtype=compute_dtype(train.dtype))


def mesh_and_rules(config: ml_collections.ConfigDict):
    """(mesh, param_rules) from the `mesh` section: all devices of all processes, or, on one process, the
    first data x fsdp devices when both are given and their product is smaller (e.g. mesh.data=1 to train on
    one device, or to compare 1 with 8 devices); a warning says so."""
    cfg = section(parallel.MeshConfig, config, "mesh")
    wanted, available = cfg.data * cfg.fsdp, jax.device_count()
    if cfg.data > 0 and cfg.fsdp > 0 and wanted < available:
        if jax.process_count() > 1:
            raise ValueError(f"mesh data={cfg.data} x fsdp={cfg.fsdp} = {wanted} devices, but {jax.process_count()} "
                             f"processes hold {available}: a multi-host mesh uses every device (set data=-1)")
        log.warning("mesh data=%d x fsdp=%d: training on %d of the %d devices", cfg.data, cfg.fsdp, wanted, available)
        return parallel.make_mesh(cfg.data, cfg.fsdp, devices=jax.devices()[:wanted]), cfg.param_rules
    return parallel.mesh_from_config(cfg), cfg.param_rules


def checkpoint_config(config: ml_collections.ConfigDict) -> CheckpointConfig:
    """The `checkpoint` section."""
    return section(CheckpointConfig, config, "checkpoint")


def data_config(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> pipeline.DataConfig:
    """The `data` section; its batch_keys must be exactly `keys` (the arrays the stage trains on)."""
    cfg = section(pipeline.DataConfig, config, "data")
    if tuple(cfg.batch_keys) != tuple(keys):
        raise ValueError(f"data.batch_keys is {tuple(cfg.batch_keys)}; this stage trains on batches of exactly "
                         f"{tuple(keys)} (set --config.data.batch_keys accordingly)")
    return cfg


def eval_data_config(cfg: pipeline.DataConfig, split: str, num: int) -> pipeline.DataConfig:
    """A deterministic `num`-example, one-epoch variant of `cfg` on `split` (for fixed image grids)."""
    return dataclasses.replace(cfg, split=split, shuffle=False, global_batch_size=num, num_epochs=None,
                               drop_remainder=True)


def describe_outputs(workdir: pathlib.Path, stage: str, num_steps: int, extra: str = "") -> None:
    """Logs where the run writes (once, on the primary process)."""
    if jax.process_index() != 0:
        return
    log.info("stage %s: %d steps on %d device(s); workdir %s", stage, num_steps, jax.device_count(), workdir)
    log.info("  checkpoints: %s (resumed automatically)", workdir / "checkpoints")
    log.info("  TensorBoard: tensorboard --logdir %s", workdir / "tensorboard")
    log.info("  metrics:     %s", workdir / "metrics.jsonl")
    log.info("  image grids: %s", workdir / "images")
    if extra:
        log.info("  %s", extra)


def host_copy(tree: Any) -> Any:
    """numpy copies of a pytree of (possibly multi-host sharded) arrays; a collective when any is sharded, so
    every process calls it."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
