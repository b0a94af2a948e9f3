"""The `ldm-jax` command line: cross-implementation reproduction with --latents, and `convert` between the
store's formats, each checked against diffusers (PyTorch).

Run: .venv/bin/python -m pytest -q tests/test_cli.py
"""
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_jax import cli, store
from conftest import TINY_SD_SIZE as SIZE
from conftest import assert_same_sd_weights

diffusers = pytest.importorskip("diffusers")

STEPS = 10
PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.mark.parametrize("spacing", [None, "trailing"])
def test_sample_with_latents_reproduces_diffusers(sd, tmp_path, spacing):
    """DDIM 10 steps, CFG 7.5, the same initial latents: `ldm-jax sample` writes diffusers' image (uint8) to
    within one grey level. The timesteps come from the folder's scheduler_config.json: as saved (leading,
    offset 1, no final alpha), or edited to trailing spacing."""
    pipe, folder = sd
    if spacing is not None:
        folder = pathlib.Path(shutil.copytree(folder, tmp_path / "pipe"))
        settings = folder / "scheduler" / "scheduler_config.json"
        settings.write_text(json.dumps({**json.loads(settings.read_text()), "timestep_spacing": spacing}))
        scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
        pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    latents = np.random.default_rng(0).standard_normal((len(PROMPTS), 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    args = ["sample", "--ckpt", str(folder), "--ddim_steps", str(STEPS), "--scale", "7.5", "--H", str(SIZE),
            "--W", str(SIZE), "--latents", str(tmp_path / "latents.npy"), "--outdir", str(tmp_path / "out")]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert cli.main(args) == 0
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(len(PROMPTS))])
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                      latents=torch.from_numpy(latents), output_type="np").images
    theirs = np.round(theirs * 255).astype(np.uint8)
    assert theirs.std() > 5  # a non-trivial image
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_convert_between_formats(sd, tmp_path, capsys):
    """diffusers -> ldm -> compvis -> diffusers: diffusers loads the result strictly with every weight equal;
    --dtype fp16 stores half-size weights that load back as the fp16-rounded params."""
    pipe, folder = sd
    ldm_dir, single, back = tmp_path / "ldm", tmp_path / "model.safetensors", tmp_path / "back"
    assert cli.main(["convert", str(folder), str(ldm_dir), "--to", "ldm"]) == 0
    assert cli.main(["convert", str(ldm_dir), str(single), "--to", "compvis"]) == 0
    assert cli.main(["convert", str(single), str(back), "--to", "diffusers", "--config", str(ldm_dir / "config.json"),
                     "--tokenizer", str(ldm_dir / "tokenizer")]) == 0
    capsys.readouterr()
    again = diffusers.StableDiffusionPipeline.from_pretrained(back, local_files_only=True)
    assert_same_sd_weights(again, pipe)
    # The scheduler the folder came with travels through the model directory (not through the CompVis file).
    original = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((ldm_dir / store.SCHEDULER_FILE).read_text()) == original
    assert cli.main(["convert", str(ldm_dir), str(tmp_path / "direct"), "--to", "diffusers"]) == 0
    assert json.loads((tmp_path / "direct" / "scheduler" / "scheduler_config.json").read_text()) == original
    assert json.loads((back / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"

    half = tmp_path / "half"
    assert cli.main(["convert", str(ldm_dir), str(half), "--to", "ldm", "--dtype", "fp16"]) == 0
    size, half_size = ((d / store.PARAMS_FILE).stat().st_size for d in (ldm_dir, half))
    assert half_size < 0.51 * size
    full, rounded = store.load_model(ldm_dir), store.load_model(half)
    assert full.config == rounded.config
    for path, value in store.flatten_params(full.params).items():
        np.testing.assert_array_equal(store.flatten_params(rounded.params)[path], value.astype(np.float16), path)


@pytest.mark.parametrize("args, message", [
    (["convert", "README.md", "x", "--to", "ldm"], "unknown kind of file"),
    (["convert", "/nonexistent", "x", "--to", "ldm"], "/nonexistent: no such file or directory"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["convert", "shapes", "x.safetensors", "--to", "compvis"], "no place for unet.position_embedding"),
])
def test_user_errors_are_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and message in err[0], err


def test_a_config_that_does_not_fit_names_the_key(sd, tmp_path, capsys):
    """A single file with a config of other widths: one line naming the first mismatched key and both shapes."""
    _, folder = sd
    single = tmp_path / "model.safetensors"
    assert cli.main(["convert", str(folder), str(single), "--to", "compvis"]) == 0
    model = store.load_model(folder)
    config = store.config_to_json(model.config)
    config["unet"]["model_channels"] = 64
    (tmp_path / "other.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["convert", str(single), str(tmp_path / "out"), "--to", "ldm", "--config",
                     str(tmp_path / "other.json"), "--tokenizer", str(folder / "tokenizer")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("ldm-jax convert: error: "), err
    assert "model.diffusion_model.input_blocks.0.0.weight: checkpoint (32, 4, 3, 3) vs model (64, 4, 3, 3)" in err[0]
