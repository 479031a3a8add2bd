"""What a quick experiment leaves in the process after ``cache.clear_all``, as ``quartic reproduce``
runs them one after another: resident memory and JAX's live arrays after each, under glibc's default
number of malloc arenas and under ``MALLOC_ARENA_MAX=2``.

    python benchmarks/heap_residue.py [--experiments quartic_law,transformer_collapse,defences]
        [--out benchmarks/results/heap-residue-cpu-2core.json]

Each setting runs in a fresh process (θ* from ``$QUARTIC_CACHE``: trained there the first time), no
persistent compilation cache. The residue raises the base on which a later experiment's peak lands
(the scaling study's 100k model peaks about 350 MiB higher inside ``quartic reproduce`` than alone).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_child, write_record  # noqa: E402

CHILD = r"""
import gc, json, sys
import jax
sys.path.insert(0, {root!r})
from quartic.harness import cli
from quartic.core import cache

def rss():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024

rows = [{{"after": "start", "rss_mib": rss(), "live_arrays": 0, "live_mib": 0.0}}]
for name in {names!r}:
    x64 = bool(jax.config.jax_enable_x64)
    cli.run_experiment(name, quick=True, out_dir={out!r} + "/" + name)
    jax.config.update("jax_enable_x64", x64)
    cache.clear_all()
    gc.collect()
    live = jax.live_arrays()
    rows.append({{"after": name, "rss_mib": rss(), "live_arrays": len(live),
                  "live_mib": sum(a.nbytes for a in live) / 2**20}})
print("RESULT" + json.dumps(rows))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", default="quartic_law,transformer_collapse,defences")
    p.add_argument("--out", default="benchmarks/results/heap-residue-cpu-2core.json")
    a = p.parse_args()
    names = a.experiments.split(",")
    results = {}
    for label, extra in (
        ("glibc's default arenas", {}),
        ("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}),
    ):
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, **extra}
            env.pop("XLA_FLAGS", None)
            code = CHILD.format(root=str(ROOT), names=names, out=out)
            results[label] = run_child(code, label, env)
        print(label)
        for r in results[label]:
            print(f"    after {r['after']}: {r['rss_mib']:.0f} MiB, {r['live_arrays']} live arrays")
    write_record(a.out, settings=results)


if __name__ == "__main__":
    main()
