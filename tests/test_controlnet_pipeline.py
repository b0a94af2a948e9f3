"""ControlNets in the pipelines against diffusers 0.42 (PyTorch float32): StableDiffusionControlNetPipeline with one
net and with two (MultiControlNetModel: different scales and guidance start / end), guess mode, and the 9-channel
StableDiffusionControlNetInpaintPipeline, on the tiny random SD of conftest (16x16 images, f=2 VAE, DDIM 5 steps,
CFG 7.5) with random ControlNets whose hint encoders downsample by 2; StableDiffusionXLControlNetPipeline on the
tiny random SDXL base of tests/sdxl_fixtures.py (Euler 5 steps, CFG 5, micro-conditioning; measured 6.0e-6); the
same initial latents both sides.
Scales and fractions are traced (no retrace); bad input is refused with one-line errors; control-image
preprocessing matches diffusers' VaeImageProcessor.

Tolerance: 2e-5 absolute on images in [-1, 1] (the issue's bound; the UNet-only pipeline test measures ~3.5e-6).

Run: .venv/bin/python -m pytest -q tests/test_controlnet_pipeline.py
"""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import controlnet_fixtures
import sdxl_fixtures
from conftest import TINY_SD_SIZE
from ldm_jax import parallel, pipeline, store
from ldm_jax.control import Control, control_inputs, keep_table, place_control
from ldm_jax.convert.diffusers_pipeline import load_diffusers_pipeline, read_scheduler_config, sampler_options
from ldm_jax.images import prepare_control_image
from ldm_jax.parallel import make_mesh

diffusers = pytest.importorskip("diffusers")

STEPS, GUIDANCE, SIZE = 5, 7.5, TINY_SD_SIZE
PROMPTS = ["a red circle on the left", "a blue square"]
ATOL = 2e-5
MESH_DEVICES = 2


@pytest.fixture(scope="module")
def nets(sd, tmp_path_factory):
    """Two random diffusers ControlNets of the tiny SD's UNet and ours (config, params), loaded from their folders."""
    pipe, _ = sd
    folder = tmp_path_factory.mktemp("controlnets")
    torch_nets = [controlnet_fixtures.random_controlnet(pipe.unet, seed) for seed in (1, 2)]
    return torch_nets, [controlnet_fixtures.saved_and_loaded(n, folder / f"net{i}") for i, n in enumerate(torch_nets)]


@pytest.fixture(scope="module")
def model(sd):
    return load_diffusers_pipeline(sd[1])


def _control_images(n: int, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32) for _ in range(n)]


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _theirs(pipe_cls, sd_pipe, torch_nets, noise, images, **kwargs) -> np.ndarray:
    """diffusers' images (B, H, W, 3) in [-1, 1]."""
    components = {k: v for k, v in sd_pipe.components.items() if k != "image_encoder"}
    pipe = pipe_cls(**components, controlnet=torch_nets if len(torch_nets) > 1 else torch_nets[0])
    control = [torch.from_numpy(i.transpose(0, 3, 1, 2).copy()) for i in images]
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), output_type="np",
                   **{"image" if pipe_cls is diffusers.StableDiffusionControlNetPipeline else "control_image":
                      control if len(control) > 1 else control[0]}, **kwargs).images
    return out * 2.0 - 1.0


def _ours(model, kind, noise, control, **kwargs) -> np.ndarray:
    cond, uncond = pipeline.encode_prompts(model, PROMPTS)
    sampler = pipeline.make_model_sampler(model.config, "ddim", STEPS,
                                          **sampler_options(read_scheduler_config(model.model_id), "ddim"))
    out = getattr(pipeline, kind)(model.config, model.params, sampler, cond, uncond, guidance_scale=GUIDANCE,
                                  noise=noise, mesh=make_mesh(devices=jax.devices()[:MESH_DEVICES]), control=control,
                                  **kwargs)
    return np.asarray(out)


def _compare(ours, theirs, what) -> float:
    assert ours.shape == theirs.shape == (len(PROMPTS), SIZE, SIZE, 3), what
    assert np.abs(theirs).max() > 0.05, what
    err = float(np.abs(ours - theirs).max())
    print(f"{what}: max |diff| {err:.2e}")
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0, err_msg=what)
    return err


@pytest.fixture(scope="module")
def single(sd, nets, model):
    """One net: ours (two calls of one compiled program, different scale and fractions) and diffusers'."""
    torch_nets, ours_nets = nets
    images, noise = _control_images(1), _noise()
    runs = {}
    for scale, start, end in ((0.8, 0.0, 1.0), (1.3, 0.2, 0.8)):
        control = Control(nets=ours_nets[:1], images=images, scales=scale, starts=start, ends=end)
        before = pipeline.trace_count("txt2img")
        ours = _ours(model, "txt2img", noise, control, height=SIZE, width=SIZE)
        runs[scale] = (ours, pipeline.trace_count("txt2img") - before, _theirs(
            diffusers.StableDiffusionControlNetPipeline, sd[0], torch_nets[:1], noise, images,
            controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end))
    return runs


def test_single_controlnet_matches_diffusers(single):
    for scale, (ours, _, theirs) in single.items():
        _compare(ours, theirs, f"single net, scale {scale}")


def test_changing_scale_and_fractions_does_not_retrace(single):
    (_, first, _), (_, second, _) = single.values()
    assert second == 0 and first <= 1


def test_the_control_matters(single):
    """Another scale and fractions change the image by far more than the tolerance."""
    (ours, _, _), (other, _, _) = single.values()
    assert np.abs(ours - other).max() > 100 * ATOL


def test_img2img_matches_diffusers(sd, nets, model):
    """StableDiffusionControlNetImg2ImgPipeline at strength 0.6 (the last 3 of 5 steps; the guidance fractions count
    those 3): diffusers draws the VAE posterior sample (std ~3e-7 in this VAE) and then the noise from one torch
    generator; ours takes that noise."""
    torch_nets, ours_nets = nets
    image = np.random.default_rng(4).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    images = _control_images(1, seed=8)
    shape = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)
    gen = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=gen)  # the posterior sample's draw
    noise = torch.randn(shape, generator=gen).numpy().transpose(0, 2, 3, 1)
    control = Control(nets=ours_nets[:1], images=images, scales=0.9, starts=0.3)
    ours = _ours(model, "img2img", noise, control, images=image, strength=0.6)
    components = {k: v for k, v in sd[0].components.items() if k != "image_encoder"}
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(**components, controlnet=torch_nets[0])
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, image=(image + 1) / 2, control_image=torch.from_numpy(
            images[0].transpose(0, 3, 1, 2).copy()), height=SIZE, width=SIZE, strength=0.6, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, controlnet_conditioning_scale=0.9, control_guidance_start=0.3,
            generator=torch.Generator().manual_seed(0), output_type="np").images * 2.0 - 1.0
    _compare(ours, theirs, "img2img, strength 0.6")


def test_multi_controlnet_matches_diffusers(sd, nets, model):
    torch_nets, ours_nets = nets
    images, noise = _control_images(2), _noise(1)
    kw = dict(scales=[0.8, 0.5], starts=[0.0, 0.2], ends=[0.6, 1.0])
    ours = _ours(model, "txt2img", noise, Control(nets=ours_nets, images=images, **kw), height=SIZE, width=SIZE)
    theirs = _theirs(diffusers.StableDiffusionControlNetPipeline, sd[0], torch_nets, noise, images,
                     controlnet_conditioning_scale=kw["scales"], control_guidance_start=kw["starts"],
                     control_guidance_end=kw["ends"])
    _compare(ours, theirs, "two nets")


def test_guess_mode_matches_diffusers(sd, nets, model):
    torch_nets, ours_nets = nets
    images, noise = _control_images(1, seed=6), _noise(2)
    control = Control(nets=ours_nets[:1], images=images, scales=0.9, guess_mode=True)
    ours = _ours(model, "txt2img", noise, control, height=SIZE, width=SIZE)
    theirs = _theirs(diffusers.StableDiffusionControlNetPipeline, sd[0], torch_nets[:1], noise, images,
                     controlnet_conditioning_scale=0.9, guess_mode=True)
    _compare(ours, theirs, "guess mode")


def test_inpaint_9_channel_matches_diffusers(sd_inpaint, nets):
    pipe, folder = sd_inpaint
    model = load_diffusers_pipeline(folder)
    torch_nets, ours_nets = nets
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    images, noise = _control_images(1, seed=7), _noise(3)
    control = Control(nets=ours_nets[:1], images=images, scales=0.7, ends=0.8)
    ours = _ours(model, "inpaint", noise, control, images=image, mask=mask)
    theirs = _theirs(diffusers.StableDiffusionControlNetInpaintPipeline, pipe, torch_nets[:1], noise, images,
                     image=(image + 1) / 2, mask_image=mask, strength=1.0, controlnet_conditioning_scale=0.7,
                     control_guidance_end=0.8)
    _compare(ours, theirs, "inpaint (9-channel UNet)")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(diffusers' tiny random SDXL base pipeline, ours loaded from its folder, a random ControlNet of its UNet, ours
    (config, params) read from the net's folder)."""
    torch.manual_seed(0)
    base, _ = sdxl_fixtures.base_and_refiner(tmp_path_factory.mktemp("sdxl_tok"), size=SIZE)
    root = tmp_path_factory.mktemp("sdxl")
    base.save_pretrained(root / "base", safe_serialization=True)
    base.set_progress_bar_config(disable=True)
    net = controlnet_fixtures.random_controlnet(base.unet, 4)
    return base, store.load_model(root / "base"), net, controlnet_fixtures.saved_and_loaded(net, root / "net")


def test_sdxl_controlnet_matches_diffusers(sdxl):
    """StableDiffusionXLControlNetPipeline (text_time UNet and ControlNet: pooled text + micro-conditioning reach
    both), Euler 5 steps, CFG 5, scale 0.8, guidance end 0.8, from the same initial latents."""
    pipe, model, torch_net, net = sdxl
    images, noise, guidance = _control_images(1, seed=9), _noise(4), 5.0
    micro = pipeline.MicroConditioning(original_size=(24, 20), crops_coords_top_left=(2, 3))
    cond, uncond = pipeline.encode_prompts(model, PROMPTS)
    sampler = pipeline.make_model_sampler(model.config, "euler", STEPS,
                                          **sampler_options(read_scheduler_config(model.model_id), "euler"))
    control = Control(nets=[net], images=images, scales=0.8, ends=0.8)
    ours = np.asarray(pipeline.txt2img(model.config, model.params, sampler, cond, uncond, guidance_scale=guidance,
                                       noise=noise, height=SIZE, width=SIZE, micro=micro, control=control,
                                       mesh=make_mesh(devices=jax.devices()[:MESH_DEVICES])))
    assert model.config.unet.addition_embed_type == net[0].unet.addition_embed_type == "text_time"
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    theirs_pipe = diffusers.StableDiffusionXLControlNetPipeline(**components, controlnet=torch_net,
                                                                add_watermarker=False)
    theirs_pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
              latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), original_size=(24, 20),
              crops_coords_top_left=(2, 3), output_type="np")
    with torch.no_grad():
        theirs = theirs_pipe(image=torch.from_numpy(images[0].transpose(0, 3, 1, 2).copy()),
                             controlnet_conditioning_scale=0.8, control_guidance_end=0.8, **kw).images * 2.0 - 1.0
        plain = pipe(**kw).images * 2.0 - 1.0
    _compare(ours, theirs, "SDXL, one net")
    assert np.abs(theirs - plain).max() > 100 * ATOL  # the ControlNet changes the image


def test_keep_table_is_diffusers_rule():
    table = keep_table([0.0, 0.2], [0.6, 1.0], first_step=0, num_steps=5)
    np.testing.assert_array_equal(table.T, [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    # an img2img run of the last 3 of 5 steps: rows 0, 1 never run
    np.testing.assert_array_equal(keep_table([0.0], [0.5], first_step=2, num_steps=5)[:, 0], [0, 0, 1, 0, 0])


def test_placed_control_images_are_reused(model, nets):
    """A control image shared by the batch: `control_inputs` broadcasts it without a host copy per example, and
    `place_control` (what `ldm-jax sample` does once per run) puts the (B, H, W, 3) batch on the devices; a pipeline
    call passes the placed images through (no new placement, no retrace) and gives the same images bit for bit."""
    _, ours_nets = nets
    shared = _control_images(1)[0][0]  # (H, W, 3)
    control = Control(nets=ours_nets[:1], images=[shared], scales=0.9)
    view = control_inputs(model.config, control, len(PROMPTS), (SIZE, SIZE), 0, STEPS)[2]["control_images"][0]
    assert view.shape == (len(PROMPTS), SIZE, SIZE, 3) and view.strides[0] == 0  # a view, not B copies
    mesh = make_mesh(devices=jax.devices()[:MESH_DEVICES])
    placed = place_control(control, len(PROMPTS), (SIZE, SIZE), mesh)
    image = placed.images[0]
    assert isinstance(image, jax.Array) and image.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert image.sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(image), np.broadcast_to(shared, image.shape))
    assert control_inputs(model.config, placed, len(PROMPTS), (SIZE, SIZE), 0, STEPS)[2]["control_images"][0] is image
    first = _ours(model, "txt2img", _noise(), control, height=SIZE, width=SIZE)
    before = pipeline.trace_count("txt2img")
    np.testing.assert_array_equal(_ours(model, "txt2img", _noise(), placed, height=SIZE, width=SIZE), first)
    assert pipeline.trace_count("txt2img") == before
    with pytest.raises(ValueError, match=rf"control image 0 has shape \({SIZE}, {SIZE}, 3\); expected \(2, 8, 8, 3\)"):
        place_control(control, 2, (8, 8), mesh)


def _error(model, control, **kwargs) -> str:
    with pytest.raises(ValueError) as excinfo:
        _ours(model, "txt2img", _noise(), control, height=SIZE, width=SIZE, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_control_inputs_are_refused(model, nets):
    _, ours_nets = nets
    images = _control_images(2)
    good = Control(nets=ours_nets, images=images)
    assert "1 control images for 2 ControlNets" in _error(model, dataclasses.replace(good, images=images[:1]))
    assert "control: scales: 3 values for 2 ControlNet(s)" in _error(model, dataclasses.replace(
        good, scales=[1.0, 1.0, 0.5]))
    assert "control: starts: 1 values for 2 ControlNet(s)" in _error(model, dataclasses.replace(good, starts=[0.1]))
    assert "control: starts 0.5 and control: ends 0.5 of ControlNet 0: a net runs from its start to its end" in _error(
        model, dataclasses.replace(good, starts=0.5, ends=0.5))
    assert "0 <= start < end <= 1" in _error(model, dataclasses.replace(good, ends=[1.0, float("nan")]))
    small = [i[:, :8, :8] for i in images]
    assert "control image 0 has shape (2, 8, 8, 3); expected (2, 16, 16, 3)" in _error(
        model, dataclasses.replace(good, images=small))
    other = dataclasses.replace(ours_nets[0][0], conditioning_embedding_out_channels=(8, 16, 32))
    assert ("control: nets[1]: a ControlNet for another base architecture: control image factor 4, the base "
            "model's 2") in _error(model, dataclasses.replace(good, nets=[ours_nets[0], (other, ours_nets[1][1])]))


@pytest.mark.parametrize("mode", ["default", "crop", "fill"])
def test_prepare_control_image_matches_diffusers(mode):
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 33, 3), np.uint8))
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    theirs = processor.preprocess(image, height=24, width=16, resize_mode=mode).numpy()[0].transpose(1, 2, 0)
    ours = prepare_control_image(image, 24, 16, resize_mode=mode)
    assert ours.shape == (24, 16, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_prepare_control_image_float_and_grey():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (10, 12, 3)).astype(np.float32)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    theirs = processor.preprocess(image[None], height=16, width=24).numpy()[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(prepare_control_image(image, 16, 24), theirs)
    grey = prepare_control_image(rng.integers(0, 256, (8, 8), np.uint8), 16, 16)
    assert grey.shape == (16, 16, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(ValueError, match="edges.png: a float control image must lie in"):
        prepare_control_image(image * 2, 16, 16, name="edges.png")
