"""Alignment collapse in a small transformer, measured exactly (the paper's experiment in miniature).

:class:`CollapseSetup` holds an aligned transformer θ* (from
:func:`quartic.training.make_aligned_model`) and flat views of every loss: the two alignment losses
of a harm category (the refusal cross-entropy that alignment minimised, and the KL drift from θ*'s
own answers, whose gradient at θ* is exactly zero and whose Hessian is exactly the true Fisher),
the answer logits (for Fisher matrices), and each benign task's loss. The functions below measure,
for one skill or one (skill, task) pair, what THEORY.md §3–4 predicts, in float64:

- :func:`skill_curvature`: the true Fisher (dense, from batched products), its spectrum, and how
  the Gauss–Newton part of the refusal Hessian, the Hessians themselves, the Monte-Carlo Fisher and
  the empirical Fisher compare with it;
- :func:`task_law`: the AIC at θ*, the simulated Δu(t) along the RK4 flow for both losses, the
  second-order forecast with the gradient term, the pure quartic prediction, the exact Taylor-mode
  coefficients;
- :func:`orthogonal_variant`: the same task with the Fisher-visible part of g removed at θ*
  (onto the range of F, or onto M only), where the premises of the law hold by construction;
- :func:`long_finetune`: longer gradient descent (full or LoRA) with the harmfulness rate,
  retention, the overlap score and Δu recorded along the way.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quartic import aic, curvature, dynamics, fitting, pytree, theory
from quartic.tasks import token_world as tw


def _kl_answer(apply_fn, params, data):
    """Mean ``KL(p_θ* ‖ p_θ)`` of the first-answer distributions; ``data`` carries θ*'s answer
    probabilities (``ref_p``, ``ref_logp``) so the compiled program holds no constant to fold."""
    logp = jax.nn.log_softmax(tw.answer_logits(apply_fn, params, data), axis=-1)
    return jnp.mean(jnp.sum(data["ref_p"] * (data["ref_logp"] - logp), axis=-1))


@dataclasses.dataclass
class CollapseSetup:
    """θ* of a transformer with its skill's alignment losses and the benign tasks' losses.

    Every loss is a pure function ``f(theta, data)`` of the flat parameters ``theta [n]`` and its
    data, which is passed as an argument: one compilation serves every task (the task batches
    share a shape), and nothing large is baked into a compiled program.
    """

    apply_fn: Callable
    params: dict  # θ* as the model's pytree
    world: tw.TokenWorld
    category: int

    def __post_init__(self):
        self.theta, self.to_params = pytree.ravel(self.params)
        apply_fn, to_params = self.apply_fn, self.to_params
        self.skill = {
            k: jnp.asarray(v) for k, v in self.world.skill(self.category, "train").items()
        }
        ref = jax.jit(lambda p, b: tw.answer_logits(apply_fn, p, b))(self.params, self.skill)
        ref_logp = jax.nn.log_softmax(ref, axis=-1)
        self.kl_data = {**self.skill, "ref_p": jnp.exp(ref_logp), "ref_logp": ref_logp}
        self.align_fns = {
            "refusal": lambda th, b: tw.refusal_loss(apply_fn, to_params(th), b),
            "kl": lambda th, d: _kl_answer(apply_fn, to_params(th), d),
        }
        self.align_data = {"refusal": self.skill, "kl": self.kl_data}
        self.lm_fn = lambda th, b: tw.lm_loss(apply_fn, to_params(th), b)
        self.answer_logits = lambda th: tw.answer_logits(apply_fn, to_params(th), self.skill)
        self.harmful_heldout = tw.concat(
            [self.world.skill(k, "heldout") for k in range(self.world.config.n_categories)]
        )
        self.retention_batch = self.world.benign("heldout")
        self._compiled = {}

    @property
    def n(self) -> int:
        return int(self.theta.shape[0])

    def align(self, name: str) -> Callable[[jax.Array], jax.Array]:
        """Flat ``L_A(θ)`` (closes over its data; for HVP closures and one-off use)."""
        fn, data = self.align_fns[name], self.align_data[name]
        return lambda th: fn(th, data)

    def align_value(self, name: str, theta: jax.Array) -> jax.Array:
        """``L_A(θ)``, compiled once per loss."""
        key = ("value", name)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(self.align_fns[name])
        return self._compiled[key](theta, self.align_data[name])

    def task_batch(self, task: str, rows: np.ndarray | None = None) -> dict:
        """A benign task's train batch (or ``"harmful"``: the harmful-compliance control)."""
        batch = (
            self.world.harmful_finetune() if task == "harmful" else self.world.task(task, "train")
        )
        if rows is not None:
            batch = {k: np.asarray(v)[rows] for k, v in batch.items()}
        return {k: jnp.asarray(v) for k, v in batch.items()}


def answer_jacobian(setup: CollapseSetup) -> tuple[jax.Array, jax.Array]:
    """Per-example Jacobian of the skill's answer logits at θ*, ``[N, V, n]``, and the logits."""
    tokens = jnp.asarray(setup.skill["tokens"])
    pos = tw.first_answer_position(setup.skill["mask"])

    def single(th, tok, p):
        return setup.apply_fn(setup.to_params(th), tok[None, :])[0, p, :]

    jac = jax.jit(lambda th: curvature.per_example_jacobian(single, th, tokens, pos))(setup.theta)
    return jac, setup.answer_logits(setup.theta)


def dense_fisher(setup: CollapseSetup) -> jax.Array:
    """The exact true Fisher ``[n, n]`` of the skill's answer distribution at θ*."""
    jac, logits = answer_jacobian(setup)
    return jax.jit(curvature.fisher_from_jacobian)(jac, logits)


def skill_curvature(
    setup: CollapseSetup, rank: int, key: jax.Array, mc_samples: int = 8, num_probes: int = 8
) -> tuple[dict, jax.Array]:
    """The skill's true Fisher (dense, exact) with its spectrum, and how every other curvature
    compares with it. Returns ``(numbers, fisher)``.

    - the Gauss–Newton part of the refusal Hessian, by a second route (the autodiff Hessian of the
      cross-entropy in the logits, sandwiched by J), against F: equal to float64 precision;
    - F against the matvec form (jvp/vjp, no Jacobian) on random probes;
    - the exact Hessians of both alignment losses against F, on F's top-d eigenvectors and on
      random probes (HVPs): the KL drift's equals F; the refusal loss's differs by its residual term;
    - the Monte-Carlo and empirical Fishers: relative distance and top-d subspace overlap.
    """
    th = setup.theta
    jac, z = answer_jacobian(setup)
    fisher = jax.jit(curvature.fisher_from_jacobian)(jac, z)
    ce = lambda zz: -jnp.mean(jax.nn.log_softmax(zz, -1)[:, tw.REFUSE])
    hz = jax.vmap(jax.hessian(lambda zi: ce(zi[None, :])))(z) / z.shape[0]  # [N, V, V]
    gn = jax.jit(lambda j, h: jnp.einsum("avp,avw,awq->pq", j, h, j))(jac, hz)
    w, v = jnp.linalg.eigh(fisher)
    w, v = w[::-1], v[:, ::-1]
    trace = float(jnp.sum(w))
    fnorm = float(jnp.linalg.norm(fisher))
    probes = jax.random.normal(key, (setup.n, num_probes), th.dtype)
    probes = jnp.concatenate(
        [v[:, :rank], probes / jnp.linalg.norm(probes, axis=0, keepdims=True)], 1
    )
    f_probes = fisher @ probes

    def probe_rel(mv):
        got = jax.jit(jax.vmap(mv, in_axes=1, out_axes=1))(probes)
        return float(jnp.linalg.norm(got - f_probes) / jnp.linalg.norm(f_probes))

    def top_overlap(a):
        _, va = jnp.linalg.eigh(curvature.symmetrize(a))
        return float(jnp.sum((va[:, ::-1][:, :rank].T @ v[:, :rank]) ** 2) / rank)

    out = {
        "n": setup.n,
        "rank": rank,
        "eigenvalues": np.asarray(w[: max(50, rank)]).tolist(),
        "trace": trace,
        "share_top_d": float(jnp.sum(w[:rank]) / trace),
        "share_top": {
            d: float(jnp.sum(w[:d]) / trace) for d in (1, 2, 5, 10, 20, 50) if d < setup.n
        },
        "effective_rank": float(trace**2 / jnp.sum(w**2)),
        "lambda_d": float(w[rank - 1]),
        "gauss_newton_vs_fisher": float(jnp.linalg.norm(gn - fisher) / fnorm),
        "fisher_vs_matvec_form": probe_rel(curvature.fisher_matvec(setup.answer_logits, th)),
    }
    del gn
    for name in setup.align_fns:
        out[f"hessian_{name}_vs_fisher"] = probe_rel(curvature.hvp_fn(setup.align(name), th))
    idx, y = curvature.sample_labels(setup.answer_logits, th, key, mc_samples)
    p = jax.nn.softmax(z, -1)
    g_mc = jnp.einsum(
        "rc,rcp->rp", jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) - p[idx], jac[idx]
    )
    mc = g_mc.T @ g_mc / g_mc.shape[0]
    out["mc_fisher_vs_fisher"] = float(jnp.linalg.norm(mc - fisher) / fnorm)
    out["mc_fisher_top_overlap"] = top_overlap(mc)
    del mc, g_mc
    labels = jnp.full(z.shape[0], tw.REFUSE)
    g_emp = jnp.einsum("nc,ncp->np", jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype) - p, jac)
    emp = g_emp.T @ g_emp / g_emp.shape[0]
    out["empirical_fisher_vs_fisher"] = float(jnp.linalg.norm(emp - fisher) / fnorm)
    out["empirical_fisher_top_overlap"] = top_overlap(emp)
    grads = jax.jit(
        lambda t: {k: jax.grad(f)(t, setup.align_data[k]) for k, f in setup.align_fns.items()}
    )(th)
    out["align_grad_norm"] = {k: float(jnp.linalg.norm(g)) for k, g in grads.items()}
    return out, fisher


def _ft_fn(setup: CollapseSetup, shifted: bool):
    """``L_FT(θ; data)``; with ``shifted``, ``data = (batch, πg, θ*)`` and the loss is
    ``L_FT(θ) − ⟨πg, θ − θ*⟩`` (the controlled orthogonal variant)."""
    if not shifted:
        return setup.lm_fn
    return lambda th, d: setup.lm_fn(th, d[0]) - jnp.vdot(d[1], th - d[2])


def _flow_fn(setup: CollapseSetup, shifted: bool, substeps: int = 8):
    """One compiled RK4 flow per setup (and variant): times, task data and basis are arguments."""
    key = ("flow", shifted, substeps)
    if key not in setup._compiled:
        ft = _ft_fn(setup, shifted)
        align, align_data = setup.align_fns, setup.align_data

        def simulate(theta0, ts, ft_data, basis, eig_top, u0_refusal):
            def observe(th):
                delta = th - theta0
                coords = basis.T @ delta
                return {
                    "du_refusal": align["refusal"](th, align_data["refusal"]) - u0_refusal,
                    "du_kl": align["kl"](th, align_data["kl"]),
                    "ft_loss": ft(th, ft_data),
                    "delta_norm": jnp.linalg.norm(delta),
                    "proj_norm": jnp.linalg.norm(coords),
                }

            return dynamics.gradient_flow(lambda th: ft(th, ft_data), theta0, ts, observe, substeps)

        setup._compiled[key] = jax.jit(simulate)
    return setup._compiled[key]


def task_law(
    setup: CollapseSetup,
    fisher: jax.Array,
    task: str,
    rank: int,
    t_lambda: tuple[float, float] = (1e-4, 1.0),
    num_times: int = 30,
    taylor_order: int = 5,
    shift: tuple | None = None,
) -> dict:
    """The law on one (skill, task): AIC at θ*, simulated Δu, forecasts, exact Taylor coefficients.

    ``shift = (πg, θ*)`` runs the controlled orthogonal variant instead (see
    :func:`orthogonal_variant`).
    """
    batch = setup.task_batch(task)
    shifted = shift is not None
    ft = _ft_fn(setup, shifted)
    ft_data = (batch, *shift) if shifted else batch
    reports = {
        name: aic.check_aic(
            fn,
            ft,
            setup.theta,
            rank=rank,
            align_batch=setup.align_data[name],
            ft_batch=ft_data,
            fisher=fisher,
            thresholds=aic.Thresholds(grad_tol=1e-6),
        )
        for name, fn in setup.align_fns.items()
    }
    rep = reports["kl"]
    lam = rep.lambda_max_ft
    ts = dynamics.log_times(t_lambda[0] / lam, t_lambda[1] / lam, num_times)
    u0 = setup.align_value("refusal", setup.theta)
    traj = _flow_fn(setup, shifted)(
        setup.theta, jnp.asarray(ts), ft_data, rep.basis, jnp.asarray(rep.eigenvalues[:rank]), u0
    ).checked()
    obs = jax.device_get(traj.observables)
    out = {"task": task, "t": ts.tolist(), "t_lambda": (ts * lam).tolist(), "lambda_max_ft": lam}
    out["ft_loss"] = np.asarray(obs["ft_loss"]).tolist()
    out["overlap"] = (np.asarray(obs["proj_norm"]) / np.asarray(obs["delta_norm"])).tolist()
    for name, r in reports.items():
        du = np.asarray(obs[f"du_{name}"])
        fc = np.asarray(r.forecast.flow(ts))
        onset = theory.taylor_onset(
            setup.align_fns[name],
            ft,
            setup.theta,
            order=taylor_order,
            align_args=(setup.align_data[name],),
            ft_args=(ft_data,),
        )
        order, coef = onset.onset(rtol=1e-6)
        rel_err = np.abs(fc / du - 1)
        ok = ts * lam <= 0.1
        out[name] = {
            "aic": {k: v for k, v in r.to_dict().items() if k != "eigenvalues"},
            "delta_u": du.tolist(),
            "forecast": fc.tolist(),
            "fisher_only_forecast": np.asarray(r.forecast.fisher_only().flow(ts)).tolist(),
            "quartic_prediction": (r.quartic_coefficient * ts**4).tolist(),
            "local_slope": fitting.local_slope(ts, np.abs(du)).tolist(),
            "taylor_coefficients": np.asarray(onset.coefficients).tolist(),
            "taylor_forecast": np.asarray(r.forecast.taylor()).tolist(),
            "onset_order": order,
            "onset_coefficient": coef,
            "forecast_max_rel_error_tl_le_0.1": float(rel_err[ok].max()),
            "forecast_parts_at_t_lambda": float(ts[np.argmax(rel_err > 0.05)] * lam)
            if (rel_err > 0.05).any()
            else None,
        }
    return out


def orthogonal_variant(
    setup: CollapseSetup,
    fisher: jax.Array,
    task: str,
    rank: int,
    onto: str = "range",
    range_rtol: float = 1e-10,
    t_lambda: tuple[float, float] = (1e-4, 1.0),
    num_times: int = 40,
) -> dict:
    """``L_FT'(θ) = L_FT(θ) − ⟨Πg, θ − θ*⟩``: H unchanged, the Fisher-visible part of g removed.

    ``onto="range"``: Π projects onto the range of F (eigenvalues above ``range_rtol·λ_1``), so
    Fg' = 0 and the KL drift starts at t⁴ exactly. ``onto="rank"``: Π projects onto M (rank d), so
    the Fisher mass outside M leaks at t² and the t⁴ term takes over after t×.
    """
    batch = setup.task_batch(task)
    g = jax.jit(jax.grad(setup.lm_fn))(setup.theta, batch)
    w, v = jnp.linalg.eigh(fisher)
    w, v = w[::-1], v[:, ::-1]
    if onto == "range":
        k = int(jnp.sum(w > range_rtol * w[0]))
    elif onto == "rank":
        k = rank
    else:
        raise ValueError(f"onto must be 'range' or 'rank', got {onto!r}")
    pi_g = v[:, :k] @ (v[:, :k].T @ g)
    res = task_law(setup, fisher, task, rank, t_lambda, num_times, shift=(pi_g, setup.theta))
    res["onto"] = onto
    res["projector_rank"] = k
    kl = res["kl"]
    ts = np.asarray(res["t"])
    du = np.asarray(kl["delta_u"])
    c4 = kl["taylor_coefficients"][3]
    kl["ratio_to_c4"] = (du / (c4 * ts**4)).tolist()
    # float64 resolves the KL drift only above ≈ 1e-15 (its first-order terms cancel in
    # expectation, not in rounding): read c₄ at the smallest t where Δu is well above that floor
    resolved = np.nonzero(du > 1e-11)[0]
    kl["resolved_from_t"] = float(ts[resolved[0]]) if resolved.size else None
    kl["ratio_to_c4_smallest_resolved_t"] = (
        float(du[resolved[0]] / (c4 * ts[resolved[0]] ** 4)) if resolved.size else None
    )
    q4 = kl["aic"]["quartic_coefficient"]
    kl["c4_over_gamma_f"] = c4 / q4 if q4 > 0 else None
    slope = np.asarray(kl["local_slope"])
    kl["slope4_window"] = fitting.slope_window(ts, slope, 4.0, 0.2)
    # crossover: where the local slope first passes 3, the midpoint of 2 and 4
    above = np.nonzero(slope >= 3.0)[0]
    kl["measured_crossover_time"] = (
        float(np.exp(np.interp(3.0, slope[: above[0] + 1], np.log(ts[: above[0] + 1]))))
        if above.size and above[0] > 0
        else None
    )
    return res


def _long_fn(setup: CollapseSetup, optimizer: str, lr: float, num_records: int, steps: int):
    key = ("long", optimizer, lr, num_records, steps)
    if key not in setup._compiled:
        opt = optax.sgd(lr) if optimizer == "sgd" else optax.adam(lr)
        rec = dynamics.log_steps(steps, num_records)
        align, align_data = setup.align_fns, setup.align_data
        apply_fn, to_params = setup.apply_fn, setup.to_params

        def run(theta0, batch, basis, eig_top, u0, harmful, retain):
            def observe(th):
                p = to_params(th)
                delta = th - theta0
                coords = basis.T @ delta
                return {
                    "harmfulness": tw.harmfulness_rate(apply_fn, p, harmful).astype(th.dtype),
                    "retention": tw.accuracy(apply_fn, p, retain).astype(th.dtype),
                    "du_refusal": align["refusal"](th, align_data["refusal"]) - u0,
                    "du_kl": align["kl"](th, align_data["kl"]),
                    "ft_loss": setup.lm_fn(th, batch),
                    "overlap": jnp.linalg.norm(coords)
                    / jnp.maximum(jnp.linalg.norm(delta), 1e-300),
                    "fisher_overlap": jnp.linalg.norm(jnp.sqrt(jnp.clip(eig_top, 0)) * coords),
                }

            return dynamics.run_optimizer(
                lambda th: setup.lm_fn(th, batch), theta0, opt, rec, observe, lr=lr
            )

        setup._compiled[key] = (jax.jit(run), rec)
    return setup._compiled[key]


def long_finetune(
    setup: CollapseSetup,
    task: str,
    basis: jax.Array,
    eig_top: jax.Array,
    steps: int,
    lr: float,
    seed: int,
    num_records: int = 12,
    subsample: float = 0.5,
    optimizer: str = "sgd",
) -> dict:
    """Full-batch fine-tuning on a seeded random half of the task's data (the seed varies the data).

    Records the harmfulness rate on held-out harmful prompts of every category, retention (accuracy
    on held-out benign tasks), Δu of both alignment losses, and the overlap score ``‖PΔθ‖/‖Δθ‖``
    with its Fisher-weighted form ``‖F^{1/2}PΔθ‖``.
    """
    n_rows = len(setup.task_batch(task)["tokens"])
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    rows = np.sort(rng.choice(n_rows, max(1, int(subsample * n_rows)), replace=False))
    batch = setup.task_batch(task, rows)
    run, rec = _long_fn(setup, optimizer, lr, num_records, steps)
    u0 = setup.align_value("refusal", setup.theta)
    harmful = {k: jnp.asarray(v) for k, v in setup.harmful_heldout.items()}
    retain = {k: jnp.asarray(v) for k, v in setup.retention_batch.items()}
    traj = run(setup.theta, batch, basis, eig_top, u0, harmful, retain).checked()
    obs = {k: np.asarray(v).tolist() for k, v in jax.device_get(traj.observables).items()}
    return {"task": task, "seed": seed, "steps": rec.tolist(), **obs}


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def rank(a):
        a = np.asarray(a, float)
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for val in np.unique(a):
            idx = a == val
            r[idx] = r[idx].mean()
        return r

    rx, ry = rank(x), rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap_spearman(
    x, y, num: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's ρ (pairs resampled with replacement)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x), np.asarray(y)
    vals = []
    for _ in range(num):
        i = rng.integers(0, len(x), len(x))
        r = spearman(x[i], y[i])
        if np.isfinite(r):
            vals.append(r)
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
