"""The scaling study's per-task stages at one size, each timed on its own: the AIC check, the Taylor
onset and the simulated flow, for a first task (compiles included) and a second one.

    python benchmarks/task_stages.py [--size 100k] [--check-options study|default] [--out benchmarks/results/task-stages-cpu-2core.json]

Runs in a child process: θ* of the size (trained, or loaded from ``$QUARTIC_CACHE``), F's exact
trace and top-40 spectrum as the study computes them, every compiled program dropped
(``cache.release_programs``), then the stages of ``scaling.task_scaling`` for the tasks ``sort``
and ``lookup``. ``--check-options default`` compiles the check with XLA's defaults instead of the
study's ``scaling.check_compiler_options``. Reported: seconds per stage, the process's peak
resident memory before the tasks and after each stage (the study's ``cache.release_heap`` between
stages is not called here, so these peaks bound the study's from above), and the check's values
(to compare runs).
Another checkout's code can be measured with ``PYTHONPATH=<checkout>``. The record is appended
to ``--out`` under a label (``--label``, default the options), so runs can be compared in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, run_child  # noqa: E402

CHILD = r"""
import json, resource, time
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
import quartic
from quartic.core import aic, cache, dynamics, theory
from quartic.studies import collapse, scaling
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
_, setup = scaling.aligned({size!r}, 0)
trace = scaling.exact_trace(setup)
_, pairs = scaling.fisher_spectrum(setup, trace)
cache.release_programs()
out = {{"n": setup.n, "quartic": quartic.__file__, "peak_rss_bytes_before_tasks": peak(), "tasks": {{}}}}
options = scaling.check_compiler_options(setup.n) if {study!r} else None
rows = scaling.chunk_rows(setup.n)
for task in ("sort", "lookup"):
    ft_data = (setup.task_batch(task), jnp.zeros_like(setup.theta), setup.theta)
    t0 = time.perf_counter()
    rep = aic.check_aic(params=setup.theta, rank=10, method="lanczos", fisher_trace=trace,
                        fisher_eigenpairs=pairs, lambda_max_iters=scaling.STUDY_LAMBDA_MAX_ITERS,
                        compiler_options=options, **scaling.aic_args(setup, ft_data, rows))
    t1 = time.perf_counter(); p1 = peak()
    align_args, ft_args = scaling.taylor_args(setup, ft_data, rows)
    onset = theory.taylor_onset(setup.align_fns["kl"], setup.ft_fn, setup.theta, 6,
                                align_args=align_args, ft_args=ft_args)
    jax.block_until_ready(onset.coefficients)
    t2 = time.perf_counter(); p2 = peak()
    lam = rep.lambda_max_ft
    ts = dynamics.log_times(1e-3 / lam, 0.1 / lam, 6)
    traj = collapse._flow_fn(setup, scaling.FLOW_SUBSTEPS)(
        setup.theta, jnp.asarray(ts), ft_data, rep.basis, jnp.asarray(rep.eigenvalues[:10]),
        setup.align_value("refusal", setup.theta)).checked()
    jax.block_until_ready(traj.observables)
    t3 = time.perf_counter(); p3 = peak()
    out["tasks"][task] = {{
        "check_s": t1 - t0, "onset_s": t2 - t1, "flow_s": t3 - t2,
        "peak_rss_bytes_after": {{"check": p1, "onset": p2, "flow": p3}},
        "check_values": {{"ortho_ratio": rep.ortho_ratio, "gamma_fisher": rep.gamma_fisher,
                          "lambda_max_ft": lam, "crossover_time": rep.crossover_time}},
    }}
print("RESULT" + json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="100k")
    p.add_argument("--check-options", choices=("study", "default"), default="study")
    p.add_argument("--label", default=None)
    p.add_argument("--out", default="benchmarks/results/task-stages-cpu-2core.json")
    a = p.parse_args()
    label = a.label or f"{a.size}, check options: {a.check_options}"
    code = CHILD.format(size=a.size, study=a.check_options == "study")
    r = run_child(code, label, dict(os.environ))
    for task, t in r["tasks"].items():
        print(f"{label} {task}: check {t['check_s']:.1f} s, onset {t['onset_s']:.1f} s, flow "
              f"{t['flow_s']:.1f} s; peak after {', '.join(f'{k} {v / 2**20:,.0f} MiB' for k, v in t['peak_rss_bytes_after'].items())}")  # fmt: skip
    path = pathlib.Path(a.out)
    record = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    command = " ".join(["python", "benchmarks/task_stages.py", *sys.argv[1:]])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
    record["runs"][label] = {"command": command, "machine": machine_info(), **r}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
