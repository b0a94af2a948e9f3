"""sample.py end to end on a small random-weight text model (the embedded model's architecture, shrunk).

What is checked: PNGs with their parameters as text metadata and a grid; same seed -> identical files;
8 devices give the images 1 device gives; user errors are one line and exit code 2 (no traceback).
"""
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import ldm, parallel, sampling, store
from ldm_jax.config import load_config_file
from ldm_jax.data.train_tokenizer import train_tokenizer
from ldm_jax.models.tokenizer import load_tokenizer

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
        config.diffusion.scale_by_std = False
    model_config = ldm.ldm_config(config)
    params = ldm.init_params(model_config, jax.random.key(0))
    root = tmp_path_factory.mktemp("tiny_model")
    tokenizer = load_tokenizer(train_tokenizer(root / "tokenizer"), model_config.tokenizer_kind)
    model = ldm.LoadedModel(config=model_config, params=params, tokenizer=tokenizer)
    return store.save_model(model, root / "model")


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
    (["--attention", "flash"], "--attention 'flash' is unknown"),
    (["--timestep-spacing", "karras"], "--timestep-spacing 'karras'"),
    (["--latents", "/nonexistent.npy"], "--latents /nonexistent.npy: no such file"),
    (["--plms", "--sampler", "ddim"], "--plms and --sampler ddim disagree"),
    (["--outdir", "/proc/ldm_jax_out"], "cannot be created or written"),
    (["--init-image", __file__], "cannot read the image"),
])
def test_user_errors_are_one_line(tiny_model, tmp_path, capsys, extra, message):
    args = ["--prompt", "a red circle", "--checkpoint", str(tiny_model), "--outdir", str(tmp_path)] + extra
    assert sampling.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample.py: error: ") and message in err[0], err


def test_latents_flag_checks_the_shape_and_replaces_the_draw(tiny_model, tmp_path, capsys):
    """--latents (diffusers' NCHW layout) replaces the seed's draws: two seeds give the same images."""
    config = store.load_model(tiny_model).config
    f, channels = config.downsample_factor, config.latent_channels
    noise = np.random.default_rng(0).standard_normal((4, channels, 32 // f, 32 // f)).astype(np.float32)
    np.save(tmp_path / "latents.npy", noise)
    assert _run(tiny_model, tmp_path / "s7", "--latents", str(tmp_path / "latents.npy")) == 0
    assert _run(tiny_model, tmp_path / "s8", "--latents", str(tmp_path / "latents.npy"), "--seed", "8") == 0
    for a, b in zip(_images(tmp_path / "s7"), _images(tmp_path / "s8"), strict=True):
        np.testing.assert_array_equal(a, b)
    np.save(tmp_path / "wrong.npy", noise[:3])
    capsys.readouterr()
    assert _run(tiny_model, tmp_path / "bad", "--latents", str(tmp_path / "wrong.npy")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has shape (3, " in err[0] and f"expected (4, {channels}, " in err[0], err


def test_flag_choices_follow_the_library():
    """sampling checks flags before JAX starts, against its own copies of the library's choices: keep them equal."""
    from ldm_jax.diffusion import samplers
    from ldm_jax.models.attention import ATTENTION_IMPLS

    assert sampling.ATTENTIONS == ATTENTION_IMPLS
    assert set(sampling.SAMPLERS) == set(samplers.SAMPLERS)
    assert set(sampling.TIMESTEP_SPACINGS) <= set(samplers.TIMESTEP_SPACINGS)


def test_compvis_flag_aliases():
    """The CompVis txt2img flags map onto ours."""
    request = sampling.parse_args(["--ckpt", "m.ckpt", "--scale", "5", "--ddim_steps", "20", "--ddim_eta", "0.5",
                                   "--n_samples", "3", "--H", "64", "--W", "96", "--prompt", "x", "--plms"])
    assert (request.checkpoint, request.guidance, request.steps, request.eta) == ("m.ckpt", 5.0, 20, 0.5)
    assert (request.n, request.height, request.width, request.sampler) == (3, 64, 96, "plms")


def test_mask_and_init_size_mismatch(tiny_model, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask.png")
    args = ["--prompt", "a red circle", "--checkpoint", str(tiny_model), "--outdir", str(tmp_path / "out"),
            "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    assert sampling.main(args) == 2
    assert "must be the same size" in capsys.readouterr().err
