"""The ablation ladder and the window where slope 4 is observable (docs/theory.md §3).

Breaking one AIC condition at a time moves the onset exponent of Δu(t) along the ladder of
:func:`quartic.core.theory.onset_order`: a first-order leak (Pg ≠ 0) or Fisher mass outside M gives
slope 2 at small t, then slope 4 after the crossover t× (:func:`quartic.core.theory.crossover_time`);
PHg = 0 gives slope 6; no coupling block gives Δu ≡ 0.

The law is therefore observable only on a window ``[t_L, t₀]``: on the left the leak's t² (and the
t³ cross term) must have died out, on the right the next order (``c₅ t⁵``, i.e. ``Δu/(c₄t⁴) =
1 + s t``) must not yet bend the curve. Both edges follow from the Taylor coefficients of Δu at θ*
(:func:`quartic.core.theory.taylor_onset`), so a window can be predicted before any training:

- ``t_L``: where the local slope of ``c₂t² + c₃t³ + c₄t⁴`` enters ``4 ± tol`` for good;
- ``t₀ = tol · |c₄ / c₅|``: where ``|s t| = tol`` (``s = c₅/c₄``, which is
  :func:`quartic.core.theory.next_order_slope` when Pg = 0 and F has no tail).

The leading-order version drops the cubic cross term: ``t_L ≈ t× √((2 − tol)/tol)``, from the
slope ``4 − 2r/(1 + r)`` of ``½t²gᵀFg + (t⁴/8)‖F^{1/2}Hg‖²`` with ``r = (t×/t)²``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import fitting, theory
from quartic.core.errors import QuarticError
from quartic.core.problems import QuadraticProblem, QuadraticSpec
from quartic.core.subspace import lambda_max

#: The rungs of the ladder measured here, in order: (name, onset exponent, exponent after t×).
#: ``None`` for the onset means Δu ≡ 0; ``None`` after t× means no second regime.
RUNGS = tuple((r.name, r.onset, r.late) for r in theory.RUNGS)


def ladder_specs(base: QuadraticSpec, leak: float, tail: float) -> dict[str, QuadraticSpec]:
    """One spec per rung of :data:`quartic.core.theory.RUNGS`: ``base`` (which must satisfy the
    AIC: no leak, no tail, coupling > 0) with exactly one condition broken."""
    if base.leak != 0 or base.tail != 0 or base.coupling <= 0 or base.phg_zero:
        raise QuarticError(
            "the ladder's base spec must satisfy the AIC: leak = 0, tail = 0, coupling > 0, "
            f"phg_zero = False; got {base}"
        )
    return {
        r.name: dataclasses.replace(base, **r.change(leak=leak, tail=tail)) for r in theory.RUNGS
    }


def taylor_rounding_floor(series, fisher_norm_fn, lam1: float, margin: float = 100.0) -> np.ndarray:
    """The float64 rounding level of each Taylor coefficient ``c_k`` of ``Δu = ½ zᵀFz``.

    ``z(t) = Σ_i z_i t^i`` is the vector that F weighs: ``δ(t)`` for a quadratic L_A, ``φ(θ(t))``
    for a curved alignment map. ``c_k = Σ_{i+j=k} ½ z_iᵀ F z_j``; a product whose exact value is
    zero (a z_i in F's null space) comes out of float64 at about ``ε √λ₁ ‖z_i‖ ‖F^{1/2}z_j‖``, so
    the floor is ``margin · ε Σ_{i+j=k} √λ₁ ‖z_i‖ ‖F^{1/2}z_j‖``. It is ε² small where both
    factors are rounding (c₂ with Pg = 0 exactly) and ε small where one is genuine (c₃ with Pg = 0):
    a relative threshold on the coefficients cannot tell a tiny but genuine leak (``c₂ ∝ ‖Pg‖²``)
    from rounding, this can.

    Args:
      series: ``[K, n]``, the Taylor coefficients ``z_1..z_K`` of z(t) at t = 0.
      fisher_norm_fn: ``v [n] -> ‖F^{1/2} v‖``. lam1: λ₁(F).
    Returns:
      ``[K]``, the floor of ``c_1..c_K``.
    """
    z = np.asarray(series, float)
    k_max = z.shape[0]
    norm = np.linalg.norm(z, axis=1) * math.sqrt(max(lam1, 0.0))
    fnorm = np.array([float(fisher_norm_fn(jnp.asarray(v))) for v in z])
    floor = np.zeros(k_max)
    for k in range(2, k_max + 1):
        for i in range(1, k):
            floor[k - 1] += norm[i - 1] * fnorm[k - i - 1]
    return margin * np.finfo(float).eps * floor


def onset_from_coefficients(coefficients, floor) -> int | None:
    """The onset order: the first ``k`` with ``|c_k|`` above its rounding ``floor[k − 1]``
    (:func:`taylor_rounding_floor`); ``None`` when every coefficient is rounding (Δu ≡ 0)."""
    above = np.nonzero(np.abs(np.asarray(coefficients, float)) > np.asarray(floor, float))[0]
    return int(above[0]) + 1 if above.size else None


def crossover_time(problem: QuadraticProblem) -> jax.Array:
    """:func:`quartic.core.theory.crossover_time` of a quadratic problem (``t× = 2√(gᵀFg)/‖F½Hg‖``),
    with F evaluated in its factored form (no cancellation)."""
    g = problem.ft_grad
    hg = problem.ft_hessian @ g
    return theory.crossover_time(2 * problem.delta_u(g), 2 * problem.delta_u(hg))


# ----------------------------------------------------------------------------------------------
# Slopes and crossings


def series_slope(coefficients, t) -> np.ndarray:
    """Local log-log slope ``Σ k c_k t^k / Σ c_k t^k`` of the polynomial ``Σ_{k≥1} c_k t^k``.

    ``coefficients [K]`` are ``c₁..c_K``; ``t [T]``. NaN where the polynomial is not positive.
    """
    c = np.asarray(coefficients, float)
    t = np.asarray(t, float)
    k = np.arange(1, c.shape[0] + 1, dtype=float)
    # factor out t^{k_min} so that tiny t does not underflow
    nz = np.nonzero(c)[0]
    if nz.size == 0:
        return np.full(t.shape, np.nan)
    c, k = c[nz[0] :], k[nz[0] :]
    powers = t[:, None] ** (k[None, :] - k[0])
    p = powers @ c
    dp = powers @ (k * c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p > 0, dp / p, np.nan)


# ----------------------------------------------------------------------------------------------
# The window of slope 4


class Window(NamedTuple):
    """A window ``[lo, hi]`` of local slope ``4 ± tol`` (NaN edges: no window) and its width."""

    lo: float
    hi: float

    @property
    def width(self) -> float:
        """Decades; ``-inf`` when there is no window."""
        if math.isnan(self.lo) or math.isnan(self.hi) or self.hi <= self.lo:
            return -math.inf
        if self.lo <= 0 or math.isinf(self.hi):
            return math.inf
        return math.log10(self.hi / self.lo)

    @classmethod
    def none(cls) -> Window:
        return cls(math.nan, math.nan)


def measured_window(t, delta_u, tol: float, order: int = theory.ORDER) -> Window:
    """The longest range where the measured local slope of Δu is within ``tol`` of ``order``."""
    w = fitting.slope_window(t, fitting.local_slope(t, delta_u), order, tol)
    return Window(*w) if w is not None else Window.none()


def next_order_window(coefficients, t, tol: float) -> Window:
    """The window predicted from Δu's Taylor coefficients ``c₁..c_K`` (K ≥ 5) at θ*, to next order.

    Left edge: the longest run of ``t`` where the slope of ``c₁t + … + c₄t⁴`` is within ``tol``
    of 4 starts there (it runs to the end of the grid: nothing of order > 4 is in it). Right edge:
    ``t₀ = tol |c₄/c₅|``, where ``|s t| = tol`` (``∞`` when c₅ = 0). No window when ``c₄ ≤ 0``,
    when the left edge is not below ``t₀``, or when the quartic polynomial never reaches slope
    4 ± tol on ``t``.
    """
    c = np.asarray(coefficients, float)
    if c.shape[0] < 5:
        raise QuarticError(f"need the Taylor coefficients c1..c5 at least, got {c.shape[0]}")
    if not c[3] > 0:
        return Window.none()
    t = np.asarray(t, float)
    w = fitting.slope_window(t, series_slope(c[:4], t), theory.ORDER, tol)
    if w is None:
        return Window.none()
    t0 = tol * abs(c[3] / c[4]) if c[4] != 0 else math.inf
    lo = w[0]
    return Window(lo, min(t0, float(t[-1]))) if lo < t0 else Window.none()


def taylor_window(coefficients, t, tol: float, degree: int = 6) -> Window:
    """The window where the slope of the Taylor polynomial ``Σ_{k≤degree} c_k t^k`` of Δu at θ*
    is within ``tol`` of 4 (its longest such run on ``t``).

    With ``degree = 6`` it carries two orders beyond the onset: the right edge then includes the
    curvature of ``Δu/(c₄t⁴) = 1 + s t + s₂ t²`` (:func:`quartic.core.theory.next_order_curvature`),
    which the first-order ``t₀ = tol/|s|`` misses when ``s₂`` holds the slope near ``4 − tol``.
    """
    c = np.asarray(coefficients, float)
    if c.shape[0] < degree:
        raise QuarticError(f"need the Taylor coefficients c1..c{degree}, got {c.shape[0]}")
    w = fitting.slope_window(t, series_slope(c[:degree], t), theory.ORDER, tol)
    return Window(*w) if w is not None else Window.none()


def leading_order_window(t_cross: float, next_slope: float, tol: float) -> Window:
    """The closed-form window ``[t× √((2 − tol)/tol), tol/|s|]`` (the cubic cross term dropped)."""
    lo = t_cross * math.sqrt((2 - tol) / tol)
    hi = tol / abs(next_slope) if next_slope != 0 else math.inf
    return Window(lo, hi) if lo < hi else Window.none()


def onset_exponent_window(t_cross: float, lam_max: float) -> tuple[float, float]:
    """Where the onset exponent is read: two decades ending 100× below both t× (for a leak) and
    ``10⁻³/λ_max(H)`` (inside the expansion's validity)."""
    hi = 1e-3 / lam_max
    if t_cross > 0:
        hi = min(hi, t_cross / 100)
    return hi / 100, hi


# ----------------------------------------------------------------------------------------------
# Phase diagram over (leak, coupling)


def family_grid(
    key: jax.Array, spec: QuadraticSpec, leaks, couplings
) -> tuple[QuadraticProblem, jax.Array]:
    """``make_quadratic(key, replace(spec, leak=ℓ, coupling=κ))`` for every ``(ℓ, κ)``, stacked.

    Returns the problems as one batched :class:`QuadraticProblem` with leading axis
    ``[len(leaks) * len(couplings)]`` (leak-major) and the sensitive basis ``B [n, d]`` (the same
    for all cells: one key). Cells differ only in ℓ and κ, so the grid isolates those two knobs.
    """
    from quartic.core.problems import make_quadratic

    probs = []
    basis = None
    for leak in np.asarray(leaks, float):
        for coupling in np.asarray(couplings, float):
            cell = dataclasses.replace(spec, leak=float(leak), coupling=float(coupling))
            prob, basis = make_quadratic(key, cell)
            probs.append(prob)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *probs)
    return stacked, basis


def quadratic_taylor(prob: QuadraticProblem, order: int) -> theory.TaylorOnset:
    """:func:`quartic.core.theory.taylor_onset` of a quadratic problem in closed form (no ``jet``).

    The flow's derivatives are ``θ^{(k)}(0) = (−1)^k H^{k−1} g`` and
    ``c_m = ½ Σ_{i+j=m} δ_iᵀ F δ_j`` with ``δ_i = θ^{(i)}/i!``; the Gram products are taken in F's
    factored form (as ``Δu`` is), so a coefficient that is exactly zero comes out at rounding.
    """
    g, h = prob.ft_grad, prob.ft_hessian
    vecs = [g]
    for _ in range(order - 1):
        vecs.append(h @ vecs[-1])
    signs = jnp.asarray([(-1.0) ** k for k in range(1, order + 1)], g.dtype)
    derivs = signs[:, None] * jnp.stack(vecs)
    fact = jnp.asarray([math.factorial(k) for k in range(1, order + 1)], g.dtype)
    coords = (derivs / fact[:, None]) @ prob.fisher_vectors  # [order, n] in F's eigenbasis
    gram = (coords * prob.fisher_values[None, :]) @ coords.T
    coeffs = [
        0.5 * sum(gram[i, m - 2 - i] for i in range(m - 1)) if m >= 2 else jnp.zeros((), g.dtype)
        for m in range(1, order + 1)
    ]
    return theory.TaylorOnset(jnp.stack(coeffs), derivs)


def quadratic_curves(prob: QuadraticProblem, x: jax.Array, order: int):
    """Δu of the exact flow on ``t = x / λ_max(H)``, the exact Taylor expansion of Δu at θ*
    (:func:`quadratic_taylor`), ``λ_max(H)`` and t× (jit/vmap-able; ``order`` static).

    Returns ``(t [T], Δu [T], TaylorOnset, λ_max, t×)``.
    """
    lam = lambda_max(prob.ft_hessian, method="dense").value
    t = x / lam
    du = prob.delta_u(prob.flow(t))
    return t, du, quadratic_taylor(prob, order), lam, crossover_time(prob)


@jax.jit
def _grid_curves(probs: QuadraticProblem, x: jax.Array):
    return jax.vmap(lambda p: quadratic_curves(p, x, 6))(probs)


class PhaseCell(NamedTuple):
    """One (leak, coupling) cell: the measured window and three predictions (edges in t).

    ``taylor``: :func:`taylor_window` (degree 6); ``next_order``: :func:`next_order_window`;
    ``leading``: :func:`leading_order_window`.
    """

    leak: float
    coupling: float
    lam_max: float
    t_cross: float
    next_slope: float  # s = c₅/c₄
    measured: Window
    taylor: Window
    next_order: Window
    leading: Window


def phase_cells(
    key: jax.Array,
    spec: QuadraticSpec,
    leaks,
    couplings,
    tol: float,
    x_range: tuple[float, float] = (1e-7, 3.0),
    num: int = 301,
) -> list[PhaseCell]:
    """Measure and predict the slope-4 window on every cell of a (leak, coupling) grid.

    Measured: Δu of the exact flow on ``num`` geometric points of ``t·λ_max(H) ∈ x_range``, its
    local slope, the longest run within ``tol`` of 4 (:func:`quartic.core.fitting.slope_window`).
    Predicted from the exact Taylor coefficients c₁…c₆ at θ* (no training), to three orders:
    :func:`taylor_window`, :func:`next_order_window`, :func:`leading_order_window`.
    """
    probs, _ = family_grid(key, spec, leaks, couplings)
    x = jnp.geomspace(x_range[0], x_range[1], num)
    ts, dus, onsets, lams, crosses = _grid_curves(probs, x)
    ts, dus, cs, lams, crosses = map(np.asarray, (ts, dus, onsets.coefficients, lams, crosses))
    cells = []
    pairs = [(float(a), float(b)) for a in np.asarray(leaks) for b in np.asarray(couplings)]
    for i, (leak, coupling) in enumerate(pairs):
        c, t_cross = cs[i], float(crosses[i])
        # s = c₅/c₄: the next-order slope (theory.next_order_slope when Pg = 0, no tail)
        s = c[4] / c[3] if c[3] > 0 else math.nan
        cells.append(
            PhaseCell(
                leak,
                coupling,
                float(lams[i]),
                t_cross,
                float(s),
                measured_window(ts[i], dus[i], tol),
                taylor_window(c, ts[i], tol),
                next_order_window(c, ts[i], tol),
                leading_order_window(t_cross, s, tol) if c[3] > 0 else Window.none(),
            )
        )
    return cells


def agreement(measured_width: np.ndarray, predicted_width: np.ndarray, min_decades: float) -> dict:
    """Compare the measured and predicted phases (window ≥ ``min_decades``) on a ``[L, C]`` grid.

    Returns the fraction of cells that agree, the disagreeing cells (row, column), and for each of
    them whether it lies next to the predicted boundary (a 4-neighbour has the other predicted
    phase) and how far its predicted width is from the threshold (decades).
    """
    mw, pw = np.asarray(measured_width, float), np.asarray(predicted_width, float)
    if mw.shape != pw.shape or mw.ndim != 2:
        raise QuarticError(f"need two [L, C] grids of equal shape, got {mw.shape}, {pw.shape}")
    m, p = mw >= min_decades, pw >= min_decades
    bad = np.argwhere(m != p)
    rows = []
    for i, j in bad:
        nbrs = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        nbrs = [(a, b) for a, b in nbrs if 0 <= a < p.shape[0] and 0 <= b < p.shape[1]]
        rows.append(
            {
                "cell": [int(i), int(j)],
                "measured_width": float(mw[i, j]),
                "predicted_width": float(pw[i, j]),
                "next_to_boundary": bool(any(p[a, b] != p[i, j] for a, b in nbrs)),
                "margin_decades": float(abs(pw[i, j] - min_decades)),
            }
        )
    return {
        "fraction_agree": float(np.mean(m == p)),
        "num_cells": int(m.size),
        "num_measured_window": int(m.sum()),
        "num_predicted_window": int(p.sum()),
        "disagree": rows,
        "all_disagreements_next_to_boundary": bool(all(r["next_to_boundary"] for r in rows)),
    }
