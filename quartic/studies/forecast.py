"""When does the alignment loss cross a threshold? Forecasts from θ*, with monitoring, checked.

Four predictions of the time ``t_c`` at which ``Δu(t) = L_A(θ(t)) − L_A(θ*)`` first reaches a
threshold along full-batch fine-tuning (gradient descent, step η, time ``t = ηk``):

- **quartic** (Cor 6.3, reading (a)): ``γ_F² t⁴ / 8 = threshold`` from θ* quantities;
- **second order** (docs/theory.md §3, ours): the first root of ``theory.Forecast.gd`` at θ*;
- **Taylor** (ours, optional): the exact Taylor polynomial ``Σ_{k≤K} c_k t^k`` of u(t) at θ*
  (:func:`quartic.core.theory.taylor_onset`), which keeps the alignment map's curvature that γ_F and
  the second-order forecast miss;
- **monitored** (ours): every ``check_every`` steps, the second-order forecast is re-made at the
  current θ_k (``∇L_A(θ_k)``, ``H_A(θ_k)``, ``g_k``, ``H_k g_k``: 3 HVPs and 2 gradients per check)
  and ``Δu(θ_k) + Forecast_k(τ) = threshold`` gives the remaining time τ;
- **peer** (baseline): alignment-risk 1.14.1's published closed form (:func:`peer_forecast`).

:func:`simulate_with_checks` runs fine-tuning and the checks in one ``lax.scan``;
:func:`forecast_crossing` does everything for any flat ``(align_loss_fn, ft_loss_fn, θ*)``, so
the same comparison runs on the transformer tasks; :func:`diagnose_lanczos` gives the θ*
quantities without a dense matrix (the transformer family of ``experiments/forecast.py``).
``docs/forecast.md`` has the definitions and the measured errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quartic.core import aic, curvature, measure, subspace, theory
from quartic.core.errors import QuarticError

# ----------------------------------------------------------------------------------------------
# The peer's published formula (baseline; not ours)

#: alignment-risk's λ_min: this quantile of the clipped top eigenvalues (its "stable curvature floor").
PEER_QUANTILE = 0.1


class PeerForecast(NamedTuple):
    """alignment-risk's forecast arrays over ``steps = 0…max_steps`` and its collapse step."""

    steps: np.ndarray
    drift: np.ndarray
    estimate: np.ndarray
    collapse_step: int | None
    lambda_min: float


def peer_lambda_min(eigenvalues) -> float:
    """alignment-risk's ``λ_min = quantile_0.1(max(λ_i, 0))`` over the top-d eigenvalues, with its
    ``interpolation="lower"`` (the largest eigenvalue at or below the quantile; pinned to the
    package by ``tests/data/peer_forecast.json``)."""
    values = np.maximum(np.asarray(eigenvalues, float), 0.0)
    if values.size == 0:
        return 0.0
    return float(np.quantile(values, PEER_QUANTILE, method="lower"))


def peer_inputs(eigenvalues, basis, g, hg) -> tuple[float, float]:
    """alignment-risk's per-step-free ``(γ̂, ε̂)``, both Fisher-weighted:
    ``γ̂ = ‖Λ^{1/2} Bᵀ Hg‖ (= γ_F)`` and ``ε̂ = ‖Λ^{1/2} Bᵀ g‖``."""
    sq = np.sqrt(np.maximum(np.asarray(eigenvalues, float), 0.0))
    b = np.asarray(basis, float)
    return (
        float(np.linalg.norm(sq * (b.T @ np.asarray(hg, float)))),
        float(np.linalg.norm(sq * (b.T @ np.asarray(g, float)))),
    )


def peer_forecast(
    gamma_hat: float,
    eps_hat: float,
    eigenvalues,
    lr: float,
    threshold: float,
    max_steps: int,
    step_size: float = 1.0,
) -> PeerForecast:
    """**alignment-risk 1.14.1's published forecast**, reproduced as a baseline (its MATH_SPEC §7).

    Scales to steps, ``ε = η ε̂``, ``γ = η² γ̂``; ``t = step · step_size``;
    ``drift(t) = max(γ t²/2 − ε t, 0)``; ``estimate = ½ λ_min drift²`` with ``λ_min`` the 10 %
    quantile of the top eigenvalues; the collapse step is the first step with
    ``estimate ≥ threshold``. Since γ̂ is already Fisher-weighted, multiplying by λ_min counts
    the Fisher twice: with ``ε̂ = 0`` the estimate is ``λ_min · γ_F² t⁴/8``, λ_min times the exact
    leading term (docs/theory.md §3). This is the peer's formula, not quartic's.
    """
    lam = peer_lambda_min(eigenvalues)
    eps, gamma = lr * eps_hat, lr**2 * gamma_hat
    steps = np.arange(max_steps + 1)
    t = steps.astype(float) * step_size
    drift = np.maximum(0.5 * gamma * t**2 - eps * t, 0.0)
    estimate = 0.5 * lam * drift**2
    hit = np.flatnonzero(estimate >= threshold)
    return PeerForecast(steps, drift, estimate, int(hit[0]) if hit.size else None, lam)


def peer_estimate(t, gamma_fisher: float, eps_fisher: float, lambda_min: float):
    """The same estimate in gradient-flow time ``t = ηk``: ``½ λ_min max(γ_F t²/2 − ε_F t, 0)²``."""
    t = np.asarray(t, float)
    return 0.5 * lambda_min * np.maximum(0.5 * gamma_fisher * t**2 - eps_fisher * t, 0.0) ** 2


# ----------------------------------------------------------------------------------------------
# What a forecast needs at a point (jit- and vmap-compatible)


class ForecastInputs(NamedTuple):
    """What a one-shot forecast needs from a point θ.

    ``forecast`` (:class:`quartic.core.theory.Forecast` at θ), ``eigenvalues [d]`` (top of the
    alignment curvature), ``gamma_fisher = ‖F^{1/2}PHg‖``, ``eps_fisher = ‖F^{1/2}Pg‖``,
    ``ortho_norm = ‖Pg‖``, ``lambda_max_ft`` (top eigenvalue of H_FT).
    """

    forecast: theory.Forecast
    eigenvalues: jax.Array
    gamma_fisher: jax.Array
    eps_fisher: jax.Array
    ortho_norm: jax.Array
    lambda_max_ft: jax.Array

    @classmethod
    def from_report(cls, report: aic.AICReport, g=None) -> ForecastInputs:
        """From :func:`quartic.check_aic` (any size, dense or Lanczos). ``eps_fisher`` needs ``g``
        (``∇L_FT(θ*)``); without it the report's ``ortho_norm`` weighted by λ_1 bounds it."""
        lam = jnp.asarray(report.eigenvalues[: report.rank])
        if g is not None:
            eps = measure.fisher_norm(lam, report.basis, g)
        else:
            eps = jnp.sqrt(jnp.max(lam)) * report.ortho_norm
        return cls(
            report.forecast,
            lam,
            jnp.asarray(report.gamma_fisher),
            eps,
            jnp.asarray(report.ortho_norm),
            jnp.asarray(report.lambda_max_ft),
        )


def forecast_at(align_loss_fn: Callable, ft_loss_fn: Callable, theta: jax.Array) -> theory.Forecast:
    """The second-order forecast of ``L_A(θ + δ₂) − L_A(θ)`` made at θ (any θ, not only θ*):
    3 HVPs (``Hg``, ``H_A g``, ``H_A Hg``) and 2 gradients."""
    grad_a = jax.grad(align_loss_fn)(theta)
    g = jax.grad(ft_loss_fn)(theta)
    hg = curvature.hvp(ft_loss_fn, theta, g)
    return theory.Forecast.from_vectors(grad_a, curvature.hvp_fn(align_loss_fn, theta), g, hg)


def _inputs(grad_a, align_mv, g, hg, lam, basis, lambda_max_ft) -> ForecastInputs:
    """:class:`ForecastInputs` from the vectors at θ and M's ``basis`` and eigenvalues ``lam``."""
    fc = theory.Forecast.from_vectors(grad_a, align_mv, g, hg)
    return ForecastInputs(
        fc,
        lam,
        measure.fisher_norm(lam, basis, hg),
        measure.fisher_norm(lam, basis, g),
        jnp.linalg.norm(basis.T @ g),
        lambda_max_ft,
    )


def diagnose_dense(
    align_loss_fn: Callable, ft_loss_fn: Callable, theta: jax.Array, rank: int
) -> ForecastInputs:
    """:class:`ForecastInputs` at θ from the dense Hessians (small n; jit/vmap-compatible)."""
    n = theta.shape[0]
    if not 1 <= rank < n:
        raise QuarticError(f"rank must satisfy 1 <= rank < n={n}, got {rank}")
    h_a = curvature.dense_hessian(align_loss_fn, theta)
    h_ft = curvature.dense_hessian(ft_loss_fn, theta)
    w, v = jnp.linalg.eigh(curvature.symmetrize(h_a))
    lam, basis = w[::-1][:rank], v[:, ::-1][:, :rank]
    g = jax.grad(ft_loss_fn)(theta)
    grad_a = jax.grad(align_loss_fn)(theta)
    lam_ft = subspace.lambda_max(curvature.symmetrize(h_ft), method="dense").value
    return _inputs(grad_a, lambda x: h_a @ x, g, h_ft @ g, lam, basis, lam_ft)


def diagnose_lanczos(
    align_loss_fn: Callable,
    ft_loss_fn: Callable,
    theta: jax.Array,
    rank: int,
    lambda_max_ft,
    num_iters: int | None = None,
) -> ForecastInputs:
    """:class:`ForecastInputs` at θ by Lanczos on the exact Hessian of L_A (any n; jit-compatible):
    M and its eigenvalues from ``num_iters`` HVPs (default ``min(n, 3·rank + 10)``, cold start,
    :func:`quartic.core.subspace.sensitive_subspace`), plus the 3 HVPs of the forecast. ``lambda_max_ft``
    is passed in (the caller needs it first, for the step size)."""
    losses = subspace.Losses(align_loss_fn, ft_loss_fn, theta)
    basis, lam = subspace.sensitive_subspace(losses, rank, num_iters, theta=theta)
    g = jax.grad(ft_loss_fn)(theta)
    grad_a = jax.grad(align_loss_fn)(theta)
    hg = curvature.hvp(ft_loss_fn, theta, g)
    align_mv = curvature.hvp_fn(align_loss_fn, theta)
    return _inputs(grad_a, align_mv, g, hg, lam, basis, jnp.asarray(lambda_max_ft, theta.dtype))


# ----------------------------------------------------------------------------------------------
# Simulation with periodic re-diagnosis


class CheckedRun(NamedTuple):
    """A gradient-descent run with checks.

    ``delta_u [K+1]`` at steps 0…K; at the checks (steps ``check_steps [C]`` = 0, N, 2N, …):
    ``check_delta_u [C]``, ``check_forecasts`` (a :class:`quartic.core.theory.Forecast` of ``[C]``
    arrays, made at θ_k) and, if asked, ``check_taylor [C, K]`` (the Taylor coefficients of
    ``L_A(θ(τ)) − L_A(θ_k)`` along the flow from θ_k); ``finite`` False if the run left the
    finite numbers (then frozen).
    """

    delta_u: jax.Array
    check_steps: jax.Array
    check_delta_u: jax.Array
    check_forecasts: theory.Forecast
    finite: jax.Array
    check_taylor: jax.Array | None = None


def simulate_with_checks(
    align_loss_fn: Callable,
    ft_loss_fn: Callable,
    theta_star: jax.Array,
    lr: float,
    num_checks: int,
    check_every: int,
    delta_u_fn: Callable | None = None,
    taylor_order: int | None = None,
) -> CheckedRun:
    """``num_checks · check_every`` gradient-descent steps of size ``lr`` from θ*; every
    ``check_every`` steps the second-order forecast is re-made at the current θ
    (:func:`forecast_at`), and with ``taylor_order`` also the exact Taylor coefficients
    (:func:`quartic.core.theory.taylor_onset`). One ``lax.scan`` over checks with an inner scan over
    steps; pure and jit/vmap-compatible."""
    if num_checks < 1 or check_every < 1:
        raise QuarticError("num_checks and check_every must be >= 1")
    u_star = align_loss_fn(theta_star)
    du = delta_u_fn or (lambda th: align_loss_fn(th) - u_star)
    grad = jax.grad(ft_loss_fn)

    def one_step(carry, _):
        th, ok = carry
        new = th - lr * grad(th)
        val = du(new)
        ok = ok & jnp.all(jnp.isfinite(new)) & jnp.isfinite(val)
        th = jnp.where(ok, new, th)
        return (th, ok), jnp.where(ok, val, jnp.nan)

    def segment(carry, _):
        th, ok = carry
        fc = forecast_at(align_loss_fn, ft_loss_fn, th)
        here = du(th)
        if taylor_order is None:
            taylor = jnp.zeros((0,), th.dtype)
        else:
            onset = theory.taylor_onset(align_loss_fn, ft_loss_fn, th, order=taylor_order)
            taylor = onset.coefficients
        (th, ok), dus = lax.scan(one_step, (th, ok), None, length=check_every)
        return (th, ok), (fc, here, dus, taylor)

    (_, ok), (fcs, here, dus, taylor) = lax.scan(
        segment, (theta_star, jnp.asarray(True)), None, length=num_checks
    )
    delta_u = jnp.concatenate([du(theta_star)[None], dus.reshape(-1)])
    steps = jnp.arange(num_checks) * check_every
    return CheckedRun(delta_u, steps, here, fcs, ok, None if taylor_order is None else taylor)


# ----------------------------------------------------------------------------------------------
# Crossing times


def _forecast_gd_values(fc: theory.Forecast, lr: float, k):
    """``Forecast.gd`` in numpy, broadcasting over leading axes of the Forecast's fields."""
    s = lr * k
    q = 0.5 * lr**2 * k * (k - 1)
    f = {name: np.asarray(x, float)[..., None] for name, x in fc._asdict().items()}
    return (
        -s * f["ga_g"]
        + q * f["ga_hg"]
        + 0.5 * (s**2 * f["g_ha_g"] - 2 * s * q * f["g_ha_hg"] + q**2 * f["hg_ha_hg"])
    )


def second_order_remaining(
    fc: theory.Forecast, delta_u_now, lr: float, threshold: float, k_max: float, num: int = 4000
) -> np.ndarray:
    """Remaining steps until ``delta_u_now + Forecast.gd(k) ≥ threshold`` (first crossing; ``inf``
    if none up to ``k_max``), for one Forecast or a batch of ``[C]``. Located on a geometric grid
    of ``num`` points in ``[1e-3, k_max]`` steps, then refined by 60 bisections."""
    now = np.atleast_1d(np.asarray(delta_u_now, float))
    fields = {k: np.atleast_1d(np.asarray(v, float)) for k, v in fc._asdict().items()}
    fc = theory.Forecast(**fields)
    grid = np.geomspace(1e-3, k_max, num)
    vals = now[:, None] + _forecast_gd_values(fc, lr, grid[None, :])
    out = np.full(now.shape, math.inf)
    for i in range(now.shape[0]):
        if now[i] >= threshold:
            out[i] = 0.0
            continue
        hit = np.flatnonzero(vals[i] >= threshold)
        if hit.size == 0:
            continue
        j = int(hit[0])
        lo, hi = (grid[j - 1] if j > 0 else 0.0), grid[j]
        one = theory.Forecast(*[np.asarray(x[i]) for x in fc])
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if now[i] + _forecast_gd_values(one, lr, np.asarray([mid]))[0] >= threshold:
                hi = mid
            else:
                lo = mid
        out[i] = hi
    return out


class Predictions(NamedTuple):
    """Predicted crossing times (gradient-flow time ``t = ηk``) and the simulated one."""

    simulated: float
    quartic: float
    second_order: float
    peer: float
    taylor: float  # nan when no Taylor coefficients were given
    monitored: float  # the prediction of the last check at or before (1 − lead)·t_c
    monitored_taylor: float  # the same check, with the Taylor forecast (nan if not recorded)
    monitored_check_time: float
    check_times: np.ndarray  # every check's time …
    check_predictions: np.ndarray  # … and its predicted crossing time (inf: none predicted)
    check_predictions_taylor: np.ndarray | None = None  # … with the Taylor forecast

    def relative_errors(self) -> dict[str, float]:
        """``|t̂ − t_c| / t_c`` for each prediction (inf where none was made), and for the
        monitored one also the error of the remaining time ``|τ̂ − τ| / τ`` at its check."""
        tc = self.simulated
        out = {
            name: abs(getattr(self, name) - tc) / tc
            for name in (
                "quartic",
                "second_order",
                "peer",
                "taylor",
                "monitored",
                "monitored_taylor",
            )
        }
        rem = tc - self.monitored_check_time
        out["monitored_remaining"] = abs(self.monitored - tc) / rem if rem > 0 else math.nan
        out["monitored_taylor_remaining"] = (
            abs(self.monitored_taylor - tc) / rem if rem > 0 else math.nan
        )
        return out


def polynomial_time(coefficients, threshold: float, t_max: float, num: int = 4000) -> float:
    """First ``t ∈ (0, t_max]`` with ``Σ_k c_k t^k ≥ threshold``, ``coefficients = [c1, …, cK]``
    (``inf`` if none): a geometric grid, then 60 bisections."""
    c = np.asarray(coefficients, float)
    powers = np.arange(1, c.shape[0] + 1)
    poly = lambda t: np.sum(c * np.asarray(t, float)[..., None] ** powers, axis=-1)
    grid = np.geomspace(t_max * 1e-8, t_max, num)
    hit = np.flatnonzero(poly(grid) >= threshold)
    if hit.size == 0:
        return math.inf
    j = int(hit[0])
    lo, hi = (grid[j - 1] if j > 0 else 0.0), grid[j]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if poly(mid) >= threshold else (mid, hi)
    return float(hi)


def predictions(
    run: CheckedRun,
    diagnosis: ForecastInputs,
    lr: float,
    threshold: float,
    lead: float = 0.5,
    horizon: float = 20.0,
    taylor_coefficients=None,
) -> Predictions:
    """All predictions of the crossing time for one run (host-side, numpy).

    ``lead``: the monitored forecast is the one made at the last check at or before
    ``(1 − lead)·t_c`` (``lead = 0.5``: with half the time still to go). ``horizon``: forecasts
    are searched up to ``horizon`` times the simulated horizon. ``taylor_coefficients``:
    ``[c1, …, cK]`` of u(t) at θ* (:func:`quartic.core.theory.taylor_onset`) for the Taylor forecast.
    """
    if not 0 < lead <= 1:
        raise QuarticError(f"lead must be in (0, 1], got {lead}")
    du = np.asarray(run.delta_u, float)
    steps = np.arange(du.shape[0])
    k_c = measure.crossing_time(steps, du, threshold)
    t_c = lr * k_c
    k_max = horizon * du.shape[0]
    d0 = jax.tree.map(lambda x: np.asarray(x, float), diagnosis)
    quartic = float(
        theory.quartic_time_to_threshold(theory.quartic_coefficient(d0.gamma_fisher), threshold)
    )
    second = lr * float(second_order_remaining(d0.forecast, 0.0, lr, threshold, k_max)[0])
    peer = peer_forecast(
        float(d0.gamma_fisher),
        float(d0.eps_fisher),
        d0.eigenvalues,
        lr,
        threshold,
        int(k_max),
    )
    t_peer = math.inf if peer.collapse_step is None else lr * peer.collapse_step
    t_taylor = (
        math.nan
        if taylor_coefficients is None
        else polynomial_time(taylor_coefficients, threshold, lr * k_max)
    )
    check_steps = np.asarray(run.check_steps, float)
    remaining = second_order_remaining(run.check_forecasts, run.check_delta_u, lr, threshold, k_max)
    check_pred = lr * (check_steps + remaining)
    check_t = lr * check_steps
    check_taylor = None
    if run.check_taylor is not None:
        check_taylor = check_t + np.asarray(
            [
                polynomial_time(c, threshold - float(u), lr * k_max)
                for c, u in zip(
                    np.asarray(run.check_taylor), np.asarray(run.check_delta_u), strict=True
                )
            ]
        )
    monitored = monitored_taylor = t_check = math.nan
    if math.isfinite(t_c):
        before = np.flatnonzero(check_t <= (1 - lead) * t_c + 1e-12 * t_c)
        i = int(before[-1]) if before.size else 0
        monitored, t_check = float(check_pred[i]), float(check_t[i])
        if check_taylor is not None:
            monitored_taylor = float(check_taylor[i])
    return Predictions(
        t_c,
        quartic,
        second,
        t_peer,
        t_taylor,
        monitored,
        monitored_taylor,
        t_check,
        check_t,
        check_pred,
        check_taylor,
    )


def forecast_crossing(
    align_loss_fn: Callable,
    ft_loss_fn: Callable,
    theta_star: jax.Array,
    *,
    threshold: float,
    lr: float,
    num_steps: int,
    check_every: int,
    rank: int,
    lead: float = 0.5,
    method: str = "dense",
    report: aic.AICReport | None = None,
    taylor_order: int | None = None,
) -> tuple[Predictions, CheckedRun, aic.AICReport]:
    """The whole comparison for any flat ``L_A``, ``L_FT`` and θ* (e.g. a transformer's
    parameters through :func:`quartic.core.pytree.flat_fn`).

    θ* quantities come from :func:`quartic.check_aic` (``method`` ``"dense"`` or ``"lanczos"``;
    pass ``report`` to reuse one); fine-tuning is ``num_steps`` gradient-descent steps of size
    ``lr`` (rounded up to whole checks), re-diagnosed every ``check_every`` steps.
    ``taylor_order``: also the Taylor forecasts of that order, one-shot and monitored (needs
    ``jax.experimental.jet`` support for every primitive of the losses).

    Returns ``(predictions, run, report)``; ``predictions.relative_errors()`` has the errors.
    """
    if report is None:
        report = aic.check_aic(align_loss_fn, ft_loss_fn, theta_star, rank, method=method)
    g = jax.grad(ft_loss_fn)(theta_star)
    diag = ForecastInputs.from_report(report, g)
    num_checks = -(-num_steps // check_every)
    run = jax.jit(
        lambda th: simulate_with_checks(align_loss_fn, ft_loss_fn, th, lr, num_checks, check_every)
    )(theta_star)
    if not bool(run.finite):
        raise QuarticError(
            f"fine-tuning left the finite numbers at lr={lr}: lower the learning rate "
            f"(stable only for lr·λ_max(H) < 2; λ_max(H) = {report.lambda_max_ft:.3g})"
        )
    coeffs = None
    if taylor_order is not None:
        onset = theory.taylor_onset(align_loss_fn, ft_loss_fn, theta_star, order=taylor_order)
        coeffs = np.asarray(onset.coefficients)
    return predictions(run, diag, lr, threshold, lead, taylor_coefficients=coeffs), run, report
