"""ControlNet training in the ldm stage (issue 17, item 4) and its data: (image, caption, control image).

The run starts from a tiny random model directory shaped like the embedded shapes model (configs/controlnet_shapes.py
with a one-level UNet and a one-layer text tower; the shipped tokenizer) and trains through the real entry point
(`main.train_and_evaluate`) on a folder of rendered captioned-shapes scenes whose control images are rendered from
the captions (data.control_key="shapes_mask"), one device, 3 steps, checkpoints at 2 and 3.

- Only the ControlNet trains (the state holds {"controlnet"}), the base in the workdir is the base bit for bit, the
  ControlNet moved away from its from_unet start; WORKDIR/controlnet/ equals the EMA params and loads in diffusers'
  ControlNetModel.from_pretrained with no missing or unexpected keys. The sample grid (step 3) is steered by the
  eval examples' control images, logged beside it.
- A run stopped after its step-2 checkpoint and resumed ends bitwise equal to the uninterrupted one.
- At initialisation (zero convolutions) the ControlNet loss is the base model's `ldm.training_loss` (to float32
  rounding: 1 ulp at most),
  and only the zero convolutions get gradients (ControlNet's defining property).
- Data: the shapes control image is white exactly where `render` paints objects; folder and tar layouts
  (`<stem>.conditioning_image.<ext>`) read the control image beside each image; a random crop + flip moves image and
  control together; a missing control image (indexing) and one of another size (reading) are one-line errors
  naming the file, the first through the command line.
- Bad recipes are one-line errors naming the config field; both new configs build (shapes only).
"""
import dataclasses
import io
import pathlib
import shutil
import tarfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import tokenizer_fixtures
from adapter_fixtures import TINY_TRAIN, write_tiny_model
from ldm_jax import ldm, store
from ldm_jax.data import pipeline, readers, shapes
from ldm_jax.images import image_grid
from ldm_jax.models.controlnet import check_controlnet_fits, controlnet_param_shapes, controlnet_params_from_unet
from ldm_jax.training import controlnet, main, train_ldm

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# One UNet level, a one-layer text tower, a small hint encoder (f = 4: three widths); folder data.
TINY = {**TINY_TRAIN, "train.controlnet.conditioning_embedding_out_channels": "(8,8,16)", "data.source": "folder",
        "data.name": "", "train.eval_split": "", "train.ema_decay": 0.9, "checkpoint.every_steps": 2}

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: repeated programs hit XLA's cache


def _config(overrides=None, name="controlnet_shapes.py"):
    return main.load_config(CONFIGS / name, [f"--config.{k}={v}" for k, v in {**TINY, **(overrides or {})}.items()])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random model directory with the tiny shapes architecture and the shipped word-level tokenizer."""
    return write_tiny_model(ldm.ldm_config(_config()), tmp_path_factory.mktemp("tiny_model"))


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 4 rendered 32x32 scenes with their captions (.txt), no control files."""
    folder = tmp_path_factory.mktemp("images")
    for i, scene in enumerate(_scenes(4)):
        Image.fromarray(shapes.render(scene, 32)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(shapes.caption(scene))
    return folder


def _run_config(tiny_model, images):
    """The 3-step run, with a sample grid at its last step."""
    return _config({"train.init_from": str(tiny_model), "data.path": str(images), "train.image_every": 3})


@pytest.fixture(scope="module")
def run(tiny_model, images, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("controlnet")
    return workdir, main.train_and_evaluate(_run_config(tiny_model, images), workdir)


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


# ------------------------------------------------------------------------------------------------ training


def test_only_the_controlnet_trains_and_exports(run, tiny_model):
    workdir, result = run
    base = store.load_model(tiny_model)
    assert set(result.state.params) == {"controlnet"} and result.export_dir is None
    assert result.adapter_files == (workdir / controlnet.CONTROLNET_DIR,)
    frozen = store.load_params(workdir / train_ldm.FROZEN_FILE, store.param_shapes(base.config))
    for part in ("first_stage", "cond_stage", "unet"):
        for k, v in _flat(base.params[part]).items():
            np.testing.assert_array_equal(_flat(frozen[part])[k], v, err_msg=f"{part}/{k}")
    # From the base UNet (from_unet, zero convs zero), the ControlNet moved: the zero convolutions are no longer zero.
    stage = train_ldm.build_stage(_run_config(tiny_model, store.SHIPPED_MODELS["shapes"]), workdir)
    start = controlnet_params_from_unet(base.params["unet"], controlnet.architecture(stage.model, stage.train.controlnet),
                                        jax.random.key(0))
    trained = _flat(result.state.params["controlnet"])
    assert _flat(start).keys() == trained.keys()
    assert np.abs(trained["controlnet_mid_block/kernel"]).max() > 0
    # The export is the EMA params, and diffusers loads it strictly.
    loaded = store.load_controlnet(workdir / controlnet.CONTROLNET_DIR, base=base.config.unet)
    for k, v in _flat(result.state.ema_params["controlnet"]).items():
        np.testing.assert_array_equal(_flat(loaded.params)[k], v, err_msg=k)
    config = loaded.config
    assert config.unet.position_embedding is None and config.hint_factor == 4
    diffusers = pytest.importorskip("diffusers")
    model, info = diffusers.ControlNetModel.from_pretrained(workdir / controlnet.CONTROLNET_DIR, output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in model.parameters()) == sum(v.size for v in trained.values())


def test_sample_grids_are_steered_by_the_eval_examples_control_images(run):
    """The step-3 grid: samples from the trained ControlNet, and beside them the control images that steered them,
    those of the eval split's first examples (here the training folder's first two scenes)."""
    workdir, _ = run
    samples = np.asarray(Image.open(workdir / "images" / "samples_00000003.png"))
    assert samples.shape == (32, 64, 3) and samples.std() > 0
    control = np.asarray(Image.open(workdir / "images" / "control_00000003.png"))
    expected = image_grid(np.stack([shapes.render_mask(scene, 32) for scene in _scenes(4)[:2]]))
    np.testing.assert_array_equal(control, expected)


def test_resume_is_exact(run, tiny_model, images, tmp_path, abstract_init_only):
    """Stopped after the step-2 checkpoint (step 3's removed), run again: the end state equals the uninterrupted."""
    workdir, result = run
    stopped = tmp_path / "stopped"
    shutil.copytree(workdir, stopped)
    shutil.rmtree(stopped / "checkpoints" / "3")
    abstract_init_only(train_ldm)
    resumed = main.train_and_evaluate(_run_config(tiny_model, images), stopped)
    assert int(resumed.state.step) == 3
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_at_init_is_the_base_loss_and_only_zero_convs_get_gradients(tiny_model, images, tmp_path):
    stage = train_ldm.build_stage(_run_config(tiny_model, images), tmp_path)
    base = store.load_model(tiny_model)
    stage = train_ldm.with_init_tokenizers(stage, base, tmp_path)
    stage, frozen = train_ldm.with_adapter(stage, base.params, jax.random.key(0))
    batch = next(train_ldm.image_iterator(stage))
    batch = {k: batch[k] for k in ("image", "tokens", "control")}
    key = jax.random.key(7)
    empty = ldm.empty_prompt_ids(stage.model, stage.tokenizer)
    loss = train_ldm.make_stage_loss(stage)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(p, batch, key, frozen)[0]))(stage.adapter.initial)
    reference = jax.jit(lambda p: ldm.training_loss(stage.model, p, batch, key, empty_prompt=empty)[0])(frozen)
    # Two differently fused programs: bit-equal where XLA emits AVX2 code, 1 ulp apart (1.2e-7) on an AVX-512 host.
    np.testing.assert_allclose(np.asarray(value), np.asarray(reference), rtol=5e-7, atol=0)
    norms = {k: float(np.abs(g).max()) for k, g in _flat(grads["controlnet"]).items()}
    zero_convs = {k for k in norms if k.startswith(("controlnet_down_blocks_", "controlnet_mid_block"))}
    assert all(norms[k] > 0 for k in zero_convs if k.endswith("bias"))
    assert all(v == 0 for k, v in norms.items() if k not in zero_convs), {k: v for k, v in norms.items() if v}


# -------------------------------------------------------------------------------------------------- data


def test_shapes_control_image_is_the_scenes_masks():
    for scene in _scenes(8, seed=1):
        image, mask = shapes.render(scene, 32), shapes.render_mask(scene, 32)
        assert mask.dtype == np.uint8 and mask.shape == (32, 32, 3) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask[..., 0] == 255, image.any(axis=-1))
        union = np.any([shapes.object_mask(obj, 32) for obj in scene], axis=0)
        np.testing.assert_array_equal(mask == 255, np.repeat(union[..., None], 3, axis=-1))


def test_shapes_batches_carry_control(images):
    cfg = pipeline.DataConfig(source="folder", path=str(images), control_key="shapes_mask", global_batch_size=4,
                              shuffle=False, batch_keys=("image", "caption", "control"))
    batch = next(pipeline.make_iterator(cfg))
    assert batch["control"].shape == (4, 32, 32, 3) and batch["control"].dtype == np.float32
    for image, caption, control in zip(batch["image"], batch["caption"], batch["control"]):
        np.testing.assert_array_equal(control, shapes.render_mask(shapes.parse_caption(caption), 32) / 255.0)
        np.testing.assert_array_equal(control[..., 0] == 1.0, (image > -1).any(axis=-1))


def _noise_pair(rng, height=32, width=40):
    """A random uint8 image and its control image: white where the image's red channel is > 127."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return image, np.repeat(np.where(image[..., :1] > 127, 255, 0).astype(np.uint8), 3, axis=-1)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_folder(folder, pairs, skip_control=()):
    folder.mkdir()
    for i, (image, control) in enumerate(pairs):
        (folder / f"{i:04d}.png").write_bytes(_png(image))
        (folder / f"{i:04d}.txt").write_text(f"caption {i}")
        if i not in skip_control:
            (folder / f"{i:04d}.conditioning_image.png").write_bytes(_png(control))
    return folder


def _write_tar(path, folder):
    with tarfile.open(path, "w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=file.name)
    return path


def test_folder_and_tar_read_the_control_image_beside_each_image_and_flip_it_with_the_image(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [_noise_pair(rng) for _ in range(6)]
    folder = _write_folder(tmp_path / "f", pairs)
    shard = _write_tar(tmp_path / "s.tar", folder)
    for source, path in (("folder", folder), ("tar", shard)):
        cfg = pipeline.DataConfig(source=source, path=str(path), control_key="conditioning_image", crop="random",
                                  random_flip=True, global_batch_size=6, shuffle=False,
                                  batch_keys=("image", "control", "caption", "crop_top_left"))
        it = pipeline.make_iterator(cfg)
        assert len(it.source) == 6  # control images are not indexed as images
        batch = next(it)
        assert batch["caption"] == [f"caption {i}" for i in range(6)]
        # The same crop and flip: the control is still exactly the thresholded image.
        np.testing.assert_array_equal(batch["control"], np.repeat(batch["image"][..., :1] > 0, 3, -1).astype(np.float32))
        flipped = [not np.array_equal(img, (pairs[i][0][:, left:left + 32].astype(np.float32) / 127.5 - 1))
                   for i, (img, (_, left)) in enumerate(zip(batch["image"], batch["crop_top_left"]))]
        assert any(flipped) and not all(flipped)


def test_a_missing_control_image_is_refused_naming_the_file(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setattr(main.parallel, "initialize_distributed", lambda *args: False)
    rng = np.random.default_rng(0)
    folder = _write_folder(tmp_path / "f", [_noise_pair(rng) for _ in range(3)], skip_control={1})
    with pytest.raises(ValueError, match=r"0001\.png has no control image beside it \(expected "
                                         r"0001\.conditioning_image\.jpg"):
        readers.ImageFolderSource(folder, control_key="conditioning_image")
    with pytest.raises(ValueError, match=r"member 0001\.png has no control image member"):
        readers.TarShardsSource(_write_tar(tmp_path / "s.tar", folder), control_key="conditioning_image")
    argv = [f"--config={CONFIGS / 'controlnet_shapes.py'}", "--workdir", str(tmp_path / "w"),
            f"--config.train.init_from={tiny_model}", "--config.data.source=folder", f"--config.data.path={folder}",
            "--config.data.control_key=conditioning_image"]
    assert main.main(argv, prog="train.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0001.png has no control image beside it" in err, err


def test_a_control_image_of_another_size_is_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [_noise_pair(rng) for _ in range(2)]
    pairs[1] = (pairs[1][0], pairs[1][1][:, :36])
    folder = _write_folder(tmp_path / "f", pairs)
    source = readers.ImageFolderSource(folder, control_key="conditioning_image")
    assert source[0]["control"].shape == (32, 40, 3)
    with pytest.raises(pipeline.DataError, match=r"^0001\.conditioning_image\.png \(the control image of 0001\.png\) "
                                                  r"is 36x32 .* but its image is 40x32"):
        source[1]
    with pytest.raises(readers.DataError, match="conditioning_image.png"):
        readers.TarShardsSource(_write_tar(tmp_path / "s.tar", folder), control_key="conditioning_image")[1]


# ------------------------------------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("overrides, message", [
    ({"data.control_key": ""}, "set data.control_key"),
    ({"train.controlnet.conditioning_embedding_out_channels": "(8,16)"},
     r"conditioning_embedding_out_channels=\(8, 16\) downsamples the control image by 2; the first stage's factor "
     "is 4"),
    ({"train.export_merged": True}, "train.export_merged is not supported with train.adapter='controlnet'"),
    ({"data.batch_keys": "(image,tokens)"}, r"exactly \('image', 'tokens', 'control'\)"),
    ({"train.init_from": ""}, "set train.init_from"),
])
def test_bad_recipes_are_refused_naming_the_field(overrides, message, tmp_path):
    config = _config({"train.init_from": "unused", **overrides})
    with pytest.raises(ValueError, match=message):
        train_ldm.build_stage(config, tmp_path)


def test_a_controlnet_for_another_base_is_refused(tiny_model, images, tmp_path):
    stage = train_ldm.build_stage(_run_config(tiny_model, images), tmp_path)
    fresh = controlnet.architecture(stage.model, stage.train.controlnet)
    other = dataclasses.replace(fresh, unet=dataclasses.replace(fresh.unet, context_dim=16))
    fits = dict(latent_channels=stage.model.latent_channels, downsample_factor=stage.model.downsample_factor)
    with pytest.raises(ValueError, match=r"^X: a ControlNet for another base architecture: context width 16, the "
                                         r"base UNet's 32$"):
        check_controlnet_fits(other, stage.model.unet, "X", **fits)
    coarse = dataclasses.replace(fresh, conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(ValueError, match=r"^X: a ControlNet for another base architecture: control image factor 2, "
                                         r"the base model's 4$"):
        check_controlnet_fits(coarse, stage.model.unet, "X", **fits)


def test_init_from_a_controlnet_folder_continues_from_it(run, tiny_model, images, tmp_path):
    """train.controlnet.init_from reads the exported folder (`store.load_controlnet`): the run starts there."""
    workdir, result = run
    stage = train_ldm.build_stage(_config({"train.init_from": str(tiny_model), "data.path": str(images),
                                           "train.controlnet.init_from": str(workdir / controlnet.CONTROLNET_DIR)}),
                                  tmp_path)
    adapter = controlnet.prepare(stage, {}, jax.random.key(0))
    for k, v in _flat(result.state.ema_params["controlnet"]).items():
        np.testing.assert_array_equal(_flat(adapter.initial["controlnet"])[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["controlnet_shapes", "controlnet_sd_v1", "controlnet_sd_v2", "controlnet_sdxl"])
def test_configs_build(name, tmp_path):
    """Every config builds its stage (full size, shapes only); the SD ControlNets have the sizes of diffusers'
    ControlNetModel for those UNets (counted on the meta device: SD 2.x 364,228,240, SDXL 1,251,014,160)."""
    overrides = {"train.init_from": "unused"}
    if "sd" in name:
        overrides["train.tokenizer"] = str(tokenizer_fixtures.write_clip_tokenizer(tmp_path / "tok"))
    if name == "controlnet_sdxl":
        overrides["train.tokenizer_2"] = overrides["train.tokenizer"]
    config = main.load_config(CONFIGS / f"{name}.py", [f"--config.{k}={v}" for k, v in overrides.items()])
    stage = train_ldm.build_stage(config, tmp_path)
    assert stage.trainable == ("controlnet",) and stage.data.batch_keys[-1] == "control"
    cfg = controlnet.architecture(stage.model, stage.train.controlnet)
    assert cfg.hint_factor == stage.model.downsample_factor
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(controlnet_param_shapes(cfg)))
    assert count == {"controlnet_shapes": 2_838_704, "controlnet_sd_v1": 361_279_120, "controlnet_sd_v2": 364_228_240,
                     "controlnet_sdxl": 1_251_014_160}[name], count
