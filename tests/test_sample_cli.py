"""sample.py end to end on a small random-weight text model (the embedded model's architecture, shrunk).

What is checked: PNGs with their parameters as text metadata and a grid; same seed -> identical files;
8 devices give the images 1 device gives; user errors are one line and exit code 2 (no traceback).
"""
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import ldm, model_dir, parallel, sampling
from ldm_jax.config import load_config_file
from ldm_jax.data.train_tokenizer import train_tokenizer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["a small red circle at the top left", "a large blue square at the bottom"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    config = load_config_file(CONFIGS / "shapes_ldm.py")
    with config.unlocked():
        config.unet.model_channels = 32
        config.unet.channel_mult = (1, 2)
        config.unet.num_res_blocks = 1
        config.unet.attention_resolutions = (2,)
        config.unet.context_dim = 32
        config.cond_stage.hidden_size = 32
        config.cond_stage.intermediate_size = 64
        config.cond_stage.num_layers = 1
        config.cond_stage.num_heads = 2
        config.ldm.scale_by_std = False
    params = ldm.init_params(ldm.ldm_config(config), jax.random.key(0))
    root = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer(root / "tokenizer")
    return model_dir.write_model_dir(root / "model", config, params, tokenizer_dir=tokenizer)


def _run(model: pathlib.Path, outdir: pathlib.Path, *extra: str) -> int:
    args = ["--checkpoint", str(model), "--steps", "3", "--n", "2", "--seed", "7", "--outdir", str(outdir)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    return sampling.main(args + list(extra))


def _images(outdir: pathlib.Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(outdir.glob("0*.png"))]


def test_writes_pngs_with_metadata_and_is_reproducible(tiny_model, tmp_path, capsys):
    assert _run(tiny_model, tmp_path / "a") == 0
    assert "wrote 4 image(s)" in capsys.readouterr().out
    files = sorted((tmp_path / "a").glob("0*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert (tmp_path / "a" / "grid.png").is_file()
    with Image.open(files[2]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        meta = image.text
    assert meta["prompt"] == PROMPTS[1] and meta["seed"] == "7" and meta["index"] == "2"
    assert meta["sampler"] == "ddim" and meta["steps"] == "3" and meta["size"] == "32x32"
    assert meta["guidance"] == "7.5" and meta["model"] == str(tiny_model) and meta["negative_prompt"] == ""
    assert _run(tiny_model, tmp_path / "b") == 0
    for name in [f.name for f in files] + ["grid.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not np.array_equal(_images(tmp_path / "a")[0], _images(tmp_path / "a")[1])  # copies differ


def test_eight_devices_match_one(tiny_model, tmp_path, monkeypatch):
    assert len(jax.devices()) == 8
    assert _run(tiny_model, tmp_path / "eight", "--sampler", "euler-a") == 0
    one_device = parallel.make_mesh(devices=jax.devices()[:1])
    monkeypatch.setattr(parallel, "make_mesh", lambda *a, **k: one_device)
    assert _run(tiny_model, tmp_path / "one", "--sampler", "euler-a") == 0
    for eight, one in zip(_images(tmp_path / "eight"), _images(tmp_path / "one"), strict=True):
        # Different per-device batch shapes may round differently in float32: allow one grey level.
        assert np.abs(eight.astype(int) - one.astype(int)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "heun"], "--sampler 'heun' is unknown"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--n", "0"], "--n must be >= 1"),
    (["--strength", "1.5", "--init-image", __file__], "--strength must be in [0, 1]"),
    (["--init-image", "/nonexistent.png"], "--init-image /nonexistent.png: no such file"),
    (["--mask", "/nonexistent.png"], "--mask needs --init-image"),
    (["--checkpoint", "/nonexistent"], "--checkpoint /nonexistent: no such file or directory"),
    (["--checkpoint", __file__], "unknown kind of file"),
    (["--outdir", "/proc/ldm_jax_out"], "cannot write there"),
    (["--init-image", __file__], "cannot read the image"),
])
def test_user_errors_are_one_line(tiny_model, tmp_path, capsys, extra, message):
    args = ["--prompt", "a red circle", "--checkpoint", str(tiny_model), "--outdir", str(tmp_path)] + extra
    assert sampling.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample.py: error: ") and message in err[0], err


def test_mask_and_init_size_mismatch(tiny_model, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask.png")
    args = ["--prompt", "a red circle", "--checkpoint", str(tiny_model), "--outdir", str(tmp_path / "out"),
            "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    assert sampling.main(args) == 2
    assert "must be the same size" in capsys.readouterr().err
