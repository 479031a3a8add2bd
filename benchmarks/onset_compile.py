"""The exact Taylor onset's program (order 6, the scaling study's first task) compiled with XLA's
default options and with ``core.jit``'s fast-compile options, on the scaling study's aligned models:
the first call (compile + run) and two later runs, each setting in a fresh process with no
compilation cache (θ* read from the θ* cache, trained there first if missing).

    python benchmarks/onset_compile.py [--sizes 2k,30k,100k] \
        [--out benchmarks/results/onset-compile-cpu-2core.json]

Behind ``theory.FAST_COMPILE_MAX_PARAMS``: the options pay where the first call is mostly
compiling and the program runs a few times.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

CHILD = """
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
from quartic.core import theory
from quartic.studies import scaling
size, mode = sys.argv[1], sys.argv[2]
setup = scaling.aligned(size)[1]
if mode == "default":
    theory.compile_bound_jit = jax.jit  # XLA's default options (no XLA_FLAGS in this process)
theory.FAST_COMPILE_MAX_PARAMS = 10**12  # the mode decides, not the size
ft_data = (setup.task_batch("sort"), jax.numpy.zeros_like(setup.theta), setup.theta)
align_args, ft_args = scaling.taylor_args(setup, ft_data, scaling.chunk_rows(setup.n))
times = []
for _ in range(3):
    t0 = time.perf_counter()
    onset = theory.taylor_onset(setup.align_fns["kl"], setup.ft_fn, setup.theta, 6,
                                align_args=align_args, ft_args=ft_args)
    c = jax.block_until_ready(onset.coefficients)
    times.append(time.perf_counter() - t0)
print(json.dumps({"n": setup.n, "first_call_s": times[0], "runs_s": times[1:],
                  "coefficients": [float(x) for x in c]}))
"""

THETA = """
import sys, jax
jax.config.update("jax_enable_x64", True)
from quartic.studies import scaling
scaling.aligned(sys.argv[1])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2k,30k,100k")
    ap.add_argument("--out", default="benchmarks/results/onset-compile-cpu-2core.json")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "sizes": {}}
    for size in args.sizes.split(","):
        subprocess.run([sys.executable, "-c", THETA, size], env=env, check=True)
        rows = {}
        for mode in ("default", "fast"):
            cmd = [sys.executable, "-c", CHILD, size, mode]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
        result["sizes"][size] = rows
        print(size, {m: (round(r["first_call_s"], 1), [round(t, 2) for t in r["runs_s"]])
                     for m, r in rows.items()}, flush=True)  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
