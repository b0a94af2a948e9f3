"""The persistent compilation cache of the commands (`ldm_jax.compile_cache`): where it lives, the switches that turn
it off, a process's own cache left alone, an unwritable directory, the compile reports, and two `ldm-jax sample`
processes of which the second reads the first one's program back."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import compile_cache, evaluate, sampling
from ldm_jax.training import main as train_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_compilation_cache_max_size")


class Stop(Exception):
    """Raised by a stand-in to end a command once the part under test has run."""


@pytest.fixture
def no_cache_configured():
    """The process as a fresh command sees it: no cache directory (the session's is put back afterwards, with
    JAX's thresholds; JAX's cache object, made at the session's first compile, is not touched)."""
    before = {name: getattr(jax.config, name) for name in SETTINGS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def test_default_directory_rule():
    home = pathlib.Path.home()
    assert compile_cache.default_directory({}) == home / ".cache" / "ldm-jax" / "xla"
    assert compile_cache.default_directory({"XDG_CACHE_HOME": "/xdg"}) == pathlib.Path("/xdg/ldm-jax/xla")
    for xdg in ("", "relative/dir"):  # the XDG spec: an empty or relative XDG_CACHE_HOME is ignored
        assert compile_cache.default_directory({"XDG_CACHE_HOME": xdg}) == home / ".cache" / "ldm-jax" / "xla"
    ours = {"LDM_JAX_CACHE_DIR": "/mine", "XDG_CACHE_HOME": "/xdg"}
    assert compile_cache.default_directory(ours) == pathlib.Path("/mine")
    assert compile_cache.default_directory({"LDM_JAX_CACHE_DIR": "~/c"}) == home / "c"
    assert compile_cache.default_directory({"LDM_JAX_CACHE_DIR": "", "XDG_CACHE_HOME": "/xdg"}) is None  # off


def test_the_test_session_never_uses_the_users_cache():
    """conftest: this process has the session's directory, subprocesses get LDM_JAX_CACHE_DIR."""
    real = compile_cache.default_directory({k: v for k, v in os.environ.items() if k != "LDM_JAX_CACHE_DIR"})
    assert compile_cache.configured_directory() is not None
    assert pathlib.Path(compile_cache.configured_directory()) != real
    assert compile_cache.default_directory() != real


def test_a_configured_directory_is_kept(tmp_path):
    """A process with a cache directory (here the test session's) keeps it and its thresholds."""
    before = {name: getattr(jax.config, name) for name in SETTINGS}
    assert compile_cache.enable(tmp_path / "other") == before["jax_compilation_cache_dir"]
    assert {name: getattr(jax.config, name) for name in SETTINGS} == before
    assert not (tmp_path / "other").exists()
    line = compile_cache.setup(False, switch="--no-compile-cache")
    assert line == (f"compilation cache: {before['jax_compilation_cache_dir']} (set by this process before the "
                    "command; --no-compile-cache leaves it on)")


def test_enable_sets_the_directory_and_thresholds(tmp_path, no_cache_configured):
    path = tmp_path / "a" / "cache"
    assert compile_cache.enable(path, environ={}) == str(path)
    assert path.is_dir() and list(path.iterdir()) == []  # the write probe is gone
    assert jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_SECS
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_SIZE_BYTES


def test_enable_follows_the_environment(tmp_path, no_cache_configured):
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    assert compile_cache.enable(environ={"LDM_JAX_CACHE_DIR": ""}) is None  # the empty variable: off
    assert jax.config.jax_compilation_cache_dir is None
    env = {"LDM_JAX_CACHE_DIR": str(tmp_path / "env"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "3"}
    assert compile_cache.enable(environ=env) == str(tmp_path / "env")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == threshold  # the user's JAX setting wins


def test_setup_lines(tmp_path, no_cache_configured, monkeypatch):
    assert compile_cache.setup(False, switch="--no-compile-cache") == "compilation cache: off (--no-compile-cache)"
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", "")
    assert compile_cache.setup(True, switch="x") == "compilation cache: off (LDM_JAX_CACHE_DIR is empty)"
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", str(tmp_path))
    assert compile_cache.setup(True, switch="x") == f"compilation cache: {tmp_path}"


def test_an_unwritable_directory_warns_once_and_runs_without(tmp_path, no_cache_configured, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way\n")
    assert compile_cache.enable(blocker / "cache", environ={}) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compilation cache ") and str(blocker) in err[0], err
    assert "compiling without the cache" in err[0]
    assert jax.config.jax_compilation_cache_dir is None
    with compile_cache.watch() as report:  # and JAX still compiles and runs
        assert float(jax.jit(lambda x: x * 3.0 + 0.25)(np.float32(2.0))) == 6.25
    assert report.programs >= 1 and report.hits == 0


def test_watch_reports_compiles_once():
    fn = jax.jit(lambda x: jax.numpy.sin(x) * 2.0 - 0.125)
    x = np.arange(7, dtype=np.float32)
    with compile_cache.watch() as outer:
        with compile_cache.watch() as first:
            fn(x).block_until_ready()
        with compile_cache.watch() as again:  # the same shapes: jit's own cache, nothing compiles
            fn(x).block_until_ready()
    assert first.programs >= 1 and first and not again and outer.programs == first.programs
    assert first.describe().startswith("compiled in ") and ", XLA " in first.describe()
    assert first.trace_seconds > 0 and first.lower_seconds > 0 and not again.trace_seconds
    hit = compile_cache.CompileReport(programs=1, hits=1, saved_seconds=4.0, seconds=1.5, trace_seconds=0.9,
                                      lower_seconds=0.25)
    assert hit.describe() == ("read from the compilation cache in 1.5 s (trace 0.9 s, lower 0.2 s; saved 4.0 s of XLA "
                              "compile)")


# ------------------------------------------------------------------------------------- the commands' switches


def _stop_at_setup(monkeypatch) -> list[tuple[bool, str]]:
    calls = []

    def setup(enabled=True, *, switch):
        calls.append((enabled, switch))
        raise Stop

    monkeypatch.setattr(compile_cache, "setup", setup)
    return calls


@pytest.mark.parametrize("flag, enabled", [([], True), (["--no-compile-cache"], False)])
def test_sample_switch(flag, enabled, tmp_path, monkeypatch):
    calls = _stop_at_setup(monkeypatch)
    request = sampling.parse_args(["--prompt", "a red circle", "--outdir", str(tmp_path), *flag])
    assert request.compile_cache is enabled
    with pytest.raises(Stop):  # run() sets the cache up first, before the model loads
        sampling.run(request)
    assert calls == [(enabled, "--no-compile-cache")]


@pytest.mark.parametrize("flag, enabled", [([], True), (["--no-compile-cache"], False)])
def test_evaluate_switch(flag, enabled, tmp_path, monkeypatch):
    calls = _stop_at_setup(monkeypatch)
    with pytest.raises(Stop):
        evaluate.main(["sensitivity", "--images", str(tmp_path), *flag])
    assert calls == [(enabled, "--no-compile-cache")]


@pytest.mark.parametrize("override, enabled", [([], True), (["--config.train.compile_cache=false"], False)])
@pytest.mark.parametrize("config", ["shapes_ldm.py", "shapes_autoencoder.py"])
def test_train_switch(config, override, enabled, tmp_path, monkeypatch):
    calls = _stop_at_setup(monkeypatch)
    monkeypatch.setattr(train_main.parallel, "initialize_distributed", lambda *args: False)
    argv = [f"--config={ROOT / 'configs' / config}", f"--workdir={tmp_path}", *override]
    with pytest.raises(Stop):
        train_main.main(argv)
    assert calls == [(enabled, "train.compile_cache=false")]


# ---------------------------------------------------------------------------------------------- end to end


def _sample(cache: pathlib.Path, outdir: pathlib.Path) -> str:
    env = {**os.environ, "LDM_JAX_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-m", "ldm_jax", "sample", "--prompt", "a red circle at the top left",
                             "--steps", "2", "--n", "1", "--outdir", str(outdir)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stderr


def _program_line(stderr: str) -> str:
    return next(part for line in stderr.splitlines() for part in line.split("\r")
                if part.strip().startswith("txt2img program: "))


def test_a_second_process_reads_the_first_ones_program(tmp_path):
    cache = tmp_path / "cache"
    first = _sample(cache, tmp_path / "first")
    assert f"compilation cache: {cache}" in first.splitlines()
    entries = [p.name for p in cache.iterdir() if p.name.endswith("-cache")]
    assert entries, sorted(p.name for p in cache.iterdir())
    second = _sample(cache, tmp_path / "second")
    lines = [_program_line(first), _program_line(second)]
    print("\n".join(lines))  # the two compile times (not asserted: shared machines)
    # the sampling and the decoding program: both compiled and written, then both read back
    assert lines[0].strip().startswith("txt2img program: compiled 2 programs in ") and "written to the compilation" \
        in lines[0], lines[0]
    assert lines[1].strip().startswith("txt2img program: read from the compilation cache (2 programs) in "), lines[1]
    image = [np.asarray(Image.open(tmp_path / run / "00000.png")) for run in ("first", "second")]
    np.testing.assert_array_equal(*image)  # the cached executable computes what the compiled one did
