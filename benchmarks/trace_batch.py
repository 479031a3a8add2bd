"""The exact Fisher trace at one size with its per-example Jacobians in batches of each given size:
seconds (first call with its compile, then a second call) and the child's peak resident memory.

    python benchmarks/trace_batch.py [--size 1m] [--batches 8,3] [--out benchmarks/results/trace-batch-cpu-2core.json]

Each batch runs in a fresh process on the scaling study's freshly initialised float64 model of the
size (as ``benchmarks/scaling_child.py``; the trace's cost does not depend on training), so the
peak is the trace's alone. ``scaling.trace_batch`` picks the study's batch (3 at 1M).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import run_child, write_record  # noqa: E402

CHILD = r"""
import json, resource, time
import jax
jax.config.update("jax_enable_x64", True)
from flax import nnx
from quartic.models.transformer import Transformer, functional
from quartic.studies import collapse, scaling
from quartic.tasks import token_world as tw
world = tw.TokenWorld(tw.WorldConfig(seed=0))
model = Transformer(scaling.model_config({size!r}, world), rngs=nnx.Rngs(0))
apply_fn, params = functional(model, nnx.Param)
setup = collapse.CollapseSetup(apply_fn, params, world, 0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
times = []
for _ in range(2):
    t0 = time.perf_counter()
    value = scaling.exact_trace(setup, {batch})
    times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT" + json.dumps({{"n": setup.n, "first_s": times[0], "s": times[1], "trace": value,
                              "peak_rss_bytes": peak, "peak_before_trace_bytes": base}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1m")
    p.add_argument("--batches", default="8,3")
    p.add_argument("--out", default="benchmarks/results/trace-batch-cpu-2core.json")
    a = p.parse_args()
    rows = {}
    for batch in (int(b) for b in a.batches.split(",")):
        r = rows[batch] = run_child(CHILD.format(size=a.size, batch=batch), f"batch {batch}")
        print(
            f"{a.size} batch {batch}: {r['first_s']:.1f} s first, {r['s']:.1f} s after; peak "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB; trace {r['trace']!r}",
            flush=True,
        )
    write_record(a.out, size=a.size, batches=rows)


if __name__ == "__main__":
    main()
