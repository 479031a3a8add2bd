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
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet

from quartic.core import dynamics, fitting, measure, theory
from quartic.core.problems import QuadraticSpec, make_curved, make_quadratic
from quartic.core.subspace import lambda_max
from quartic.harness import plotting
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic, write_jsonl_atomic
from quartic.studies import ladder

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


def _num(x) -> float | None:
    """JSON-safe number: None for NaN/inf (a missing window, an undefined crossing)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _spec(config: Config) -> QuadraticSpec:
    return QuadraticSpec(n=config.n, d=config.d, coupling=config.coupling)


def _grid(config: Config, lo: float, hi: float) -> np.ndarray:
    return np.geomspace(lo, hi, int(round(math.log10(hi / lo) * config.points_per_decade)) + 1)


def _rung(name, onset_pred, late_pred, t, du, coeffs, t_cross, lam, config, floor=None) -> dict:
    """Measured exponents, crossover and window of one rung, next to their predictions."""
    t, du, coeffs = np.asarray(t), np.asarray(du), np.asarray(coeffs)
    slope = fitting.local_slope(t, du)
    out = {
        "name": name,
        "onset_predicted": onset_pred,
        "late_predicted": late_pred,
        "lambda_max": lam,
        "taylor": coeffs.tolist(),
        "t": t.tolist(),
        "delta_u": du.tolist(),
        "slope": np.nan_to_num(slope, nan=0.0).tolist(),
    }
    if onset_pred is None:  # Δu ≡ 0: no exponent, compare with the rounding floor
        out.update(max_abs_delta_u=float(np.max(np.abs(du))), machine_bound=float(floor))
        out["onset_measured"] = None
        return out
    lo, hi = ladder.onset_exponent_window(t_cross if late_pred else 0.0, lam)
    keep = (t >= lo) & (t <= hi)
    fit = fitting.fit_exponent(t[keep], du[keep])
    out.update(onset_window=[lo, hi], onset_measured=fit.exponent, onset_stderr=fit.stderr)
    if late_pred is not None:
        win = ladder.taylor_window(coeffs, t, config.tol)
        nxt = ladder.next_order_window(coeffs, t, config.tol)
        meas = ladder.measured_window(t, du, config.tol)
        out.update(
            t_cross_predicted=_num(t_cross),
            t_cross_measured=_num(
                measure.crossing_time(
                    t, slope, (onset_pred + late_pred) / 2, scale="log_t", rising=True
                )
            ),
            window_predicted=[_num(win.lo), _num(win.hi)],
            window_next_order=[_num(nxt.lo), _num(nxt.hi)],
            window_measured=[_num(meas.lo), _num(meas.hi)],
        )
        if win.width >= 0.5:
            keep = (t >= win.lo) & (t <= win.hi)
            out["late_measured"] = fitting.fit_exponent(t[keep], du[keep]).exponent
            out["late_max_slope_dev"] = float(np.max(np.abs(slope[keep] - late_pred)))
        else:
            out["late_measured"] = None
    return out


def _taylor_onset_order(prob, onset) -> int | None:
    """The exact onset order from the Taylor coefficients, above their rounding floor."""
    base = getattr(prob, "base", prob)
    derivs = onset.flow_derivatives
    if hasattr(prob, "phi"):  # what F weighs is φ(θ(t)): its Taylor series along the flow
        _, series = jet.jet(prob.phi, (prob.theta_star,), (list(derivs),))
        derivs = jnp.stack(series)
    fact = np.array([math.factorial(k) for k in range(1, derivs.shape[0] + 1)], float)
    floor = ladder.taylor_rounding_floor(
        np.asarray(derivs) / fact[:, None],
        lambda v: jnp.sqrt(2 * base.delta_u(v)),
        float(base.fisher_values.max()),
    )
    return ladder.onset_from_coefficients(onset.coefficients, floor)


@jax.jit
def _quadratic_rung(prob, x):
    return ladder.quadratic_curves(prob, x, 6)


@jax.jit
def _curved_rung(prob, t):
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star)
    traj = dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, t, observe)
    onset = theory.taylor_onset(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, order=6)
    return traj, onset


def ladder_quadratic(config: Config) -> dict:
    """The rungs on the quadratic family (exact flow); predictions from ``theory.LADDER``."""
    key = jax.random.PRNGKey(config.seed)
    specs = ladder.ladder_specs(_spec(config), config.leak, config.tail)
    x = _grid(config, 1e-10, 1.0)
    rungs = {}
    for name, onset_pred, late_pred in ladder.RUNGS:
        prob, _ = make_quadratic(key, specs[name])
        t, du, onset, lam, t_cross = _quadratic_rung(prob, x)
        t, du, coeffs = np.asarray(t), np.asarray(du), np.asarray(onset.coefficients)
        # rounding floor of ½ δᵀFδ when Pδ = 0 exactly: n (ε ‖δ‖)² λ₁, ‖δ‖ ≤ t ‖g‖
        g_norm, lam1 = float(jnp.linalg.norm(prob.ft_grad)), float(prob.fisher_values.max())
        floor = config.n * (np.finfo(float).eps * t * g_norm) ** 2 * lam1
        rec = _rung(name, onset_pred, late_pred, t, du, coeffs, float(t_cross), float(lam),
                    config, floor[-1])  # fmt: skip
        rec["rounding_floor"] = floor.tolist()
        rec["taylor_onset"] = _taylor_onset_order(prob, onset)
        rungs[name] = rec
    return {"family": "quadratic", "rungs": rungs}


def ladder_curved(config: Config) -> dict:
    """The same rungs on the curved family (RK4 flow); the prediction is the exact Taylor-mode
    onset order (the quadratic ladder's value is reported beside it)."""
    key = jax.random.PRNGKey(config.seed)
    specs = ladder.ladder_specs(_spec(config), config.leak, config.tail)
    x = _grid(config, 1e-10, 1.0)
    rungs = {}
    for name, ladder_onset, _ in ladder.RUNGS:
        prob, _ = make_curved(key, specs[name], config.curvature, config.quartic)
        lam = float(lambda_max(prob.base.ft_hessian, method="dense").value)
        t = x / lam
        traj, onset = _curved_rung(prob, t)
        du = np.asarray(traj.checked().observables["delta_u"])
        coeffs = np.asarray(onset.coefficients)
        order = _taylor_onset_order(prob, onset)
        late = theory.ORDER if order is not None and order < theory.ORDER else None
        t_cross = (coeffs[order - 1] / coeffs[3]) ** (1 / (4 - order)) if late else 0.0
        rec = _rung(name, order, late, t, du, coeffs, t_cross, lam, config, floor=0.0)
        rec["ladder_predicted"] = ladder_onset  # what the quadratic theory says
        rungs[name] = rec
    return {"family": "curved", "rungs": rungs}


def aic_crossover(config: Config) -> dict:
    from quartic.core.aic import check_aic

    spec = ladder.ladder_specs(_spec(config), config.leak, config.tail)["first_order_leak"]
    prob, _ = make_quadratic(jax.random.PRNGKey(config.seed), spec)
    rep = check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=config.d)
    return {
        "crossover_time": rep.crossover_time,
        "crossover_time_ladder": float(ladder.crossover_time(prob)),
        "ortho_ratio": rep.ortho_ratio,
        "gamma_fisher": rep.gamma_fisher,
        "lambda_max_ft": rep.lambda_max_ft,
    }


def phase_seed(config: Config, seed: int) -> dict:
    leaks = np.geomspace(*config.phase_leaks, config.phase_num)
    couplings = np.geomspace(*config.phase_couplings, config.phase_num)
    cells = ladder.phase_cells(
        jax.random.PRNGKey(seed), _spec(config), leaks, couplings, config.tol
    )
    shape = (len(leaks), len(couplings))

    def grid(f):
        return [
            [_num(f(cells[i * shape[1] + j])) for j in range(shape[1])] for i in range(shape[0])
        ]

    return {
        "seed": seed,
        "leaks": leaks.tolist(),
        "couplings": couplings.tolist(),
        "measured_width": grid(lambda c: c.measured.width),
        "taylor_width": grid(lambda c: c.taylor.width),
        "next_order_width": grid(lambda c: c.next_order.width),
        "leading_width": grid(lambda c: c.leading.width),
        "measured_lo": grid(lambda c: c.measured.lo),
        "measured_hi": grid(lambda c: c.measured.hi),
        "taylor_lo": grid(lambda c: c.taylor.lo),
        "taylor_hi": grid(lambda c: c.taylor.hi),
        "next_order_lo": grid(lambda c: c.next_order.lo),
        "next_order_hi": grid(lambda c: c.next_order.hi),
        "t_cross": grid(lambda c: c.t_cross),
        "lambda_max": grid(lambda c: c.lam_max),
    }


def _arr(rows) -> np.ndarray:
    """A saved grid (None = no window) as floats with -inf for None."""
    return np.array([[-np.inf if v is None else v for v in row] for row in rows], float)


#: The three predictions of the window, most refined first (quartic.studies.ladder).
PREDICTIONS = ("taylor", "next_order", "leading")


def _phase_summary(phase: dict, config: Config) -> dict:
    mw = _arr(phase["measured_width"])
    out = {
        kind: ladder.agreement(mw, _arr(phase[f"{kind}_width"]), config.min_decades)
        for kind in PREDICTIONS
    }
    # edge errors (decades) where both windows exist; the left edge at the grid's start is exact
    for kind in ("taylor", "next_order"):
        pw = _arr(phase[f"{kind}_width"])
        both = np.isfinite(mw) & np.isfinite(pw) & (mw > 0) & (pw > 0)
        for edge in ("lo", "hi"):
            m, p = _arr(phase[f"measured_{edge}"]), _arr(phase[f"{kind}_{edge}"])
            err = np.abs(np.log10(m[both] / p[both])) if both.any() else np.array([np.nan])
            out[kind][f"median_{edge}_error_decades"] = _num(np.median(err))
            out[kind][f"max_{edge}_error_decades"] = _num(np.max(err))
    return out


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

    metrics = []
    for fam in ("ladder_quadratic", "ladder_curved"):
        for name, r in res.get(fam, {}).get("rungs", {}).items():
            for t, du, s in zip(r["t"], r["delta_u"], r["slope"], strict=True):
                metrics.append({"family": fam[7:], "rung": name, "t": t, "delta_u": du, "slope": s})
    write_jsonl_atomic(run_dir.metrics_path, metrics)

    summary: dict = {"n_failed": sweep.failed, "tol": config.tol, "min_decades": config.min_decades}
    for fam in ("ladder_quadratic", "ladder_curved"):
        if fam not in res:
            continue
        rows = {}
        for name, r in res[fam]["rungs"].items():
            row = {k: r.get(k) for k in (
                "onset_predicted", "onset_measured", "late_predicted", "late_measured",
                "t_cross_predicted", "t_cross_measured", "t_cross_taylor", "window_predicted",
                "window_measured", "late_max_slope_dev", "max_abs_delta_u", "machine_bound",
                "ladder_predicted", "taylor_onset", "lambda_max", "onset_window",
            )}  # fmt: skip
            rows[name] = row
        summary[fam[7:]] = rows
    quad = summary.get("quadratic", {})
    devs = []
    for r in quad.values():
        if r["onset_predicted"] is None:
            devs.append(0.0 if r["max_abs_delta_u"] <= r["machine_bound"] else math.inf)
            continue
        devs.append(abs(r["onset_measured"] - r["onset_predicted"]))
        if r["late_predicted"] is not None:
            late = r["late_measured"]
            devs.append(math.inf if late is None else abs(late - r["late_predicted"]))
    summary["quadratic_max_exponent_error"] = _num(max(devs)) if devs else None
    summary["quadratic_ladder_ok"] = bool(devs) and max(devs) <= EXPONENT_TOL
    curved = summary.get("curved", {})
    cdev = [
        abs(r["onset_measured"] - r["onset_predicted"])
        for r in curved.values()
        if r["onset_predicted"] is not None
    ]
    summary["curved_max_exponent_error"] = _num(max(cdev)) if cdev else None
    if "check_aic" in res:
        summary["check_aic"] = res["check_aic"]

    phases = [res[f"phase_seed{s}"] for s in config.phase_seeds if f"phase_seed{s}" in res]
    per_seed = {str(p["seed"]): _phase_summary(p, config) for p in phases}
    summary["phase"] = per_seed
    if per_seed:
        tot = sum(v["taylor"]["num_cells"] for v in per_seed.values())
        for kind in PREDICTIONS:
            agree = sum(v[kind]["fraction_agree"] * v[kind]["num_cells"] for v in per_seed.values())
            summary[f"phase_agreement_{kind}"] = agree / tot
            summary[f"phase_disagreements_next_to_boundary_{kind}"] = all(
                v[kind]["all_disagreements_next_to_boundary"] for v in per_seed.values()
            )
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
    """A slope guide through (x0, y0), drawn over `decades` to the right."""
    xs = np.array([x0, x0 * 10**decades])
    ax.plot(xs, y0 * (xs / x0) ** order, color="k", lw=1, ls=":", **kw)
    ax.annotate(f"$t^{order}$", (xs[1], y0 * 10 ** (decades * order)), fontsize=8)


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
            _arr(p[f"{k}_width"]) for k in ("measured", "taylor", "next_order", "leading")
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
            mw, pw = _arr(p["measured_width"]).ravel(), _arr(p[f"{kind}_width"]).ravel()
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
