"""Every approximate curvature operator against a dense float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quartic import QuarticError
from quartic.core import curvature, pytree


def _mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    out = h @ params["w2"] + params["b2"][None, :]
    return jnp.mean((out - y) ** 2) + 0.1 * jnp.mean(jnp.sin(out) ** 2)


@pytest.fixture(scope="module")
def mlp():
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    params = {
        "w1": jax.random.normal(k[0], (5, 7)),
        "b1": jax.random.normal(k[1], (7,)),
        "w2": jax.random.normal(k[2], (7, 3)),
        "b2": jax.random.normal(k[3], (3,)),
    }
    batch = (jax.random.normal(k[4], (11, 5)), jax.random.normal(k[5], (11, 3)))
    return params, batch


def test_hvp_matches_jax_hessian_on_mlp(mlp):
    params, batch = mlp
    f, theta, _ = pytree.flat_fn(_mlp_loss, params, batch)
    dense = curvature.dense_hessian(f, theta, chunk_size=16)
    oracle = jax.hessian(f)(theta)
    assert dense.shape == (theta.size, theta.size)
    rel = jnp.linalg.norm(dense - oracle) / jnp.linalg.norm(oracle)
    assert rel < 1e-12


def test_pytree_hvp_equals_flat_hvp(mlp):
    params, batch = mlp
    f, theta, to_params = pytree.flat_fn(_mlp_loss, params, batch)
    v = jax.random.normal(jax.random.PRNGKey(3), theta.shape)
    hv_tree = curvature.hvp(_mlp_loss, params, to_params(v), batch)
    hv_flat = curvature.hvp_fn(f, theta)(v)
    np.testing.assert_allclose(pytree.ravel(hv_tree)[0], hv_flat, rtol=1e-13, atol=1e-13)


def test_matvec_pair_is_the_two_products_of_the_hessian(mlp):
    # one batched product per operator (the AIC check's F g, F Hg and H_A g, H_A Hg): the same
    # two columns as the dense Hessian's, to float64 rounding, jitted or not
    params, batch = mlp
    f, theta, _ = pytree.flat_fn(_mlp_loss, params, batch)
    oracle = jax.hessian(f)(theta)
    u, v = jax.random.normal(jax.random.PRNGKey(4), (2,) + theta.shape)
    mv = curvature.hvp_fn(f, theta)
    for au, av in (
        curvature.matvec_pair(mv, u, v),
        jax.jit(curvature.matvec_pair, static_argnums=0)(mv, u, v),
    ):
        np.testing.assert_allclose(au, oracle @ u, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(av, oracle @ v, rtol=1e-12, atol=1e-13)


def test_parameter_subset_is_the_hessian_block(mlp):
    params, batch = mlp
    f, theta, _ = pytree.flat_fn(_mlp_loss, params, batch)
    full = jax.hessian(f)(theta)
    # one layer, selected by a leaf-level mask; ravel order of a dict is sorted keys: b1 b2 w1 w2
    mask = {"w1": False, "b1": False, "w2": True, "b2": False}
    fs, ths, _ = pytree.flat_fn(_mlp_loss, params, batch, where=mask)
    sub = curvature.dense_hessian(fs, ths)
    start = 7 + 3 + 35
    np.testing.assert_allclose(sub, full[start:, start:], rtol=1e-12, atol=1e-12)
    # the same subset by a path predicate
    fp, thp, _ = pytree.flat_fn(_mlp_loss, params, batch, where=lambda p, _: "w2" in str(p))
    np.testing.assert_allclose(curvature.dense_hessian(fp, thp), sub, rtol=1e-13, atol=1e-13)
    # ... by its name, and by its key path
    fn, thn, _ = pytree.flat_fn(_mlp_loss, params, batch, where=lambda name, _: name == "w2")
    np.testing.assert_allclose(curvature.dense_hessian(fn, thn), sub, rtol=1e-13, atol=1e-13)
    fk, thk, _ = pytree.flat_fn(_mlp_loss, params, batch, where=lambda n, _: n.path[0].key == "w2")
    assert thk.shape == thn.shape == ths.shape
    with pytest.raises(QuarticError, match="empty"):
        pytree.flat_fn(_mlp_loss, params, batch, where=lambda p, _: False)


@pytest.fixture(scope="module")
def indefinite500():
    n = 500
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n))
    return 0.5 * (a + a.T)


def test_lanczos_top_and_bottom_on_indefinite_matrix(indefinite500):
    a = indefinite500
    w = jnp.linalg.eigvalsh(a)
    assert w[0] < 0 < w[-1]
    res = curvature.lanczos_eigh(lambda v: a @ v, 500, k_top=5, k_bottom=5, num_iters=200)
    scale = jnp.abs(w).max()
    assert jnp.abs(res.top.values - w[::-1][:5]).max() / scale < 1e-10
    assert jnp.abs(res.bottom.values - w[:5]).max() / scale < 1e-10
    # residuals are measured, and small because the pairs converged
    assert res.top.residuals.shape == (5,) and res.bottom.residuals.shape == (5,)
    assert res.top.residuals.max() < 1e-8 * scale
    assert res.bottom.residuals.max() < 1e-8 * scale
    gram = res.top.vectors.T @ res.top.vectors
    np.testing.assert_allclose(gram, np.eye(5), atol=1e-10)
    assert res.num_matvecs == 210


def test_lanczos_reports_unconverged_residuals(indefinite500):
    a = indefinite500
    res = curvature.lanczos_eigh(lambda v: a @ v, 500, k_top=5, num_iters=20)
    # with a 20-dimensional Krylov space the 5th Ritz pair of a semicircle spectrum is far off,
    # and the residual says so
    assert res.top.residuals[-1] > 1e-3


def test_lanczos_handles_low_rank_breakdown():
    n, r = 60, 3
    b, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(2), (n, r)))
    a = (b * jnp.array([[5.0, -2.0, 1.0]])) @ b.T
    res = curvature.lanczos_eigh(lambda v: a @ v, n, k_top=2, k_bottom=1, num_iters=12)
    np.testing.assert_allclose(res.top.values, [5.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(res.bottom.values, [-2.0], atol=1e-12)


def test_lanczos_rejects_bad_sizes():
    with pytest.raises(QuarticError, match="eigenpairs"):
        curvature.lanczos_eigh(lambda v: v, 4, k_top=3, k_bottom=2)
    with pytest.raises(QuarticError, match="num_iters"):
        curvature.lanczos_eigh(lambda v: v, 10, k_top=5, num_iters=3)


def test_hutchinson_trace_is_unbiased_within_its_stderr():
    n = 80
    a = jax.random.normal(jax.random.PRNGKey(4), (n, n))
    a = a @ a.T / n
    est = curvature.hutchinson_trace(lambda v: a @ v, n, 2000, jax.random.PRNGKey(5))
    exact = jnp.trace(a)
    # Rademacher probes: variance 2 Σ_{i≠j} a_ij²; the estimate is within 4 standard errors
    assert abs(est.value - exact) < 4 * est.stderr
    var = 2 * (jnp.sum(a**2) - jnp.sum(jnp.diag(a) ** 2))
    np.testing.assert_allclose(est.stderr, jnp.sqrt(var / 2000), rtol=0.1)


def test_slq_density_matches_the_spectrum():
    n = 120
    evals = jnp.concatenate([jnp.linspace(-1.0, 1.0, 100), jnp.full(20, 5.0)])
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(6), (n, n)))
    a = (q * evals[None, :]) @ q.T
    sd = curvature.slq_density(lambda v: a @ v, n, 16, 40, jax.random.PRNGKey(7), sigma=0.1)
    # quadrature weights are a probability distribution per probe
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    # Gauss quadrature with 40 nodes integrates x and x² exactly, per probe: zᵀA^k z / n (the
    # probes are the Rademacher vectors slq_density draws from its key); their mean equals
    # tr(A^k)/n up to the estimator's sampling error (4 standard errors of the 16 probes)
    z = jax.random.rademacher(jax.random.PRNGKey(7), (16, n), a.dtype)
    for k in (1, 2):
        per_probe = jnp.sum(sd.weights * sd.nodes**k, axis=1)
        quad = jnp.einsum("pi,ij,pj->p", z, jnp.linalg.matrix_power(a, k), z) / n
        np.testing.assert_allclose(per_probe, quad, rtol=1e-12)
        exact = jnp.sum(evals**k) / n
        assert abs(jnp.mean(per_probe) - exact) < 4 * jnp.std(per_probe, ddof=1) / jnp.sqrt(16)
    dx = sd.grid[1] - sd.grid[0]
    np.testing.assert_allclose(jnp.sum(sd.density) * dx, 1.0, atol=1e-3)
    mass_outlier = jnp.sum(jnp.where(sd.grid > 4.0, sd.density, 0.0)) * dx
    np.testing.assert_allclose(mass_outlier, 20 / 120, atol=0.05)


def _logits_fn_factory():
    k = jax.random.split(jax.random.PRNGKey(8), 3)
    x = jax.random.normal(k[0], (9, 4))
    w0 = jax.random.normal(k[1], (4, 3))

    def logits(theta):
        w = theta[:12].reshape(4, 3)
        b = theta[12:]
        return jnp.tanh(x @ w) @ w0.T @ w + b[None, :]

    theta = jax.random.normal(k[2], (15,))
    return logits, theta


def test_true_fisher_is_gauss_newton_of_cross_entropy():
    logits, theta = _logits_fn_factory()
    f_mv = curvature.fisher_matvec(logits, theta)
    dense = curvature.dense_matrix(f_mv, 15)
    # closed form: mean_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i with J from jax.jacfwd
    jac = jax.jacfwd(logits)(theta)  # [N, C, n]
    p = jax.nn.softmax(logits(theta), -1)
    hz = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    oracle = jnp.einsum("ncp,ncd,ndq->pq", jac, hz, jac) / 9
    np.testing.assert_allclose(dense, oracle, rtol=1e-12, atol=1e-14)


def test_kl_drift_hessian_is_the_true_fisher():
    logits, theta = _logits_fn_factory()
    p_star = jax.nn.softmax(logits(theta), -1)

    def kl(th):
        lq = jax.nn.log_softmax(logits(th), -1)
        return jnp.mean(jnp.sum(p_star * (jnp.log(p_star) - lq), -1))

    assert jnp.linalg.norm(jax.grad(kl)(theta)) < 1e-14
    h = jax.hessian(kl)(theta)
    fis = curvature.dense_matrix(curvature.fisher_matvec(logits, theta), 15)
    np.testing.assert_allclose(h, fis, rtol=1e-11, atol=1e-13)


def test_monte_carlo_and_empirical_fisher_converge_to_the_true_one():
    logits, theta = _logits_fn_factory()
    fis = curvature.dense_matrix(curvature.fisher_matvec(logits, theta), 15)
    mc = curvature.monte_carlo_fisher(logits, theta, jax.random.PRNGKey(9), num_samples=4000)
    rel = jnp.linalg.norm(mc - fis) / jnp.linalg.norm(fis)
    # O(1/sqrt(N·S)) sampling error, N·S = 36000
    assert rel < 0.05
    # the empirical Fisher with labels drawn from the model is an MC Fisher with S = 1
    # scores from the Jacobian equal autodiff of log p, row by row
    idx, y = curvature.sample_labels(logits, theta, jax.random.PRNGKey(10), 3)
    g = curvature.fisher_factor(logits, theta, y, idx)
    for r in (0, 10, 26):
        direct = jax.grad(lambda th, r=r: jax.nn.log_softmax(logits(th), -1)[idx[r], y[r]])(theta)
        np.testing.assert_allclose(g[r], direct, rtol=1e-12, atol=1e-14)
    # the empirical Fisher of N = 9 labels has rank at most 9 < n = 15
    emp = curvature.empirical_fisher(logits, theta, y[:9])
    assert emp.shape == (15, 15)
    assert jnp.linalg.matrix_rank(emp) <= 9


def test_monte_carlo_fisher_from_a_jacobian_equals_the_scores_form():
    """mean_i J_iᵀ Ĉ_i J_i (no [N·S, n] scores) equals GᵀG/(N·S) of the scores of the same
    sampled labels (sample_labels, fisher_factor) to float64 rounding."""
    logits, theta = _logits_fn_factory()
    key = jax.random.PRNGKey(11)
    idx, y = curvature.sample_labels(logits, theta, key, 5)
    g = curvature.fisher_factor(logits, theta, y, idx)
    jac = curvature.output_jacobian(logits, theta)
    got = curvature.monte_carlo_fisher_from_jacobian(jac, logits(theta), key, 5)
    np.testing.assert_allclose(got, g.T @ g / g.shape[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got, curvature.monte_carlo_fisher(logits, theta, key, 5))


@pytest.mark.slow
def test_hvp_matches_jax_hessian_on_a_small_flax_transformer():
    from flax import nnx

    from quartic.models import Transformer, TransformerConfig, functional

    cfg = TransformerConfig(
        vocab_size=7, seq_len=5, d_model=4, n_heads=2, n_layers=1, d_ff=8, param_dtype="float64"
    )
    apply_fn, params = functional(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 1, 7)
    targets = jax.random.randint(jax.random.PRNGKey(2), (3, 5), 1, 7)

    def loss(p):
        logp = jax.nn.log_softmax(apply_fn(p, tokens), -1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    f, theta, _ = pytree.flat_fn(loss, params)
    # both compiled: run op by op this test took 61.5 s of a fresh suite run, compiled 6.4 s alone
    # (pytest --durations, docs/performance.md)
    dense = jax.jit(lambda th: curvature.dense_hessian(f, th, chunk_size=64))(theta)
    oracle = jax.jit(jax.hessian(f))(theta)
    assert theta.size > 100
    rel = jnp.linalg.norm(dense - oracle) / jnp.linalg.norm(oracle)
    assert rel < 1e-12


def test_eigh_descending_is_eigh_sorted_and_decomposes_a_reused_matrix_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 6))
    a = jnp.asarray(x + x.T)
    w, v = curvature.eigh_descending(a)
    w_ref = np.linalg.eigvalsh(np.asarray(a))[::-1]
    np.testing.assert_allclose(w, w_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(a @ v, v * w[None, :], atol=1e-12)
    assert curvature.eigh_descending(a)[0] is w  # the same array object: remembered
    assert curvature.eigh_descending(a + 0.0)[0] is not w  # another object: decomposed again
    # a numpy matrix can change in place, so it is never remembered
    m = np.asarray(a).copy()
    w_np, _ = curvature.eigh_descending(m)
    m *= 2.0
    np.testing.assert_allclose(curvature.eigh_descending(m)[0], 2.0 * np.asarray(w_np), rtol=1e-13)


@pytest.mark.parametrize("dtype, scale", [("float64", 1e-14), ("float32", 1e-6)])
def test_lanczos_does_not_depend_on_the_operators_scale(dtype, scale):
    """Lanczos of s·A gives s times A's eigenvalues: the breakdown test is relative to ‖A q‖, so a
    small operator (s·‖A‖ below 1e3·eps, as the Fisher is in float32) is not taken for an invariant
    subspace at every step. float64 to 1e-10 relative; float32 to 1e3·eps (its tridiagonal)."""
    n = 300
    a = jnp.diag(jnp.linspace(1.0, 0.0, n) ** 3).astype(dtype)
    w_top = np.linspace(1.0, 0.0, n)[:5] ** 3
    res = curvature.lanczos_eigh(lambda v: (scale * a) @ v, n, k_top=5, num_iters=120, dtype=dtype)
    rtol = 1e-10 if dtype == "float64" else 1e3 * float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(res.top.values, float) / scale, w_top, rtol=rtol)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 16])
def test_fisher_trace_equals_the_dense_trace_for_any_batch(batch_size):
    """curvature.fisher_trace batch by batch (3 does not divide the 10 examples: lax.map's
    remainder) equals tr F of the dense true Fisher, (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i, to
    float64 rounding."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key1, (10, 4), jnp.float64)
    theta = jax.random.normal(key2, (4 * 5 + 5,), jnp.float64)

    def single(th, xi):
        w, b = th[:20].reshape(4, 5), th[20:]
        return jnp.tanh(xi @ w) * 2.0 + b

    dense = 0.0
    for xi in x:
        z = single(theta, xi)
        p = jax.nn.softmax(z)
        j = jax.jacobian(single)(theta, xi)
        dense += jnp.trace(j.T @ (jnp.diag(p) - jnp.outer(p, p)) @ j)
    dense = float(dense) / len(x)
    got = float(
        jax.jit(lambda th: curvature.fisher_trace(single, th, x, batch_size=batch_size))(theta)
    )
    assert abs(got - dense) <= 1e-13 * dense
