"""A tiny deterministic sweep that exercises the run machinery (tests only; hidden from `list`).

Each unit draws a GOE matrix A = (G + Gᵀ) / sqrt(2n) from its own seed `(seed, index)` and records
its extreme eigenvalues and second moment tr(A²)/n. Theory (Wigner's semicircle): the top
eigenvalue tends to 2 and E[tr(A²)/n] = 1 + 1/n. A `delay` per unit makes the sweep slow enough
for the tests to interrupt it midway.

    python -m quartic.harness.cli run _example_sweep --quick        # < 1 s on a 2-core CPU
    -> mean top eigenvalue ≈ 1.93 (theory 2), second moment ≈ 1.02 (theory 1 + 1/n)
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import numpy as np

from quartic.harness.runs import RunDir, run_sweep, write_json_atomic, write_jsonl_atomic

TITLE = "Example sweep: GOE top eigenvalue vs the semicircle edge (test fixture)"
QUICK_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Config:
    n_units: int = 12
    size: int = 400  # n, the matrix side
    seed: int = 0
    delay: float = 0.2  # seconds slept per unit, so that a sweep can be interrupted midway
    log_file: str | None = None  # each unit appends its name here when it starts (tests)
    nan_unit: int | None = None  # this unit returns NaN (tests the failure record)

    @classmethod
    def quick(cls) -> Config:
        return cls(size=64, delay=0.0)


def unit_name(index: int) -> str:
    return f"unit_{index:03d}"


def goe_unit(config: Config, index: int) -> dict:
    """Spectrum statistics of one GOE matrix drawn from the seed `(config.seed, index)`."""
    if config.log_file is not None:
        with open(config.log_file, "a", encoding="utf-8") as f:
            f.write(unit_name(index) + "\n")
    rng = np.random.default_rng([config.seed, index])
    n = config.size
    g = rng.standard_normal((n, n))
    a = (g + g.T) / np.sqrt(2.0 * n)
    eigs = np.linalg.eigvalsh(a)
    time.sleep(config.delay)
    second_moment = float(np.mean(eigs**2))
    if index == config.nan_unit:
        second_moment = float("nan")
    return {
        "index": index,
        "top_eig": eigs[-1],
        "bottom_eig": eigs[0],
        "second_moment": second_moment,
    }


def run(config: Config, out_dir: pathlib.Path) -> dict:
    run_dir = RunDir(out_dir)
    run_dir.write_config(config)
    units = [
        (unit_name(i), lambda i=i: goe_unit(config, i)) for i in range(config.n_units)
    ]  # fmt: skip
    sweep = run_sweep(units, out_dir, desc="_example_sweep")
    done = list(sweep.results.values())
    write_jsonl_atomic(run_dir.metrics_path, done)
    summary = {
        "n_units": config.n_units,
        "n_done": len(done),
        "n_failed": sweep.failed,
        "mean_top_eig": float(np.mean([r["top_eig"] for r in done])) if done else None,
        "mean_second_moment": float(np.mean([r["second_moment"] for r in done])) if done else None,
        "theory_top_eig": 2.0,
        "theory_second_moment": 1.0 + 1.0 / config.size,
    }
    write_json_atomic(run_dir.summary_path, summary)
    return summary


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib.pyplot as plt

    units = [r["result"] for r in RunDir(out_dir).units().values() if r["status"] == "done"]
    summary = RunDir(out_dir).read_summary()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([u["index"] for u in units], [u["top_eig"] for u in units], "o", label="measured")
    ax.axhline(summary["theory_top_eig"], color="k", ls="--", label="semicircle edge")
    ax.set_xlabel("unit")
    ax.set_ylabel("top eigenvalue")
    ax.legend()
    path = pathlib.Path(fig_dir) / "_example_sweep.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return [path]


def table(summary: dict) -> list[dict]:
    rows = []
    for quantity, key, tol in [
        ("top eigenvalue", "top_eig", 0.15),
        ("second moment", "second_moment", 0.05),
    ]:
        theory, measured = summary[f"theory_{key}"], summary[f"mean_{key}"]
        ok = measured is not None and abs(measured - theory) < tol
        rows.append(
            {
                "experiment": "_example_sweep",
                "quantity": quantity,
                "theory": theory,
                "measured": measured,
                "verdict": "ok" if ok else "off",
            }
        )
    return rows


if __name__ == "__main__":
    from quartic.harness.cli import main

    raise SystemExit(main(["run", "_example_sweep", *sys.argv[1:]]))
