"""Checkpoints and the train loop: an exact resume after SIGKILL, restore onto another mesh, keep-last-K,
the NaN/Inf guard keeping the last good checkpoint, and the metric/image outputs."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from PIL import Image

import multihost_worker as toy
from ldm_jax import parallel
from ldm_jax.training import optim, state as state_lib
from ldm_jax.training.checkpoint import CheckpointConfig, Checkpointer, saved_steps
from ldm_jax.training.loop import Hook, NonFiniteError

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parent.parent


def _worker(workdir, out, *extra):
    cmd = [sys.executable, str(WORKER), "--workdir", str(workdir), "--out", str(out), "--steps", "8",
           "--checkpoint_every", "2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _committed_steps(directory):
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if re.fullmatch(r"\d+", p.name))


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    # Run B (a subprocess) is slowed down, SIGKILLed once a checkpoint is committed, then restarted; run A
    # goes straight through the same 8 steps in this process (same XLA flags as the worker) meanwhile.
    run_b = _worker(tmp_path / "b", tmp_path / "b.npz", "--delay", "0.5")
    ckpt_dir = tmp_path / "b" / "checkpoints"
    deadline = time.monotonic() + 90
    while not _committed_steps(ckpt_dir):
        assert run_b.poll() is None, run_b.communicate()[0]
        assert time.monotonic() < deadline, "run B wrote no checkpoint in 90 s"
        time.sleep(0.05)
    run_b.send_signal(signal.SIGKILL)
    run_b.communicate()
    killed_at = _committed_steps(ckpt_dir)
    assert run_b.returncode == -signal.SIGKILL and max(killed_at) < 8, killed_at
    log_before = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()

    restart = _worker(tmp_path / "b", tmp_path / "b.npz")
    a = toy.gathered_params(toy.run(str(tmp_path / "a"), steps=8, checkpoint_every=2))
    _finish(restart)
    b = np.load(tmp_path / "b.npz")
    assert sorted(a) == sorted(b.files) and int(b["step"]) == 8
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    # The restart resumed (not restarted): the killed run's log lines up to its checkpoint are kept, every
    # step is logged exactly once, and the newest checkpoints are the last two.
    log_after = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    resumed_from = max(killed_at)
    kept = [line for line in log_before if json.loads(line)["step"] <= resumed_from]
    assert log_after[: len(kept)] == kept and len(kept) == resumed_from
    assert [json.loads(line)["step"] for line in log_after] == list(range(1, 9))
    assert _committed_steps(ckpt_dir) == [6, 8]


def _small_state(mesh, rules=parallel.DEFAULT_PARAM_RULES, *, abstract=False):
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(scale_lr=False), 1e-3)
    return state_lib.init_train_state(toy.init_params, tx=tx, key=jax.random.key(7), ema_decay=0.999, mesh=mesh,
                                      rules=rules, abstract=abstract)


def test_restore_onto_another_mesh_keeps_last_k(tmp_path):
    saved = _small_state(parallel.make_mesh(data=8))
    saved = saved.replace(params=jax.tree.map(lambda p: p + 1.0, saved.params), step=saved.step + 5)
    config = ml_collections.ConfigDict({"model": {"channels": (8, 16)}, "lr": 1e-3})
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep=2))
    for step in (1, 2, 3):
        ckpt.save(step, saved, config=config, data_state={"index": step}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3

    assert saved_steps(tmp_path) == [2, 3] and saved_steps(tmp_path / "none") == []
    target_mesh = parallel.make_mesh(data=2, fsdp=4)
    target = state_lib.abstract_state(_small_state(target_mesh))
    # The abstract init (what a resumed run builds, nothing computed) is the same target as a live state's.
    built = _small_state(target_mesh, abstract=True)
    assert state_lib.is_abstract(built) and not state_lib.is_abstract(saved)
    paths = lambda s: [path for path, _ in jax.tree_util.tree_leaves_with_path(s)]  # noqa: E731 (tx differs)
    assert paths(built) == paths(target)
    for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(target), strict=True):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
    restored = Checkpointer(tmp_path, CheckpointConfig(every_steps=1, keep=2)).restore(target)
    assert restored.step == 3 and restored.data_state == {"index": 3}
    assert restored.config == {"model": {"channels": [8, 16]}, "lr": 1e-3}
    assert restored.state.params["dense_hidden"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert restored.state.params["dense_hidden"]["kernel"].sharding.mesh.shape == target_mesh.shape
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(restored.state), strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert restored.state.tx is target.tx and restored.state.ema_decay == 0.999
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(target)
    ckpt.close()


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A NaN batch at step 5: the metric check at step 5 stops the run; the checkpoint of step 4 stays.
    with pytest.raises(NonFiniteError, match=r"non-finite metrics at step 5: \{.*'loss': nan.*last good "
                                             r"checkpoint is step 4"):
        toy.run(str(tmp_path / "a"), steps=8, checkpoint_every=2, nan_at_step=5)
    ckpt = Checkpointer(tmp_path / "a" / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    restored = ckpt.restore(state_lib.abstract_state(_small_state(parallel.make_mesh())))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))
    assert restored.data_state["index"] == 4
    # Logging only every 10 steps: the state check before the save of step 4 catches the NaN of step 3.
    with pytest.raises(NonFiniteError, match=r"non-finite parameters or optimiser state at step 4.*step 2"):
        toy.run(str(tmp_path / "b"), steps=8, checkpoint_every=2, nan_at_step=3, log_every=10)
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [2]


def test_loop_writes_metrics_tensorboard_and_images(tmp_path):
    seen = []

    def sample_hook(state, step):
        seen.append(step)
        x = jnp.linspace(-1, 1, 5 * 4 * 6 * 3).reshape(5, 4, 6, 3)
        return {"samples": x, "gray": np.zeros((2, 4, 4, 1))}

    state = toy.run(str(tmp_path), steps=4, checkpoint_every=4, hooks=[Hook(2, sample_hook)])
    assert int(state.step) == 4 and seen == [2, 4]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "mae", "grad_norm", "param_norm", "learning_rate", "images_per_sec"} <= set(rows[0])
    assert rows[0]["learning_rate"] == 0.0 and rows[-1]["learning_rate"] == pytest.approx(3e-3)
    assert rows[-1]["loss"] < rows[0]["loss"]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    grid = np.asarray(Image.open(tmp_path / "images" / "samples_00000004.png"))
    assert grid.shape == (2 * 4, 3 * 6, 3)  # 5 images -> 2 rows x 3 columns, last cell black
    assert grid[0, 0, 0] == 0 and grid[-1, 2 * 6 - 1, 2] == 255 and grid[-1, -1].tolist() == [0, 0, 0]
    assert np.asarray(Image.open(tmp_path / "images" / "gray_00000002.png")).shape == (4, 8)


def test_loop_refuses_an_iterator_without_state(tmp_path):
    mesh = parallel.make_mesh()
    with pytest.raises(TypeError, match="has no get_state"):
        from ldm_jax.training.loop import train_loop
        train_loop(None, None, iter([]), num_steps=1, workdir=str(tmp_path), mesh=mesh)


def test_loop_refuses_an_abstract_state_without_a_checkpoint(tmp_path):
    """An abstract state is only a restore target: with nothing to restore the loop stops before any step."""
    from ldm_jax.training.loop import train_loop

    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="no checkpoint to restore the abstract state into"):
        train_loop(_small_state(mesh, abstract=True), None, toy.ToyBatches(16), num_steps=1, workdir=str(tmp_path),
                   mesh=mesh)
