"""``measure.bootstrap_spearman`` (all resamples ranked at once) against the same interval computed
one resample at a time (``bootstrap_interval`` over ``spearman``), and against that with the
``spearman`` of the code before af8020b (ranks that looped over the distinct values), in one
process.

    python benchmarks/bootstrap_spearman.py [--repeats 5] [--out benchmarks/results/bootstrap-spearman-cpu-2core.json]

Pair counts of the studies: 18 (the scaling study's long runs per size), 108 (its pooled runs) and
351 (the transfer study's attack records). 2,000 resamples each, as the studies draw. Median of
``repeats`` calls of each, interleaved; the two intervals are checked to be equal bit for bit.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import write_record  # noqa: E402
from quartic.core import measure  # noqa: E402


def spearman_before(x, y) -> float:
    """``measure.spearman`` as it was before af8020b: the baseline."""

    def rank(a):
        a = np.asarray(a, float)
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for val in np.unique(a):
            idx = a == val
            r[idx] = r[idx].mean()
        return r

    rx, ry = rank(x), rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def one_by_one(x, y, num, spearman=measure.spearman):
    return measure.bootstrap_interval(lambda i: spearman(x[i], y[i]), len(x), num)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/bootstrap-spearman-cpu-2core.json")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in (18, 108, 351):
        x = rng.normal(size=n)
        y = np.round(x + rng.normal(size=n), 1)  # ties, as rates and scores have
        times = {"before af8020b": [], "one by one": [], "at once": []}
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            before = one_by_one(x, y, 2000, spearman_before)
            times["before af8020b"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            slow = one_by_one(x, y, 2000)
            times["one by one"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fast = list(measure.bootstrap_spearman(x, y, 2000))
            times["at once"].append(time.perf_counter() - t0)
        if not fast == slow == before:
            raise SystemExit(f"n={n}: the intervals differ: {fast}, {slow}, {before}")
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"pairs": n, "median_s": med, "times_s": times,
                     "speedup_vs_before": med["before af8020b"] / med["at once"],
                     "speedup_vs_one_by_one": med["one by one"] / med["at once"],
                     "interval": fast})  # fmt: skip
        print(f"{n} pairs: before {med['before af8020b']:.3f} s, one by one "
              f"{med['one by one']:.3f} s, at once {med['at once']:.4f} s "
              f"({rows[-1]['speedup_vs_before']:.0f}× the code before), the same interval {fast}")  # fmt: skip
    write_record(a.out, resamples=2000, repeats=a.repeats, rows=rows)


if __name__ == "__main__":
    main()
