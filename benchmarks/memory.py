"""Resident memory of an experiment's quick run, unit by unit (not part of benchmarks/run.py).

    python benchmarks/memory.py transformer_collapse [--out FILE.json] [--key NAME]

Runs the experiment's quick units in order in this process (no results folder). After each unit:
the peak RSS while it ran (sampled every 20 ms) and the RSS left once garbage is collected and
freed heap is returned (glibc ``malloc_trim``): what the unit keeps alive. At the end, the RSS
before and after ``quartic.core.cache.clear_all`` without and with the trim. Uses only what commit
1679b09 already had, so it also measures the code before this file was written.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import pathlib
import subprocess
import threading
import time

import jax

jax.config.update("jax_enable_x64", True)

from quartic.core import cache  # noqa: E402
from quartic.harness import compile_cache  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment")
    p.add_argument("--out", default="benchmarks/results/memory-cpu-2core.json")
    p.add_argument("--key", help="the entry's name in --out (default: the experiment's)")
    args = p.parse_args()
    compile_cache.enable()
    libc = ctypes.CDLL("libc.so.6")
    mod = importlib.import_module(f"quartic.experiments.{args.experiment}")
    peak = [rss_mib()]

    def sample():
        while True:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    rows = []
    for name, fn in mod.units(mod.Config.quick()):
        peak[0] = rss_mib()
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
        top = peak[0]
        gc.collect()
        libc.malloc_trim(0)
        rows.append({"unit": name, "seconds": seconds, "peak_mib": top, "kept_mib": rss_mib()})
        print(
            f"{name:40s} {seconds:6.1f} s  peak {top:7.0f} MiB  kept {rows[-1]['kept_mib']:7.0f} MiB"
        )
    before = rss_mib()
    cache.clear_all()
    gc.collect()
    after_clear = rss_mib()
    libc.malloc_trim(0)
    after_trim = rss_mib()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out = pathlib.Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.key or args.experiment] = {
        "commit": commit.stdout.strip(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "units": rows,
        "rss_mib_before_clear_all": before,
        "rss_mib_after_clear_all_gc": after_clear,
        "rss_mib_after_malloc_trim": after_trim,
    }
    out.write_text(json.dumps(data, indent=1))
    print(f"clear_all: {before:.0f} -> {after_clear:.0f} MiB, trim -> {after_trim:.0f} MiB; {out}")


if __name__ == "__main__":
    main()
