"""XLA:CPU compile settings (``compile_cache.fast_compile_flags``): the default fusion emitters
against the older ones, each with LLVM's optimisation on (XLA's default) and off
(``--xla_backend_optimization_level=0``), on a compile-bound workload: the 2k model's AIC checks (dense, own Lanczos with a Hutchinson trace,
shared Fisher pairs with the exact trace) and its order-4 Taylor onset, each setting in a fresh
process with no compilation cache (θ* trained once, before the timings, and then read from disk);
and a computing-bound one beside it: training that 2k θ* from scratch (3,000 Adam steps).

    python benchmarks/compile_flags.py [--repeats 2] [--out benchmarks/results/compile-flags-cpu-2core.json]

Writes per setting and workload the wall seconds (θ* load excluded) and the child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "default": "--xla_cpu_use_fusion_emitters=true",
    "older": "--xla_cpu_use_fusion_emitters=false",
    "default, LLVM -O0": "--xla_cpu_use_fusion_emitters=true --xla_backend_optimization_level=0",
    "older, LLVM -O0": "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0",
}

TRAIN = """
import time, jax
jax.config.update("jax_enable_x64", True)
from quartic.models import TransformerConfig
from quartic.studies.training import make_aligned_model
from quartic.tasks import token_world as tw
world = tw.TokenWorld(tw.WorldConfig(seed=0))
cfg = TransformerConfig.preset(
    "2k", vocab_size=world.vocab_size, seq_len=world.config.seq_len, param_dtype="float64"
)
t0 = time.perf_counter()
make_aligned_model(cfg, world, seed=0, use_cache=False, progress=False)
print(time.perf_counter() - t0)
"""

CHILD = """
import time, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import quartic as q
from quartic.core import theory
from quartic.studies import collapse, scaling
_, s = scaling.aligned("2k")
t0 = time.perf_counter()
trace = scaling.exact_trace(s)
fisher = collapse.dense_fisher(s)
ft = (s.task_batch("sort"), jnp.zeros_like(s.theta), s.theta)
args = (s.align_fns["kl"], s.ft_fn, s.theta)
kw = dict(rank=10, align_batch=s.align_data["kl"], ft_batch=ft)
free = dict(fisher=scaling.fisher_ops(s), fisher_batch=s.skill, method="lanczos")
q.check_aic(*args, **kw, fisher=fisher)
q.check_aic(*args, **kw, **free, num_iters=60)
_, pairs = scaling.fisher_spectrum(s, trace)
q.check_aic(*args, **kw, **free, fisher_trace=trace, fisher_eigenpairs=pairs)
np.asarray(theory.taylor_onset(*args, 4, align_args=(kw["align_batch"],), ft_args=(ft,)).coefficients)
print(time.perf_counter() - t0)
"""


WORKLOADS = {"aic": CHILD, "train": TRAIN}


def child(flags: str, env: dict, code: str = CHILD) -> tuple[float, float]:
    """The workload's seconds and the child's own peak RSS in GiB (``os.wait4``'s rusage)."""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**env, "XLA_FLAGS": flags},
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"the workload failed under {flags} (status {status})")
    return float(out.strip().splitlines()[-1]), usage.ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/compile-flags-cpu-2core.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as theta_cache:
        env = {**os.environ, "QUARTIC_CACHE": theta_cache, "QUARTIC_COMPILATION_CACHE": "0"}
        child(SETTINGS["default"], env)  # trains θ* into the temporary cache
        runs = {w: {k: [] for k in SETTINGS} for w in WORKLOADS}
        for _ in range(args.repeats):
            for work, code in WORKLOADS.items():
                for name, flags in SETTINGS.items():  # alternated, so drift hits all
                    seconds, peak = child(flags, env, code)
                    runs[work][name].append({"seconds": seconds, "peak_rss_gib": peak})
                    print(f"{work:5s} {name:18s} {seconds:6.1f} s  peak {peak:.2f} GiB", flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "workloads": {"aic": "2k AIC checks + "
              "onset", "train": "2k θ* from scratch"}, "flags": SETTINGS, "runs": runs}  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
