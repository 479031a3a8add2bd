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
        if name == "crossover_time":
            continue  # below, through its square
        got = getattr(rep, name)
        assert abs(got - float(value)) <= 1e-10 * max(1.0, abs(float(value))), name
    # t× = 2√(gᵀFg)/‖F½Hg‖. Each side's gᵀFg carries a rounding error of at most n·ε·‖F‖·‖g‖²
    # (float64 products and sums of n terms), which the square root turns into an absolute error
    # of order √ε where the leak is 0 (spec 2: gᵀFg = 0 exactly). So t× is compared through
    # (t×/2)²‖F½Hg‖² = gᵀFg, to 1e-10 relative plus twice that rounding bound.
    f, g = prob.fisher, prob.ft_grad
    hfh = float(prob.ft_grad @ prob.ft_hessian @ f @ prob.ft_hessian @ prob.ft_grad)
    g_f_g = [(t / 2) ** 2 * hfh for t in (rep.crossover_time, float(direct["crossover_time"]))]
    rounding = spec.n * np.finfo(np.float64).eps * float(jnp.linalg.norm(f, 2) * (g @ g))
    assert abs(g_f_g[0] - g_f_g[1]) <= 1e-10 * abs(g_f_g[1]) + 2 * rounding
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


def test_lanczos_check_at_n_200_with_40_iterations():
    """Fewer Lanczos steps than parameters: not exact by construction, checked against eigh."""
    spec = q.QuadraticSpec(n=200, d=4, tail=0.2, leak=0.05, coupling=0.8)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(7), spec)
    lanc = q.check_aic(
        prob.align_loss_fn,
        prob.ft_loss_fn,
        prob.theta_star,
        rank=4,
        method="lanczos",
        num_iters=40,
        trace_samples=400,
    )
    direct = _direct(prob, 4)
    print("lanczos n=200:", {k: abs(getattr(lanc, k) / float(direct[k]) - 1) for k in RTOL_200})
    for name, rtol in RTOL_200.items():
        np.testing.assert_allclose(getattr(lanc, name), direct[name], rtol=rtol, err_msg=name)
    assert abs(lanc.tail_mass - float(direct["tail_mass"])) < 4 * lanc.tail_mass_stderr
    lam_h = np.linalg.eigvalsh(np.asarray(prob.ft_hessian))[-1]
    # λ_max(H_FT) by 60 Lanczos steps at n = 200: its reported residual bounds the error
    assert abs(lanc.lambda_max_ft - lam_h) <= lanc.lambda_max_ft_residual + 1e-12 * lam_h
    assert lanc.lambda_max_ft_residual < 1e-6 * lam_h
    assert not any("λ_max(H_FT)" in w for w in lanc.warnings)


def test_given_fisher_eigenpairs_replace_the_checks_lanczos():
    """F's top pairs handed in (here 6 exact ones from eigh, of which the check takes rank = 4)
    give the dense check's numbers to 1e-10, and their residuals are reported as given."""
    spec = q.QuadraticSpec(n=60, d=4, tail=0.2, leak=0.05, coupling=0.8)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(5), spec)
    w, v = jnp.linalg.eigh(prob.fisher)
    res = jnp.arange(6, dtype=w.dtype) * 1e-14
    pairs = q.curvature.Eigenpairs(w[::-1][:6], v[:, ::-1][:, :6], res)
    args = (prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star)
    dense = q.check_aic(*args, rank=4)
    given = q.check_aic(*args, rank=4, method="lanczos", fisher_eigenpairs=pairs, trace_samples=8)
    for name in ("lambda_d", "ortho_norm", "gamma_fisher", "gamma_unweighted", "crossover_time"):
        np.testing.assert_allclose(getattr(given, name), getattr(dense, name), rtol=1e-10)
    np.testing.assert_array_equal(given.residuals, np.asarray(res[:4]))
    np.testing.assert_allclose(given.eigenvalues, dense.eigenvalues[:4], rtol=1e-10)


@pytest.mark.parametrize(
    "method, cut, flip, match",
    [
        ("dense", 4, False, "needs method='lanczos'"),
        ("lanczos", 3, False, "k >= rank"),
        ("lanczos", 4, True, "descending"),
    ],
)
def test_bad_fisher_eigenpairs_are_refused(method, cut, flip, match):
    prob, _ = q.make_quadratic(jax.random.PRNGKey(0), q.QuadraticSpec(n=12, d=2))
    w, v = jnp.linalg.eigh(prob.fisher)
    w, v = (w[:cut], v[:, :cut]) if flip else (w[::-1][:cut], v[:, ::-1][:, :cut])
    pairs = q.curvature.Eigenpairs(w, v, jnp.zeros(cut))
    with pytest.raises(QuarticError, match=match):
        q.check_aic(
            prob.align_loss_fn,
            prob.ft_loss_fn,
            prob.theta_star,
            4,
            method=method,
            fisher_eigenpairs=pairs,
        )


RTOL_200 = {"lambda_d": 1e-10, "ortho_norm": 1e-10, "gamma_fisher": 1e-10, "crossover_time": 1e-10}


def test_lambda_max_residual_is_reported_and_warned_when_large():
    """A spectrum with no gap at the top: 60 Lanczos steps leave a residual, said in a warning."""
    n = 400
    h = jnp.diag(jnp.linspace(1.0, 2.0, n))
    f = jnp.diag(jnp.concatenate([jnp.array([3.0, 2.0]), jnp.zeros(n - 2)]))
    g = jnp.ones(n) / jnp.sqrt(n)
    la = lambda th: 0.5 * th @ f @ th
    lf = lambda th: g @ th + 0.5 * th @ h @ th
    rep = q.check_aic(la, lf, jnp.zeros(n), rank=2, method="lanczos", num_iters=10)
    assert rep.lambda_max_ft_residual > 1e-6 * 2.0
    assert abs(rep.lambda_max_ft - 2.0) <= rep.lambda_max_ft_residual
    assert any("λ_max(H_FT)" in w and "residual" in w for w in rep.warnings)
    assert "residual" in str(rep)


def _indefinite_case():
    """F = diag(2, 1, −1), H = [[.1, 0, 1], [0, 1, 0], [1, 0, 11]], g = e₁: (Hg)ᵀF(Hg) < 0."""
    f = jnp.diag(jnp.array([2.0, 1.0, -1.0]))
    h = jnp.array([[0.1, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 11.0]])
    g = jnp.array([1.0, 0.0, 0.0])
    return (lambda th: 0.5 * th @ f @ th), (lambda th: g @ th + 0.5 * th @ h @ th), f, h, g


def test_indefinite_alignment_hessian_uses_the_positive_part_and_warns():
    la, lf, f, h, g = _indefinite_case()
    rep = q.check_aic(la, lf, jnp.zeros(3), rank=1, thresholds=q.Thresholds(eps_tail=0.0))
    f_pos = jnp.clip(f, 0.0)  # diagonal: F₊ = diag(2, 1, 0)
    hg = h @ g
    expected_t = 2 * jnp.sqrt(g @ f_pos @ g) / jnp.sqrt(hg @ f_pos @ hg)  # = 2·√2/√0.02 = 20
    np.testing.assert_allclose(rep.crossover_time, expected_t, rtol=1e-12)
    np.testing.assert_allclose(rep.tail_mass, 1.0, rtol=1e-12)  # λ₂ = 1; the −1 is not mass
    assert rep.verdicts["low_rank_tail"].passed is False  # not the vacuous 0 ≤ 0
    np.testing.assert_allclose(rep.negative_mass, -1.0, rtol=1e-12)
    assert any("indefinite" in w for w in rep.warnings)
    lanc = q.check_aic(la, lf, jnp.zeros(3), rank=1, method="lanczos", num_iters=3)
    assert np.isfinite(lanc.crossover_time) and any("indefinite" in w for w in lanc.warnings)
    assert lanc.verdicts["low_rank_tail"].passed is None


def test_positive_semidefinite_fisher_is_not_called_indefinite():
    spec = q.QuadraticSpec(n=30, d=3, tail=0.3, leak=0.2, coupling=0.7)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(3), spec)
    rep = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=3)
    assert rep.negative_mass == 0.0 and not any("indefinite" in w for w in rep.warnings)


def test_to_dict_writes_nan_as_null():
    import json

    la, lf, f, h, g = _indefinite_case()
    rep = q.check_aic(la, lf, jnp.zeros(3), rank=1)
    rep.crossover_time = float("nan")
    text = json.dumps(rep.to_dict(), allow_nan=False)
    assert json.loads(text)["crossover_time"] is None


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


def test_compiler_options_compile_their_own_program_with_the_same_values():
    """``compiler_options`` reach the check's program: another option set is another program (its
    own cache entry), and the lean options (the older fusion emitters) give XLA's default program's
    values to 1e-12 relative in float64 (other machine code, the same arithmetic up to rounding)."""
    from quartic.core import aic, jit

    lean = jit.lean_compile_options()
    if lean is None:
        pytest.skip("this backend or jaxlib has no lean compile options")
    spec = q.QuadraticSpec(n=60, d=4, tail=0.2, leak=0.05, coupling=0.8)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(5), spec)
    check = lambda opts: q.check_aic(
        prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=4, method="lanczos",
        num_iters=60, compiler_options=opts,
    )  # fmt: skip
    # XLA's own default, named: the suite's XLA_FLAGS (conftest) set the older emitters for the
    # whole process, and a per-program option overrides them
    aic._MEASURE_CACHE.clear()  # (bounded: earlier tests may have filled it)
    plain = check({"xla_cpu_use_fusion_emitters": True})
    lean_rep = check(lean)
    assert len(aic._MEASURE_CACHE) == 2
    for name in ("lambda_d", "ortho_norm", "gamma_fisher", "crossover_time", "tail_mass"):
        np.testing.assert_allclose(getattr(lean_rep, name), getattr(plain, name), rtol=1e-12)
    with pytest.raises(QuarticError, match="compiler_options must be a mapping"):
        check([("xla_cpu_use_fusion_emitters", False)])
