"""The generic train step builder and train loop that every stage (autoencoder, LDM) plugs into.

Train step contract: a pure `(state, batch, key) -> (state, metrics)`, jitted once with the state donated
and explicit shardings (state: its rules; batch: leading axis over ("data", "fsdp"); key and metrics:
replicated). `make_train_step(loss_fn, ...)` builds it from `loss_fn(params, batch, key) -> (loss, aux)`
with `aux` a dict of scalar metrics. The step's randomness is `fold_in(key, state.step)`, then
`fold_in(., micro_batch_index)` per micro-batch. Metrics: loss, the aux metrics, grad_norm (before
clipping), param_norm (after the update) and, when given the schedule, learning_rate.

`train_loop` restores the latest checkpoint when there is one (state and data position), then runs the
steps: progress bar with loss and images/s, scalars to TensorBoard + JSONL every `log_every` steps,
periodic hooks whose images are logged, checkpoints every `checkpoint.every_steps` and at the end. A
non-finite metric at a log step or a non-finite state at a save step stops the run with
`NonFiniteError`; no non-finite state is ever saved, so the last checkpoint stays good.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import parallel
from ldm_jax.training import logging as metric_logging
from ldm_jax.training.checkpoint import CheckpointConfig, Checkpointer
from ldm_jax.training.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
TrainStep = Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]

_log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step, the offending values and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """A periodic callback: every `every_steps` steps `fn(state, step)` returns images to log,
    `{name: (N, H, W, C) array in [-1, 1]}` (numpy or jax arrays; may be empty). It runs on every process."""

    every_steps: int
    fn: Callable[[TrainState, int], Mapping[str, Any]]


def _split_micro_batches(batch: Any, num: int) -> Any:
    """(B, ...) leaves -> (num, B // num, ...): micro-batch j takes examples j, j + num, j + 2 num, ...

    The strided split keeps every micro-batch spread over all devices (each device's block of the batch
    holds an equal share of every micro-batch), so no data moves between devices.
    """
    def one(path, x):
        if x.ndim == 0 or x.shape[0] % num:
            raise ValueError(f"batch leaf {parallel.path_str(path)!r} of shape {x.shape}: leading size is not "
                             f"divisible by accumulate_grad_batches={num}")
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map_with_path(one, batch)


def make_train_step(loss_fn: LossFn, *, mesh: Mesh, state_shardings: TrainState, accumulate_grad_batches: int = 1,
                    learning_rate_fn: optax.Schedule | None = None, frozen: Any = None) -> TrainStep:
    """Builds the jitted train step `(state, batch, key) -> (state, metrics)` around `loss_fn`.

    loss_fn(params, batch, key) -> (scalar loss, {name: scalar}); called once per micro-batch, its
    gradients averaged in float32 over `accumulate_grad_batches` micro-batches (a `lax.scan`).
    state_shardings: the state's shardings (`ldm_jax.training.state.shardings_of(state)`).
    frozen: optional pytree of arrays the loss reads but does not train (a frozen first stage); then
      loss_fn(params, batch, key, frozen) is called, and the arrays enter the jitted step as an argument
      with their own shardings (not as compile-time constants). Not donated.
    The state argument is donated: do not use the state passed in after the call.
    """
    num = accumulate_grad_batches
    if num < 1:
        raise ValueError(f"accumulate_grad_batches={num}, expected >= 1")
    micro_sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Any, key: jax.Array, frozen_args: tuple = ()):
        step_key = jax.random.fold_in(key, state.step)
        micro = jax.lax.with_sharding_constraint(_split_micro_batches(batch, num), micro_sharding)

        def body(grad_sum, xs):
            index, micro_batch = xs
            (loss, aux), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_key, index), *frozen_args)
            for name, value in {"loss": loss, **aux}.items():
                if jnp.shape(value) != ():
                    raise ValueError(f"loss_fn metric {name!r} has shape {jnp.shape(value)}, expected a scalar")
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
            return grad_sum, (loss, dict(aux))

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, state_shardings.params)
        if num == 1:  # no loop: XLA:CPU ran the shapes LDM step 4x slower inside a (even 1-trip, unrolled) scan
            grad_sum, (loss, aux) = body(zeros, (jnp.zeros((), jnp.int32), jax.tree.map(lambda x: x[0], micro)))
            losses, aux = loss[None], jax.tree.map(lambda v: v[None], aux)
        else:
            grad_sum, (losses, aux) = jax.lax.scan(body, zeros, (jnp.arange(num), micro))
        grads = jax.tree.map(lambda g, p: (g / num).astype(p.dtype), grad_sum, state.params)
        new_state = state.apply_gradients(grads)
        metrics = {"loss": losses.astype(jnp.float32).mean(),
                   **{name: v.astype(jnp.float32).mean() for name, v in aux.items()},
                   "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(new_state.params)}
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return new_state, metrics

    rep = parallel.replicated(mesh)
    if frozen is None:
        return jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh), rep),
                       out_shardings=(state_shardings, rep), donate_argnums=0)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    jitted = jax.jit(step, in_shardings=(state_shardings, parallel.batch_sharding(mesh), rep, (frozen_shardings,)),
                     out_shardings=(state_shardings, rep), donate_argnums=0)
    return lambda state, batch, key: jitted(state, batch, key, (frozen,))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _state_is_finite(state: Any) -> bool:
    return bool(parallel.fetch_replicated(_all_finite(state)))


def _base_key(state: TrainState, mesh: Mesh) -> jax.Array:
    # A copy: the state's own buffers are donated to every step.
    copy = jax.jit(lambda r: jax.random.wrap_key_data(r.copy()), out_shardings=parallel.replicated(mesh))
    return copy(state.rng)


def train_loop(state: TrainState, train_step: TrainStep, batches: Iterator[Any], *, num_steps: int,
               workdir: str | os.PathLike, mesh: Mesh, checkpoint: CheckpointConfig = CheckpointConfig(),
               config: Any = None, log_every: int = 50, hooks: Sequence[Hook] = (),
               progress_bar: bool = True) -> TrainState:
    """Trains `state` up to `num_steps` steps and returns the final state; resumes from `workdir` if possible.

    batches: an iterator of host-local batches (numpy pytrees, this process's contiguous share of the global
      batch, leading axis = examples) with `get_state()` / `set_state(s)` (JSON-able), checkpointed with the
      state so a resumed run sees the same batches.
    state: a freshly initialised state; when `workdir/checkpoints` holds a checkpoint it is only the restore
      target (structure and shardings). A TrainState, or any pytree dataclass with an `rng` field of key data
      (a stage with several optimisers brings its own state and step).
    config: saved as JSON in each checkpoint.
    Raises NonFiniteError (after waiting for pending saves) when a loss/metric or the state is NaN/Inf.
    """
    for method in ("get_state", "set_state"):
        if not callable(getattr(batches, method, None)):
            raise TypeError(f"train_loop: the batch iterator {type(batches).__name__} has no {method}(); the data "
                            "position must be checkpointed for an exact resume")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), checkpoint)
    start = 0
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(state)
        state, start = restored.state, restored.step
        batches.set_state(restored.data_state)
        _log.info("resumed from %s/%d", ckpt.directory, start)
    writer = metric_logging.MetricWriter(workdir, start_step=start)
    bar = metric_logging.ProgressBar(num_steps, initial=start, enabled=progress_bar and jax.process_index() == 0)
    key = _base_key(state, mesh)
    try:
        state = _run(state, train_step, batches, key, start=start, num_steps=num_steps, mesh=mesh, ckpt=ckpt,
                     config=config, log_every=log_every, hooks=hooks, writer=writer, bar=bar)
    finally:
        bar.close()
        writer.close()
        ckpt.close()  # waits for pending saves
    return state


def _run(state, train_step, batches, key, *, start, num_steps, mesh, ckpt, config, log_every, hooks, writer, bar):
    last_time, last_step, examples = time.perf_counter(), start, 0
    for step in range(start, num_steps):
        try:
            host_batch = next(batches)
        except StopIteration:
            raise RuntimeError(f"the batch iterator ran out after {step} of {num_steps} steps") from None
        batch = parallel.host_local_to_global(host_batch, mesh)
        examples += jax.tree.leaves(batch)[0].shape[0]
        state, metrics = train_step(state, batch, key)
        done = step + 1

        if done % log_every == 0 or done == num_steps:
            scalars = parallel.fetch_replicated(metrics)
            bad = {name: float(v) for name, v in scalars.items() if not np.isfinite(v)}
            if bad:
                _stop(ckpt, f"non-finite metrics at step {done}: {bad}")
            now = time.perf_counter()
            images_per_sec = examples / max(now - last_time, 1e-9)
            writer.write_scalars(done, {**scalars, "images_per_sec": images_per_sec,
                                        "steps_per_sec": (done - last_step) / max(now - last_time, 1e-9)})
            bar.update(done, loss=float(scalars["loss"]), images_per_sec=images_per_sec)
            last_time, last_step, examples = now, done, 0

        for hook in hooks:
            if done % hook.every_steps == 0:
                images = hook.fn(state, done)
                writer.write_images(done, {name: _to_host(v) for name, v in images.items()})

        if ckpt.should_save(done) or done == num_steps:
            if not _state_is_finite(state):
                _stop(ckpt, f"non-finite parameters or optimiser state at step {done}")
            ckpt.save(done, state, config=config, data_state=batches.get_state(), force=True)
    return state


def _to_host(x: Any) -> np.ndarray:
    """numpy copy of a host array or a (possibly multi-host sharded) jax.Array; a collective when sharded."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _stop(ckpt: Checkpointer, reason: str):
    ckpt.wait_until_finished()
    raise NonFiniteError(f"{reason}; stopping without saving. The last good checkpoint is step "
                         f"{ckpt.latest_step()} in {ckpt.directory}")
