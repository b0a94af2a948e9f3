"""What `sample.py` does: resolve a model, validate the request, generate on every local device, write PNGs.

`main(argv)` is the command line; `run(request)` is the library call tests make. User errors (a missing
file, a bad flag value) raise `UserError`, which the command line prints as one line and exits with 2.

Models (`--checkpoint`):
- omitted: the embedded captioned-shapes model shipped in `ldm_jax/assets/shapes_model`;
- a model directory written by training (`config.json` + `params.safetensors` + `tokenizer/`);
- a diffusers Stable Diffusion folder (`model_index.json`, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- a converted-params cache directory (`ldm_jax.convert.cache`);
- a CompVis single file (`.ckpt`, `.safetensors`): its config is `--config` (a configs/*.py file or a CompVis
  yaml), else `config.yaml` beside it (the LDM zoo layout), else inferred from the weights (SD 1.x, SD 1.x
  inpainting, SD 2.x); its tokenizer is `--tokenizer` (a local tokenizer directory).

Each image i of the run (prompt p, copy k: i = p * n + k) uses the key fold_in(key(seed), i), so an image
depends on (seed, its index, its prompt and the settings), not on how many devices share the batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLERS = ("ddim", "plms", "dpm++", "euler", "euler-a", "ddpm")
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
EMBEDDED_MODEL = PACKAGE_DIR / "assets" / "shapes_model"
REPO_CONFIGS = PACKAGE_DIR.parent / "configs"


GRID_FILE = "grid.png"  # the contact sheet written beside the images (evaluate skips it)


class UserError(Exception):
    """A problem with what the user asked for (a flag value, a path); reported as one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One sample.py run. Sizes are in pixels; None means the model's default."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
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
    outdir: str = "outputs"
    batch_size: int | None = None


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
    if not 0.0 <= request.strength <= 1.0:
        raise UserError(f"--strength must be in [0, 1], got {request.strength}")
    if request.eta < 0:
        raise UserError(f"--eta must be >= 0, got {request.eta}")
    if request.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {request.precision!r}")
    if request.mask is not None and request.init_image is None:
        raise UserError("--mask needs --init-image (the image to inpaint)")
    for flag, value in (("--height", request.height), ("--width", request.width), ("--batch-size", request.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, path in (("--init-image", request.init_image), ("--mask", request.mask)):
        if path is not None and not pathlib.Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    _check_writable(pathlib.Path(request.outdir))


def _check_writable(outdir: pathlib.Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--outdir {outdir}: cannot write there ({error.strerror})") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise UserError(f"--outdir {outdir}: cannot write there (no write permission)")


# ------------------------------------------------------------------------------------------------ models


def load_model(checkpoint: str | None, *, tokenizer: str | None = None, config: str | None = None):
    """Resolves `--checkpoint` (see the module docstring) to an `ldm.LoadedModel`.

    Problems with the files (missing, corrupt, the wrong model, a bad tokenizer directory) become UserError.
    """
    if checkpoint is not None and not pathlib.Path(checkpoint).exists():
        raise UserError(f"--checkpoint {checkpoint}: no such file or directory")
    try:
        return _load_model(checkpoint, tokenizer=tokenizer, config=config)
    except (FileNotFoundError, ValueError) as error:  # CheckpointError and ConversionError are ValueErrors
        raise UserError(f"--checkpoint {checkpoint or EMBEDDED_MODEL}: {error}") from None


def _load_model(checkpoint: str | None, *, tokenizer: str | None, config: str | None):
    from ldm_jax import model_dir

    if checkpoint is None:
        if not (EMBEDDED_MODEL / model_dir.CONFIG_FILE).is_file():
            raise UserError(f"the embedded model is missing from {EMBEDDED_MODEL}; pass --checkpoint")
        return model_dir.load_model(EMBEDDED_MODEL)
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            from ldm_jax.convert.diffusers_pipeline import load_diffusers_pipeline

            return load_diffusers_pipeline(path)
        if (path / model_dir.CONFIG_FILE).is_file() and (path / model_dir.PARAMS_FILE).is_file():
            return model_dir.load_model(path)
        from ldm_jax.convert import cache

        if cache.is_cache_dir(path):
            return cache.load_cached_model(path, tokenizer=tokenizer)
        raise UserError(f"--checkpoint {path}: a directory, but not a model directory (config.json + "
                        f"params.safetensors), a diffusers folder (model_index.json) or a converted-params cache")
    if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth", ".bin"):
        return _load_single_file(path, tokenizer=tokenizer, config=config)
    raise UserError(f"--checkpoint {path}: unknown kind of file (expected .ckpt or .safetensors, or a directory)")


def _load_single_file(path: pathlib.Path, *, tokenizer: str | None, config: str | None):
    from ldm_jax.convert import compvis
    from ldm_jax.convert.checkpoint_io import load_state_dict

    state_dict = load_state_dict(path)
    if config is not None:
        cfg, where = _read_config(pathlib.Path(config)), config
    elif (path.parent / "config.yaml").is_file():
        cfg, where = _read_config(path.parent / "config.yaml"), str(path.parent / "config.yaml")
    else:
        name = compvis.infer_stable_diffusion_config(state_dict)
        cfg, where = _read_config(REPO_CONFIGS / f"{name}.py"), f"configs/{name}.py (inferred from the weights)"
    print(f"config: {where}", file=sys.stderr)
    cfg = compvis.as_ldm_config(cfg)
    if cfg.tokenizer_kind is not None and tokenizer is None:
        raise UserError(f"--checkpoint {path} is a single file: give --tokenizer DIR, a local "
                        f"{cfg.tokenizer_kind} tokenizer directory (e.g. a Hugging Face cache snapshot of "
                        f"openai/clip-vit-large-patch14 for SD 1.x)")
    return compvis.loaded_model_from_state_dict(state_dict, cfg, tokenizer=tokenizer, source=str(path))


def _read_config(path: pathlib.Path):
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    if path.suffix in (".yaml", ".yml"):
        from ldm_jax.convert.ldm_yaml import load_ldm_yaml

        return load_ldm_yaml(path)
    from ldm_jax.config import load_config_file

    return load_config_file(path)


# ------------------------------------------------------------------------------------------- generation


def read_image(path: str, *, mode: str) -> np.ndarray:
    """An image file -> float32 (H, W, C) in [-1, 1] (mode "RGB") or a (H, W, 1) mask in [0, 1] (mode "L")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode), np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{path}: cannot read the image ({error})") from None
    if mode == "L":
        return array[..., None]
    return array * 2.0 - 1.0


def run(request: SampleRequest) -> list[pathlib.Path]:
    """Generates len(prompts) * n images and writes them (and a grid) to `request.outdir`.

    Returns the written image paths (the grid last).
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from ldm_jax import parallel, pipeline

    validate(request)
    model = load_model(request.checkpoint, tokenizer=request.tokenizer, config=request.config)
    config = model.config
    init, mask = _init_and_mask(request)
    sampler_opts = sampler_options(request.sampler, request.eta)
    try:
        sampler = pipeline.make_model_sampler(config, request.sampler, request.steps, **sampler_opts)
    except ValueError as error:
        raise UserError(str(error)) from None
    prompts = [p for p in request.prompts for _ in range(request.n)]
    mesh = parallel.make_mesh()
    devices = mesh.devices.size
    batch = request.batch_size or devices * max(1, min(8, math.ceil(len(prompts) / devices)))
    batch = math.ceil(batch / devices) * devices
    dtype = jnp.bfloat16 if request.precision == "bf16" else jnp.float32
    height, width = _size(request, config, init)
    images = []
    print(f"model {model.model_id}: {len(prompts)} image(s), {request.sampler} {request.steps} steps, "
          f"guidance {request.guidance}, {height}x{width}, {devices} device(s)", file=sys.stderr)
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", unit="batch", file=sys.stderr):
        chunk = prompts[start:start + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))  # every device gets an equal share
        cond, uncond = pipeline.encode_prompts(model, padded, [request.negative_prompt] * batch)
        common = dict(guidance_scale=request.guidance, seed=request.seed, first_index=start, mesh=mesh, dtype=dtype)
        if init is None:
            out = pipeline.txt2img(config, model.params, sampler, cond, uncond, height=height, width=width, **common)
        elif mask is None:
            out = pipeline.img2img(config, model.params, sampler, cond, uncond, _tile(init, batch),
                                   strength=request.strength, **common)
        else:
            out = pipeline.inpaint(config, model.params, sampler, cond, uncond, _tile(init, batch),
                                   _tile(mask, batch), strength=request.strength if request.strength < 1 else 1.0,
                                   **common)
        images.extend(pipeline.to_uint8(jax.device_get(out))[: len(chunk)])
    return write_outputs(request, model.model_id, prompts, images, height, width)


def sampler_options(name: str, eta: float) -> dict[str, Any]:
    """Sampler options of the command line. DDIM and PLMS space their timesteps the diffusers "leading" way
    with offset 1: the CompVis "uniform" timesteps whenever --steps divides the training timesteps, and exactly
    --steps of them otherwise (CompVis would run more, or step past the last timestep)."""
    if eta and name != "ddim":
        raise UserError(f"--eta applies to ddim only; --sampler {name} takes no eta")
    if name in ("ddim", "plms"):
        return dict(timestep_spacing="leading", steps_offset=1, **({"eta": eta} if name == "ddim" else {}))
    return {}


def _init_and_mask(request: SampleRequest) -> tuple[np.ndarray | None, np.ndarray | None]:
    init = read_image(request.init_image, mode="RGB") if request.init_image else None
    mask = read_image(request.mask, mode="L") if request.mask else None
    if init is not None and mask is not None and init.shape[:2] != mask.shape[:2]:
        raise UserError(f"--mask {request.mask} is {mask.shape[1]}x{mask.shape[0]} but --init-image "
                        f"{request.init_image} is {init.shape[1]}x{init.shape[0]}; they must be the same size")
    return init, mask


def _size(request: SampleRequest, config, init: np.ndarray | None) -> tuple[int, int]:
    factor = config.downsample_factor
    if init is not None:
        height, width = init.shape[:2]
        if (request.height or height) != height or (request.width or width) != width:
            raise UserError(f"--height/--width {request.height}x{request.width} differ from --init-image's "
                            f"{height}x{width}")
    else:
        default = config.diffusion.image_size * factor
        height, width = request.height or default, request.width or default
    for flag, value in (("--height", height), ("--width", width)):
        if value % factor:
            raise UserError(f"{flag} {value} is not a multiple of the autoencoder's factor {factor}")
    return height, width


def _tile(array: np.ndarray, batch: int) -> np.ndarray:
    return np.broadcast_to(array[None], (batch, *array.shape)).copy()


# ---------------------------------------------------------------------------------------------- outputs


def write_outputs(request: SampleRequest, model_id: str, prompts: Sequence[str], images: Sequence[np.ndarray],
                  height: int, width: int) -> list[pathlib.Path]:
    """One PNG per image with its parameters as PNG text chunks, plus grid.png; prints where they went."""
    from PIL import Image, PngImagePlugin

    from ldm_jax.images import image_grid

    outdir = pathlib.Path(request.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (prompt, image) in enumerate(zip(prompts, images)):
        info = PngImagePlugin.PngInfo()
        for key, value in _metadata(request, model_id, prompt, index, height, width).items():
            info.add_text(key, str(value))
        path = outdir / f"{index:05d}.png"
        Image.fromarray(image).save(path, pnginfo=info)
        paths.append(path)
    grid_path = outdir / GRID_FILE
    columns = request.n if request.n > 1 and len(request.prompts) > 1 else None
    Image.fromarray(image_grid(np.stack(images), columns=columns, pad=2)).save(grid_path)
    paths.append(grid_path)
    print(f"wrote {len(images)} image(s) and grid.png to {outdir.resolve()}")
    return paths


def _metadata(request: SampleRequest, model_id: str, prompt: str, index: int, height: int,
              width: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "index": index,
        "sampler": request.sampler,
        "steps": request.steps,
        "guidance": request.guidance,
        "eta": request.eta,
        "size": f"{width}x{height}",
        "precision": request.precision,
        "model": model_id,
        "init_image": request.init_image or "",
        "strength": request.strength if request.init_image else "",
        "mask": request.mask or "",
    }


# ---------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> SampleRequest:
    """sample.py's flags -> SampleRequest."""
    p = argparse.ArgumentParser(prog="sample.py", description="Text-to-image, image-to-image and inpainting "
                                "with a latent diffusion model (the embedded captioned-shapes model by default).")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional branch)")
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                   "(default 7.5, for Stable Diffusion and the embedded model alike)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--init-image", help="img2img: the starting image")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change, in [0, 1]")
    p.add_argument("--mask", help="inpainting: white = repaint, black = keep (same size as --init-image)")
    p.add_argument("--checkpoint", help="model: a CompVis .ckpt/.safetensors, a diffusers folder, a model or "
                   "cache directory (default: the embedded model)")
    p.add_argument("--tokenizer", help="tokenizer directory for single-file checkpoints")
    p.add_argument("--config", help="config for a single-file checkpoint (configs/*.py or a CompVis yaml)")
    p.add_argument("--precision", default="fp32", help="fp32 or bf16 compute")
    p.add_argument("--batch-size", type=int, help="images generated at once (a multiple of the device count)")
    p.add_argument("--outdir", default="outputs")
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = pathlib.Path(args.prompts_file).read_text().splitlines()
        except OSError as error:
            raise UserError(f"--prompts-file {args.prompts_file}: {error.strerror}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    fields = {k: v for k, v in vars(args).items() if k not in ("prompt", "prompts_file", "guidance")}
    if args.guidance is not None:
        fields["guidance"] = args.guidance
    return SampleRequest(prompts=tuple(prompts), **fields)


def main(argv: Sequence[str] | None = None) -> int:
    """The sample.py command line: 0 on success, 2 (with one line on stderr) on a user error."""
    try:
        run(parse_args(argv))
    except UserError as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 2
    return 0
