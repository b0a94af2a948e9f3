"""A toy training run through the library's real training stack, as a script and as importable pieces.

Tests import the toy model, data and loss from here, and run this file as a subprocess for the resume
(SIGKILL and restart) and multi-host (two processes on 127.0.0.1) tests:

    python tests/multihost_worker.py --workdir W --steps 6 --out W/params.npz [--coordinator 127.0.0.1:PORT
        --num_processes 2 --process_id 0 --local_devices 4] [--distributed_from_env]

Every process writes its own final params (gathered, numpy) to `--out` with `.p{process_id}` before `.npz`
when there are several processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _configure_jax(local_devices: int) -> None:
    """The test set-up of tests/conftest.py, for a fresh process (before jax is imported)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    sys.modules.setdefault("torchvision", None)
    sys.modules.setdefault("torch", None)  # tensorboardX imports torch when present: 3 s this run does not need
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_default_matmul_precision", "highest")


if __name__ == "__main__":
    _pre = argparse.ArgumentParser(add_help=False)
    _pre.add_argument("--local_devices", type=int, default=8)
    _configure_jax(_pre.parse_known_args()[0].local_devices)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import parallel  # noqa: E402
from ldm_jax.models.layers import conv  # noqa: E402
from ldm_jax.training import optim, state as state_lib  # noqa: E402
from ldm_jax.training.checkpoint import CheckpointConfig  # noqa: E402
from ldm_jax.training.loop import make_train_step, train_loop  # noqa: E402

IMAGE = (8, 8, 3)


class ToyModel(nn.Module):
    """(B, 8, 8, 3) images -> (B, 4): conv_in (3x3, 8 ch) - gelu - mean pool - dense_hidden (16) - dense_out."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(conv(8, 3, dtype=jnp.float32, param_dtype=jnp.float32, name="conv_in")(x))
        h = nn.gelu(nn.Dense(16, name="dense_hidden")(h.mean(axis=(1, 2))))
        return nn.Dense(4, name="dense_out")(h)


def init_params(key: jax.Array):
    """ToyModel params {conv_in: {kernel (3,3,3,8), bias}, dense_hidden: {kernel (8,16), ..}, dense_out: ..}."""
    return ToyModel().init(key, jnp.zeros((1, *IMAGE)))["params"]


def loss_fn(params, batch, key):
    """Regression MSE of ToyModel(x + 0.1 noise) to y; the noise makes the step's key matter."""
    x = batch["x"] + 0.1 * jax.random.normal(key, batch["x"].shape)
    pred = ToyModel().apply({"params": params}, x)
    err = pred - batch["y"]
    return jnp.mean(jnp.square(err)), {"mae": jnp.mean(jnp.abs(err))}


def deterministic_loss_fn(params, batch, key):
    """`loss_fn` without noise (for comparisons across micro-batch splits, where the keys differ)."""
    del key
    err = ToyModel().apply({"params": params}, batch["x"]) - batch["y"]
    return jnp.mean(jnp.square(err)), {}


def global_batch(index: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The `index`-th global batch: x (size, 8, 8, 3) in [-1, 1], y (size, 4); a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    x = rng.uniform(-1, 1, (size, *IMAGE)).astype(np.float32)
    y = np.stack([x.mean((1, 2, 3)), x[..., 0].std((1, 2)), x[:, :4].mean((1, 2, 3)), x.max((1, 2, 3))], -1)
    return {"x": x, "y": y.astype(np.float32)}


class ToyBatches:
    """An endless iterator of this process's share of `global_batch(i)`, with JSON get_state/set_state.

    nan_at_step: the batch of that (1-based) step has NaN images. delay: seconds slept per batch.
    """

    def __init__(self, batch_size: int, *, seed: int = 0, nan_at_step: int | None = None, delay: float = 0.0):
        self.batch_size, self.seed, self.nan_at_step, self.delay = batch_size, seed, nan_at_step, delay
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.delay:
            time.sleep(self.delay)
        batch = global_batch(self.index, self.batch_size, self.seed)
        if self.nan_at_step == self.index + 1:
            batch["x"][:] = np.nan
        self.index += 1
        share = self.batch_size // jax.process_count()
        start = jax.process_index() * share
        return {k: v[start:start + share] for k, v in batch.items()}

    def get_state(self):
        return {"index": self.index, "seed": self.seed}

    def set_state(self, state):
        if state["seed"] != self.seed:
            raise ValueError(f"ToyBatches.set_state: seed {state['seed']} != {self.seed}")
        self.index = state["index"]


def run(workdir: str, *, steps: int, batch_size: int = 16, mesh_data: int = -1, mesh_fsdp: int = 1,
        accumulate: int = 1, checkpoint_every: int = 2, delay: float = 0.0, nan_at_step: int | None = None,
        hooks=(), seed: int = 0, log_every: int = 1):
    """Trains ToyModel for `steps` steps in `workdir` (resuming if it holds a checkpoint); returns the state."""
    mesh = parallel.make_mesh(mesh_data, mesh_fsdp)
    cfg = optim.OptimizerConfig(learning_rate=3e-3, scale_lr=False, warmup_steps=2, grad_clip_norm=1.0,
                                accumulate_grad_batches=accumulate)
    tx, schedule = optim.make_optimizer(cfg, optim.learning_rate(cfg, global_batch_size=batch_size,
                                                                 num_devices=mesh.size))
    state = state_lib.init_train_state(init_params, tx=tx, key=jax.random.key(seed), ema_decay=0.99, mesh=mesh,
                                       rules=parallel.DEFAULT_PARAM_RULES)
    step = make_train_step(loss_fn, mesh=mesh, state_shardings=state_lib.shardings_of(state),
                           accumulate_grad_batches=accumulate, learning_rate_fn=schedule)
    config = {"steps": steps, "batch_size": batch_size, "mesh": [mesh_data, mesh_fsdp], "accumulate": accumulate}
    return train_loop(state, step, ToyBatches(batch_size, seed=seed, nan_at_step=nan_at_step, delay=delay),
                      num_steps=steps, workdir=workdir, mesh=mesh, config=config, log_every=log_every, hooks=hooks,
                      checkpoint=CheckpointConfig(every_steps=checkpoint_every, keep=2), progress_bar=False)


def gathered_params(state) -> dict[str, np.ndarray]:
    """{"params/conv_in/kernel": array, ..., "ema/...": ...}: full numpy copies (a collective when multi-host)."""
    from jax.experimental import multihost_utils

    out = {}
    for prefix, tree in (("params", state.params), ("ema", state.ema_params)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[f"{prefix}/{parallel.path_str(path)}"] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    out["step"] = np.asarray(parallel.fetch_replicated(state.step))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--mesh_data", type=int, default=-1)
    p.add_argument("--mesh_fsdp", type=int, default=1)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--checkpoint_every", type=int, default=2)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--local_devices", type=int, default=8)
    p.add_argument("--coordinator")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    args = p.parse_args(argv)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    state = run(args.workdir, steps=args.steps, batch_size=args.batch_size, mesh_data=args.mesh_data,
                mesh_fsdp=args.mesh_fsdp, accumulate=args.accumulate, checkpoint_every=args.checkpoint_every,
                delay=args.delay)
    params = gathered_params(state)
    out = args.out if jax.process_count() == 1 else args.out.replace(".npz", f".p{jax.process_index()}.npz")
    np.savez(out, **params)
    print(f"worker {jax.process_index()}/{jax.process_count()} done: step {int(params['step'])}", flush=True)


if __name__ == "__main__":
    main()
