"""Checkpoints: an orbax `CheckpointManager` with three named items per step.

- `state`: the TrainState (params, EMA params, optimiser state, step, rng key data), restored directly
  into the shardings of a target state;
- `config`: the run's config as JSON, so a checkpoint describes itself;
- `data`: the input pipelines' positions as JSON, `{"num_processes": P, "states": [state of process 0,
  ...]}` (each process's iterator `get_state()`, gathered to the primary process that writes JSON).

Saves happen every `every_steps` steps (and when forced, e.g. at the end), keep the last `keep`, and are
asynchronous: `save` returns once the arrays are copied off the devices, the files are written in the
background. Call `wait_until_finished()` (or `close()`) before the process exits.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ldm_jax.training.state import TrainState

ITEMS = ("state", "config", "data")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` config section: save interval (steps), how many to keep, async writes."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1 or self.keep < 1:
            raise ValueError(f"checkpoint: every_steps={self.every_steps} and keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns: the state, the saved config (JSON dict) and this process's
    data-iterator state (None when none was saved)."""

    step: int
    state: TrainState
    config: Any
    data_state: Any


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


def _allgather_json(value: Any) -> list[Any]:
    """Every process's `value` (JSON-able), in process order; a collective over all processes."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths)]


class Checkpointer:
    """Saves and restores (state, config, data position) under `directory` (one sub-directory per step)."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig()):
        options = ocp.CheckpointManagerOptions(save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep,
                                               enable_async_checkpointing=cfg.async_save, create=True)
        self.directory = os.path.abspath(directory)
        self.every_steps = cfg.every_steps
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

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
             force: bool = False) -> bool:
        """Saves at `step` if on the interval or `force`; returns whether it saved. Called by every process.

        `data_state` is this process's iterator state (JSON-able) or None.
        """
        data = {"num_processes": jax.process_count(), "states": _allgather_json(data_state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
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
            state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        data = out.data
        if data["num_processes"] != jax.process_count():
            raise ValueError(f"checkpoint {self.directory}/{step} holds data positions of {data['num_processes']} "
                             f"process(es); this run has {jax.process_count()}")
        return Restored(step=step, state=out.state, config=out.config,
                        data_state=data["states"][jax.process_index()])

    def wait_until_finished(self) -> None:
        """Blocks until every pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()
