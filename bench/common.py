"""Shared helpers of the bench/ scripts: benchmark model configs, random models written as diffusers folders
(so every side loads the same weights), the inputs every side reads, timing, subprocess workers and tables.

Configs (`bench_config`):
- "tiny":  configs/unet_tiny.py's UNet (1.1M params) + the tiny CLIP of configs/text_tiny.py (77 tokens) + a
           tiny f=4 KL autoencoder without attention levels (diffusers Flax's VAE has none), 8x8x4 latents.
- "small": SD v1's architecture at a fraction of the width: UNet channels 64-128-256-256 (4 heads, context 256),
           a 4-layer 256-wide CLIP, a KL-f8 VAE with 64-128-256-256 channels and 1 resnet per level.
- "sd_v1": configs/sd_v1.py: the SD v1 UNet (860M), CLIP ViT-L/14 text encoder (123M), KL-f8 VAE (84M).
Latent size and batch are arguments. Weights are random (`random_params`: flax init, then the zero-initialised
output kernels get small random values so no branch is a no-op).

A model folder (`write_model_folder`) is a diffusers StableDiffusionPipeline folder (our exporter) plus
`bench_inputs.npz`: prompt and empty-prompt token ids (B, 77) and the initial noise (B, h, w, 4) NHWC, so that
ours, diffusers PyTorch and diffusers Flax (bench/reference_flax.py in .venv-ref) do the same work.

Workers print one line `BENCH_RESULT <json>`; `run_worker` runs one and parses it.

Full-size reference-library folders and whole processes (bench/bench_sdxl.py, bench/bench_sd_scale.py):
`write_random_diffusers_folder` (a random-weight SD or SDXL pipeline built by diffusers' and transformers' own
classes, saved as fp16 safetensors by its `save_pretrained`, with a small real CLIP BPE tokenizer), `read_info`,
`PeakMemory` (a process's own peak RSS per phase), `available_gib` and `measure_process` (a whole command's wall
time, peak RSS and CPU time, measured from outside by a small launcher).

The shapes-world demos (bench/adapt_shapes.py, bench/controlnet_shapes.py) share: `train_in_subprocess` (a training
run in its own process: wall time, CPU time and its own peak RSS), `trained_steps`, `sample_prompts` (the embedded
model's images as `ldm-jax sample` makes them, optionally steered by a ControlNet), `picture` and `markdown_table`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import pathlib
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.modules.setdefault("torchvision", None)  # diffusers must not import the broken torchvision wheel

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
REF_VENV_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
CONFIG_NAMES = ("tiny", "small", "sd_v1")
RESULT_TAG = "BENCH_RESULT "
INPUTS_FILE = "bench_inputs.npz"
# glibc malloc settings that keep freed memory mapped (ENVIRONMENT.md: every SD-scale step otherwise re-faults
# ~1.8 GB of fresh pages); `--malloc=tuned` gives them to every side alike.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**28),
                "MALLOC_ARENA_MAX": "1"}


# -------------------------------------------------------------------------------------------------- models


class UsageError(SystemExit):
    """Bad input to a bench script (a flag, a missing file, a workdir in the way): exit status 2, with its one-line
    message on stderr (printed here: a SystemExit with an int code prints nothing) and as str(error)."""

    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr, flush=True)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def bench_config(name: str, latent_size: int):
    """The `LDMConfig` of benchmark config `name` (see CONFIG_NAMES) at `latent_size` x `latent_size` latents.

    The attention implementation (and remat) are run-time options: pass `ldm.RunOptions(attention=...)` to
    the pipeline or `ldm` function that runs the model.
    """
    from ldm_jax import ldm
    from ldm_jax.config import load_config_file

    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown bench config {name!r}; expected one of {CONFIG_NAMES}")
    config = load_config_file(ROOT / "configs" / ("unet_tiny.py" if name == "tiny" else "sd_v1.py"))
    with config.unlocked():
        if name == "tiny":
            tiny_text = load_config_file(ROOT / "configs" / "text_tiny.py")
            config.cond_stage = tiny_text.cond_stage
            config.first_stage.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32)
        elif name == "small":
            config.unet.update(model_channels=64, num_heads=4, context_dim=256)
            config.cond_stage.update(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4)
            config.first_stage.update(ch=64, num_res_blocks=1)
        config.diffusion.image_size = latent_size
    cfg = ldm.ldm_config(config)
    return dataclasses.replace(cfg, first_stage=dataclasses.replace(
        cfg.first_stage, resolution=latent_size * cfg.downsample_factor))


def random_params(config, seed: int = 0) -> dict[str, Any]:
    """Random LDM params for `config` as numpy float32, drawn on the host from the shapes of `ldm.init_params`
    (no compiled init: the SD init program alone takes minutes to compile on 2 cores). Kernels and embeddings
    N(0, 1/fan_in), norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2): every block contributes (no zero
    output kernels) and activations keep unit scale."""
    import jax

    from ldm_jax import ldm

    shapes = jax.eval_shape(lambda key: ldm.init_params(config, key), jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name in ("kernel", "embedding") and len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1])) if name == "kernel" else shape[-1]
            return (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(leaf.dtype)
        base = 1.0 if name == "scale" else 0.0
        return (base + 0.02 * rng.standard_normal(shape, np.float32)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def write_tokenizer(folder: pathlib.Path) -> pathlib.Path:
    """A minimal CLIP tokenizer directory (a few lower-case letters; the benchmark feeds token ids directly)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {**{c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
             **{c + "</w>": 26 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")},
             "<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def write_model_folder(name: str, folder: str | os.PathLike, *, latent_size: int, batch: int, seed: int = 0):
    """Writes benchmark model `name` with random weights as a diffusers SD folder (DDIMScheduler config) plus
    `bench_inputs.npz` (token ids and initial noise for `batch` images). Returns (folder, LDMConfig)."""
    from ldm_jax.convert.diffusers_pipeline import save_diffusers_pipeline
    from ldm_jax.ldm import LoadedModel
    from ldm_jax.models.tokenizer import load_tokenizer

    folder = pathlib.Path(folder)
    config = bench_config(name, latent_size)
    tokenizer = load_tokenizer(write_tokenizer(folder / "_tokenizer_src"), "clip")
    model = LoadedModel(config=config, params=random_params(config, seed), tokenizer=tokenizer, model_id=name)
    save_diffusers_pipeline(model, folder, scheduler_class="DDIMScheduler")
    cond, uncond, noise = bench_inputs(config, batch, latent_size, seed)
    np.savez(folder / INPUTS_FILE, cond=cond, uncond=uncond, noise=noise)
    (folder / "bench.json").write_text(json.dumps(dict(config=name, latent_size=latent_size, batch=batch)))
    return folder, config


def bench_inputs(config, batch: int, latent_size: int, seed: int = 0):
    """(cond, uncond, noise): random prompt ids [BOS, 10 tokens, EOS, pad...] and empty-prompt ids, int32 (B, L),
    and N(0, 1) initial latents (B, h, w, C) float32 NHWC."""
    cs = config.cond_stage
    rng = np.random.default_rng(seed + 2)
    bos, eos, length = cs.eos_token_id - 1, cs.eos_token_id, cs.max_length
    cond = np.full((batch, length), cs.pad_token_id, np.int32)
    uncond = cond.copy()
    cond[:, 0] = uncond[:, 0] = bos
    cond[:, 1:11] = rng.integers(0, bos, (batch, 10))
    cond[:, 11] = uncond[:, 1] = eos
    noise = rng.standard_normal((batch, latent_size, latent_size, config.latent_channels)).astype(np.float32)
    return cond, uncond, noise


# -------------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of fn() (which must block until its result is ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternating(fns: Sequence[Callable[[], Any]], repeats: int, warmup: bool = True) -> list[list[float]]:
    """Wall seconds of each blocking fn() over `repeats` rounds that run them in turn (after a warm-up round
    when `warmup`): one list of times per fn, in order."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + int(warmup)):
        for fn, ts in zip(fns, times, strict=True):
            t = timed(fn)
            if round_ or not warmup:
                ts.append(t)
    return times


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling in this process (from `jax.monitoring` events), so
    compile time is measured directly instead of as first call - steady call (which drifts with the load)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.seconds += duration


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    """The machine's 1/5/15-minute load averages and core count, for the record of each table."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------- workers


def emit_result(result: dict[str, Any]) -> None:
    """Prints a worker's result line (parsed by `run_worker`), with the process's peak RSS in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(RESULT_TAG + json.dumps({**result, "peak_rss_gib": peak}), flush=True)


def run_worker(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
               python: pathlib.Path = VENV_PYTHON) -> dict[str, Any]:
    """Runs `python argv...` in a fresh process (cwd: the repo root) and returns its `BENCH_RESULT` dict.

    Raises RuntimeError with the worker's output tail when it fails or prints no result.
    """
    if not python.exists():
        raise FileNotFoundError(f"{python} does not exist" + (" (build it with bash bench/make_reference_venv.sh)"
                                                             if python == REF_VENV_PYTHON else ""))
    cmd = [str(python), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                          cwd=ROOT)
    out = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {' '.join(map(str, argv))} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: floats with 3 significant decimals, right-aligned columns after the first."""
    def cell(v):
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)

    cells = [list(header)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------- random-weight reference folders and whole processes


def component_configs(full: dict[str, dict], tiny_changes: dict[str, dict], tiny: bool) -> dict[str, dict]:
    """Deep copies of a pipeline's component constructor arguments (`full`: name -> kwargs), with `tiny_changes`
    applied per component when `tiny` (the --tiny smoke models)."""
    configs = copy.deepcopy(full)
    if tiny:
        for name, changes in tiny_changes.items():
            configs[name].update(copy.deepcopy(changes))
    return configs


def write_random_diffusers_folder(folder: str | os.PathLike, configs: dict[str, dict], *, scheduler_class: str,
                                  info_file: str, info: dict[str, Any] | None = None, seed: int = 0) -> dict:
    """Builds a random-weight Stable Diffusion (or, with a "text_encoder_2", SDXL) pipeline with diffusers' and
    transformers' own classes and saves it with the pipeline's `save_pretrained` as float16 safetensors.

    configs: constructor arguments of "unet" (UNet2DConditionModel), "text_encoder" (transformers CLIPTextConfig of a
    CLIPTextModel), optional "text_encoder_2" (of a CLIPTextModelWithProjection: an SDXL pipeline), "vae"
    (AutoencoderKL) and "scheduler" (diffusers' `scheduler_class`). Each module gets its class's default (random)
    init after torch.manual_seed(seed) and is cast to float16 at once. The tokenizers are the small real CLIP BPE of
    tests/tokenizer_fixtures.py (no download; the embedding tables keep their configured rows); SDXL's second one
    pads with "!" (id 0) as OpenCLIP's. An SD pipeline is saved without safety checker and feature extractor.
    Writes `info_file` beside the model: `info`'s entries, then param counts, seconds per phase, the tokenizer's
    vocabulary size and the bytes on disk; returns that dict."""
    import tempfile

    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_fixtures import write_clip_tokenizer

    folder = pathlib.Path(folder)
    sdxl = "text_encoder_2" in configs
    torch.manual_seed(seed)
    seconds, counts, parts = {}, {}, {}
    builders = {
        "unet": lambda: UNet2DConditionModel(**configs["unet"]),
        "text_encoder": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
        "text_encoder_2": lambda: transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**configs["text_encoder_2"])),
        "vae": lambda: AutoencoderKL(**configs["vae"]),
    }
    for name, build in builders.items():
        if name not in configs:
            continue
        start = time.perf_counter()
        module = build().eval()
        counts[name] = sum(p.numel() for p in module.parameters())
        parts[name] = module.to(torch.float16)
        seconds[f"init_{name}"] = took = time.perf_counter() - start
        print(f"  {name}: {counts[name]:,} params, built and cast to float16 in {took:.1f} s", flush=True)
    tokenizer_dir = write_clip_tokenizer(pathlib.Path(tempfile.mkdtemp(prefix="bench_tokenizer_")))
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, model_max_length=77)
    scheduler = getattr(diffusers, scheduler_class)(**configs["scheduler"])
    if sdxl:
        # OpenCLIP's tokenizer (SDXL's tokenizer_2) pads with "!" (id 0) instead of the end-of-text token.
        tok_2 = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True,
                                                           model_max_length=77, pad_token="!")
        pipe = StableDiffusionXLPipeline(tokenizer=tok, tokenizer_2=tok_2, scheduler=scheduler, **parts)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tok, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    start = time.perf_counter()
    # One weights file per component (the store reads unsharded folders; SDXL's fp16 UNet is 5.1 GB).
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="100GB")
    seconds["save"] = time.perf_counter() - start
    info = dict(info or {}, params=counts, total_params=sum(counts.values()), tokenizer_vocab=len(tok),
                seconds=seconds, bytes_on_disk=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
    (folder / info_file).write_text(json.dumps(info, indent=1))
    return info


def read_info(folder: pathlib.Path, info_file: str, write_flag: str = "--write-model") -> dict:
    """The `info_file` that `write_random_diffusers_folder` wrote in `folder`."""
    path = folder / info_file
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {info_file}: write the model with {write_flag} {folder}")
    return json.loads(path.read_text())


class PeakMemory:
    """Peak resident memory (VmHWM) of this process per phase; `mark(name)` records the peak since the last mark
    and resets it (Linux >= 4.0: writing 5 to /proc/self/clear_refs). Without the reset, each phase's value is the
    peak since the process started (`resettable` False)."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def current(field: str = "VmHWM") -> float:
        """`field` of /proc/self/status in GiB."""
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
        return float("nan")

    def mark(self, name: str) -> float:
        self.phases[name] = self.current()
        self._reset()
        return self.phases[name]


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB (inf where there is none)."""
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


# Starts the command (argv[2:]) and writes its ru_maxrss (KiB) and CPU seconds (user + system) to argv[1]. A child's
# ru_maxrss counts the RSS of the process it was forked from up to its exec (Linux records the old mm's high-water
# mark at exec): started from a bench's process (the base model loaded, its prompts sampled), every run would read
# at least that one's RSS. This launcher is a few MiB.
_LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
             "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime}'); "
             "sys.exit(os.waitstatus_to_exitcode(s))")


@dataclasses.dataclass(frozen=True)
class ProcessRun:
    """One command run by `measure_process`: exit code, wall seconds (launcher start to exit), the command's own
    peak RSS in GiB (ru_maxrss; nan when it did not run) and CPU seconds (user + system, all threads)."""
    returncode: int
    wall_s: float
    peak_rss_gib: float
    cpu_s: float


def measure_process(cmd: Sequence[str], log_path: pathlib.Path, *, env: dict[str, str] | None = None,
                    cwd: pathlib.Path = ROOT, timeout: float | None = None) -> ProcessRun:
    """Runs the command `cmd` (stdout and stderr to log_path) and measures it alone from outside (`os.wait4` in a
    small launcher process, `_LAUNCHER`). env: the whole environment of the command (default this process's).
    timeout: seconds, after which the command is killed (returncode -9). Never raises for the command's own
    failure: look at `returncode` (and the log)."""
    rss_path = log_path.with_suffix(".maxrss")
    rss_path.unlink(missing_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.perf_counter()
        # With a timeout, the launcher and the command get their own process group, killed together on expiry.
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(rss_path), *map(str, cmd)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=timeout is not None)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[measure_process: killed after {timeout} s]\n")
            code = -signal.SIGKILL
        wall = time.perf_counter() - start
    if not rss_path.is_file():  # the launcher itself failed (e.g. the command does not exist)
        return ProcessRun(code or 1, wall, float("nan"), float("nan"))
    peak, cpu = rss_path.read_text(encoding="utf-8").split()
    rss_path.unlink()
    return ProcessRun(code, wall, int(peak) / 2**20, float(cpu))  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------ training runs and the shapes-world demos
# (bench/adapt_shapes.py, bench/controlnet_shapes.py: the embedded model, trained through `ldm-jax train`)

def train_in_subprocess(argv: Sequence[str], log_path: pathlib.Path) -> tuple[float, float, float]:
    """Runs `python argv...` (cwd: the repo root, output to log_path); returns (wall seconds, peak RSS GiB, CPU
    seconds: user + system, all threads) of that process alone (`os.wait4` in a small launcher process,
    `_LAUNCHER`). Raises SystemExit with the log's tail when it fails."""
    run = measure_process([sys.executable, *argv], log_path)
    if run.returncode:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(argv)} failed (exit {run.returncode}); {log_path}:\n{tail}")
    return run.wall_s, run.peak_rss_gib, run.cpu_s


def last_logged(workdir: pathlib.Path, key: str, default: float | None = None) -> float:
    """The largest `key` of WORKDIR/metrics.jsonl (a run's logged values only grow: "step", "train_seconds");
    `default` when nothing is logged yet (KeyError without one)."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    values = [float(row[key]) for row in map(json.loads, filter(str.strip, lines)) if key in row]
    if not values and default is None:
        raise KeyError(f"{path}: no logged {key!r}")
    return max(values, default=default)


def trained_steps(workdir: pathlib.Path) -> int:
    """The last step logged in WORKDIR/metrics.jsonl."""
    return int(last_logged(workdir, "step"))


SHAPES_SAMPLER, SHAPES_STEPS, SHAPES_GUIDANCE, SHAPES_SEED = "ddim", 50, 7.5, 0  # ldm-jax sample's defaults


def sample_prompts(model, prompts: Sequence[str], *, batch: int = 64, controlnet: Any = None,
                   control_images: np.ndarray | None = None, control_scale: float = 1.0,
                   steps: int = SHAPES_STEPS) -> np.ndarray:
    """uint8 (N, R, R, 3) images of `prompts` as `ldm-jax sample --prompts-file` makes them (sampler, steps,
    guidance and seed its defaults, `SHAPES_*`, unless `steps` is given; image i from noise fold_in(seed, i)), in
    chunks of `batch` (the last one padded with its last prompt).

    controlnet: optional (ControlNetConfig, params) (a `store.LoadedControlNet`'s), steering every image with
    control_images[i], uint8 (N, R, R, 3), at `control_scale` (`pipeline.Control`)."""
    import jax

    from ldm_jax import pipeline

    if (controlnet is None) != (control_images is None):
        raise ValueError("sample_prompts: give controlnet and control_images together")
    if control_images is not None and len(control_images) != len(prompts):
        raise ValueError(f"sample_prompts: {len(prompts)} prompts but {len(control_images)} control images")
    sampler = pipeline.make_model_sampler(model.config, SHAPES_SAMPLER, steps)
    params = pipeline.place_params(model.params)
    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        pad = batch - len(chunk)
        cond, uncond = pipeline.encode_prompts(model, chunk + [chunk[-1]] * pad, warn=False)
        control = None
        if controlnet is not None:
            hints = control_images[start:start + batch].astype(np.float32) / 255.0  # (B, R, R, 3) in [0, 1]
            hints = np.concatenate([hints, np.repeat(hints[-1:], pad, axis=0)])
            control = pipeline.Control(nets=[tuple(controlnet)], images=[hints], scales=control_scale)
        out = pipeline.txt2img(model.config, params, sampler, cond, uncond, guidance_scale=SHAPES_GUIDANCE,
                               seed=SHAPES_SEED, first_index=start, options=model.options, control=control)
        images.append(pipeline.to_uint8(np.asarray(jax.device_get(out))[:len(chunk)]))
    return np.concatenate(images)


RENDER_SEED = 12345  # fresh renders of evaluation captions (the dataset's own draws use seeds [0, split, index])


def fresh_renders(captions: Sequence[str], seed: int = RENDER_SEED) -> np.ndarray:
    """Each caption rendered once more in the varied world (rng default_rng([seed, i])): uint8 (N, 32, 32, 3)."""
    from ldm_jax.data import shapes

    return np.stack([shapes.render(shapes.parse_caption(c), 32, variation=shapes.VARIED,
                                   rng=np.random.default_rng([seed, i])) for i, c in enumerate(captions)])


def diversity(images: np.ndarray, samples: int) -> dict[str, float]:
    """Mean pairwise distance between the images of each caption, (P * samples, R, R, 3) uint8 laid out caption by
    caption: {"pixel": mean |a - b| / 255 over pixels and pairs, "feature": mean Euclidean distance of the shapes
    classifier's features}, each averaged over the P captions."""
    from ldm_jax.metrics import shapes_features

    feats = shapes_features.features(images)
    feats = feats.reshape(-1, samples, feats.shape[-1])
    groups = images.reshape(-1, samples, *images.shape[1:]).astype(np.float32) / 255.0
    pairs = list(itertools.combinations(range(samples), 2))
    pixel = np.mean([np.abs(g[i] - g[j]).mean() for g in groups for i, j in pairs])
    feature = np.mean([np.linalg.norm(f[i] - f[j]) for f in feats for i, j in pairs])
    return {"pixel": float(pixel), "feature": float(feature)}


def picture(rows: Sequence[tuple[str, np.ndarray]], path: pathlib.Path, label_width: int = 420,
            scale: int = 4) -> None:
    """One row of images (N, R, R, 3) uint8 after its label, each image framed in grey and `scale` x enlarged,
    written as a PNG (every row the same number of images)."""
    from PIL import Image, ImageDraw, ImageFont

    from ldm_jax.images import image_grid

    framed = [np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=64) for _, images in rows]
    grid = image_grid(np.concatenate(framed), columns=len(framed[0]))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    sheet = Image.new("RGB", (label_width + grid.shape[1], grid.shape[0]))
    sheet.paste(Image.fromarray(grid), (label_width, 0))
    draw, height, font = ImageDraw.Draw(sheet), grid.shape[0] // len(rows), ImageFont.load_default(size=24)
    for i, (label, _) in enumerate(rows):
        draw.text((12, i * height + height // 2), label, fill=(255, 255, 255), font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table as markdown (for the README): ints with thousands separators, everything else as str()."""
    def cell(v):
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])
