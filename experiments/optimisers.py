"""Other optimisers: noisy SGD, heavy-ball momentum and Adam, their leading Δu terms checked.

On the quadratic family (θ* = 0, Pg = 0, no Fisher tail; float64), each optimiser's first steps
are expanded in the learning rate (docs/optimisers.md) and the forecast in ``quartic.core.theory`` is
compared with the simulated optimiser (``quartic.core.dynamics.run_optimizer`` with optax):

- SGD with additive Gaussian gradient noise of covariance Σ (vmapped over noise seeds):
  ``E Δu ≈ ½ η t tr(FΣ) + γ_F² t⁴/8``; the crossover ``t_c = (4η tr(FΣ)/γ_F²)^{1/3}`` is measured
  where the local log-log slope of the Monte-Carlo mean of Δu passes 2.5 = (1 + 4)/2 (where the
  two terms are equal), at three noise levels. Acceptance: within 25 %.
- Heavy ball, ``optax.sgd(η, momentum=β)``: ``δ_k = −η a_k g + η² b_k Hg``; the forecast's error
  on the records with ``η a_k λ_max(H) ≤ 0.05``. Acceptance: within 10 %.
- Adam, ``optax.adam(η, b1, b2, ε)``: ``δ_k = −ηk D⁻¹g + η²(A1_k D⁻¹ − A2_k |g|D⁻²) H D⁻¹g``,
  ``D = |g| + ε``. On the family (Pg = 0 but P D⁻¹g ≠ 0) the leading term is ``½(ηk)² uᵀFu``
  (slope 2: the preconditioner breaks orthogonality); on a problem built with ``P D⁻¹g = 0`` it is
  the coupling term (η⁴). Acceptance: each leading term within 10 % over the first
  ``adam_steps`` steps (b1 ≠ b2; with b1 = b2 the coupling term cancels, reported).

    python -m quartic.harness.cli run optimisers --quick --figures figures    # ~25 s on a 2-core CPU
    -> SGD crossover within 6 % at three noise levels (acceptance 25 %); heavy ball within 4 %,
       Adam's leading terms within 0.5 % (acceptance 10 %)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quartic.core import dynamics, fitting, measure, theory
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.problems import QuadraticProblem, QuadraticSpec, make_quadratic
from quartic.core.subspace import lambda_max
from quartic.harness import plotting
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic, write_jsonl_atomic

TITLE = "Other optimisers: noisy SGD crossover, heavy-ball and Adam leading terms vs simulation"
QUICK_SECONDS = 25.0

#: Acceptance thresholds (the brief): SGD crossover, momentum and Adam leading terms.
SGD_TOL, MOMENTUM_TOL, ADAM_TOL = 0.25, 0.10, 0.10
#: "Small t" for heavy ball: the records with η a_k λ_max(H) at most this.
MOMENTUM_SMALL_T = 0.05


@dataclasses.dataclass(frozen=True)
class Config:
    n: int = 40
    d: int = 4
    coupling: float = 1.0
    seed: int = 0
    # SGD with additive noise ξ ~ N(0, σ² S), S a fixed SPD matrix with tr S = n
    sgd_lr: float = 1e-5
    noise_stds: tuple[float, ...] = (1e-4, 5e-4, 2.5e-3)
    noise_seeds: int = 1024  # Monte-Carlo samples of the noise (vmapped)
    noise_batches: int = 8  # for the crossover's standard error (batch means)
    sgd_t_max: float = 0.25  # last record at t·λ_max(H) = this
    # heavy ball: η = lr_eff (1 − β)
    momentum_betas: tuple[float, ...] = (0.5, 0.9, 0.99)
    momentum_lr_eff: float = 1e-4
    momentum_steps: int = 2000
    # Adam: the cases zip b1s and b2s
    adam_lr: float = 1e-6
    adam_b1s: tuple[float, ...] = (0.9, 0.0, 0.9)
    adam_b2s: tuple[float, ...] = (0.999, 0.999, 0.9)
    adam_eps: float = 1e-8
    adam_steps: int = 200

    @classmethod
    def quick(cls) -> Config:
        return cls(noise_seeds=256)


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def family_problem(config: Config) -> QuadraticProblem:
    """The quadratic family's problem of ``config`` (Pg = 0, no tail: the AIC holds)."""
    spec = QuadraticSpec(n=config.n, d=config.d, coupling=config.coupling)
    prob, _ = make_quadratic(jax.random.PRNGKey(config.seed), spec)
    return prob


def _fisher_mv(prob: QuadraticProblem):
    """``v -> F v`` in F's factored form (exact zeros on M⊥, as ``prob.delta_u``)."""
    vecs, vals = prob.fisher_vectors, prob.fisher_values
    return lambda v: vecs @ (vals * (vecs.T @ v))


def _forecast(prob: QuadraticProblem) -> theory.Forecast:
    g = prob.ft_grad
    return theory.Forecast.from_vectors(jnp.zeros_like(g), _fisher_mv(prob), g, prob.ft_hessian @ g)


def _gamma_fisher(prob: QuadraticProblem) -> float:
    """``‖F^{1/2} P H g‖`` (F has no tail here, so ``‖F^{1/2} H g‖``), in F's factored form."""
    return float(jnp.sqrt(2 * prob.delta_u(prob.ft_hessian @ prob.ft_grad)))


def _lam_max(prob: QuadraticProblem) -> float:
    return float(lambda_max(prob.ft_hessian, method="dense").value)


def _observer(prob):
    return lambda th: {"delta_u": prob.delta_u(th), "theta": th}


# The simulations: one compiled program per record grid (`steps`, static) and problem shape;
# learning rates, momenta, noise levels and the problem itself are traced arguments.


@functools.partial(jax.jit, static_argnames="steps")
def simulate_sgd(prob, chol, sigma, lr, keys, steps: tuple):
    """Δu ``[seeds, K]`` of SGD with noise ``σ · chol @ z`` (z ~ N(0, I)), one run per key."""
    noise = lambda key, th: sigma * (chol @ jax.random.normal(key, th.shape, th.dtype))
    observe = lambda th: {"delta_u": prob.delta_u(th)}

    def one(key):
        traj = dynamics.run_optimizer(
            prob.ft_loss_fn, prob.theta_star, optax.sgd(lr), np.asarray(steps), observe,
            lr=lr, grad_noise=noise, key=key,
        )  # fmt: skip
        return traj.observables["delta_u"], traj.finite

    return jax.vmap(one)(keys)


@functools.partial(jax.jit, static_argnames="steps")
def simulate_momentum(prob, lr, beta, steps: tuple) -> dynamics.Trajectory:
    """``optax.sgd(lr, momentum=beta)`` from θ*, recording Δu and θ at ``steps``."""
    opt = optax.sgd(lr, momentum=beta)
    return dynamics.run_optimizer(
        prob.ft_loss_fn, prob.theta_star, opt, np.asarray(steps), _observer(prob), lr=lr
    )


@functools.partial(jax.jit, static_argnames="steps")
def simulate_adam(prob, lr, b1, b2, eps, steps: tuple) -> dynamics.Trajectory:
    """``optax.adam(lr, b1, b2, eps)`` from θ*, recording Δu and θ at ``steps``."""
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return dynamics.run_optimizer(
        prob.ft_loss_fn, prob.theta_star, opt, np.asarray(steps), _observer(prob), lr=lr
    )


# ----------------------------------------------------------------------------------------------
# SGD with gradient noise


def noise_shape(config: Config) -> jax.Array:
    """``S [n, n]``: SPD, eigenvalues log-spaced in [0.1, 10] in a random basis, ``tr S = n``."""
    n = config.n
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(10_000 + config.seed), (n, n)))
    s = (q * jnp.geomspace(0.1, 10.0, n)[None, :]) @ q.T
    return s * (n / jnp.trace(s))


def sgd_level(config: Config, index: int) -> dict:
    """E Δu under SGD with noise σ² S (Monte Carlo over seeds), its crossover, and theory."""
    prob = family_problem(config)
    sigma = config.noise_stds[index]
    shape = noise_shape(config)
    chol = jnp.linalg.cholesky(shape)
    lr, lam = config.sgd_lr, _lam_max(prob)
    steps = dynamics.log_steps(int(config.sgd_t_max / (lam * lr)), 90)
    keys = jax.random.split(jax.random.PRNGKey(1_000 * config.seed + index), config.noise_seeds)
    du, finite = simulate_sgd(prob, chol, sigma, lr, keys, tuple(int(k) for k in steps))
    if not bool(jnp.all(finite)):
        raise DivergenceError(f"an SGD run diverged at σ = {sigma}; lower sgd_lr")
    du = np.asarray(du)  # [seeds, T]
    t = lr * steps.astype(float)
    mean = du.mean(axis=0)
    stderr = du.std(axis=0, ddof=1) / math.sqrt(du.shape[0])
    det = np.asarray(prob.delta_u(prob.gd(steps, lr)))  # E δ_k is the noise-free GD path
    trace_fs = float(jnp.trace(prob.fisher @ (sigma**2 * shape)))
    exact_noise = np.asarray(
        theory.sgd_noise_delta_u(prob.fisher, prob.ft_hessian, sigma**2 * shape, lr, steps)
    )
    gamma = _gamma_fisher(prob)
    level = theory.SGD_CROSSOVER_SLOPE

    def slope_crossing(y, lvl):  # NaN if never: the stderr below is a nanstd
        return measure.finite_or(
            measure.crossing_time(t, y, lvl, scale="log_t", rising=True), math.nan
        )

    def crossover(y):
        return slope_crossing(fitting.local_slope(t, y), level)

    # the Monte-Carlo crossover's standard error from batch means
    batches = np.array_split(du, config.noise_batches)
    tb = np.array([crossover(b.mean(axis=0)) for b in batches])
    noise_part = mean - det
    equal = slope_crossing(det - noise_part, 0.0)  # where the two contributions are equal
    return {
        "sigma": sigma,
        "trace_f_sigma": trace_fs,
        "gamma_fisher": gamma,
        "lambda_max": lam,
        "lr": lr,
        "steps": steps.tolist(),
        "t": t.tolist(),
        "mean": mean.tolist(),
        "stderr": stderr.tolist(),
        "deterministic": det.tolist(),
        "exact_noise": exact_noise.tolist(),
        "t_c_predicted": float(theory.sgd_noise_crossover_time(lr, trace_fs, gamma)),
        "t_c_measured": _num(crossover(mean)),
        "t_c_measured_stderr": _num(np.nanstd(tb, ddof=1) / math.sqrt(np.isfinite(tb).sum())),
        "t_c_equal_contributions": _num(equal),
        "t_c_exact_expectation": _num(crossover(det + exact_noise)),
        "k_c_predicted": float(theory.sgd_noise_crossover_time(lr, trace_fs, gamma)) / lr,
    }


# ----------------------------------------------------------------------------------------------
# Heavy ball


def momentum_case(config: Config, beta: float) -> dict:
    prob = family_problem(config)
    lr = config.momentum_lr_eff * (1 - beta)
    steps = dynamics.log_steps(config.momentum_steps, 80)
    steps = steps[steps >= 2]  # Δu_1 = 0 exactly (δ_1 = −ηg ⟂ M)
    traj = simulate_momentum(prob, lr, beta, tuple(int(k) for k in steps)).checked()
    du = np.asarray(traj.observables["delta_u"])
    fc = _forecast(prob)
    ours = np.asarray(theory.momentum_forecast(fc, steps, lr, beta))
    a, _ = theory.momentum_coefficients(int(steps.max()), beta)
    t_eff = lr * np.asarray(a)[steps]
    # what one would predict without the k-dependent coefficients
    plain_gd = np.asarray(fc.gd(steps, lr))
    effective = np.asarray(fc.flow(lr * steps / (1 - beta)))
    lam = _lam_max(prob)
    small = t_eff * lam <= MOMENTUM_SMALL_T
    rel = np.abs(ours / du - 1)
    return {
        "beta": beta,
        "lr": lr,
        "lambda_max": lam,
        "steps": steps.tolist(),
        "t_eff": t_eff.tolist(),
        "delta_u": du.tolist(),
        "forecast": ours.tolist(),
        "forecast_plain_gd": plain_gd.tolist(),
        "forecast_effective_lr": effective.tolist(),
        "num_small_t": int(small.sum()),
        "max_rel_error_small_t": float(rel[small].max()),
        "max_rel_error_plain_gd_small_t": float(np.abs(plain_gd / du - 1)[small].max()),
        "max_rel_error_effective_lr_small_t": float(np.abs(effective / du - 1)[small].max()),
    }


# ----------------------------------------------------------------------------------------------
# Adam


def adam_orthogonal_problem(config: Config) -> QuadraticProblem:
    """A quadratic problem on which Adam's first step misses M: ``P D⁻¹ g = 0`` (D = |g| + ε).

    ``|g_i|`` uniform in [0.5, 1.5]/√n with random signs (no coordinate near zero, so Adam's
    expansion holds for many steps); M is a random d-dimensional subspace of ``(D⁻¹g)⊥`` with the
    family's Fisher eigenvalues; H is a random SPD matrix with eigenvalues in [1, 5] (generic
    coupling). Pg ≠ 0 here: gradient descent would leak at first order, Adam does not.
    """
    n, d = config.n, config.d
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(20_000 + config.seed), 4)
    mag = jax.random.uniform(k1, (n,), minval=0.5, maxval=1.5) / math.sqrt(n)
    g = mag * jnp.where(jax.random.bernoulli(k2, 0.5, (n,)), 1.0, -1.0)
    u = g / (jnp.abs(g) + config.adam_eps)
    r = jax.random.normal(k3, (n, n)).at[:, 0].set(u)
    q, _ = jnp.linalg.qr(r)  # q[:, 0] ∝ u; the rest span u⊥
    vecs = jnp.concatenate([q[:, 1 : d + 1], q[:, d + 1 :], q[:, :1]], axis=1)
    spec = QuadraticSpec(n=n, d=d)
    lam = jnp.geomspace(spec.lam_top[0], spec.lam_top[1], d)
    values = jnp.concatenate([lam, jnp.zeros(n - d)])
    fisher = (vecs * values[None, :]) @ vecs.T
    hq, _ = jnp.linalg.qr(jax.random.normal(k4, (n, n)))
    hess = (hq * jnp.geomspace(*spec.h_range, n)[None, :]) @ hq.T
    return QuadraticProblem(fisher, 0.5 * (hess + hess.T), g, values, vecs)


def adam_case(config: Config, problem: str, b1: float, b2: float) -> dict:
    prob = family_problem(config) if problem == "family" else adam_orthogonal_problem(config)
    lr, eps = config.adam_lr, config.adam_eps
    steps = np.arange(1, config.adam_steps + 1)
    traj = simulate_adam(prob, lr, b1, b2, eps, tuple(int(k) for k in steps)).checked()
    du = np.asarray(traj.observables["delta_u"])
    theta = np.asarray(traj.observables["theta"])
    g, hvp = prob.ft_grad, lambda v: prob.ft_hessian @ v
    delta2 = np.asarray(theory.adam_displacement(steps, lr, g, hvp, b1, b2, eps))
    disp_err = np.linalg.norm(theta - delta2, axis=1) / np.linalg.norm(theta, axis=1)
    fc = theory.AdamForecast.from_vectors(jnp.zeros_like(g), _fisher_mv(prob), g, hvp, eps)
    full = np.asarray(fc.evaluate(steps, lr, b1, b2))
    first = np.asarray(fc.first_order(steps, lr))
    coupling = np.asarray(fc.coupling_term(steps, lr, b1, b2))
    # the leading term: first order unless Adam's first step misses M (then the coupling term)
    leak = float(fc.gram[0, 0])
    u = g / (jnp.abs(g) + eps)
    orthogonal = leak <= 1e-12 * float(jnp.max(prob.fisher_values) * (u @ u))
    leading = coupling if orthogonal else first
    drift = np.asarray(theory.adam_gradient_drift(steps, lr, g, hvp, eps))
    flow_law = np.asarray(theory.quartic_coefficient(_gamma_fisher(prob)) * (lr * steps) ** 4)
    # k = 1: δ₁ = −ηu exactly, so Δu₁ = ½η² uᵀFu (0 up to rounding when Pu = 0): compare k ≥ 2
    cmp = steps >= 2
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_leading = np.abs(leading / du - 1)
        rel_full = np.abs(full / du - 1)
    return {
        "problem": problem,
        "b1": b1,
        "b2": b2,
        "eps": eps,
        "lr": lr,
        "steps": steps.tolist(),
        "delta_u": du.tolist(),
        "forecast": full.tolist(),
        "leading": leading.tolist(),
        "leading_kind": "coupling (η⁴)" if orthogonal else "first order (η²)",
        "flow_law": flow_law.tolist(),
        "u_fisher_u": leak,
        "pg_fisher_pg": float(2 * prob.delta_u(g)),
        "max_gradient_drift": float(drift.max()),
        "max_displacement_rel_error": float(disp_err.max()),
        "max_rel_error_leading": float(np.max(rel_leading[cmp])),
        "max_rel_error_forecast": float(np.max(rel_full[cmp])),
        "ratio_to_flow_law_at_last_step": float(du[-1] / flow_law[-1]),
        "delta_u_last": float(du[-1]),
    }


def adam_cases(config: Config) -> list[tuple[str, str, float, float]]:
    """(unit name, problem, b1, b2): the family problem at the first (b1, b2), the orthogonal
    problem at every (b1, b2)."""
    if len(config.adam_b1s) != len(config.adam_b2s):
        raise QuarticError("adam_b1s and adam_b2s must have the same length (they are zipped)")
    pairs = list(zip(config.adam_b1s, config.adam_b2s, strict=True))
    out = [(f"adam_family_b1={pairs[0][0]:g}_b2={pairs[0][1]:g}", "family", *pairs[0])]
    out += [(f"adam_orthogonal_b1={b1:g}_b2={b2:g}", "orthogonal", b1, b2) for b1, b2 in pairs]
    return out


# ----------------------------------------------------------------------------------------------


def run(config: Config, out_dir: pathlib.Path) -> dict:
    run_dir = RunDir(out_dir)
    run_dir.write_config(config)
    with jax.enable_x64(True):
        units = [
            (f"sgd_sigma{i}", lambda i=i: sgd_level(config, i))
            for i in range(len(config.noise_stds))
        ]
        units += [
            (f"momentum_beta={b:g}", lambda b=b: momentum_case(config, b))
            for b in config.momentum_betas
        ]
        units += [
            (name, lambda p=p, b1=b1, b2=b2: adam_case(config, p, b1, b2))
            for name, p, b1, b2 in adam_cases(config)
        ]
        sweep = run_sweep(units, out_dir, desc="optimisers")
    res = sweep.results

    metrics = []
    for name, r in res.items():
        if name.startswith("sgd"):
            for t, m, det in zip(r["t"], r["mean"], r["deterministic"], strict=True):
                metrics.append({"unit": name, "t": t, "mean_delta_u": m, "deterministic": det})
        else:
            for k, du, fc in zip(r["steps"], r["delta_u"], r["forecast"], strict=True):
                metrics.append({"unit": name, "step": k, "delta_u": du, "forecast": fc})
    write_jsonl_atomic(run_dir.metrics_path, metrics)

    sgd = {k: r for k, r in res.items() if k.startswith("sgd")}
    sgd_rows = {
        k: {
            key: r[key]
            for key in (
                "sigma", "trace_f_sigma", "t_c_predicted", "t_c_measured", "t_c_measured_stderr",
                "t_c_equal_contributions", "t_c_exact_expectation", "k_c_predicted",
            )
        }
        for k, r in sgd.items()
    }  # fmt: skip
    for row in sgd_rows.values():
        tm = row["t_c_measured"]
        row["rel_error"] = None if tm is None else tm / row["t_c_predicted"] - 1
    mom = {k: r for k, r in res.items() if k.startswith("momentum")}
    mom_rows = {
        k: {
            key: r[key]
            for key in (
                "beta", "lr", "num_small_t", "max_rel_error_small_t",
                "max_rel_error_plain_gd_small_t", "max_rel_error_effective_lr_small_t",
            )
        }
        for k, r in mom.items()
    }  # fmt: skip
    adam = {k: r for k, r in res.items() if k.startswith("adam")}
    adam_rows = {
        k: {
            key: r[key]
            for key in (
                "problem", "b1", "b2", "eps", "lr", "leading_kind", "u_fisher_u", "pg_fisher_pg",
                "max_gradient_drift", "max_displacement_rel_error", "max_rel_error_leading",
                "max_rel_error_forecast",
                "ratio_to_flow_law_at_last_step",
                "delta_u_last",
            )
        }
        for k, r in adam.items()
    }  # fmt: skip
    sgd_errs = [
        abs(r["rel_error"]) if r["rel_error"] is not None else math.inf for r in sgd_rows.values()
    ]
    adam_checked = [r for r in adam_rows.values() if r["b1"] != r["b2"]]
    summary = {
        "n_failed": sweep.failed,
        "sgd": sgd_rows,
        "momentum": mom_rows,
        "adam": adam_rows,
        "sgd_max_rel_error": _num(max(sgd_errs)) if sgd_errs else None,
        "sgd_ok": bool(sgd_errs) and max(sgd_errs) <= SGD_TOL and len(sgd_errs) >= 3,
        "momentum_max_rel_error": _num(
            max((r["max_rel_error_small_t"] for r in mom_rows.values()), default=math.nan)
        ),
        "adam_max_rel_error_leading": _num(
            max((r["max_rel_error_leading"] for r in adam_checked), default=math.nan)
        ),
    }
    # b1 = b2: the η⁴ coupling term cancels; how much smaller is the measured Δu at the last step
    # than with the same b1 and b2 ≠ b1 (same problem, same steps)?
    same = [r for r in adam_rows.values() if r["problem"] == "orthogonal" and r["b1"] == r["b2"]]
    diff = [r for r in adam_rows.values() if r["problem"] == "orthogonal" and r["b1"] != r["b2"]]
    pairs = [(a, b) for a in same for b in diff if a["b1"] == b["b1"]]
    summary["adam_b1_eq_b2_suppression"] = (
        pairs[0][0]["delta_u_last"] / pairs[0][1]["delta_u_last"] if pairs else None
    )
    summary["momentum_ok"] = (
        summary["momentum_max_rel_error"] is not None
        and summary["momentum_max_rel_error"] <= MOMENTUM_TOL
    )
    summary["adam_ok"] = (
        summary["adam_max_rel_error_leading"] is not None
        and summary["adam_max_rel_error_leading"] <= ADAM_TOL
    )
    write_json_atomic(run_dir.summary_path, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Figure


def _guide(ax, x0, y0, order, decades=1.0, label=None):
    xs = np.array([x0, x0 * 10**decades])
    ax.plot(xs, y0 * (xs / x0) ** order, color="k", lw=1, ls=":")
    ax.annotate(label or f"slope {order}", (xs[1], y0 * 10 ** (decades * order)), fontsize=8)


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = RunDir(out_dir)
    units = {k: r["result"] for k, r in run_dir.units().items() if r["status"] == "done"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))

    # (a) SGD: E Δu, theory and crossover
    ax = axes[0, 0]
    sgd = sorted((k for k in units if k.startswith("sgd")), key=lambda k: units[k]["sigma"])
    for i, name in enumerate(sgd):
        r = units[name]
        t, mean, se = (np.asarray(r[k]) for k in ("t", "mean", "stderr"))
        c = f"C{i}"
        ax.loglog(t, mean, color=c, lw=1.8, label=f"σ = {r['sigma']:g}: MC mean ({len(t)} records)")
        ax.fill_between(t, np.maximum(mean - 2 * se, 1e-300), mean + 2 * se, color=c, alpha=0.2)
        theo = np.asarray(
            theory.sgd_expected_delta_u(t, r["lr"], r["trace_f_sigma"], r["gamma_fisher"])
        )
        ax.loglog(t, theo, color="k", lw=0.8, ls="--")
        ax.axvline(r["t_c_predicted"], color=c, ls="-.", lw=0.8)
        if r["t_c_measured"]:
            yc = np.interp(np.log(r["t_c_measured"]), np.log(t), mean)
            ax.plot(r["t_c_measured"], yc, "o", color=c, mfc="none", ms=9)
    if sgd:
        r = units[sgd[0]]
        t = np.asarray(r["t"])
        # from k = 2 on (δ₁ = −ηg is orthogonal to M: Δu₁ is rounding)
        ax.loglog(
            t[1:], np.asarray(r["deterministic"])[1:], color="0.4", lw=1,
            label="noise-free GD (the γ_F²t⁴/8 term)",
        )  # fmt: skip
    ax.set_xlabel("t = η k")
    ax.set_ylabel("E Δu")
    ax.set_title(
        "noisy SGD: dashed ½ηt·tr(FΣ) + γ_F²t⁴/8; dash-dot t_c predicted; o measured", fontsize=9
    )
    ax.legend(fontsize=7)

    # (b) SGD: local slopes collapse at t / t_c = 1
    ax = axes[0, 1]
    for i, name in enumerate(sgd):
        r = units[name]
        t, mean = np.asarray(r["t"]), np.asarray(r["mean"])
        x = t / r["t_c_predicted"]
        ax.semilogx(x, fitting.local_slope(t, mean), color=f"C{i}", label=f"σ = {r['sigma']:g}")
        ex = np.asarray(r["deterministic"]) + np.asarray(r["exact_noise"])
        ax.semilogx(x, fitting.local_slope(t, ex), color=f"C{i}", ls="--", lw=0.8)
        theo = np.asarray(
            theory.sgd_expected_delta_u(t, r["lr"], r["trace_f_sigma"], r["gamma_fisher"])
        )
        ax.semilogx(x, fitting.local_slope(t, theo), color="k", lw=0.6, ls=":")
    ax.axhline(theory.SGD_CROSSOVER_SLOPE, color="k", lw=0.6)
    ax.axvline(1.0, color="k", lw=0.6)
    for level in (1, 4):
        ax.axhline(level, color="k", lw=0.4, ls=":")
    ax.set_xlabel("t / t_c (predicted)")
    ax.set_ylabel("local slope of E Δu")
    ax.set_title(
        "slopes: MC (solid), exact expectation (dashed), two-term law (dotted)", fontsize=9
    )
    ax.legend(fontsize=7)

    # (c) momentum
    ax = axes[0, 2]
    mom = sorted((k for k in units if k.startswith("momentum")), key=lambda k: units[k]["beta"])
    for i, name in enumerate(mom):
        r = units[name]
        k = np.asarray(r["steps"])
        ax.loglog(k, r["delta_u"], "o", ms=3, color=f"C{i}", label=f"β = {r['beta']:g}: simulated")
        ax.loglog(k, r["forecast"], "-", color=f"C{i}", lw=1.2)
        ax.loglog(k, r["forecast_effective_lr"], "--", color=f"C{i}", lw=0.8)
    if mom:
        _guide(ax, 3, 1e-30, 4, label="k⁴")
        _guide(ax, 30, 1e-30, 8, decades=0.7, label="k⁸")
    ax.set_xlabel("step k")
    ax.set_ylabel("Δu_k")
    ax.set_title("heavy ball: ½η⁴b_k²γ_F² (solid) vs GD at η/(1−β) (dashed)", fontsize=9)
    ax.legend(fontsize=7)

    # (d) Adam
    ax = axes[1, 0]
    adam = sorted(k for k in units if k.startswith("adam"))
    for i, name in enumerate(adam):
        r = units[name]
        k = np.asarray(r["steps"])
        du = np.asarray(r["delta_u"])
        lab = f"{r['problem']}, b1={r['b1']:g}, b2={r['b2']:g}"
        pos = du > 0
        ax.loglog(k[pos], du[pos], "o", ms=2.5, color=f"C{i}", label=lab)
        lead = np.asarray(r["leading"])
        ax.loglog(k[lead > 0], lead[lead > 0], "-", color=f"C{i}", lw=1.0)
        if r["problem"] == "family":
            ax.loglog(k, r["flow_law"], ":", color=f"C{i}", lw=1.0, label="flow law γ_F²(ηk)⁴/8")
    _guide(ax, 2, 1e-26, 2, label="k²")
    _guide(ax, 2, 1e-32, 4, label="k⁴")
    ax.set_xlabel("step k")
    ax.set_ylabel("Δu_k")
    ax.set_title(
        "Adam: leading terms (lines): ½(ηk)²uᵀFu, or the coupling term if PD⁻¹g = 0", fontsize=9
    )
    ax.legend(fontsize=7)

    # (e), (f): relative errors
    ax = axes[1, 1]
    for i, name in enumerate(mom):
        r = units[name]
        x = np.asarray(r["t_eff"]) * r["lambda_max"]
        du = np.asarray(r["delta_u"])
        ax.loglog(
            x, np.abs(np.asarray(r["forecast"]) / du - 1), color=f"C{i}", label=f"β = {r['beta']:g}"
        )
        ax.loglog(
            x, np.abs(np.asarray(r["forecast_plain_gd"]) / du - 1), color=f"C{i}", ls=":", lw=0.8
        )
    ax.axhline(MOMENTUM_TOL, color="r", lw=0.8)
    ax.axvline(MOMENTUM_SMALL_T, color="k", lw=0.6, ls="--")
    ax.set_xlabel("η a_k · λ_max(H)")
    ax.set_ylabel("|forecast / simulated − 1|")
    ax.set_title(
        "heavy ball: our forecast (solid), plain GD forecast (dotted); 10 % line", fontsize=9
    )
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    for i, name in enumerate(adam):
        r = units[name]
        k, du = np.asarray(r["steps"]), np.asarray(r["delta_u"])
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.abs(np.asarray(r["leading"]) / du - 1)
            err_full = np.abs(np.asarray(r["forecast"]) / du - 1)
        ax.loglog(
            k[1:], err[1:], color=f"C{i}", label=f"{r['problem']}, b1={r['b1']:g}, b2={r['b2']:g}"
        )
        ax.loglog(k[1:], err_full[1:], color=f"C{i}", ls=":", lw=0.8)
    ax.axhline(ADAM_TOL, color="r", lw=0.8)
    ax.set_xlabel("step k")
    ax.set_ylabel("|theory / simulated − 1|")
    ax.set_title("Adam: leading term (solid), full second-order forecast (dotted)", fontsize=9)
    ax.legend(fontsize=7)

    return [plotting.save(fig, pathlib.Path(fig_dir) / "optimisers.png")]


def table(summary: dict) -> list[dict]:
    rows = []
    for r in summary.get("sgd", {}).values():
        err = r["rel_error"]
        rows.append(
            {
                "quantity": f"SGD crossover t_c, σ = {r['sigma']:g}",
                "theory": r["t_c_predicted"],
                "measured": r["t_c_measured"],
                "verdict": "ok" if err is not None and abs(err) <= SGD_TOL else "off",
            }
        )
    for r in summary.get("momentum", {}).values():
        rows.append(
            {
                "quantity": f"heavy ball β = {r['beta']:g}: max rel. error (η a_k λ ≤ {MOMENTUM_SMALL_T})",
                "theory": 0.0,
                "measured": r["max_rel_error_small_t"],
                "verdict": "ok" if r["max_rel_error_small_t"] <= MOMENTUM_TOL else "off",
            }
        )
    for r in summary.get("adam", {}).values():
        if r["b1"] == r["b2"]:
            # the η² displacement term, hence the η⁴ coupling term of Δu, cancels: report how much
            # smaller Δu is than with b2 ≠ b1 (theory: (ε/|g|)² at this order; 0 here)
            sup = summary.get("adam_b1_eq_b2_suppression")
            rows.append(
                {
                    "quantity": f"Adam {r['problem']} b1 = b2 = {r['b1']:g}: Δu / Δu(b2 ≠ b1), "
                    "last step (coupling cancels)",
                    "theory": 0.0,
                    "measured": sup,
                    "verdict": "ok" if sup is not None and sup < 1e-6 else "off",
                }
            )
            continue
        ok = r["max_rel_error_leading"] <= ADAM_TOL
        rows.append(
            {
                "quantity": f"Adam {r['problem']} b1={r['b1']:g} b2={r['b2']:g}: "
                f"leading {r['leading_kind']}, max rel. error",
                "theory": 0.0,
                "measured": r["max_rel_error_leading"],
                "verdict": "ok" if ok else "off",
            }
        )
    return rows


if __name__ == "__main__":
    from quartic.harness.cli import main

    raise SystemExit(main(["run", "optimisers", *sys.argv[1:]]))
