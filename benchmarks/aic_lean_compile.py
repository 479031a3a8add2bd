"""Peak memory of one scaling-study unit (``experiments/scaling.py``'s ``_measure_model``) with and
without each of its memory measures: the freed heap returned between stages and inside each task
(``quartic.core.cache.release_heap``), the AIC check compiled with the lean options
(``quartic.core.jit.lean_compile_options``: the older fusion emitters, for the chunked sizes above
``scaling.CHUNK_ABOVE``), and the compiled programs dropped at the stage boundaries after which
they do not run again (``quartic.core.cache.release_programs``: after θ*, after the spectrum,
before the long fine-tuning). A last setting turns JAX's persistent compilation cache on, as the
``quartic`` command does, which writes each new program to disk as it is compiled.

    python benchmarks/aic_lean_compile.py [--size 100k] [--tasks sort,lookup] [--long-steps 0]
        [--only neither,heap,lean,programs,cache] [--out benchmarks/results/unit-memory-cpu-2core.json]

Each setting runs alone in a fresh process with an empty θ* cache (θ* is trained in the process,
as a first ``quartic reproduce`` does) and, but for ``cache``, no persistent compilation cache, one
after the other. A thread samples the resident memory every 10 ms: the peak of each stage and its
base (the resident memory when it starts). Also written: each stage's seconds and every number the
unit computes, so the settings' values can be compared (they should agree to rounding). The first
record (three settings, before ``release_programs``) is ``benchmarks/results/aic-lean-compile-cpu-2core.json``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_child, write_record  # noqa: E402

SETTINGS = {
    "neither": ("nothing released, XLA's default emitters (the code before 87f2b8c)",
                {"trim": False, "lean": False, "programs": False, "cache": False}),
    "heap": ("heap released between stages",
             {"trim": True, "lean": False, "programs": False, "cache": False}),
    "lean": ("heap released and the check compiled lean (the code before release_programs)",
             {"trim": True, "lean": True, "programs": False, "cache": False}),
    "programs": ("heap and finished programs released, the check lean (the study's code)",
                 {"trim": True, "lean": True, "programs": True, "cache": False}),
    "cache": ("the study's code with the persistent compilation cache on (as `quartic run`)",
              {"trim": True, "lean": True, "programs": True, "cache": True}),
}  # fmt: skip

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
if not {programs!r}:
    cache.release_programs = cache.release_heap
if {cache!r}:
    from quartic.harness import compile_cache
    compile_cache.enable({compile_dir!r})
if not {lean!r}:
    jit.lean_compile_options = lambda: None
config = exp.Config(sizes=({size!r},), seeds=(0,), tasks={tasks!r}, taylor_order=4,
                    long_steps={long_steps!r})
t0 = time.perf_counter()
unit = exp._measure_model(config, {size!r}, 0)
seconds = time.perf_counter() - t0
import gc
gc.collect(); cache.trim_heap(); held = rss()  # the last programs compiled are still held
jax.clear_caches(); gc.collect(); cache.trim_heap()
out = {{"seconds": seconds, "stages": stages, "unit": unit,
        "peak_mib": max(s["peak_mib"] for s in stages),
        "end_mib": held, "programs_released_at_end_mib": held - rss()}}
print("RESULT" + json.dumps(out, default=float))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="100k")
    p.add_argument("--tasks", default="sort,lookup")
    p.add_argument("--long-steps", type=int, default=0, help="long fine-tuning steps per task")
    p.add_argument("--only", default=",".join(SETTINGS), help="settings to run, in this order")
    p.add_argument("--out", default="benchmarks/results/unit-memory-cpu-2core.json")
    a = p.parse_args()
    tasks = tuple(a.tasks.split(","))
    only = a.only.split(",")
    unknown = sorted(set(only) - set(SETTINGS))
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    results = {}
    for key in only:
        name, s = SETTINGS[key]
        with tempfile.TemporaryDirectory() as theta_cache, tempfile.TemporaryDirectory() as xla:
            env = {**os.environ, "QUARTIC_CACHE": theta_cache}
            env.pop("XLA_FLAGS", None)
            code = CHILD.format(
                root=str(ROOT), size=a.size, tasks=tasks, long_steps=a.long_steps,
                compile_dir=xla, **s,
            )  # fmt: skip
            t0 = time.perf_counter()
            r = run_child(code, name, env)
            r["wall_s"] = time.perf_counter() - t0
        r["setting"] = name
        results[key] = r
        print(
            f"{key}: peak {r['peak_mib']:.0f} MiB, unit {r['seconds']:.1f} s; at the end "
            f"{r['end_mib']:.0f} MiB, {r['programs_released_at_end_mib']:.0f} MiB of it freed "
            "by dropping the compiled programs",
            flush=True,
        )
        for st in r["stages"]:
            print(f"    {st['stage']}: base {st['base_mib']:.0f}, peak {st['peak_mib']:.0f} MiB")
    write_record(a.out, size=a.size, tasks=list(tasks), long_steps=a.long_steps, settings=results)


if __name__ == "__main__":
    main()
