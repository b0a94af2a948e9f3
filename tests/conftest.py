"""Test set-up shared by every test.

- Tests run on the CPU with float32 and the fewest XLA optimisations (compile time dominates tiny models); compiled
  programs go into a persistent compilation cache for the session (`session_compilation_cache`). The commands that
  tests start as subprocesses use their own cache by default (`ldm_jax.compile_cache`): LDM_JAX_CACHE_DIR points
  them at a directory of the session (`subprocess_compilation_cache`), never the user's ~/.cache.
- `torchvision` is hidden: the lpips reference package pulls PyPI's torchvision, a CUDA build that cannot
  import beside the CPU torch 2.13 wheel, and transformers/diffusers would try to import it. With
  `sys.modules["torchvision"] = None` they see it as absent. The LPIPS parity test lends lpips a small
  stand-in VGG16 (tests/reference_vgg.py) for the one import that needs it.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.modules.setdefault("torchvision", None)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_default_matmul_precision", "highest")

TINY_SD_SIZE = 16


def assert_same_sd_weights(ours, reference) -> None:
    """Two diffusers SD pipelines hold the same UNet, VAE and text-encoder keys with bitwise equal weights."""
    import torch

    for name in ("unet", "vae", "text_encoder"):
        ours_sd, ref_sd = getattr(ours, name).state_dict(), getattr(reference, name).state_dict()
        assert ours_sd.keys() == ref_sd.keys(), name
        for key, value in ref_sd.items():
            assert torch.equal(ours_sd[key], value), f"{name}.{key}"


def _tiny_sd_components(tmp_path_factory, in_channels=4):
    """The parts of a tiny random diffusers Stable Diffusion pipeline (16x16 images, 8x8x4 latents)."""
    import diffusers
    import torch
    import transformers

    from tokenizer_fixtures import write_clip_tokenizer

    torch.manual_seed(0)
    tok_dir = write_clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True, model_max_length=77)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=TINY_SD_SIZE)
    with torch.no_grad():  # posterior std ~ exp(-15): diffusers' sampled encodings equal the mode we use
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30.0
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for model in (text_encoder, unet, vae):
        model.eval()
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture
def abstract_init_only(monkeypatch):
    """`abstract_init_only(module)`: the training module's `init_state` then fails unless abstract=True, so a
    resumed run that builds a fresh (compiled, computed) init state instead of only the restore target fails."""

    def patch(module):
        real = module.init_state

        def init_state(*args, abstract=False, **kwargs):
            assert abstract, "a resumed run computed a fresh init state"
            return real(*args, abstract=True, **kwargs)

        monkeypatch.setattr(module, "init_state", init_state)

    return patch


def _shared_directory(tmp_path_factory, name: str) -> str:
    """A directory of this test run that every pytest-xdist worker shares (the workers' temporary roots are
    siblings under the run's root), so a program one worker compiled is read back by the other."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache for the whole run, in a fresh directory shared by the xdist workers: a
    program that a new `jax.jit` compiles again (a train step re-made by a resumed run or another stage of the
    same shapes, a pipeline of the same model in another module) is read back instead of compiled. Programs that
    compile in under a second are not written (JAX's default). A size limit turns on JAX's file lock, which keeps
    two workers from reading an entry while it is written. JAX sets its cache up once per process, at the first
    compile after a directory is given, so this is the session's one directory."""
    jax.config.update("jax_compilation_cache_dir", _shared_directory(tmp_path_factory, "xla_cache"))
    jax.config.update("jax_compilation_cache_max_size", 64 * 2**30)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    yield


@pytest.fixture(scope="session", autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
    """LDM_JAX_CACHE_DIR for the whole session: the `ldm-jax` / sample.py / train.py processes that tests start
    inherit it and keep their compiled programs in a fresh directory of this run (`ldm_jax.compile_cache`
    would otherwise use ~/.cache/ldm-jax/xla). Commands run in this process keep the session's cache above: a
    process that has a cache directory already keeps it."""
    name = "LDM_JAX_CACHE_DIR"
    before = os.environ.get(name)
    os.environ[name] = _shared_directory(tmp_path_factory, "xla_cache_subprocesses")
    yield
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before


@pytest.fixture(scope="module")
def compilation_cache(session_compilation_cache):
    """Every program of one test module goes into the session's compilation cache, however quick to compile:
    modules that repeat many programs (resumed runs, repeated stages) opt in with
    `pytestmark = pytest.mark.usefixtures("compilation_cache")`."""
    names = ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def sd(tmp_path_factory):
    """(pipeline, folder): a tiny random diffusers StableDiffusionPipeline and the folder it saved."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline(**_tiny_sd_components(tmp_path_factory))
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


@pytest.fixture(scope="session")
def sd_inpaint(tmp_path_factory):
    """(pipeline, folder): the 9-channel inpainting variant."""
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline(**_tiny_sd_components(tmp_path_factory, in_channels=9))
    folder = tmp_path_factory.mktemp("sd_inpaint") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder
