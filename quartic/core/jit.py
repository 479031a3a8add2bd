"""XLA:CPU settings for compile-bound programs, and :func:`compile_bound_jit`, which applies them to
one program.

Some programs take far longer to compile than to run: the nested jets of the exact Taylor onset
(:func:`quartic.core.theory.taylor_onsets`, order 6) compile for 34 s and then run in 0.34 s on the
2k transformer of the scaling study (2 CPU cores). XLA:CPU's older fusion emitters and LLVM's
optimisation level 0 compile faster and run slower (the same program, other machine code: values
agree to rounding): 15.3 s and 0.64 s there, but at 100k parameters 111.0 → 84.6 s and 4.8 → 8.8 s
(``benchmarks/onset_compile.py``; ``theory.FAST_COMPILE_MAX_PARAMS``). For a program that runs
longer than it compiles (training, the flow, Lanczos) they cost more than they save, so they are
set per program, not for the process (``benchmarks/scaling_quick_flags.py``: the whole quick
scaling run 12.0 → 15.2 min).

The options are XLA:CPU's and known to the jaxlib versions of :data:`FAST_COMPILE_JAXLIB` (XLA
rejects a flag it does not know); elsewhere, and on other backends, :func:`compile_bound_jit` is
plain ``jax.jit``. The test suite sets the same options for the whole process
(:func:`quartic.harness.compile_cache.fast_compile_flags`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jaxlib

#: XLA debug options for compile-bound work: the older (LLVM IR) fusion emitters and LLVM -O0.
FAST_COMPILE_OPTIONS: dict[str, bool | int] = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
}
#: XLA debug options for a program whose compile, not its run, sets the process's peak memory: the
#: older fusion emitters alone (values unchanged; the run as fast). With the scaling study's AIC
#: check compiled so, its 100k model's first task peaked at 2,645 MiB instead of 3,311 and took 23 s
#: longer, 90.5 s against 67.7 (``benchmarks/aic_lean_compile.py``; the compile, the later tasks
#: took as long).
LEAN_COMPILE_OPTIONS: dict[str, bool | int] = {"xla_cpu_use_fusion_emitters": False}
#: The jaxlib versions [lo, hi) known to have :data:`FAST_COMPILE_OPTIONS` (and the lean ones).
FAST_COMPILE_JAXLIB = ((0, 5), (0, 12))


def fast_compile_known() -> bool:
    """Whether the installed jaxlib is one of :data:`FAST_COMPILE_JAXLIB`'s versions."""
    lo, hi = FAST_COMPILE_JAXLIB
    return lo <= tuple(int(p) for p in jaxlib.__version__.split(".")[:2]) < hi


def _cpu_options(options: dict[str, bool | int]) -> dict[str, bool | int] | None:
    if not fast_compile_known() or jax.default_backend() != "cpu":
        return None
    return dict(options)


def fast_compile_options() -> dict[str, bool | int] | None:
    """:data:`FAST_COMPILE_OPTIONS` where they apply (a CPU backend, a known jaxlib), else None."""
    return _cpu_options(FAST_COMPILE_OPTIONS)


def lean_compile_options() -> dict[str, bool | int] | None:
    """:data:`LEAN_COMPILE_OPTIONS` where they apply (a CPU backend, a known jaxlib), else None."""
    return _cpu_options(LEAN_COMPILE_OPTIONS)


def compile_bound_jit(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn)`` compiled with :func:`fast_compile_options`: for a program that is compiled
    once and runs briefly. Its values are those of ``jax.jit(fn)`` up to the rounding of a
    different machine code (tests/test_theory_chunked.py compares them). Called with traced
    arguments (inside another jit) it is plain ``jax.jit(fn)``: it joins the outer program, whose
    options apply, and JAX accepts per-program options on top-level programs only."""
    options = fast_compile_options()
    plain = jax.jit(fn, **jit_kwargs)
    if options is None:
        return plain
    fast = jax.jit(fn, compiler_options=options, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        return (plain if traced else fast)(*args, **kwargs)

    return call
