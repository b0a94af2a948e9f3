"""The one train step builder and train loop that both stages (autoencoder, LDM) plug into.

Train step contract: a pure `(state, batch, key) -> (state, metrics)`, jitted once with the state donated
and explicit shardings (state: its rules; batch: leading axis over ("data", "fsdp"); key and metrics:
replicated). The step's randomness is `step_key = fold_in(key, state.step)`. `make_train_step` builds it
around what the stage computes, in one of two forms:
- `loss_fn(params, batch, key) -> (loss, aux)` (the LDM): its gradient, averaged in float32 over
  `accumulate_grad_batches` micro-batches (`fold_in(step_key, micro_batch_index)` each), is one optimiser
  update (`TrainState.update_params`); metrics add grad_norm (before clipping).
- `update_fn(state, batch, step_key) -> (state, metrics)` (the autoencoder): the stage's own updates of
  `state.params` through `state.update_params`. The autoencoder needs this form because its iteration is two
  optimiser updates in turn, as the reference's alternating optimisers: the generator's (whose gradient is
  not the autodiff of a loss: the adaptive GAN weight is computed from two last-layer gradients inside
  `AutoencoderLoss.generator_loss_and_grads`), then the discriminator's on reconstructions by the *updated*
  autoencoder. A single loss over {generator, discriminator} params with a multi_transform optimiser would
  update both from the same reconstructions (a different algorithm) and cannot express that gradient.
Either way the builder then ends the step (`TrainState.next_step`: step + 1, EMA) and adds param_norm (after
the update) and, when given the schedule, learning_rate. Every metric is a float32 scalar and "loss" is one.

Finiteness: nothing is checked inside the step; `check_finite(metrics, step)` on the host names every NaN/Inf
metric (grad and param norms cover the gradients and parameters). `train_loop` restores the newest checkpoint
that restores (state and data position; a corrupt newer one is logged and moved aside,
`Checkpointer.restore_newest`), then runs the steps: batches placed on the devices by a
`DevicePrefetcher` thread `prefetch` batches ahead (0: on the step thread), progress bar with loss and
images/s, scalars to TensorBoard + JSONL every `log_every` steps (after `check_finite`), periodic hooks whose
images are logged, checkpoints every `checkpoint.every_steps` and at the end. A non-finite metric at a log step
or a non-finite state at a save step stops the run with `NonFiniteError`; no non-finite state is ever saved, so
the last checkpoint stays good. The data position saved is that of the batches consumed, not of the read-ahead.
Unreadable records the data source skipped (its `skipped` log, `SkipReport`) are the metric
`data/skipped_images`, a console line whenever their count changed, and a summary line at the end.

Training time and the wall-clock budget (`TrainTime`, `train.max_train_seconds`): the loop times each step from
the call of the train step (its batch already in hand) to the completion of its outputs (it waits for them, so
the host does not queue the next step while one runs), with `clock`. Not counted: the first step of every run,
fresh or resumed (its time is mostly compilation), waiting for batches, logging, sample-grid hooks and
checkpoint saves. The sum, over every run of the workdir, is "train_seconds": in each metrics line and in each
checkpoint's `data` item, from which a resumed run continues it. With a budget the run stops after the first
step at which train_seconds reaches it (or at num_steps, whichever comes first), logs one line "time budget of X
s reached at step N (Y s of training)", and saves a checkpoint there as at num_steps; a rerun of the workdir with
a larger budget continues from that checkpoint, one with the same budget trains no step. Several processes take
process 0's time (a broadcast), so that all stop at the same step.
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
from ldm_jax.data.pipeline import DevicePrefetcher
from ldm_jax.training import logging as metric_logging
from ldm_jax.training import state as state_lib
from ldm_jax.training.checkpoint import CheckpointConfig, Checkpointer, allgather_json
from ldm_jax.training.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
UpdateFn = Callable[..., tuple[TrainState, Mapping[str, jax.Array]]]
TrainStep = Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]

_log = logging.getLogger(__name__)
clock = time.perf_counter  # the clock of the training time (`TrainTime`); a module attribute that tests replace


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


def make_train_step(loss_fn: LossFn | None = None, *, update_fn: UpdateFn | None = None, mesh: Mesh,
                    state_shardings: TrainState, accumulate_grad_batches: int = 1,
                    learning_rate_fn: optax.Schedule | None = None, frozen: Any = None) -> TrainStep:
    """Builds the jitted train step `(state, batch, key) -> (state, metrics)` from a loss or an update function.

    Give exactly one of (see the module docstring):
    loss_fn(params, batch, key) -> (scalar loss, {name: scalar}): called once per micro-batch, its gradients
      averaged in float32 over `accumulate_grad_batches` micro-batches (a `lax.scan`), one optimiser update.
    update_fn(state, batch, step_key) -> (state, {name: scalar}, "loss" among them): the stage's updates
      (`state.update_params`, model_state); it must not advance `state.step` (the builder does).
    state_shardings: the state's shardings (`ldm_jax.training.state.shardings_of(state)`).
    frozen: optional pytree of arrays the loss reads but does not train (a frozen first stage, LPIPS weights);
      then loss_fn(params, batch, key, frozen) / update_fn(state, batch, step_key, frozen) is called, and the
      arrays enter the jitted step as an argument with their own shardings (not as compile-time constants).
      Not donated.
    The state argument is donated: do not use the state passed in after the call.
    """
    if (loss_fn is None) == (update_fn is None):
        raise ValueError("make_train_step takes exactly one of loss_fn and update_fn")
    if update_fn is None:
        update_fn = _loss_update(loss_fn, mesh=mesh, state_shardings=state_shardings,
                                 accumulate_grad_batches=accumulate_grad_batches)
    elif accumulate_grad_batches != 1:
        raise ValueError(f"accumulate_grad_batches={accumulate_grad_batches}: micro-batches are split for a "
                         "loss_fn; an update_fn gets the whole batch (use 1)")

    def step(state: TrainState, batch: Any, key: jax.Array, frozen_args: tuple = ()):
        new_state, metrics = update_fn(state, batch, jax.random.fold_in(key, state.step), *frozen_args)
        new_state = new_state.next_step()
        if "loss" not in metrics:
            raise ValueError(f"the train step's metrics have no 'loss' (got {sorted(metrics)})")
        for name, value in metrics.items():
            if jnp.shape(value) != ():
                raise ValueError(f"train step metric {name!r} has shape {jnp.shape(value)}, expected a scalar")
        metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
        metrics["param_norm"] = optax.tree.norm(new_state.params)
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


def _loss_update(loss_fn: LossFn, *, mesh: Mesh, state_shardings: TrainState, accumulate_grad_batches: int
                 ) -> UpdateFn:
    """The update of a loss: micro-batched float32 gradient average -> one `update_params`; metrics loss (mean
    over micro-batches), the aux metrics (means) and grad_norm."""
    num = accumulate_grad_batches
    if num < 1:
        raise ValueError(f"accumulate_grad_batches={num}, expected >= 1")
    micro_sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainState, batch: Any, step_key: jax.Array, *frozen_args):
        micro = jax.lax.with_sharding_constraint(_split_micro_batches(batch, num), micro_sharding)

        def body(grad_sum, xs):
            index, micro_batch = xs
            (loss, aux), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_key, index), *frozen_args)
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
        metrics = {"loss": losses.astype(jnp.float32).mean(),
                   **{name: v.astype(jnp.float32).mean() for name, v in aux.items()},
                   "grad_norm": optax.tree.norm(grads)}
        return state.update_params(grads), metrics

    return update


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Host-side check of a step's metrics (numbers or arrays): NonFiniteError naming every NaN/Inf one."""
    bad = {name: float(np.asarray(v).ravel()[0]) if np.size(v) == 1 else "non-finite"
           for name, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))}
    if bad:
        raise NonFiniteError(f"non-finite metrics at step {int(step)}: {bad}")


def _state_is_finite(state: Any) -> bool:
    """Whether every float leaf of `state` is finite, on every process. Read on the host shard by shard (each
    shard once: replica 0), so no program is compiled: a jitted reduction over a model's hundreds of leaves
    took seconds to compile for a check that runs only at save steps, whose arrays the save copies off the
    devices anyway."""
    finite = all(bool(np.isfinite(np.asarray(shard.data)).all())
                 for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)
                 for shard in leaf.addressable_shards if shard.replica_id == 0)
    if jax.process_count() == 1:
        return finite
    return bool(np.all(multihost_utils.process_allgather(np.array(finite))))


@dataclasses.dataclass
class TrainTime:
    """The cumulative training time of a workdir (module docstring) and its budget.

    budget: seconds, 0 for none. seconds: the time counted so far, over every run (restored from the checkpoint).
    """

    budget: float = 0.0
    seconds: float = 0.0

    def __post_init__(self):
        if not self.budget >= 0:
            raise ValueError(f"max_train_seconds={self.budget}; expected >= 0 (0: no budget)")

    def add(self, elapsed: float) -> None:
        """Counts one step's `elapsed` seconds (process 0's, when several processes train with a budget)."""
        if self.budget > 0 and jax.process_count() > 1:
            elapsed = float(multihost_utils.broadcast_one_to_all(np.float64(elapsed)))
        self.seconds += float(elapsed)

    def reached(self) -> bool:
        """Whether a budget is set and the counted time has reached it."""
        return self.budget > 0 and self.seconds >= self.budget

    def stop_line(self, step: int) -> str:
        """The line logged when the budget stops the run at `step`."""
        return f"time budget of {self.budget:g} s reached at step {step} ({self.seconds:.1f} s of training)"


def _base_key(state: TrainState, mesh: Mesh) -> jax.Array:
    # A copy: the state's own buffers are donated to every step.
    copy = jax.jit(lambda r: jax.random.wrap_key_data(r.copy()), out_shardings=parallel.replicated(mesh))
    return copy(state.rng)


def train_loop(state: TrainState, train_step: TrainStep, batches: Iterator[Any], *, num_steps: int,
               workdir: str | os.PathLike, mesh: Mesh, checkpoint: CheckpointConfig = CheckpointConfig(),
               config: Any = None, log_every: int = 50, hooks: Sequence[Hook] = (), progress_bar: bool = True,
               prefetch: int = 2, max_train_seconds: float = 0.0) -> TrainState:
    """Trains `state` up to `num_steps` steps and returns the final state; resumes from `workdir` if possible.
    With `max_train_seconds` > 0 it stops earlier, after the first step at which the workdir's cumulative training
    time reaches it (module docstring: what is counted); the final state's `step` says where it stopped.

    batches: an iterator of host-local batches (numpy pytrees, this process's contiguous share of the global
      batch, leading axis = examples) with `get_state()` / `set_state(s)` (JSON-able), checkpointed with the
      state so a resumed run sees the same batches; optionally `skipped` (a `readers.SkipLog`), reported.
    state: a freshly initialised TrainState; when `workdir/checkpoints` holds a checkpoint it is only the
      restore target (structure and shardings), and may be abstract (`state.init_train_state(abstract=True)`:
      ShapeDtypeStructs with shardings), so that a resumed run never computes an init it throws away; an
      abstract state with no checkpoint to restore is a ValueError.
    config: saved as JSON in each checkpoint.
    prefetch: batches read and placed on the devices ahead by a background thread (`DevicePrefetcher`), so
      reading and decoding overlap the steps; 0 reads each batch on the step thread when it is needed.
    Raises NonFiniteError (after waiting for pending saves) when a loss/metric or the state is NaN/Inf, and
    `checkpoint.CheckpointRestoreError` when the workdir holds checkpoints none of which restores.
    """
    for method in ("get_state", "set_state"):
        if not callable(getattr(batches, method, None)):
            raise TypeError(f"train_loop: the batch iterator {type(batches).__name__} has no {method}(); the data "
                            "position must be checkpointed for an exact resume")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), checkpoint)
    try:
        restored = ckpt.restore_newest(state)  # a corrupt newest step falls back to an older one
        if restored is None and state_lib.is_abstract(state):
            raise ValueError(f"train_loop: {ckpt.directory} holds no checkpoint to restore the abstract state into "
                             "(a fresh run passes an initialised state)")
    except BaseException:
        ckpt.close()
        raise
    start, train_time = 0, TrainTime(budget=float(max_train_seconds))
    if restored is not None:
        state, start, train_time.seconds = restored.state, restored.step, restored.train_seconds
        batches.set_state(restored.data_state)
        _log.info("resumed from %s/%d", ckpt.directory, start)
    if train_time.budget > 0 and jax.process_index() == 0:
        _log.info("training-time budget %g s; %.1f s used by step %d", train_time.budget, train_time.seconds, start)
    writer = metric_logging.MetricWriter(workdir, start_step=start)
    bar = metric_logging.ProgressBar(num_steps, initial=start, enabled=progress_bar and jax.process_index() == 0)
    key = _base_key(state, mesh)
    device_batches = DevicePrefetcher(batches, mesh, size=prefetch)
    skips = SkipReport(getattr(batches, "skipped", None))
    try:
        state = _run(state, train_step, device_batches, key, start=start, num_steps=num_steps, ckpt=ckpt,
                     config=config, log_every=log_every, hooks=hooks, writer=writer, bar=bar, skips=skips,
                     train_time=train_time)
    finally:
        device_batches.close()
        bar.close()
        writer.close()
        ckpt.close()  # waits for pending saves
    skips.at_end()
    return state


class SkipReport:
    """Reports a data source's unreadable records (`readers.SkipLog`, None: nothing to report), counted over
    all processes: the metric `data/skipped_images` at every log step, a console line when the count changed,
    and a summary line at the end. The count is this run's (a resumed run counts afresh). The calls are
    collectives when several processes train: every process makes them."""

    METRIC = "data/skipped_images"

    def __init__(self, skipped: Any):
        self.skipped, self.reported = skipped, 0

    def at_log_step(self, step: int) -> dict[str, float]:
        """{METRIC: count} (empty without a skip log); logs a line when the count changed since the last one."""
        if self.skipped is None:
            return {}
        count = self._count()
        if count != self.reported:
            self._log(self._line(f"step {step}: skipped {count} unreadable images so far"))
            self.reported = count
        return {self.METRIC: float(count)}

    def at_end(self) -> None:
        """Logs "skipped N unreadable images: first few NAME (why), ..." when any were skipped."""
        if self.skipped is not None and (count := self._count()):
            self._log(self._line(f"skipped {count} unreadable images"))

    def _count(self) -> int:
        return sum(allgather_json(self.skipped.count))

    def _line(self, head: str) -> str:
        first = [pair for pairs in allgather_json(self.skipped.first()) for pair in pairs][: self.skipped.max_names]
        return f"{head}: first few " + ", ".join(f"{n} ({why})" for n, why in first)

    @staticmethod
    def _log(line: str) -> None:
        if jax.process_index() == 0:
            _log.warning("%s", line)


def _run(state, train_step, batches, key, *, start, num_steps, ckpt, config, log_every, hooks, writer, bar, skips,
         train_time):
    last_time, last_step, examples = time.perf_counter(), start, 0
    for step in range(start, num_steps):
        if train_time.reached():  # resumed with the budget already spent: no step
            _log_budget(train_time, step)
            break
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(f"the batch iterator ran out after {step} of {num_steps} steps") from None
        examples += jax.tree.leaves(batch)[0].shape[0]
        began = clock()
        state, metrics = train_step(state, batch, key)
        metrics = jax.block_until_ready(metrics)  # the step has completed (one program: every output is ready)
        if step > start:  # the first step of a run is mostly its compilation
            train_time.add(clock() - began)
        done = step + 1
        stop = train_time.reached()

        if done % log_every == 0 or done == num_steps or stop:
            scalars = parallel.fetch_replicated(metrics)
            try:
                check_finite(scalars, done)
            except NonFiniteError as err:
                _stop(ckpt, str(err))
            now = time.perf_counter()
            images_per_sec = examples / max(now - last_time, 1e-9)
            writer.write_scalars(done, {**scalars, "images_per_sec": images_per_sec,
                                        "steps_per_sec": (done - last_step) / max(now - last_time, 1e-9),
                                        "train_seconds": train_time.seconds, **skips.at_log_step(done)})
            bar.update(done, loss=float(scalars["loss"]), images_per_sec=images_per_sec)
            last_time, last_step, examples = now, done, 0

        for hook in hooks:
            if done % hook.every_steps == 0:
                images = hook.fn(state, done)
                writer.write_images(done, host_copy(dict(images)))

        if ckpt.should_save(done) or done == num_steps or stop:
            if not _state_is_finite(state):
                _stop(ckpt, f"non-finite parameters or optimiser state at step {done}")
            ckpt.save(done, state, config=config, data_state=batches.get_state(), force=True,
                      train_seconds=train_time.seconds)
        if stop:
            _log_budget(train_time, done)
            break
    return state


def _log_budget(train_time: TrainTime, step: int) -> None:
    if jax.process_index() == 0:
        _log.info("%s", train_time.stop_line(step))


def host_copy(tree: Any) -> Any:
    """numpy copies of a pytree of host arrays or (possibly multi-host sharded) jax.Arrays; a collective when
    any is sharded over processes, so every process calls it."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def _stop(ckpt: Checkpointer, reason: str):
    ckpt.wait_until_finished()
    raise NonFiniteError(f"{reason}; stopping without saving. The last good checkpoint is step "
                         f"{ckpt.latest_step()} in {ckpt.directory}")
