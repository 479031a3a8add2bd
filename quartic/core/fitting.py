"""Reading exponents and coefficients off measured curves (log-log slopes, ratios)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from quartic.core.errors import QuarticError


def _as_positive(t, y):
    t, y = np.asarray(t, float), np.asarray(y, float)
    if t.shape != y.shape or t.ndim != 1:
        raise QuarticError(f"t and y must be 1-D of equal length, got {t.shape} and {y.shape}")
    return t, y


def local_slope(t, y) -> np.ndarray:
    """``d log y / d log t`` along a run (second-order finite differences); NaN where ``y ≤ 0``."""
    t, y = _as_positive(t, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        ly = np.where(y > 0, np.log(np.abs(y)), np.nan)
    return np.gradient(ly, np.log(t))


class ExponentFit(NamedTuple):
    exponent: float
    stderr: float
    coefficient: float  # y ≈ coefficient · t^exponent on the window
    num_points: int


def fit_exponent(t, y, window: tuple[float, float] | None = None) -> ExponentFit:
    """Least-squares slope of ``log y`` on ``log t`` over ``window = (t_lo, t_hi)``."""
    t, y = _as_positive(t, y)
    keep = (y > 0) & np.isfinite(y)
    if window is not None:
        keep &= (t >= window[0]) & (t <= window[1])
    if keep.sum() < 3:
        raise QuarticError(
            f"need at least 3 positive points in the window to fit, got {keep.sum()}"
        )
    x, z = np.log(t[keep]), np.log(y[keep])
    a = np.vstack([x, np.ones_like(x)]).T
    coef, res, *_ = np.linalg.lstsq(a, z, rcond=None)
    dof = max(len(x) - 2, 1)
    sigma2 = float(res[0]) / dof if res.size else 0.0
    se = float(np.sqrt(sigma2 / np.sum((x - x.mean()) ** 2)))
    return ExponentFit(float(coef[0]), se, float(np.exp(coef[1])), int(keep.sum()))


def ratio_to_prediction(t, y, coefficient: float, order: float) -> np.ndarray:
    """``y / (coefficient · t^order)``: tends to 1 where the law holds."""
    t, y = _as_positive(t, y)
    return y / (coefficient * t**order)


def slope_window(t, slope, target: float, tol: float) -> tuple[float, float] | None:
    """The longest contiguous range of t where ``|slope − target| ≤ tol`` (None if nowhere)."""
    t, s = _as_positive(t, slope)
    ok = np.abs(s - target) <= tol
    best, start = None, None
    for i, flag in enumerate(np.append(ok, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    if best is None:
        return None
    return float(t[best[0]]), float(t[best[1] - 1])
