"""The dense partial eigensolver and the matrix-free AIC against dense oracles (eigh)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic.core import curvature


def _psd(n, key, decay):
    """A dense PSD matrix with eigenvalues exp(−j/decay), a random eigenbasis, and that basis."""
    basis, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    w = jnp.exp(-jnp.arange(n, dtype=jnp.float64) / decay)
    return curvature.symmetrize((basis * w[None, :]) @ basis.T), w


@pytest.mark.parametrize("decay", [8.0, 200.0])
def test_dense_top_eigh_matches_eigh_to_1e10(decay):
    """Fast and slow spectral decay (slow: λ_10/λ_11 = 1.005, a hard gap for Krylov methods)."""
    a, _ = _psd(700, jax.random.PRNGKey(0), decay)
    got = jax.jit(lambda m: curvature.dense_top_eigh(m, 10))(a)
    w, v = jnp.linalg.eigh(a)
    w, v = w[::-1], v[:, ::-1]
    assert bool(got.converged) or decay > 100  # the slow case may fall back to eigh: still exact
    np.testing.assert_allclose(got.pairs.values, w[:10], rtol=0, atol=1e-10 * float(w[0]))
    proj = got.pairs.vectors @ got.pairs.vectors.T - v[:, :10] @ v[:, :10].T
    assert float(jnp.abs(proj).max()) < 1e-10
    assert float(got.pairs.residuals.max()) < 1e-10 * float(w[0])


def test_top_eigh_descending_refuses_an_indefinite_matrix():
    """An indefinite matrix gets the whole spectrum (the AIC needs F's positive part there)."""
    a, _ = _psd(600, jax.random.PRNGKey(1), 8.0)
    w, v = curvature.top_eigh_descending(a, 5)
    assert w.shape == (15,) and v.shape == (600, 5)
    w, v = curvature.top_eigh_descending(a - 1e-3 * jnp.eye(600), 5)
    assert w.shape == (600,) and v.shape == (600, 600)


def test_dense_check_above_the_partial_threshold_matches_eigh():
    """check_aic(method='dense') at n = 600 (block Lanczos, tail = trace − Σ top-d) against every
    quantity computed by eigh of the problem's matrices, to 1e-10."""
    spec = q.QuadraticSpec(n=600, d=6, tail=0.4, leak=0.1, coupling=0.6)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(2), spec)
    rep = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=spec.d)
    assert rep.eigenvalues.shape[0] < spec.n  # the partial path ran
    full = q.check_aic(
        prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=spec.d, full_spectrum=True
    )
    assert full.eigenvalues.shape[0] == spec.n
    f, h, g = prob.fisher, prob.ft_hessian, prob.ft_grad
    w, v = jnp.linalg.eigh(f)
    w, v = w[::-1], v[:, ::-1]
    p = v[:, : spec.d] @ v[:, : spec.d].T
    f_half = (v * jnp.sqrt(jnp.clip(w, 0))[None, :]) @ v.T
    direct = {
        "lambda_d": w[spec.d - 1],
        "tail_mass": jnp.sum(w[spec.d :]),
        "trace": jnp.trace(f),
        "ortho_norm": jnp.linalg.norm(p @ g),
        "gamma_fisher": jnp.linalg.norm(f_half @ p @ h @ g),
        "gamma_unweighted": jnp.linalg.norm(p @ h @ g),
    }
    for name, value in direct.items():
        for r in (rep, full):
            assert abs(getattr(r, name) - float(value)) <= 1e-10 * max(1.0, abs(float(value))), name


@pytest.mark.slow
@pytest.mark.parametrize("size", ["2k", "7k"])
def test_matrix_free_aic_equals_dense_on_the_aligned_transformer(size):
    """check_aic with the Gauss–Newton matvec and Lanczos (no n × n matrix) equals check_aic on the
    dense Fisher to 1e-8 (Lanczos converges to rounding at n ≤ 7k: both routes are float64-exact).
    At both sizes the study's route: F's top pairs from the model's one Lanczos
    (``fisher_spectrum``, shared) and the exact trace from per-example Jacobians, every quantity.
    At 2k also the library's general route, its own Lanczos of F and a Hutchinson trace: every
    quantity but the tail, which lies within 3 of its standard errors of the exact one (the same
    programs at 7k cost the suite about 30 s more). The Taylor coefficients (jets, matrix-free)
    give c₁ = 0 at θ* and c₂ = ½ gᵀFg with the dense F."""
    from quartic.core import theory
    from quartic.studies import collapse, scaling

    _, setup = scaling.aligned(size)
    trace = scaling.exact_trace(setup)
    fisher = collapse.dense_fisher(setup)
    np.testing.assert_allclose(trace, float(jnp.trace(fisher)), rtol=1e-10)
    batch = setup.task_batch("sort")
    ft_data = (batch, jnp.zeros_like(setup.theta), setup.theta)
    args = (setup.align_fns["kl"], setup.ft_fn, setup.theta)
    kw = dict(rank=10, align_batch=setup.align_data["kl"], ft_batch=ft_data)
    free = dict(fisher=scaling.fisher_ops(setup), fisher_batch=setup.skill, method="lanczos")
    dense = q.check_aic(*args, **kw, fisher=fisher)
    _, pairs = scaling.fisher_spectrum(setup, trace)
    shared = q.check_aic(*args, **kw, **free, fisher_trace=trace, fisher_eigenpairs=pairs)
    exact = ("lambda_d", "ortho_norm", "gamma_fisher", "crossover_time")
    routes = [(shared, (*exact, "tail_mass"))]
    if size == "2k":
        own = q.check_aic(*args, **kw, **free, num_iters=60)  # own Lanczos, Hutchinson trace
        routes.append((own, exact))
        assert own.tail_mass_stderr > 0
        assert abs(own.tail_mass - dense.tail_mass) <= 3 * own.tail_mass_stderr
    for rep, names in routes:
        for name in names:
            np.testing.assert_allclose(
                getattr(rep, name), getattr(dense, name), rtol=1e-8, err_msg=name
            )
        np.testing.assert_allclose(rep.eigenvalues[:10], dense.eigenvalues[:10], rtol=1e-8)
    onset = theory.taylor_onset(
        args[0], args[1], args[2], 4, align_args=(kw["align_batch"],), ft_args=(ft_data,)
    )
    c = np.asarray(onset.coefficients)
    g = jax.jit(jax.grad(setup.ft_fn))(setup.theta, ft_data)  # op by op it takes 5 s at 7k
    c2 = 0.5 * float(g @ (fisher @ g))
    assert abs(c[0]) <= 1e-8 * abs(c2)
    np.testing.assert_allclose(c[1], c2, rtol=1e-8)


def test_trace_batch_is_the_most_examples_whose_jacobians_fit():
    """scaling.trace_batch: [batch, C, n] float64 Jacobians within TRACE_JACOBIAN_BYTES, as many
    examples as fit up to 8, never fewer than 1."""
    from quartic.studies import scaling

    budget = scaling.TRACE_JACOBIAN_BYTES
    for n in (2_184, 98_858, 300_000, 1_056_034, 3_000_000, 30_000_000):
        b = scaling.trace_batch(n, 34)
        assert 1 <= b <= 8
        assert b == 1 or b * 34 * n * 8 <= budget
        assert b == 8 or (b + 1) * 34 * n * 8 > budget
    assert scaling.trace_batch(1_056_034, 34) == 3 and scaling.trace_batch(98_858, 34) == 8
