"""Training: `main(argv)` (what `train.py` and `ldm-jax train` run) and `train_and_evaluate(config, workdir)`,
which runs the training stage a config names (`config.stage`).

    train.py --config configs/X.py[:ARG] --workdir DIR [--config.a.b=value ...]
             [--coordinator host:port --num_processes N --process_id I]

Stages:
- "autoencoder" (`ldm_jax.training.train_autoencoder`): a KL or VQ first stage with the adversarial-perceptual
  loss; exports WORKDIR/autoencoder/ (a first-stage directory, `ldm_jax.store.save_first_stage`) at the end.
- "ldm" (`ldm_jax.training.train_ldm`): the diffusion model on a frozen first stage; exports WORKDIR/model/
  (a model directory that `ldm_jax.store.load_model` and `ldm-jax sample` read) at the end.

`train.max_train_seconds` (both stages) stops a run once its cumulative training time reaches a budget; rerun the
same WORKDIR with a larger one to continue (e.g. evaluate at 5, 10, 20 minutes of training: budgets 300, 600,
1200 in turn; `loop.TrainTime` says what is counted).
Both write under WORKDIR: checkpoints/ (orbax; a rerun with the same WORKDIR resumes from the newest checkpoint
that restores: one that does not is logged and moved to checkpoints/corrupt/, and when none restores the command
stops with a one-line error instead of starting over), tensorboard/, metrics.jsonl (one line per logged step;
`data/skipped_images` counts the unreadable images the data source skipped) and images/ (reconstruction or sample
grids as PNG).
The command keeps its compiled programs in the persistent compilation cache (`ldm_jax.compile_cache`: a rerun
or a resumed run of the same config reads them back); `--config.train.compile_cache=false` turns it off.

Config sections shared by the stages (each becomes a frozen dataclass, so a misspelt field fails):
`data` (pipeline.DataConfig), `checkpoint` (checkpoint.CheckpointConfig), `mesh` (parallel.MeshConfig),
`optimizer` (optim.OptimizerConfig; the autoencoder's adds a discriminator rate) and `train` (per stage).

Overrides are `ml_collections.config_flags`'s, parsed with a private `absl.flags.FlagValues` (so `load_config`
is a plain library call and `main` works inside a subcommand CLI): `--config.a.b=value` or `--config.a.b value`,
values parsed by the field's type (strings verbatim; bools true/false, or `--config.a.flag` /
`--config.a.noflag`; numbers; tuples as `(1, 2)`, `1,2` or a repeated flag), `--config=FILE:ARG` passes ARG to
`get_config`. An unknown field, a value of the wrong type or a stray argument is a ValueError naming it
(`main`: one line `PROG: error: ...`, exit status 2). What config_flags cannot do, which the hand-written
parser it replaced could: set a field to None from the command line (`--config.train.ema_decay=None` is
refused as "not a float"; write a config file, or use a config field meaning "off" such as 0).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from ldm_jax import parallel
from ldm_jax.cli import one_line, writable_dir
from ldm_jax.config import build_dataclass
from ldm_jax.data import pipeline
from ldm_jax.training.checkpoint import CheckpointConfig, CheckpointRestoreError

STAGES = ("autoencoder", "ldm")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")

log = logging.getLogger("ldm_jax.train")


def main(argv: Sequence[str] | None = None, *, prog: str = "train.py") -> int:
    """The training command: parses `argv` (the arguments after the program name; None: sys.argv[1:]), loads
    the config with its overrides, joins the other hosts (`parallel.initialize_distributed`: the flags or the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) and runs `train_and_evaluate`.

    Returns the exit status: 0 after training, 1 when training diverged (a NaN / inf loss or gradient: one line
    naming the step and the last good checkpoint), 2 after a user error, printed as one line `PROG: error: ...` on
    stderr: in the arguments (a missing or broken config file, an unknown config field, a value of the wrong
    type, a stray argument, a missing --workdir; found before JAX starts) or a `ConfigError` (a value the stage
    refuses, found while the stage is built; a workdir that cannot be written; missing or unreadable data or
    files the config names; checkpoints none of which restores).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv):
        print(f"{prog}: {__doc__.strip()}\n\nflags:\n{_flag_values(argv, run_flags=True).module_help(__name__)}")
        return 0
    try:
        fv = _parse([prog, *argv], run_flags=True)
        if not fv.workdir:
            raise ValueError("--workdir is required: the folder for checkpoints, logs, image grids and the export")
        parallel.resolve_distributed_args(fv.coordinator, fv.num_processes, fv.process_id)  # checks the flags
    except (ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ldm_jax").setLevel(logging.INFO)  # our progress lines; libraries stay at warnings
    parallel.initialize_distributed(fv.coordinator, fv.num_processes, fv.process_id)
    from ldm_jax import compile_cache  # noqa: PLC0415

    train = fv.config.get("train") or {}
    log.info("%s", compile_cache.setup(bool(train.get("compile_cache", True)),
                                       switch="train.compile_cache=false"))  # before anything compiles
    try:
        train_and_evaluate(fv.config, fv.workdir)
    except ConfigError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # loop.NonFiniteError: the run diverged (not a usage error: status 1)
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


class ConfigError(ValueError):
    """The user's error, found before or while training: a config value the stage refuses (a bad dtype,
    batch_keys that do not fit the stage, a resolution the first stage cannot divide, ...; raised while the stage
    is built), a workdir that cannot be written, data or files the config names that are missing or unreadable,
    or checkpoints none of which restores. `main` prints it as one line `PROG: error: ...` with exit status 2."""


def build_stage(build: Any, *args: Any) -> Any:
    """`build(*args)` (a stage module's `build_stage`: it parses and checks every section), its ValueErrors and
    OSErrors (a missing tokenizer directory, ...) raised as ConfigError."""
    return user_input("", build, *args)


def user_input(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` for something that reads what the user named (the data, a file of the config):
    its ValueErrors and OSErrors raised as ConfigError "what: why" (the readers' messages name the path)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except (ValueError, OSError) as err:
        raise ConfigError(f"{what}: {one_line(err)}" if what else one_line(err)) from err


def check_data(data: pipeline.DataConfig, eval_split: str) -> None:
    """ConfigError unless the data a config names is there (`pipeline.check_source`: cheap, nothing is indexed
    or decoded), the TFDS eval split too."""
    user_input("data", pipeline.check_source, data)
    if eval_split and eval_split != data.split and data.source == "tfds":
        user_input(f"train.eval_split={eval_split!r}", pipeline.check_source,
                   dataclasses.replace(data, split=eval_split))


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates `workdir` (and its parents) and checks that a file can be written in it (`cli.writable_dir`);
    returns its absolute path. Raises ConfigError naming it and why (an existing file, a parent that is a file,
    no permission, ...)."""
    try:
        return writable_dir(pathlib.Path(workdir).absolute(), "workdir")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
    """Runs `config.stage` in `workdir` (created if needed; resumed when it holds checkpoints).

    Returns the stage's result (`train_autoencoder.Result` / `train_ldm.Result`). Raises ConfigError (a
    ValueError) for the user's errors (see ConfigError): an unknown stage, a config value the stage refuses, an
    unusable workdir, data that cannot be read, no checkpoint that restores.
    """
    stage = config.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"config.stage is {stage!r}; expected one of {STAGES}")
    if stage == "autoencoder":
        from ldm_jax.training import train_autoencoder as module  # noqa: PLC0415 (each stage imports its own deps)
    else:
        from ldm_jax.training import train_ldm as module  # noqa: PLC0415
    workdir = pathlib.Path(workdir).absolute()
    user_input("", module.check_inputs, config, workdir)  # the data and files it names, before anything is built
    workdir = prepare_workdir(workdir)
    try:
        return module.train_and_evaluate(config, workdir)
    except (pipeline.DataError, CheckpointRestoreError) as err:
        raise ConfigError(one_line(err)) from err


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file (`path`, or "path:ARG" for `get_config(ARG)`) and applies `--config.a.b=value`
    overrides (also "--config.a.b value" pairs) with `ml_collections.config_flags` (see the module docstring).

    Returns the locked ConfigDict. Raises FileNotFoundError for a missing file and ValueError, naming the
    field, for an unknown field, a value of the wrong type, a stray argument or a broken config file.
    """
    return _parse(["load_config", f"--config={os.fspath(path)}", *overrides], run_flags=False).config


def _flag_values(argv: Sequence[str], *, run_flags: bool) -> flags.FlagValues:
    """A private FlagValues with the config flag (overrides read from `argv`) and, with run_flags, main's."""
    # config_flags loads every config file as the module "config_config" with the deprecated load_module(),
    # which reuses an earlier module of that name: a second file would see the first one's names.
    sys.modules.pop("config_config", None)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py, or FILE:ARG)",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    if run_flags:
        flags.DEFINE_string("workdir", None, "checkpoints, logs, image grids and the export go here", flag_values=fv)
        flags.DEFINE_string("coordinator", None, "jax.distributed coordinator address host:port", flag_values=fv)
        flags.DEFINE_integer("num_processes", None, "number of processes (hosts)", flag_values=fv)
        flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)
    return fv


def _parse(argv: Sequence[str], *, run_flags: bool) -> flags.FlagValues:
    """Parses argv[1:] (argv[0] is the program name) into a fresh FlagValues; errors as ValueError /
    FileNotFoundError with one-line messages naming the config file, flag or config field."""
    path = _config_path(argv)
    if path is None:
        raise ValueError("--config is required: a training config file (configs/*.py)")
    if not pathlib.Path(path.split(":", 1)[0]).is_file():
        raise FileNotFoundError(f"config file {path.split(':', 1)[0]} does not exist")
    fv = _flag_values(argv, run_flags=run_flags)
    try:
        rest = _call(fv, argv)
    except Exception as err:  # config_flags raises several kinds; _diagnose names the cause in one line
        raise ValueError(_diagnose(path, argv, err)) from err
    if len(rest) > 1:
        raise ValueError(f"unexpected argument {rest[1]!r}; overrides look like --config.section.field=value")
    if not isinstance(fv.config, ml_collections.ConfigDict):
        raise ValueError(f"config file {path}: get_config() returned {type(fv.config).__name__}, not a ConfigDict")
    return fv


def _diagnose(path: str, argv: Sequence[str], err: Exception) -> str:
    """One line saying why parsing `argv` failed: the config file itself (it does not load), an override naming
    no field of it, or the flag error (a value of the wrong type, an unknown flag)."""
    if isinstance(err, flags.Error) and "Error whilst parsing config file" not in str(err):
        return one_line(err)
    try:
        plain = ["load_config", f"--config={path}"]
        fv = _flag_values(plain, run_flags=False)
        _call(fv, plain)
        config = fv.config
    except Exception as load_err:  # the file itself is broken (does not import, get_config() raised)
        text = str(load_err).strip()
        if "Error whilst parsing config file" in text:  # config_flags put get_config's traceback in the message
            return f"config file {path}: {text.splitlines()[-1]}"  # its last line: "ValueError: why"
        return f"config file {path}: {type(load_err).__name__}: {one_line(load_err)}"
    return _unknown_field(config, argv) or one_line(err)


def _call(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """fv(argv) -> the unparsed arguments, without config_flags's deprecation warning about load_module()."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        return fv(list(argv))


def _config_path(argv: Sequence[str]) -> str | None:
    """The value of --config in argv (`--config=X` or `--config X`), as config_flags finds it."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            return arg.split("=", 1)[1]
        if re.match(r"^--?config$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_field(config: ml_collections.ConfigDict, argv: Sequence[str]) -> str | None:
    """The message for the first override in argv that names no field of `config`."""
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match:
            continue
        name = match.group(1)
        *parents, leaf = name.split(".")
        node, where = config, "the config"
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f"unknown config field {name!r}: {where} has no section {part!r} (it has {keys})"
            node, where = node[part], f"section {part!r}"
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return f"unknown config field {name!r}: {where} has no field {leaf!r}; its fields are {keys}"
    return None


# ------------------------------------------------------------------------------------- shared by the stages


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` fields both stages have (each stage's `train` dataclass extends this one).

    num_steps: train steps (optimiser updates; the autoencoder's: generator + discriminator iterations);
    log_every / image_every: scalar and image-grid intervals; num_images: images per grid (a multiple of the
    device count), from `eval_split` of the data ("" = the training split); dtype: "float32" or "bfloat16"
    compute (params stay float32); attention / remat: the run-time options of the modules (`ldm.RunOptions`,
    never saved with a model); compile_cache: the command (`main`) keeps compiled programs in the persistent
    compilation cache (`ldm_jax.compile_cache`; false: it does not); max_train_seconds: a wall-clock training
    budget in seconds, 0 for none: the run stops (checkpoint and export as at num_steps) after the first step at
    which the workdir's cumulative training time reaches it, and a rerun with a larger one continues
    (`loop.TrainTime`: what is counted).
    """

    num_steps: int = 1000
    seed: int = 0
    log_every: int = 50
    image_every: int = 1000
    num_images: int = 16
    eval_split: str = "validation"
    dtype: str = "float32"
    attention: str = "xla"
    remat: bool | str = False
    progress_bar: bool = True
    compile_cache: bool = True
    max_train_seconds: float = 0.0

    def __post_init__(self):
        for name in ("num_steps", "log_every", "image_every", "num_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}; expected an integer >= 1")
        if not self.max_train_seconds >= 0:
            raise ValueError(f"train.max_train_seconds={self.max_train_seconds}; expected >= 0 (0: no budget)")
        if self.seed < 0:
            raise ValueError(f"train.seed={self.seed}; expected >= 0")


def section(cls: type, config: ml_collections.ConfigDict, name: str) -> Any:
    """The frozen dataclass `cls` of `config[name]` (defaults when the config has no such section)."""
    return build_dataclass(cls, config[name], where=name) if name in config else cls()


def run_options(train: Any) -> Any:
    """`ldm.RunOptions` from a train section's `attention`, `remat` and `dtype` (params stay float32), through
    `ldm.run_options`; a bad value is a ValueError naming the train field."""
    from ldm_jax import ldm  # noqa: PLC0415

    return ldm.run_options(attention=train.attention, remat=train.remat, dtype=train.dtype, where="train.")


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
