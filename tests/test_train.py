"""The training stages end to end on a tiny generated captioned-shapes set (8 fake CPU devices).

- train.py's library function (`main.train_and_evaluate`) runs the autoencoder stage (GAN on) and the LDM
  stage (on that autoencoder, precomputed latents, scale_by_std) for a few steps; each writes checkpoints,
  JSONL metrics, TensorBoard events, an image grid and its export; a rerun resumes the step count.
- Precomputed-latent training equals on-the-fly training (same examples, posterior mean).
- Gradient accumulation over 2 micro-batches equals one update on the whole batch with the same random draws.
- The LDM step on 8 devices equals the step on 1 device.
- Config overrides: an unknown field fails with a clear error (library and train.py); the training configs
  build (abstract state only, nothing allocated for the big ones).
"""
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tokenizer_fixtures
from ldm_jax import ldm, parallel, store
from ldm_jax.data.captioned_shapes import prepare_captioned_shapes
from ldm_jax.training import loop, main, train_autoencoder, train_ldm
from ldm_jax.training import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# Parity of two float32 computations of the same update (reduction orders differ): relative 1e-5 of the largest
# entry, the usual float32 agreement of sums over a few thousand terms.
RTOL = 1e-5


def _configure(path, overrides):
    return main.load_config(CONFIGS / path, [f"--config.{k}={v}" for k, v in overrides.items()])


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: repeats hit XLA's cache


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    name = prepare_captioned_shapes(data_dir, resolution=32, num_train=32, num_validation=8, num_heldout=8)
    return {"data.data_dir": str(data_dir), "data.name": name}


def _ae_config(dataset, **overrides):
    tiny = {"first_stage.num_res_blocks": 1, "data.global_batch_size": 8, "train.num_steps": 2,
            "train.log_every": 1, "train.image_every": 2, "train.num_images": 8, "train.progress_bar": False,
            "checkpoint.every_steps": 100, "mesh.data": 1, "loss.disc_factor": 1.0, "loss.disc_start": 1, "loss.disc_ndf": 8,
            "loss.disc_num_layers": 1}
    return _configure("shapes_autoencoder.py", {**dataset, **tiny, **overrides})


def _ldm_config(dataset, first_stage, **overrides):
    # One UNet level (with attention) and one text block: what these tests check (checkpoints, resume, export,
    # accumulation, device count, precomputed latents) does not depend on the depth, and every compile here (the
    # state's init, each train step) scales with it.
    tiny = {"unet.model_channels": 32, "unet.channel_mult": "(1,)", "unet.num_res_blocks": 1,
            "unet.attention_resolutions": "(1,)", "unet.num_heads": 2, "unet.num_head_channels": -1, "unet.context_dim": 32,
            "cond_stage.hidden_size": 32, "cond_stage.intermediate_size": 64, "cond_stage.num_layers": 1,
            "cond_stage.num_heads": 2, "data.global_batch_size": 8, "train.num_steps": 2, "train.log_every": 1,
            "train.image_every": 2, "train.num_images": 8, "train.sample_steps": 2, "train.progress_bar": False,
            "train.first_stage": str(first_stage), "checkpoint.every_steps": 100, "optimizer.warmup_steps": 2,
            "optimizer.learning_rate": 2e-4,
            "mesh.data": 1,
            "first_stage.num_res_blocks": 1}
    return _configure("shapes_ldm.py", {**dataset, **tiny, **overrides})


def _jsonl_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_run_outputs(workdir, steps, grid_name):
    assert _jsonl_steps(workdir / "metrics.jsonl") == list(range(1, steps + 1))
    assert _checkpoints(workdir)[-1] == steps
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    grid = workdir / "images" / f"{grid_name}_{2:08d}.png"
    assert grid.is_file() and grid.stat().st_size > 0


@pytest.fixture(scope="module")
def autoencoder_run(dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ae")
    result = main.train_and_evaluate(_ae_config(dataset), workdir)
    return workdir, result


def test_autoencoder_stage_end_to_end(autoencoder_run):
    workdir, result = autoencoder_run
    _assert_run_outputs(workdir, 2, "reconstructions")
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # Step 1 is before disc_start (no GAN weight), step 2 after it: both halves ran and logged.
    assert logged[0]["disc_factor"] == 0.0 and logged[1]["disc_factor"] == 1.0
    assert {"loss", "rec_loss", "kl_loss", "g_loss", "d_weight", "disc_loss", "logits_real"} <= set(logged[1])
    assert all(np.isfinite(v) for entry in logged for v in entry.values())
    assert int(result.state.step) == 2 and np.isfinite(result.psnr)
    config, params = store.load_first_stage(result.export_dir)
    np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"],
                                  np.asarray(result.state.params["generator"]["autoencoder"]["decoder"]["conv_out"]
                                             ["kernel"]))
    assert json.loads((workdir / "eval.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_autoencoder_resume_continues(autoencoder_run, dataset, tmp_path, abstract_init_only):
    workdir, first = autoencoder_run
    resumed = tmp_path / "ae"
    _copy_run(workdir, resumed)
    abstract_init_only(train_autoencoder)
    result = main.train_and_evaluate(_ae_config(dataset, **{"train.num_steps": 3}), resumed)
    assert int(result.state.step) == 3 and _checkpoints(resumed)[-1] == 3
    assert _jsonl_steps(resumed / "metrics.jsonl") == [1, 2, 3]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), result.state.params["generator"],
                         first.state.params["generator"])
    assert max(jax.tree.leaves(moved)) > 0  # the third step trained from the restored params


def _copy_run(src, dst):
    shutil.copytree(src, dst)


@pytest.fixture(scope="module")
def ldm_run(autoencoder_run, dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ldm")
    config = _ldm_config(dataset, autoencoder_run[0])
    return workdir, main.train_and_evaluate(config, workdir)


def test_ldm_stage_end_to_end(ldm_run, autoencoder_run):
    workdir, result = ldm_run
    _assert_run_outputs(workdir, 2, "samples")
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_simple", "cond_dropped", "grad_norm", "learning_rate"} <= set(logged[0])
    assert logged[0]["learning_rate"] == pytest.approx(0.0) and logged[1]["learning_rate"] == pytest.approx(1e-4)
    assert (workdir / "latents" / "train.npz").is_file()
    scores = json.loads((workdir / "eval.jsonl").read_text().splitlines()[-1])
    assert scores["step"] == 2 and scores["num_images"] == 8 and 0.0 <= scores["accuracy"] <= 1.0
    # scale_by_std: the factor computed on the first batch is what the checkpoint's config holds.
    saved = train_ldm.saved_config(workdir)
    scale = saved["diffusion"]["scale_factor"]
    assert scale != pytest.approx(0.18215) and 0.05 < scale < 20
    # The export loads as a model: EMA params, the frozen first stage, the stored scale, the tokenizer.
    model = store.load_model(result.export_dir)
    assert model.config.diffusion.scale_factor == pytest.approx(scale)
    np.testing.assert_allclose(model.params["unet"]["conv_out"]["kernel"],
                               np.asarray(result.state.ema_params["unet"]["conv_out"]["kernel"]))
    autoencoder = store.load_first_stage(autoencoder_run[1].export_dir)[1]
    np.testing.assert_array_equal(model.params["first_stage"]["encoder"]["conv_in"]["kernel"],
                                  autoencoder["encoder"]["conv_in"]["kernel"])
    ids = model.tokenizer(["a small red circle at the top left"])["input_ids"][0]
    assert ids[0] == 24 and ids[-1] == 25 and 1 not in ids  # start, end, no unknown word


def test_ldm_resume_and_export_model(ldm_run, autoencoder_run, dataset, tmp_path, abstract_init_only):
    workdir, first = ldm_run
    resumed = tmp_path / "ldm"
    _copy_run(workdir, resumed)
    abstract_init_only(train_ldm)
    config = _ldm_config(dataset, autoencoder_run[0], **{"train.num_steps": 3, "train.image_every": 100})
    result = main.train_and_evaluate(config, resumed)
    assert int(result.state.step) == 3 and _jsonl_steps(resumed / "metrics.jsonl") == [1, 2, 3]
    # The stored scale_factor was kept (the first batch of a resumed run is another batch).
    scale_of = lambda d: train_ldm.saved_config(d)["diffusion"]["scale_factor"]  # noqa: E731
    assert scale_of(resumed) == scale_of(workdir)
    out = train_ldm.export_model(resumed, tmp_path / "exported")
    exported = store.load_model(out)
    np.testing.assert_array_equal(exported.params["unet"]["conv_in"]["kernel"],
                                  np.asarray(result.state.ema_params["unet"]["conv_in"]["kernel"]))


def test_init_from_loads_through_the_store(ldm_run):
    """train.init_from: any store source, checked against the config's shapes (first mismatch named)."""
    _, result = ldm_run
    model = store.load_model(result.export_dir)
    params = train_ldm.load_pretrained(result.export_dir, model.config)
    for part in ("unet", "cond_stage", "first_stage"):
        np.testing.assert_array_equal(jax.tree.leaves(params[part])[0], jax.tree.leaves(model.params[part])[0])
    wider = dataclasses.replace(model.config, unet=dataclasses.replace(model.config.unet, model_channels=64))
    with pytest.raises(ValueError, match=r"first mismatch unet/.*\(32,\) vs model \(64,\)"):
        train_ldm.load_pretrained(result.export_dir, wider)


# ----------------------------------------------------------------------------------- step-level parity


def _stage(dataset, autoencoder_run, tmp_path, **overrides):
    config = _ldm_config(dataset, autoencoder_run[0], **{"train.sample_posterior": False,
                                                         "optimizer.warmup_steps": 0, **overrides})
    return train_ldm.build_stage(config, tmp_path)


def _step_fn(stage, frozen, state, accumulate=1):
    base = ldm.make_loss_fn(stage.model, empty_prompt=ldm.empty_prompt_ids(stage.model, stage.tokenizer),
                            sample_posterior=stage.train.sample_posterior)
    return loop.make_train_step(lambda p, b, k, f: base({**p, **f}, b, k), mesh=stage.mesh,
                                state_shardings=state_lib.shardings_of(state), accumulate_grad_batches=accumulate,
                                frozen=frozen)


def _max_rel(a, b):
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))
    return max(jax.tree.leaves(diffs)) / scale


@pytest.mark.slow
def test_precomputed_latents_equal_on_the_fly(dataset, autoencoder_run, tmp_path):
    stage = _stage(dataset, autoencoder_run, tmp_path, **{"train.precompute_latents": True})
    frozen_np = train_ldm.frozen_params(stage, tmp_path)
    frozen = train_ldm.place(frozen_np, stage)
    images = train_ldm.image_iterator(stage)
    latents = train_ldm.latent_iterator(stage, train_ldm.precompute_latents(stage, frozen_np, tmp_path))
    # The latent iterator reads the same examples in the same order, past the first epoch too.
    for _ in range(5):
        a, b = next(images), next(latents)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert images.get_state()["epoch"] == latents.get_state()["epoch"] == 1
    images.set_state({"epoch": 0, "position": 0})
    latents.set_state({"epoch": 0, "position": 0})
    results = []
    for batches in (images, latents):
        state = train_ldm.init_state(stage, jax.random.key(0))
        state, metrics = _step_fn(stage, frozen, state)(state, parallel.host_local_to_global(next(batches), stage.mesh),
                                                        jax.random.key(1))
        results.append((float(metrics["loss"]), state.params))
    assert results[1][0] == pytest.approx(results[0][0], rel=RTOL)
    assert _max_rel(results[1][1], results[0][1]) < RTOL


def test_first_batch_scale_is_one_over_unbiased_std(dataset, autoencoder_run, tmp_path):
    """scale_by_std: 1 / std (ddof 1) of the first batch's posterior samples, from images or precomputed moments,
    leaving the iterator where it was."""
    stage = _stage(dataset, autoencoder_run, tmp_path, **{"train.sample_posterior": True})
    frozen_np = train_ldm.frozen_params(stage, tmp_path)
    frozen = train_ldm.place(frozen_np, stage)
    key = jax.random.key(3)
    images = train_ldm.image_iterator(stage)
    latents = train_ldm.latent_iterator(stage, train_ldm.precompute_latents(stage, frozen_np, tmp_path))
    values = [train_ldm.first_batch_scale(stage, frozen, batches, key) for batches in (images, latents)]
    assert images.get_state()["position"] == latents.get_state()["position"] == 0
    unit = dataclasses.replace(stage.model, diffusion=dataclasses.replace(stage.model.diffusion, scale_factor=1.0))
    z = ldm.encode_first_stage(unit, frozen_np, next(images)["image"], key)
    expected = 1.0 / np.std(np.asarray(z, np.float64), ddof=1)
    assert values[0] == pytest.approx(expected, rel=1e-5) and values[1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_batch(dataset, autoencoder_run, tmp_path):
    stage = _stage(dataset, autoencoder_run, tmp_path, **{"optimizer.accumulate_grad_batches": 2})
    frozen = train_ldm.place(train_ldm.frozen_params(stage, tmp_path), stage)
    batch = parallel.host_local_to_global(next(train_ldm.image_iterator(stage)), stage.mesh)
    key = jax.random.key(3)
    state = train_ldm.init_state(stage, jax.random.key(0))
    params0 = jax.tree.map(np.asarray, state.params)
    state, metrics = _step_fn(stage, frozen, state, accumulate=2)(state, batch, key)

    # The same update by hand: the loss of the whole batch is the mean over its two micro-batches (examples
    # j, j+2, j+4, ... with key fold_in(fold_in(key, step 0), j)); its gradient is the mean of the micro-batches'
    # gradients (one program, compiled once, run on each); one AdamW step (jitted: run eagerly, optax compiles a
    # few hundred one-op programs, one per leaf shape).
    base = ldm.make_loss_fn(stage.model, empty_prompt=ldm.empty_prompt_ids(stage.model, stage.tokenizer),
                            sample_posterior=False)
    step_key = jax.random.fold_in(key, 0)
    micro_batch_grad = jax.jit(jax.value_and_grad(lambda params, f, b, k: base({**params, **f}, b, k)[0]))
    (loss_0, grads_0), (loss_1, grads_1) = (
        micro_batch_grad(params0, frozen, jax.tree.map(lambda x, j=j: x[j::2], batch), jax.random.fold_in(step_key, j))
        for j in range(2))
    tx, _ = train_ldm._optimizer(stage)

    @jax.jit
    def adamw_step(params, grads_0, grads_1):
        grads = jax.tree.map(lambda a, b: (a + b) / 2, grads_0, grads_1)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    expected = adamw_step(params0, grads_0, grads_1)
    loss = (loss_0 + loss_1) / 2
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=RTOL)
    assert _max_rel(jax.tree.map(np.asarray, state.params), expected) < RTOL


@pytest.mark.slow
def test_ldm_step_one_device_equals_eight(dataset, autoencoder_run, tmp_path):
    stage8 = _stage(dataset, autoencoder_run, tmp_path, **{"mesh.data": -1})
    assert stage8.mesh.size == 8
    stage1 = dataclasses.replace(stage8, mesh=parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
    host_batch = next(train_ldm.image_iterator(stage8))
    frozen_np = train_ldm.frozen_params(stage8, tmp_path)
    # One initial state, created on one device (as the other tests' stages do: a compile they share) and also
    # placed as the 8-device state's shardings say.
    state1 = train_ldm.init_state(stage1, jax.random.key(0))
    target = train_ldm.init_state(stage8, jax.random.key(0), abstract=True)
    state8 = jax.tree.unflatten(jax.tree.structure(target), [
        jax.device_put(np.asarray(x), t.sharding)
        for x, t in zip(jax.tree.leaves(state1), jax.tree.leaves(target), strict=True)])
    out = []
    for stage, state in ((stage8, state8), (stage1, state1)):
        frozen = train_ldm.place(frozen_np, stage)
        batch = jax.device_put(host_batch, parallel.batch_sharding(stage.mesh))
        state, metrics = _step_fn(stage, frozen, state)(state, batch, jax.random.key(1))
        out.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.params)))
    assert out[0][0] == pytest.approx(out[1][0], rel=RTOL)
    assert _max_rel(out[0][1], out[1][1]) < RTOL


# ------------------------------------------------------------------------------------------- configs


def test_unknown_override_fails_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown config field 'train.num_stepz'.*'num_steps'"):
        main.load_config(CONFIGS / "shapes_ldm.py", ["--config.train.num_stepz=3"])
    with pytest.raises(ValueError, match=r"unknown config field 'trian.num_steps': the config has no section 'trian'"):
        main.load_config(CONFIGS / "shapes_ldm.py", ["--config.trian.num_steps=3"])
    with pytest.raises(ValueError, match=r"--config\.train\.num_steps=many: invalid literal for int"):
        main.load_config(CONFIGS / "shapes_ldm.py", ["--config.train.num_steps=many"])
    with pytest.raises(ValueError, match=r"unexpected argument '7'"):
        main.load_config(CONFIGS / "shapes_ldm.py", ["--config.train.num_steps=6", "7"])
    with pytest.raises(FileNotFoundError, match=r"config file .*nosuch.py does not exist"):
        main.load_config(CONFIGS / "nosuch.py")
    config = main.load_config(CONFIGS / "shapes_ldm.py", ["--config.train.num_steps", "7",
                                                          "--config.unet.channel_mult=(1, 2)",
                                                          "--config.train.check_shapes=false"])
    assert config.train.num_steps == 7 and tuple(config.unet.channel_mult) == (1, 2) and not config.train.check_shapes
    assert config.is_locked and main.load_config(CONFIGS / "shapes_ldm.py").train.num_steps != 7
    # The command (what train.py and `ldm-jax train` run): user errors are one line and exit status 2.
    for argv, message in ((["--workdir", str(tmp_path / "w")], "--config is required"),
                          (["--config", "configs/nosuch.py", "--workdir", str(tmp_path / "w")], "does not exist"),
                          (["--config", "configs/shapes_ldm.py"], "--workdir is required"),
                          (["--config=configs/shapes_ldm.py", "--workdir", str(tmp_path / "w"), "--nosuch=1"],
                           "Unknown command line flag 'nosuch'")):
        assert main.main(argv, prog="ldm-jax train") == 2
        err = capsys.readouterr().err
        assert err.startswith("ldm-jax train: error: ") and message in err and err.count("\n") == 1, err
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/shapes_autoencoder.py", "--workdir",
                           str(tmp_path / "w"), "--config.loss.disc_wieght=1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown config field 'loss.disc_wieght'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_refused_config_value_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    # Values that parse but that a stage refuses (found while it is built) are user errors too: one line, exit 2.
    # (In-process: jax.distributed cannot start once this test session's backend runs; nothing to start here.)
    monkeypatch.setattr(main.parallel, "initialize_distributed", lambda *args: False)
    data = [f"--config.{k}={v}" for k, v in dataset.items()]  # the data is checked before the stage is built
    for config, override, message in (("shapes_autoencoder.py", "--config.train.dtype=float16", "train.dtype"),
                                      ("shapes_autoencoder.py", "--config.data.prefetch=-1", "data.prefetch=-1"),
                                      ("shapes_ldm.py", "--config.data.batch_keys=image", "data.batch_keys")):
        argv = [f"--config=configs/{config}", "--workdir", str(tmp_path / "w"), *data, override]
        assert main.main(argv, prog="ldm-jax train") == 2
        err = capsys.readouterr().err
        assert err.startswith("ldm-jax train: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", ["celebahq_ldm_vq4_train", "txt2img_1p4b_train", "sd_v1_finetune"])
def test_configs_build(name, tmp_path):
    overrides = {}
    if name == "txt2img_1p4b_train":
        overrides["train.tokenizer"] = str(tokenizer_fixtures.write_bert_tokenizer(tmp_path / "tok"))
    if name == "sd_v1_finetune":
        overrides["train.tokenizer"] = str(tokenizer_fixtures.write_clip_tokenizer(tmp_path / "tok"))
    stage = train_ldm.build_stage(_configure(f"{name}.py", overrides), tmp_path)
    target = train_ldm.init_state(stage, jax.random.key(0), abstract=True)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(target))
    sizes = {part: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target.params[part])) for part in target.params}
    expected = {"celebahq_ldm_vq4_train": ({"unet"}, None),
                "txt2img_1p4b_train": ({"unet", "cond_stage"}, None),
                "sd_v1_finetune": ({"unet"}, 859_520_964)}[name]
    assert set(sizes) == expected[0]
    if expected[1] is not None:
        assert sizes["unet"] == expected[1]
    assert (target.ema_params is not None) and stage.frozen_names[0] == "first_stage"


def test_shapes_configs_build(tmp_path):
    ae = train_autoencoder.build_stage(main.load_config(CONFIGS / "shapes_autoencoder.py"))
    assert ae.loss.config.perceptual_weight == 0.0  # no VGG weights given: LPIPS off, with a warning
    state = train_autoencoder.init_state(ae, jax.random.key(0), abstract=True)
    assert set(state.params) == {"generator", "discriminator"} and set(state.params["generator"]) == {
        "autoencoder", "logvar"}
    assert set(state.opt_state) == {"generator", "discriminator"} and set(state.model_state) == {"discriminator"}
    stage = train_ldm.build_stage(main.load_config(CONFIGS / "shapes_ldm.py"), tmp_path)
    assert stage.trainable == ("unet", "cond_stage") and stage.model.cond_stage.vocab_size == 26
    # The varied world's variants: the same models on captioned_shapes/res32_varied.
    for name in ("shapes_autoencoder.py", "shapes_ldm.py"):
        exact, varied = (main.load_config(f"{CONFIGS / name}{world}") for world in ("", ":varied"))
        assert (exact.data.name, varied.data.name) == ("captioned_shapes/res32", "captioned_shapes/res32_varied")
        assert varied.to_dict() == {**exact.to_dict(), "data": {**exact.data.to_dict(), "name": varied.data.name}}
    with pytest.raises(ValueError, match="world 'foo'"):
        main.load_config(f"{CONFIGS / 'shapes_ldm.py'}:foo")


def test_f_ablation_configs(tmp_path):
    """configs/f_ablation.py: every point is the varied embedded recipe with only the first stage (and the latent
    shape it sets) changed; f = 4 is the recipe itself; LDM-1 is pixel space."""
    def load(point):
        return main.load_config(f"{CONFIGS / 'f_ablation.py'}:{point}")

    assert load("autoencoder4").to_dict() == main.load_config(f"{CONFIGS / 'shapes_autoencoder.py'}:varied").to_dict()
    assert load("ldm4").to_dict() == main.load_config(f"{CONFIGS / 'shapes_ldm.py'}:varied").to_dict()
    recipe = load("ldm4").to_dict()
    for factor in (1, 2, 8):
        config = load(f"ldm{factor}")
        latent, channels = 32 // factor, 3 if factor == 1 else 4
        assert (config.diffusion.image_size, config.unet.in_channels, config.unet.out_channels,
                tuple(config.unet.position_embedding)) == (latent, channels, channels, (latent, latent))
        same = {k: v for k, v in config.to_dict().items() if k not in ("first_stage", "unet", "diffusion")}
        assert same == {k: v for k, v in recipe.items() if k not in ("first_stage", "unet", "diffusion")}
        stage = train_ldm.build_stage(config, tmp_path / str(factor))
        assert stage.model.downsample_factor == factor and stage.model.latent_channels == channels
        if factor > 1:
            ae = load(f"autoencoder{factor}")
            assert ae.first_stage.to_dict() == config.first_stage.to_dict()
            assert {k: v for k, v in ae.to_dict().items() if k != "first_stage"} == {
                k: v for k, v in load("autoencoder4").to_dict().items() if k != "first_stage"}
    assert load("ldm1").first_stage.kind == "identity"
    for bad in ("autoencoder1", "ldm16", "f4"):
        with pytest.raises(ValueError, match=f"point '{bad}'"):
            load(bad)
