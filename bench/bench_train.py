"""LDM train-step benchmark: step time, images/s and peak memory, printed as tables.

    .venv/bin/python bench/bench_train.py [--steps 5] [--configs tiny,mid] [--devices 1,8]
    .venv/bin/python bench/bench_train.py --prefetch 0,2 [--configs tiny,mid] [--steps 20] [--rounds 3]

For each model size ("tiny": a 32-channel UNet and a 1-layer text encoder, batch 32; "mid": the captioned-shapes
LDM of configs/shapes_ldm.py, 6.2M UNet + 0.1M text params, batch 32), on 8x8x4 latents of the shapes
autoencoder (encoded in the step, as training on images does), random weights and batches:
- our step (`ldm_jax.training.loop.make_train_step`: one jit over a Mesh, donated state, frozen first stage as
  an argument) in float32 and bfloat16 compute, with and without UNet remat;
- the same loss and optimiser built the way diffusers' Flax text-to-image example builds its step: `jax.pmap`
  over the devices, replicated params (`jax.device_put_replicated`), `lax.pmean` of the gradients, no remat.
Every device count runs in its own process (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), so "8" means
8 fake CPU devices sharing the same cores: it measures the partitioning overhead, not a speed-up.

Columns: compile (s, the first call), step (ms, median of --steps timed calls after it), images/s
(batch / step), peak (MiB: XLA's buffer assignment for the compiled step: arguments + outputs + temporaries
- aliased donations, per device), params (trained, M). Timings drift on shared machines; compare rows of one run.

`--prefetch 0,2`: the input pipeline instead of random batches. A small captioned-shapes TFDS set is generated
in a temporary folder; each row trains our float32 step (1 device) on its images read the way `train_loop`
reads them: `pipeline.DataIterator` (array_record read, PNG decode, resize/crop, tokenize) behind a
`pipeline.DevicePrefetcher` of that size (0: every batch read and placed on the step thread; 2: a background
thread two batches ahead), metrics fetched every 10 steps as the loop logs them. The settings alternate over
--rounds rounds of --steps timed steps (after 2 untimed ones); the table gives the median ms per step and the
ratio to prefetch 0 per round pair.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"unet.model_channels": "32", "unet.channel_mult": "(1, 2)", "unet.num_res_blocks": "1",
        "unet.attention_resolutions": "(1, 2)", "unet.num_heads": "2", "unet.num_head_channels": "-1", "unet.context_dim": "32",
        "cond_stage.hidden_size": "32", "cond_stage.intermediate_size": "64", "cond_stage.num_layers": "1",
        "cond_stage.num_heads": "2"}
SIZES = {"tiny": TINY, "mid": {}}
BATCH = 32
VARIANTS = (("jit", "float32", False), ("jit", "float32", True), ("jit", "bfloat16", False),
            ("jit", "bfloat16", True), ("pmap", "float32", False))


def _setup(overrides: dict, dtype: str, remat: bool, workdir: str):
    """(stage, frozen, state, batch, base loss) for one model size and variant, random weights and data."""
    import jax
    import numpy as np

    from ldm_jax import ldm, parallel
    from ldm_jax.training import main as common, train_ldm

    values = {**overrides, "train.dtype": dtype, "train.remat": str(remat), "data.global_batch_size": str(BATCH),
              "train.num_images": "8"}
    config = common.load_config(os.path.join(ROOT, "configs", "shapes_ldm.py"),
                                [f"--config.{k}={v}" for k, v in values.items()])
    stage = train_ldm.build_stage(config, pathlib.Path(workdir))
    params = jax.jit(lambda k: ldm.init_params(stage.model, k))(jax.random.key(0))
    frozen_np = {"first_stage": jax.device_get(params["first_stage"])}
    rng = np.random.default_rng(0)
    host_batch = {"image": rng.uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32),
                  "tokens": rng.integers(0, stage.model.cond_stage.vocab_size, (BATCH, stage.model.max_length),
                                         dtype=np.int32)}
    base = ldm.make_loss_fn(stage.model, empty_prompt=ldm.empty_prompt_ids(stage.model, stage.tokenizer),
                            options=stage.options)
    return stage, frozen_np, host_batch, base, parallel


def _time(call, steps: int) -> tuple[float, float]:
    """(first-call seconds, median ms of `steps` further calls); `call()` returns something to block on."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(call())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append((time.perf_counter() - start) * 1e3)
    return compile_s, statistics.median(times)


def _peak_mib(compiled) -> float | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return (total - stats.alias_size_in_bytes) / 2**20


def run_variant(overrides: dict, *, kind: str, dtype: str, remat: bool, batch: int, steps: int) -> dict:
    """One row: our jitted step ("jit") or the diffusers-example pmap step ("pmap")."""
    import tempfile

    import jax
    import numpy as np

    from ldm_jax import ldm
    from ldm_jax.training import loop, state as state_lib, train_ldm

    with tempfile.TemporaryDirectory() as workdir:
        stage, frozen_np, host_batch, base, parallel = _setup(overrides, dtype, remat, workdir)
    key = jax.random.key(1)
    holder = {}
    if kind == "jit":
        frozen = train_ldm.place(frozen_np, stage)
        holder["state"] = train_ldm.init_state(stage, jax.random.key(0))
        n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params)) / 1e6
        step = loop.make_train_step(lambda p, b, k, f: base({**p, **f}, b, k), mesh=stage.mesh,
                                    state_shardings=state_lib.shardings_of(holder["state"]), frozen=frozen)
        batch_arrays = parallel.host_local_to_global(host_batch, stage.mesh)
        peak = _peak_mib(jax.jit(lambda s, b, k: step(s, b, k)).lower(holder["state"], batch_arrays, key).compile())

        def call():
            holder["state"], metrics = step(holder["state"], batch_arrays, key)
            return metrics["loss"]
    else:
        devices = jax.local_devices()
        n = len(devices)
        tx, _ = train_ldm._optimizer(stage)
        state = jax.jit(lambda k: state_lib.create_train_state(
            lambda kk: train_ldm._trainable_of(ldm.init_params(stage.model, kk), stage),
            tx=tx, key=k, ema_decay=stage.train.ema_decay))(jax.random.key(0))
        n_params = sum(x.size for x in jax.tree.leaves(state.params)) / 1e6
        # flax's old `replicate` (device_put_replicated is gone from JAX): one copy per device, device-resident.
        replicate = jax.pmap(lambda tree: tree)
        stacked = lambda tree: jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)  # noqa: E731
        holder["state"] = replicate(stacked(state))
        frozen = replicate(stacked(frozen_np))
        keys = replicate(stacked(jax.random.key_data(key)))
        sharded = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), host_batch)

        def train_step(state, frozen, batch, key_data):
            step_key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step),
                                          jax.lax.axis_index("batch"))
            grad_fn = jax.value_and_grad(lambda p: base({**p, **frozen}, batch, step_key), has_aux=True)
            (loss, _), grads = grad_fn(state.params)
            grads = jax.lax.pmean(grads, "batch")
            return state.apply_gradients(grads), jax.lax.pmean({"loss": loss}, "batch")

        p_step = jax.pmap(train_step, "batch", donate_argnums=(0,))
        peak = _peak_mib(p_step.lower(holder["state"], frozen, sharded, keys).compile())

        def call():
            holder["state"], metrics = p_step(holder["state"], frozen, sharded, keys)
            return metrics["loss"]
    compile_s, step_ms = _time(call, steps)
    return {"kind": kind, "dtype": dtype, "remat": remat, "compile_s": compile_s, "step_ms": step_ms,
            "peak_mib": peak, "params_m": n_params}


def run_prefetch(overrides: dict, sizes: list[int], *, steps: int, rounds: int, data_dir: str) -> list[dict]:
    """Rows {"prefetch", "round", "step_ms"}: the step fed by DataIterator + DevicePrefetcher(size), alternating."""
    import tempfile

    import jax

    from ldm_jax import ldm, parallel
    from ldm_jax.data import pipeline
    from ldm_jax.data.captioned_shapes import prepare_captioned_shapes
    from ldm_jax.training import loop, main as common, state as state_lib, train_ldm

    name = prepare_captioned_shapes(data_dir, resolution=32, num_train=1024, num_validation=8, num_heldout=8)
    values = {**overrides, "data.global_batch_size": str(BATCH), "train.num_images": "8", "mesh.data": "1",
              "data.data_dir": data_dir, "data.name": name, "train.precompute_latents": "False"}
    workdir = tempfile.mkdtemp()
    config = common.load_config(os.path.join(ROOT, "configs", "shapes_ldm.py"),
                                [f"--config.{k}={v}" for k, v in values.items()])
    stage = train_ldm.build_stage(config, pathlib.Path(workdir))
    params = jax.jit(lambda k: ldm.init_params(stage.model, k))(jax.random.key(0))
    frozen = train_ldm.place({"first_stage": jax.device_get(params["first_stage"])}, stage)
    base = ldm.make_loss_fn(stage.model, empty_prompt=ldm.empty_prompt_ids(stage.model, stage.tokenizer),
                            options=stage.options)
    holder = {"state": train_ldm.init_state(stage, jax.random.key(0))}
    step = loop.make_train_step(lambda p, b, k, f: base({**p, **f}, b, k), mesh=stage.mesh,
                                state_shardings=state_lib.shardings_of(holder["state"]), frozen=frozen)
    key = jax.random.key(1)
    batches = train_ldm.image_iterator(stage)

    def timed(size: int) -> float:
        batches.set_state({"epoch": 0, "position": 0})
        device_batches = pipeline.DevicePrefetcher(batches, stage.mesh, size=size)
        try:
            for i in range(2 + steps):
                if i == 2:
                    jax.block_until_ready(holder["state"])
                    start = time.perf_counter()
                holder["state"], metrics = step(holder["state"], next(device_batches), key)
                if (i + 1) % 10 == 0:
                    parallel.fetch_replicated(metrics)  # the loop's log step: the host waits for the devices
            jax.block_until_ready(holder["state"])
            return (time.perf_counter() - start) / steps * 1e3
        finally:
            device_batches.close()

    timed(sizes[0])  # compile
    rows = []
    for r in range(rounds):
        for size in sizes if r % 2 == 0 else sizes[::-1]:
            rows.append({"prefetch": size, "round": r, "step_ms": timed(size)})
    return rows


def _worker(args) -> None:
    """Runs every measurement for one device count and prints one JSON line per row."""
    import jax

    jax.config.update("jax_threefry_partitionable", True)

    if args.prefetch:
        import tempfile

        with tempfile.TemporaryDirectory() as data_dir:
            for size in args.configs.split(","):
                for row in run_prefetch(SIZES[size], [int(p) for p in args.prefetch.split(",")], steps=args.steps,
                                        rounds=args.rounds, data_dir=data_dir):
                    print(json.dumps({"size": size, **row}), flush=True)
        return
    for size in args.configs.split(","):
        for kind, dtype, remat in VARIANTS:
            if args.devices > 1 and (dtype != "float32" or remat):
                continue  # the 1-vs-8 comparison is float32 without remat
            row = run_variant(SIZES[size], kind=kind, dtype=dtype, remat=remat, batch=BATCH, steps=args.steps)
            print(json.dumps({"size": size, "devices": args.devices, **row}), flush=True)


def _table(rows: list[dict]) -> str:
    header = ("size", "devices", "step", "dtype", "remat", "compile s", "step ms", "images/s", "peak MiB", "params M")
    lines = [header]
    for r in rows:
        lines.append((r["size"], str(r["devices"]), r["kind"], r["dtype"], "yes" if r["remat"] else "no",
                      f"{r['compile_s']:.1f}", f"{r['step_ms']:.0f}", f"{BATCH / r['step_ms'] * 1e3:.1f}",
                      "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", f"{r['params_m']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _prefetch_table(rows: list[dict]) -> str:
    """Median step ms per (size, prefetch), images/s, and the median per-round ratio to the first setting."""
    lines = [("size", "prefetch", "step ms (median)", "images/s", "rounds", "step time / first setting")]
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size]
        settings = list(dict.fromkeys(r["prefetch"] for r in mine))
        by_round = {(r["prefetch"], r["round"]): r["step_ms"] for r in mine}
        for p in settings:
            times = [r["step_ms"] for r in mine if r["prefetch"] == p]
            ratios = [by_round[(p, k)] / by_round[(settings[0], k)] for k in sorted({r["round"] for r in mine})]
            ms = statistics.median(times)
            lines.append((size, str(p), f"{ms:.1f}", f"{BATCH / ms * 1e3:.0f}", str(len(times)),
                          f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--devices", default="1,8")
    parser.add_argument("--prefetch", default="", help="e.g. 0,2: time the input pipeline at these prefetch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="--prefetch: alternating rounds per setting")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.devices = int(args.devices)
        _worker(args)
        return
    if args.prefetch:
        args.devices = "1"
    rows = []
    for n in (int(d) for d in args.devices.split(",")):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
               "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "bench")])}
        cmd = [sys.executable, __file__, "--worker", "--devices", str(n), "--steps", str(args.steps),
               "--configs", args.configs, "--prefetch", args.prefetch, "--rounds", str(args.rounds)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode:
            print((_prefetch_table if args.prefetch else _table)(rows) if rows else "(no rows)")
            sys.exit(f"worker with {n} device(s) failed:\n{proc.stderr[-4000:]}")
        print(f"... {n} device(s) done", file=sys.stderr, flush=True)
    if args.prefetch:
        print(f"LDM train step on captioned-shapes images through DataIterator + DevicePrefetcher, batch {BATCH}, "
              f"1 device, load average {os.getloadavg()[0]:.1f} (median of {args.rounds} alternating rounds of "
              f"{args.steps} steps)")
        print(_prefetch_table(rows))
        return
    print(f"LDM train step, batch {BATCH}, 8x8x4 latents from 32x32 images (median of {args.steps} steps)")
    print(_table(rows))
    by = {(r["size"], r["devices"], r["kind"], r["dtype"], r["remat"]): r for r in rows}
    for size in args.configs.split(","):
        ours, theirs = by.get((size, 1, "jit", "float32", False)), by.get((size, 1, "pmap", "float32", False))
        if ours and theirs:
            print(f"{size}: our jit step / diffusers-style pmap step time on 1 device: "
                  f"{ours['step_ms'] / theirs['step_ms']:.2f}")
        one, eight = by.get((size, 1, "jit", "float32", False)), by.get((size, 8, "jit", "float32", False))
        if one and eight:
            print(f"{size}: images/s on 8 fake devices / 1 device (jit): {one['step_ms'] / eight['step_ms']:.2f}")


if __name__ == "__main__":
    main()
