"""Peak memory of one scaling-study unit (``experiments/scaling.py``'s ``_measure_model``) with and
without its two memory measures: the freed heap returned between stages and inside each task
(``quartic.core.cache.release_heap``) and the AIC check compiled with the lean options
(``quartic.core.jit.lean_compile_options``: the older fusion emitters, for the chunked sizes above
``scaling.CHUNK_ABOVE``).

    python benchmarks/aic_lean_compile.py [--size 100k] [--tasks sort,lookup]
        [--out benchmarks/results/aic-lean-compile-cpu-2core.json]

Each setting runs alone in a fresh process with an empty θ* cache (θ* is trained in the process,
as a first ``quartic reproduce`` does) and no persistent compilation cache, one after the other,
with no long fine-tuning. A thread samples the resident memory every 10 ms: the peak of each stage
and its base (the resident memory when it starts). Also written: each stage's seconds and every
number the unit computes, so the settings' values can be compared (they should agree to rounding).
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402

SETTINGS = {
    "neither (the code before)": {"trim": False, "lean": False},
    "heap released between stages": {"trim": True, "lean": False},
    "heap released and the check compiled lean (the study's code)": {"trim": True, "lean": True},
}

CHILD = r"""
import json, sys, threading, time
import jax
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, {root!r})
import experiments.scaling as exp
from quartic.core import cache, jit

def rss():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024

state = {{"peak": 0.0}}
def sample():
    while True:
        state["peak"] = max(state["peak"], rss())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()

stages = []
def note(msg):  # the unit's own stage notes: each closes a stage
    stages.append({{"stage": msg, "peak_mib": state["peak"], "end_mib": rss(), "base_mib": state["base"]}})
    state["peak"] = state["base"] = rss()
state["base"] = state["peak"] = rss()
exp.unit_note = note
if not {trim!r}:
    cache.release_heap = lambda: False
if not {lean!r}:
    jit.lean_compile_options = lambda: None
config = exp.Config(sizes=({size!r},), seeds=(0,), tasks={tasks!r}, taylor_order=4, long_steps=0)
t0 = time.perf_counter()
unit = exp._measure_model(config, {size!r}, 0)
out = {{"seconds": time.perf_counter() - t0, "stages": stages, "unit": unit,
        "peak_mib": max(s["peak_mib"] for s in stages)}}
print("RESULT" + json.dumps(out, default=float))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="100k")
    p.add_argument("--tasks", default="sort,lookup")
    p.add_argument("--out", default="benchmarks/results/aic-lean-compile-cpu-2core.json")
    a = p.parse_args()
    tasks = tuple(a.tasks.split(","))
    results = {}
    for name, s in SETTINGS.items():
        with tempfile.TemporaryDirectory() as theta_cache:
            env = {**os.environ, "QUARTIC_CACHE": theta_cache}
            env.pop("XLA_FLAGS", None)
            code = CHILD.format(root=str(ROOT), size=a.size, tasks=tasks, **s)
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
            )
            wall = time.perf_counter() - t0
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
        if done.returncode or line is None:
            raise SystemExit(f"{name}: the child failed\n{done.stderr[-3000:]}")
        r = json.loads(line[len("RESULT") :])
        r["wall_s"] = wall
        results[name] = r
        print(f"{name}: peak {r['peak_mib']:.0f} MiB, unit {r['seconds']:.1f} s", flush=True)
        for st in r["stages"]:
            print(f"    {st['stage']}: base {st['base_mib']:.0f}, peak {st['peak_mib']:.0f} MiB")
    record = {
        "command": "python benchmarks/aic_lean_compile.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "size": a.size,
        "tasks": list(tasks),
        "settings": results,
    }
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
