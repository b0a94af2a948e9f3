"""SDXL training (issue 15, item 6) on 8 fake CPU devices, with a tiny SDXL-shaped model: two CLIP towers (widths
32 and 48, the second projecting its pooled output to 24, padded with "!" = id 0), a "text_time" UNet (depths
(0, 1), 6 time ids of 8 sinusoidal features each) and the tiny KL first stage (f=4), at 16x16.

- Data: the pipeline records each image's original (height, width) and its crop's (top, left) in the resized
  (and mirrored, when flipped) image, checked against a hand computation for images of several sizes; the
  numbers resume exactly with the iterator.
- Loss: `ldm.training_loss` on an SDXL batch equals the hand computation via `ldm.apply_unet` with time ids
  [orig h, w, crop top, left, 16, 16]; dropped text is zeros (force_zeros_for_empty_prompt) or the empty
  prompt of each tower; a refiner's 5 numbers carry the aesthetic score.
- Sharding: configs/sdxl_finetune.py's rules shard the UNet's kernels over "fsdp" (tiny model on a data=2 x
  fsdp=4 mesh: named PartitionSpecs; the full-size 2.57B UNet: every kernel, shapes only).
- End to end: configs/sdxl_finetune.py with tiny model sections trains 2 steps (bf16, remat, data=2 x fsdp=4)
  from a model directory made here (tokenizers taken from it), only the UNet changes, sample grid, export with
  both tokenizers; a rerun resumes from the workdir alone (train.init_from gone).

Run: .venv/bin/python -m pytest -q tests/test_train_sdxl.py
"""
import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from PIL import Image

import sdxl_fixtures as parts
import tokenizer_fixtures
from ldm_jax import ldm, parallel, store
from ldm_jax.data import pipeline, readers
from ldm_jax.models.tokenizer import tokenize
from ldm_jax.presets import get_preset
from ldm_jax.training import main, train_ldm

transformers = pytest.importorskip("transformers")

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
SIZE = 16  # training resolution: 4x4x4 latents
MAX_LEN = 24  # both towers' prompt length (the longest caption has 18 tokens)
# (height, width) of the training images: taller, wider, odd sizes, already at the resolution.
IMAGE_SIZES = [(24, 16), (16, 40), (30, 30), (17, 23), (64, 20), (16, 16), (20, 50), (33, 18)]
# Two float32 computations of the same loss that differ only in how XLA fuses them.
RTOL = 1e-5


def _tiny_sections(config, eos, vocab):
    """configs/sdxl_finetune.py's model sections shrunk to the tiny SDXL shape (base or refiner)."""
    with config.unlocked():
        config.first_stage = get_preset("autoencoder_tiny_kl").first_stage
        clip = dict(vocab_size=vocab, intermediate_size=37, num_layers=2, num_heads=4, max_length=MAX_LEN,
                    eos_token_id=eos)
        refiner = "cond_stage_2" not in config
        if refiner:  # the bigG tower alone
            config.cond_stage.update(dict(clip, hidden_size=48, projection_dim=24))
        else:
            config.cond_stage.update(dict(clip, hidden_size=32, pad_token_id=eos))
            config.cond_stage_2.update(dict(clip, hidden_size=48, projection_dim=24))
        config.unet.update(dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                transformer_depth=1 if refiner else (0, 1), num_head_channels=8, context_dim=48 if refiner else 80,
                                addition_time_embed_dim=8, adm_in_channels=24 + (5 if refiner else 6) * 8))
        config.diffusion.image_size = SIZE // 4
    return config


def _config(world, overrides=(), variant="base"):
    base = {"data.path": str(world["images"]), "data.resolution": SIZE, "data.global_batch_size": 8,
            "train.num_steps": 2, "train.log_every": 1, "train.image_every": 2, "train.num_images": 8,
            "train.sample_steps": 2, "train.progress_bar": False, "checkpoint.every_steps": 100,
            "optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-3, "optimizer.accumulate_grad_batches": 1,
            "mesh.data": 2, "mesh.fsdp": 4, **dict(overrides)}
    path = f"{CONFIGS / 'sdxl_finetune.py'}" + ("" if variant == "base" else f":{variant}")
    config = main.load_config(path, [f"--config.{k}={v}" for k, v in base.items()])
    return _tiny_sections(config, world["eos"], world["vocab"])


def _random_params(config, rng):
    """Random params of the model's shapes, drawn on the host (Flax's init of the whole model takes ~12 s here):
    kernels N(0, 1 / fan_in), embeddings N(0, 0.02^2), norm scales 1 + N(0, 0.05^2), biases N(0, 0.05^2); no
    param is zero (the UNet's zero-initialised output layers included)."""
    params = {}
    for path, shape in ldm.param_shapes(config).items():
        name = path[-1]
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "embedding":
            value = 0.02 * rng.standard_normal(shape)
        else:
            value = (name == "scale") + 0.05 * rng.standard_normal(shape)
        params[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(params)


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: repeats hit XLA's cache


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SDXL-shaped model directory (random weights, `_random_params`) with both tokenizers, and a folder of
    captioned images of different sizes."""
    root = tmp_path_factory.mktemp("sdxl_train")
    tok, tok_2 = parts.tokenizers(root / "tok", MAX_LEN)
    world = {"images": root / "images", "eos": tok.eos_token_id, "vocab": len(tok), "tok": tok, "tok_2": tok_2,
             "tok_dir": root / "tok"}
    world["images"].mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(IMAGE_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(world["images"] / f"{i}.png")
        (world["images"] / f"{i}.txt").write_text(tokenizer_fixtures.CORPUS[i])
    config = ldm.ldm_config(_config(world))
    params = _random_params(config, rng)
    world["init"] = store.save_model(ldm.LoadedModel(config=config, params=params, tokenizer=tok, tokenizer_2=tok_2),
                                     root / "init")
    world["config"], world["params"] = config, params
    return world


# ------------------------------------------------------------------------------------------------------- data


def test_geometry_of_one_image_by_hand():
    """original_size is the (h, w) as read; crop_top_left the window's (top, left) in the resized image, and in the
    mirrored resized image when flipped."""
    rng = np.random.default_rng(1)
    tall = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)  # -> resized 15 x 10 (h x w)
    resized = np.asarray(Image.fromarray(tall).resize((10, 15), Image.Resampling.BICUBIC)) / 127.5 - 1.0
    image, original, crop = pipeline.preprocess_image_and_geometry(tall, 10)
    assert (original, crop) == ((30, 20), (2, 0))
    np.testing.assert_allclose(image, resized[2:12, 0:10], atol=1e-6)
    for seed in range(6):
        image, original, crop = pipeline.preprocess_image_and_geometry(tall, 10, crop="random",
                                                                       rng=np.random.default_rng(seed))
        draw = np.random.default_rng(seed)
        top, left = int(draw.integers(15 - 10 + 1)), int(draw.integers(10 - 10 + 1))
        assert (original, crop) == ((30, 20), (top, left))
        np.testing.assert_allclose(image, resized[top:top + 10, left:left + 10], atol=1e-6)
    wide = rng.integers(0, 256, (20, 42, 3), dtype=np.uint8)  # -> resized 10 x 21: centre left 5
    resized = np.asarray(Image.fromarray(wide).resize((21, 10), Image.Resampling.BICUBIC)) / 127.5 - 1.0
    image, original, crop = pipeline.preprocess_image_and_geometry(wide, 10, flip=True)
    # The mirrored resized image's window starting at 21 - 5 - 10 = 6 is what the model sees.
    assert (original, crop) == ((20, 42), (0, 6))
    np.testing.assert_allclose(image, resized[:, ::-1][:, 6:16], atol=1e-6)
    np.testing.assert_array_equal(pipeline.preprocess_image(wide, 10, flip=True), image)


def test_pipeline_records_sizes_and_crops_and_resumes_them(world):
    """Every example of a batch: original_size / crop_top_left as int32 (B, 2), equal to the hand computation from
    the iterator's own draws (rng([seed, 1, epoch, index]): flip, then top, then left); a restored position gives
    the same numbers; stages that do not ask for them (batch_keys) do not get them."""
    source = readers.ImageFolderSource(world["images"])
    iterator = pipeline.DataIterator(source, batch_size=4, resolution=SIZE, crop="random", random_flip=True, seed=3,
                                     process_index=0, process_count=1)
    batches = [next(iterator) for _ in range(4)]  # two epochs
    state = iterator.get_state()
    for epoch, batch in enumerate(batches):
        assert batch["original_size"].dtype == np.int32 and batch["original_size"].shape == (4, 2)
        assert batch["crop_top_left"].dtype == np.int32 and batch["crop_top_left"].shape == (4, 2)
        for row, index in enumerate(batch["index"]):
            h, w = IMAGE_SIZES[int(str(source._files[index][0].stem))]
            scale = SIZE / min(h, w)
            rh, rw = max(SIZE, round(h * scale)), max(SIZE, round(w * scale))
            draw = np.random.default_rng([3, 1, epoch // 2, int(index)])
            flip = bool(draw.integers(2))
            top, left = int(draw.integers(rh - SIZE + 1)), int(draw.integers(rw - SIZE + 1))
            if flip:
                left = rw - left - SIZE
            assert tuple(batch["original_size"][row]) == (h, w)
            assert tuple(batch["crop_top_left"][row]) == (top, left)
    seen = {tuple(c) for b in batches for c in b["crop_top_left"]}
    assert len(seen) > 4  # random crops do move
    following = next(iterator)
    again = pipeline.DataIterator(source, batch_size=4, resolution=SIZE, crop="random", random_flip=True, seed=3,
                                  process_index=0, process_count=1)
    again.set_state(state)
    resumed = next(again)
    for key in ("index", "original_size", "crop_top_left", "image"):
        np.testing.assert_array_equal(resumed[key], following[key])
    only = pipeline.DataIterator(source, batch_size=4, resolution=SIZE, seed=3, process_index=0, process_count=1,
                                 keys=("image",))
    assert set(next(only)) == {"image"}


def test_sdxl_batches_hold_both_towers_ids_and_the_geometry(world):
    stage = train_ldm.build_stage(_config(world, {"train.init_from": str(world["init"])}), world["images"].parent)
    assert stage.data.batch_keys == ("image", "tokens", "tokens_2", "original_size", "crop_top_left")
    assert stage.trainable == ("unet",) and stage.frozen_names == ("first_stage", "cond_stage", "cond_stage_2")
    assert stage.tokenizers_from_init and stage.tokenizer is None
    # train.tokenizer may name a folder of both (tokenizer/, tokenizer_2/), as the store reads for single files.
    both = train_ldm.build_stage(_config(world, {"train.init_from": str(world["init"]),
                                                 "train.tokenizer": str(world["init"])}), world["images"].parent)
    assert not both.tokenizers_from_init and both.tokenizer_2 is not None
    assert both.tokenizer_dir == world["init"] / "tokenizer"
    model = store.load_model(world["init"])
    stage = dataclasses.replace(stage, tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2,
                                tokenizers_from_init=False)
    batch = next(train_ldm.image_iterator(stage))
    assert set(batch) == set(stage.data.batch_keys)
    # Each row holds its caption's ids in both towers' paddings (read again with the dataset indices).
    keyed = dataclasses.replace(stage.data, batch_keys=(*stage.data.batch_keys, "index"))
    batch = next(pipeline.make_iterator(keyed, tokenizer=train_ldm._tokenize_fn(stage)))
    files = readers.ImageFolderSource(world["images"])._files
    captions = [tokenizer_fixtures.CORPUS[int(files[i][0].stem)] for i in batch["index"]]
    np.testing.assert_array_equal(batch["tokens"], tokenize(world["tok"], captions, pad_token_id=world["eos"],
                                                            max_length=MAX_LEN))
    np.testing.assert_array_equal(batch["tokens_2"], tokenize(world["tok_2"], captions, pad_token_id=0,
                                                              max_length=MAX_LEN))
    assert (batch["tokens_2"][:, -1] == 0).all() and (batch["tokens"][:, -1] == world["eos"]).all()
    with pytest.raises(ValueError, match=r"data.batch_keys is \('image', 'tokens'\)"):
        train_ldm.build_stage(_config(world, {"train.init_from": str(world["init"]),
                                              "data.batch_keys": "('image', 'tokens')"}), world["images"].parent)


# ------------------------------------------------------------------------------------------------------- loss


def _batch(world, config):
    rng = np.random.default_rng(5)
    prompts = ["a red circle on the left", "a blue square"]
    return {"image": rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32),
            "tokens": tokenize(world["tok"], prompts, pad_token_id=config.cond_stage.pad_token_id, max_length=MAX_LEN),
            "tokens_2": tokenize(world["tok_2"], prompts, pad_token_id=0, max_length=MAX_LEN),
            "original_size": np.array([[24, 16], [100, 300]], np.int32),
            "crop_top_left": np.array([[4, 0], [0, 27]], np.int32)}


def _hand_loss(config, params, batch, key, text):
    """The eps loss by hand: the same key split as training_loss, the conditioning given by `text`."""
    k_post, k_t, k_noise, _, _ = jax.random.split(key, 5)
    z = ldm.encode_first_stage(config, params, batch["image"], k_post)
    t = jax.random.randint(k_t, (2,), 0, 1000)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    acp = ldm.noise_schedule(config).alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(acp) * z + jnp.sqrt(1 - acp) * noise
    time_ids = np.array([[24, 16, 4, 0, SIZE, SIZE], [100, 300, 0, 27, SIZE, SIZE]], np.float32)
    cond = {**text, "time_ids": time_ids}
    pred = ldm.apply_unet(config, params, x_t, t, cond)
    return jnp.mean(jnp.square(pred - noise))


def test_training_loss_equals_hand_computation(world):
    params = world["params"]
    config = dataclasses.replace(world["config"], diffusion=dataclasses.replace(world["config"].diffusion,
                                                                                cond_drop_prob=0.0))
    batch, key = _batch(world, config), jax.random.key(7)
    empty = ldm.empty_prompt_ids(config, world["tok"], world["tok_2"])
    assert empty["tokens_2"][0, -1] == 0 and empty["tokens"][0, -1] == world["eos"]
    encoded = ldm.encode_conditioning(config, params, {"tokens": batch["tokens"], "tokens_2": batch["tokens_2"],
                                                       "time_ids": np.zeros((2, 6), np.float32)})
    text = {"context": encoded["context"], "y": encoded["y"]}
    loss, metrics = ldm.training_loss(config, params, batch, key)
    assert "cond_dropped" not in metrics
    assert float(loss) == pytest.approx(float(_hand_loss(config, params, batch, key, text)), rel=RTOL)
    # Other micro-conditioning, another loss: the numbers reach the UNet.
    moved = {**batch, "crop_top_left": np.array([[0, 0], [0, 0]], np.int32)}
    assert abs(float(ldm.training_loss(config, params, moved, key)[0]) - float(loss)) > 1e-6

    # Every example dropped, force_zeros_for_empty_prompt (the base): context and pooled text are zeros.
    zeros = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, cond_drop_prob=1.0))
    assert zeros.diffusion.force_zeros_for_empty_prompt and not ldm.needs_empty_prompt(zeros)
    loss, metrics = ldm.make_loss_fn(zeros)(params, batch, key)
    assert float(metrics["cond_dropped"]) == 1.0
    hand = _hand_loss(config, params, batch, key, {"context": jnp.zeros((2, MAX_LEN, 80)), "y": jnp.zeros((2, 24))})
    assert float(loss) == pytest.approx(float(hand), rel=RTOL)

    # Dropped to the empty prompt (force_zeros off): each tower reads its own "".
    prompt = dataclasses.replace(zeros, diffusion=dataclasses.replace(zeros.diffusion,
                                                                      force_zeros_for_empty_prompt=False))
    assert ldm.needs_empty_prompt(prompt)
    with pytest.raises(ValueError, match="needs empty_prompt"):
        ldm.make_loss_fn(prompt)
    loss, _ = ldm.make_loss_fn(prompt, empty_prompt=empty)(params, batch, key)
    null = ldm.encode_conditioning(config, params, {"tokens": np.repeat(empty["tokens"], 2, 0),
                                                    "tokens_2": np.repeat(empty["tokens_2"], 2, 0),
                                                    "time_ids": np.zeros((2, 6), np.float32)})
    hand = _hand_loss(config, params, batch, key, {"context": null["context"], "y": null["y"]})
    assert float(loss) == pytest.approx(float(hand), rel=RTOL)
    with pytest.raises(KeyError, match=r"no 'original_size', 'crop_top_left' entries"):
        ldm.training_loss(config, params, {k: v for k, v in batch.items() if k in ("image", "tokens", "tokens_2")},
                          key)


def test_refiner_micro_conditioning_carries_the_aesthetic_score(world):
    config = ldm.ldm_config(_config(world, variant="refiner"))
    assert config.num_time_ids == 5 and config.text_towers == ("cond_stage",)
    assert train_ldm.batch_keys(config) == ("image", "tokens", "original_size", "crop_top_left")
    batch = {"original_size": np.array([[24, 16], [100, 300]]), "crop_top_left": np.array([[4, 0], [0, 27]])}
    np.testing.assert_array_equal(ldm.micro_conditioning(config, batch, (SIZE, SIZE)),
                                  [[24, 16, 4, 0, 6.0], [100, 300, 0, 27, 6.0]])
    np.testing.assert_array_equal(ldm.micro_conditioning(config, batch, (SIZE, SIZE), aesthetic_score=2.5)[:, 4],
                                  [2.5, 2.5])
    scored = {**batch, "aesthetic_score": np.array([5.0, 7.5], np.float32)}
    np.testing.assert_array_equal(ldm.micro_conditioning(config, scored, (SIZE, SIZE))[:, 4], [5.0, 7.5])


# --------------------------------------------------------------------------------------------------- sharding


def test_fsdp_specs_of_the_tiny_sdxl_model(world, tmp_path):
    """configs/sdxl_finetune.py's rules on a data=2 x fsdp=4 mesh: kernels and embedding tables split over "fsdp"
    along their largest dimension 4 divides (ties: the later), 1-D params replicated; the same for the optimiser
    state, the EMA and the frozen towers."""
    overrides = {"train.tokenizer": str(world["tok_dir"]), "train.tokenizer_2": str(world["init"] / "tokenizer_2")}
    stage = train_ldm.build_stage(_config(world, overrides), tmp_path)
    assert dict(stage.mesh.shape) == {"data": 2, "fsdp": 4}
    state = train_ldm.init_state(stage, jax.random.key(0), abstract=True)
    unet = state.params["unet"]
    block = unet["up_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    expected = {
        "attn1.to_q (64, 64)": (block["attn1"]["to_q"]["kernel"], P(None, "fsdp")),
        "attn2.to_k (80, 64)": (block["attn2"]["to_k"]["kernel"], P("fsdp")),
        "attn1.to_out (64, 64)": (block["attn1"]["to_out_0"]["kernel"], P(None, "fsdp")),
        "ff.net_0 (64, 512)": (block["ff"]["net_0"]["proj"]["kernel"], P(None, "fsdp")),
        "ff.net_2 (256, 64)": (block["ff"]["net_2"]["kernel"], P("fsdp")),
        "proj_in (64, 64)": (unet["up_blocks_0"]["attentions_0"]["proj_in"]["kernel"], P(None, "fsdp")),
        "resnet conv1 (3, 3, 128, 64)": (unet["up_blocks_0"]["resnets_0"]["conv1"]["kernel"], P(None, None, "fsdp")),
        "resnet conv2 (3, 3, 64, 64)": (unet["mid_block"]["resnets_0"]["conv2"]["kernel"],
                                        P(None, None, None, "fsdp")),
        "conv_out (3, 3, 32, 4)": (unet["conv_out"]["kernel"], P(None, None, "fsdp")),
        "add_embedding (72, 128)": (unet["add_embedding"]["linear_1"]["kernel"], P(None, "fsdp")),
        "bias": (block["attn1"]["to_out_0"]["bias"], P()),
        "norm scale": (block["norm1"]["scale"], P()),
    }
    for name, (leaf, spec) in expected.items():
        assert leaf.sharding.spec == spec, name
    to_q = ("up_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    ema = state.ema_params["unet"]
    for part in to_q:
        ema = ema[part]
    assert ema.sharding.spec == P(None, "fsdp")
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if parallel.path_str(path).endswith("/".join(to_q))]
    assert moments and all(m.sharding.spec == P(None, "fsdp") for m in moments)  # AdamW mu and nu
    frozen = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(v, jnp.float32)
                                           for k, v in store.param_shapes(stage.model).items()
                                           if k[0] in stage.frozen_names})
    specs = parallel.param_specs(frozen, stage.rules, stage.mesh)  # what `train_ldm.place` shards them by
    assert specs["cond_stage_2"]["embeddings"]["token_embedding"]["embedding"] == P(None, "fsdp")  # (594, 48)
    assert specs["cond_stage_2"]["text_projection"]["kernel"] == P("fsdp")  # (48, 24)
    assert specs["cond_stage"]["final_layer_norm"]["scale"] == P()


def test_full_size_sdxl_finetune_config_builds_sharded(world, tmp_path):
    """configs/sdxl_finetune.py at full size (shapes only, 8 devices = data 1 x fsdp 8): the 2,567,463,684-param
    UNet trains, the towers and the VAE are frozen, every UNet kernel is sharded over "fsdp" and what stays
    replicated (biases, norm scales) is under 0.1% of it."""
    overrides = ["--config.train.tokenizer", str(world["tok_dir"]), "--config.train.tokenizer_2",
                 str(world["init"] / "tokenizer_2")]
    config = main.load_config(CONFIGS / "sdxl_finetune.py", overrides)
    stage = train_ldm.build_stage(config, tmp_path)
    assert stage.frozen_names == ("first_stage", "cond_stage", "cond_stage_2") and stage.trainable == ("unet",)
    assert dict(stage.mesh.shape) == {"data": 1, "fsdp": 8}
    assert stage.options.remat is True and stage.options.dtype == jnp.bfloat16
    state = train_ldm.init_state(stage, jax.random.key(0), abstract=True)
    leaves = jax.tree_util.tree_leaves_with_path(state.params["unet"])
    assert sum(int(np.prod(x.shape)) for _, x in leaves) == 2_567_463_684
    replicated = 0
    for path, leaf in leaves:
        if parallel.path_str(path).endswith("kernel"):
            assert "fsdp" in leaf.sharding.spec, parallel.path_str(path)
        elif "fsdp" not in leaf.sharding.spec:
            replicated += int(np.prod(leaf.shape))
    assert replicated < 1e-3 * 2_567_463_684


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sdxl_run")
    config = _config(world, {"train.init_from": str(world["init"]), "data.random_flip": True})
    return workdir, main.train_and_evaluate(config, workdir)


def test_sdxl_finetune_trains_the_unet_only(run, world):
    workdir, result = run
    assert int(result.state.step) == 2 and set(result.state.params) == {"unet"}
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert all(np.isfinite(entry["loss"]) and np.isfinite(entry["grad_norm"]) for entry in logged)
    assert {"cond_dropped", "loss_simple"} <= set(logged[0])
    assert len({entry["loss"] for entry in logged}) == 2
    # The UNet moved (live params); everything else is the init model's, bit for bit, in the export.
    init = world["params"]
    kernel = ("up_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
    live, start = result.state.params["unet"], init["unet"]
    for part in kernel:
        live, start = live[part], start[part]
    assert float(np.max(np.abs(np.asarray(live) - start))) > 1e-4
    assert live.sharding.spec == P("fsdp")  # trained on the data=2 x fsdp=4 mesh, sharded
    exported = store.load_model(result.export_dir)
    assert exported.config == world["config"]
    for part in ("first_stage", "cond_stage", "cond_stage_2"):
        for a, b in zip(jax.tree.leaves(exported.params[part]), jax.tree.leaves(init[part])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(exported.params["unet"]["conv_in"]["kernel"],
                                  np.asarray(result.state.ema_params["unet"]["conv_in"]["kernel"]))
    prompt = ["a red circle on the left"]
    for tok, ours, pad in ((exported.tokenizer, world["tok"], world["eos"]), (exported.tokenizer_2, world["tok_2"], 0)):
        np.testing.assert_array_equal(tokenize(tok, prompt, pad_token_id=pad, max_length=MAX_LEN),
                                      tokenize(ours, prompt, pad_token_id=pad, max_length=MAX_LEN))
    assert (workdir / "tokenizer_2").is_dir() and (workdir / "tokenizer").is_dir()
    grid = workdir / "images" / f"samples_{2:08d}.png"
    assert grid.is_file() and grid.stat().st_size > 0


def test_sdxl_finetune_resumes_from_the_workdir_alone(run, world, tmp_path, abstract_init_only):
    """A rerun continues at step 3 with the tokenizers and frozen towers of the workdir (train.init_from no longer
    exists). (That a resumed run equals an uninterrupted one bit for bit is tests/test_checkpoint_resume.py's; the
    SDXL batches' crops and flips resume exactly in test_pipeline_records_sizes_and_crops_and_resumes_them.)"""
    workdir, _ = run
    resumed = tmp_path / "run"
    shutil.copytree(workdir, resumed)
    abstract_init_only(train_ldm)
    three = {"train.num_steps": 3, "train.image_every": 100, "data.random_flip": True}
    result = main.train_and_evaluate(_config(world, {"train.init_from": str(tmp_path / "gone"), **three}), resumed)
    assert int(result.state.step) == 3
    logged = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    assert store.load_model(result.export_dir).tokenizer_2 is not None
