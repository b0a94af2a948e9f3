"""`ldm-jax sample --lora / --embedding` and `ldm-jax convert --lora / --embedding` end to end on a tiny random
text model (the embedded model's architecture, shrunk), through `store.apply_adapters`.

What is checked: a LoRA at scale 0 gives the base images bit for bit, at scale 1 other images; the PNGs record the
adapters; a new token is read from an embedding file; the converted model holds the merged weights and the new
token; files for another model are refused in one line (exit 2) naming the flag and the file.
"""
import pathlib

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from adapter_fixtures import random_attention_lora
from ldm_jax import cli, ldm, sampling, store
from ldm_jax.config import load_config_file
from ldm_jax.convert.embedding_files import save_embedding_file
from ldm_jax.convert.lora_files import save_lora_file
from ldm_jax.data.train_tokenizer import train_tokenizer
from ldm_jax.models.tokenizer import load_tokenizer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PROMPT = "a small red circle at the top left"


def _tiny_config(width: int) -> ldm.LDMConfig:
    config = load_config_file(CONFIGS / "shapes_ldm.py")
    with config.unlocked():
        config.unet.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           context_dim=width, num_head_channels=16)
        config.cond_stage.update(hidden_size=width, intermediate_size=2 * width, num_layers=1, num_heads=2)
        config.diffusion.scale_by_std = False
    return ldm.ldm_config(config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory, a LoRA and a one-vector embedding for it, and a LoRA / embedding for a wider model."""
    root = tmp_path_factory.mktemp("adapters")
    config = _tiny_config(32)
    # Random everywhere: a fresh UNet's zero-initialised output layers would hide any change of its attention.
    shapes = ldm.param_shapes(config)
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({path: (0.2 * rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]) or 1)
                                                  + (path[-1] == "scale")).astype(np.float32)
                                           for path, shape in shapes.items()})
    tokenizer = load_tokenizer(train_tokenizer(root / "tokenizer"), config.tokenizer_kind)
    model_dir = store.save_model(ldm.LoadedModel(config=config, params=params, tokenizer=tokenizer), root / "model")
    lora = root / "lora.safetensors"
    save_lora_file(random_attention_lora(params, jax.random.key(1)), lora, config)
    embedding = root / "blorp.safetensors"
    save_embedding_file(embedding, "blorp", np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32))
    wide = _tiny_config(48)
    wide_params = traverse_util.unflatten_dict({path: np.zeros(shape, np.float32)
                                                for path, shape in ldm.param_shapes(wide).items()})
    other_lora = root / "other_lora.safetensors"
    save_lora_file(random_attention_lora(wide_params, jax.random.key(2)), other_lora, wide)
    other_embedding = root / "wide.safetensors"
    save_embedding_file(other_embedding, "wide", np.ones((1, 48), np.float32))
    return dict(root=root, model=model_dir, lora=lora, embedding=embedding, other_lora=other_lora,
                other_embedding=other_embedding, config=config)


def _sample(world, outdir: pathlib.Path, *extra: str) -> int:
    return sampling.main(["--checkpoint", str(world["model"]), "--prompt", PROMPT, "--prompt", "a blorp",
                          "--steps", "2", "--seed", "3", "--outdir", str(outdir), *extra])


def _images(outdir: pathlib.Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(outdir.glob("0*.png"))]


def test_sample_with_lora_and_embedding(world, tmp_path):
    lora = str(world["lora"])
    assert _sample(world, tmp_path / "base") == 0
    assert _sample(world, tmp_path / "zero", "--lora", f"{lora}:0") == 0
    for base, zero in zip(_images(tmp_path / "base"), _images(tmp_path / "zero"), strict=True):
        np.testing.assert_array_equal(base, zero)  # scale 0 adds exact zeros
    assert _sample(world, tmp_path / "both", "--lora", lora, "--embedding", str(world["embedding"])) == 0
    adapted = _images(tmp_path / "both")
    assert not np.array_equal(adapted[0], _images(tmp_path / "base")[0])
    with Image.open(tmp_path / "both" / "00001.png") as image:
        meta = image.text
    assert meta["loras"] == f"{lora}:1" and meta["embeddings"] == str(world["embedding"])
    assert meta["prompt"] == "a blorp"


def test_convert_writes_the_merged_model(world, tmp_path):
    dest = tmp_path / "merged"
    argv = [str(world["model"]), str(dest), "--to", "ldm", "--lora", f"{world['lora']}:0.7",
            "--embedding", str(world["embedding"]), "--token", "zorp"]
    assert cli.convert_main(argv) == 0
    written = store.load_model(dest)
    expected = store.apply_adapters(store.load_model(world["model"]), loras=[(world["lora"], 0.7)],
                                    embeddings=[(world["embedding"], "zorp")])
    assert written.config == expected.config
    assert written.tokenizer.convert_tokens_to_ids("zorp") == expected.config.cond_stage.vocab_size - 1
    for (path, a), b in zip(store.flatten_params(written.params).items(),
                            store.flatten_params(expected.params).values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.parametrize("flag,name,words", [
    ("--lora", "other_lora", ("matches no", "shape")),
    ("--embedding", "other_embedding", ("48",)),
    ("--token", "red", ("red",)),
])
def test_adapters_for_another_model_are_one_line(world, tmp_path, capsys, flag, name, words):
    extra = ["--embedding", str(world["embedding"]), "--token", name] if flag == "--token" else [flag, str(world[name])]
    assert _sample(world, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sample.py: error: {'--embedding' if flag == '--token' else flag} ")
    assert any(word in err for word in words), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
