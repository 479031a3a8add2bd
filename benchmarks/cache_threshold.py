"""Which compiled programs the persistent compilation cache should keep: all of them, or only those
that took at least ``jax_persistent_cache_min_compile_time_secs`` to compile (0.2 s in quartic
until this benchmark, on the guess that reading a small program back costs about as much as
compiling it).

    python benchmarks/cache_threshold.py [--thresholds 0.2,0] [--workload "run scaling --quick --set sizes=2k,30k"] [--out benchmarks/results/cache-threshold-cpu-2core.json]

For each threshold: an empty cache folder, then the workload twice, each a fresh process of the
``quartic`` command with ``QUARTIC_CACHE_DIR`` on that folder (and an empty θ* cache shared by
the two runs, so the second run trains nothing, as a second ``quartic reproduce`` would not).
Reported per run: its wall time, the share of it spent compiling that the command prints
(tracing, lowering, XLA compilation and cache reads), and the folder's entries and bytes
afterwards.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, write_record  # noqa: E402

CHILD = """
import sys
from quartic.harness import compile_cache
compile_cache.MIN_COMPILE_SECONDS = float(sys.argv[1])
from quartic.harness.cli import main
sys.exit(main(sys.argv[2:]))
"""


def folder_size(path: pathlib.Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def compile_share(line: str) -> float | None:
    """The share of the wall time spent compiling, from the command's closing line
    (``NAME: finished in 2.1 min (45% compiling); results in OUT``)."""
    found = re.search(r"\((\d+)% compiling\)", line)
    return int(found.group(1)) / 100 if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", default="0.2,0")
    ap.add_argument("--workload", default="run scaling --quick --set sizes=2k,30k")
    ap.add_argument("--out", default="benchmarks/results/cache-threshold-cpu-2core.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threshold in args.thresholds.split(","):
            base = pathlib.Path(tmp) / f"t{threshold}"
            cache, theta = base / "compile", base / "theta"
            env = {**os.environ, "QUARTIC_CACHE_DIR": str(cache), "QUARTIC_CACHE": str(theta)}
            for run in ("first", "second"):
                out = base / f"out-{run}"
                cmd = [sys.executable, "-c", CHILD, threshold, *shlex.split(args.workload)]
                cmd += ["--out", str(out)]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if done.returncode:
                    raise SystemExit(f"threshold {threshold}, {run}: failed\n{done.stderr[-3000:]}")
                entries, size = folder_size(cache)
                found = re.findall(r".*finished in .*", done.stdout + done.stderr)
                last = found[-1] if found else ""
                row = {
                    "threshold_s": float(threshold),
                    "run": run,
                    "wall_s": wall,
                    "compile_share": compile_share(last),
                    "cache_entries": entries,
                    "cache_bytes": size,
                }
                rows.append(row)
                print(
                    f"threshold {threshold:>4} s, {run:<6}: {wall:6.1f} s, cache {entries} "
                    f"entries, {size / 2**20:.1f} MiB | {last}"
                )
    write_record(args.out, workload=args.workload, rows=rows)


if __name__ == "__main__":
    main()
