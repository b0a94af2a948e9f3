"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives, 4 CPU devices each) train the toy model
on one global (data=2, fsdp=4) mesh and match one process with 8 devices; their checkpoint holds both
processes' data positions."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import multihost_worker as toy
from ldm_jax import parallel
from ldm_jax.training import optim, state as state_lib
from ldm_jax.training.checkpoint import Checkpointer

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parent.parent
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    common = ["--workdir", str(tmp_path / "mh"), "--out", str(tmp_path / "mh.npz"), "--steps", str(STEPS),
              "--mesh_data", "2", "--mesh_fsdp", "4", "--local_devices", "4", "--checkpoint_every", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Process 0 gets flags, process 1 the JAX_* environment variables: both ways of initialize_distributed.
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), *common, "--coordinator", f"127.0.0.1:{port}",
                          "--num_processes", "2", "--process_id", "0"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, str(WORKER), *common], cwd=ROOT, text=True,
                         env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
    ]
    try:
        reference = toy.gathered_params(toy.run(str(tmp_path / "one"), steps=STEPS, mesh_data=2, mesh_fsdp=4,
                                                checkpoint_every=2))
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out}"
        assert f"worker {i}/2 done: step {STEPS}" in out, out

    results = [np.load(tmp_path / f"mh.p{i}.npz") for i in range(2)]
    assert sorted(results[0].files) == sorted(reference)
    for name, want in reference.items():
        for result in results:
            # Cross-process gloo all-reduces sum in another order than the in-process ones: last-bit float32
            # differences (measured <= 3e-7 relative).
            np.testing.assert_allclose(result[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(results[1][name], results[0][name])  # both hosts hold the same model

    # The multi-host checkpoint: the state plus each process's data position (JSON written by process 0).
    data = json.loads((tmp_path / "mh" / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert data.pop("train_seconds") > 0  # the cumulative training time (loop.TrainTime), steps after the first
    assert data == {"num_processes": 2, "states": [{"index": STEPS, "seed": 0}] * 2}
    ckpt = Checkpointer(tmp_path / "mh" / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    with pytest.raises(ValueError, match=r"data positions of 2 process\(es\); this run has 1"):
        ckpt.restore(state_lib.abstract_state(_toy_state()))


def _toy_state():
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(scale_lr=False, grad_clip_norm=1.0), 1e-3)
    return state_lib.init_train_state(toy.init_params, tx=tx, key=jax.random.key(0), ema_decay=0.99,
                                      mesh=parallel.make_mesh(2, 4), rules=parallel.DEFAULT_PARAM_RULES)
