"""How much of a scaling verdict is the bootstrap's own resampling: refit a summary's rows with
other bootstrap seeds and print the t×·λ_max prediction interval at each extrapolated size.

    python benchmarks/verdict_seeds.py results/full/scaling_2k_1m_seeds/summary.json [SEEDS]

The committed fits use seed 0 and 2,000 resamples (``quartic.studies.scaling.power_law``); a
verdict whose interval ends within this spread of 1 is a statement about the resampling, not the
models (docs/scaling.md, "Three seeds at 300k and 1M").
"""

from __future__ import annotations

import json
import sys

import numpy as np

from quartic.studies.scaling import power_law


def main(path: str, seeds: int = 20) -> None:
    rows = json.load(open(path))["rows"]
    n = np.asarray([r["n"] for r in rows], float)
    y = [np.nan if r["t_cross_lambda"] is None else r["t_cross_lambda"] for r in rows]
    ends = {}
    for seed in range(seeds):
        fit = power_law(n, y, (1.7e9, 3e9), 2000, seed=seed)
        for size, e in fit["extrapolation"].items():
            ends.setdefault(size, []).append(e["interval"])
    for size, intervals in ends.items():
        lo, hi = np.asarray(intervals).T
        print(f"n = {size}: lower end {lo.min():.3f}-{lo.max():.3f} (median {np.median(lo):.3f}), "
              f"upper end {hi.min():.2f}-{hi.max():.2f}; below 1 in {int((lo < 1).sum())} of {seeds} seeds")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
