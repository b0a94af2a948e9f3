"""Checkpoints: an orbax `CheckpointManager` with three named items per step.

- `state`: the TrainState (params, EMA params, optimiser state, step, rng key data), restored directly
  into the shardings of a target state;
- `config`: the run's config as JSON, so a checkpoint describes itself;
- `data`: the input pipelines' positions and the run's training time as JSON, `{"num_processes": P, "states":
  [state of process 0, ...], "train_seconds": T}` (each process's iterator `get_state()`, gathered to the primary
  process that writes JSON; T: the cumulative training time of every run of the workdir up to this step, which
  `loop.train_loop` counts against `train.max_train_seconds`; absent in checkpoints written before it: 0).

The state is written by orbax's PyTree handler with a registry of its own whose jax.Array handler saves
replica-parallel only across processes: within one process every replica is on this host anyway, and orbax's
default (replica-parallel on every non-GPU platform) compiles a slicing program per (shape, device) on each save
(216 programs for the tiny SDXL test model on 8 CPU devices, more time than the save itself).

Saves happen every `every_steps` steps (and when forced, e.g. at the end), keep the last `keep` (at least 2,
so a corrupt newest one has one to fall back to), and are asynchronous: `save` returns once the arrays are
copied off the devices, the files are written in the background. Call `wait_until_finished()` (or `close()`)
before the process exits.

Corrupt checkpoints (`restore_newest`, what the train loop resumes with): a step that cannot be restored (a
truncated data file, an empty manifest or metadata file, ...) is logged as one warning line naming the step and
why, and the next older step is tried. Once one restores, the newer broken ones are moved (never deleted) into
`<directory>/corrupt/<step>` by the primary process, out of orbax's view, so the step can be saved again. When
none restores nothing is moved (the cause may be this run's own target: another model config, another number
of processes) and `CheckpointRestoreError` says why the newest failed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ldm_jax.training.state import TrainState

ITEMS = ("state", "config", "data")
CORRUPT_DIR = "corrupt"

_log = logging.getLogger(__name__)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's PyTree handler for the `state` item (module docstring): its standard numeric handlers, with
    replica-parallel array writes only when there are several processes."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _manager(directory: str, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": _state_handler(), "config": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a directory that holds some can be restored (the message says why the newest failed)."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` config section: save interval (steps), how many to keep, async writes."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps={self.every_steps}; expected >= 1")
        if self.keep < 2:
            raise ValueError(f"checkpoint.keep={self.keep}; expected >= 2, so that a corrupt newest checkpoint has "
                             "an older one to fall back to")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns: the state, the saved config (JSON dict), this process's
    data-iterator state (None when none was saved) and the cumulative training time in seconds up to this step
    (0.0 for checkpoints written before it was stored)."""

    step: int
    state: TrainState
    config: Any
    data_state: Any
    train_seconds: float = 0.0


def config_to_json(config: Any) -> Any:
    """A ConfigDict or JSON-able mapping -> plain JSON data; a clear error for anything else."""
    if config is None:
        return None
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    try:
        return json.loads(json.dumps(config))
    except TypeError as err:
        raise TypeError(f"checkpoint config must be a ConfigDict or JSON-serialisable: {err}") from None


def allgather_json(value: Any) -> list[Any]:
    """Every process's `value` (JSON-able), in process order; a collective over all processes."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths)]


def sync_processes(name: str) -> None:
    """A barrier over all processes (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _all_processes_true(flag: bool) -> bool:
    """Whether `flag` is true on every process; a collective over all processes."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).all())


class _AbandonedOrbaxReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records of orbax's reads (the message names the
    coroutine's file, under orbax/)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Task exception was never retrieved" in message and "orbax" in message)


def _closed_loop_filter(previous: Any) -> Any:
    """An unraisable hook that drops RuntimeError('Event loop is closed') and passes the rest to `previous`."""
    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop = True
    return hook


def quiet_abandoned_reads() -> None:
    """After a restore fails, orbax's other reads of that step end on its closed event loop: TensorStore reports
    each as an unraisable "Event loop is closed" RuntimeError and asyncio logs each abandoned task with a
    traceback (hundreds of lines for one empty manifest.ocdbt). Drops exactly those, for the rest of the process
    (installed once; the failure itself is reported in one line by `restore_newest`)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedOrbaxReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedOrbaxReads())
    if not getattr(sys.unraisablehook, "drops_closed_loop", False):
        sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of the chain Python would print (orbax wraps TensorStore's, which names the file)."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def restore_failure(step_dir: str | os.PathLike, error: BaseException) -> str:
    """Why `step_dir` did not restore, in one line: the innermost error's type and first line, and the step's
    empty files (a JSON error does not name its file)."""
    error = _root_cause(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = next((line for line in lines if not line.startswith(("Traceback", "File "))), "")
    why = f"{type(error).__name__}: {first}" if first else type(error).__name__
    root = pathlib.Path(step_dir)
    empty = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.stat().st_size == 0)
    return why + (f" (empty files: {', '.join(empty[:5])})" if empty else "")


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The steps `directory` holds, ascending ([] when it does not exist); reads only, creates nothing. A run
    whose checkpoint directory holds some resumes, so it builds its state only as the restore target."""
    if not os.path.isdir(directory):
        return []
    manager = _manager(os.path.abspath(directory), ocp.CheckpointManagerOptions(read_only=True))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


class Checkpointer:
    """Saves and restores (state, config, data position) under `directory` (one sub-directory per step)."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig()):
        options = ocp.CheckpointManagerOptions(save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep,
                                               enable_async_checkpointing=cfg.async_save, create=True)
        self.directory = os.path.abspath(directory)
        self.every_steps = cfg.every_steps
        self._manager = _manager(self.directory, options)

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every step kept on disk, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `step` is on the save interval (a multiple of `every_steps`)."""
        return step % self.every_steps == 0

    def save(self, step: int, state: TrainState, *, config: Any = None, data_state: Any = None,
             force: bool = False, train_seconds: float = 0.0) -> bool:
        """Saves at `step` if on the interval or `force`; returns whether it saved. Called by every process.

        `data_state` is this process's iterator state (JSON-able) or None. `train_seconds`: the cumulative
        training time up to `step` (the same on every process: the primary process writes it).
        """
        data = {"num_processes": jax.process_count(), "states": allgather_json(data_state),
                "train_seconds": float(train_seconds)}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  config=ocp.args.JsonSave(config_to_json(config)), data=ocp.args.JsonSave(data))
        return self._manager.save(step, args=args, force=force)

    def restore(self, target: TrainState, step: int | None = None) -> Restored:
        """Restores `step` (default: the latest) into the structure, dtypes and shardings of `target`.

        `target` may be a live state or `ldm_jax.training.state.abstract_state(...)` of one. Raises
        FileNotFoundError when there is no checkpoint, ValueError when the data positions were saved by a
        different number of processes.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
            config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        data = out.data
        if data["num_processes"] != jax.process_count():
            raise ValueError(f"checkpoint {self.directory}/{step} holds data positions of {data['num_processes']} "
                             f"process(es); this run has {jax.process_count()}")
        return Restored(step=step, state=out.state, config=out.config,
                        data_state=data["states"][jax.process_index()],
                        train_seconds=float(data.get("train_seconds", 0.0)))

    def restore_newest(self, target: TrainState) -> Restored | None:
        """Restores the newest step that restores (see the module docstring); None when there is no checkpoint.

        Newer steps that fail are moved to `<directory>/corrupt/` once an older one restored, each logged as one
        line. Called by every process; a step counts as restored only when it restored on every process. Raises
        CheckpointRestoreError when no step restores (nothing is moved then).
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                restored, why = self.restore(target, step), ""
            except Exception as err:  # orbax/tensorstore/json raise many kinds; each means "this step is unusable"
                quiet_abandoned_reads()
                restored, why = None, restore_failure(os.path.join(self.directory, str(step)), err)
            if _all_processes_true(restored is not None):
                self._set_aside(failed, step)
                return restored
            failed.append((step, why or "it did not restore on another process"))
        if not failed:
            return None
        newest, why = failed[0]
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} restores (steps {sorted(s for s, _ in failed)}); the newest, step "
            f"{newest}: {why}. Nothing was moved: fix the cause, or move the folder away to start from scratch")

    def _set_aside(self, failed: list[tuple[int, str]], resumed: int) -> None:
        """Moves the step directories of `failed` ((step, why) pairs) into `<directory>/corrupt/` (the primary
        process, which logs one line each; the others wait) and makes the manager forget them."""
        if not failed:
            return
        if jax.process_index() == 0:
            corrupt = pathlib.Path(self.directory) / CORRUPT_DIR
            corrupt.mkdir(exist_ok=True)
            for step, why in failed:
                dest, n = corrupt / str(step), 1
                while dest.exists():
                    dest, n = corrupt / f"{step}.{n}", n + 1
                os.replace(os.path.join(self.directory, str(step)), dest)
                _log.warning("checkpoint step %d in %s cannot be restored (%s); moved it to %s and resuming from "
                             "step %d", step, self.directory, why, dest, resumed)
        sync_processes("checkpoint_set_aside")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until every pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()
