"""`ldm-jax sample --controlnet SRC[:SCALE] --control-image IMG` end to end on the tiny random SD of conftest (16x16
images, f=2 VAE) with random diffusers ControlNets (tests/controlnet_fixtures.py), one as a diffusers folder and one
exported as an original single file.

What is checked: the CLI's PNGs equal a direct pipeline call with the same `Control` bit for bit (txt2img with one
net; img2img with two, per-net fractions, one from the single file; inpainting with guess mode); another scale and
other fractions, with a --lora merged, reuse the compiled program and change the images; the PNGs record each net;
bad input is one line with exit 2, naming the flag or the file, before anything is written: among it control, init and
mask images PIL cannot decode (not an image, truncated, a broken PNG chunk, a decompression bomb), fractions out of
range or miscounted, and a ControlNet whose control images are not 3-channel.

Run: .venv/bin/python -m pytest -q tests/test_sample_controlnet.py
"""
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import controlnet_fixtures
from adapter_fixtures import random_attention_lora
from conftest import TINY_SD_SIZE
from test_images import broken_chunk_png, truncated_png
from ldm_jax import parallel, pipeline, sampling, store
from ldm_jax.control import Control
from ldm_jax.convert.lora_files import save_lora_file
from ldm_jax.images import prepare_control_image, to_uint8

diffusers = pytest.importorskip("diffusers")

SIZE, STEPS, SEED = TINY_SD_SIZE, 3, 7
PROMPTS = ["a red circle on the left", "a blue square"]


def _png(path: pathlib.Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def world(sd, tmp_path_factory):
    """The tiny SD folder; ControlNet net0 (diffusers folder) and net1 (original .safetensors); a ControlNet of another
    UNet (other residual channels) and one whose hint encoder downsamples by 4 (the VAE: 2); control images of
    another size than the output (resized by the CLI); an init image, a mask, a LoRA, a file that is no image."""
    pipe, folder = sd
    root = tmp_path_factory.mktemp("sample_controlnet")
    net0 = root / "net0"
    controlnet_fixtures.random_controlnet(pipe.unet, 1).save_pretrained(net0, safe_serialization=True)
    controlnet_fixtures.random_controlnet(pipe.unet, 2).save_pretrained(root / "net1", safe_serialization=True)
    net1 = store.save_controlnet(store.load_controlnet(root / "net1"), root / "control_net1.safetensors",
                                 format="original")
    other = diffusers.ControlNetModel(in_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                                      attention_head_dim=2, conditioning_embedding_out_channels=(8, 16))
    other.save_pretrained(root / "other_base", safe_serialization=True)
    controlnet_fixtures.random_controlnet(pipe.unet, 3, hint_channels=(8, 16, 32)).save_pretrained(
        root / "factor4", safe_serialization=True)
    controlnet_fixtures.random_controlnet(pipe.unet, 4, conditioning_channels=1).save_pretrained(
        root / "one_channel", safe_serialization=True)
    rng = np.random.default_rng(0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 2:10] = 255
    model = store.load_model(folder)
    lora = save_lora_file(random_attention_lora(model.params, jax.random.key(1)), root / "lora.safetensors",
                          model.config)
    (root / "not_an_image.png").write_text("not an image\n")
    (root / "truncated.png").write_bytes(truncated_png())
    (root / "broken_chunk.png").write_bytes(broken_chunk_png())
    return dict(
        root=root, model=str(folder), net0=str(net0), net1=str(net1), other_base=str(root / "other_base"),
        factor4=str(root / "factor4"), one_channel=str(root / "one_channel"), lora=str(lora),
        bad_image=str(root / "not_an_image.png"), truncated=str(root / "truncated.png"),
        broken_chunk=str(root / "broken_chunk.png"),
        edges=_png(root / "edges.png", rng.integers(0, 256, (20, 24, 3), np.uint8)),
        depth=_png(root / "depth.png", rng.integers(0, 256, (12, 16), np.uint8)),
        init=_png(root / "init.png", rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)),
        mask=_png(root / "mask.png", mask))


def _argv(world, outdir, *extra: str) -> list[str]:
    prompts = [x for p in PROMPTS for x in ("--prompt", p)]
    return ["--checkpoint", world["model"], *prompts, "--steps", str(STEPS), "--seed", str(SEED), "--outdir",
            str(outdir), *extra]


def _cli(world, outdir, *extra: str) -> tuple[list[np.ndarray], list[dict[str, str]]]:
    """Runs the CLI; returns its images and their PNG text chunks."""
    assert sampling.main(_argv(world, outdir, *extra)) == 0
    images, metas = [], []
    for path in sorted(pathlib.Path(outdir).glob("0*.png")):
        with Image.open(path) as image:
            images.append(np.asarray(image))
            metas.append(dict(image.text))
    assert len(images) == len(PROMPTS)
    return images, metas


def _direct(world, kind: str, control: Control, resize: str = "default", **kwargs) -> list[np.ndarray]:
    """The pipeline called as the CLI does (its batch of 8 on the 8-device mesh), with `control` whose images are
    file paths, prepared here."""
    model = store.load_model(world["model"])
    request = sampling.parse_args(_argv(world, "unused"))
    sampler = pipeline.make_model_sampler(model.config, "ddim", STEPS,
                                          **sampling.sampler_options(request, model.scheduler_config))
    mesh = parallel.make_mesh()
    batch = mesh.devices.size
    prompts = PROMPTS + [PROMPTS[-1]] * (batch - len(PROMPTS))
    cond, uncond = pipeline.encode_prompts(model, prompts, None, warn=False)
    images = []
    for path in control.images:
        with Image.open(path) as image:
            images.append(prepare_control_image(image, SIZE, SIZE, resize_mode=resize))
    control = Control(nets=control.nets, images=images, scales=control.scales, starts=control.starts,
                      ends=control.ends, guess_mode=control.guess_mode)
    for name in ("images", "mask"):
        if name in kwargs:
            kwargs[name] = np.broadcast_to(kwargs[name], (batch, *kwargs[name].shape)).copy()
    out = getattr(pipeline, kind)(model.config, model.params, sampler, cond, uncond, guidance_scale=7.5, seed=SEED,
                                  mesh=mesh, options=model.options, control=control, **kwargs)
    return [to_uint8(image) for image in np.asarray(out)[:len(PROMPTS)]]


def _net(world, name: str):
    net = store.load_controlnet(world[name], base=store.load_model(world["model"]))
    return net.config, net.params


def _same(cli_images, direct_images):
    for ours, theirs in zip(cli_images, direct_images, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_txt2img_equals_the_pipeline(world, tmp_path):
    images, metas = _cli(world, tmp_path / "out", "--controlnet", f"{world['net0']}:0.8", "--control-image",
                         world["edges"], "--control-start", "0.2", "--control-resize", "crop")
    control = Control(nets=[_net(world, "net0")], images=[world["edges"]], scales=0.8, starts=0.2)
    _same(images, _direct(world, "txt2img", control, resize="crop", height=SIZE, width=SIZE))
    assert metas[1]["prompt"] == PROMPTS[1]
    assert {k: metas[0][k] for k in ("controlnets", "control_images", "control_start", "control_end",
                                     "control_resize", "guess_mode")} == {
        "controlnets": f"{world['net0']}:0.8", "control_images": world["edges"], "control_start": "0.2",
        "control_end": "1", "control_resize": "crop", "guess_mode": "False"}

    # another scale, other fractions and a LoRA merged: the same compiled program, other images
    before = pipeline.trace_count("txt2img")
    other, metas = _cli(world, tmp_path / "other", "--controlnet", f"{world['net0']}:1.5", "--control-image",
                        world["edges"], "--control-end", "0.5", "--control-resize", "crop", "--lora", world["lora"])
    assert pipeline.trace_count("txt2img") == before
    assert not np.array_equal(other[0], images[0])
    assert metas[0]["controlnets"] == f"{world['net0']}:1.5" and metas[0]["loras"] == f"{world['lora']}:1"


def test_two_nets_img2img_equal_the_pipeline(world, tmp_path):
    images, metas = _cli(world, tmp_path / "out", "--init-image", world["init"], "--strength", "0.8",
                         "--controlnet", f"{world['net0']}:0.7", "--control-image", world["edges"],
                         "--controlnet", f"{world['net1']}:1.2", "--control-image", world["depth"],
                         "--control-start", "0", "--control-start", "0.3", "--control-end", "0.9")
    control = Control(nets=[_net(world, "net0"), _net(world, "net1")], images=[world["edges"], world["depth"]],
                      scales=[0.7, 1.2], starts=[0.0, 0.3], ends=0.9)
    init = np.asarray(Image.open(world["init"]), np.float32) / 255.0 * 2.0 - 1.0
    _same(images, _direct(world, "img2img", control, images=init, strength=0.8))
    assert metas[0]["controlnets"] == f"{world['net0']}:0.7; {world['net1']}:1.2"
    assert metas[0]["control_images"] == f"{world['edges']}; {world['depth']}"
    assert (metas[0]["control_start"], metas[0]["control_end"]) == ("0; 0.3", "0.9; 0.9")


def test_inpaint_with_guess_mode_equals_the_pipeline(world, tmp_path):
    images, metas = _cli(world, tmp_path / "out", "--init-image", world["init"], "--mask", world["mask"],
                         "--strength", "1", "--controlnet", world["net1"], "--control-image", world["edges"],
                         "--guess-mode")
    control = Control(nets=[_net(world, "net1")], images=[world["edges"]], guess_mode=True)
    init = np.asarray(Image.open(world["init"]), np.float32) / 255.0 * 2.0 - 1.0
    mask = np.asarray(Image.open(world["mask"]).convert("L"), np.float32)[..., None] / 255.0
    _same(images, _direct(world, "inpaint", control, images=init, mask=mask, strength=1.0))
    assert metas[0]["guess_mode"] == "True" and metas[0]["controlnets"] == f"{world['net1']}:1"


@pytest.mark.parametrize("case, words", [
    ("count", ["--controlnet was given 2 time(s) and --control-image 1"]),
    ("scale", ["argument --controlnet", "'x'"]),
    ("fractions", ["--control-start 0.6 and --control-end 0.4 of --controlnet", "net0: a net runs from its start"]),
    ("start_range", ["--control-start 1 and --control-end 1 of --controlnet", "0 <= start < end <= 1"]),
    ("start_count", ["--control-start: 3 values for 2 ControlNet(s); give one value for every net or one per net"]),
    ("missing_image", ["--control-image", "missing.png: no such file"]),
    ("unreadable_image", ["--control-image", "not_an_image.png: cannot read the image (not an image PIL can read)"]),
    ("truncated_image", ["--control-image", "truncated.png: cannot read the image (image file is truncated"]),
    ("broken_chunk_image", ["--control-image", "broken_chunk.png: cannot read the image (broken PNG file"]),
    ("bomb_image", ["--control-image", "edges.png: cannot read the image (", "decompression bomb"]),
    ("truncated_init", ["--init-image", "truncated.png: cannot read the image (image file is truncated"]),
    ("broken_chunk_init", ["--init-image", "broken_chunk.png: cannot read the image (broken PNG file"]),
    ("broken_chunk_mask", ["--mask", "broken_chunk.png: cannot read the image (broken PNG file"]),
    ("other_base", ["--controlnet", "other_base: a ControlNet for another base architecture"]),
    ("factor", ["--controlnet", "factor4: a ControlNet for another base architecture: control image factor 4"]),
    ("channels", ["--controlnet", "one_channel: takes 1-channel control images", "read as RGB, 3 channels"]),
    ("as_checkpoint", ["--checkpoint", "net0: a ControlNet, not a whole model; give it as --controlnet"]),
])
def test_bad_input_is_one_line(world, tmp_path, capsys, monkeypatch, case, words):
    net, edges = world["net0"], world["edges"]
    extra = {
        "count": ["--controlnet", net, "--controlnet", net, "--control-image", edges],
        "scale": ["--controlnet", f"{net}:x", "--control-image", edges],
        "fractions": ["--controlnet", net, "--control-image", edges, "--control-start", "0.6", "--control-end", "0.4"],
        "start_range": ["--controlnet", net, "--control-image", edges, "--control-start", "1"],
        "start_count": ["--controlnet", net, "--control-image", edges, "--controlnet", net, "--control-image", edges,
                        *["--control-start", "0.1"] * 3],
        "missing_image": ["--controlnet", net, "--control-image", str(tmp_path / "missing.png")],
        "unreadable_image": ["--controlnet", net, "--control-image", world["bad_image"]],
        "truncated_image": ["--controlnet", net, "--control-image", world["truncated"]],
        "broken_chunk_image": ["--controlnet", net, "--control-image", world["broken_chunk"]],
        "bomb_image": ["--controlnet", net, "--control-image", edges],
        "truncated_init": ["--init-image", world["truncated"]],
        "broken_chunk_init": ["--init-image", world["broken_chunk"], "--controlnet", net, "--control-image", edges],
        "broken_chunk_mask": ["--init-image", world["init"], "--mask", world["broken_chunk"]],
        "other_base": ["--controlnet", world["other_base"], "--control-image", edges],
        "factor": ["--controlnet", world["factor4"], "--control-image", edges],
        "channels": ["--controlnet", world["one_channel"], "--control-image", edges],
        "as_checkpoint": ["--checkpoint", net],
    }[case]
    if case == "bomb_image":  # edges.png is 24x20: over twice PIL's pixel limit, its DecompressionBombError
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    try:
        code = sampling.main(_argv(world, tmp_path / "out", *extra), prog="ldm-jax sample")
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in lines if ": error: " in line] == lines[-1:], err
    assert all(word in lines[-1] for word in words), lines[-1]
    assert not list((tmp_path / "out").glob("*.png"))
