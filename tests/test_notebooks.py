"""Every notebook under notebooks/ runs to completion (its assertions are the real checks).

Notebooks are jupytext "percent" scripts, executed with ``python`` in a subprocess with
``QUARTIC_NOTEBOOK_OUT`` pointing at a temporary folder. The ones selected in this session run two
at a time and share a JAX compilation cache (they are small CPU jobs dominated by compilation).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
TIMEOUT_S = 300  # a hang guard: the slowest notebook takes about 70 s on an idle 2-core machine
WORKERS = 2
#: Notebooks that compute more than they compile run with XLA's default settings, not the suite's
#: fast-compile flags (-O0 code). Each alone, fresh compilation cache, 2 cores
#: (``python benchmarks/notebook_flags.py``, benchmarks/results/notebook-flags-cpu-2core.json):
#: transfer_robustness 141.6 s with the flags, 79.4 s without; every other notebook is faster with
#: them (aic_ladder 11.6 against 23.2 s, transformer_collapse 27.5 against 31.1 s). They start
#: first, so that the short ones fill the other slot.
COMPUTE_BOUND = ("transfer_robustness.py",)


def _execute(
    path: pathlib.Path, out: pathlib.Path, cache: pathlib.Path, drop_flags: tuple[str, ...] = ()
) -> dict:
    env = {**os.environ, "QUARTIC_NOTEBOOK_OUT": str(out), "MPLBACKEND": "Agg"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f not in drop_flags]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("PYTHONOPTIMIZE", None)  # the notebooks' claims are asserts: never strip them
    # the notebooks compile the same small programs (problem generators, check_aic, Taylor-mode
    # onset): a compilation cache shared by this session's runs saves about a third of their time
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(path)],
            cwd=out,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"rc": None, "out": out, "output": f"timed out after {TIMEOUT_S} s"}
    seconds = time.perf_counter() - start
    return {
        "rc": proc.returncode,
        "out": out,
        "output": f"{proc.stdout}{proc.stderr}\n[{seconds:.1f} s]",
    }


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, theta_star_cache):
    """Start every notebook this session selected, ``WORKERS`` at a time; name -> future."""
    wanted = {
        item.callspec.params["notebook"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_notebook_runs_and_its_claims_hold"
    }
    cache = tmp_path_factory.mktemp("jax_cache")
    # the session's θ* cache: the notebook that needs the 2k θ* reads it, or trains it once while
    # the tests that need it wait (the checkpoint's lock)
    os.environ["QUARTIC_THETA_CACHE"] = str(theta_star_cache)
    added = request.getfixturevalue("fast_flags_added")
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {
        name: pool.submit(
            _execute,
            ROOT / "notebooks" / name,
            tmp_path_factory.mktemp(name[:-3]),
            cache,
            added if name in COMPUTE_BOUND else (),
        )
        for name in sorted(wanted, key=lambda name: (name not in COMPUTE_BOUND, name))
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("notebook", [p.name for p in NOTEBOOKS])
def test_notebook_is_a_percent_script_in_float64(notebook):
    text = (ROOT / "notebooks" / notebook).read_text()
    assert text.startswith("# %% [markdown]\n# # "), "open with a markdown cell and a title"
    assert 'jax.config.update("jax_enable_x64", True)' in text
    assert "QUARTIC_NOTEBOOK_OUT" in text


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [p.name for p in NOTEBOOKS])
def test_notebook_runs_and_its_claims_hold(notebook, runs):
    result = runs[notebook].result()
    assert result["rc"] == 0, f"{notebook} failed:\n{result['output'][-4000:]}"
    figures = sorted(p.name for p in result["out"].glob("*.png"))
    assert figures, f"{notebook} saved no figure under QUARTIC_NOTEBOOK_OUT"
