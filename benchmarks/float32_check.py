"""The scaling study's measurements of one θ* in float32 against float64 (issue 15 allows float32
above 30k parameters with a float64 cross-check): is float32 good enough to save time and memory?

    python benchmarks/float32_check.py [--size 30k] [--tasks sort,lookup]
        [--out benchmarks/results/float32-check-cpu-2core.json]

θ* is trained in float64 as the study does (``scaling.aligned``) and then cast to float32, so both
precisions measure the same model: the exact trace, F's top-40 Lanczos spectrum, and each task's
``scaling.task_scaling`` (AIC check, order-4 Taylor onset, the flow). Writes every scalar quantity
of both with their relative difference, and each stage's seconds (the first task's include its
compile).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from benchmarks.common import machine_info  # noqa: E402
from quartic.studies import collapse, scaling  # noqa: E402

SCALARS = ("ortho_ratio", "lambda_d", "tail_mass", "gamma_fisher", "crossover_time",
           "lambda_max_ft", "lambda_max_ft_residual", "t_cross_lambda", "residuals_max",
           "onset_order", "flow_onset_slope", "forecast_max_rel_error")  # fmt: skip


def measure(setup, tasks) -> dict:
    t0 = time.perf_counter()
    trace = scaling.exact_trace(setup)
    spectrum, pairs = scaling.fisher_spectrum(setup, trace)
    out = {"seconds": {"spectrum": time.perf_counter() - t0}, "spectrum": spectrum, "tasks": {}}
    for task in tasks:
        t0 = time.perf_counter()
        r = scaling.task_scaling(setup, task, trace, pairs, spectrum["d_share"], 10, 4, num_times=6)
        out["seconds"][task] = time.perf_counter() - t0
        out["tasks"][task] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="30k")
    p.add_argument("--tasks", default="sort,lookup")
    p.add_argument("--out", default="benchmarks/results/float32-check-cpu-2core.json")
    a = p.parse_args()
    tasks = a.tasks.split(",")
    _, s64 = scaling.aligned(a.size)
    cast = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    s32 = collapse.CollapseSetup(
        s64.apply_fn, jax.tree_util.tree_map(cast, s64.params), s64.world, s64.category
    )
    runs = {"float32": measure(s32, tasks), "float64": measure(s64, tasks)}
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-300)
    compare = {}
    sp32, sp64 = runs["float32"]["spectrum"], runs["float64"]["spectrum"]
    top32, top64 = np.asarray(sp32["eigenvalues"][:10]), np.asarray(sp64["eigenvalues"][:10])
    compare["spectrum"] = {
        "trace": [sp32["trace"], sp64["trace"], rel(sp32["trace"], sp64["trace"])],
        "top10_max_rel": float(np.max(np.abs(top32 - top64) / np.abs(top64))),
        "lambda_1": [float(top32[0]), float(top64[0])],
        "max_residual": [max(sp32["residuals"][:10]), max(sp64["residuals"][:10])],
    }
    for task in tasks:
        t32, t64 = runs["float32"]["tasks"][task], runs["float64"]["tasks"][task]
        row = {}
        for k in SCALARS:
            x, y = float(t32[k]), float(t64[k])
            row[k] = [x, y, rel(x, y)]
        c32, c64 = np.asarray(t32["taylor_coefficients"]), np.asarray(t64["taylor_coefficients"])
        row["c1..c4"] = [c32.tolist(), c64.tolist()]
        row["warnings_float32"] = t32["warnings"]
        compare[task] = row
    record = {
        "command": "python benchmarks/float32_check.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "size": a.size,
        "n": s64.n,
        "seconds": {k: v["seconds"] for k, v in runs.items()},
        "compare (float32, float64, relative difference)": compare,
    }
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(json.dumps(record["compare (float32, float64, relative difference)"], indent=1,
                     default=float)[:4000])  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
