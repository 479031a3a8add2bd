"""Scale: does the quartic window open as models grow? (docs/theory.md §3; the AIC from 2k to 1M).

Aligned transformers of 2k to 1M parameters (θ* as the collapse study builds it, float64), each with
the six benign tasks: ‖Pg‖/‖g‖ beside the random-direction baseline √(d/n), the Fisher's top-d share
and effective rank, λ_d, γ_F, t×·λ_max(H_FT), the exact Taylor coefficients and onset order, the
simulated KL drift against the second-order forecast for t·λ_max ≤ 0.1, with d = 10 and d holding
90 % of the Fisher trace. All matrix-free (quartic.studies.scaling). Each quantity is fitted against
n as a power law with a bootstrap interval and t×·λ_max and ‖Pg‖/‖g‖ are extrapolated to 1.7e9 and
3e9 parameters with a prediction interval. The quartic window (t² → t⁴ crossover before the
validity horizon) exists where t×·λ_max < 1.

    quartic run scaling --quick      # 2k, 30k, 100k; one seed; three tasks
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import jax
import numpy as np

from quartic.core.errors import QuarticError
from quartic.harness import plotting
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic
from quartic.studies import scaling
from quartic.tasks import token_world as tw

TITLE = "Scale: ‖Pg‖/‖g‖, t×·λ_max and the onset order from 2k to 1M parameters, extrapolated"
QUICK_SECONDS = 600

FITTED = ("ortho_ratio", "t_cross_lambda", "gamma_fisher", "lambda_d", "ortho_ratio_d_share")
EXTRAPOLATED = ("t_cross_lambda", "ortho_ratio")


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple[str, ...] = ("2k", "7k", "30k", "100k", "300k", "1m")
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = tw.BENIGN_TASKS
    rank: int = 10
    share: float = 0.9  # the second d: the smallest holding this share of the Fisher trace
    spectrum_k: int = 40
    num_iters: int = 60
    taylor_order: int = 6
    num_times: int = 6
    extrapolate_to: tuple[float, ...] = (1.7e9, 3e9)
    bootstrap: int = 2000

    @classmethod
    def quick(cls) -> Config:
        return cls(
            sizes=("2k", "30k", "100k"),
            seeds=(0,),
            tasks=("sort", "lookup", "addition"),
            taylor_order=4,
            bootstrap=500,
        )

    def __post_init__(self):
        unknown = sorted(set(self.sizes) - set(scaling.SIZES))
        if unknown:
            raise QuarticError(f"unknown size(s) {unknown}; choose from {sorted(scaling.SIZES)}")
        bad = sorted(set(self.tasks) - set(tw.BENIGN_TASKS))
        if bad:
            raise QuarticError(f"unknown task(s) {bad}; choose from {list(tw.BENIGN_TASKS)}")
        if self.taylor_order < 4:
            raise QuarticError(f"taylor_order must be >= 4 (c₄ is read), got {self.taylor_order}")
        if not 0 < self.share < 1:
            raise QuarticError(f"share must lie in (0, 1), got {self.share}")


def _model_unit(config: Config, size: str, seed: int) -> dict:
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    _, setup = scaling.aligned(size, seed)
    seconds = {"theta_star": time.perf_counter() - t0}
    t0 = time.perf_counter()
    trace = scaling.exact_trace(setup)
    spectrum, vecs = scaling.fisher_spectrum(
        setup, trace, config.spectrum_k, config.rank, config.share
    )
    seconds["spectrum"] = time.perf_counter() - t0
    tasks = {}
    for task in config.tasks:
        t0 = time.perf_counter()
        tasks[task] = scaling.task_scaling(
            setup,
            task,
            trace,
            vecs,
            spectrum["d_share"],
            config.rank,
            config.num_iters,
            config.taylor_order,
            num_times=config.num_times,
        )
        seconds[task] = time.perf_counter() - t0
    return {"size": size, "seed": seed, "n": setup.n, "spectrum": spectrum, "tasks": tasks,
            "seconds": seconds}  # fmt: skip


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    units = [
        (f"model_{size}_seed{seed}", lambda s=size, k=seed: _model_unit(config, s, k))
        for size in config.sizes
        for seed in config.seeds
    ]
    sweep = run_sweep(units, out_dir, desc="scaling")
    summary = summarize(sweep.results, config)
    summary["num_failed"] = sweep.failed
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _rows(results: dict) -> list[dict]:
    rows = []
    for unit in results.values():
        spec = unit["spectrum"]
        for r in unit["tasks"].values():
            rows.append({**r, "seed": unit["seed"], "share_top_d": spec["share_top_d"],
                         "effective_rank": spec["effective_rank_bounds"][0]})  # fmt: skip
    return rows


def summarize(results: dict, config: Config) -> dict:
    rows = _rows(results)
    per_size = {}
    for unit in sorted(results.values(), key=lambda u: u["n"]):
        r = [x for x in rows if x["n"] == unit["n"]]
        pick = lambda k, r=r: [x[k] for x in r if x[k] is not None]  # noqa: E731
        entry = per_size.setdefault(unit["size"], {"n": [], "spectrum": []})
        entry["n"].append(unit["n"])
        entry["spectrum"].append({k: v for k, v in unit["spectrum"].items() if k != "eigenvalues"})
        for k in (*FITTED, "random_ortho_ratio", "random_ortho_ratio_d_share",
                  "forecast_max_rel_error", "flow_onset_slope", "c4_over_gamma_f"):  # fmt: skip
            vals = np.asarray(pick(k), float)
            entry[k] = (
                [float(vals.min()), float(np.median(vals)), float(vals.max())]
                if vals.size
                else None
            )
        entry["onset_orders"] = sorted({x["onset_order"] for x in r if x["onset_order"]})
    n = np.asarray([x["n"] for x in rows], float)
    fits = {
        k: scaling.power_law(
            n,
            [np.nan if x[k] is None else x[k] for x in rows],
            config.extrapolate_to if k in EXTRAPOLATED else (),
            config.bootstrap,
        )
        for k in (*FITTED, "share_top_d", "effective_rank")
    }
    return {
        "per_size": per_size,
        "fits": fits,
        "verdict": verdict(fits.get("t_cross_lambda"), config.extrapolate_to),
        "rows": rows,
    }


def verdict(fit: dict | None, sizes) -> str:
    """One plain sentence from the extrapolated t×·λ_max (the window exists where it is < 1)."""
    if fit is None:
        return "Too few sizes to extrapolate t×·λ_max."
    parts = []
    for s in sizes:
        e = fit["extrapolation"][f"{s:.3g}"]
        lo, hi = e["interval"]
        state = "open" if hi < 1 else "closed" if lo > 1 else "undetermined"
        parts.append(
            f"at n = {s:.2g} t×·λ_max ≈ {e['fit']:.2g} (95 % PI {lo:.2g}–{hi:.2g}): {state}"
        )
    return (
        "The quartic window (t×·λ_max < 1) is predicted "
        + "; ".join(parts)
        + f" (fit exponent {fit['exponent']:.2f}, interval "
        + f"{fit['exponent_interval'][0]:.2f} to {fit['exponent_interval'][1]:.2f})."
    )


def table(summary: dict) -> list[dict]:
    rows = []
    for size, e in summary["per_size"].items():
        if e["ortho_ratio"] is None:
            continue
        rows.append(dict(
            quantity=f"{size} (n={e['n'][0]}): ‖Pg‖/‖g‖ median vs random √(d/n)",
            theory="≈ √(d/n) if benign g were random",
            measured=f"{e['ortho_ratio'][1]:.3g} vs {e['random_ortho_ratio'][1]:.3g}",
            verdict="info",
        ))  # fmt: skip
        rows.append(dict(
            quantity=f"{size}: t×·λ_max(H) median [min, max]",
            theory="< 1 for a t⁴ window",
            measured=f"{e['t_cross_lambda'][1]:.3g} [{e['t_cross_lambda'][0]:.3g}, "
            f"{e['t_cross_lambda'][2]:.3g}]",
            verdict="open" if e["t_cross_lambda"][2] < 1 else "closed",
        ))  # fmt: skip
    for k in EXTRAPOLATED:
        fit = summary["fits"].get(k)
        if fit:
            lo, hi = fit["exponent_interval"]
            theory = "-0.5 for a random direction" if k == "ortho_ratio" else "< 0 if it opens"
            rows.append(dict(quantity=f"{k} ∝ n^b: b", theory=theory,
                             measured=f"{fit['exponent']:.3f} [{lo:.3f}, {hi:.3f}]",
                             verdict="info"))  # fmt: skip
    rows.append(dict(quantity="window at 1.7e9-3e9 params", theory="t×·λ_max < 1",
                     measured=summary["verdict"], verdict="info"))  # fmt: skip
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib.pyplot as plt

    summary_path = pathlib.Path(out_dir) / "summary.json"
    if not summary_path.exists():
        return []
    import json

    summary = json.loads(summary_path.read_text())
    rows = summary["rows"]
    n = np.asarray([r["n"] for r in rows], float)
    grid = np.geomspace(n.min(), 3e9, 100)
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for ax, key in zip(axes.ravel(), ("ortho_ratio", "t_cross_lambda", "gamma_fisher", "lambda_d"),
                       strict=True):  # fmt: skip
        y = np.asarray([np.nan if r[key] is None else r[key] for r in rows], float)
        ax.loglog(n, y, "o", alpha=0.5, label=key)
        fit = summary["fits"].get(key)
        if fit:
            ax.loglog(grid, fit["prefactor"] * grid ** fit["exponent"], "-", label="power-law fit")
            for s, e in fit["extrapolation"].items():
                ax.errorbar(float(s), e["fit"], yerr=[[e["fit"] - e["interval"][0]],
                            [e["interval"][1] - e["fit"]]], fmt="s", capsize=4)  # fmt: skip
        if key == "ortho_ratio":
            ax.loglog(grid, np.sqrt(rows[0]["rank"] / grid), "k--", label="random √(d/n)")
        if key == "t_cross_lambda":
            ax.axhline(1.0, color="k", ls=":", label="window closes (t×·λ = 1)")
        ax.set_xlabel("parameters n")
        ax.legend(fontsize=7)
    return [plotting.save(fig, pathlib.Path(fig_dir) / "scaling.png")]


if __name__ == "__main__":
    from quartic.harness import cli

    raise SystemExit(cli.main(["run", "scaling", *sys.argv[1:]]))
