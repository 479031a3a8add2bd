"""Defences: each update rule on a hand-checkable case, its HVP count, equal-progress stopping,
the predicted leaks against exact Taylor-mode coefficients, and the acceptance ratios."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic.core import curvature, theory
from quartic.harness import cli
from quartic.harness.runs import read_json
from quartic.studies import defences as D

N, RANK = 12, 2  # one shape everywhere: every program compiles once per session


def _curved(seed=0, n=N, d=RANK, curvature_norm=2.0, quartic=0.1):
    return q.make_curved(
        jax.random.PRNGKey(seed), q.QuadraticSpec(n=n, d=d), curvature_norm, quartic
    )


def _run(defence, losses, rank, lr, steps, **kw):
    return jax.jit(lambda: D.run_defence(defence, losses, rank, lr, steps, **kw))()


def test_fixed_projection_keeps_p_delta_zero_on_a_leaky_quadratic():
    """Pg ≠ 0 (leak 0.3): plain GD moves into M at first order; the fixed projection never does,
    so Δu stays at rounding level on a quadratic without Fisher tail."""
    prob, basis = q.make_quadratic(jax.random.PRNGKey(3), q.QuadraticSpec(n=N, d=RANK, leak=0.3))
    losses = D.Losses.of(prob)
    proj = lambda th: {"proj": jnp.linalg.norm(basis.T @ th), "norm": jnp.linalg.norm(th)}
    fixed = _run(D.FixedProjection(), losses, 2, 0.01, 200, observe=proj)
    plain = _run(D.Plain(), losses, 2, 0.01, 200, observe=proj)
    assert np.all(np.asarray(fixed.finite))
    norm = np.asarray(fixed.observables["norm"])[1:]
    assert norm.min() > 1e-3
    assert np.max(np.asarray(fixed.observables["proj"])[1:] / norm) < 1e-12
    assert np.max(np.abs(np.asarray(fixed.delta_u))) < 1e-24
    # plain leaks: ‖Pδ‖ ≥ ‖P g‖ t (1 − O(t)) at the first step, Δu ≈ ½ t² gᵀFg
    assert float(plain.observables["proj"][1]) == pytest.approx(0.01 * 0.3, rel=0.05)
    assert float(plain.delta_u[-1]) > 1e-6


def test_hvp_counts_match_the_declared_cost():
    """HVPs of the alignment curvature counted at run time (a host callback in the matvec)."""
    prob, _ = _curved(n=12, d=2)
    calls = []

    def counting(theta):
        mv = curvature.hvp_fn(prob.align_loss_fn, theta)

        def f(v):
            jax.debug.callback(lambda: calls.append(1))
            return mv(v)

        return f

    losses = D.Losses.of(prob, align_hvp_fn=counting)
    n, d, k = 12, 2, 7
    # the periodic projection covers the fixed one (no refresh before step `every`)
    defences = [D.PeriodicProjection(every=3), D.Retraction(tracked=True, track_iters=3)]
    for defence in defences:
        calls.clear()
        jax.block_until_ready(_run(defence, losses, d, 1e-3, k).delta_u)
        jax.effects_barrier()
        cost = defence.cost(n, d)
        if isinstance(defence, D.PeriodicProjection):
            # set-up at θ*, then a refresh at steps every, 2·every, … before step k
            expected = cost.setup_hvps * (1 + (k - 1) // defence.every)
        else:
            expected = cost.setup_hvps + k * cost.hvps_per_step
        assert len(calls) == expected, (defence.name, len(calls), expected)
    assert D.TrackedProjection().cost(n, d).hvps_per_step == d + 2
    assert D.FixedProjection().cost(n, d).setup_hvps == min(n, 3 * d + 10)


def test_equal_task_loss_stopping():
    ft = np.array([1.0, 0.8, 0.6, 0.4])
    du = np.array([0.0, 1.0, 2.0, 3.0])
    assert D.target_loss(1.0, 0.0, 0.5) == 0.5
    at = D.at_target(ft, du, 0.5, ft_min=0.0)
    assert at.reached and at.steps == pytest.approx(2.5) and at.delta_u == pytest.approx(2.5)
    assert at.ft_loss == 0.5
    miss = D.at_target(ft, du, 0.1, ft_min=0.0)
    assert not miss.reached and np.isnan(miss.delta_u) and miss.best_fraction == pytest.approx(0.6)
    with pytest.raises(q.QuarticError):
        D.target_loss(1.0, 0.0, 1.5)
    # on a quadratic the minimum is −½ gᵀH⁻¹g, and a real run stops between the bracketing steps
    prob, _ = q.make_quadratic(jax.random.PRNGKey(1), q.QuadraticSpec(n=N, d=RANK))
    exact = -0.5 * prob.ft_grad @ jnp.linalg.solve(prob.ft_hessian, prob.ft_grad)
    ft_min = float(jax.jit(lambda: D.ft_minimum(prob.ft_loss_fn, prob.theta_star))())
    assert ft_min == pytest.approx(float(exact), rel=1e-12)
    run = _run(D.Plain(), D.Losses.of(prob), 2, 0.01, 300)
    loss = np.asarray(run.ft_loss)
    target = D.target_loss(loss[0], ft_min, 0.5)
    at = D.at_target(loss, np.asarray(run.delta_u), target, ft_min)
    k = int(np.ceil(at.steps))
    assert at.reached and loss[k - 1] > target >= loss[k]


def test_predicted_leading_terms_equal_taylor_mode_coefficients():
    """c₄ of the plain flow and of the fixed-projection flow: closed forms vs exact jets."""
    prob, basis = _curved(seed=4, curvature_norm=1.5)

    @jax.jit
    def onsets(p, b):
        lt = D.projected_ft_loss(p.ft_loss_fn, p.theta_star, b)
        return (
            theory.taylor_onset(p.align_loss_fn, p.ft_loss_fn, p.theta_star, order=4),
            theory.taylor_onset(p.align_loss_fn, lt, p.theta_star, order=4),
        )

    plain, fixed = onsets(prob, basis)
    np.testing.assert_allclose(plain.coefficients[:3], 0.0, atol=1e-14)
    np.testing.assert_allclose(fixed.coefficients[:3], 0.0, atol=1e-14)
    c4p = float(D.plain_leak_coefficient(prob, basis))
    c4f = float(D.fixed_leak_coefficient(prob, basis))
    assert float(plain.coefficients[3]) == pytest.approx(c4p, rel=1e-10)
    assert float(fixed.coefficients[3]) == pytest.approx(c4f, rel=1e-10)
    # the paper's γ_F²/8 is the c = 0 part only: far off on a curved map
    hg = prob.base.ft_hessian @ prob.base.ft_grad
    gamma_f = jnp.linalg.norm(jnp.sqrt(prob.base.fisher_values[:2]) * (basis.T @ hg))
    assert abs(c4p / float(theory.quartic_coefficient(gamma_f)) - 1) > 0.5


def test_tracked_projection_leak_is_the_exact_second_order_residual():
    """Tracking M(θ) exactly leaves r = Bᵀc Σ‖s_k‖², i.e. Δu = ½ cᵀFc (Σ_k ‖s_k‖²)²."""
    prob, _ = _curved(seed=2, curvature_norm=1.0)
    losses = D.Losses.of(prob)
    defence = D.TrackedProjection()
    c = prob.curvature
    cfc = float(jnp.sum(prob.base.fisher_values * (prob.base.fisher_vectors.T @ c) ** 2))
    step = jax.jit(lambda s: defence.step(losses, s))
    init = jax.jit(lambda lr: defence.init(losses, RANK, lr))
    for lr, num, rel_a in ((0.01, 40, None), (0.0005, 40, 0.25)):
        state = init(lr)
        total = 0.0
        for _ in range(num):
            new = step(state)
            total += float(jnp.sum((new.theta - state.theta) ** 2))
            state = new
        predicted = 0.5 * cfc * total**2
        assert float(losses.delta_u(state.theta)) == pytest.approx(predicted, rel=1e-6)
        if rel_a is not None:
            # at small t the closed-form prefactor: Δu ≈ a t², a = ½ cᵀFc η² ‖(I − P)g‖⁴
            a = float(D.tracked_leak_coefficient(prob, state.basis, lr))
            assert predicted == pytest.approx(a * (lr * num) ** 2, rel=rel_a)


def test_low_rank_and_coupling_penalty_steps():
    prob, basis = _curved(seed=5)
    losses = D.Losses.of(prob)

    def first_step(defence):
        return jax.jit(lambda: defence.step(losses, defence.init(losses, RANK, 0.01)))()

    plain = first_step(D.Plain())
    st = first_step(D.LowRank(lora_rank=3, basis="krylov"))
    np.testing.assert_allclose(st.theta, plain.theta, atol=1e-15)  # g ∈ span{g, Hg, H²g}
    st = first_step(D.LowRank(lora_rank=3, basis="random", seed=1))
    u = st.aux
    np.testing.assert_allclose(u @ (u.T @ st.theta), st.theta, atol=1e-15)
    assert float(jnp.linalg.norm(st.theta)) > 1e-4
    # penalising the coupling pushes into M at first order (its gradient is (H² + ∇³L[g]) BΛBᵀHg)
    st = first_step(D.CouplingPenalty(mu=1.0))
    assert float(jnp.linalg.norm(basis.T @ plain.theta)) < 1e-15
    assert float(jnp.linalg.norm(basis.T @ st.theta)) > 1e-4


def test_reparametrised_linear_map_is_the_low_rank_restriction():
    """θ(φ) = θ* + Uφ with U orthonormal: gradient descent on φ is exactly the fixed-subspace
    update θ ← θ − ηUUᵀg of LowRank (with the same U); LoRA differs only by curving θ(φ)."""
    prob, _ = _curved(seed=6)
    losses = D.Losses.of(prob)
    low = D.LowRank(lora_rank=3, basis="random", seed=7)
    u = low.init(losses, RANK, 0.01).aux
    rep = D.Reparametrised(
        theta_of=lambda p: prob.theta_star + u @ p, phi0=jnp.zeros(3, u.dtype), label="linear"
    )
    a, b = _run(rep, losses, RANK, 0.01, 25), _run(low, losses, RANK, 0.01, 25)
    np.testing.assert_allclose(a.theta, b.theta, rtol=0, atol=1e-13)
    np.testing.assert_allclose(a.delta_u, b.delta_u, rtol=1e-10, atol=1e-300)
    assert rep.name == "linear" and rep.cost(N, RANK) == D.Cost(0.0, 1.0, 0)


def test_defences_experiment_smoke_and_acceptance(tmp_path: pathlib.Path):
    """The experiment, small: at equal task loss (50 % of the excess removed) on the rotating
    curved family, the best curvature-aware defence leaves ≥ 10× less Δu than plain fine-tuning
    and ≥ 3× less than the fixed projection on every seed, which barely helps once M rotates."""
    out, figs = tmp_path / "out", tmp_path / "figs"
    args = ["run", "defences", "--quick", "--out", str(out), "--figures", str(figs)]
    overrides = [
        "--set",
        "num_seeds=2",
        f"n={N}",
        f"d={RANK}",
        "sweep_curvatures=0.0",
        "lora_random_ranks=8",
        "num_steps=300",
        "lr=0.002",
        "only=plain,fixed_projection,retraction",
        "transformer_tasks=",  # the transformer setting runs in `quartic run defences --quick`
    ]
    assert cli.main(args + overrides) == 0
    summary = read_json(out / "summary.json")
    assert summary["num_failed"] == 0
    acc = summary["acceptance"]
    assert acc["best"] == "retraction"
    assert acc["plain_over_best"]["min"] >= 10 and acc["pass_plain_10x"]
    assert acc["fixed_over_best"]["min"] >= 3 and acc["pass_fixed_3x"]
    assert acc["rotation_angle_plain"]["min"] > 0.1  # rad, at the target
    main = summary["settings"]["main"]
    assert main["fixed_projection"]["plain_over"]["max"] < 3  # no real protection
    assert all(main[k]["reached"] == 2 for k in main)
    assert main["retraction"]["hvps_per_step"] == 0 and main["retraction"]["grads_per_step"] == 2
    # the fixed projection is exact on the quadratic (c = 0) sweep point and leaks once M rotates
    sweep = summary["settings"]["sweep_c0"]
    assert sweep["fixed_projection"]["delta_u"]["max"] < 1e-20 < sweep["plain"]["delta_u"]["min"]
    theory_c4 = read_json(out / "units" / "theory.json")["result"]["c4_plain"]
    assert len(theory_c4) == 2 and min(theory_c4) > 0
    assert (figs / "defences.png").stat().st_size > 10_000
    unit = out / "units" / "main__plain.json"
    before = unit.stat().st_mtime_ns
    assert cli.main(args + overrides) == 0
    assert unit.stat().st_mtime_ns == before
