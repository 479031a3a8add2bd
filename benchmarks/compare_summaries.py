"""Compare two summary.json files number by number (timings left out).

    python benchmarks/compare_summaries.py A/summary.json B/summary.json [--rtol 0]

Prints how many numbers differ (beyond ``rtol`` relative) and the first of them; keys named
``*seconds*`` are timings and ``environments`` (which machines computed the run) is provenance:
neither is compared. Used for the claims that ``quartic reproduce``'s
transfer quick run equals the standalone one, and that the rerun WIR study differs from the
committed one (docs/results.md, docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math


def differences(a, b, rtol: float = 0.0, path: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if "seconds" in k or k == "environments":
                continue
            if k not in a or k not in b:
                out.append((f"{path}.{k}", a.get(k, "<missing>"), b.get(k, "<missing>")))
            else:
                out += differences(a[k], b[k], rtol, f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, f"{len(a)} items", f"{len(b)} items")]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, rtol, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float):
        same = (
            a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rtol * max(abs(a), abs(b))
        )
        return [] if same else [(path, a, b)]
    return [] if a == b else [(path, a, b)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--show", type=int, default=10)
    args = p.parse_args()
    with open(args.a) as fa, open(args.b) as fb:
        diffs = differences(json.load(fa), json.load(fb), args.rtol)
    print(f"{len(diffs)} numbers differ")
    for d in diffs[: args.show]:
        print(*d)


if __name__ == "__main__":
    main()
