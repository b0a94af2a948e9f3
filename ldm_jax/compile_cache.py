"""The persistent XLA compilation cache of the commands that compile (`ldm-jax sample`, `ldm-jax train`, the
`ldm-jax evaluate` commands that run a model), and the compile times they report.

JAX's own persistent compilation cache (`jax_compilation_cache_dir`): a program compiled once is written to a
directory and read back by the next process that compiles the same program (same model shapes, image size, batch,
sampler and step count, device kind and count, JAX version), so the second `ldm-jax sample` of a model skips the
XLA compile (its Python tracing and lowering still run). Where it lives (`default_directory`):

    $LDM_JAX_CACHE_DIR                     when set and not empty
    $XDG_CACHE_HOME/ldm-jax/xla            else, when XDG_CACHE_HOME is an absolute path
    ~/.cache/ldm-jax/xla                   else

The one rule for turning it off: `ldm-jax sample --no-compile-cache` (the same flag for `ldm-jax evaluate`'s
model commands), `--config.train.compile_cache=false` for training, or LDM_JAX_CACHE_DIR set to the empty string
for every command at once. A process that has a cache directory already (JAX_COMPILATION_CACHE_DIR, or
`jax.config.update("jax_compilation_cache_dir", ...)` before the command runs, as the test session does) keeps
its own directory and thresholds. A directory that cannot be created or written costs one warning line on stderr;
the command runs without the cache.

What is written (`enable`): programs whose XLA compile took at least MIN_COMPILE_TIME_SECS (JAX's
`jax_persistent_cache_min_compile_time_secs`, default 1 s; 0.5 s here, so that a GPU's faster compile of a
mid-sized program is kept too; a sampling pipeline compiles for seconds on the CPU, the ~10 ms helper programs
of loading are not worth an entry), of any size (`jax_persistent_cache_min_entry_size_bytes` stays at its
default 0, no minimum). The directory is bounded to MAX_SIZE_BYTES (JAX evicts the least recently used entries;
this needs the `filelock` package, and without it the directory is unbounded). A JAX_PERSISTENT_CACHE_* /
JAX_COMPILATION_CACHE_MAX_SIZE environment variable the user set wins over these values.

`watch()` collects what JAX compiled during a block (through `jax.monitoring` events: trace, lowering and XLA compile
durations, persistent cache hits and writes); `CompileReport.describe` says it in one line, "compiled in 7.4 s (trace
1.9 s, lower 0.4 s, XLA 5.1 s), written to the compilation cache" or "read from the compilation cache in 2.3 s (trace
1.9 s, lower 0.4 s; saved 5.0 s of XLA compile)".
The sampling pipelines report each program they compile this way (`ldm_jax.pipeline`, logger "ldm_jax.pipeline").
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import jax

from ldm_jax.cli import writable_dir

ENV = "LDM_JAX_CACHE_DIR"
MIN_COMPILE_TIME_SECS = 0.5
MAX_SIZE_BYTES = 4 * 2**30

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # XLA compile (or cache read) of one program
_TRACE = "/jax/core/compile/jaxpr_trace_duration"  # Python -> jaxpr
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # jaxpr -> StableHLO
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_WRITE = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written
_TIME_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def default_directory(environ: Mapping[str, str] | None = None) -> pathlib.Path | None:
    """The cache directory of the rule in the module doc; None when LDM_JAX_CACHE_DIR is set but empty (off)."""
    environ = os.environ if environ is None else environ
    if ENV in environ:
        value = environ[ENV]
        return pathlib.Path(value).expanduser() if value else None
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path("~/.cache").expanduser()
    return base / "ldm-jax" / "xla"


def configured_directory() -> str | None:
    """The cache directory this process's JAX is set to use (None: none)."""
    return jax.config.jax_compilation_cache_dir or None


def enable(directory: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on in `directory` (None: `default_directory(environ)`), once, at
    a command's start, before anything compiles. Returns the directory in use, or None when the cache is off.

    A directory the process has already (`configured_directory`) is kept, with its thresholds, and returned. The
    directory is created if needed; one that cannot be created or written prints one warning line on stderr and
    leaves the cache off (None).
    """
    existing = configured_directory()
    if existing is not None:
        return existing
    environ = os.environ if environ is None else environ
    path = pathlib.Path(directory).expanduser() if directory is not None else default_directory(environ)
    if path is None:
        return None
    try:
        path = writable_dir(path.absolute(), "compilation cache")
    except ValueError as error:
        print(f"warning: {error}; compiling without the cache", file=sys.stderr)
        return None
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in environ and _has_filelock():
        jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


def setup(enabled: bool = True, *, switch: str) -> str:
    """What a command calls once at its start, before anything compiles: `enable()` unless `enabled` is False
    (the command's switch, named by `switch`: "--no-compile-cache", "train.compile_cache=false"). Returns the
    progress line: "compilation cache: DIR" or "compilation cache: off (why)". A directory the process has
    already stays in use even when `enabled` is False (it is the process's, not the command's); the line says so.
    """
    if enabled:
        directory = enable()
        if directory is not None:
            return f"compilation cache: {directory}"
        why = f"{ENV} is empty" if os.environ.get(ENV) == "" else "its directory cannot be written"
    else:
        directory = configured_directory()
        if directory is not None:
            return f"compilation cache: {directory} (set by this process before the command; {switch} leaves it on)"
        why = switch
    return f"compilation cache: off ({why})"


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401, PLC0415 (JAX's LRU eviction locks the directory with it)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ compile reports


@dataclasses.dataclass(eq=False)  # watch() finds its report by identity
class CompileReport:
    """What JAX compiled during a `watch()` block: programs (XLA compiles or persistent cache reads), their XLA
    time in seconds (a cache hit's is the read), the time spent tracing (Python -> jaxpr) and lowering (-> StableHLO)
    them, cache hits, entries written, XLA time the hits saved, and the block's wall time (tracing, lowering and
    compiling; the block's own work too)."""

    programs: int = 0
    xla_seconds: float = 0.0
    trace_seconds: float = 0.0
    lower_seconds: float = 0.0
    hits: int = 0
    written: int = 0
    saved_seconds: float = 0.0
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.programs > 0

    def describe(self) -> str:
        """One line: "compiled in 7.4 s (trace 1.9 s, lower 0.4 s, XLA 5.1 s)[, written to the compilation cache]"
        or "read from the compilation cache in 2.3 s (trace 1.9 s, lower 0.4 s; saved 5.0 s of XLA compile)" (and
        how many programs, when more than one)."""
        compiled = self.programs - self.hits
        python = f"trace {self.trace_seconds:.1f} s, lower {self.lower_seconds:.1f} s"
        if not compiled:
            what = "read from the compilation cache" + (f" ({self.hits} programs)" if self.hits > 1 else "")
            return f"{what} in {self.seconds:.1f} s ({python}; saved {self.saved_seconds:.1f} s of XLA compile)"
        line = f"compiled{f' {compiled} programs' if compiled > 1 else ''} in {self.seconds:.1f} s ({python}, XLA " \
               f"{self.xla_seconds:.1f} s)"
        if self.hits:
            line += f", {self.hits} more read from the compilation cache"
        if self.written:
            line += ", written to the compilation cache"
        return line


_ACTIVE: list[CompileReport] = []  # the open watch() blocks (nested blocks all see a compile)
_LOCK = threading.Lock()
_LISTENING = False


def _on_duration(event: str, duration: float, **_: object) -> None:
    if event not in (_BACKEND_COMPILE, _TIME_SAVED, _TRACE, _LOWER) or not _ACTIVE:
        return
    with _LOCK:
        for report in _ACTIVE:
            if event == _BACKEND_COMPILE:
                report.programs += 1
                report.xla_seconds += duration
            elif event == _TRACE:
                report.trace_seconds += duration
            elif event == _LOWER:
                report.lower_seconds += duration
            else:
                report.saved_seconds += max(duration, 0.0)


def _on_event(event: str, **_: object) -> None:
    if event not in (_CACHE_HIT, _CACHE_WRITE) or not _ACTIVE:
        return
    with _LOCK:
        for report in _ACTIVE:
            if event == _CACHE_HIT:
                report.hits += 1
            else:
                report.written += 1


def _listen() -> None:
    """Registers the two `jax.monitoring` listeners, once per process (they cost a comparison per event)."""
    global _LISTENING
    with _LOCK:
        if not _LISTENING:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _LISTENING = True


@contextlib.contextmanager
def watch() -> Iterator[CompileReport]:
    """A block whose compiles are counted: yields a CompileReport that is filled in when the block ends (false
    when nothing compiled, e.g. a jitted function called again with the shapes it has compiled for). Compiles on
    other threads during the block are counted too."""
    _listen()
    report = CompileReport()
    start = time.perf_counter()
    with _LOCK:
        _ACTIVE.append(report)
    try:
        yield report
    finally:
        with _LOCK:
            _ACTIVE.remove(report)
        report.seconds = time.perf_counter() - start


__all__ = ["ENV", "MAX_SIZE_BYTES", "MIN_COMPILE_TIME_SECS", "CompileReport", "configured_directory",
           "default_directory", "enable", "setup", "watch"]
