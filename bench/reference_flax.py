"""The diffusers 0.39 Flax side of bench/bench_pipeline.py: a txt2img worker run in the reference venv.

    .venv-ref/bin/python bench/reference_flax.py --folder F --steps 50 --runs 2

Loads a benchmark folder written by `bench/common.py:write_model_folder` (a diffusers SD folder with random
weights + bench_inputs.npz) into FlaxCLIPTextModel (transformers 4.57.6), FlaxUNet2DConditionModel,
FlaxAutoencoderKL and FlaxDDIMScheduler, and times their own `FlaxStableDiffusionPipeline._generate` (text
encoder, `jax.lax.fori_loop` over the DDIM step with classifier-free guidance, VAE decode) under one `jax.jit`,
as their pipeline's jit path does. The PyTorch -> Flax weight conversion (diffusers'/transformers' own
`from_pt` code, op by op, minutes at SD size) runs once; its Flax weights are cached in F/flax_cache/.

Prints one line `BENCH_RESULT <json>`: load_s, first_s (compile + one run), run_s (later runs), peak_rss_gib;
compile_s (JAX trace + lower + compile of the first call); writes the images to F/out_flax.npy as NHWC float32
in [-1, 1]. Imports nothing from ldm_jax (another venv); bench/common.py only for its stdlib helpers.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  (stdlib + numpy at import: usable from this venv)


def _load_components(folder: pathlib.Path):
    """(text_encoder, unet, vae, scheduler, params) from the cache, converting from the torch weights once."""
    from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxUNet2DConditionModel
    from transformers import FlaxCLIPTextModel

    cache = folder / "flax_cache"
    if not (cache / "done").is_file():
        _convert(folder, cache)
    text_encoder = FlaxCLIPTextModel.from_pretrained(cache / "text_encoder", local_files_only=True)
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(cache / "unet", local_files_only=True)
    vae, vae_params = FlaxAutoencoderKL.from_pretrained(cache / "vae", local_files_only=True)
    scheduler, scheduler_state = FlaxDDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    params = {"text_encoder": text_encoder.params, "unet": unet_params, "vae": vae_params,
              "scheduler": scheduler_state}
    return text_encoder, unet, vae, scheduler, params


def _convert(folder: pathlib.Path, cache: pathlib.Path) -> None:
    """diffusers' own PyTorch -> Flax conversion (what `from_pretrained(from_pt=True)` runs), saved as Flax."""
    from diffusers import AutoencoderKL, FlaxAutoencoderKL, FlaxUNet2DConditionModel, UNet2DConditionModel
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    from transformers import FlaxCLIPTextModel

    start = time.perf_counter()
    for name, torch_cls, flax_cls in (("unet", UNet2DConditionModel, FlaxUNet2DConditionModel),
                                      ("vae", AutoencoderKL, FlaxAutoencoderKL)):
        torch_model = torch_cls.from_pretrained(folder / name, local_files_only=True)
        flax_model = flax_cls.from_config(flax_cls.load_config(folder / name))
        params = convert_pytorch_state_dict_to_flax(torch_model.state_dict(), flax_model)
        flax_model.save_pretrained(cache / name, params=params)
        del torch_model, params
    text = FlaxCLIPTextModel.from_pretrained(folder / "text_encoder", from_pt=True, local_files_only=True)
    text.save_pretrained(cache / "text_encoder")
    (cache / "done").write_text(f"converted in {time.perf_counter() - start:.1f} s\n")


def _unet_loop(text_encoder, unet, params, cond, uncond, latents, steps: int, guidance: float):
    """A jitted fori_loop of `steps` guided UNet calls, as bench_pipeline.py's --unet_loop for ours."""
    context = text_encoder(jnp.concatenate([uncond, cond]), params=params["text_encoder"])[0]

    @jax.jit
    def loop(p, x, context):
        def body(i, x):
            t = jnp.full((2 * x.shape[0],), 999 - 20 * i, jnp.int32)
            eps = unet.apply({"params": p}, jnp.concatenate([x, x]), t, encoder_hidden_states=context).sample
            eps_uncond, eps_cond = jnp.split(eps, 2)
            return x - 0.01 * (eps_uncond + guidance * (eps_cond - eps_uncond))
        return jax.lax.fori_loop(0, steps, body, x)

    return lambda: np.asarray(loop(params["unet"], latents, context)).transpose(0, 2, 3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=2, help="timed runs after the first (compiling) one")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--unet_loop", action="store_true", help="time a fori_loop of guided UNet calls only")
    args = parser.parse_args()

    import diffusers
    from diffusers import FlaxStableDiffusionPipeline
    from transformers import CLIPTokenizer

    diffusers.utils.logging.set_verbosity_error()  # one "Flax classes are deprecated" line per module otherwise

    clock = common.CompileClock()
    start = time.perf_counter()
    text_encoder, unet, vae, scheduler, params = _load_components(args.folder)
    # Unused (token ids are given); the vocab.json/merges.txt source, as transformers 5 saved tokenizer.json only.
    tokenizer = CLIPTokenizer.from_pretrained(args.folder / "_tokenizer_src", local_files_only=True)
    pipe = FlaxStableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       dtype=jnp.float32)
    params = jax.device_put(params)
    inputs = np.load(args.folder / "bench_inputs.npz")
    cond, uncond = jnp.asarray(inputs["cond"]), jnp.asarray(inputs["uncond"])
    latents = jnp.asarray(inputs["noise"].transpose(0, 3, 1, 2))  # NHWC -> their NCHW
    height, width = (s * pipe.vae_scale_factor for s in latents.shape[2:])
    load_s = time.perf_counter() - start

    generate = jax.jit(pipe._generate, static_argnums=(3, 4, 5))  # steps, height, width

    def run():
        return np.asarray(generate(cond, params, jax.random.key(0), args.steps, height, width, args.guidance,
                                   latents, uncond))

    if args.unet_loop:
        run = _unet_loop(text_encoder, unet, params, cond, uncond, latents, args.steps, args.guidance)

    compiled_before = clock.seconds
    start = time.perf_counter()
    images = run()
    first_s = time.perf_counter() - start
    compile_s = clock.seconds - compiled_before
    run_s = []
    for _ in range(args.runs):
        start = time.perf_counter()
        images = run()
        run_s.append(time.perf_counter() - start)
    if not args.unet_loop:
        images = images * 2.0 - 1.0  # their [0, 1] -> [-1, 1]
    np.save(args.folder / "out_flax.npy", images.astype(np.float32))
    common.emit_result(dict(side="flax", load_s=load_s, first_s=first_s, run_s=run_s, compile_s=compile_s))


if __name__ == "__main__":
    main()
