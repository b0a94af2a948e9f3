"""The installable tool: build a wheel, install it into a fresh virtualenv, and from a directory outside the
checkout run `ldm-jax sample` on the embedded model and on a CompVis single file whose config is inferred
from its weights (nothing is read from the repository's configs/).

The fresh venv sees this venv's site-packages through a .pth file (so nothing is downloaded) but installs
ldm-jax itself only from the wheel (`--no-deps`); the test asserts that the package it imports is the wheel's.
Run: .venv/bin/python -m pytest -q tests/test_wheel.py
"""
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
from flax import traverse_util

from ldm_jax import ldm, presets, store
from ldm_jax.models.tokenizer import load_tokenizer
from tokenizer_fixtures import write_clip_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """The bin/ directory of a fresh venv holding the wheel of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(REPO)], cwd=root)
    wheel = next((root / "dist").glob("ldm_jax-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], cwd=root)
    return venv / "bin"


def _env():
    """The commands' environment: one CPU device, and XLA's optimisations off as in this test session (conftest):
    compiling dominates a 3-step sample of a tiny model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    return env


def test_wheel_imports_from_its_own_install(installed, tmp_path):
    out = _run([str(installed / "python"), "-c", "import ldm_jax, sys; print(ldm_jax.__file__)"], cwd=tmp_path,
               env=_env()).stdout
    assert str(installed.parent) in out and str(REPO) not in out


def test_sample_the_embedded_model(installed, tmp_path):
    _run([str(installed / "ldm-jax"), "sample", "--prompt", "a large red circle at the top left", "--steps", "3",
          "--outdir", "out"], cwd=tmp_path, env=_env())
    assert (tmp_path / "out" / "00000.png").is_file() and (tmp_path / "out" / "grid.png").is_file()


def test_sample_a_compvis_single_file(installed, tmp_path):
    """A tiny SD-layout CompVis file: its config is inferred from the weights inside the installed package."""
    tokenizer = load_tokenizer(write_clip_tokenizer(tmp_path / "tokenizer"), "clip")
    preset = presets.get_preset("tiny")
    with preset.unlocked():  # what inference reads as SD 1.x's CLIP: heads = width / 64, pad = eos = vocab - 1
        preset.cond_stage.hidden_size = preset.unet.context_dim = 64
        preset.cond_stage.num_heads = 1
        preset.cond_stage.vocab_size = len(tokenizer)
        preset.cond_stage.eos_token_id = preset.cond_stage.pad_token_id = len(tokenizer) - 1
    config = ldm.ldm_config(preset)
    # Random weights of the config's shapes drawn on the host (what the file holds does not matter here; Flax's
    # init, run eagerly, compiles one small program per initialiser and shape)
    rng = np.random.default_rng(0)
    params = {path: (0.05 * rng.standard_normal(shape) + (path[-1] == "scale")).astype(np.float32)
              for path, shape in ldm.param_shapes(config).items()}
    model = ldm.LoadedModel(config=config, params=traverse_util.unflatten_dict(params), tokenizer=tokenizer)
    store.save_model(model, tmp_path / "tiny.safetensors", format="compvis")
    result = _run([str(installed / "ldm-jax"), "sample", "--ckpt", "tiny.safetensors", "--tokenizer", "tokenizer",
                   "--prompt", "a red circle", "--ddim_steps", "3", "--H", "32", "--W", "32", "--outdir", "out"],
                  cwd=tmp_path, env=_env())
    assert (tmp_path / "out" / "00000.png").is_file(), result.stderr


def test_a_missing_config_file_is_one_line(installed, tmp_path):
    result = subprocess.run([str(installed / "ldm-jax"), "train", "--config", "configs/shapes_ldm.py", "--workdir",
                             "w"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "configs/shapes_ldm.py" in lines[0], result.stderr
