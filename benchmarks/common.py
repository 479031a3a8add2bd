"""Shared pieces of the benchmark suite: timing, compile-time accounting, the models it measures.

Every figure is a median over ``repeats`` calls, each ended by ``jax.block_until_ready``; the
compile time of a jitted function is measured separately (lower + compile), and for end-to-end calls
that compile inside (``check_aic``) it is read from JAX's own compile-duration events.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quartic.harness import provenance
from quartic.models import Transformer, TransformerConfig, count_params, functional

VOCAB, SEQ = 32, 16  # the token world's scale (vocab ~30, seq_len 12-16)

# ----------------------------------------------------------------------------------------------
# Timing


def block(x):
    return jax.block_until_ready(x)


@dataclass
class Timing:
    median_s: float
    compile_s: float
    times_s: list[float]
    peak_bytes: int | None = None  # XLA buffer assignment: args + outputs + temps − aliased
    output: Any = None  # the last call's result (not serialised)

    def to_dict(self) -> dict:
        return {
            "median_s": self.median_s,
            "compile_s": self.compile_s,
            "times_s": self.times_s,
            "peak_bytes": self.peak_bytes,
        }


def _peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not report it
        return None
    if m is None:
        return None
    alias = getattr(m, "alias_size_in_bytes", 0) or 0  # donated inputs reused as outputs
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - alias)


def time_jit(
    fn: Callable, *args, repeats: int = 5, donate: tuple[int, ...] = (), warmup: bool = True
) -> Timing:
    """Compile ``jax.jit(fn)`` for ``args`` (timed), then the median of ``repeats`` timed calls.

    ``warmup=False`` skips the untimed first call (for single long runs where it would double the
    cost; the first call of a compiled program differs from later ones only by allocation).
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = block(compiled(*args)) if warmup else None  # allocation, thread-pool warm-up
    times = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = block(compiled(*args))
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), compile_s, times, _peak_bytes(compiled), out)


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Median wall time of ``fn()`` (a Python-level call); compile time seen during the warm-up."""
    with compile_seconds() as first:
        for _ in range(warmup):
            block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), first.seconds, times)


class _Counter:
    seconds = 0.0


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_active: list[_Counter] = []
_listener_installed = False


def _listener(name, duration, **_):
    if name in _COMPILE_EVENTS:
        for c in _active:
            c.seconds += duration


@contextlib.contextmanager
def compile_seconds():
    """Sum of JAX tracing + lowering + XLA compile time spent inside the block."""
    global _listener_installed
    if not _listener_installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _listener_installed = True
    c = _Counter()
    _active.append(c)
    try:
        yield c
    finally:
        _active.remove(c)


def end_to_end(fn: Callable[[], Any], repeats: int = 3) -> dict:
    """Wall time of whole calls that compile inside (medians), split into compile and the rest."""
    walls, comps = [], []
    for _ in range(repeats):
        with compile_seconds() as c:
            t0 = time.perf_counter()
            block(fn())
            walls.append(time.perf_counter() - t0)
        comps.append(c.seconds)
    wall = statistics.median(walls)
    comp = statistics.median(comps)
    return {"wall_s": wall, "compile_s": comp, "run_s": max(wall - comp, 0.0), "walls_s": walls}


# ----------------------------------------------------------------------------------------------
# Device


def device_name() -> str:
    """``cpu-<k>core`` on CPU, else the accelerator's name (``nvidia-h100-80gb-hbm3``)."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return d.device_kind.lower().replace(" ", "-")


def machine_info() -> dict:
    """The benchmark's device name and platform beside the environment every quartic run records
    (:func:`quartic.harness.provenance.environment`: versions, backend, CPU model and ISA, commit)."""
    env = provenance.environment()
    return {
        "device": device_name(),
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        **env,
        "git_commit": env["quartic_commit"],
    }


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_child(code: str, what: str, env: dict | None = None) -> dict:
    """``python -c code`` in a fresh process from the repository root (so its peak memory and its
    compiled programs are its own), and the JSON it prints on a line starting with ``RESULT``.
    ``SystemExit`` with the end of the child's stderr when it fails or prints no result."""
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
    if done.returncode or line is None:
        raise SystemExit(f"{what}: the child failed\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT") :])


def write_record(out: str | os.PathLike, **fields) -> pathlib.Path:
    """Write a benchmark's result file: the command that made it (this script, its arguments),
    :func:`machine_info`, then ``fields``; returns the path."""
    record = {
        "command": " ".join(
            ["python", f"benchmarks/{pathlib.Path(sys.argv[0]).name}", *sys.argv[1:]]
        ),
        "machine": machine_info(),
        **fields,
    }
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------------------------
# The small transformer and its losses


def config_for(target: int, n_layers: int, n_heads: int, dtype: str, **kw) -> TransformerConfig:
    """The LM config with ``n_layers``/``n_heads`` and ``d_ff = 4 d_model`` closest to ``target``
    parameters (``TransformerConfig.preset`` does this for its fixed targets)."""
    best = None
    for d in range(n_heads, 1024 + 1, n_heads):
        cfg = TransformerConfig(
            vocab_size=VOCAB,
            seq_len=SEQ,
            d_model=d,
            n_heads=n_heads,
            n_layers=n_layers,
            d_ff=4 * d,
            param_dtype=dtype,
            **kw,
        )
        err = abs(count_params(cfg) - target)
        if best is None or err < best[0]:
            best = (err, cfg)
    return best[1]


# name -> (target params, layers, heads)
SIZES = {
    "2k": (2_000, 1, 2),
    "8k": (8_000, 2, 2),
    "10k": (10_000, 2, 2),
    "100k": (100_000, 4, 4),
    "1m": (1_000_000, 6, 8),
}


@dataclass
class Problem:
    """A transformer at a point, its data and flat losses."""

    name: str
    config: TransformerConfig
    model: Transformer
    apply_fn: Callable
    params: dict
    batch: dict  # {"tokens": [B, T] int32, "targets": [B, T] int32}
    ft_batch: dict

    @property
    def n(self) -> int:
        return count_params(self.config)


def lm_loss(apply_fn, params, batch):
    """Mean next-token cross-entropy: ``tokens [B, T] -> logits [B, T, V]`` against ``targets``."""
    logits = apply_fn(params, batch["tokens"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return -jnp.mean(picked)


def make_batch(key, batch_size: int) -> dict:
    # ids from 1 (0 is PAD); targets are a fixed function of the tokens, so the loss is learnable
    tokens = jax.random.randint(key, (batch_size, SEQ), 1, VOCAB, dtype=jnp.int32)
    targets = (3 * tokens + jnp.roll(tokens, 1, axis=1)) % VOCAB
    return {"tokens": tokens, "targets": targets.astype(jnp.int32)}


def make_problem(size: str, dtype: str, batch_size: int = 16, seed: int = 0) -> Problem:
    target, layers, heads = SIZES[size]
    cfg = config_for(target, layers, heads, dtype)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    apply_fn, params = functional(model)
    key = jax.random.PRNGKey(100 + seed)
    batch = make_batch(jax.random.fold_in(key, 0), batch_size)
    ft_batch = make_batch(jax.random.fold_in(key, 1), batch_size)
    return Problem(size, cfg, model, apply_fn, params, batch, ft_batch)


def rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` (elementwise, as float64 numpy)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def time_interleaved(fns: dict[str, tuple[Callable, tuple]], repeats: int = 7) -> dict[str, Timing]:
    """Compile each ``jax.jit(fn)`` (timed), then time them in turn, ``repeats`` rounds.

    Alternating the candidates round by round cancels slow drifts of the machine's load (the
    ratios of medians are then fair even on a shared machine).
    """
    compiled, compile_s, peak = {}, {}, {}
    for name, (fn, args) in fns.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        compile_s[name] = time.perf_counter() - t0
        peak[name] = _peak_bytes(compiled[name])
        block(compiled[name](*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (_, args) in fns.items():
            t0 = time.perf_counter()
            block(compiled[name](*args))
            times[name].append(time.perf_counter() - t0)
    return {
        name: Timing(statistics.median(ts), compile_s[name], ts, peak[name])
        for name, ts in times.items()
    }
