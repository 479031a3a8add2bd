"""Ablation ladder, measured: break one AIC condition at a time and read the onset exponent.

On the quadratic family (exact flow, float64) each rung's onset exponent is fitted on a geometric
grid of t two decades wide, ending at ``min(10⁻³/λ_max(H), t×/100)`` (deep inside the expansion and
before the crossover), and compared with ``quartic.core.theory.LADDER``: leak → 2 then 4 after
t× (``theory.crossover_time``), Fisher tail → 2 then 4, PHg = 0 → 6, no coupling → Δu ≡ 0. The
exponent after t× is fitted on the window predicted from θ* alone (``quartic.studies.ladder``). The curved
family (RK4 flow) is measured the same way against the exact Taylor-mode onset order.

Then the window of slope 4 ± tol as a phase diagram over (leak, coupling): measured from the exact
flow, and predicted from the Taylor coefficients of Δu at θ* alone, at three orders (docs/ladder.md):
Taylor-6 (the slope of Σ_{k≤6} c_k t^k), next order (left edge from c₂…c₄, right edge
``t₀ = tol·|c₄/c₅|``) and leading order (``t×·√((2 − tol)/tol) < tol/|s|``).

    python -m quartic.harness.cli run ablation_ladder --quick --figures figures   # ~20 s, 2-core CPU
    -> every quadratic rung within 0.03 of its predicted exponent (acceptance 0.1); phase agreement
       0.988 (Taylor-6), 0.951 (next order), 0.914 (leading order) over 3 seeds × 81 cells
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import numpy as np

from quartic.harness import plotting
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic, write_jsonl_atomic
from quartic.studies.ablation import (
    PREDICTIONS,
    aic_crossover,
    grid_array,
    ladder_curved,
    ladder_quadratic,
    metric_rows,
    phase_seed,
    summarise,
)

TITLE = "Ablation ladder: onset exponents 2/4/6/none, and the (leak, coupling) window of slope 4"
QUICK_SECONDS = 20.0

#: Acceptance: measured exponents within this of the prediction (quadratic family).
EXPONENT_TOL = 0.1


@dataclasses.dataclass(frozen=True)
class Config:
    n: int = 40
    d: int = 4
    coupling: float = 1.0  # the AIC-satisfying base problem's ‖PHP⊥‖
    leak: float = 1e-6  # ‖Pg‖/‖g‖ of the leak rung (small: so that a slope-4 window follows t×)
    tail: float = 1e-10  # Fisher mass outside M of the tail rung
    seed: int = 0
    curvature: float = 1.0  # the curved family: φ(θ) = θ + c‖θ‖², ‖c‖ = curvature
    quartic: float = 0.5  # and L_FT + (β/4)‖θ‖⁴
    points_per_decade: int = 40
    tol: float = 0.1  # a window is where the local slope is within tol of 4
    min_decades: float = 1.0  # the phase "slope 4 observable": a window at least this wide
    phase_leaks: tuple[float, float] = (1e-7, 1e-2)
    phase_couplings: tuple[float, float] = (1e-2, 2.0)
    phase_num: int = 13  # cells per axis, geometric
    phase_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    check_aic: bool = True  # also read t× of the leak rung off quartic.check_aic

    @classmethod
    def quick(cls) -> Config:
        return cls(phase_num=9, phase_seeds=(0, 1, 2))


def run(config: Config, out_dir: pathlib.Path) -> dict:
    run_dir = RunDir(out_dir)
    run_dir.write_config(config)
    with jax.enable_x64(True):
        units = [
            ("ladder_quadratic", lambda: ladder_quadratic(config)),
            ("ladder_curved", lambda: ladder_curved(config)),
        ]
        if config.check_aic:
            units.append(("check_aic", lambda: aic_crossover(config)))
        units += [(f"phase_seed{s}", lambda s=s: phase_seed(config, s)) for s in config.phase_seeds]
        sweep = run_sweep(units, out_dir, desc="ablation_ladder")
    res = sweep.results

    write_jsonl_atomic(run_dir.metrics_path, metric_rows(res))
    summary = summarise(res, sweep.failed, config, EXPONENT_TOL)
    write_json_atomic(run_dir.summary_path, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Figure

_COLOURS = {
    "quartic": "C0",
    "first_order_leak": "C1",
    "fisher_tail": "C2",
    "phg_zero": "C3",
    "no_coupling": "C7",
}


def _guide(ax, x0, y0, order, decades=1.5, **kw):
    plotting.decade_guide(ax, x0, y0, order, decades, f"$t^{order}$", **kw)


def _curves_panel(ax, rungs, title):
    for name, r in rungs.items():
        t, du = np.asarray(r["t"]), np.asarray(r["delta_u"])
        x = t * r["lambda_max"]
        pos = du > 0
        if pos.sum() < 2:
            ax.plot(
                [], [], color=_COLOURS[name], label=f"{name}: Δu ≡ 0 (max {np.abs(du).max():.0e})"
            )
            continue
        ax.loglog(x[pos], du[pos], color=_COLOURS[name], lw=1.6, label=name)
        # theory: the leading Taylor term c_m t^m (and c₄t⁴ after t× where it applies)
        c = np.asarray(r["taylor"])
        m = r["onset_predicted"]
        if m is not None:
            ax.loglog(x, c[m - 1] * t**m, color="k", lw=0.8, ls="--")
        if r.get("late_predicted"):
            ax.loglog(x, c[3] * t**4, color="k", lw=0.8, ls="--")
            if r.get("t_cross_predicted"):
                xc = r["t_cross_predicted"] * r["lambda_max"]
                ax.axvline(xc, color=_COLOURS[name], lw=0.8, ls="-.")
    lo = ax.get_ylim()[0]
    ax.set_ylim(max(lo, 1e-60), None)
    ax.set_xlabel("t · λ_max(H)")
    ax.set_ylabel("Δu(t)")
    ax.set_title(title, fontsize=9)


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = RunDir(out_dir)
    units = {k: r["result"] for k, r in run_dir.units().items() if r["status"] == "done"}
    summary = run_dir.read_summary()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))

    ax = axes[0, 0]
    if "ladder_quadratic" in units:
        rungs = units["ladder_quadratic"]["rungs"]
        _curves_panel(ax, rungs, "quadratic family (exact flow); dashed: leading Taylor terms")
        _guide(ax, 1e-6, 1e-40, 2)
        _guide(ax, 1e-5, 1e-45, 4)
        _guide(ax, 1e-4, 1e-50, 6, decades=1.0)
        ax.legend(fontsize=7, loc="lower right")

    ax = axes[0, 1]
    for fam, ls in (("ladder_quadratic", "-"), ("ladder_curved", "--")):
        for name, r in units.get(fam, {}).get("rungs", {}).items():
            if r["onset_predicted"] is None:
                continue
            x = np.asarray(r["t"]) * r["lambda_max"]
            slope = np.asarray(r["slope"], float)
            if "rounding_floor" in r:  # hide where Δu is at float64 rounding (PHg = 0 at tiny t)
                slope[np.asarray(r["delta_u"]) < 1e3 * np.asarray(r["rounding_floor"])] = np.nan
            ax.semilogx(x, slope, color=_COLOURS[name], ls=ls, lw=1.2)
            if fam == "ladder_quadratic" and r.get("window_predicted", [None])[0]:
                lo, hi = r["window_predicted"]
                ax.axvspan(
                    lo * r["lambda_max"], hi * r["lambda_max"], color=_COLOURS[name], alpha=0.12
                )
    for level in (2, 4, 6):
        ax.axhline(level, color="k", lw=0.6, ls=":")
    ax.set_ylim(0, 7)
    ax.set_xlabel("t · λ_max(H)")
    ax.set_ylabel("local slope d log Δu / d log t")
    ax.set_title(
        "local slopes: quadratic (solid), curved (dashed); shaded: predicted windows", fontsize=9
    )

    ax = axes[0, 2]
    if "ladder_curved" in units:
        _curves_panel(
            ax, units["ladder_curved"]["rungs"], "curved family (RK4); dashed: Taylor-mode onset"
        )
        _guide(ax, 1e-6, 1e-40, 2)
        _guide(ax, 1e-5, 1e-45, 4)
        ax.legend(fontsize=7, loc="lower right")

    ax = axes[1, 0]
    phases = sorted(k for k in units if k.startswith("phase_seed"))
    if phases:
        p = units[phases[0]]
        leaks, coups = np.asarray(p["leaks"]), np.asarray(p["couplings"])
        mw, pw, nw, lw = (
            grid_array(p[f"{k}_width"]) for k in ("measured", "taylor", "next_order", "leading")
        )
        shown = np.where(np.isfinite(mw), mw, -0.5)
        mesh = ax.pcolormesh(
            coups, leaks, np.clip(shown, -0.5, 3), shading="nearest", cmap="viridis"
        )
        fig.colorbar(mesh, ax=ax, label="measured window width (decades; < 0: none)")
        thr = summary.get("min_decades", 1.0)
        cc, ll = np.meshgrid(coups, leaks)
        ax.contour(cc, ll, np.clip(np.where(np.isfinite(pw), pw, -2), -2, 5), levels=[thr],
                   colors="w", linewidths=2)  # fmt: skip
        ax.contour(cc, ll, np.clip(np.where(np.isfinite(nw), nw, -2), -2, 5), levels=[thr],
                   colors="orange", linewidths=1.2)  # fmt: skip
        ax.contour(cc, ll, np.clip(np.where(np.isfinite(lw), lw, -2), -2, 5), levels=[thr],
                   colors="r", linewidths=1.2, linestyles="--")  # fmt: skip
        m = mw >= thr
        ax.scatter(cc[m], ll[m], marker="o", facecolor="none", edgecolor="w", s=18)
        bad = m != (pw >= thr)
        ax.scatter(cc[bad], ll[bad], marker="x", color="r", s=30)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("coupling ‖PHP⊥‖")
        ax.set_ylabel("leak ‖Pg‖/‖g‖")
        agree = summary["phase"][str(p["seed"])]["taylor"]["fraction_agree"]
        ax.set_title(
            f"seed {p['seed']}: window of slope 4±{summary['tol']} ≥ {thr} decade "
            f"(o: measured; x: disagree)\nwhite: Taylor-6 at θ* (agree {agree:.0%}); "
            "orange: next order; red dashed: leading order",
            fontsize=9,
        )

    # every seed: measured against predicted width, one point per cell
    thr = summary.get("min_decades", 1.0)
    for ax, kind, label in (
        (axes[1, 1], "taylor", "Taylor-6 at θ*"),
        (axes[1, 2], "next_order", "next order (c₂…c₄; t₀ = tol/|s|)"),
    ):
        for i, name in enumerate(phases):
            p = units[name]
            mw, pw = grid_array(p["measured_width"]).ravel(), grid_array(p[f"{kind}_width"]).ravel()
            show = lambda w: np.clip(np.where(np.isfinite(w), w, -0.5), -0.5, 4)
            ax.plot(
                show(pw), show(mw), "o", ms=3, alpha=0.6, color=f"C{i}", label=f"seed {p['seed']}"
            )
        ax.plot([-0.5, 4], [-0.5, 4], color="k", lw=0.8)
        ax.axhline(thr, color="k", ls=":", lw=0.8)
        ax.axvline(thr, color="k", ls=":", lw=0.8)
        ax.set_xlabel(f"window width, {label} (decades; −0.5: none)")
        ax.set_ylabel("window width, measured (decades; −0.5: none)")
        frac = summary.get(f"phase_agreement_{kind}")
        if frac is not None:
            ax.set_title(
                f"all seeds: phase agreement {frac:.1%} (off-diagonal quadrants disagree)",
                fontsize=9,
            )
        ax.legend(fontsize=7)
    return [plotting.save(fig, pathlib.Path(fig_dir) / "ablation_ladder.png")]


def table(summary: dict) -> list[dict]:
    rows = []
    for name, r in summary.get("quadratic", {}).items():
        if r["onset_predicted"] is None:
            ok = r["max_abs_delta_u"] <= r["machine_bound"]
            rows.append(
                {
                    "quantity": f"{name}: max |Δu| (≡ 0)",
                    "theory": 0.0,
                    "measured": r["max_abs_delta_u"],
                    "verdict": "ok" if ok else "off",
                }
            )
            continue
        dev = abs(r["onset_measured"] - r["onset_predicted"])
        rows.append(
            {
                "quantity": f"{name}: onset exponent",
                "theory": r["onset_predicted"],
                "measured": r["onset_measured"],
                "verdict": "ok" if dev <= EXPONENT_TOL else "off",
            }
        )
        if r["late_predicted"] is not None:
            late = r["late_measured"]
            ok = late is not None and abs(late - r["late_predicted"]) <= EXPONENT_TOL
            rows.append(
                {
                    "quantity": f"{name}: exponent after t×",
                    "theory": r["late_predicted"],
                    "measured": late,
                    "verdict": "ok" if ok else "off",
                }
            )
            tc, tm = r["t_cross_predicted"], r["t_cross_measured"]
            ok = tc is not None and tm is not None and abs(tm / tc - 1) <= 0.25
            rows.append(
                {
                    "quantity": f"{name}: crossover t× (slope 3)",
                    "theory": tc,
                    "measured": tm,
                    "verdict": "ok" if ok else "off",
                }
            )
    for kind in PREDICTIONS:
        if f"phase_agreement_{kind}" not in summary:
            continue
        near = summary[f"phase_disagreements_next_to_boundary_{kind}"]
        rows.append(
            {
                "quantity": f"phase diagram ({kind}): fraction of cells agreeing",
                "theory": 1.0,
                "measured": summary[f"phase_agreement_{kind}"],
                "verdict": "disagreements next to boundary" if near else "some far from boundary",
            }
        )
    return rows


if __name__ == "__main__":
    from quartic.harness.cli import main

    raise SystemExit(main(["run", "ablation_ladder", *sys.argv[1:]]))
