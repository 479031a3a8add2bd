"""How much of a scaling verdict is the bootstrap's own resampling: refit a summary's rows with
other bootstrap seeds and report the t×·λ_max prediction interval's ends at each extrapolated size.

    python benchmarks/verdict_seeds.py results/full/scaling_2k_1m_seeds/summary.json [SEEDS] [--out F]

The committed fits use seed 0 and 2,000 resamples (``quartic.studies.scaling.power_law``); a
verdict whose interval ends within this spread of 1 is a statement about the resampling, not the
models (docs/scaling.md, "Three seeds at 300k and 1M"). Uses the summary's own fitting
(``scaling_report.t_cross_fits``, which the verdict checks with ``VERDICT_SEEDS`` seeds).
Result of the command above with 20 seeds: ``benchmarks/results/verdict-seeds-2k-1m.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from quartic.studies import scaling_report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary")
    parser.add_argument("seeds", nargs="?", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows = json.loads(pathlib.Path(args.summary).read_text())["rows"]
    fits = scaling_report.t_cross_fits(rows, (1.7e9, 3e9), 2000, range(args.seeds))
    result = {"summary": args.summary, "seeds": args.seeds, "bootstrap": 2000, "sizes": {}}
    for size in fits[0]["extrapolation"]:
        lo, hi = np.asarray([f["extrapolation"][size]["interval"] for f in fits]).T
        result["sizes"][size] = {"lower": lo.tolist(), "upper": hi.tolist(),
                                 "lower_below_1": int((lo < 1).sum())}  # fmt: skip
        print(f"n = {size}: lower end {lo.min():.3f}-{lo.max():.3f} (median {np.median(lo):.3f}), "
              f"upper end {hi.min():.2f}-{hi.max():.2f}; below 1 in {int((lo < 1).sum())} of "
              f"{args.seeds} seeds")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
