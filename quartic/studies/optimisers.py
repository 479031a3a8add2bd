"""Other optimisers from θ* on the quadratic family: noisy SGD, heavy-ball momentum and Adam, simulated
with optax (vmapped over noise seeds) next to their leading Δu terms in :mod:`quartic.core.theory`.

The measurements behind ``experiments/optimisers.py`` (docs/optimisers.md). Each case takes the
experiment's ``config`` (any object with its fields: ``n, d, coupling, seed``, the ``sgd_*``,
``noise_*``, ``momentum_*`` and ``adam_*`` settings) and returns a JSON-able dict:

- :func:`sgd_level`: one noise level, the Monte-Carlo mean of Δu, its crossover (local slope 2.5)
  and the predicted one;
- :func:`momentum_case`: heavy ball at one β against ``δ_k = −η a_k g + η² b_k Hg``;
- :func:`adam_case`: Adam on the family or on :func:`adam_orthogonal_problem` against its leading
  term.

The simulators (:func:`simulate_sgd`, :func:`simulate_momentum`, :func:`simulate_adam`) compile once
per record grid (``steps``, static) and problem shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quartic.core import dynamics, fitting, measure, theory
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.measure import json_number
from quartic.core.problems import QuadraticProblem, QuadraticSpec, make_quadratic
from quartic.core.subspace import lambda_max

#: "Small t" for heavy ball: the records with η a_k λ_max(H) at most this.
MOMENTUM_SMALL_T = 0.05


def family_problem(config) -> QuadraticProblem:
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


def noise_shape(config) -> jax.Array:
    """``S [n, n]``: SPD, eigenvalues log-spaced in [0.1, 10] in a random basis, ``tr S = n``."""
    n = config.n
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(10_000 + config.seed), (n, n)))
    s = (q * jnp.geomspace(0.1, 10.0, n)[None, :]) @ q.T
    return s * (n / jnp.trace(s))


def sgd_level(config, index: int) -> dict:
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
        "t_c_measured": json_number(crossover(mean)),
        "t_c_measured_stderr": json_number(
            np.nanstd(tb, ddof=1) / math.sqrt(np.isfinite(tb).sum())
        ),
        "t_c_equal_contributions": json_number(equal),
        "t_c_exact_expectation": json_number(crossover(det + exact_noise)),
        "k_c_predicted": float(theory.sgd_noise_crossover_time(lr, trace_fs, gamma)) / lr,
    }


# ----------------------------------------------------------------------------------------------
# Heavy ball


def momentum_case(config, beta: float) -> dict:
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


def adam_orthogonal_problem(config) -> QuadraticProblem:
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


def adam_case(config, problem: str, b1: float, b2: float) -> dict:
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


def adam_cases(config) -> list[tuple[str, str, float, float]]:
    """(unit name, problem, b1, b2): the family problem at the first (b1, b2), the orthogonal
    problem at every (b1, b2)."""
    if len(config.adam_b1s) != len(config.adam_b2s):
        raise QuarticError("adam_b1s and adam_b2s must have the same length (they are zipped)")
    pairs = list(zip(config.adam_b1s, config.adam_b2s, strict=True))
    out = [(f"adam_family_b1={pairs[0][0]:g}_b2={pairs[0][1]:g}", "family", *pairs[0])]
    out += [(f"adam_orthogonal_b1={b1:g}_b2={b2:g}", "orthogonal", b1, b2) for b1, b2 in pairs]
    return out


# ----------------------------------------------------------------------------------------------
# The sweep's results, summarised


def metric_rows(res: dict) -> list[dict]:
    """One row per record of every case (``res``: unit name -> result of a case above)."""
    metrics = []
    for name, r in res.items():
        if name.startswith("sgd"):
            for t, m, det in zip(r["t"], r["mean"], r["deterministic"], strict=True):
                metrics.append({"unit": name, "t": t, "mean_delta_u": m, "deterministic": det})
        else:
            for k, du, fc in zip(r["steps"], r["delta_u"], r["forecast"], strict=True):
                metrics.append({"unit": name, "step": k, "delta_u": du, "forecast": fc})
    return metrics


def summarise(res: dict, failed: int, sgd_tol: float, momentum_tol: float, adam_tol: float) -> dict:
    """The summary of a sweep of the cases above: per-case rows, the largest errors and whether
    each is within its tolerance."""
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
        "n_failed": failed,
        "sgd": sgd_rows,
        "momentum": mom_rows,
        "adam": adam_rows,
        "sgd_max_rel_error": json_number(max(sgd_errs)) if sgd_errs else None,
        "sgd_ok": bool(sgd_errs) and max(sgd_errs) <= sgd_tol and len(sgd_errs) >= 3,
        "momentum_max_rel_error": json_number(
            max((r["max_rel_error_small_t"] for r in mom_rows.values()), default=math.nan)
        ),
        "adam_max_rel_error_leading": json_number(
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
        and summary["momentum_max_rel_error"] <= momentum_tol
    )
    summary["adam_ok"] = (
        summary["adam_max_rel_error_leading"] is not None
        and summary["adam_max_rel_error_leading"] <= adam_tol
    )
    return summary
