"""Mesh, sharding rules, the train step on 1 vs 8 devices (data parallel, FSDP), gradient accumulation,
the optimiser, EMA warm-up, batch assembly and distributed-argument resolution. 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import multihost_worker as toy
from ldm_jax import parallel
from ldm_jax.config import build_dataclass
from ldm_jax.training import ema, optim, state as state_lib
from ldm_jax.training.loop import make_train_step

BATCH = 16


def _setup(mesh, *, rules=parallel.DEFAULT_PARAM_RULES, accumulate=1, loss=toy.loss_fn, clip=1.0):
    cfg = optim.OptimizerConfig(learning_rate=3e-3, scale_lr=False, warmup_steps=0, grad_clip_norm=clip,
                                accumulate_grad_batches=accumulate)
    tx, schedule = optim.make_optimizer(cfg, cfg.learning_rate)
    state = state_lib.init_train_state(toy.init_params, tx=tx, key=jax.random.key(0), ema_decay=0.9, mesh=mesh,
                                       rules=rules)
    step = make_train_step(loss, mesh=mesh, state_shardings=state_lib.shardings_of(state),
                           accumulate_grad_batches=accumulate, learning_rate_fn=schedule)
    return state, step


def _train(mesh, steps=3, **kw):
    state, step = _setup(mesh, **kw)
    key = jax.random.key(1)
    losses = [_host(state.params)]  # losses[0]: the initial params
    for i in range(steps):
        batch = parallel.host_local_to_global(toy.global_batch(i, BATCH), mesh)
        state, metrics = step(state, batch, key)
        losses.append(parallel.fetch_replicated(metrics))
    return state, losses


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_make_mesh_axes_and_errors():
    mesh = parallel.make_mesh(data=-1, fsdp=4)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert list(mesh.devices.flat) == jax.devices()
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert parallel.make_mesh(1, 1, devices=jax.devices()[:1]).size == 1
    with pytest.raises(ValueError, match="not divisible"):
        parallel.make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError, match="!= 8 devices"):
        parallel.make_mesh(data=2, fsdp=2)
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh(data=-1, fsdp=-1)


def test_param_specs_follow_rules_and_reach_the_state():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rules = (("dense_out/kernel", (None, "fsdp")), ("conv_in/bias", ()), ("dense_hidden/kernel", ("data", "fsdp")),
             (".*", parallel.FSDP_AUTO))
    state, _ = _setup(mesh, rules=rules)
    params = state.params
    expected = {
        ("dense_out", "kernel"): P(None, "fsdp"),          # explicit rule, (16, 4)
        ("conv_in", "bias"): P(),                          # explicit replicate
        ("dense_hidden", "kernel"): P("data", "fsdp"),     # both axes, (8, 16)
        ("conv_in", "kernel"): P(None, None, None, "fsdp"),  # auto: largest divisible dim of (3, 3, 3, 8)
        ("dense_hidden", "bias"): P("fsdp"),               # auto: (16,)
        ("dense_out", "bias"): P("fsdp"),                  # auto: (4,) divisible by 4
    }
    specs = parallel.param_specs(params, rules, mesh)
    for (module, leaf), spec in expected.items():
        assert specs[module][leaf] == spec, (module, leaf)
        assert params[module][leaf].sharding.spec == spec, (module, leaf)
        assert state.ema_params[module][leaf].sharding.spec == spec, (module, leaf)
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw = chain(scale_by_adam, ...) -> ScaleByAdamState
    assert isinstance(adam, optax.ScaleByAdamState)
    for (module, leaf), spec in expected.items():
        assert adam.mu[module][leaf].sharding.spec == spec and adam.nu[module][leaf].sharding.spec == spec
    assert adam.count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
    # Auto rule: nothing divisible -> replicated; fsdp=1 -> replicated.
    assert parallel.spec_for("w", (3, 5), parallel.FSDP_AUTO, mesh) == P()
    assert parallel.spec_for("w", (8, 8), parallel.FSDP_AUTO, mesh) == P(None, "fsdp")  # tie -> later dim
    assert parallel.spec_for("w", (8, 16), parallel.FSDP_AUTO, parallel.make_mesh()) == P()


def test_mesh_config_from_a_config_section():
    section = ml_collections.ConfigDict({"data": 2, "fsdp": 4, "param_rules": [
        ("dense_out/kernel", [None, "fsdp"]), ("conv_in/kernel", P(None, None, None, ("data", "fsdp"))),
        (".*", parallel.FSDP_AUTO)]})
    cfg = build_dataclass(parallel.MeshConfig, section, where="mesh")
    hash(cfg)  # hashable: usable as a static argument
    mesh = parallel.mesh_from_config(cfg)
    specs = parallel.param_specs(jax.eval_shape(toy.init_params, jax.random.key(0)), cfg.param_rules, mesh)
    assert specs["dense_out"]["kernel"] == P(None, "fsdp")
    assert specs["conv_in"]["kernel"] == P(None, None, None, ("data", "fsdp"))
    assert specs["dense_hidden"]["kernel"] == P(None, "fsdp")
    with pytest.raises(ValueError, match=r"param_rules\[0\]: bad regex"):
        parallel.MeshConfig(param_rules=(("(", ()),))
    with pytest.raises(ValueError, match=r"param_rules\[1\] = 'kernel': expected a \(regex, spec\) pair"):
        parallel.MeshConfig(param_rules=((".*", ()), "kernel"))


def test_bad_rules_name_the_parameter():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    abstract = jax.eval_shape(toy.init_params, jax.random.key(0))
    with pytest.raises(ValueError, match="no sharding rule matches parameter 'conv_in/bias'"):
        parallel.param_specs(abstract, (("kernel", ()),), mesh)
    with pytest.raises(ValueError, match=r"'conv_in/kernel'.*dimension 2 of shape \(3, 3, 3, 8\).*'fsdp'"):
        parallel.param_specs(abstract, (("conv_in/kernel", (None, None, "fsdp")), (".*", ())), mesh)
    with pytest.raises(ValueError, match="axis 'model' is not a mesh axis"):
        parallel.param_specs(abstract, ((".*", ("model",)),), mesh)
    with pytest.raises(ValueError, match="more entries than shape"):
        parallel.param_specs(abstract, (("bias", (None, None)), (".*", ())), mesh)


@pytest.fixture(scope="module")
def one_device_run():
    state, (init, *metrics) = _train(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
    return _host((state.params, state.ema_params, state.opt_state)), init, metrics


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_steps_match_one_device(one_device_run, data, fsdp):
    one_state, init, one_losses = one_device_run
    state, (_, *losses) = _train(parallel.make_mesh(data, fsdp))
    if fsdp > 1:
        assert state.params["dense_hidden"]["kernel"].sharding.spec == P(None, "fsdp")
    for a, b in zip(one_losses, losses, strict=True):
        for name in ("loss", "mae", "grad_norm", "param_norm"):
            # float32 sums in a different order on 8 devices: agreement to a few ulps of the values.
            np.testing.assert_allclose(b[name], a[name], rtol=2e-6, err_msg=name)
    # Params, EMA and Adam moments after 3 steps: last-bit float32 differences from the summation order
    # (measured <= 3e-8 absolute; atol ~ 2 ulp of the largest parameter, 0.78).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7),
                 one_state, _host((state.params, state.ema_params, state.opt_state)))
    assert int(state.step) == 3
    moved = np.abs(one_state[0]["dense_out"]["kernel"] - init["dense_out"]["kernel"]).max()
    assert moved > 1e-3  # the steps really changed the params (lr 3e-3)


def test_gradient_accumulation_equals_the_full_batch():
    mesh = parallel.make_mesh(data=4, fsdp=2)
    full, (_, *full_losses) = _train(mesh, steps=2, loss=toy.deterministic_loss_fn)
    accum, (_, *accum_losses) = _train(mesh, steps=2, accumulate=2, loss=toy.deterministic_loss_fn)
    for a, b in zip(full_losses, accum_losses, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-6)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7),
                 _host(full.params), _host(accum.params))
    with pytest.raises(ValueError, match="not divisible by accumulate_grad_batches=3"):
        state, step = _setup(mesh, accumulate=3)
        step(state, parallel.host_local_to_global(toy.global_batch(0, BATCH), mesh), jax.random.key(0))


def test_train_step_is_pure_and_traced_once():
    mesh = parallel.make_mesh()
    traces = []

    def counting_loss(params, batch, key):
        traces.append(1)
        return toy.loss_fn(params, batch, key)

    state, step = _setup(mesh, loss=counting_loss)
    batch = parallel.host_local_to_global(toy.global_batch(0, BATCH), mesh)
    key = jax.random.key(3)
    start = _host(state.params)
    state, m1 = step(state, batch, key)
    state, m2 = step(state, batch, key)
    assert len(traces) == 1
    assert set(m1) == {"loss", "mae", "grad_norm", "param_norm", "learning_rate"}
    # Same batch and key but a different step -> a different noise draw (fold_in(key, step)) and new params.
    assert float(m1["loss"]) != float(m2["loss"])
    # The step's randomness is fold_in(fold_in(key, step), micro_batch): recompute step 0's loss directly.
    host_batch = toy.global_batch(0, BATCH)
    want, _ = toy.loss_fn(start, host_batch, jax.random.fold_in(jax.random.fold_in(key, 0), 0))
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-6)
    assert not np.array_equal(start["conv_in"]["kernel"], _host(state.params)["conv_in"]["kernel"])


def test_frozen_arrays_enter_the_step_as_arguments():
    # `frozen` (e.g. a frozen first stage) reaches loss_fn as a 4th argument, sharded, not donated, not trained.
    mesh = parallel.make_mesh(data=2, fsdp=4)
    frozen = {"w": jax.device_put(jnp.full((4,), 2.0), jax.sharding.NamedSharding(mesh, P("fsdp")))}

    def loss_with_frozen(params, batch, key, frozen):
        loss, aux = toy.deterministic_loss_fn(params, batch, key)
        return loss * frozen["w"].mean(), aux

    batch = parallel.host_local_to_global(toy.global_batch(0, BATCH), mesh)
    state, _ = _setup(mesh)
    want, _ = toy.deterministic_loss_fn(_host(state.params), toy.global_batch(0, BATCH), None)
    step = make_train_step(loss_with_frozen, mesh=mesh, state_shardings=state_lib.shardings_of(state), frozen=frozen)
    _, metrics = step(state, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], 2.0 * want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(frozen["w"]), 2.0)  # still alive: not donated


def test_optimizer_schedule_clipping_and_lr_scaling():
    assert optim.scaled_learning_rate(1e-6, batch_size=4, num_devices=8, accumulate_grad_batches=2) == pytest.approx(
        64e-6)
    cfg = optim.OptimizerConfig(learning_rate=1e-6, scale_lr=True, accumulate_grad_batches=2, warmup_steps=4)
    assert optim.learning_rate(cfg, global_batch_size=64, num_devices=8) == pytest.approx(64e-6)
    assert optim.learning_rate(cfg.__class__(learning_rate=2e-4, scale_lr=False), global_batch_size=64,
                               num_devices=8) == 2e-4
    with pytest.raises(ValueError, match="not divisible"):
        optim.learning_rate(cfg, global_batch_size=20, num_devices=8)
    with pytest.raises(ValueError, match="accumulate_grad_batches=0"):
        optim.OptimizerConfig(accumulate_grad_batches=0)
    schedule = optim.make_schedule(cfg, 1.0)
    np.testing.assert_allclose([schedule(n) for n in range(6)], [0, 0.25, 0.5, 0.75, 1, 1])
    # Clipping happens before AdamW, inside the chain: compare with a hand-built chain on a huge gradient.
    clip_cfg = optim.OptimizerConfig(learning_rate=0.1, scale_lr=False, grad_clip_norm=0.5, weight_decay=0.0)
    tx, _ = optim.make_optimizer(clip_cfg, 0.1)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([300.0, -400.0, 0.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    clipped = {"w": grads["w"] * 0.5 / 500.0}
    ref = optax.adam(0.1)
    ref_updates, _ = ref.update(clipped, ref.init(params), params)
    np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-6)
    # AdamW matches torch.optim.AdamW (decoupled decay) for a few steps.
    torch = pytest.importorskip("torch")
    w0 = np.array([0.5, -1.0, 2.0], np.float32)
    tp = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tp], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    tx, _ = optim.make_optimizer(optim.OptimizerConfig(scale_lr=False), 0.01)
    p = {"w": jnp.asarray(w0)}
    s = tx.init(p)
    for i in range(3):
        g = np.array([0.1, -0.2, 0.3], np.float32) * (i + 1)
        tp.grad = torch.tensor(g)
        topt.step()
        u, s = tx.update({"w": jnp.asarray(g)}, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["w"], tp.detach().numpy(), rtol=1e-6)


def test_ema_warmup_matches_diffusers_emamodel():
    # diffusers' EMAModel with update_after_step=-1 applies decay min(d, (1 + n) / (10 + n)) at its n-th step:
    # exactly LitEma's warm-up, an independent reference.
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    tparam = torch.nn.Parameter(torch.tensor(params["w"]))
    ref = EMAModel([tparam], decay=0.95, min_decay=0.0, update_after_step=-1, use_ema_warmup=False)
    shadow = {"w": jnp.asarray(params["w"])}
    for n in range(1, 40):
        new = rng.normal(size=(4, 3)).astype(np.float32)
        with torch.no_grad():
            tparam.copy_(torch.tensor(new))
        ref.step([tparam])
        shadow = ema.ema_update(shadow, {"w": jnp.asarray(new)}, decay=0.95, num_updates=n)
        np.testing.assert_allclose(shadow["w"], ref.shadow_params[0].numpy(), rtol=1e-5, atol=1e-6)
    assert float(ema.ema_decay(0.9999, 1)) == pytest.approx(2 / 11)
    assert float(ema.ema_decay(0.95, 10**6)) == pytest.approx(0.95)


def test_host_local_to_global_and_fetch():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    batch = toy.global_batch(0, BATCH)
    out = parallel.host_local_to_global(batch, mesh)
    assert out["x"].sharding.spec == P(("data", "fsdp")) and out["x"].shape == (BATCH, 8, 8, 3)
    assert len(out["x"].addressable_shards) == 8 and out["x"].addressable_shards[0].data.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(out["y"]), batch["y"])
    with pytest.raises(ValueError, match=r"batch leaf 'x'.*global leading size of 12"):
        parallel.host_local_to_global({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="expected replicated"):
        parallel.fetch_replicated(out["x"])


def test_resolve_distributed_args():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert parallel.resolve_distributed_args(environ=env) == ("10.0.0.1:1234", 4, 2)
    assert parallel.resolve_distributed_args("h:1", 2, 0, environ=env) == ("h:1", 2, 0)  # flags win
    assert parallel.resolve_distributed_args(environ={}) == (None, None, None)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four'"):
        parallel.resolve_distributed_args(environ={"JAX_NUM_PROCESSES": "four"})


@pytest.mark.parametrize("args, message", [
    (("localhost", None, None), "--coordinator .*'localhost': expected host:port"),
    (("h:70000", None, None), "port in \\[1, 65535\\]"),
    ((None, 0, None), "--num_processes .*>= 1, got 0"),
    ((None, None, -1), "--process_id .*>= 0, got -1"),
    (("h:1", 2, 2), "--process_id .*in \\[0, 2\\), got 2"),
])
def test_resolve_distributed_args_refuses_bad_values(args, message):
    with pytest.raises(ValueError, match=message):
        parallel.resolve_distributed_args(*args, environ={})
