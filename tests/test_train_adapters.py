"""Adapter training in the ldm stage (issue 16): LoRA, textual inversion and DreamBooth with prior preservation.

Every run starts from a tiny random model directory shaped like the embedded shapes model (the recipes' configs,
configs/lora_shapes.py etc., with a small UNet and text tower; the shipped tokenizer) and trains on a folder of
rendered captioned-shapes images, one device.

- LoRA + DreamBooth (one run, prior preservation on 2 generated class images): only the factors train (the
  frozen params in the workdir are the base's, bit for bit; the base at LoRA scale 0 is the base), the exported
  lora.safetensors and lora_kohya.safetensors load back (`load_lora_file`) equal to the EMA factors, the merged export is the base with the
  LoRA merged in, and a run stopped after 2 steps and resumed to 3 ends bitwise equal to the uninterrupted one
  (class images reused, not regenerated).
- The LoRA step's gradients equal the full-parameter gradients projected on the factors.
- Textual inversion: only the new token's rows train; the merged export equals the base everywhere else (and
  `export_model` from the checkpoint gives it again), the exported learned_embeds.safetensors loads back equal.
- DreamBooth: class images are generated once and reused; the weighted loss is instance MSE + w * class MSE on a
  fixed batch; without weights the loss is the plain mean, bit for bit.
- DreamBooth from captioned instance images (the LoRA run again, its programs from the compilation cache): each
  class image is made for its index's class caption (the identifier replaced by the class word), mixed in one
  generation batch; class captions, eval prompts and the per-index cache check follow the sorted instance files.
- Bad recipes are one-line errors naming the config field; every new config builds (shapes only).
"""
import dataclasses
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

import tokenizer_fixtures
from adapter_fixtures import TINY_TRAIN, write_tiny_model
from ldm_jax import ldm, store
from ldm_jax.adapters import lora as lora_lib
from ldm_jax.data import pipeline, readers, shapes
from ldm_jax.training import adapters, dreambooth, main, train_ldm

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY = {**TINY_TRAIN, "train.sample_steps": 2, "checkpoint.every_steps": 100}
# Parity of two float32 computations of the same gradient (different contraction orders).
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: repeated programs hit XLA's cache


def _config(name, overrides):
    return main.load_config(CONFIGS / name, [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random model directory with the tiny shapes architecture and the shipped word-level tokenizer."""
    return write_tiny_model(ldm.ldm_config(_config("lora_shapes.py", {})), tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 4 rendered 32x32 scenes with their captions (.txt)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        scene = shapes.sample_scene(rng)
        Image.fromarray(shapes.render(scene, 32)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(shapes.caption(scene))
    return folder


def _lora_dreambooth(tiny_model, images, **overrides):
    """LoRA (rank 2) + DreamBooth with prior preservation (2 class images) on the tiny model; checkpoints at steps
    2 and 3, a sample grid at step 3, the merged model exported too."""
    return _config("lora_shapes.py", {
        "train.init_from": str(tiny_model), "data.path": str(images), "data.caption_key": "",
        "train.dreambooth.instance_prompt": "a large red sks in the centre",
        "train.dreambooth.class_prompt": "a large red circle in the centre", "train.dreambooth.num_class_images": 2,
        "train.dreambooth.sample_batch_size": 2, "train.lora.rank": 2, "train.lora.kohya": True,
        "train.export_merged": True,
        "train.ema_decay": 0.9, "train.image_every": 3, "checkpoint.every_steps": 2, **overrides})


@pytest.fixture(scope="module")
def lora_run(tiny_model, images, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora")
    return workdir, main.train_and_evaluate(_lora_dreambooth(tiny_model, images), workdir)


# Caption mode, as bench/adapt_shapes.py runs it: "white" (the tokenizer's <|unk|>) names the subject.
CAPTIONS = {"train.dreambooth.instance_prompt": "", "train.dreambooth.class_prompt": "",
            "train.dreambooth.instance_captions": True, "train.dreambooth.identifier": "white",
            "train.dreambooth.class_word": "yellow"}


@pytest.fixture(scope="module")
def white_images(tmp_path_factory):
    """A folder of 3 rendered 32x32 scenes each with one white object, captioned ("a ... white ...")."""
    folder = tmp_path_factory.mktemp("white_images")
    rng = np.random.default_rng(0)
    for i in range(3):
        scene = shapes.sample_new_colour_scene(rng, "white")
        Image.fromarray(shapes.render(scene, 32)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(shapes.caption(scene))
    return folder


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def test_lora_trains_only_the_factors_and_exports(lora_run, tiny_model):
    workdir, result = lora_run
    base = store.load_model(tiny_model)
    assert set(result.state.params) == {"lora"} and result.export_dir == workdir / "model"
    assert (workdir / "images" / f"samples_{3:08d}.png").is_file()
    # The frozen copy in the workdir is the whole base model, bit for bit.
    frozen = _flat(store.load_params(workdir / train_ldm.FROZEN_FILE, ldm.param_shapes(base.config)))
    assert frozen.keys() == _flat(base.params).keys()
    for name, value in _flat(base.params).items():
        np.testing.assert_array_equal(frozen[name], value, err_msg=name)
    # The factors moved (up started at zero); the exported file holds the EMA factors.
    ema = _flat(result.state.ema_params["lora"])
    assert min(float(np.abs(v).max()) for k, v in ema.items() if k.endswith("up")) > 0
    from ldm_jax.convert.lora_files import load_lora_file

    assert result.adapter_files == (workdir / adapters.LORA_FILE, workdir / adapters.LORA_KOHYA_FILE)
    for path in result.adapter_files:  # diffusers / PEFT and kohya layouts
        loaded = load_lora_file(path, base.config)
        assert _flat(loaded.factors).keys() == ema.keys() and set(dict(loaded.alphas).values()) == {2.0}
        for name, value in ema.items():
            np.testing.assert_array_equal(_flat(loaded.factors)[name], value, err_msg=f"{path.name}: {name}")
    # Scale 0 is the base model bit for bit; the merged export is the base with the LoRA at scale 1.
    for name, value in _flat(lora_lib.apply_loras(base.params, [(loaded, 0.0)])).items():
        np.testing.assert_array_equal(value, _flat(base.params)[name], err_msg=name)
    merged = _flat(lora_lib.apply_loras(base.params, [(loaded, 1.0)]))
    exported = _flat(store.load_model(result.export_dir).params)
    changed = [name for name, value in merged.items() if not np.array_equal(value, _flat(base.params)[name])]
    assert changed and all("/attn" in name and name.endswith("kernel") for name in changed)
    for name, value in merged.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_lora_dreambooth_resumes_exactly_and_reuses_class_images(lora_run, tiny_model, images, tmp_path,
                                                                 abstract_init_only):
    """The run stopped after its step-2 checkpoint (step 3's removed) and run again ends where the uninterrupted run
    did, bit for bit. Class images are reused; a missing one is regenerated alone, identical (seeded by index)."""
    workdir, result = lora_run
    stopped = tmp_path / "stopped"
    shutil.copytree(workdir, stopped)
    shutil.rmtree(stopped / "checkpoints" / "3")
    classes = stopped / dreambooth.CLASS_DIR
    original = np.asarray(Image.open(classes / "00001.png"))
    os.remove(classes / "00001.png")
    kept = (classes / "00000.png").stat().st_mtime_ns
    abstract_init_only(train_ldm)
    resumed = main.train_and_evaluate(_lora_dreambooth(tiny_model, images), stopped)
    assert int(resumed.state.step) == 3
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (classes / "00000.png").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(np.asarray(Image.open(classes / "00001.png")), original)
    assert Image.open(classes / "00001.png").text["prompt"] == "a large red circle in the centre"


def test_dreambooth_trains_on_captioned_instance_images(tiny_model, white_images, tmp_path):
    """The LoRA + DreamBooth run in caption mode (2 steps, a grid at step 2; data.caption_key "" is read anyway):
    3 class images for the 3 class captions, written with their own prompts, made in mixed batches."""
    config = _lora_dreambooth(tiny_model, white_images, **CAPTIONS, **{
        "train.dreambooth.num_class_images": 3, "train.num_steps": 2, "train.image_every": 2,
        "train.export_merged": False, "train.lora.kohya": False})
    result = main.train_and_evaluate(config, tmp_path)
    assert int(result.state.step) == 2 and (tmp_path / "images" / f"samples_{2:08d}.png").is_file()
    captions = [(white_images / f"{i}.txt").read_text() for i in range(3)]
    expected = [c.replace(" white ", " yellow ") for c in captions]
    classes = tmp_path / dreambooth.CLASS_DIR
    assert [(classes / f"{i:05d}.txt").read_text().strip() for i in range(3)] == expected
    assert [Image.open(classes / f"{i:05d}.png").text["prompt"] for i in range(3)] == expected
    cfg = _caption_cfg(num_class_images=3)
    prompts = dreambooth.prompts(cfg, readers.ImageFolderSource(white_images))
    assert [c for _, c in prompts.pairs] == expected
    assert dreambooth.cached_class_images(classes, cfg, prompts) == 3  # a rerun reuses them all


def test_lora_step_gradients_are_the_projected_full_gradients(lora_run, tiny_model, images):
    """The train step's loss (`train_ldm.make_stage_loss`: the LoRA merged into the frozen base) differentiated
    w.r.t. the factors equals the full-parameter gradient G of the same loss w.r.t. the base kernels (which enter
    the merged kernel with coefficient 1; one backward pass) projected: d down = coef G up^T, d up = coef down^T G.
    At the run's trained factors (up != 0), on a DreamBooth batch (instance + class, per-example weights)."""
    workdir, result = lora_run
    stage = train_ldm.build_stage(_lora_dreambooth(tiny_model, images), workdir)  # its tokenizer copy
    frozen = train_ldm.frozen_params(stage, workdir)
    stage, frozen = train_ldm.with_adapter(stage, frozen, jax.random.key(stage.train.seed))
    batches = dreambooth.make_batches(stage.data, stage.train.dreambooth, workdir / dreambooth.CLASS_DIR,
                                      tokenizer=train_ldm._tokenize_fn(stage))
    batch = {k: v for k, v in next(batches).items()}
    assert batch["loss_weight"].tolist() == [2.0, 2.0, 2.0, 2.0]  # 2 instance, 2 class examples, weight 1
    factors = jax.tree.map(np.asarray, result.state.params)
    loss = train_ldm.make_stage_loss(stage)
    grads = jax.jit(jax.grad(lambda p, f: loss(p, batch, jax.random.key(5), f)[0], argnums=(0, 1)))
    d_factors, d_frozen = grads(factors, frozen)
    d_base = traverse_util.flatten_dict(d_frozen)
    got = traverse_util.flatten_dict(d_factors["lora"])
    worst = 0.0
    for path, pair in stage.adapter.lora(factors).modules().items():
        g = np.asarray(d_base[(*path, "kernel")], np.float64)
        down, up = np.asarray(pair["down"], np.float64), np.asarray(pair["up"], np.float64)
        coef = dict(stage.adapter.alphas)[path] / up.shape[0]
        assert np.abs(g).max() > 0 and np.abs(up).max() > 0, path
        for name, want in (("down", coef * g @ up.T), ("up", coef * down.T @ g)):
            have = np.asarray(got[(*path, name)], np.float64)
            worst = max(worst, float(np.abs(have - want).max() / np.abs(want).max()))
    print(f"LoRA step gradients vs projected full gradients: worst relative error {worst:.2e}")
    assert worst < RTOL, worst  # measured 3.1e-7


# ----------------------------------------------------------------------------------------- textual inversion


@pytest.fixture(scope="module")
def ti_run(tiny_model, images, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ti")
    config = _config("textual_inversion_shapes.py", {
        "train.init_from": str(tiny_model), "data.path": str(images), "data.prompt": "a large <new-shape> at the top",
        "train.textual_inversion.num_vectors": 2, "train.export_merged": True, "train.num_steps": 2})
    return workdir, main.train_and_evaluate(config, workdir)


def test_textual_inversion_trains_only_the_new_rows(ti_run, tiny_model, tmp_path):
    workdir, result = ti_run
    base = store.load_model(tiny_model)
    rows = np.asarray(result.state.params["embeddings"]["cond_stage"])
    circle = base.tokenizer("circle", add_special_tokens=False)["input_ids"][0]
    table = _flat(base.params)["cond_stage/embeddings/token_embedding/embedding"]
    assert rows.shape == (2, 32) and np.all(np.abs(rows - table[circle]).max(axis=1) > 0)  # both vectors moved
    from ldm_jax.convert.embedding_files import load_embedding_file

    assert result.adapter_files == (workdir / adapters.EMBEDDING_FILE,)
    (name, vectors), = load_embedding_file(result.adapter_files[0]).items()
    assert name == "<new-shape>"
    np.testing.assert_array_equal(np.asarray(vectors), rows)
    # The merged export: the base everywhere, the table grown by the two trained rows; the tokenizer knows them.
    model = store.load_model(result.export_dir)
    assert model.tokenizer.convert_tokens_to_ids(["<new-shape>", "<new-shape>_1"]) == [len(table), len(table) + 1]
    for key, value in _flat(model.params).items():
        if key == "cond_stage/embeddings/token_embedding/embedding":
            np.testing.assert_array_equal(value, np.concatenate([table, rows]))
        else:
            np.testing.assert_array_equal(value, _flat(base.params)[key], err_msg=key)
    # export_model: the same merged model from the workdir's checkpoint alone.
    again = store.load_model(train_ldm.export_model(workdir, tmp_path / "exported"))
    assert again.config == model.config and again.tokenizer.get_added_vocab() == model.tokenizer.get_added_vocab()
    for key, value in _flat(again.params).items():
        np.testing.assert_array_equal(value, _flat(model.params)[key], err_msg=key)


# ------------------------------------------------------------------------------------------ DreamBooth loss


def test_prior_preservation_loss_is_the_weighted_sum(tiny_model):
    """training_loss with per-example weights (instance B / n_i, class w B / n_c) is instance MSE + w * class MSE on
    a fixed batch; without weights it is the plain mean, bit for bit (weights of 1 change nothing either)."""
    model = store.load_model(tiny_model)
    rng = np.random.default_rng(3)
    empty = ldm.empty_prompt_ids(model.config, model.tokenizer)
    batch = {"image": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
             "tokens": np.repeat(np.asarray(empty), 4, axis=0)}
    key = jax.random.key(4)

    @jax.jit
    def losses(params, batch, weights):
        plain = ldm.training_loss(model.config, params, batch, key, empty_prompt=empty)[0]
        weighted = ldm.training_loss(model.config, params, {**batch, "loss_weight": weights}, key, empty_prompt=empty)
        return plain, weighted[0]

    w = 0.7
    ones = np.ones(4, np.float32)
    one_hot = np.eye(4, dtype=np.float32) * 4  # loss_weight = 4 e_i picks example i's loss
    plain, with_ones = losses(model.params, batch, ones)
    assert np.asarray(plain).tobytes() == np.asarray(with_ones).tobytes()
    per_example = np.array([float(losses(model.params, batch, one_hot[i])[1]) for i in range(4)])
    weights = np.array([2, 2, 2 * w, 2 * w], np.float32)  # WeightedConcatIterator's for 2 + 2 examples
    got = float(losses(model.params, batch, weights)[1])
    assert got == pytest.approx(per_example[:2].mean() + w * per_example[2:].mean(), rel=1e-6)
    assert float(plain) == pytest.approx(per_example.mean(), rel=1e-6)


def test_class_images_for_another_prompt_are_refused(tmp_path):
    cfg = dreambooth.DreamBoothConfig(instance_prompt="a sks dog", class_prompt="a dog", num_class_images=3)
    prompts = dreambooth.prompts(cfg)
    assert prompts.pairs == (("a sks dog", "a dog"),) and dreambooth.eval_prompts(prompts, 3) == [
        "a sks dog", "a dog", "a sks dog"]
    assert dreambooth.cached_class_images(tmp_path, cfg, prompts) == 0
    Image.new("RGB", (8, 8)).save(tmp_path / "00000.png")
    (tmp_path / "00000.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"00000.png was generated for the prompt 'a cat', not train.dreambooth"):
        dreambooth.cached_class_images(tmp_path, cfg, prompts)
    (tmp_path / "00000.txt").write_text("a dog\n")
    assert dreambooth.cached_class_images(tmp_path, cfg, prompts) == 1
    alone = dreambooth.DreamBoothConfig(instance_prompt="a sks dog", prior_loss_weight=0.0)
    assert dreambooth.eval_prompts(dreambooth.prompts(alone), 2) == ["a sks dog"] * 2


def _caption_cfg(**overrides):
    return dreambooth.DreamBoothConfig(**{"instance_captions": True, "identifier": "white", "class_word": "yellow",
                                          "num_class_images": 5, **overrides})


def test_class_captions_of_captioned_instance_images(tmp_path):
    """Class captions replace the identifier (as a word) by the class word or remove it; the prompts follow the
    sorted instance files (duplicates once), class image i is made for class caption i mod C; the captions are
    read whatever data.caption_key is; a caption without the identifier or a missing caption file: one line."""
    cfg = _caption_cfg()
    assert dreambooth.class_caption(cfg, "a large white circle, a white") == "a large yellow circle, a yellow"
    assert dreambooth.class_caption(cfg, "whitewash white,white") == "whitewash yellow,yellow"
    removed = dataclasses.replace(cfg, class_word="")
    assert dreambooth.class_caption(removed, "a large white circle at the top") == "a large circle at the top"
    assert dreambooth.class_caption(removed, "white circle, white") == "circle,"
    for name, caption in [("b", "a white square"), ("a", "a large white circle"), ("c", "a white square")]:
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption + "\n")
    data = pipeline.DataConfig(source="folder", path=str(tmp_path), caption_key="")
    prompts = dreambooth.prompts(cfg, pipeline.make_source(dreambooth.instance_data(data, cfg)))
    assert prompts.pairs == (("a large white circle", "a large yellow circle"), ("a white square", "a yellow square"))
    assert [prompts.class_prompt(i) for i in range(5)] == ["a large yellow circle", "a yellow square"] * 2 + [
        "a large yellow circle"]
    assert dreambooth.eval_prompts(prompts, 5) == ["a large white circle", "a large yellow circle", "a white square",
                                                   "a yellow square", "a large white circle"]
    (tmp_path / "d.txt").write_text("a red circle")
    Image.new("RGB", (8, 8)).save(tmp_path / "d.png")
    with pytest.raises(ValueError, match=r"^the caption 'a red circle' of instance image 3 \(of 4, sorted\) in "
                                         r".* does not contain train.dreambooth.identifier='white'") as err:
        dreambooth.prompts(cfg, readers.ImageFolderSource(tmp_path))
    (tmp_path / "d.txt").unlink()
    with pytest.raises(ValueError, match=r"train.dreambooth.instance_captions=true: every instance image needs a "
                                         r"caption file .*d.png \(no caption file d.txt\)") as err2:
        dreambooth.prompts(cfg, readers.ImageFolderSource(tmp_path))
    assert "\n" not in str(err.value) + str(err2.value)


def test_class_images_of_captions_are_checked_per_index(tmp_path):
    """A rerun reuses class images made for their index's class caption; after an instance caption changes, the
    first image made for the old one is refused in one line naming it and both prompts."""
    cfg = _caption_cfg(num_class_images=3)
    prompts = dreambooth.Prompts((("a white circle", "a yellow circle"), ("a white square", "a yellow square")))
    for i in range(3):
        dreambooth._write_class_image(tmp_path, i, np.zeros((8, 8, 3), np.uint8), prompts.class_prompt(i))
    assert [(tmp_path / f"{i:05d}.txt").read_text() for i in range(3)] == [
        "a yellow circle\n", "a yellow square\n", "a yellow circle\n"]
    assert dreambooth.cached_class_images(tmp_path, cfg, prompts) == 3
    assert dreambooth.cached_class_images(tmp_path, dataclasses.replace(cfg, num_class_images=4), prompts) == 3
    changed = dreambooth.Prompts((("a white circle", "a yellow circle"), ("a big white square", "a big yellow square")))
    with pytest.raises(ValueError, match=r"00001.png was generated for the prompt 'a yellow square', not 'a big "
                                         r"yellow square' \(class caption 1 of the instance captions with "
                                         r"train.dreambooth.identifier='white' -> class_word='yellow'\)") as err:
        dreambooth.cached_class_images(tmp_path, cfg, changed)
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("config, overrides, message", [
    ("lora_shapes.py", {"train.lora.targets": "nothing_here"},
     r"train.lora.targets: 'nothing_here' matches no 2-D / 4-D kernel of sections \['unet'\]"),
    ("lora_shapes.py", {"train.lora.targets": "(bad"}, r"train.lora.targets: '\(bad' is neither a group"),
    ("lora_shapes.py", {"train.lora.rank": 0}, r"train.lora.rank=0; expected an integer >= 1"),
    ("lora_shapes.py", {"train.lora.sections": "cond_stage_2"},
     r"train.lora.sections: \['cond_stage_2'\] not in this model"),
    ("lora_shapes.py", {"train.adapter": "dora"}, r"train.adapter='dora'; expected one of"),
    ("lora_shapes.py", {"train.train_cond_stage": True}, r"train.train_cond_stage=True .* add 'cond_stage'"),
    ("lora_shapes.py", {"train.init_from": ""}, r"train.adapter='lora' adapts a trained model: set train.init_from"),
    ("lora_shapes.py", {"train.frozen_dtype": "float16"}, r"train.frozen_dtype='float16'"),
    ("lora_shapes.py", {"diffusion.scale_by_std": True}, r"set diffusion.scale_by_std=false"),
    ("textual_inversion_shapes.py", {"train.textual_inversion.token": ""}, r"train.textual_inversion.token=''"),
    ("textual_inversion_shapes.py", {"train.textual_inversion.num_vectors": 0}, r"num_vectors=0"),
    ("dreambooth_shapes.py", {"train.dreambooth.class_prompt": ""}, r"train.dreambooth.class_prompt is empty"),
    ("dreambooth_shapes.py", {"data.source": "tfds"}, r"the instance images are data.path"),
    ("dreambooth_shapes.py", {"train.dreambooth.prior_loss_weight": -1.0}, r"prior_loss_weight=-1.0"),
    ("dreambooth_shapes.py", {"diffusion.scale_by_std": True}, r"train.dreambooth fine-tunes a trained model"),
    ("dreambooth_shapes.py", {"train.dreambooth.instance_captions": True},
     r"train.dreambooth.instance_prompt='a large red sks in the centre' and train.dreambooth.instance_captions=true "
     r"are both set"),
    ("dreambooth_shapes.py", {**CAPTIONS, "train.dreambooth.class_prompt": "a dog"},
     r"train.dreambooth.class_prompt='a dog' is set with train.dreambooth.instance_captions=true"),
    ("dreambooth_shapes.py", {**CAPTIONS, "train.dreambooth.identifier": " "}, r"train.dreambooth.identifier is empty"),
    ("dreambooth_shapes.py", {**CAPTIONS, "train.dreambooth.class_word": "white dog"},
     r"train.dreambooth.class_word='white dog' contains train.dreambooth.identifier='white'"),
    ("dreambooth_shapes.py", {"train.dreambooth.class_word": "dog"},
     r"train.dreambooth.identifier='' / class_word='dog' derive the class prompts of captioned instance images"),
    ("dreambooth_shapes.py", {**CAPTIONS, "data.prompt": "a dog"},
     r"data.prompt='a dog' would replace the instance captions \(train.dreambooth.instance_captions=true\)"),
])
def test_bad_recipe_is_one_line(config, overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        train_ldm.build_stage(_config(config, overrides), tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    ({"train.textual_inversion.init_word": "sks"}, r"train.textual_inversion.init_word: init word 'sks' is its "
                                                   r"unknown token"),
    ({"train.textual_inversion.init_word": "red circle"}, r"train.textual_inversion.init_word='red circle'"),
    ({"train.textual_inversion.token": "circle"}, r"train.textual_inversion.token: token 'circle' .* already exists"),
])
def test_bad_textual_inversion_words_are_one_line(overrides, message, tiny_model, tmp_path):
    config = _config("textual_inversion_shapes.py", {"train.init_from": str(tiny_model), **overrides})
    with pytest.raises(ValueError, match=message) as err:
        stage = train_ldm.build_stage(config, tmp_path)
        model = store.load_model(tiny_model)
        stage = train_ldm.with_init_tokenizers(stage, model, tmp_path)
        train_ldm.with_adapter(stage, model.params, jax.random.key(0))
    assert "\n" not in str(err.value)


def test_scale_factor_other_than_the_models_is_one_line(tiny_model, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main.parallel, "initialize_distributed", lambda *args: False)
    argv = [f"--config={CONFIGS / 'lora_shapes.py'}", "--workdir", str(tmp_path / "w"),
            f"--config.train.init_from={tiny_model}", f"--config.data.path={images}",
            "--config.diffusion.scale_factor=0.18215",
            *(f"--config.{k}={v}" for k, v in TINY.items())]
    assert main.main(argv, prog="train.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diffusion.scale_factor=0.18215 differs from the model's 0.5098733" in err, err


def test_missing_instance_folder_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main.parallel, "initialize_distributed", lambda *args: False)
    argv = [f"--config={CONFIGS / 'dreambooth_shapes.py'}", "--workdir", str(tmp_path / "w"),
            f"--config.train.init_from={tiny_model}", f"--config.data.path={tmp_path / 'nosuch'}"]
    assert main.main(argv, prog="train.py") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.dreambooth: the instance images: data.path" in err, err
    assert f"{tmp_path / 'nosuch'} does not exist" in err, err


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["lora_shapes", "textual_inversion_shapes", "dreambooth_shapes", "lora_sd_v1",
                                  "dreambooth_sd_v1", "textual_inversion_sd_v1", "lora_sdxl",
                                  "textual_inversion_sdxl"])
def test_configs_build(name, tmp_path):
    """Every recipe config builds its stage (full size, shapes only); the LoRA ones their initial factors (the
    counts their docstrings state)."""
    overrides = {"train.init_from": "unused"}
    if "sd" in name:
        overrides["train.tokenizer"] = str(tokenizer_fixtures.write_clip_tokenizer(tmp_path / "tok"))
    if "sdxl" in name:
        overrides["train.tokenizer_2"] = overrides["train.tokenizer"]
    config = main.load_config(CONFIGS / f"{name}.py", [f"--config.{k}={v}" for k, v in overrides.items()])
    stage = train_ldm.build_stage(config, tmp_path)
    assert stage.trainable == ({"lora": ("lora",), "textual_inversion": ("embeddings",)}.get(
        stage.train.adapter, ("unet",)))
    if stage.train.adapter == "lora" and "sdxl" not in name:  # (SDXL's 5,806,080: 700 modules drawn eagerly, 5 s)
        stage, _ = train_ldm.with_adapter(stage, {}, jax.random.key(0))
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(stage.adapter.initial))
        assert count == {"lora_shapes": 156_160, "lora_sd_v1": 797_184}[name], count
