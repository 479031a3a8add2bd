"""Where a result was computed: the software, the device and the CPU's instruction set.

Float32 results of this project are reproducible on one machine (the same code, seed and
environment give the same bits) but not across machines: XLA compiles every program for the host
CPU it runs on (its vector width and tuning), and a different summation order moves float32
training by a rounding error that the training then amplifies. Measured: the transfer study's
pretraining, the same commit and seed, gives final validation losses 4.083653 on the machine of
the committed run and 4.083550 here, and 4.083250 here with XLA restricted to AVX2
(``benchmarks/pretrain_drift.py``; docs/results.md). So every unit record names the environment
that computed it (:func:`environment`, written by :func:`quartic.harness.runs.run_sweep`), and
``quartic run`` lists them in the summary (:func:`summary_environments`), so two runs that differ
can be told apart from two runs of one machine that should not.
"""

from __future__ import annotations

import functools
import os
import pathlib
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

__all__ = ["environment", "summary_environments"]

# the CPU features that decide XLA:CPU's vector code, in the order /proc/cpuinfo names them
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def _cpu() -> dict[str, Any]:
    model, flags = None, set()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {
        "cpu_model": model or platform.processor() or None,
        "cpu_isa": [f for f in _ISA_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
    }


def _commit() -> str | None:
    """quartic's own git commit (with ``-dirty`` for uncommitted changes), or None outside a
    checkout."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@functools.cache
def _static() -> dict[str, Any]:
    import jax
    import jaxlib
    import numpy

    devices = jax.devices()
    return {
        "quartic_commit": _commit(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": numpy.__version__,
        "backend": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        **_cpu(),
    }


def environment() -> dict[str, Any]:
    """The environment computing now: quartic's commit, Python, jax/jaxlib/numpy versions, the
    backend and its device kind and count, the CPU's model, instruction-set flags and core count,
    and the settings that change arithmetic (``XLA_FLAGS``, whether float64 is on)."""
    import jax

    return {
        **_static(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
    }


def summary_environments(records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The distinct environments of a run's unit records, each with the units it computed (in
    record order); units recorded before environments were kept are listed under ``None``."""
    groups: list[tuple[Any, list[str]]] = []
    for name, record in records.items():
        env = record.get("environment")
        for known, names in groups:
            if known == env:
                names.append(name)
                break
        else:
            groups.append((env, [name]))
    return [{"environment": env, "units": names} for env, names in groups]
