"""JAX's persistent compilation cache, on by default for the ``quartic`` command and the tests, and
a clock of the time spent compiling.

Most of a first ``quartic reproduce`` on a CPU is XLA compiling the same programs (the jet, HVP,
RK4 and training steps) that a second run would compile again. With the cache on, compiled
programs are written to a per-user folder and read back by later processes:

- the folder: ``$QUARTIC_CACHE_DIR/jax`` if set, else ``$XDG_CACHE_HOME/quartic/jax``, else
  ``~/.cache/quartic/jax``;
- ``QUARTIC_COMPILATION_CACHE=0`` (or ``off``, ``false``, ``no``) turns it off.

:class:`CompileClock` adds up the compile events JAX reports (tracing, lowering, XLA compilation,
cache reads) so that a run can print what share of its wall time went to compiling.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time

import jax
import jax.monitoring

ENV_SWITCH = "QUARTIC_COMPILATION_CACHE"
ENV_DIR = "QUARTIC_CACHE_DIR"
OFF = ("0", "off", "false", "no")
# Programs that compile faster than this are not written (reading one back costs about as much).
MIN_COMPILE_SECONDS = 0.2

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
)


def cache_dir() -> pathlib.Path:
    """Where compiled programs are kept (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return pathlib.Path(os.environ[ENV_DIR]).expanduser() / "jax"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "quartic" / "jax"


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in OFF


def enable(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turn the persistent compilation cache on (unless the environment turns it off) and return
    its folder, or None when it stays off. Safe to call more than once."""
    if path is None and not enabled_by_environment():
        return None
    folder = pathlib.Path(path) if path is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


_lock = threading.Lock()
_total = 0.0
_listening = False


def _listen(event: str, duration: float, **_) -> None:
    global _total
    if event in COMPILE_EVENTS:
        with _lock:
            _total += duration


def compile_seconds() -> float:
    """Seconds spent compiling in this process since the clock was first started."""
    return _total


class CompileClock:
    """``with CompileClock() as clock: ...`` then ``clock.wall``, ``clock.compile`` (seconds) and
    ``clock.share`` (compile / wall). The compile time is JAX's own report of tracing, lowering,
    XLA compilation and cache reads inside the block (on any thread)."""

    def __enter__(self) -> CompileClock:
        global _listening
        with _lock:
            if not _listening:
                jax.monitoring.register_event_duration_secs_listener(_listen)
                _listening = True
        self._c0, self._t0 = compile_seconds(), time.perf_counter()
        self.wall = self.compile = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self.compile = compile_seconds() - self._c0

    @property
    def share(self) -> float:
        return self.compile / self.wall if self.wall > 0 else 0.0
