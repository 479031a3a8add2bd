"""The ablation ladder measured: each rung's onset exponent on the quadratic and curved families,
t× of the leak rung, and the (leak, coupling) phase diagram of the window of slope 4.

The measurements behind ``experiments/ablation_ladder.py`` (docs/ladder.md), built on
:mod:`quartic.studies.ladder`. Each takes the experiment's ``config`` (any object with its fields:
``n, d, coupling, leak, tail, seed, curvature, quartic, points_per_decade, tol, min_decades`` and
the ``phase_*`` settings) and returns a JSON-able dict (NaN and inf written as ``None``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet

from quartic.core import dynamics, fitting, measure, theory
from quartic.core.measure import json_number
from quartic.core.problems import QuadraticSpec, make_curved, make_quadratic
from quartic.core.subspace import lambda_max
from quartic.studies import ladder


def _spec(config) -> QuadraticSpec:
    return QuadraticSpec(n=config.n, d=config.d, coupling=config.coupling)


def _grid(config, lo: float, hi: float) -> np.ndarray:
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
            t_cross_predicted=json_number(t_cross),
            t_cross_measured=json_number(
                measure.crossing_time(
                    t, slope, (onset_pred + late_pred) / 2, scale="log_t", rising=True
                )
            ),
            window_predicted=[json_number(win.lo), json_number(win.hi)],
            window_next_order=[json_number(nxt.lo), json_number(nxt.hi)],
            window_measured=[json_number(meas.lo), json_number(meas.hi)],
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


def ladder_quadratic(config) -> dict:
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


def ladder_curved(config) -> dict:
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


def aic_crossover(config) -> dict:
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


def phase_seed(config, seed: int) -> dict:
    leaks = np.geomspace(*config.phase_leaks, config.phase_num)
    couplings = np.geomspace(*config.phase_couplings, config.phase_num)
    cells = ladder.phase_cells(
        jax.random.PRNGKey(seed), _spec(config), leaks, couplings, config.tol
    )
    shape = (len(leaks), len(couplings))

    def grid(f):
        return [
            [json_number(f(cells[i * shape[1] + j])) for j in range(shape[1])]
            for i in range(shape[0])
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


def grid_array(rows) -> np.ndarray:
    """A saved grid (None = no window) as floats with -inf for None."""
    return np.array([[-np.inf if v is None else v for v in row] for row in rows], float)


#: The three predictions of the window, most refined first (quartic.studies.ladder).
PREDICTIONS = ("taylor", "next_order", "leading")


def phase_summary(phase: dict, config) -> dict:
    mw = grid_array(phase["measured_width"])
    out = {
        kind: ladder.agreement(mw, grid_array(phase[f"{kind}_width"]), config.min_decades)
        for kind in PREDICTIONS
    }
    # edge errors (decades) where both windows exist; the left edge at the grid's start is exact
    for kind in ("taylor", "next_order"):
        pw = grid_array(phase[f"{kind}_width"])
        both = np.isfinite(mw) & np.isfinite(pw) & (mw > 0) & (pw > 0)
        for edge in ("lo", "hi"):
            m, p = grid_array(phase[f"measured_{edge}"]), grid_array(phase[f"{kind}_{edge}"])
            err = np.abs(np.log10(m[both] / p[both])) if both.any() else np.array([np.nan])
            out[kind][f"median_{edge}_error_decades"] = json_number(np.median(err))
            out[kind][f"max_{edge}_error_decades"] = json_number(np.max(err))
    return out


# ----------------------------------------------------------------------------------------------
# The sweep's results, summarised


def metric_rows(res: dict) -> list[dict]:
    """One row per record of every rung of both families (``res``: unit name -> result)."""
    metrics = []
    for fam in ("ladder_quadratic", "ladder_curved"):
        for name, r in res.get(fam, {}).get("rungs", {}).items():
            for t, du, s in zip(r["t"], r["delta_u"], r["slope"], strict=True):
                metrics.append({"family": fam[7:], "rung": name, "t": t, "delta_u": du, "slope": s})
    return metrics


def summarise(res: dict, failed: int, config, exponent_tol: float) -> dict:
    """Per-rung rows of both families, the largest exponent errors (the quadratic family's against
    ``exponent_tol``), t× from check_aic, and the phase agreement per seed and overall."""
    summary: dict = {"n_failed": failed, "tol": config.tol, "min_decades": config.min_decades}
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
    summary["quadratic_max_exponent_error"] = json_number(max(devs)) if devs else None
    summary["quadratic_ladder_ok"] = bool(devs) and max(devs) <= exponent_tol
    curved = summary.get("curved", {})
    cdev = [
        abs(r["onset_measured"] - r["onset_predicted"])
        for r in curved.values()
        if r["onset_predicted"] is not None
    ]
    summary["curved_max_exponent_error"] = json_number(max(cdev)) if cdev else None
    if "check_aic" in res:
        summary["check_aic"] = res["check_aic"]

    phases = [res[f"phase_seed{s}"] for s in config.phase_seeds if f"phase_seed{s}" in res]
    per_seed = {str(p["seed"]): phase_summary(p, config) for p in phases}
    summary["phase"] = per_seed
    if per_seed:
        tot = sum(v["taylor"]["num_cells"] for v in per_seed.values())
        for kind in PREDICTIONS:
            agree = sum(v[kind]["fraction_agree"] * v[kind]["num_cells"] for v in per_seed.values())
            summary[f"phase_agreement_{kind}"] = agree / tot
            summary[f"phase_disagreements_next_to_boundary_{kind}"] = all(
                v[kind]["all_disagreements_next_to_boundary"] for v in per_seed.values()
            )
    return summary
