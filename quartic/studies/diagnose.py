"""``quartic diagnose``: will fine-tuning this model on that data break its alignment, and when?

:func:`diagnose` takes any two losses of a parameter pytree (an nnx model's state, or a plain
``f(params, batch)``), measures the AIC at θ*, forecasts Δu over a horizon of gradient-descent steps
from θ* quantities only (the second-order forecast with the gradient term of L_A), finds when the
forecast crosses a threshold, and — optionally — runs the fine-tuning and sets the forecast
against what really happened, saying where they part and why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import aic, dynamics, measure, pytree, theory
from quartic.core.errors import QuarticError


@dataclasses.dataclass
class Diagnosis:
    """Everything :func:`diagnose` measured and predicted (JSON-able via :meth:`to_dict`)."""

    report: aic.AICReport
    rank: int
    explained_variance: float
    lr: float
    steps: np.ndarray  # [K] record steps
    forecast: np.ndarray  # [K] second-order forecast of Δu at those steps
    quartic_only: np.ndarray  # [K] γ_F² t⁴ / 8
    threshold: float | None
    forecast_crossing_step: float | None
    actual: np.ndarray | None = None  # [K] measured Δu (when run)
    actual_crossing_step: float | None = None
    parting_step: int | None = None
    parting_reason: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def premise_holds(self) -> bool:
        return bool(self.report.premise_holds)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "report"}
        out["aic"] = self.report.to_dict()
        for k in ("steps", "forecast", "quartic_only", "actual"):
            if out[k] is not None:
                out[k] = np.asarray(out[k]).tolist()
        return out

    def __str__(self) -> str:
        r = self.report
        lines = [str(r), ""]
        lines.append(
            f"rank d = {self.rank} (explains {100 * self.explained_variance:.1f} % of the curvature's trace)"
        )
        t_h = self.lr * self.steps[-1]
        lines.append(
            f"forecast over {int(self.steps[-1])} steps of lr = {self.lr:g} (t = {t_h:.3g}, "
            f"t·λ_max(H) = {t_h * r.lambda_max_ft:.3g}):"
        )
        tf = theory.Forecast(*[jnp.asarray(x) for x in r.forecast])
        c = np.asarray(tf.taylor())
        lines.append(
            f"  Δu(t) ≈ {c[0]:+.3e} t {c[1]:+.3e} t² {c[2]:+.3e} t³ {c[3]:+.3e} t⁴"
            "  (gradient term of L_A kept)"
        )
        if not self.premise_holds:
            lines.append(
                "  the linear term dominates at small t: Δu ≈ "
                f"{r.linear_rate:+.3e}·t — this is not the quartic regime"
            )
        for k, f, a in self._rows():
            a_txt = "" if a is None else f"   actual {a:.3e}"
            lines.append(f"  step {k:>7d}: forecast {f:.3e}{a_txt}")
        if self.threshold is not None:
            fc = (
                "never (within the horizon)"
                if self.forecast_crossing_step is None
                else f"step {self.forecast_crossing_step:.1f}"
            )
            lines.append(f"threshold Δu = {self.threshold:g}: forecast crosses at {fc}")
            if self.actual is not None:
                ac = (
                    "never"
                    if self.actual_crossing_step is None
                    else f"step {self.actual_crossing_step:.1f}"
                )
                lines.append(f"                      actual run crosses at {ac}")
        lines.append(f"crossover t× (leak t² → curvature t⁴): {r.crossover_time:.3g}")
        if self.parting_step is not None:
            lines.append(
                f"forecast and run part (>10 %) at step {self.parting_step}: {self.parting_reason}"
            )
        elif self.actual is not None:
            lines.append("forecast and run agree within 10 % over the whole horizon")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _rows(self, num: int = 6):
        idx = np.unique(np.linspace(0, len(self.steps) - 1, num).round().astype(int))
        for i in idx:
            a = None if self.actual is None else float(self.actual[i])
            yield int(self.steps[i]), float(self.forecast[i]), a


def _rank_from_variance(eigenvalues: np.ndarray, trace: float, target: float) -> int:
    pos = np.clip(np.asarray(eigenvalues), 0, None)
    share = np.cumsum(pos) / max(trace, 1e-300)
    hit = np.nonzero(share >= target)[0]
    return int(hit[0]) + 1 if hit.size else len(pos)


def _crossing(steps, values, threshold) -> float | None:
    # log-log interpolation between the bracketing records; None (JSON null) if never
    return measure.finite_or(measure.crossing_time(steps, values, threshold, scale="log"), None)


def diagnose(
    align_loss_fn: Callable,
    ft_loss_fn: Callable,
    params: Any,
    *,
    lr: float,
    horizon: int,
    rank: int | None = None,
    explained_variance: float | None = None,
    align_batch: Any = None,
    ft_batch: Any = None,
    threshold: float | None = None,
    run: bool = False,
    method: str = "dense",
    fisher: Any = None,
    where=None,
    num_records: int = 40,
    grad_tol: float = 1e-6,
) -> Diagnosis:
    """Diagnose fine-tuning from ``params`` = θ* with gradient descent of step ``lr``.

    Args:
      rank / explained_variance: the sensitive subspace's dimension d, or the share of the
        alignment curvature's trace it must hold (the smallest such d is used). One is required.
      horizon: number of gradient-descent steps to forecast (and run, with ``run=True``).
      align_batch / ft_batch: the data each loss is called with (``loss(params, batch)``); a
        dataset given as a loader becomes one with :func:`quartic.core.data.over_batches`.
      threshold: a Δu level whose crossing step is forecast (and measured).
      run: also run the fine-tuning (full-batch GD, one ``lax.scan``) and compare.
    """
    if (rank is None) == (explained_variance is None):
        raise QuarticError("give exactly one of rank= or explained_variance=")
    if explained_variance is not None and not 0 < explained_variance <= 1:
        raise QuarticError(f"explained_variance must be in (0, 1], got {explained_variance}")
    if not lr > 0 or not math.isfinite(lr):
        raise QuarticError(f"lr must be a positive finite number, got {lr}")
    if horizon < 1:
        raise QuarticError(f"horizon must be at least 1 step, got {horizon}")
    if threshold is not None and not threshold > 0:
        raise QuarticError(f"threshold must be positive, got {threshold}")
    thresholds = aic.Thresholds(grad_tol=grad_tol)
    notes = []
    if explained_variance is not None:
        if method != "dense":
            raise QuarticError("explained_variance needs method='dense' (the whole spectrum)")
        probe = aic.check_aic(
            align_loss_fn,
            ft_loss_fn,
            params,
            rank=1,
            align_batch=align_batch,
            ft_batch=ft_batch,
            fisher=fisher,
            where=where,
            thresholds=thresholds,
            full_spectrum=True,
        )
        rank = _rank_from_variance(probe.eigenvalues, probe.trace, explained_variance)
        n = probe.n
        rank = min(rank, n - 1)
    report = aic.check_aic(
        align_loss_fn,
        ft_loss_fn,
        params,
        rank=rank,
        align_batch=align_batch,
        ft_batch=ft_batch,
        fisher=fisher,
        where=where,
        method=method,
        thresholds=thresholds,
    )
    explained = float(
        np.sum(np.clip(report.eigenvalues[:rank], 0, None)) / max(report.trace, 1e-300)
    )
    steps = dynamics.log_steps(horizon, num_records)
    fc = theory.Forecast(*[jnp.asarray(x) for x in report.forecast])
    forecast = np.asarray(fc.gd(steps, lr))
    quartic_only = report.quartic_coefficient * (lr * steps) ** theory.ORDER
    horizon_t = lr * horizon
    if horizon_t * report.lambda_max_ft > 0.1:
        notes.append(
            f"the horizon reaches t·λ_max(H) = {horizon_t * report.lambda_max_ft:.2g} > 0.1: "
            "beyond it the second-order forecast is not expected to hold (docs/theory.md §3)"
        )
    if lr * report.lambda_max_ft >= 2:
        notes.append(
            f"lr·λ_max(H) = {lr * report.lambda_max_ft:.2g} ≥ 2: gradient descent is unstable here"
        )
    diag = Diagnosis(
        report=report,
        rank=rank,
        explained_variance=explained,
        lr=lr,
        steps=steps,
        forecast=forecast,
        quartic_only=quartic_only,
        threshold=threshold,
        forecast_crossing_step=None if threshold is None else _crossing(steps, forecast, threshold),
        notes=notes,
    )
    if run:
        _run_and_compare(diag, align_loss_fn, ft_loss_fn, params, align_batch, ft_batch, where)
    return diag


def _run_and_compare(diag, align_loss_fn, ft_loss_fn, params, align_batch, ft_batch, where):
    la, theta, _ = pytree.flat_fn(align_loss_fn, params, align_batch, where)
    lf, _, _ = pytree.flat_fn(ft_loss_fn, params, ft_batch, where)
    observe = dynamics.make_observer(la, theta, diag.report.basis)
    traj = jax.jit(lambda th: dynamics.gradient_descent(lf, th, diag.lr, diag.steps, observe))(
        theta
    )
    finite = np.asarray(traj.finite)
    actual = np.array(traj.observables["delta_u"], dtype=float)
    actual[~finite] = np.nan
    diag.actual = actual
    if diag.threshold is not None:
        diag.actual_crossing_step = _crossing(
            diag.steps, np.nan_to_num(actual, nan=np.inf), diag.threshold
        )
    if not finite.all():
        k = int(diag.steps[np.argmin(finite)])
        diag.parting_step = k
        diag.parting_reason = f"the run diverged (non-finite loss) before step {k}: lower lr"
        return
    rel = np.abs(diag.forecast / np.where(actual == 0, np.nan, actual) - 1)
    bad = np.nonzero(rel > 0.1)[0]
    if bad.size == 0:
        return
    i = int(bad[0])
    k = int(diag.steps[i])
    t = diag.lr * k
    tl = t * diag.report.lambda_max_ft
    overlap = float(np.asarray(traj.observables["overlap"])[i])
    if tl > 0.05:
        reason = (
            f"t·λ_max(H) = {tl:.2g}: the run has left the region where δ ≈ −tg + (t²/2)Hg "
            "(third-order terms of the path and of L_A matter; lr·λ_max(H) = "
            f"{diag.lr * diag.report.lambda_max_ft:.2g})"
        )
    elif i == 0:
        reason = (
            "already at the first record: Δu there is at the float64 noise floor or the forecast's "
            "leading terms cancel; compare at larger steps"
        )
    else:
        reason = (
            f"at t·λ_max(H) = {tl:.2g} the path is still second order, so L_A's own higher-order "
            f"terms (output curvature, rotation of M: overlap ‖Pδ‖/‖δ‖ = {overlap:.2g}) explain it"
        )
    diag.parting_step = k
    diag.parting_reason = reason


def plot_diagnosis(diag: Diagnosis, path) -> Any:
    """Forecast vs actual Δu on log-log axes (the figure ``quartic diagnose`` writes)."""
    from quartic.harness import plotting

    fig, axes = plotting.figure(1, 1, size=(5.5, 4.0))
    ax = axes[0, 0]
    k = diag.steps
    ax.plot(k, np.abs(diag.forecast), "-", label="second-order forecast (θ* only)")
    ax.plot(k, diag.quartic_only, ":", label="pure quartic γ_F² t⁴/8")
    if diag.actual is not None:
        ax.plot(k, np.abs(diag.actual), "o", ms=3, label="actual fine-tuning")
    if diag.threshold is not None:
        ax.axhline(diag.threshold, color="0.5", lw=0.8, ls="--", label="threshold")
    if diag.parting_step is not None:
        ax.axvline(diag.parting_step, color="C3", lw=0.8, ls="-.", label="forecast parts (>10 %)")
    plotting.loglog(ax, "gradient-descent step k", "|Δu|", "quartic diagnose: forecast vs actual")
    ax.legend(fontsize=7)
    return plotting.save(fig, path)


def curvature_rank_report(eigenvalues, trace) -> dict:
    """Share of the trace in the top d for a few d, and the effective rank of the spectrum's
    positive part (:func:`quartic.core.measure.effective_rank`)."""
    w = np.clip(np.asarray(eigenvalues), 0, None)
    share = np.cumsum(w) / max(trace, 1e-300)
    return {
        "share_top": {d: float(share[d - 1]) for d in (1, 2, 5, 10, 20) if d <= len(w)},
        "effective_rank": measure.effective_rank(w),
    }


__all__ = ["Diagnosis", "curvature_rank_report", "diagnose", "plot_diagnosis"]
