"""quartic against the tools users would otherwise run, in the same process, on the same inputs.

* **PyHessian** (PyPI ``pyhessian`` 0.1, the package itself, unmodified): ``hessian(model,
  criterion, data).eigenvalues(top_n=5)`` — power iteration with deflation, its defaults
  (``maxIter=100, tol=1e-3``) — on the torch port of the same transformer with the same weights
  (the port is checked to 1e-6 first), against quartic's Lanczos (``lanczos_eigh``, top-5, exact
  residuals included in the time) at several Krylov sizes; both against the dense float64 oracle.
* **alignment-risk** (PyPI ``alignment-risk`` 1.14.1, the package itself, its
  ``AlignmentRiskPipeline``) on quadratic problems whose exact gradient-descent path is known:
  its predicted collapse step and curve, quartic's (``check_aic`` -> ``Forecast.gd``), and the
  exact simulation, side by side.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import aic, curvature, problems, pytree


def available() -> dict[str, str | None]:
    """Versions of the peers that import here (``None``: missing)."""
    out = {}
    for name in ("torch", "pyhessian", "alignment_risk"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception:  # ImportError, or a broken install
            out[name] = None
    if out.get("pyhessian") == "installed":
        from importlib.metadata import version

        out["pyhessian"] = version("pyhessian")
    return out


# ----------------------------------------------------------------------------------------------
# PyHessian


def _top_errors(values, exact_desc, exact_all):
    """Relative errors of 5 eigenvalue estimates: vs the algebraic top-5 and vs the 5 largest in
    magnitude (what power iteration converges to on an indefinite Hessian), each ``max |Δλ| / |λ_1|``.
    """
    v = np.sort(np.asarray(values, np.float64))[::-1]
    k = v.shape[0]
    alg = exact_desc[:k]
    mag = exact_all[np.argsort(-np.abs(exact_all))[:k]]
    mag = np.sort(mag)[::-1]
    scale = np.abs(exact_all).max()
    return float(np.abs(v - alg).max() / scale), float(np.abs(v - mag).max() / scale)


def pyhessian_vs_lanczos(prob, lm_loss, hessian: np.ndarray, quick: bool, repeats: int = 3) -> dict:
    import torch
    from pyhessian import hessian as PyHessian

    from peers.torch_transformer import from_flax, max_logit_difference

    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    model = from_flax(prob.config, prob.params, torch.float64)
    port_err = max_logit_difference(model, prob.apply_fn, prob.params, prob.batch["tokens"])
    if port_err > 1e-6:
        raise RuntimeError(f"the torch port disagrees with the flax model by {port_err:.3g}")
    tokens = torch.as_tensor(np.array(prob.batch["tokens"]), dtype=torch.long)
    targets = torch.as_tensor(np.array(prob.batch["targets"]), dtype=torch.long)
    vocab = prob.config.vocab_size

    def criterion(logits, y):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    loss_torch = float(criterion(model(tokens), targets))
    loss_jax = float(lm_loss(prob.apply_fn, prob.params, prob.batch))

    exact_all = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))
    exact_desc = exact_all[::-1]

    ph_runs = []
    for r in range(repeats):
        torch.manual_seed(r)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        h = PyHessian(model, criterion, data=(tokens, targets), cuda=False)
        vals, _ = h.eigenvalues(top_n=5)  # defaults: maxIter=100, tol=1e-3
        dt = time.perf_counter() - t0
        e_alg, e_mag = _top_errors(vals, exact_desc, exact_all)
        ph_runs.append(
            {
                "time_s": dt,
                "values": [float(x) for x in vals],
                "err_top": e_alg,
                "err_magnitude": e_mag,
                "err": min(e_alg, e_mag),
            }
        )
    ph_time = statistics.median(r["time_s"] for r in ph_runs)
    ph_err = statistics.median(r["err"] for r in ph_runs)

    f, theta, _ = pytree.flat_fn(lambda p, b: lm_loss(prob.apply_fn, p, b), prob.params, prob.batch)
    n = theta.shape[0]
    ours = []
    for m in [10, 20, 40, 80] if quick else [8, 10, 15, 20, 30, 40, 60, 80]:
        fn = jax.jit(
            lambda th, m=m: (
                curvature.lanczos_eigh(
                    curvature.hvp_fn(f, th), n, 5, 0, num_iters=m, dtype=th.dtype
                ).top
            )
        )
        t0 = time.perf_counter()
        compiled = fn.lower(theta).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(theta))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            top = jax.block_until_ready(compiled(theta))
            times.append(time.perf_counter() - t0)
        e_alg, _ = _top_errors(np.asarray(top.values), exact_desc, exact_all)
        ours.append(
            {
                "num_iters": m,
                "num_hvps": m + 5,
                "time_s": statistics.median(times),
                "compile_s": compile_s,
                "err": e_alg,
                "max_residual": float(np.max(np.asarray(top.residuals))),
            }
        )

    as_good = [o for o in ours if o["err"] <= ph_err]
    fast = min(as_good, key=lambda o: o["time_s"]) if as_good else None
    in_time = [o for o in ours if o["time_s"] <= ph_time]
    best = min(in_time, key=lambda o: o["err"]) if in_time else None
    tiny = np.finfo(np.float64).eps
    return {
        "n": int(n),
        "port_max_logit_diff": port_err,
        "loss_torch": loss_torch,
        "loss_jax": loss_jax,
        "exact_top5": exact_desc[:5].tolist(),
        "exact_min": float(exact_all[0]),
        "pyhessian": {
            "runs": ph_runs,
            "time_s": ph_time,
            "err": ph_err,
            "settings": "eigenvalues(top_n=5), maxIter=100, tol=1e-3 (defaults)",
        },
        "quartic_lanczos": ours,
        "speedup_at_equal_accuracy": (ph_time / fast["time_s"]) if fast else None,
        "speedup_config": fast,
        "accuracy_gain_at_equal_time": (ph_err / max(best["err"], tiny)) if best else None,
        "accuracy_config": best,
    }


# ----------------------------------------------------------------------------------------------
# alignment-risk


def _torch_quadratic(prob: problems.QuadraticProblem, rank: int):
    """alignment-risk's inputs for a quadratic problem, exact in float64.

    Safety data: for each of the ``rank`` Fisher directions ``v_j`` two samples ``(a_j, ±1)`` with
    ``a_j = √(rank λ_j) v_j`` and per-sample loss ``½ (y − a·θ)²``. The mean safety loss is
    ``½ + ½ θᵀFθ`` (the problem's L_A plus a constant), its gradient at θ* = 0 vanishes, and the
    per-sample gradients ``−y a_j`` give an empirical Fisher equal to the rank-d F exactly — the
    most favourable input its estimator can get. Fine-tuning data: one batch, ``L_FT = gᵀθ + ½θᵀHθ``.
    """
    import torch

    w = np.asarray(prob.fisher_values)
    v = np.asarray(prob.fisher_vectors)
    top = np.argsort(-w)[:rank]
    a = np.stack([np.sqrt(rank * w[j]) * v[:, j] for j in top])
    xs = torch.as_tensor(np.concatenate([a, a]), dtype=torch.float64)
    ys = torch.as_tensor(np.concatenate([np.ones(rank), -np.ones(rank)]), dtype=torch.float64)
    h = torch.as_tensor(np.array(prob.ft_hessian), dtype=torch.float64)
    g = torch.as_tensor(np.array(prob.ft_grad), dtype=torch.float64)

    class Theta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(g.shape[0], dtype=torch.float64))

    model = Theta()

    def safety_loss(m, batch):
        x, y = batch
        return 0.5 * (y - x @ m.theta) ** 2

    def ft_loss(m, batch):
        del batch
        return g @ m.theta + 0.5 * m.theta @ (h @ m.theta)

    safety = [(xs[i : i + 1], ys[i : i + 1]) for i in range(xs.shape[0])]
    finetune = [(torch.zeros(1, 1, dtype=torch.float64),)]
    return model, safety, safety_loss, finetune, ft_loss


def _first_crossing(curve: np.ndarray, threshold: float) -> int | None:
    hit = np.flatnonzero(curve >= threshold)
    return int(hit[0]) if hit.size else None


def alignment_risk_vs_quartic(
    seeds, spec: problems.QuadraticSpec, lr: float, threshold: float, max_steps: int
) -> dict:
    from alignment_risk import AlignmentRiskPipeline, PipelineConfig
    from alignment_risk.fisher import FisherConfig
    from alignment_risk.forecast import ForecastConfig

    rows = []
    steps = np.arange(max_steps + 1)
    for seed in seeds:
        prob, _ = problems.make_quadratic(jax.random.PRNGKey(seed), spec)
        # exact gradient descent, every step: Δu_k = ½ δ_kᵀ F δ_k
        exact = np.asarray(prob.delta_u(prob.gd(jnp.asarray(steps, jnp.float64), lr)))
        k_exact = _first_crossing(exact, threshold)

        t0 = time.perf_counter()
        rep = aic.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, spec.d)
        ours_curve = np.asarray(rep.forecast.gd(jnp.asarray(steps, jnp.float64), lr))
        ours_s = time.perf_counter() - t0
        quartic_law = rep.quartic_coefficient * (lr * steps) ** 4

        model, safety, safety_loss, finetune, ft_loss = _torch_quadratic(prob, spec.d)
        cfg = PipelineConfig(
            fisher=FisherConfig(top_rank=spec.d, target_explained_variance=None, device="cpu"),
            forecast=ForecastConfig(
                max_steps=max_steps, step_size=1.0, collapse_loss_threshold=threshold
            ),
            learning_rate=lr,
        )
        cfg.curvature.device = "cpu"
        t0 = time.perf_counter()
        report = AlignmentRiskPipeline(cfg).run(model, safety, safety_loss, finetune, ft_loss)
        ar_s = time.perf_counter() - t0
        ar_curve = np.asarray(report.forecast.estimated_loss, np.float64)

        def at(curve, k):
            return float(curve[k]) if k is not None else None

        def step_err(k, k_exact=k_exact):
            if k is None or k_exact is None:
                return None
            return abs(k - k_exact) / k_exact

        k_ar = report.forecast.collapse_step
        k_ours = _first_crossing(ours_curve, threshold)
        k_law = _first_crossing(quartic_law, threshold)
        rows.append(
            {
                "seed": int(seed),
                "exact_collapse_step": k_exact,
                "alignment_risk_collapse_step": k_ar,
                "quartic_forecast_collapse_step": k_ours,
                "quartic_law_collapse_step": k_law,
                "alignment_risk_step_rel_err": step_err(k_ar),
                "quartic_forecast_step_rel_err": step_err(k_ours),
                "quartic_law_step_rel_err": step_err(k_law),
                # the curves at the exact collapse step, as a ratio to the exact Δu there
                "alignment_risk_curve_ratio": (at(ar_curve, k_exact) / exact[k_exact])
                if k_exact
                else None,
                "quartic_forecast_curve_ratio": (at(ours_curve, k_exact) / exact[k_exact])
                if k_exact
                else None,
                "alignment_risk_gamma_hat": report.curvature.gamma_hat,
                "quartic_gamma_fisher": rep.gamma_fisher,
                "alignment_risk_s": ar_s,
                "quartic_s": ours_s,
                "warning": report.warning,
            }
        )
    return {
        "spec": {"n": spec.n, "d": spec.d, "leak": spec.leak, "coupling": spec.coupling},
        "lr": lr,
        "threshold": threshold,
        "max_steps": max_steps,
        "rows": rows,
    }
