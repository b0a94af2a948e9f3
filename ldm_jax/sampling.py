"""What `ldm-jax sample` (and `sample.py`) does: load a model, validate the request, generate on every local
device, write PNGs.

`main(argv)` is the command line; `run(request)` is the library call tests make. User errors (a missing
file, a bad flag value, a model that does not load) raise `UserError`, which the command line prints as one
line and exits with 2.

Models (`--checkpoint`, alias `--ckpt`) load through the one model store (`ldm_jax.store.load_model`):
omitted, the embedded captioned-shapes model; a model directory; a diffusers folder; a CompVis / SGM single
file (config from `--config`, `config.yaml` beside it, or inferred from the weights; `--tokenizer DIR`).

Each image i of the run (prompt p, copy k: i = p * n + k) uses the key fold_in(key(seed), i), so an image
depends on (seed, its index, its prompt and the settings), not on how many devices share the batch.
`--seed -1` draws the seed at random (printed, and recorded in every PNG's `seed` chunk, so the run can be
repeated). Indices are 0-based: image i is file {i:05d}.png; prompt p is the p-th of the --prompt flags
followed by the --prompts-file lines, as warnings and errors name it.

`--latents FILE.npy` replaces those draws by given initial noise, as diffusers' `latents=` argument: shape
(images, channels, h, w), unit variance; the sampler scales it by its initial sigma. With the same weights
and a deterministic sampler the images then equal diffusers' (tests/test_sample_cli.py). With
`--init-image` it is the unit noise added to the encoded image at the first timestep of the strength's
schedule.

Sizes: a model whose UNet has a learned position embedding (the embedded model: 8x8 latents, factor 4)
samples exactly that size (32x32 pixels); others take heights and widths that are multiples of the
autoencoder's factor (8 for Stable Diffusion, as diffusers; the UNet rounds odd halvings up and upsamples to its
skips' sizes), up to MAX_SIDE (8192) pixels a side.

Problems that do not stop a run are one line each on stderr: prompt words the tokenizer does not know
(the embedded model's small vocabulary reads "crimson" as <|unk|>) and prompts longer than the text
encoder's max_length, once per prompt. Images whose float output is not finite (NaN / inf) are not written
(nor put in the grid): a warning names each, the finite ones are written, and the run ends with an error
(exit status 2).

SDXL (a diffusers SDXL folder, a model directory converted from one, or an SGM single file): both text towers
read the prompt; without --negative-prompt the base's unconditional branch is zero text conditioning (its
force_zeros_for_empty_prompt), an explicit --negative-prompt "" is encoded as a prompt. Micro-conditioning flags
(--original-size H W, --crops-coords-top-left TOP LEFT, --target-size H W, their --negative-* versions, and the
refiner's --aesthetic-score / --negative-aesthetic-score) default as in diffusers and are recorded in the PNGs.
--refiner SRC finishes the base's latents from --denoising-end (default 0.8) on: an ensemble of expert
denoisers sharing one sampler and noise schedule. --distilled turbo|lightning picks a few-step distilled model's
settings (sampler, trailing spacing, steps, guidance 0) wherever the flags do not. --clip-skip N reads the text
towers N blocks earlier (diffusers' clip_skip).

Adapters: `--lora FILE[:SCALE]` (repeatable; diffusers/PEFT or kohya safetensors) merges each LoRA into the
weights at its scale before sampling, and `--embedding FILE [--token NAME]` (repeatable, one --token per
--embedding or none) adds textual-inversion tokens, through `store.apply_adapters`; both are recorded in the
PNGs ("loras", "embeddings"). A file for another model fails before anything runs, naming the file and key.

ControlNets (`ldm_jax.control`; diffusers' StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline): `--controlnet
SRC[:SCALE]` (a diffusers ControlNet folder or an original control_*.pth / .safetensors file, loaded by
`store.load_controlnet` against the model, so one for another base fails naming the file) and `--control-image IMG`
are repeatable and paired by position; each image is decoded as training decodes control images (alpha dropped, as
diffusers' convert("RGB"): `images.CONTROL_ALPHA`), prepared at the output size as diffusers' VaeImageProcessor
(`--control-resize default|crop|fill`, Lanczos) and shared by the batch, placed on the devices once per run
(`control.place_control`). A file PIL cannot decode (--control-image, --init-image, --mask) is one line naming
the flag and the file. `--control-start F` / `--control-end F` (one value
for every net, or one per net) are diffusers' control_guidance_start / _end, `--guess-mode` its guess_mode. Text to
image, --init-image and --mask runs all take them (not --refiner). Scales and fractions are traced: changing them
reuses the compiled program. The PNGs record each net ("controlnets": SRC:SCALE, "control_images",
"control_start", "control_end", "control_resize", "guess_mode").

Compiling: the run's programs go into the persistent compilation cache (`ldm_jax.compile_cache`: $LDM_JAX_CACHE_DIR,
else $XDG_CACHE_HOME/ldm-jax/xla or ~/.cache/ldm-jax/xla), so a second run of the same model, size, batch, sampler
and steps reads them back instead of compiling; `--no-compile-cache` (or LDM_JAX_CACHE_DIR set to "") turns it
off. The progress lines say where the cache is and, per compiled pipeline program, how long it took and whether
it came from the cache.

The CompVis txt2img flags are accepted as aliases: --ckpt, --scale, --ddim_steps, --ddim_eta, --n_samples,
--H, --W, --from-file, --plms.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from ldm_jax.cli import ArgumentParser, finite_float, lora_spec, one_line, writable_dir
from ldm_jax.diffusion.micro_conditioning import MicroConditioning
from ldm_jax.images import RESIZE_MODES, image_grid, to_uint8
from ldm_jax.models.tokenizer import short_repr

# The library's choices, copied so that flags are checked before JAX starts (tests/test_sample_cli.py keeps them
# equal to samplers.SAMPLERS, models.attention.ATTENTION_IMPLS and the diffusers spacings of samplers.TIMESTEP_SPACINGS).
SAMPLERS = ("ddim", "plms", "dpm++", "euler", "euler-a", "ddpm")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
ATTENTIONS = ("xla", "jax_nn", "chunked")
GRID_FILE = "grid.png"  # the contact sheet written beside the images (evaluate skips it)
MAX_SIDE = 8192  # the largest --height / --width in pixels (a 8192x8192 SD image is 1024x1024 latents)
SEED_RANGE = 2**32  # seeds are in [0, 2**32); -1 draws one at random
RANDOM_SEED = -1
# Few-step distilled models (--distilled): the sampler settings their authors publish, used where the user gave
# no flag of their own. SDXL-Turbo: Euler ancestral, trailing spacing, 1 step, no guidance; SDXL-Lightning:
# Euler, trailing spacing, 4 steps (its 2-, 4- and 8-step checkpoints), no guidance.
DISTILLED = {
    "turbo": {"sampler": "euler-a", "timestep_spacing": "trailing", "steps": 1, "guidance": 0.0},
    "lightning": {"sampler": "euler", "timestep_spacing": "trailing", "steps": 4, "guidance": 0.0},
}
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5
MICRO_FLAGS = {  # MicroConditioning field -> flag, for SDXL's micro-conditioning
    "original_size": "--original-size", "crops_coords_top_left": "--crops-coords-top-left",
    "target_size": "--target-size", "negative_original_size": "--negative-original-size",
    "negative_crops_coords_top_left": "--negative-crops-coords-top-left",
    "negative_target_size": "--negative-target-size", "aesthetic_score": "--aesthetic-score",
    "negative_aesthetic_score": "--negative-aesthetic-score",
}


class UserError(Exception):
    """A problem with what the user asked for (a flag value, a path); reported as one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One sample.py run. Sizes are in pixels; None means the model's default. seed: in [0, 2**32), or -1 to
    draw one at random (`run` prints and records the drawn seed)."""

    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0
    seed: int = 0
    n: int = 1
    height: int | None = None
    width: int | None = None
    init_image: str | None = None
    strength: float = 0.75
    mask: str | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None
    config: str | None = None
    precision: str = "fp32"
    param_dtype: str = "fp32"
    attention: str | None = None
    latents: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    text_encoder_config: str | None = None
    outdir: str = "outputs"
    batch_size: int | None = None
    clip_skip: int = 0
    micro: MicroConditioning = MicroConditioning()
    distilled: str | None = None
    refiner: str | None = None
    denoising_end: float = 0.8
    loras: tuple[tuple[str, float], ...] = ()
    embeddings: tuple[tuple[str, str | None], ...] = ()
    controlnets: tuple[tuple[str, float], ...] = ()
    control_images: tuple[str, ...] = ()
    control_starts: tuple[float, ...] = ()
    control_ends: tuple[float, ...] = ()
    guess_mode: bool = False
    control_resize: str = "default"
    compile_cache: bool = True


# ------------------------------------------------------------------------------------------- validation


def validate(request: SampleRequest) -> None:
    """Raises UserError naming the flag when a value is out of range (before any model is loaded)."""
    if not request.prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if request.sampler not in SAMPLERS:
        raise UserError(f"--sampler {request.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if request.steps < 1:
        raise UserError(f"--steps must be >= 1, got {request.steps}")
    if request.n < 1:
        raise UserError(f"--n must be >= 1, got {request.n}")
    for flag, value in (("--guidance", request.guidance), ("--eta", request.eta), ("--strength", request.strength),
                        ("--aesthetic-score", request.micro.aesthetic_score),
                        ("--negative-aesthetic-score", request.micro.negative_aesthetic_score)):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if not 0.0 <= request.strength <= 1.0:
        raise UserError(f"--strength must be in [0, 1], got {request.strength}")
    if not isinstance(request.seed, int) or (request.seed != RANDOM_SEED and not 0 <= request.seed < SEED_RANGE):
        raise UserError(f"--seed must be in [0, 2**32) or -1 (random), got {request.seed}")
    if request.eta < 0:
        raise UserError(f"--eta must be >= 0, got {request.eta}")
    if request.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {request.precision!r}")
    if request.param_dtype not in ("fp32", "bf16"):
        raise UserError(f"--param-dtype must be fp32 or bf16, got {request.param_dtype!r}")
    if request.attention is not None and request.attention not in ATTENTIONS:
        raise UserError(f"--attention {request.attention!r} is unknown; choose one of {', '.join(ATTENTIONS)}")
    if request.timestep_spacing is not None and request.timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"--timestep-spacing {request.timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    if request.steps_offset is not None and request.steps_offset < 0:
        raise UserError(f"--steps-offset must be >= 0, got {request.steps_offset}")
    if not 0.0 < request.denoising_end < 1.0:
        raise UserError(f"--denoising-end must be in (0, 1) (the noise fraction where the refiner takes over), "
                        f"got {request.denoising_end}")
    if request.refiner is not None and request.init_image is not None:
        raise UserError("--refiner applies to text-to-image runs (the base denoises from noise, the refiner "
                        "finishes); leave out --init-image")
    if request.refiner is not None and not pathlib.Path(request.refiner).exists():
        raise UserError(f"--refiner {request.refiner}: no such file or directory")
    if request.clip_skip < 0:
        raise UserError(f"--clip-skip must be >= 0, got {request.clip_skip}")
    if request.distilled is not None and request.distilled not in DISTILLED:
        raise UserError(f"--distilled {request.distilled!r} is unknown; choose one of {', '.join(DISTILLED)}")
    for field, flag in MICRO_FLAGS.items():
        value, low = getattr(request.micro, field), 0 if "crops" in field else 1
        if isinstance(value, tuple) and min(value) < low:
            raise UserError(f"{flag} takes two integers >= {low} (height width / top left), got {value}")
    if request.mask is not None and request.init_image is None:
        raise UserError("--mask needs --init-image (the image to inpaint)")
    for flag, value in (("--height", request.height), ("--width", request.width), ("--batch-size", request.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--height", request.height), ("--width", request.width)):
        if value is not None and value > MAX_SIDE:
            raise UserError(f"{flag} {value} is larger than {MAX_SIDE}, the largest image side allowed")
    for flag, path in (("--init-image", request.init_image), ("--mask", request.mask), ("--latents", request.latents)):
        if path is not None and not pathlib.Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    for path, _ in request.loras:
        if not pathlib.Path(path).is_file():
            raise UserError(f"--lora {path}: no such file (a diffusers/PEFT or kohya LoRA .safetensors)")
    for path, _ in request.embeddings:
        if not pathlib.Path(path).is_file():
            raise UserError(f"--embedding {path}: no such file (a textual-inversion .safetensors / .pt / .bin)")
    validate_control(request)
    if request.text_encoder_config is not None and not pathlib.Path(request.text_encoder_config).exists():
        raise UserError(f"--text-encoder-config {request.text_encoder_config}: no such file or directory (a "
                        f"transformers CLIP config.json or its directory)")
    try:
        writable_dir(request.outdir, "--outdir")
    except ValueError as error:
        raise UserError(str(error)) from None


def validate_control(request: SampleRequest) -> None:
    """The ControlNet flags (UserError naming the flag): a known resize mode, one --control-image per --controlnet,
    one --control-start / --control-end for every net or one per net with 0 <= start < end <= 1
    (`control_fractions`), files that exist; none of the other flags without --controlnet, and no --refiner with
    it. (NaN / inf scales and fractions never get here: the flags' parsers, `cli.finite_float` and
    `cli.lora_spec`, refuse them.)"""
    if request.control_resize not in RESIZE_MODES:
        raise UserError(f"--control-resize {request.control_resize!r} is unknown; choose one of "
                        f"{', '.join(RESIZE_MODES)}")
    nets = len(request.controlnets)
    if len(request.control_images) != nets:
        raise UserError(f"--controlnet was given {nets} time(s) and --control-image {len(request.control_images)} "
                        "time(s); give one --control-image per --controlnet, paired by position")
    if not nets:
        given = [flag for flag, on in (("--control-start", request.control_starts), ("--control-end",
                 request.control_ends), ("--guess-mode", request.guess_mode),
                 ("--control-resize", request.control_resize != "default")) if on]
        if given:
            raise UserError(f"{given[0]} applies to ControlNets; give --controlnet SRC with --control-image IMG")
        return
    control_fractions(request)
    if request.refiner is not None:
        raise UserError("--controlnet steers a base model alone; leave out --refiner")
    for path, _ in request.controlnets:
        if not pathlib.Path(path).exists():
            raise UserError(f"--controlnet {path}: no such file or directory (a diffusers ControlNet folder or an "
                            "original control_*.pth / .safetensors file)")
    for path in request.control_images:
        if not pathlib.Path(path).is_file():
            raise UserError(f"--control-image {path}: no such file")


def control_fractions(request: SampleRequest) -> tuple[list[float], list[float]]:
    """(starts, ends): each --controlnet's guidance fractions, through the pipelines' own rule
    (`control.guidance_fractions`): a --control-start / --control-end given once is every net's, or once per net;
    default 0 and 1; 0 <= start < end <= 1. UserError naming the flag and the net otherwise."""
    # Imports JAX (about 2 s), only for runs with --controlnet, still before any model is loaded.
    from ldm_jax.control import guidance_fractions  # noqa: PLC0415

    def value(flag_values: tuple[float, ...], default: float) -> Any:  # guidance_fractions' form: one or per net
        return flag_values[0] if len(flag_values) == 1 else (flag_values or default)

    try:
        return guidance_fractions(value(request.control_starts, 0.0), value(request.control_ends, 1.0),
                                  [f"--controlnet {path}" for path, _ in request.controlnets],
                                  names=("--control-start", "--control-end"))
    except ValueError as error:
        raise UserError(str(error)) from None


# ------------------------------------------------------------------------------------------------ models


def load_model(request: SampleRequest):
    """The request's model through the store (`ldm_jax.store.load_model`) with its run-time options; any
    problem with the files (missing, corrupt, the wrong model, a bad tokenizer directory) becomes UserError."""
    from ldm_jax import store  # noqa: PLC0415 (JAX starts only after the flags are checked)

    where = request.checkpoint or f"the embedded model ({store.SHIPPED_MODELS[store.DEFAULT_MODEL]})"
    try:
        return store.load_model(request.checkpoint, config=request.config, tokenizer=request.tokenizer,
                                dtype=request.precision, param_dtype=request.param_dtype,
                                attention=request.attention,
                                text_encoder_config=request.text_encoder_config)
    except (OSError, ValueError) as error:  # StoreError, ConversionError and CheckpointError are ValueErrors
        message = one_line(error)
        if "ControlNet" in message and "not a whole model" in message:  # the store recognised a ControlNet
            raise UserError(f"--checkpoint {request.checkpoint}: a ControlNet, not a whole model; give it as "
                            "--controlnet (with --control-image) beside the base model's --checkpoint") from None
        if request.checkpoint and message.startswith(request.checkpoint):  # the store named the path already
            raise UserError(f"--checkpoint {message}") from None
        raise UserError(f"--checkpoint {where}: {message}") from None


def with_adapters(request: SampleRequest, model: Any) -> Any:
    """`model` with the request's --embedding tokens added and --lora files merged (`store.apply_adapters`); a
    file that does not fit the model becomes UserError naming the flag."""
    if not request.loras and not request.embeddings:
        return model
    from ldm_jax import store  # noqa: PLC0415

    try:
        return store.apply_adapters(model, loras=request.loras, embeddings=request.embeddings)
    except (OSError, ValueError) as error:
        message = one_line(error)
        named = [flag for flag, files in (("--lora", request.loras), ("--embedding", request.embeddings))
                 if any(str(path) in message for path, _ in files)]
        raise UserError(f"{'/'.join(named) or '--lora/--embedding'} {message}") from None


def load_control(request: SampleRequest, model: Any, height: int, width: int) -> Any:
    """The request's `control.Control` (None without --controlnet): each net loaded by `store.load_controlnet`
    against the model and checked against its first stage too (`models.controlnet.check_controlnet_fits`: latent
    channels, control image factor) and for control images of 3 channels (what --control-image files are read as);
    a net for another base is a UserError naming --controlnet and the file. Each control image is read and prepared
    at height x width."""
    if not request.controlnets:
        return None
    from ldm_jax import store  # noqa: PLC0415
    from ldm_jax.control import Control  # noqa: PLC0415
    from ldm_jax.models.controlnet import check_controlnet_fits  # noqa: PLC0415

    config, nets = model.config, []
    for path, _ in request.controlnets:
        try:
            net = store.load_controlnet(path, base=model, param_dtype=model.options.param_dtype)
            check_controlnet_fits(net.config, config.unet, path, latent_channels=config.latent_channels,
                                  downsample_factor=config.downsample_factor)
        except (OSError, ValueError) as error:
            message = one_line(error)
            raise UserError(f"--controlnet {message if message.startswith(path) else path + ': ' + message}") from None
        if net.config.conditioning_channels != 3:
            raise UserError(f"--controlnet {path}: takes {net.config.conditioning_channels}-channel control images "
                            "(conditioning_channels); --control-image files are read as RGB, 3 channels")
        nets.append((net.config, net.params))
    images = [read_control_image(path, height, width, request.control_resize) for path in request.control_images]
    starts, ends = control_fractions(request)
    return Control(nets=nets, images=images, scales=[scale for _, scale in request.controlnets], starts=starts,
                   ends=ends, guess_mode=request.guess_mode)


def read_control_image(path: str, height: int, width: int, resize_mode: str) -> np.ndarray:
    """A --control-image file -> (height, width, 3) float32 in [0, 1]: decoded as training decodes control images
    (`images.decode_image` with `images.CONTROL_ALPHA`), then prepared at the output size
    (`images.prepare_control_image`). A file that cannot be decoded is a UserError naming the flag and the file."""
    from ldm_jax.images import CONTROL_ALPHA, decode_image, prepare_control_image  # noqa: PLC0415

    try:
        image = decode_image(path, alpha=CONTROL_ALPHA)
        return prepare_control_image(image, height, width, resize_mode=resize_mode, name=path)
    except ValueError as error:  # ImageFileError and prepare_control_image's errors name the file
        raise UserError(f"--control-image {one_line(error)}") from None


# ------------------------------------------------------------------------------------------- generation


def read_image(path: str, *, mode: str, flag: str) -> np.ndarray:
    """An image file (`images.decode_image`, alpha dropped as PIL's convert) -> float32 (H, W, 3) in [-1, 1] (mode
    "RGB") or a (H, W, 1) mask in [0, 1] (mode "L"). A file that cannot be decoded is a UserError naming `flag`."""
    from ldm_jax.images import ImageFileError, decode_image  # noqa: PLC0415

    try:
        array = decode_image(path, alpha="drop", mode=mode).astype(np.float32) / 255.0
    except ImageFileError as error:
        raise UserError(f"{flag} {error}") from None
    if mode == "L":
        return array[..., None]
    return array * 2.0 - 1.0


def run(request: SampleRequest) -> list[pathlib.Path]:
    """Generates len(prompts) * n images and writes them (and a grid) to `request.outdir`.

    Returns the written image paths (the grid last). Raises UserError (after writing the finite images) when
    any image came out non-finite.
    """
    validate(request)  # before JAX starts: a bad flag is reported at once
    import jax  # noqa: PLC0415 (JAX starts only after the flags are checked)

    from ldm_jax import compile_cache, parallel, pipeline  # noqa: PLC0415
    from ldm_jax.control import place_control  # noqa: PLC0415

    cache_line = compile_cache.setup(request.compile_cache, switch="--no-compile-cache")  # before anything compiles
    request = _resolve_seed(request)
    model = with_adapters(request, load_model(request))
    config = model.config
    refiner = load_refiner(request, model) if request.refiner else None
    micro = check_model_flags(request, config, None if refiner is None else refiner.config)
    init, mask = _init_and_mask(request)
    height, width = _size(request, config, init)
    control = load_control(request, model, height, width)
    sampler_opts = sampler_options(request, model.scheduler_config)
    try:
        sampler = pipeline.make_model_sampler(config, request.sampler, request.steps, **sampler_opts)
    except ValueError as error:
        raise UserError(str(error)) from None
    prompts = [p for p in request.prompts for _ in range(request.n)]
    mesh = parallel.make_mesh()
    # On the devices once, leaf by leaf, each host array dropped as it goes: never two full copies of the params.
    model = dataclasses.replace(model, params=pipeline.place_params(model.params, mesh, consume=True))
    if refiner is not None:
        refiner = dataclasses.replace(refiner, params=pipeline.place_params(refiner.params, mesh, consume=True))
    devices = mesh.devices.size
    batch = request.batch_size or devices * max(1, min(8, math.ceil(len(prompts) / devices)))
    batch = math.ceil(batch / devices) * devices
    if control is not None:  # once per run: the nets' params and the (batch, H, W, 3) control images on the devices
        control = dataclasses.replace(control, nets=[(net, pipeline.place_params(params, mesh, consume=True))
                                                     for net, params in control.nets])
        control = place_control(control, batch, (height, width), mesh)
    latents = read_latents(request.latents, len(prompts), config, height, width) if request.latents else None
    if model.tokenizer is not None:
        report_prompts(request, pipeline.inspect_prompts(model, [*request.prompts, request.negative_prompt or ""]))
    images = []
    print(cache_line, file=sys.stderr)
    print(f"model {model.model_id}: {len(prompts)} image(s), {request.sampler} {request.steps} steps, "
          f"guidance {request.guidance}, {height}x{width}, {devices} device(s)"
          + (f", {len(request.controlnets)} ControlNet(s)" if control else ""), file=sys.stderr)
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", unit="batch", file=sys.stderr):
        chunk = prompts[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # every device gets an equal share
        negatives = None if request.negative_prompt is None else [request.negative_prompt] * batch
        cond, uncond = pipeline.encode_prompts(model, padded, negatives, warn=False)
        common = dict(guidance_scale=request.guidance, seed=request.seed, first_index=start, mesh=mesh,
                      options=model.options, micro=micro, clip_skip=request.clip_skip)
        if latents is not None:
            noise = latents[start:start + batch]
            common["noise"] = np.concatenate([noise, np.repeat(noise[-1:], batch - len(noise), axis=0)])
        if refiner is not None:
            latents_out = pipeline.txt2img(config, model.params, sampler, cond, uncond, height=height, width=width,
                                           denoising_end=request.denoising_end, output="latents", **common)
            cond, uncond = pipeline.encode_prompts(refiner, padded, negatives, warn=False)
            common.update(options=refiner.options)
            common.pop("noise", None)
            out = pipeline.refine(refiner.config, refiner.params, sampler, cond, uncond, latents_out,
                                  denoising_start=request.denoising_end, **common)
        elif init is None:
            out = pipeline.txt2img(config, model.params, sampler, cond, uncond, height=height, width=width,
                                   control=control, **common)
        elif mask is None:
            out = pipeline.img2img(config, model.params, sampler, cond, uncond, _tile(init, batch),
                                   strength=request.strength, control=control, **common)
        else:
            out = pipeline.inpaint(config, model.params, sampler, cond, uncond, _tile(init, batch),
                                   _tile(mask, batch), strength=request.strength if request.strength < 1 else 1.0,
                                   control=control, **common)
        images.extend(_finite_uint8(np.asarray(jax.device_get(out))[: len(chunk)]))
    paths = write_outputs(request, model.model_id, prompts, images, height, width)
    _check_all_written(request, images)
    return paths


def load_refiner(request: SampleRequest, base: Any) -> Any:
    """The --refiner model (through the store, with the base's run-time options), checked against the base: one
    noise schedule and prediction type, one latent space (channels and factor), a refiner's UNet."""
    try:
        refiner = load_model(dataclasses.replace(request, checkpoint=request.refiner, config=None, tokenizer=None))
    except UserError as error:
        raise UserError(str(error).replace("--checkpoint", "--refiner", 1)) from None
    a, b = base.config, refiner.config
    if b.num_time_ids != 5:
        raise UserError(f"--refiner {request.refiner}: not an SDXL refiner (its UNet takes "
                        f"{b.num_time_ids or 'no'} micro-conditioning numbers; a refiner takes 5, with the "
                        "aesthetic score)")
    if a.num_time_ids != 6:
        raise UserError(f"--checkpoint {base.model_id}: a refiner finishes an SDXL base's latents; this model is "
                        f"not an SDXL base (its UNet takes {a.num_time_ids or 'no'} micro-conditioning numbers, "
                        "a base takes 6)")
    same = ((a.diffusion.schedule, a.diffusion.prediction_type, a.latent_channels, a.downsample_factor)
            == (b.diffusion.schedule, b.diffusion.prediction_type, b.latent_channels, b.downsample_factor))
    if not same:
        raise UserError(f"--refiner {request.refiner}: its noise schedule, prediction type or latent space differs "
                        "from the base's; an ensemble shares them")
    return refiner


def check_model_flags(request: SampleRequest, config, refiner_config=None) -> MicroConditioning:
    """The flags that depend on the loaded model (and --refiner), checked (UserError naming the flag); returns
    the request's `MicroConditioning` (SDXL; unused by other models)."""
    if config.num_time_ids == 5 and request.init_image is None:
        raise UserError(f"--checkpoint {request.checkpoint}: an SDXL refiner (its UNet takes the aesthetic score) "
                        "finishes images rather than starting from noise: give it as --refiner beside an SDXL base, "
                        "or with --init-image")
    towers = [getattr(config, name) for name in config.text_towers]
    if refiner_config is not None:
        towers += [getattr(refiner_config, name) for name in refiner_config.text_towers]
    if request.clip_skip:
        if not towers or any(not hasattr(t, "max_clip_skip") for t in towers):
            raise UserError(f"--clip-skip {request.clip_skip}: this model has no CLIP text tower to skip layers of")
        limit = min(t.max_clip_skip for t in towers)
        if request.clip_skip > limit:
            raise UserError(f"--clip-skip {request.clip_skip} is more than this model's text towers have blocks "
                            f"to skip (at most {limit})")
    given = [flag for field, flag in MICRO_FLAGS.items()
             if getattr(request.micro, field) != getattr(MicroConditioning, field)]
    n = config.num_time_ids
    if given and not n:
        raise UserError(f"{given[0]} applies to SDXL models (a UNet with text_time micro-conditioning); this model "
                        "takes none")
    refiner_only = ("--aesthetic-score", "--negative-aesthetic-score")
    wrong = [f for f in given if (f in refiner_only) != (n == 5) and "crops" not in f and "original" not in f
             and not (refiner_config is not None and f in refiner_only)]
    if wrong:
        which = "the refiner's aesthetic score" if n == 5 else "target sizes"
        raise UserError(f"{wrong[0]} does not apply to this model: its UNet takes {n} micro-conditioning numbers "
                        f"({which})")
    return request.micro


def _resolve_seed(request: SampleRequest) -> SampleRequest:
    """--seed -1: a seed drawn from the OS's randomness in [0, 2**32), printed on stderr."""
    if request.seed != RANDOM_SEED:
        return request
    seed = secrets.randbelow(SEED_RANGE)
    print(f"seed: {seed} (drawn at random)", file=sys.stderr)
    return dataclasses.replace(request, seed=seed)


def report_prompts(request: SampleRequest, reports: Sequence[Any]) -> None:
    """One warning line on stderr per problem of each prompt (`tokenizer.PromptReport`s of request.prompts,
    then the negative prompt): unknown words, truncation. Prompts are named by their 0-based index."""
    *prompts, negative = reports
    named = [(f"prompt {i}", report) for i, report in enumerate(prompts)] + [("--negative-prompt", negative)]
    for name, report in named:
        for line in report.problems(name):
            print(f"warning: {line}", file=sys.stderr)


def _finite_uint8(images: np.ndarray) -> list[np.ndarray | None]:
    """Float images (B, H, W, 3) in [-1, 1] -> uint8 images, None for each image holding NaN or inf."""
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    return [to_uint8(image) if ok else None for image, ok in zip(images, finite, strict=True)]


def _check_all_written(request: SampleRequest, images: Sequence[np.ndarray | None]) -> None:
    """A warning per non-finite image (its index, prompt index and prompt), then UserError if there was one."""
    skipped = [i for i, image in enumerate(images) if image is None]
    for i in skipped:
        p = i // request.n
        print(f"warning: image {i} (prompt {p} {short_repr(request.prompts[p])}) is not finite (NaN / inf); "
              f"not written", file=sys.stderr)
    if skipped:
        raise UserError(f"{len(skipped)} of {len(images)} image(s) came out NaN / inf and were not written "
                        f"(images {', '.join(map(str, skipped))}); the model's weights or the settings are at fault")


def sampler_options(request: SampleRequest, scheduler_config: dict[str, Any] | None) -> dict[str, Any]:
    """Sampler options: a diffusers model's scheduler_config.json decides timesteps, spacing, offset and the
    final step (`diffusers_pipeline.sampler_options`); otherwise DDIM and PLMS space their timesteps the
    diffusers "leading" way with offset 1 (the CompVis "uniform" timesteps whenever --steps divides the
    training timesteps, and exactly --steps of them otherwise). --timestep-spacing / --steps-offset override."""
    name = request.sampler
    if request.eta and name != "ddim":
        raise UserError(f"--eta applies to ddim only; --sampler {name} takes no eta")
    if scheduler_config is not None:
        from ldm_jax.convert.diffusers_pipeline import sampler_options as diffusers_options  # noqa: PLC0415

        opts = diffusers_options(scheduler_config, name)
        opts.pop("prediction_type", None)  # the model's own (make_model_sampler)
    elif name in ("ddim", "plms"):
        opts = dict(timestep_spacing="leading", steps_offset=1)
    else:
        opts = {}
    if request.timestep_spacing is not None:
        opts["timestep_spacing"] = request.timestep_spacing
        if request.timestep_spacing != "leading":
            opts.pop("steps_offset", None)
    if request.steps_offset is not None:
        opts["steps_offset"] = request.steps_offset
    if name == "ddim":
        opts["eta"] = request.eta
    return opts


def read_latents(path: str, images: int, config, height: int, width: int) -> np.ndarray:
    """--latents FILE.npy: (images, C, h, w) initial unit noise, diffusers' layout -> (images, h, w, C) float32."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"--latents {path}: cannot read a .npy array ({error})") from None
    f = config.downsample_factor
    expected = (images, config.latent_channels, height // f, width // f)
    if array.shape != expected:
        raise UserError(f"--latents {path} has shape {array.shape}; expected {expected} (images, channels, "
                        f"height/{f}, width/{f}) for {images} image(s) of {width}x{height}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise UserError(f"--latents {path}: expected finite floating-point values, got dtype {array.dtype}")
    return np.ascontiguousarray(np.transpose(array, (0, 2, 3, 1)), np.float32)


def _init_and_mask(request: SampleRequest) -> tuple[np.ndarray | None, np.ndarray | None]:
    init = read_image(request.init_image, mode="RGB", flag="--init-image") if request.init_image else None
    mask = read_image(request.mask, mode="L", flag="--mask") if request.mask else None
    if init is not None and mask is not None and init.shape[:2] != mask.shape[:2]:
        raise UserError(f"--mask {request.mask} is {mask.shape[1]}x{mask.shape[0]} but --init-image "
                        f"{request.init_image} is {init.shape[1]}x{init.shape[0]}; they must be the same size")
    return init, mask


def _size(request: SampleRequest, config, init: np.ndarray | None) -> tuple[int, int]:
    """(height, width) in pixels: the init image's, else --height/--width or the model's default; checked."""
    if init is not None:
        height, width = init.shape[:2]
        if (request.height or height) != height or (request.width or width) != width:
            raise UserError(f"--height/--width {request.height}x{request.width} differ from --init-image's "
                            f"{height}x{width}")
        check_size(config, height, width, f"--init-image {request.init_image} is {width}x{height} (width x height)")
    else:
        default = config.diffusion.image_size * config.downsample_factor
        height, width = request.height or default, request.width or default
        check_size(config, height, width, f"--height {height} --width {width}")
    return height, width


def check_size(config, height: int, width: int, what: str) -> None:
    """UserError, opening with `what`, unless the model samples height x width pixel images.

    A UNet with a learned position embedding of (h, w) latents takes exactly (h * f, w * f) pixels, f the
    autoencoder's factor (the embedded model: 32x32). Other models take heights and widths that are multiples of
    f (8 for Stable Diffusion, as diffusers), at most MAX_SIDE pixels a side: the UNet rounds odd halvings up and
    upsamples to its skips' sizes, as diffusers' UNet2DConditionModel.
    """
    f, table = config.downsample_factor, config.unet.position_embedding
    if table is not None:
        if (height, width) != (table[0] * f, table[1] * f):
            raise UserError(f"{what}, but this model samples only {table[1] * f}x{table[0] * f} images (its UNet's "
                            f"learned position embedding is {table[1]}x{table[0]} latents, x{f} the autoencoder's "
                            f"factor)")
        return
    if height % f or width % f or max(height, width) > MAX_SIDE:
        raise UserError(f"{what}, but this model takes heights and widths that are multiples of {f} (the "
                        f"autoencoder's factor), at most {MAX_SIDE}")


def _tile(array: np.ndarray, batch: int) -> np.ndarray:
    return np.broadcast_to(array[None], (batch, *array.shape)).copy()


# ---------------------------------------------------------------------------------------------- outputs


def write_outputs(request: SampleRequest, model_id: str, prompts: Sequence[str],
                  images: Sequence[np.ndarray | None], height: int, width: int) -> list[pathlib.Path]:
    """One PNG per image ({index:05d}.png) with its parameters as PNG text chunks, plus grid.png of them; prints
    where they went. A None image (not finite) is skipped: no file, no grid cell."""
    outdir = pathlib.Path(request.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        if image is None:
            continue
        info = PngImagePlugin.PngInfo()
        for key, value in _metadata(request, model_id, prompt, index, height, width).items():
            info.add_text(key, str(value))
        path = outdir / f"{index:05d}.png"
        Image.fromarray(image).save(path, pnginfo=info)
        paths.append(path)
    written = [image for image in images if image is not None]
    if not written:
        print(f"wrote no image to {outdir.resolve()}")
        return paths
    grid_path = outdir / GRID_FILE
    whole = len(written) == len(images)
    columns = request.n if whole and request.n > 1 and len(request.prompts) > 1 else None
    Image.fromarray(image_grid(np.stack(written), columns=columns, pad=2)).save(grid_path)
    paths.append(grid_path)
    print(f"wrote {len(written)} image(s) and grid.png to {outdir.resolve()}")
    return paths


def _metadata(request: SampleRequest, model_id: str, prompt: str, index: int, height: int,
              width: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "negative_prompt": request.negative_prompt or "",
        "seed": request.seed,
        "index": index,
        "sampler": request.sampler,
        "steps": request.steps,
        "guidance": request.guidance,
        "eta": request.eta,
        "size": f"{width}x{height}",
        "precision": request.precision,
        "param_dtype": request.param_dtype,
        "attention": request.attention or "xla",
        "latents": request.latents or "",
        "model": model_id,
        "init_image": request.init_image or "",
        "strength": request.strength if request.init_image else "",
        "mask": request.mask or "",
        "clip_skip": request.clip_skip,
        "distilled": request.distilled or "",
        "refiner": request.refiner or "",
        "denoising_end": request.denoising_end if request.refiner else "",
        **{field: getattr(request.micro, field) for field in MICRO_FLAGS if getattr(request.micro, field) is not None},
        "loras": "; ".join(f"{path}:{scale:g}" for path, scale in request.loras),
        "embeddings": "; ".join(path + (f" as {token}" if token else "") for path, token in request.embeddings),
        **_control_metadata(request),
    }


def _control_metadata(request: SampleRequest) -> dict[str, Any]:
    """The ControlNet chunks, one entry per net joined by "; " (empty strings without --controlnet)."""
    if not request.controlnets:
        return dict.fromkeys(("controlnets", "control_images", "control_start", "control_end", "control_resize",
                              "guess_mode"), "")
    starts, ends = control_fractions(request)
    return {
        "controlnets": "; ".join(f"{path}:{scale:g}" for path, scale in request.controlnets),
        "control_images": "; ".join(request.control_images),
        "control_start": "; ".join(f"{s:g}" for s in starts),
        "control_end": "; ".join(f"{e:g}" for e in ends),
        "control_resize": request.control_resize,
        "guess_mode": request.guess_mode,
    }


# ---------------------------------------------------------------------------------------- command line


def build_parser(prog: str = "sample.py") -> ArgumentParser:
    """The sampling flags (and the CompVis txt2img aliases) on an argparse parser."""
    p = ArgumentParser(prog=prog, description="Text-to-image, image-to-image and inpainting with a "
                                "latent diffusion model (the embedded captioned-shapes model by default).")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); warnings name prompts by "
                   "their 0-based index among the --prompt flags, then the --prompts-file lines")
    p.add_argument("--prompts-file", "--from-file", dest="prompts_file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (the unconditional branch); "
                   "without it SDXL base models use zero text conditioning there, as diffusers")
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)} (default ddim)")
    p.add_argument("--plms", action="store_true", help="CompVis alias of --sampler plms")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=None,
                   help=f"sampling steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", "--scale", dest="guidance", type=finite_float, default=None,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE}); <= 1 runs the conditional "
                   "prediction alone, as diffusers")
    p.add_argument("--eta", "--ddim_eta", dest="eta", type=finite_float, default=0.0,
                   help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**32); -1 draws one at random (printed and "
                   "recorded in the PNGs)")
    p.add_argument("--n", "--n_samples", dest="n", type=int, default=1, help="images per prompt")
    p.add_argument("--height", "--H", dest="height", type=int, help=f"image height in pixels (at most {MAX_SIDE}; "
                   "a model with a learned position embedding takes only its own size)")
    p.add_argument("--width", "--W", dest="width", type=int, help="image width in pixels (as --height)")
    p.add_argument("--init-image", help="img2img: the starting image")
    p.add_argument("--strength", type=finite_float, default=0.75, help="img2img: how much to change, in [0, 1]")
    p.add_argument("--mask", help="inpainting: white = repaint, black = keep (same size as --init-image)")
    p.add_argument("--latents", help="initial noise, a .npy of shape (images, channels, h, w) as diffusers' latents=")
    p.add_argument("--checkpoint", "--ckpt", dest="checkpoint", help="model: a model directory, a diffusers "
                   "folder or a CompVis .ckpt/.safetensors (default: the embedded model)")
    p.add_argument("--tokenizer", help="tokenizer directory for single-file checkpoints")
    p.add_argument("--config", help="config of a single-file checkpoint: a preset name, configs/*.py or a CompVis yaml")
    p.add_argument("--text-encoder-config", help="a transformers CLIP config.json (or its directory) for a yaml "
                   "whose text encoder is not a known version")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 compute")
    p.add_argument("--param-dtype", default="fp32", help="fp32 or bf16: the dtype the params are loaded and held in "
                   "(bf16 halves their memory; with --precision bf16 for bf16 compute)")
    p.add_argument("--attention", help=f"attention implementation: {', '.join(ATTENTIONS)} (default xla; "
                   "jax_nn is the fastest at Stable Diffusion sizes)")
    p.add_argument("--timestep-spacing", help=f"override the sampler's timestep spacing: {', '.join(TIMESTEP_SPACINGS)}")
    p.add_argument("--steps-offset", type=int, help="override the leading spacing's offset")
    p.add_argument("--batch-size", type=int, help="images generated at once (a multiple of the device count)")
    p.add_argument("--clip-skip", type=int, default=0, help="CLIP blocks to skip before the text towers' output "
                   "layer (diffusers' clip_skip)")
    p.add_argument("--refiner", help="an SDXL refiner (model directory, diffusers folder or single file) that "
                   "finishes the base's images: an ensemble of expert denoisers sharing one noise schedule")
    p.add_argument("--denoising-end", type=finite_float, default=0.8, help="with --refiner: the noise fraction "
                   "where the base stops and the refiner takes over (diffusers' denoising_end; default 0.8)")
    p.add_argument("--distilled", help=f"a few-step distilled model: {', '.join(DISTILLED)} (its sampler, "
                   "trailing spacing, steps and guidance 0, where not given)")
    micro = p.add_argument_group("SDXL micro-conditioning (pixels; default: the image size, crops 0 0)")
    for field, flag in MICRO_FLAGS.items():
        if "aesthetic" in field:
            default = getattr(MicroConditioning, field)
            micro.add_argument(flag, dest=field, type=finite_float, default=default,
                               help=f"the refiner's {field.replace('_', ' ')} (default {default})")
        else:
            names = ("TOP", "LEFT") if "crops" in field else ("H", "W")
            micro.add_argument(flag, dest=field, type=int, nargs=2, metavar=names, default=None)
    adapters = p.add_argument_group("adapters")
    adapters.add_argument("--lora", dest="loras", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                          help="a LoRA (diffusers/PEFT or kohya .safetensors) merged at SCALE (default 1; "
                          "repeatable: they stack)")
    adapters.add_argument("--embedding", dest="embedding_files", action="append", default=[], metavar="FILE",
                          help="a textual-inversion embedding (diffusers learned_embeds, A1111 .pt/.safetensors; "
                          "repeatable)")
    adapters.add_argument("--token", dest="tokens", action="append", default=[], metavar="NAME",
                          help="the prompt word of the --embedding given in the same position (default: the file's "
                          "own name)")
    control = p.add_argument_group("ControlNet")
    control.add_argument("--controlnet", dest="controlnets", action="append", type=lora_spec, default=[],
                         metavar="SRC[:SCALE]", help="a ControlNet (diffusers ControlNet folder or original "
                         "control_*.pth / .safetensors) at conditioning scale SCALE (default 1); repeatable: the "
                         "nets' residuals add up")
    control.add_argument("--control-image", dest="control_images", action="append", default=[], metavar="IMG",
                         help="the control image of the --controlnet in the same position (resized to the output)")
    control.add_argument("--control-start", dest="control_starts", action="append", type=finite_float, default=[],
                         metavar="F", help="the fraction of the steps where the nets start (diffusers' "
                         "control_guidance_start; once for every net or once per --controlnet; default 0)")
    control.add_argument("--control-end", dest="control_ends", action="append", type=finite_float, default=[],
                         metavar="F", help="the fraction of the steps where the nets stop (control_guidance_end; "
                         "default 1)")
    control.add_argument("--guess-mode", action="store_true", help="diffusers' guess_mode: the nets see the "
                         "conditional branch only, their residuals weighted 0.1 ... 1 from the first skip to the mid "
                         "block")
    control.add_argument("--control-resize", default="default", metavar="MODE", help="how control images are fitted "
                         "to the output (diffusers' resize_mode): default (stretch), crop (keep the aspect ratio, crop "
                         "around the centre), fill (keep it, fill the margins)")
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not read or write the persistent compilation cache (default: on, in $LDM_JAX_CACHE_DIR, "
                   "else $XDG_CACHE_HOME/ldm-jax/xla or ~/.cache/ldm-jax/xla; LDM_JAX_CACHE_DIR= turns it off too)")
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str = "sample.py") -> SampleRequest:
    """The sampling flags -> SampleRequest."""
    args = build_parser(prog).parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = pathlib.Path(args.prompts_file).read_text().splitlines()
        except OSError as error:
            raise UserError(f"--prompts-file {args.prompts_file}: {error.strerror}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if args.plms and args.sampler not in (None, "plms"):
        raise UserError(f"--plms and --sampler {args.sampler} disagree; give one")
    preset = DISTILLED.get(args.distilled, {})
    fields = {k: v for k, v in vars(args).items()
              if k not in ("prompt", "prompts_file", "guidance", "plms", "sampler", "steps", "timestep_spacing")}
    fields["sampler"] = "plms" if args.plms else (args.sampler or preset.get("sampler", "ddim"))
    fields["steps"] = args.steps if args.steps is not None else preset.get("steps", DEFAULT_STEPS)
    fields["guidance"] = args.guidance if args.guidance is not None else preset.get("guidance", DEFAULT_GUIDANCE)
    fields["timestep_spacing"] = args.timestep_spacing or preset.get("timestep_spacing")
    files, tokens = fields.pop("embedding_files"), fields.pop("tokens")
    if tokens and len(tokens) != len(files):
        raise UserError(f"--token was given {len(tokens)} time(s) for {len(files)} --embedding file(s); give one "
                        "--token per --embedding, in the same order, or none")
    fields["embeddings"] = tuple(zip(files, tokens or [None] * len(files), strict=True))
    for name in ("loras", "controlnets", "control_images", "control_starts", "control_ends"):
        fields[name] = tuple(fields[name])
    micro = {field: fields.pop(field) for field in MICRO_FLAGS}
    micro = {k: tuple(v) if isinstance(v, list) else v for k, v in micro.items() if v is not None}
    return SampleRequest(prompts=tuple(prompts), micro=MicroConditioning(**micro), **fields)


def main(argv: Sequence[str] | None = None, prog: str = "sample.py") -> int:
    """The sampling command line: 0 on success, 2 (with one line on stderr) on a user error. The pipelines'
    compile reports (logger "ldm_jax.pipeline") are progress lines on stderr."""
    try:
        with _progress_logging("ldm_jax.pipeline"):
            run(parse_args(argv, prog))
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


class _TqdmHandler(logging.Handler):
    """Log records as plain lines on stderr through `tqdm.write`, which keeps a progress bar whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a handler reports its own failure
            self.handleError(record)


@contextlib.contextmanager
def _progress_logging(name: str):
    """Within the block, logger `name`'s INFO records are progress lines on stderr (`_TqdmHandler`)."""
    logger, handler = logging.getLogger(name), _TqdmHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
