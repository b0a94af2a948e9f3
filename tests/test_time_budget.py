"""The wall-clock training budget (`train.max_train_seconds`, `loop.TrainTime`) on the toy model of
multihost_worker.py (8 fake CPU devices).

The loop's clock is replaced by a fake one (monkeypatch of `loop.clock`): each call advances it by one second, and
the loop reads it once before and once after each step it counts, so every counted step is exactly 1 s and the
first step of each run (its compilation) is not counted. Checked: the budget stops training after the first step
at which the counted time reaches it, with a checkpoint and metrics lines carrying "train_seconds"; the time
survives a resume; a rerun with the same budget trains no step, one with a larger budget continues; and a run
stopped by a budget and continued equals one uninterrupted run to the same step, bit for bit.
"""
import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import multihost_worker as toy
from ldm_jax import parallel
from ldm_jax.training import loop, main, optim, state as state_lib
from ldm_jax.training.checkpoint import ITEMS, CheckpointConfig


@pytest.fixture
def fake_clock(monkeypatch):
    """loop.clock -> 1, 2, 3, ... (seconds): every counted step takes 1 s."""
    ticks = iter(range(1, 1_000_000))
    monkeypatch.setattr(loop, "clock", lambda: float(next(ticks)))


def _run(workdir, *, steps, budget=0.0):
    """`toy.run` (batch 16, checkpoints every 100 steps, logs every step) with a training-time budget."""
    mesh = parallel.make_mesh()
    cfg = optim.OptimizerConfig(learning_rate=3e-3, scale_lr=False, warmup_steps=2, grad_clip_norm=1.0)
    tx, schedule = optim.make_optimizer(cfg, 3e-3)
    abstract = (workdir / "checkpoints").is_dir()
    state = state_lib.init_train_state(toy.init_params, tx=tx, key=jax.random.key(0), ema_decay=0.99, mesh=mesh,
                                       rules=parallel.DEFAULT_PARAM_RULES, abstract=abstract)
    step = loop.make_train_step(toy.loss_fn, mesh=mesh, state_shardings=state_lib.shardings_of(state),
                                learning_rate_fn=schedule)
    return loop.train_loop(state, step, toy.ToyBatches(16), num_steps=steps, workdir=str(workdir), mesh=mesh,
                           config={"toy": True}, log_every=1, progress_bar=False, max_train_seconds=budget,
                           checkpoint=CheckpointConfig(every_steps=100, keep=2))


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _saved(workdir):
    """(the checkpoint steps, the train_seconds of the newest one's data item)."""
    manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        data = manager.restore(manager.latest_step(), args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
        return sorted(manager.all_steps()), data["train_seconds"]
    finally:
        manager.close()


def test_budget_stops_resumes_and_continues_exactly(tmp_path, fake_clock, caplog):
    caplog.set_level(logging.INFO, logger=loop.__name__)
    work = tmp_path / "budget"
    # Step 1 is not counted, steps 2, 3, 4 count 1 s each: 3 s >= 2.5 s at step 4.
    state = _run(work, steps=20, budget=2.5)
    assert int(state.step) == 4
    assert [(r["step"], r["train_seconds"]) for r in _rows(work)] == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)]
    assert _saved(work) == ([4], 3.0)  # saved at the stop, off the every-100-steps interval
    assert "time budget of 2.5 s reached at step 4 (3.0 s of training)" in caplog.text

    # The same budget again: spent already, no step is trained (and nothing new is saved).
    caplog.clear()
    assert int(_run(work, steps=20, budget=2.5).step) == 4 and _saved(work) == ([4], 3.0)
    assert "time budget of 2.5 s reached at step 4 (3.0 s of training)" in caplog.text

    # A larger budget continues from the stored 3 s: step 5 (this run's first) is not counted, 6, 7, 8 are.
    state = _run(work, steps=20, budget=5.5)
    assert int(state.step) == 8 and _saved(work) == ([4, 8], 6.0)
    assert [r["train_seconds"] for r in _rows(work)] == [0.0, 1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0]
    stopped = toy.gathered_params(state)

    # Bit-exact: the stopped and continued run equals one uninterrupted run of 8 steps without a budget (which
    # counts the time all the same, its budget 0 never stopping it).
    straight = _run(tmp_path / "straight", steps=8)
    assert _rows(tmp_path / "straight")[-1]["train_seconds"] == 7.0
    reference = toy.gathered_params(straight)
    assert sorted(stopped) == sorted(reference) and int(reference["step"]) == 8
    for name in reference:
        np.testing.assert_array_equal(stopped[name], reference[name], err_msg=name)


def test_num_steps_comes_first_and_bad_budgets(tmp_path, fake_clock):
    assert int(_run(tmp_path, steps=3, budget=100.0).step) == 3
    assert _saved(tmp_path) == ([3], 2.0)
    with pytest.raises(ValueError, match=r"max_train_seconds=-1.0; expected >= 0"):
        loop.TrainTime(budget=-1.0)
    with pytest.raises(ValueError, match=r"train.max_train_seconds=-5.0; expected >= 0 \(0: no budget\)"):
        main.TrainConfig(max_train_seconds=-5.0)
