"""Alignment collapse in a small transformer, measured exactly (the paper's experiment in miniature).

:class:`CollapseSetup` holds an aligned transformer θ* (from
:func:`quartic.studies.training.make_aligned_model`) and flat views of every loss: the two alignment losses
of a harm category (the refusal cross-entropy that alignment minimised, and the KL drift from θ*'s
own answers, whose gradient at θ* is exactly zero and whose Hessian is exactly the true Fisher),
the answer logits (for Fisher matrices), and each benign task's loss. The functions below measure,
for one skill or one (skill, task) pair, what docs/theory.md §3–4 predicts, in float64:

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

:func:`aligned_setup` is the one place that builds θ* (float64, on the token world) and its
:class:`CollapseSetup` for the experiments and the notebooks.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quartic.core import aic, curvature, dynamics, fitting, measure, pytree, theory
from quartic.core.cache import BoundedCache, memo
from quartic.core.errors import QuarticError, require_float64
from quartic.core.measure import spearman  # noqa: F401  (still importable from here)
from quartic.models import TransformerConfig
from quartic.studies.training import AlignedModel, make_aligned_model
from quartic.tasks import token_world as tw


def _kl_answer(apply_fn, params, data):
    """Mean ``KL(p_θ* ‖ p_θ)`` of the first-answer distributions (cancellation-free,
    :func:`quartic.tasks.token_world.kl_logit_shift`); ``data`` carries θ*'s answer logits
    (``ref_logits``) so the compiled program holds no constant to fold."""
    logits = tw.answer_logits(apply_fn, params, data)
    return jnp.mean(tw.kl_logit_shift(data["ref_logits"], logits))


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
        self.kl_data = {**self.skill, "ref_logits": ref}
        self.align_fns = {
            "refusal": lambda th, b: tw.refusal_loss(apply_fn, to_params(th), b),
            "kl": lambda th, d: _kl_answer(apply_fn, to_params(th), d),
        }
        self.align_data = {"refusal": self.skill, "kl": self.kl_data}
        self.lm_fn = lambda th, b: tw.lm_loss(apply_fn, to_params(th), b)
        # L_FT(θ) − ⟨πg, θ − θ*⟩ with data (batch, πg, θ*): the natural task is πg = 0 (exactly
        # L_FT), the controlled orthogonal variant πg = Πg. One function object, so one compiled
        # program (AIC, Taylor, flow) serves every task and both variants.
        lm_fn = self.lm_fn
        self.ft_fn = lambda th, d: lm_fn(th, d[0]) - jnp.vdot(d[1], th - d[2])
        self.answer_logits = lambda th: tw.answer_logits(apply_fn, to_params(th), self.skill)
        self.harmful_heldout = tw.concat(
            [self.world.skill(k, "heldout") for k in range(self.world.config.n_categories)]
        )
        self.retention_batch = self.world.benign("heldout")
        self._compiled = BoundedCache(64)  # compiled helpers, by key: reach them via compiled()

    def compiled(self, key, build: Callable[[], Any]) -> Any:
        """The setup's compiled helper under ``key`` (a tuple naming it and its options), built by
        ``build()`` the first time."""
        return self._compiled.get(key, build)

    @property
    def n(self) -> int:
        return int(self.theta.shape[0])

    def align(self, name: str) -> Callable[[jax.Array], jax.Array]:
        """Flat ``L_A(θ)`` (closes over its data; for HVP closures and one-off use)."""
        fn, data = self.align_fns[name], self.align_data[name]
        return lambda th: fn(th, data)

    def grad_of(self, name: str) -> Callable[[jax.Array, Any], jax.Array]:
        """The gradient of the setup's loss ``name`` (``"lm_fn"`` or ``"ft_fn"``), compiled once
        per setup (a fresh ``jax.jit(jax.grad(...))`` per call compiles again each time)."""
        if name not in ("lm_fn", "ft_fn"):
            raise QuarticError(f"grad_of takes 'lm_fn' or 'ft_fn', got {name!r}")
        return self.compiled(("grad", name), lambda: jax.jit(jax.grad(getattr(self, name))))

    def align_value(self, name: str, theta: jax.Array) -> jax.Array:
        """``L_A(θ)``, compiled once per loss."""
        fn = self.compiled(("value", name), lambda: jax.jit(self.align_fns[name]))
        return fn(theta, self.align_data[name])

    def task_batch(self, task: str, rows: np.ndarray | None = None) -> dict:
        """A benign task's train batch (or ``"harmful"``: the harmful-compliance control)."""
        batch = (
            self.world.harmful_finetune() if task == "harmful" else self.world.task(task, "train")
        )
        if rows is not None:
            batch = {k: np.asarray(v)[rows] for k, v in batch.items()}
        return {k: jnp.asarray(v) for k, v in batch.items()}


@memo(maxsize=8)
def _aligned_model(preset: str, world_seed: int, model_seed: int):
    world = tw.TokenWorld(tw.WorldConfig(seed=world_seed))
    model_cfg = TransformerConfig.preset(
        preset, vocab_size=world.vocab_size, seq_len=world.config.seq_len, param_dtype="float64"
    )
    return world, make_aligned_model(model_cfg, world, seed=model_seed, progress=False)


def aligned_setup(
    preset: str = "2k", category: int = 0, world_seed: int = 0, model_seed: int = 0
) -> tuple[AlignedModel, CollapseSetup]:
    """θ* of the transformer ``preset`` on the token world of ``world_seed`` (float64; trained by
    :func:`quartic.studies.training.make_aligned_model` or loaded from its disk cache, once per process),
    and its :class:`CollapseSetup` for harm ``category`` (one per arguments and process, so its
    compiled helpers serve every caller).

    θ* is float64 (its gradient is ~1e-5 of the start's) and the returned arrays are used after the
    call, so float64 must be on for the caller: the entry point (experiment, notebook, command)
    turns it on; this raises :class:`QuarticError` when it is off."""
    require_float64("aligned_setup (θ* is float64)")
    return _aligned_setup(preset, category, world_seed, model_seed)


@memo(maxsize=8)
def _aligned_setup(preset: str, category: int, world_seed: int, model_seed: int):
    # One setup per θ* and category, so every unit of a study reuses its compiled helpers and the
    # compiled checks keyed by its loss functions (a new setup per call recompiled them all, and
    # the transformer collapse study's quick units each kept 300–380 MiB more: benchmarks/memory.py).
    world, aligned = _aligned_model(preset, world_seed, model_seed)
    return aligned, CollapseSetup(aligned.apply_fn, aligned.theta_star, world, category)


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
        "effective_rank": measure.effective_rank(w),
        "lambda_d": float(w[rank - 1]),
        "gauss_newton_vs_fisher": float(jnp.linalg.norm(gn - fisher) / fnorm),
        "fisher_vs_matvec_form": probe_rel(curvature.fisher_matvec(setup.answer_logits, th)),
    }
    del gn
    for name in setup.align_fns:
        out[f"hessian_{name}_vs_fisher"] = probe_rel(curvature.hvp_fn(setup.align(name), th))
    # mean_i J_iᵀ Ĉ_i J_i, not the [N·S, n] scores (the gather J[idx]: 3072 × 34 × 2184 float64s at 2k)
    mc = jax.jit(curvature.monte_carlo_fisher_from_jacobian, static_argnums=3)(
        jac, z, key, mc_samples
    )
    out["mc_fisher_vs_fisher"] = float(jnp.linalg.norm(mc - fisher) / fnorm)
    out["mc_fisher_top_overlap"] = top_overlap(mc)
    del mc
    p = jax.nn.softmax(z, -1)
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


def _flow_fn(setup: CollapseSetup, substeps: int = 8):
    """One compiled RK4 flow per setup: times, task data (and shift) and basis are arguments."""

    def build():
        ft = setup.ft_fn
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

        return jax.jit(simulate)

    return setup.compiled(("flow", substeps), build)


def task_law(
    setup: CollapseSetup,
    fisher: jax.Array,
    task: str,
    rank: int,
    t_lambda: tuple[float, float] = (1e-4, 1.0),
    num_times: int = 30,
    taylor_order: int = 5,
    shift: jax.Array | None = None,
) -> dict:
    """The law on one (skill, task): AIC at θ*, simulated Δu, forecasts, exact Taylor coefficients.

    ``shift = πg`` runs the controlled orthogonal variant ``L_FT(θ) − ⟨πg, θ − θ*⟩`` instead (see
    :func:`orthogonal_variant`); ``None`` is the natural task (πg = 0).
    """
    batch = setup.task_batch(task)
    ft = setup.ft_fn
    ft_data = (batch, jnp.zeros_like(setup.theta) if shift is None else shift, setup.theta)
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
    traj = _flow_fn(setup)(
        setup.theta, jnp.asarray(ts), ft_data, rep.basis, jnp.asarray(rep.eigenvalues[:rank]), u0
    ).checked()
    obs = jax.device_get(traj.observables)
    out = {"task": task, "t": ts.tolist(), "t_lambda": (ts * lam).tolist(), "lambda_max_ft": lam}
    out["ft_loss"] = np.asarray(obs["ft_loss"]).tolist()
    out["overlap"] = (np.asarray(obs["proj_norm"]) / np.asarray(obs["delta_norm"])).tolist()
    names = tuple(reports)
    onsets = theory.taylor_onsets(
        tuple(setup.align_fns[name] for name in names),
        ft,
        setup.theta,
        order=taylor_order,
        align_args=tuple((setup.align_data[name],) for name in names),
        ft_args=(ft_data,),
    )
    for name, onset in zip(names, onsets, strict=True):
        r = reports[name]
        du = np.asarray(obs[f"du_{name}"])
        fc = np.asarray(r.forecast.flow(ts))
        # relative to the largest coefficient: on the refusal loss this calls c₁ = −∇L_Aᵀg (small
        # but not 0) zero; the default time-scaled rule would report onset 1
        order, coef = onset.onset(rtol=1e-6, scale="largest")
        u_star = float(setup.align_value(name, setup.theta))
        errors = forecast_errors(ts, du, fc, np.asarray(r.forecast.taylor()), u_star)
        ok = (ts * lam <= 0.1) & errors["resolved"]
        parts = np.nonzero(errors["resolved"] & (errors["scaled"] > 0.05))[0]
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
            "forecast_rel_error": errors["relative"].tolist(),
            "forecast_scaled_error": errors["scaled"].tolist(),
            "resolved": errors["resolved"].tolist(),
            "forecast_max_rel_error_tl_le_0.1": float(errors["relative"][ok].max()),
            "forecast_max_scaled_error_tl_le_0.1": float(errors["scaled"][ok].max()),
            "sign_changes_tl_le_0.1": int(np.sum(np.diff(np.sign(du[ts * lam <= 0.1])) != 0)),
            "forecast_parts_at_t_lambda": float(ts[parts[0]] * lam) if parts.size else None,
        }
    return out


def forecast_errors(ts, du, forecast, forecast_taylor, u0) -> dict:
    """Pointwise errors of a Δu forecast against the measured Δu.

    - ``relative``: ``|forecast/Δu − 1|``; undefined where Δu changes sign (the refusal loss first
      falls, then rises);
    - ``scaled``: ``|forecast − Δu| / Σ_k |c_k t^k|``, the error of a truncated series relative to
      the size of its own terms (``forecast_taylor = [c1..c4]``); equal to ``relative`` wherever
      the terms share a sign, and still meaningful at a root of Δu;
    - ``resolved``: ``|Δu|`` above 1e3 float64 roundings of ``u0 = L_A(θ*)``, below which the
      difference ``L_A(θ) − L_A(θ*)`` is rounding noise (the KL drift, 0 at θ*, is always resolved).
    """
    ts, du, fc = np.asarray(ts), np.asarray(du), np.asarray(forecast)
    c = np.asarray(forecast_taylor)
    terms = np.sum(np.abs(c)[None, :] * ts[:, None] ** np.arange(1, len(c) + 1)[None, :], axis=1)
    diff = np.abs(fc - du)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(du != 0, diff / np.abs(du), np.inf)
        scaled = np.where(terms > 0, diff / terms, np.inf)
    resolved = np.abs(du) > 1e3 * np.finfo(du.dtype).eps * abs(float(u0))
    return {"relative": relative, "scaled": scaled, "resolved": resolved}


def orthogonal_variant(
    setup: CollapseSetup,
    fisher: jax.Array,
    task: str,
    rank: int,
    onto: str = "range",
    range_rtol: float = 1e-10,
    t_lambda: tuple[float, float] = (1e-2, 30.0),
    num_times: int = 40,
    taylor_order: int = 5,
    projector_rank: int | None = None,
) -> dict:
    """``L_FT'(θ) = L_FT(θ) − ⟨Πg, θ − θ*⟩``: H unchanged, the Fisher-visible part of g removed.

    ``onto="range"``: Π projects onto the range of F (eigenvalues above ``range_rtol·λ_1``), so
    Fg' = 0 and the KL drift starts at t⁴ exactly. ``onto="rank"``: Π projects onto F's top
    ``projector_rank`` eigenvectors (default ``rank`` = d, i.e. onto M), so the Fisher mass outside
    leaks at t² and the t⁴ term takes over after t× (predicted in the report: the full F, g' and
    Hg'). The AIC report and the overlap use ``rank`` either way, so one compiled program serves
    every projector rank.
    """
    if taylor_order < 4:
        raise QuarticError(f"taylor_order must be >= 4 to read c₄, got {taylor_order}")
    batch = setup.task_batch(task)
    g = setup.grad_of("lm_fn")(setup.theta, batch)
    w, v = curvature.eigh_descending(fisher)
    if onto == "range":
        k = int(jnp.sum(w > range_rtol * w[0]))
    elif onto == "rank":
        k = rank if projector_rank is None else projector_rank
        if not 1 <= k < setup.n:
            raise QuarticError(f"projector_rank must lie in [1, n = {setup.n}), got {k}")
    else:
        raise QuarticError(f"onto must be 'range' or 'rank', got {onto!r}")
    pi_g = v[:, :k] @ (v[:, :k].T @ g)
    res = task_law(setup, fisher, task, rank, t_lambda, num_times, taylor_order, shift=pi_g)
    res["onto"] = onto
    res["projector_rank"] = k
    kl = res["kl"]
    ts = np.asarray(res["t"])
    du = np.asarray(kl["delta_u"])
    c4 = kl["taylor_coefficients"][3]
    kl["ratio_to_c4"] = (du / (c4 * ts**4)).tolist()
    # the smallest t of the window: the cancellation-free KL is exact there up to the rounding of
    # the logits themselves (~1e-15 absolute against logit shifts ≳ 1e-10 at t·λ_max ≥ 1e-2)
    kl["ratio_to_c4_smallest_t"] = float(du[0] / (c4 * ts[0] ** 4))
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


def lora_reparam(setup: CollapseSetup, rank: int, key: jax.Array):
    """LoRA in θ*'s flat space: ``θ(φ) = θ* + scatter(A_i B_i)`` over every dense kernel.

    ``φ`` holds one pair ``A_i [d_in, r]`` (random, std ``1/√d_in``), ``B_i [r, d_out]`` (zero)
    per 2-d ``kernel`` of the model (attention projections, MLP, head), so ``θ(φ₀) = θ*`` exactly
    and ``x(W + AB)`` is the adapter layer of :class:`quartic.models.transformer.Dense`. Every
    loss of ``setup`` then applies to ``θ(φ)`` unchanged, and Δθ, the overlap score and Δu are
    measured in the full parameter space. Returns ``(phi0 [m], theta_of_phi)``.
    """
    if rank < 1:
        raise QuarticError(f"LoRA rank must be >= 1, got {rank}")
    kernels = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(setup.params)[0]
        if jax.tree_util.keystr(path).endswith("['kernel']") and leaf.ndim == 2
    }
    if not kernels:
        raise QuarticError("the model has no 2-d kernel to adapt")
    keys = jax.random.split(key, len(kernels))
    adapters = {
        name: (
            jax.random.normal(k, (d_in, rank), setup.theta.dtype) / d_in**0.5,
            jnp.zeros((rank, d_out), setup.theta.dtype),
        )
        for k, (name, (d_in, d_out)) in zip(keys, kernels.items(), strict=True)
    }
    phi0, unravel_phi = pytree.ravel(adapters)
    params_star = setup.params

    def theta_of_phi(phi):
        ab = {name: a @ b for name, (a, b) in unravel_phi(phi).items()}
        params = jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                leaf + ab[jax.tree_util.keystr(path)] if jax.tree_util.keystr(path) in ab else leaf
            ),
            params_star,
        )
        return pytree.ravel(params)[0]

    return phi0, theta_of_phi


def _long_fn(
    setup: CollapseSetup, optimizer: str, lr: float, num_records: int, steps: int, lora_rank: int
):
    def build():
        opt = {"sgd": optax.sgd, "adam": optax.adam}[optimizer](lr)
        rec = dynamics.log_steps(steps, num_records)
        align, align_data = setup.align_fns, setup.align_data
        apply_fn, to_params = setup.apply_fn, setup.to_params
        if lora_rank:
            phi0, theta_of = lora_reparam(setup, lora_rank, jax.random.PRNGKey(lora_rank))
        else:
            phi0, theta_of = None, lambda th: th

        def run(theta0, batch, basis, eig_top, u0, harmful, retain):
            def observe(x):
                th = theta_of(x)
                p = to_params(th)
                delta = th - theta0
                coords = basis.T @ delta
                return {
                    "harmfulness": tw.harmfulness_rate(apply_fn, p, harmful).astype(th.dtype),
                    "retention": tw.accuracy(apply_fn, p, retain).astype(th.dtype),
                    "du_refusal": align["refusal"](th, align_data["refusal"]) - u0,
                    "du_kl": align["kl"](th, align_data["kl"]),
                    "ft_loss": setup.lm_fn(th, batch),
                    "delta_norm": jnp.linalg.norm(delta),
                    "overlap": jnp.linalg.norm(coords)
                    / jnp.maximum(jnp.linalg.norm(delta), 1e-300),
                    "fisher_overlap": measure.fisher_weighted(eig_top, coords),
                }

            x0 = theta0 if phi0 is None else phi0
            return dynamics.run_optimizer(
                lambda x: setup.lm_fn(theta_of(x), batch), x0, opt, rec, observe, lr=lr
            )

        return jax.jit(run), rec

    return setup.compiled(("long", optimizer, lr, num_records, steps, lora_rank), build)


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
    optimizer: str = "adam",
    lora_rank: int = 0,
) -> dict:
    """Full-batch fine-tuning on a seeded random half of the task's data (the seed varies the data).

    ``optimizer``: ``"adam"`` or ``"sgd"`` (plain gradient descent on the full batch; stable only
    for ``lr < 2/λ_max(H_FT)``). ``lora_rank > 0`` trains LoRA adapters on every dense kernel
    instead of all weights (:func:`lora_reparam`). Records the harmfulness rate on held-out harmful
    prompts of every category, retention (accuracy on held-out benign tasks), Δu of both alignment
    losses, ‖Δθ‖ and the overlap score ``‖PΔθ‖/‖Δθ‖`` with its Fisher-weighted form
    ``‖F^{1/2}PΔθ‖``.
    """
    if optimizer not in ("adam", "sgd"):
        raise QuarticError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    n_rows = len(setup.task_batch(task)["tokens"])
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    rows = np.sort(rng.choice(n_rows, max(1, int(subsample * n_rows)), replace=False))
    batch = setup.task_batch(task, rows)
    run, rec = _long_fn(setup, optimizer, lr, num_records, steps, lora_rank)
    u0 = setup.align_value("refusal", setup.theta)
    harmful = {k: jnp.asarray(v) for k, v in setup.harmful_heldout.items()}
    retain = {k: jnp.asarray(v) for k, v in setup.retention_batch.items()}
    traj = run(setup.theta, batch, basis, eig_top, u0, harmful, retain).checked()
    obs = {k: np.asarray(v).tolist() for k, v in jax.device_get(traj.observables).items()}
    return {
        "task": task,
        "seed": seed,
        "optimizer": optimizer,
        "lr": lr,
        "lora_rank": lora_rank,
        "steps": rec.tolist(),
        **obs,
    }


def overlap_harm(records: list[dict]) -> dict:
    """Spearman ρ between the overlap scores at the end of :func:`long_finetune` runs and their
    harm, with percentile bootstrap intervals (runs resampled). ``harm`` is the harmfulness rate;
    ``du_kl`` (the KL drift of the skill) is its continuous counterpart, which still ranks runs
    when no held-out prompt flips. A ρ that is undefined (one side constant, e.g. no run harmful
    at all) is ``None``, as are its interval's ends."""
    final = lambda key: [r[key][-1] for r in records]  # noqa: E731
    overlap, f_overlap, harm = final("overlap"), final("fisher_overlap"), final("harmfulness")
    du_kl = final("du_kl")
    rho = {
        "spearman_overlap_harm": measure.spearman(overlap, harm),
        "spearman_overlap_harm_ci95": measure.bootstrap_spearman(overlap, harm),
        "spearman_fisher_overlap_harm": measure.spearman(f_overlap, harm),
        "spearman_fisher_overlap_harm_ci95": measure.bootstrap_spearman(f_overlap, harm),
        "spearman_fisher_overlap_du_kl": measure.spearman(f_overlap, du_kl),
        "spearman_fisher_overlap_du_kl_ci95": measure.bootstrap_spearman(f_overlap, du_kl),
        "spearman_overlap_du_kl": measure.spearman(overlap, du_kl),
        "spearman_retention_harm": measure.spearman(final("retention"), harm),
    }
    return {
        "n": len(records),
        "tasks": len({r["task"] for r in records}),
        "seeds": len({r["seed"] for r in records}),
        **{
            k: [measure.json_number(x) for x in v]
            if isinstance(v, tuple)
            else measure.json_number(v)
            for k, v in rho.items()
        },
    }
