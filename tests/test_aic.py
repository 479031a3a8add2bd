"""check_aic against quantities computed directly from F, H, g by eigh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic import QuarticError


def _direct(problem, d):
    """Every AIC quantity from the matrices, by eigh (the oracle)."""
    f, h, g = problem.fisher, problem.ft_hessian, problem.ft_grad
    w, v = jnp.linalg.eigh(f)
    w, v = w[::-1], v[:, ::-1]
    b, lam = v[:, :d], w[:d]
    p = b @ b.T
    f_half = (v * jnp.sqrt(jnp.clip(w, 0))[None, :]) @ v.T
    hg = h @ g
    return {
        "lambda_d": lam[-1],
        "tail_mass": jnp.sum(w[d:]),
        "ortho_norm": jnp.linalg.norm(p @ g),
        "ortho_ratio": jnp.linalg.norm(p @ g) / jnp.linalg.norm(g),
        "gamma_fisher": jnp.linalg.norm(f_half @ p @ hg),
        "gamma_unweighted": jnp.linalg.norm(p @ hg),
        "crossover_time": 2 * jnp.sqrt(jnp.maximum(g @ f @ g, 0)) / jnp.linalg.norm(f_half @ hg),
        "trace": jnp.trace(f),
        "align_grad_norm": 0.0,
        "ft_grad_norm": jnp.linalg.norm(g),
    }


@pytest.mark.parametrize(
    "spec",
    [
        q.QuadraticSpec(n=30, d=3, tail=0.3, leak=0.2, coupling=0.7),
        q.QuadraticSpec(n=24, d=5, tail=0.0, leak=0.0, coupling=1.0),
    ],
)
def test_dense_check_matches_eigh_to_1e10(spec):
    prob, _ = q.make_quadratic(jax.random.PRNGKey(3), spec)
    rep = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=spec.d)
    direct = _direct(prob, spec.d)
    for name, value in direct.items():
        got = getattr(rep, name)
        assert abs(got - float(value)) <= 1e-10 * max(1.0, abs(float(value))), name
    np.testing.assert_allclose(rep.quartic_coefficient, direct["gamma_fisher"] ** 2 / 8, rtol=1e-10)
    np.testing.assert_allclose(
        rep.lower_bound_coefficient,
        direct["lambda_d"] * direct["gamma_unweighted"] ** 2 / 8,
        rtol=1e-10,
    )
    lam_h = jnp.linalg.eigvalsh(prob.ft_hessian)[-1]
    np.testing.assert_allclose(rep.lambda_max_ft, lam_h, rtol=1e-8)
    assert rep.premise_holds and not rep.warnings
    assert set(rep.to_dict()) >= {"tail_mass", "gamma_fisher", "verdicts", "crossover_time"}


def test_lanczos_check_agrees_with_dense():
    spec = q.QuadraticSpec(n=60, d=4, tail=0.2, leak=0.05, coupling=0.8)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(5), spec)
    dense = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=4)
    lanc = q.check_aic(
        prob.align_loss_fn,
        prob.ft_loss_fn,
        prob.theta_star,
        rank=4,
        method="lanczos",
        num_iters=60,
        trace_samples=400,
    )
    for name in ("lambda_d", "ortho_norm", "gamma_fisher", "gamma_unweighted", "crossover_time"):
        np.testing.assert_allclose(getattr(lanc, name), getattr(dense, name), rtol=1e-8)
    # the tail comes from a Hutchinson trace: within 4 reported standard errors
    assert abs(lanc.tail_mass - dense.tail_mass) < 4 * lanc.tail_mass_stderr
    assert lanc.residuals.max() < 1e-8


def test_verdicts_use_the_callers_thresholds():
    spec = q.QuadraticSpec(n=30, d=3, tail=0.3, leak=0.2, coupling=0.7)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(3), spec)
    rep = q.check_aic(
        prob.align_loss_fn,
        prob.ft_loss_fn,
        prob.theta_star,
        rank=3,
        thresholds=q.Thresholds(lam=1.0, eps_tail=0.1, eps_ortho=0.5, gamma=1e-3),
    )
    v = rep.verdicts
    assert v["low_rank_sharp"].passed is True  # λ_d = 2 ≥ 1
    assert v["low_rank_tail"].passed is False  # tail 0.3 > 0.1
    assert v["orthogonality"].passed is True  # ‖Pg‖ = 0.2 ≤ 0.5
    assert v["coupling"].passed is True
    assert rep.holds is False
    np.testing.assert_allclose(v["orthogonality"].value, 0.2, rtol=1e-10)
    assert "FAIL" in str(rep)


def test_premise_failure_is_said_plainly():
    spec = q.QuadraticSpec(n=20, d=2)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(0), spec)
    shift = 0.3 * jnp.ones(20)
    la = lambda th: prob.align_loss_fn(th - shift)  # θ* = 0 is not the minimiser of L_A
    rep = q.check_aic(la, prob.ft_loss_fn, prob.theta_star, rank=2)
    assert rep.premise_holds is False
    assert any("no quartic law applies" in w for w in rep.warnings)
    np.testing.assert_allclose(rep.linear_rate, -jax.grad(la)(prob.theta_star) @ prob.ft_grad)


def test_pytree_params_and_subset():
    spec = q.QuadraticSpec(n=12, d=2, leak=0.1)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(1), spec)
    split = lambda p: jnp.concatenate([p["a"], p["b"]])
    params = {"a": jnp.zeros(5), "b": jnp.zeros(7)}
    rep_tree = q.check_aic(
        lambda p: prob.align_loss_fn(split(p)), lambda p: prob.ft_loss_fn(split(p)), params, 2
    )
    rep_flat = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, 2)
    np.testing.assert_allclose(rep_tree.gamma_fisher, rep_flat.gamma_fisher, rtol=1e-12)
    rep_sub = q.check_aic(
        lambda p: prob.align_loss_fn(split(p)),
        lambda p: prob.ft_loss_fn(split(p)),
        params,
        2,
        where={"a": False, "b": True},
    )
    assert rep_sub.n == 7


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=12), "rank"),
        (dict(rank=0), "rank"),
        (dict(rank=2, method="qr"), "method"),
        (dict(rank=2, fisher=jnp.eye(3)), "fisher must be"),
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    prob, _ = q.make_quadratic(jax.random.PRNGKey(0), q.QuadraticSpec(n=12, d=2))
    with pytest.raises(QuarticError, match=match):
        q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, **kwargs)


def test_non_scalar_and_non_finite_losses_are_rejected():
    prob, _ = q.make_quadratic(jax.random.PRNGKey(0), q.QuadraticSpec(n=12, d=2))
    with pytest.raises(QuarticError, match="scalar"):
        q.check_aic(lambda th: th, prob.ft_loss_fn, prob.theta_star, rank=2)
    with pytest.raises(QuarticError, match="not finite"):
        q.check_aic(prob.align_loss_fn, lambda th: jnp.log(th[0]), prob.theta_star, rank=2)
    with pytest.raises(QuarticError, match="non-finite"):
        q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, jnp.full(12, jnp.nan), rank=2)


def test_problem_constructor_checks_shapes_and_values():
    with pytest.raises(QuarticError, match="ft_hessian"):
        q.QuadraticProblem(fisher=jnp.eye(3), ft_hessian=jnp.eye(4), ft_grad=jnp.ones(3))
    with pytest.raises(QuarticError, match="vector"):
        q.QuadraticProblem(fisher=jnp.eye(3), ft_hessian=jnp.eye(3), ft_grad=jnp.ones((3, 1)))
    with pytest.raises(QuarticError, match="non-finite"):
        q.QuadraticProblem(
            fisher=jnp.eye(3), ft_hessian=jnp.eye(3), ft_grad=jnp.array([1.0, jnp.inf, 0.0])
        )
    with pytest.raises(QuarticError, match="rank d"):
        q.QuadraticSpec(n=4, d=4)
