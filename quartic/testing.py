"""Assertions for unit tests of a scaling law on your own model.

Each one measures, compares and, on failure, raises an ``AssertionError`` whose message gives the
measured value, the expected one and what the mismatch usually means (a first-order leak, a θ* that
is not at an aligned optimum, no curvature coupling, a time beyond the expansion)::

    from quartic import testing

    def test_my_model_has_a_quartic_onset():
        testing.assert_onset_order(align_loss, ft_loss, params, order=4)

    def test_my_model_meets_the_aic():
        report = quartic.check_aic(align_loss, ft_loss, params, rank=10,
                                   thresholds=quartic.Thresholds(eps_ortho=1e-6, gamma=1e-3))
        testing.assert_aic(report)

``docs/testing.md`` shows a whole pytest file. Losses take ``(params[, batch])`` and ``params`` is
any pytree, as for :func:`quartic.check_aic`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from quartic.core import fitting, pytree, theory
from quartic.core.aic import AICReport
from quartic.core.errors import QuarticError

__all__ = ["assert_aic", "assert_forecast_matches", "assert_loglog_slope", "assert_onset_order"]

# What an onset order (the first non-zero Taylor coefficient of Δu) says about the geometry
# (docs/theory.md, the onset ladder).
ONSET_MEANING = {
    1: "a linear term: ∇L_A(θ*)ᵀg ≠ 0, so θ* is not at an aligned optimum (the premise fails)",
    2: "a first-order leak: the fine-tuning gradient g has a part the alignment curvature sees "
    "(Pg ≠ 0 or Fisher mass outside M); the onset is t², not t⁴",
    3: "a t³ term: ∇L_A(θ*) ≠ 0 along Hg, or a leak meeting the coupling",
    4: "the quartic law: Pg = 0 and PHg ≠ 0 (curvature coupling)",
    6: "no coupling at second order (PHg = 0, PH²g ≠ 0): the onset is t⁶",
}
# What a log-log slope of Δu(t) near an integer usually means.
SLOPE_MEANING = {
    1: "linear growth: θ* is not at an aligned optimum (∇L_A ≠ 0), or gradient noise dominates",
    2: "a first-order leak dominates: Pg ≠ 0, and the t⁴ term takes over only after t×",
    4: "the quartic law",
    6: "no curvature coupling at second order (PHg = 0)",
}


def _meaning(table: dict[int, str], value: float | None) -> str:
    if value is None:
        return "Δu ≡ 0 to this order: the fine-tuning flow never reaches the alignment directions"
    k = int(round(value))
    return table.get(k, "") if abs(value - k) < 0.25 else ""


def _fail(lines: Sequence[str]) -> None:
    raise AssertionError("\n".join(line for line in lines if line))


def assert_onset_order(
    align_loss_fn: Callable,
    ft_loss_fn: Callable,
    params: Any,
    order: int,
    *,
    align_batch: Any = None,
    ft_batch: Any = None,
    where=None,
    max_order: int | None = None,
    rtol: float = 1e-8,
    atol: float | None = None,
) -> theory.TaylorOnset:
    """Assert that Δu(t) = L_A(θ(t)) − L_A(θ*) along the gradient flow of L_FT starts at ``t^order``.

    Exact: the Taylor coefficients of u(t) come from Taylor-mode differentiation of the flow
    (:func:`quartic.theory.taylor_onset`), to ``max_order`` (default ``order + 2``). A coefficient
    counts as zero by :meth:`~quartic.theory.TaylorOnset.onset` (``rtol`` against the largest term
    at the flow's own time scale, or an absolute ``atol``). Returns the onset for further checks.
    """
    if order < 1:
        raise QuarticError(f"order must be >= 1, got {order}")
    k_max = max_order if max_order is not None else order + 2
    if k_max < order:
        raise QuarticError(f"max_order ({k_max}) must be >= order ({order})")
    f_align, theta, _ = pytree.flat_fn(align_loss_fn, params, align_batch, where)
    f_ft, _, _ = pytree.flat_fn(ft_loss_fn, params, ft_batch, where)
    onset = theory.taylor_onset(f_align, f_ft, theta, order=k_max)
    found, coefficient = onset.onset(rtol=rtol, atol=atol)
    if found != order:
        c = np.asarray(onset.coefficients, dtype=float)
        _fail(
            [
                f"onset order of Δu(t): measured {found if found is not None else 'none'}"
                f" (t^{found}), expected {order} (t^{order})",
                f"Taylor coefficients c1..c{k_max} = {np.array2string(c, precision=3)}",
                f"hint: {_meaning(ONSET_MEANING, found)}" if _meaning(ONSET_MEANING, found) else "",
            ]
        )
    return onset


def assert_loglog_slope(
    t,
    y,
    slope: float,
    window: tuple[float, float] | None = None,
    atol: float = 0.05,
) -> fitting.ExponentFit:
    """Assert that ``y`` grows like ``t^slope`` on ``window`` (least-squares log-log fit).

    ``atol`` bounds |fitted − slope|; set it from the expansion you test (on a window where
    t·λ_max(H) ≤ x, the next order bends the slope by about x). Returns the fit.
    """
    fit = fitting.fit_exponent(t, y, window)
    if not abs(fit.exponent - slope) <= atol:
        where = f" on t ∈ [{window[0]:.3g}, {window[1]:.3g}]" if window else ""
        local = fitting.local_slope(t, y)
        local = local[np.isfinite(local)]
        hint = _meaning(SLOPE_MEANING, fit.exponent)
        _fail(
            [
                f"log-log slope{where}: measured {fit.exponent:.4f} ± {fit.stderr:.2g} "
                f"({fit.num_points} points), expected {slope} ± {atol}",
                f"local slopes range over [{local.min():.3f}, {local.max():.3f}]"
                if local.size
                else "",
                f"hint: {hint}" if hint else "",
            ]
        )
    return fit


def assert_forecast_matches(
    report: AICReport | theory.Forecast,
    t,
    measured,
    rtol: float,
    *,
    lr: float | None = None,
) -> np.ndarray:
    """Assert that the second-order forecast of Δu matches a measured run to ``rtol`` pointwise.

    ``report``: an :class:`~quartic.AICReport` (its ``.forecast``) or a
    :class:`~quartic.theory.Forecast`. ``t``: flow times, or, with ``lr``, gradient-descent step
    counts. Returns the relative errors ``|forecast − measured| / |measured|``.
    """
    forecast = report.forecast if isinstance(report, AICReport) else report
    t = np.asarray(t, dtype=float)
    measured = np.asarray(measured, dtype=float)
    if t.shape != measured.shape:
        raise QuarticError(f"t has shape {t.shape} but measured has shape {measured.shape}")
    predicted = np.asarray(forecast.gd(t, lr) if lr is not None else forecast.flow(t), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(predicted - measured) / np.abs(measured)
    err = np.where(measured == 0, np.where(predicted == 0, 0.0, np.inf), err)
    if not np.all(err <= rtol):
        i = int(np.nanargmax(np.where(np.isnan(err), np.inf, err)))
        time = t[i] * (lr if lr is not None else 1.0)
        lines = [
            f"second-order forecast vs measured Δu: worst relative error {err[i]:.3g} at "
            f"{'step' if lr is not None else 't'} = {t[i]:.4g} (forecast {predicted[i]:.4g}, "
            f"measured {measured[i]:.4g}), expected ≤ {rtol:g}; "
            f"{int(np.sum(~(err <= rtol)))} of {err.size} points fail",
        ]
        if isinstance(report, AICReport) and report.lambda_max_ft > 0:
            tl = time * report.lambda_max_ft
            if tl > 0.1:
                lines.append(
                    f"hint: t·λ_max(H_FT) = {tl:.3g} there; the forecast keeps only terms to "
                    "second order in δ and holds for t·λ_max(H_FT) ≪ 1"
                )
        if math.copysign(1, predicted[i]) != math.copysign(1, measured[i]):
            lines.append("hint: forecast and measurement differ in sign there (Δu crosses zero?)")
        _fail(lines)
    return err


def assert_aic(report: AICReport) -> AICReport:
    """Assert that θ* is an aligned optimum and every condition of Def 5.1 that ``report`` judged
    (those given a threshold in :class:`~quartic.Thresholds`) holds.

    Fails, rather than passes vacuously, when no condition was judged.
    """
    judged = {k: v for k, v in report.verdicts.items() if v.passed is not None}
    if not judged or set(judged) == {"premise"}:
        raise QuarticError(
            "the report judges none of the AIC's conditions: give check_aic thresholds "
            "(quartic.Thresholds(lam=..., eps_tail=..., eps_ortho=..., gamma=...))"
        )
    failed = [k for k, v in judged.items() if not v.passed]
    if failed:
        tl = report.crossover_time * report.lambda_max_ft
        hints = {
            "premise": f"θ* is not at an aligned optimum: Δu grows linearly at rate "
            f"{report.linear_rate:.3g} before any t⁴ term",
            "orthogonality": f"first-order leak: ‖Pg‖/‖g‖ = {report.ortho_ratio:.2g}; onset is t², "
            f"not t⁴ (the t⁴ term takes over after t× = {report.crossover_time:.3g}, "
            f"t×·λ_max(H_FT) = {tl:.3g})",
            "coupling": "weak curvature coupling: PHg is small, the t⁴ coefficient γ_F²/8 = "
            f"{report.quartic_coefficient:.3g}",
            "low_rank_tail": "Fisher mass outside M: it adds a t² term (raise the rank d?)",
            "low_rank_sharp": f"λ_d = {report.lambda_d:.3g}: the d-th direction is not sharp "
            "(lower the rank d?)",
        }
        _fail(
            [f"the AIC fails {len(failed)} of its {len(judged)} judged conditions:"]
            + [f"  {report.verdicts[k]}  — {hints.get(k, '')}" for k in failed]
        )
    return report
