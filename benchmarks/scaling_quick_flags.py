"""``quartic run scaling --quick`` under XLA's default compile settings and under the suite's fast
compile flags (``compile_cache.FAST_COMPILE_FLAGS``: older fusion emitters, LLVM -O0), each as a
new user meets it: a fresh process, empty compilation and θ* caches, ``/usr/bin/time -v``.

    python benchmarks/scaling_quick_flags.py [--work /tmp/flags] \
        [--out benchmarks/results/scaling-quick-flags-cpu-2core.json]
    python benchmarks/scaling_quick_flags.py --collect-only --work DIR   # tabulate a finished run

Writes per setting the wall time, the compile share the command prints, the peak RSS and each
size's stage seconds (θ*, spectrum, each task, long fine-tuning) from the run's units. The two
settings run one after the other, never side by side (two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess

from quartic.harness.compile_cache import FAST_COMPILE_FLAGS

SETTINGS = {"default": "", "fast flags": " ".join(FAST_COMPILE_FLAGS)}


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def run_one(name: str, flags: str, work: pathlib.Path) -> None:
    base = work / _slug(name)
    shutil.rmtree(base, ignore_errors=True)
    (base / "compilation").mkdir(parents=True)
    (base / "theta").mkdir()
    env = {**os.environ, "QUARTIC_CACHE_DIR": str(base / "compilation"),
           "QUARTIC_CACHE": str(base / "theta")}  # fmt: skip
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = flags
    cmd = [
        "/usr/bin/time",
        "-v",
        "quartic",
        "run",
        "scaling",
        "--quick",
        "--out",
        str(base / "out"),
    ]
    with open(base / "log.txt", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def collect(name: str, work: pathlib.Path) -> dict:
    base = work / _slug(name)
    log = (base / "log.txt").read_text()
    h, m, s = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", log).groups()  # fmt: skip
    wall = int(h or 0) * 3600 + int(m) * 60 + float(s)
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    share = re.search(r"finished in .* \((\d+)% compiling\)", log)
    sizes = {}
    for unit in sorted((base / "out" / "units").glob("model_*.json")):
        rec = json.loads(unit.read_text())
        size = unit.stem.split("_")[1]
        sizes[size] = {"unit_s": round(rec["seconds"], 1),
                       **{k: round(v, 1) for k, v in rec["result"]["seconds"].items()}}  # fmt: skip
    return {
        "xla_flags": SETTINGS[name],
        "wall_s": round(wall, 1),
        "compile_share": int(share.group(1)) / 100 if share else None,
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "stage_seconds": sizes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/scaling-quick-flags")
    ap.add_argument("--out", default="benchmarks/results/scaling-quick-flags-cpu-2core.json")
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args()
    work = pathlib.Path(args.work)
    if not args.collect_only:
        for name, flags in SETTINGS.items():
            run_one(name, flags, work)
    result = {name: collect(name, work) for name in SETTINGS}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
