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

:func:`fast_compile_flags` switches XLA:CPU to its older (LLVM IR) fusion emitters and turns LLVM's
optimisation off, which compiles faster and smaller and runs slower: for work that is mostly
compiling, such as the test suite (the suite's ``conftest.py`` calls it), not for the experiments
(docs/performance.md has the numbers).
"""

from __future__ import annotations

import os
import pathlib
import threading
import time

import jax
import jax.monitoring

from quartic.core.jit import FAST_COMPILE_OPTIONS, fast_compile_known

ENV_SWITCH = "QUARTIC_COMPILATION_CACHE"
ENV_DIR = "QUARTIC_CACHE_DIR"
OFF = ("0", "off", "false", "no")
# Programs that compile faster than this are not written. Writing every program (threshold 0) made
# both a first and a second run of the scaling study's 2k and 30k models slower, in two repeats:
# 126.0 -> 132.9 s and 55.8 -> 61.1 s, then 142.8 -> 166.2 s and 68.0 -> 75.2 s, 29 entries against
# 200 (``python benchmarks/cache_threshold.py``, benchmarks/results/cache-threshold-cpu-2core.json).
MIN_COMPILE_SECONDS = 0.2

COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
)


#: :data:`quartic.core.jit.FAST_COMPILE_OPTIONS` as ``XLA_FLAGS`` for a whole process (XLA aborts
#: the process on a flag it does not know, so only the jaxlib versions of
#: :data:`~quartic.core.jit.FAST_COMPILE_JAXLIB` get them).
FAST_COMPILE_FLAGS = tuple(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE_OPTIONS.items())


def fast_compile_flags() -> tuple[str, ...]:
    """Add :data:`FAST_COMPILE_FLAGS` to ``XLA_FLAGS`` and return the flags added.

    Call it before JAX starts its backend (the flags are read once, at the first computation).
    Nothing is added when the backend has started, for a flag that ``XLA_FLAGS`` already names (the
    caller's choice stands: ``XLA_FLAGS=--xla_cpu_use_fusion_emitters=true`` keeps XLA's default
    emitters), or outside the jaxlib versions of :data:`~quartic.core.jit.FAST_COMPILE_JAXLIB`. Measured on 2 CPU
    cores, each setting in a fresh process (``benchmarks/compile_flags.py``,
    benchmarks/results/compile-flags-cpu-2core.json): the float64 AIC checks of a 2k-parameter
    transformer, almost all compiling, 70.5 s (XLA's default) → 58.9 s (older emitters) → 39.7 s
    (both flags), peak 2.18 → 1.49 → 1.48 GiB; training that model's θ*, mostly computing, 17.6 →
    12.4 → 17.4 s. The scaling study's 100k unit, mostly computing, took 330 → 388 s with the older
    emitters alone (``quartic run scaling --quick --set sizes=100k`` under each ``XLA_FLAGS``,
    once each, docs/performance.md).
    """
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", lambda: False)()
    if started or not fast_compile_known():
        return ()
    current = os.environ.get("XLA_FLAGS", "")
    added = tuple(f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in current)
    if added:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [current, *added]))
    return added


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
