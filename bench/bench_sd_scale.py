"""Stable Diffusion 1.5 at full size, a user's whole run: `ldm-jax sample` (first and second run with the compilation
cache) against a diffusers PyTorch script on the same folder (issue 18, item 4).

The model is SD 1.5's architecture (UNet 859,520,964 params, CLIP ViT-L/14 text tower, SD's KL-f8 VAE with
scaling_factor 0.18215) with random weights, built by diffusers' and transformers' own classes from the literal
configs below (`SD15`, those of runwayml/stable-diffusion-v1-5 with SD 1.5's scheduler settings on a
DDIMScheduler) and saved by `StableDiffusionPipeline.save_pretrained` as float16 safetensors (2.1 GB,
`common.write_random_diffusers_folder`; the tokenizer is the small real CLIP BPE of tests/tokenizer_fixtures.py, the
embedding table keeps CLIP's 49,408 rows). `--tiny` applies `TINY_CHANGES` (a few MB, 64x64 images): the CPU smoke
test.

What is timed is a whole process as a user sees it, one txt2img at 512x512 (the model's size), CFG 7.5 (the UNet sees
batch 2), batch 1, the folder's DDIM scheduler, the same prompt and initial latents (`--latents` / `latents=`) on
both sides:
- ours: the real `ldm-jax sample` command (imports, load, compile, text encoder, steps, VAE decode, PNG write);
  "first run" with LDM_JAX_CACHE_DIR set to a fresh empty directory (the persistent compilation cache), "second
  run" the same command again on that directory;
- diffusers PyTorch: `TORCH_SCRIPT` (imports, `from_pretrained`, `pipe(...)`, PNG save), torch's default threads.
Each run is its own process, started by a small launcher that reads the process's own peak RSS (`os.wait4`
ru_maxrss: `common.measure_process`). Per step count (3 and 8 by default), in this order: ours first run, PyTorch,
ours second run; `--rounds` repeats the whole sequence (medians of the wall times). From the two step counts a < b:
s/step = (t_b - t_a) / (b - a) and fixed cost = t_a - a * s/step (imports, load, compile, text encoder, VAE decode,
PNG). The folder's files are read once before the first run, so every run finds them in the page cache.

Params: fp32, and with `--dtypes fp32,bf16` also bf16 (PyTorch: torch_dtype bfloat16; ours: the flags in
`OURS_DTYPE_FLAGS`, the one place that names them).

    .venv/bin/python bench/bench_sd_scale.py --tiny                             # smoke test, ~2 min
    .venv/bin/python bench/bench_sd_scale.py --write-model /tmp/sd15            # full size: 2.1 GB of fp16 files
    .venv/bin/python bench/bench_sd_scale.py --folder /tmp/sd15                 # the table (run alone!)
    .venv/bin/python bench/bench_sd_scale.py --folder /tmp/sd15 --dtypes fp32,bf16 --ours-args "--attention jax_nn"

Prints the table as issue 18 shows it (plain and markdown) and the issue's targets; results go to a JSON file
(`--out`, default runs/bench_sd_scale_<time>.json, rewritten after every process). A run that fails is reported
(its log's tail) and the rest go on.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common

PROMPT = "a photo of a cat"  # words of tests/tokenizer_fixtures.py's corpus: no unknown-word warning
GUIDANCE = 7.5
STEPS = (3, 8)
SEED = 0
INFO_FILE = "bench_sd_scale.json"  # written beside the model: tiny or not, image size, param counts
DTYPES = ("fp32", "bf16")
COLUMNS = ("ours_first", "ours_second", "torch")  # in the table's order; runs go first, torch, second
TITLES = {"ours_first": "ours, first run", "ours_second": "ours, second run", "torch": "diffusers PyTorch"}
GB = 1e9

# `ldm-jax sample`'s flags that hold the params in each dtype: the one place to change when the flag is wired.
OURS_DTYPE_FLAGS: dict[str, tuple[str, ...]] = {"fp32": (), "bf16": ("--param-dtype", "bf16", "--precision", "bf16")}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
CACHE_ENV = "LDM_JAX_CACHE_DIR"  # ldm-jax's persistent compilation cache directory

# ------------------------------------------------------------------------------------------------ configs

# runwayml/stable-diffusion-v1-5's component configs (the constructor arguments that define the architecture or
# differ from the classes' defaults); its PNDMScheduler's settings on a DDIMScheduler.
SD15 = {
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0, act_fn="silu", downsample_padding=1, mid_block_scale_factor=1),
    "text_encoder": dict(  # CLIP ViT-L/14's text tower (transformers CLIPTextModel)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "vae": dict(  # SD's KL-f8 autoencoder
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
        act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    "scheduler": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading"),
}
# --tiny: the same configs with these entries replaced (64 px images -> 8x8 latents).
TINY_CHANGES = {
    "unet": dict(sample_size=8, layers_per_block=1, block_out_channels=[32, 32, 64, 64], attention_head_dim=2,
                 cross_attention_dim=32),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32),
    "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64),
}


def component_configs(tiny: bool) -> dict[str, dict]:
    """The diffusers / transformers constructor arguments of every component (deep copies)."""
    return common.component_configs(SD15, TINY_CHANGES, tiny)


def image_size(tiny: bool) -> int:
    return component_configs(tiny)["vae"]["sample_size"]


def write_model(folder: str | os.PathLike, *, tiny: bool, seed: int = SEED) -> dict:
    """The random-weight SD 1.5-shaped folder (fp16 safetensors, DDIMScheduler) and its INFO_FILE."""
    return common.write_random_diffusers_folder(
        folder, component_configs(tiny), scheduler_class="DDIMScheduler", info_file=INFO_FILE,
        info=dict(tiny=tiny, size=image_size(tiny)), seed=seed)


# ---------------------------------------------------------------------------------------------- the commands

# The PyTorch side: what a diffusers user runs. argv: folder, prompt, steps, size, guidance, torch dtype, latents .npy
# (1, 4, h, w), output PNG.
TORCH_SCRIPT = '''\
"""A diffusers PyTorch txt2img run, timed whole by bench/bench_sd_scale.py."""
import sys

sys.modules.setdefault("torchvision", None)  # this venv's torchvision wheel does not import beside torch 2.13 CPU
import numpy as np
import torch
from diffusers import StableDiffusionPipeline

folder, prompt, steps, size, guidance, dtype, latents, out = sys.argv[1:9]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype), local_files_only=True)
latents = torch.from_numpy(np.load(latents)).to(pipe.unet.dtype)
image = pipe(prompt, height=int(size), width=int(size), num_inference_steps=int(steps),
             guidance_scale=float(guidance), latents=latents).images[0]
image.save(out)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {type(pipe.scheduler).__name__}: wrote {out}")
'''


def ldm_jax_executable() -> list[str]:
    """The `ldm-jax` console script beside this interpreter (what a user of the venv runs)."""
    script = pathlib.Path(sys.executable).parent / "ldm-jax"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ldm_jax"]


def ours_command(folder: pathlib.Path, *, steps: int, size: int, dtype: str, latents: pathlib.Path,
                 outdir: pathlib.Path, guidance: float = GUIDANCE, seed: int = SEED,
                 extra: Sequence[str] = ()) -> list[str]:
    """`ldm-jax sample` for one image of PROMPT from `latents`, the params in `dtype` (OURS_DTYPE_FLAGS)."""
    return [*ldm_jax_executable(), "sample", "--checkpoint", str(folder), "--prompt", PROMPT, "--sampler", "ddim",
            "--steps", str(steps), "--guidance", str(guidance), "--height", str(size), "--width", str(size),
            "--seed", str(seed), "--latents", str(latents), "--outdir", str(outdir), *OURS_DTYPE_FLAGS[dtype],
            *extra]


def torch_command(script: pathlib.Path, folder: pathlib.Path, *, steps: int, size: int, dtype: str,
                  latents: pathlib.Path, out: pathlib.Path, guidance: float = GUIDANCE) -> list[str]:
    return [sys.executable, str(script), str(folder), PROMPT, str(steps), str(size), str(guidance),
            TORCH_DTYPES[dtype], str(latents), str(out)]


def run_environment(cache_dir: pathlib.Path | None) -> dict[str, str]:
    """This process's environment without compilation-cache settings, offline; with `cache_dir`, ldm-jax's cache
    there."""
    env = {k: v for k, v in os.environ.items() if k not in (CACHE_ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if cache_dir is not None:
        env[CACHE_ENV] = str(cache_dir)
    return env


def directory_size(path: pathlib.Path) -> tuple[int, int]:
    """(files, bytes) under path (0, 0 where it does not exist)."""
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------------- the table

ROW_TITLES = ("seconds per guided step (from {a}- and {b}-step runs)",
              "fixed cost per run (imports, load, compile, text encoder, VAE decode)",
              "whole run, {a} steps", "whole run, {b} steps", "peak resident memory")


def summarize(runs: Sequence[dict], steps: tuple[int, int] = STEPS) -> dict[str, dict]:
    """Per column (COLUMNS): median wall seconds per step count ("whole": {a: s, b: s}), s/step =
    (t_b - t_a) / (b - a), fixed = t_a - a * s/step, and the peak RSS range over its runs in GB ("peak_gb": [min,
    max]). `runs`: dicts with column, steps, wall_s, peak_rss_gib, returncode (failed runs are left out; nan where
    none is left)."""
    a, b = steps
    out = {}
    for column in COLUMNS:
        ok = [r for r in runs if r["column"] == column and r["returncode"] == 0]
        whole = {n: common.median([r["wall_s"] for r in ok if r["steps"] == n]) for n in (a, b)}
        step = (whole[b] - whole[a]) / (b - a)
        peaks = [r["peak_rss_gib"] * 2**30 / GB for r in ok]
        out[column] = dict(whole=whole, step_s=step, fixed_s=whole[a] - a * step,
                           peak_gb=[min(peaks), max(peaks)] if peaks else [float("nan")] * 2,
                           runs=len(ok))
    return out


def _seconds(v: float, unit: str = " s") -> str:
    if v != v:
        return "-"
    return (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}") + unit


def _memory(lo: float, hi: float) -> str:
    if lo != lo:
        return "-"
    return f"{lo:.1f} GB" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f} GB"


def table_rows(summary: dict[str, dict], steps: tuple[int, int] = STEPS) -> list[list[str]]:
    """The issue's rows (ROW_TITLES), one cell per COLUMNS entry."""
    a, b = steps
    cells = [
        [_seconds(summary[c]["step_s"], "") for c in COLUMNS],
        [_seconds(summary[c]["fixed_s"]) for c in COLUMNS],
        [_seconds(summary[c]["whole"][a]) for c in COLUMNS],
        [_seconds(summary[c]["whole"][b]) for c in COLUMNS],
        [_memory(*summary[c]["peak_gb"]) for c in COLUMNS],
    ]
    return [[title.format(a=a, b=b), *row] for title, row in zip(ROW_TITLES, cells, strict=True)]


def table_header(dtype: str) -> list[str]:
    return [f"params {dtype}", *(TITLES[c] for c in COLUMNS)]


# Issue 18, item 5: ours / PyTorch limits (the step rate from the second run: both of ours do the same steps).
TARGETS = (("seconds per step, second run", "ours_second", "step_s", 0.65),
           ("whole {b}-step run, second run", "ours_second", "whole_b", 0.8),
           ("whole {b}-step run, first run", "ours_first", "whole_b", 1.2),
           ("peak resident memory (max), first run", "ours_first", "peak", 1.0))


def target_rows(summary: dict[str, dict], steps: tuple[int, int] = STEPS) -> list[list[str]]:
    """[what, ours / PyTorch, limit, met] per TARGETS entry (the memory target is issue 18's for fp32 params)."""
    def value(column, key):
        s = summary[column]
        return {"step_s": s["step_s"], "whole_b": s["whole"][steps[1]], "peak": s["peak_gb"][1]}[key]

    rows = []
    for title, column, key, limit in TARGETS:
        ratio = value(column, key) / value("torch", key)
        met = "-" if ratio != ratio else ("yes" if ratio <= limit else "no")
        rows.append([title.format(b=steps[1]), "-" if ratio != ratio else f"{ratio:.2f}", f"<= {limit}", met])
    return rows


def png_difference(a: pathlib.Path, b: pathlib.Path) -> int | None:
    """Largest |difference| of two PNGs' uint8 pixels (None when either is missing)."""
    from PIL import Image

    if not (a.is_file() and b.is_file()):
        return None
    return int(np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max())


# --------------------------------------------------------------------------------------------------- driver


def compile_reports(log: pathlib.Path) -> list[str]:
    """The lines where `ldm-jax sample` reports a program's compile or compilation-cache read ("txt2img program:
    compiled in 15.6 s (XLA 13.3 s), written to the compilation cache"), from its log (tqdm's carriage returns
    split)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    lines = [part.strip() for line in text.splitlines() for part in line.split("\r")]
    return [line[line.index("]") + 1:].strip() if line.startswith("sampling") and "]" in line else line
            for line in lines if " program: " in line]


def _or_dash(v) -> str:
    return "-" if v is None else str(v)


def _tail(path: pathlib.Path, lines: int = 8) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines() if path.is_file() else []
    return "\n    ".join(text[-lines:])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-model", type=pathlib.Path, metavar="DIR",
                        help="write the random-weight SD 1.5-shaped model (fp16 safetensors) to DIR and exit "
                        "(unless --folder is given too)")
    parser.add_argument("--folder", type=pathlib.Path, help="a folder written by --write-model")
    parser.add_argument("--tiny", action="store_true", help="the tiny SD-shaped model (written to a temp dir "
                        "unless --folder / --write-model say where)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="the two step counts a,b (a < b)")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole alternating sequence runs")
    parser.add_argument("--dtypes", default="fp32", help=f"comma-separated, from {DTYPES}")
    parser.add_argument("--size", type=int, default=0, help="image side (default: the model's, 512 / tiny 64)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--ours-args", default="", help="more `ldm-jax sample` flags, one shell-quoted string")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="logs, images and compilation caches (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per process")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results JSON (default runs/bench_sd_scale_*.json)")
    args = parser.parse_args(argv)

    steps = tuple(int(s) for s in args.steps.split(","))
    if len(steps) != 2 or not 0 < steps[0] < steps[1]:
        parser.error(f"--steps takes two step counts a,b with 0 < a < b, not {args.steps!r}")
    dtypes = args.dtypes.split(",")
    if set(dtypes) - set(DTYPES):
        parser.error(f"unknown dtypes {sorted(set(dtypes) - set(DTYPES))}; expected some of {DTYPES}")
    if args.write_model:
        print(f"writing the random-weight SD 1.5-shaped model{' (tiny)' if args.tiny else ''} to {args.write_model}"
              " ...", flush=True)
        info = write_model(args.write_model, tiny=args.tiny, seed=args.seed)
        print(f"{info['total_params']:,} params, {info['bytes_on_disk'] / 1e9:.2f} GB on disk "
              f"(tokenizer vocabulary {info['tokenizer_vocab']}); {json.dumps(info['seconds'])}", flush=True)
        if not args.folder:
            return
    if args.folder is None:
        if not args.tiny:
            parser.error("give --folder (written by --write-model DIR) or --tiny")
        args.folder = pathlib.Path(tempfile.gettempdir()) / "ldm_jax_bench_sd_scale" / "tiny"
        if not (args.folder / INFO_FILE).is_file():
            print(f"writing the tiny model to {args.folder} ...", flush=True)
            write_model(args.folder, tiny=True, seed=args.seed)
    folder = args.folder.resolve()
    info = common.read_info(folder, INFO_FILE)
    size = args.size or info["size"]
    work = (args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="bench_sd_scale_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    script = work / "torch_sample.py"
    script.write_text(TORCH_SCRIPT)
    latents = work / "latents.npy"  # diffusers' layout (1, C, h, w)
    np.save(latents, np.random.default_rng(args.seed).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32))
    extra = shlex.split(args.ours_args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or common.ROOT / "runs" / f"bench_sd_scale_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(folder=str(folder), info=info, size=size, steps=list(steps), rounds=args.rounds, dtypes=dtypes,
                  guidance=args.guidance, seed=args.seed, ours_args=extra, ours_dtype_flags=OURS_DTYPE_FLAGS,
                  workdir=str(work), started=stamp, load_average_start=common.load_average(),
                  available_gib_start=common.available_gib(), runs=[], image_diffs=[], summary={})

    def save():
        out.write_text(json.dumps(record, indent=1))

    for f in folder.rglob("*"):  # every run finds the files in the page cache
        if f.is_file():
            f.read_bytes()
    name = "tiny SD-shaped" if info["tiny"] else "SD 1.5-shaped"
    print(f"{name} folder {folder} ({info['total_params'] / 1e9:.3g}B params: {info['params']}) at {size}x{size}, "
          f"DDIM {steps[0]} and {steps[1]} steps, CFG {args.guidance}, batch 1; {args.rounds} round(s); "
          f"{common.load_average()}, {common.available_gib():.1f} GiB available at start; logs in {work}",
          flush=True)
    ours_cmd = ours_command(folder, steps=steps[0], size=size, dtype=dtypes[0], latents=latents, outdir=work / "x",
                            guidance=args.guidance, seed=args.seed, extra=extra)
    print("ours: " + shlex.join(ours_cmd))
    for dtype in dtypes:
        for round_ in range(args.rounds):
            for n in steps:
                cache = work / f"cache_{dtype}_{n}_r{round_}"
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
                pngs = {}
                for column in ("ours_first", "torch", "ours_second"):
                    tag = f"{dtype}_{n}steps_r{round_}_{column}"
                    if column == "torch":
                        pngs[column] = work / f"{tag}.png"
                        cmd = torch_command(script, folder, steps=n, size=size, dtype=dtype, latents=latents,
                                            out=pngs[column], guidance=args.guidance)
                        env = run_environment(None)
                    else:
                        pngs[column] = work / tag / "00000.png"
                        cmd = ours_command(folder, steps=n, size=size, dtype=dtype, latents=latents,
                                           outdir=work / tag, guidance=args.guidance, seed=args.seed, extra=extra)
                        env = run_environment(cache)
                    log = work / f"{tag}.log"
                    run = common.measure_process(cmd, log, env=env, timeout=args.timeout)
                    entry = dict(dtype=dtype, steps=n, round=round_, column=column, returncode=run.returncode,
                                 wall_s=run.wall_s, peak_rss_gib=run.peak_rss_gib, cpu_s=run.cpu_s, log=str(log))
                    if column != "torch":
                        entry["cache_files"], entry["cache_bytes"] = directory_size(cache)
                        entry["compile_reports"] = compile_reports(log)
                    record["runs"].append(entry)
                    save()
                    cached = (f", cache {entry['cache_files']} files {entry['cache_bytes'] / 2**20:.1f} MiB"
                              if column != "torch" else "")
                    if run.returncode:
                        print(f"  {dtype} {n} steps {TITLES[column]}: FAILED (exit {run.returncode}; {log}):\n    "
                              + _tail(log), flush=True)
                    else:
                        print(f"  {dtype} {n} steps {TITLES[column]}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s "
                              f"CPU, peak RSS {run.peak_rss_gib:.2f} GiB{cached}", flush=True)
                        for line in entry.get("compile_reports", []):
                            print(f"    {line}", flush=True)
                diffs = {c: png_difference(pngs[c], pngs["torch"]) for c in ("ours_first", "ours_second")}
                record["image_diffs"].append(dict(dtype=dtype, steps=n, round=round_, **diffs))
                shutil.rmtree(cache, ignore_errors=True)
        summary = summarize([r for r in record["runs"] if r["dtype"] == dtype], steps)
        record["summary"][dtype] = summary
        save()
    record["load_average_end"] = common.load_average()
    save()

    print(f"\n{common.load_average()} at the end; results in {out}")
    print(f"s/step = (t{steps[1]} - t{steps[0]}) / {steps[1] - steps[0]}; fixed = t{steps[0]} - {steps[0]} * s/step; "
          f"medians of {args.rounds} round(s); peak RSS of each process alone, GB = 1e9 bytes")
    for dtype in dtypes:
        summary = record["summary"][dtype]
        print()
        print(common.format_table(table_header(dtype), table_rows(summary, steps)))
        print()
        print(common.markdown_table(table_header(dtype), table_rows(summary, steps)))
        print()
        print(common.format_table(["issue 18 target (ours / PyTorch)", "measured", "limit", "met"],
                                  target_rows(summary, steps)))
        diffs = [d for d in record["image_diffs"] if d["dtype"] == dtype]
        print("max |ours - PyTorch| of the PNGs (uint8): " + ", ".join(
            f"{d['steps']} steps {_or_dash(d['ours_first'])} / {_or_dash(d['ours_second'])}" for d in diffs)
              + " (first / second run)")
    caches = [r["cache_files"] for r in record["runs"] if r["column"] != "torch" and r["returncode"] == 0]
    if caches and not any(caches):
        print(f"\nNOTE: no run of ours wrote anything to {CACHE_ENV}: this ldm-jax has no persistent compilation "
              "cache (or compiles nothing it keeps), so the second run recompiles everything.")


if __name__ == "__main__":
    main()
