"""The terms of the exact Taylor series of one scaling-study run along its simulated flow.

    python benchmarks/taylor_terms.py results/full/scaling_1m/summary.json 3   # markov, 1M seed 0

For row ``ROW`` of a scaling summary's ``rows``: at each simulated time (t·λ_max), the simulated
KL drift Δu over c₂t², and the next terms c₃t³ and c₄t⁴ over c₂t² (docs/scaling.md, "300k and 1M").
"""

import json
import sys


def main(path: str, row: int) -> None:
    with open(path) as f:
        r = json.load(f)["rows"][row]
    c, lam = r["taylor_coefficients"], r["lambda_max_ft"]  # c[0] is c₁
    print(f"{r['task']}, n = {r['n']}: c2 = {c[1]:.3e}, c3 = {c[2]:.3e}, c4 = {c[3]:.3e}")
    print("t·λ_max   Δu/(c2 t²)   c3 t³/(c2 t²)   c4 t⁴/(c2 t²)")
    for tl, du in zip(r["flow_t_lambda"], r["flow_delta_u"], strict=True):
        t = tl / lam
        print(
            f"{tl:<9.3g} {du / (c[1] * t**2):<12.3f} {c[2] * t / c[1]:<15.3f} {c[3] * t**2 / c[1]:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
