"""bench/bench_sd_scale.py's pure parts: the table's arithmetic and text, the targets, the commands it times (ours
parsed by `ldm-jax sample`'s own parser) and the SD 1.5 architecture of its configs. The --tiny run itself (~75 s
on 2 cores) is not run here: `.venv/bin/python bench/bench_sd_scale.py --tiny`.

Run: .venv/bin/python -m pytest -q tests/test_bench_sd_scale.py
"""
import importlib
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("bench_sd_scale")


def _run(column, steps, wall, peak_gb=1.0, returncode=0):
    return dict(column=column, steps=steps, wall_s=wall, peak_rss_gib=peak_gb * 1e9 / 2**30, returncode=returncode)


def _issue_runs():
    """Issue 18's measurements (ours 106 / 142 s, PyTorch 54 / 113 s) as runs, plus a failed one that must not
    count."""
    return [_run("ours_first", 3, 106.0, 10.2), _run("ours_first", 8, 142.0, 10.3),
            _run("ours_second", 3, 60.0, 10.1), _run("ours_second", 8, 96.0, 10.1),
            _run("torch", 3, 54.0, 5.8), _run("torch", 8, 113.0, 6.3), _run("torch", 8, 1.0, 0.1, returncode=1)]


def test_summary_arithmetic(bench):
    s = bench.summarize(_issue_runs(), (3, 8))
    assert s["ours_first"]["step_s"] == pytest.approx((142 - 106) / 5)
    assert s["ours_first"]["fixed_s"] == pytest.approx(106 - 3 * 7.2)
    assert s["torch"]["step_s"] == pytest.approx(11.8)
    assert s["torch"]["fixed_s"] == pytest.approx(54 - 3 * 11.8)
    assert s["torch"]["whole"] == {3: 54.0, 8: 113.0} and s["torch"]["runs"] == 2
    assert s["ours_first"]["peak_gb"] == pytest.approx([10.2, 10.3])
    # other step counts, medians over rounds
    runs = [_run("ours_first", 2, t) for t in (10.0, 12.0, 11.0)] + [_run("ours_first", 6, 15.0)]
    s = bench.summarize(runs, (2, 6))
    assert s["ours_first"]["whole"][2] == 11.0 and s["ours_first"]["step_s"] == pytest.approx(1.0)
    assert s["ours_first"]["fixed_s"] == pytest.approx(9.0)
    assert math.isnan(s["torch"]["step_s"]) and math.isnan(s["torch"]["peak_gb"][0])


def test_table_as_the_issue_shows_it(bench):
    s = bench.summarize(_issue_runs(), (3, 8))
    rows = bench.table_rows(s, (3, 8))
    assert [r[0] for r in rows] == ["seconds per guided step (from 3- and 8-step runs)",
                                    "fixed cost per run (imports, load, compile, text encoder, VAE decode)",
                                    "whole run, 3 steps", "whole run, 8 steps", "peak resident memory"]
    assert rows[0][1:] == ["7.2", "7.2", "11.8"]
    assert rows[1][1:] == ["84.4 s", "38.4 s", "18.6 s"]
    assert rows[2][1:] == ["106 s", "60 s", "54 s"]
    assert rows[3][1:] == ["142 s", "96 s", "113 s"]
    assert rows[4][1:] == ["10.2-10.3 GB", "10.1 GB", "5.8-6.3 GB"]
    header = bench.table_header("fp32")
    assert header == ["params fp32", "ours, first run", "ours, second run", "diffusers PyTorch"]
    markdown = bench.common.markdown_table(header, rows).splitlines()
    assert markdown[0] == "| params fp32 | ours, first run | ours, second run | diffusers PyTorch |"
    assert markdown[1] == "|---|---|---|---|"
    assert markdown[-1] == "| peak resident memory | 10.2-10.3 GB | 10.1 GB | 5.8-6.3 GB |"
    plain = bench.common.format_table(header, rows).splitlines()
    assert len(plain) == 7 and plain[1].startswith("---") and "10.2-10.3 GB" in plain[-1]
    # a column without runs shows dashes
    empty = bench.table_rows(bench.summarize([r for r in _issue_runs() if r["column"] != "torch"]))
    assert [r[3] for r in empty] == ["-"] * 5


def test_targets(bench):
    rows = bench.target_rows(bench.summarize(_issue_runs(), (3, 8)), (3, 8))
    assert [r[0] for r in rows] == ["seconds per step, second run", "whole 8-step run, second run",
                                    "whole 8-step run, first run", "peak resident memory (max), first run"]
    assert rows[0][1:] == [f"{7.2 / 11.8:.2f}", "<= 0.65", "yes"]
    assert rows[1][1:] == [f"{96 / 113:.2f}", "<= 0.8", "no"]
    assert rows[2][1:] == [f"{142 / 113:.2f}", "<= 1.2", "no"]
    assert rows[3][1:] == [f"{10.3 / 6.3:.2f}", "<= 1.0", "no"]


def test_ours_command_is_ldm_jax_sample(bench, tmp_path):
    from ldm_jax.sampling import parse_args

    cmd = bench.ours_command(tmp_path / "sd15", steps=3, size=512, dtype="fp32", latents=tmp_path / "l.npy",
                             outdir=tmp_path / "out", extra=["--attention", "jax_nn"])
    assert "sample" in cmd
    request = parse_args(cmd[cmd.index("sample") + 1:])
    assert request.checkpoint == str(tmp_path / "sd15") and request.prompts == (bench.PROMPT,)
    assert (request.sampler, request.steps, request.guidance) == ("ddim", 3, 7.5)
    assert (request.height, request.width, request.n) == (512, 512, 1)
    assert request.latents == str(tmp_path / "l.npy") and request.outdir == str(tmp_path / "out")
    assert request.attention == "jax_nn"
    assert set(bench.OURS_DTYPE_FLAGS) == set(bench.DTYPES) == set(bench.TORCH_DTYPES)


def test_environment_and_torch_script(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv(bench.CACHE_ENV, "/elsewhere")
    env = bench.run_environment(tmp_path)
    assert env[bench.CACHE_ENV] == str(tmp_path) and "JAX_COMPILATION_CACHE_DIR" not in env
    assert bench.CACHE_ENV not in bench.run_environment(None) and env["HF_HUB_OFFLINE"] == "1"
    compile(bench.TORCH_SCRIPT, "torch_sample.py", "exec")
    cmd = bench.torch_command(tmp_path / "s.py", tmp_path / "f", steps=8, size=64, dtype="bf16",
                              latents=tmp_path / "l.npy", out=tmp_path / "o.png")
    assert cmd[2:] == [str(tmp_path / "f"), bench.PROMPT, "8", "64", "7.5", "bfloat16", str(tmp_path / "l.npy"),
                       str(tmp_path / "o.png")]


def test_compile_reports(bench, tmp_path):
    log = tmp_path / "run.log"
    log.write_text("compilation cache: /x\nsampling:   0%|   | 0/1 [00:00<?, ?batch/s]\r     txt2img program: "
                   "read from the compilation cache in 2.3 s (saved 5.0 s of XLA compile)\nwrote 1 image(s)\n")
    assert bench.compile_reports(log) == [
        "txt2img program: read from the compilation cache in 2.3 s (saved 5.0 s of XLA compile)"]
    assert bench.compile_reports(tmp_path / "missing.log") == []


def test_configs_are_sd15(bench):
    """The full-size configs build SD 1.5's modules (parameter counts of runwayml/stable-diffusion-v1-5), on the
    meta device (nothing allocated); --tiny changes only sizes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    c = bench.component_configs(tiny=False)
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in (
            ("unet", diffusers.UNet2DConditionModel(**c["unet"])),
            ("text_encoder", transformers.CLIPTextModel(transformers.CLIPTextConfig(**c["text_encoder"]))),
            ("vae", diffusers.AutoencoderKL(**c["vae"])))}
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    diffusers.DDIMScheduler(**c["scheduler"])
    tiny = bench.component_configs(tiny=True)
    assert set(tiny) == set(c) and bench.image_size(True) == 64 and bench.image_size(False) == 512
    assert c == bench.SD15 and tiny["unet"]["down_block_types"] == c["unet"]["down_block_types"]
