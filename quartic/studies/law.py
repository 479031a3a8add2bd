"""Measuring the quartic law on a model family: simulate, fit, compare with every prediction.

Each ``measure_*`` function takes one problem and a grid, simulates (exact path where one exists,
the RK4 flow or optimiser otherwise), and returns plain arrays and numbers: the measured Δu, its
local slope and fitted exponent, and the theory's values beside them (both readings of the
constant, the second-order forecast, the exact Taylor-mode coefficient). Experiments, notebooks
and tests share them; they are jit-compiled once per shape.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import aic, dynamics, fitting, measure, theory
from quartic.core.problems import CurvedProblem, QuadraticProblem
from quartic.core.subspace import lambda_max


def _tolist(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


@partial(jax.jit, static_argnames=("rank",))
def _quadratic_arrays(prob: QuadraticProblem, ts, steps, lr, rank: int):
    """Exact flow, RK4 flow and simulated GD on one quadratic problem (one compiled program)."""
    exact = prob.delta_u(prob.flow(ts))
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star, delta_u_fn=prob.delta_u)
    rk4 = dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, ts, observe)
    gd = dynamics.gradient_descent(prob.ft_loss_fn, prob.theta_star, lr, steps, observe)
    gd_exact = prob.delta_u(prob.gd(steps, lr))
    # the ratio-expansion vectors in F's eigenbasis (M = the top `rank` eigenvectors)
    w, v = prob.fisher_values, prob.fisher_vectors
    order = jnp.argsort(-w)[:rank]
    basis, lam = v[:, order], w[order]
    hg = prob.ft_hessian @ prob.ft_grad
    h2g = prob.ft_hessian @ hg
    h3g = prob.ft_hessian @ h2g
    a, b, c = (measure.fisher_coords(lam, basis, v) for v in (hg, h2g, h3g))
    return {
        "exact": exact,
        "rk4": rk4.observables["delta_u"],
        "rk4_finite": rk4.finite,
        "gd": gd.observables["delta_u"],
        "gd_exact": gd_exact,
        "s1": theory.next_order_slope(a, b),
        "s2": theory.next_order_curvature(a, b, c),
        "lambda_max_ft": lambda_max(prob.ft_hessian, method="dense").value,
    }


def measure_quadratic(
    prob: QuadraticProblem,
    rank: int,
    t_lambda: tuple[float, float] = (1e-5, 3.0),
    num_times: int = 60,
    fit_window: tuple[float, float] = (1e-4, 1e-2),
    gd_steps: int = 10_000,
    gd_lr_lambda: float = 1e-6,
) -> dict:
    """The law on one quadratic problem, for gradient flow and gradient descent.

    Times are in units of ``1/λ_max(H)``: ``t·λ_max ∈ t_lambda``; the exponent is fitted on
    ``fit_window`` (also in ``t·λ_max``), inside the expansion's validity. Gradient descent uses
    ``lr = gd_lr_lambda / λ_max`` so ``t = lr·k`` spans the same range.
    """
    report = aic.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=rank)
    lam = report.lambda_max_ft
    ts = dynamics.log_times(t_lambda[0] / lam, t_lambda[1] / lam, num_times)
    lr = gd_lr_lambda / lam
    steps = dynamics.log_steps(gd_steps, num_times)
    arr = jax.device_get(_quadratic_arrays(prob, ts, steps, lr, rank))
    exact, rk4 = np.asarray(arr["exact"]), np.asarray(arr["rk4"])
    c4 = report.quartic_coefficient
    win = (fit_window[0] / lam, fit_window[1] / lam)
    fit = fitting.fit_exponent(ts, exact, win)
    fit_rk4 = fitting.fit_exponent(ts, rk4, win)
    t_gd = lr * steps
    fit_gd = fitting.fit_exponent(t_gd, np.asarray(arr["gd"]), win)
    ratio = fitting.ratio_to_prediction(ts, exact, c4, theory.ORDER)
    in_win = (ts >= win[0]) & (ts <= win[1])
    lin = float(arr["s1"]) * ts
    next_order_rel = np.abs((ratio - 1) / lin - 1)
    return {
        "aic": report.to_dict(),
        "t": ts.tolist(),
        "t_lambda": (ts * lam).tolist(),
        "delta_u_exact": exact.tolist(),
        "delta_u_rk4": rk4.tolist(),
        "rk4_rel_error": float(np.max(np.abs(rk4 / exact - 1))),
        "local_slope": fitting.local_slope(ts, exact).tolist(),
        "ratio": ratio.tolist(),
        "quartic_prediction": (c4 * ts**theory.ORDER).tolist(),
        "lower_bound": (report.lower_bound_coefficient * ts**theory.ORDER).tolist(),
        "forecast": np.asarray(report.forecast.flow(ts)).tolist(),
        "next_order_slope": float(arr["s1"]),
        "next_order_curvature": float(arr["s2"]),
        "next_order_max_rel_error": float(next_order_rel[in_win].max()),
        "exponent_flow": fit.exponent,
        "exponent_flow_rk4": fit_rk4.exponent,
        "exponent_gd": fit_gd.exponent,
        "max_slope_dev_in_window": float(
            np.abs(fitting.local_slope(ts, exact)[in_win] - theory.ORDER).max()
        ),
        "gd_lr": lr,
        "gd_steps": steps.tolist(),
        "delta_u_gd": np.asarray(arr["gd"]).tolist(),
        "delta_u_gd_exact": np.asarray(arr["gd_exact"]).tolist(),
        "gd_forecast": np.asarray(report.forecast.gd(steps, lr)).tolist(),
        # simulated GD iterates vs the closed form, from k = 10 (at k = 1, Pδ = −lr·Pg = 0 and Δu is
        # pure rounding on both sides)
        "gd_rel_error": float(
            np.max(np.abs(np.asarray(arr["gd"]) / arr["gd_exact"] - 1)[steps >= 10])
        ),
        "quartic_coefficient": c4,
        "lower_bound_coefficient": report.lower_bound_coefficient,
        "lambda_max_ft": lam,
    }


def measure_ladder(prob: QuadraticProblem, case: str, t_lambda=(1e-5, 1e-3), num=20) -> dict:
    """One rung of the onset ladder: the measured exponent next to ``theory.LADDER[case]``."""
    lam = float(lambda_max(prob.ft_hessian, method="dense").value)
    ts = dynamics.log_times(t_lambda[0] / lam, t_lambda[1] / lam, num)
    du = np.asarray(prob.delta_u(prob.flow(ts)))
    predicted = theory.LADDER[case]
    out = {"case": case, "predicted": predicted, "t": ts.tolist(), "delta_u": du.tolist()}
    if predicted is None:
        out["max_abs_delta_u"] = float(np.abs(du).max())
        out["measured"] = None
    else:
        out["measured"] = fitting.fit_exponent(ts, du).exponent
        out["local_slope"] = fitting.local_slope(ts, du).tolist()
    return out


@jax.jit
def _curved_arrays(prob: CurvedProblem, basis, ts):
    observe = dynamics.make_observer(
        prob.align_loss_fn, prob.theta_star, basis, curvature_fn=prob.fisher_at
    )
    return dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, ts, observe)


def measure_curved(prob: CurvedProblem, basis, t_lambda=(1e-6, 1.0), num_times=50) -> dict:
    """The curved family: simulated Δu against the exact Taylor-mode c₄ and the paper's γ_F²/8,
    and the rotation of M(θ) against the Davis–Kahan bound."""
    d = basis.shape[1]
    report = aic.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=d)
    lam = report.lambda_max_ft
    ts = dynamics.log_times(t_lambda[0] / lam, t_lambda[1] / lam, num_times)
    traj = _curved_arrays(prob, basis, ts).checked()
    du = np.asarray(traj.observables["delta_u"])
    onset = theory.taylor_onset(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, order=6)
    order, c4 = onset.onset()
    slope = fitting.local_slope(ts, du)
    window = fitting.slope_window(ts, slope, theory.ORDER, 0.1)
    w = np.sort(np.asarray(prob.base.fisher_values))[::-1]
    gap = float(w[d - 1] - w[d])
    dist = np.asarray(traj.observables["delta_norm"])
    sin = np.asarray(traj.observables["sin_angle"])
    dk_bound = 2 * float(prob.fisher_lipschitz()) * dist / gap
    return {
        "aic": report.to_dict(),
        "t": ts.tolist(),
        "t_lambda": (ts * lam).tolist(),
        "delta_u": du.tolist(),
        "local_slope": slope.tolist(),
        "window": window,
        "window_decades": None if window is None else float(np.log10(window[1] / window[0])),
        "taylor_coefficients": np.asarray(onset.coefficients).tolist(),
        "onset_order": order,
        "c4": c4,
        "paper_coefficient": report.quartic_coefficient,
        "c4_over_paper": c4 / report.quartic_coefficient,
        "ratio_to_c4": (du / (c4 * ts**4)).tolist(),
        "ratio_to_c4_smallest_t": float(du[0] / (c4 * ts[0] ** 4)),
        "sin_angle": sin.tolist(),
        "delta_norm": dist.tolist(),
        "davis_kahan_bound": dk_bound.tolist(),
        "davis_kahan_max_ratio": float(np.max(sin / dk_bound)),
    }
