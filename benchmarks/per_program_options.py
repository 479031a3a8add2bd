"""Do per-program ``compiler_options`` override the process's ``XLA_FLAGS``? The same float32
program (tanh, exp, log1p, matmuls, softmax) in fresh processes under each setting below; equal
digests mean the same machine code's values.

    python benchmarks/per_program_options.py [--out benchmarks/results/per-program-options-cpu-2core.json]

The question behind it: the suite sets XLA:CPU's fast-compile flags for the whole process; can one
program (a training loop) ask XLA's optimising settings back with ``jax.jit(compiler_options=...)``?
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

PROGRAM = """
import hashlib, json, sys
import jax, jax.numpy as jnp, numpy as np
def f(w, x):
    for _ in range(3):
        x = jnp.tanh(x @ w) * jnp.exp(-0.1 * x) + jnp.log1p(jnp.abs(x))
    return jax.nn.softmax(x, -1)
w = jax.random.normal(jax.random.key(0), (64, 64), jnp.float32) / 8
x = jax.random.normal(jax.random.key(1), (256, 64), jnp.float32)
options = json.loads(sys.argv[1])
g = jax.jit(f, compiler_options=options) if options else jax.jit(f)
print(hashlib.md5(np.asarray(g(w, x)).tobytes()).hexdigest()[:12])
"""
FAST = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
ON = {"xla_cpu_use_fusion_emitters": True}
CASES = {  # name: (process XLA_FLAGS, per-program options)
    "defaults": ("", {}),
    "fast flags": (FAST, {}),
    "fast flags + emitters on, level 1": (FAST, {**ON, "xla_backend_optimization_level": 1}),
    "fast flags + emitters on, level 2": (FAST, {**ON, "xla_backend_optimization_level": 2}),
    "fast flags + emitters on, level 3": (FAST, {**ON, "xla_backend_optimization_level": 3}),
    "defaults + fast options per program": (
        "",
        {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0},
    ),
    "flag: older emitters only": ("--xla_cpu_use_fusion_emitters=false", {}),
    "flag: LLVM -O0 only": ("--xla_backend_optimization_level=0", {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/per-program-options-cpu-2core.json")
    args = p.parse_args()
    digests = {}
    for name, (flags, options) in CASES.items():
        env = {**os.environ, "XLA_FLAGS": flags}
        proc = subprocess.run(
            [sys.executable, "-c", PROGRAM, json.dumps(options)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        digests[name] = proc.stdout.strip()
        print(f"{name:40s} {digests[name]}", flush=True)
    record = {"cases": {k: {"XLA_FLAGS": f, "options": o} for k, (f, o) in CASES.items()},
              "digests": digests}  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
