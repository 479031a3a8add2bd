"""Exact and iterative curvature: HVPs, dense matrices, Lanczos, Hutchinson, SLQ, Fisher matrices.

Conventions: a *matvec* is a function ``v[n] -> A v [n]`` of a symmetric operator on flat vectors.
Every approximate routine here (Lanczos, Hutchinson, SLQ, sampled Fishers) is tested against a dense
float64 oracle built by :func:`dense_matrix` on small models.

One HVP: :func:`hvp` (forward-over-reverse, ``jvp`` of ``grad``) is the only Hessian product;
``jax.hessian`` is used only by the tests, to check it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from quartic.core.cache import BoundedCache
from quartic.core.errors import QuarticError

Matvec = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Hessian-vector products


def hvp(loss_fn: Callable[..., jax.Array], params: Any, v: Any, *args: Any) -> Any:
    """Hessian-vector product ``∇²L(params) v`` on pytrees, forward-over-reverse.

    Costs about one gradient plus one forward pass (measured in ``benchmarks/``).
    """
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def hvp_fn(loss_fn: Callable[[jax.Array], jax.Array], theta: jax.Array) -> Matvec:
    """The Hessian of a flat ``loss_fn`` at ``theta`` as a matvec ``v[n] -> H v``, each product
    :func:`hvp` (forward-over-reverse).

    No linearisation of ``∇L`` is kept: ``jax.linearize`` would hold the forward pass's residuals
    for as long as the matvec lives, and for a loss summed over chunks of its data
    (:func:`quartic.studies.scaling.chunked_loss`) one set per chunk. Ten products inside one
    compiled loop took 0.89–1.09 times as long in this form as with the gradient linearised once
    on the scaling study's models, and needed a seventh to a tenth of the temporary memory at 100k
    parameters (``benchmarks/hvp_linearize.py``, results in
    ``benchmarks/results/hvp-linearize-cpu-2core.json``).
    """
    return lambda v: hvp(loss_fn, theta, v)


def matvec_pair(matvec: Matvec, u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A u, A v)`` as one batched product (``vmap`` over the two vectors): the operator appears
    once in the traced program instead of once per call site, and a product that recomputes a
    forward pass (a chunked Gauss–Newton or Hessian product) does it once for both tangents. Equal
    to the two separate products up to rounding."""
    au, av = jax.vmap(matvec)(jnp.stack([u, v]))
    return au, av


def dense_matrix(matvec: Matvec, n: int, dtype=None, chunk_size: int | None = 256) -> jax.Array:
    """The ``[n, n]`` matrix of a linear operator from batched matvecs on the unit vectors.

    Columns are computed ``chunk_size`` at a time with ``vmap`` inside a ``lax.map``, so memory is
    bounded by ``chunk_size`` products in flight (``None``: all ``n`` at once).
    """
    dtype = dtype or jnp.result_type(float)
    eye = jnp.eye(n, dtype=dtype)
    cols = lax.map(matvec, eye, batch_size=chunk_size or n)
    return cols.T


def dense_hessian(
    loss_fn: Callable[[jax.Array], jax.Array], theta: jax.Array, chunk_size: int | None = 256
) -> jax.Array:
    """Exact Hessian ``[n, n]`` of a flat ``loss_fn`` at ``theta`` from batched HVPs."""
    return dense_matrix(hvp_fn(loss_fn, theta), theta.shape[0], theta.dtype, chunk_size)


def symmetrize(a: jax.Array) -> jax.Array:
    return 0.5 * (a + a.T)


# ----------------------------------------------------------------------------------------------
# Lanczos with full reorthogonalisation


class Tridiagonal(NamedTuple):
    """Output of :func:`lanczos_tridiag`: ``A V ≈ V T`` with ``T = tridiag(beta, alpha, beta)``."""

    basis: jax.Array  # [m, n] orthonormal Lanczos vectors (rows)
    alpha: jax.Array  # [m] diagonal
    beta: jax.Array  # [m - 1] off-diagonal


def lanczos_tridiag(matvec: Matvec, v0: jax.Array, num_iters: int) -> Tridiagonal:
    """``num_iters`` Lanczos steps from ``v0`` with full (twice-applied) Gram–Schmidt.

    Breakdown (an invariant subspace found early) is handled by continuing with a fresh random
    direction orthogonal to the basis, with ``beta = 0`` there, so ``T`` stays exact. It is called
    where the product's part outside the basis is below ``1e3·eps`` of the product ``‖A q‖``, so
    the test does not depend on A's scale (it compared with ``1e3·eps·(|α| + 1)``, which at the
    Fisher's scale, eigenvalues about 5e-3 at 30k parameters, called most float32 steps breakdowns
    and gave a top eigenvalue 1,900× too small: ``benchmarks/float32_check.py`` on the old code,
    ``benchmarks/results/float32-check-before-7a9313e-cpu-2core.json``).
    """
    n = v0.shape[0]
    if not 1 <= num_iters <= n:
        raise QuarticError(f"num_iters must be in [1, n={n}], got {num_iters}")
    dtype = v0.dtype
    q0 = v0 / jnp.linalg.norm(v0)
    # one spare row, so the next vector is written unconditionally (a cond would carry the basis)
    basis = jnp.zeros((num_iters + 1, n), dtype).at[0].set(q0)
    key = jax.random.PRNGKey(17)

    def orthogonalize(w, basis):
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def step(i, carry):
        basis, alpha, beta = carry
        q = basis[i]
        w = matvec(q)
        a = jnp.vdot(q, w)
        scale = jnp.linalg.norm(w)  # ‖A q‖: breakdown is relative to the product, not to 1
        w = orthogonalize(w, basis)
        b = jnp.linalg.norm(w)
        tiny = b <= 1e3 * jnp.finfo(dtype).eps * scale

        def fresh(_):  # only on breakdown: a random direction orthogonal to the basis
            r = orthogonalize(jax.random.normal(jax.random.fold_in(key, i), (n,), dtype), basis)
            return r / jnp.linalg.norm(r)

        nxt = lax.cond(tiny, fresh, lambda _: w / jnp.where(tiny, 1.0, b), None)
        b = jnp.where(tiny, jnp.zeros_like(b), b)
        basis = lax.dynamic_update_index_in_dim(basis, nxt, i + 1, 0)
        return basis, alpha.at[i].set(a), beta.at[i].set(b)

    alpha = jnp.zeros(num_iters, dtype)
    beta = jnp.zeros(num_iters, dtype)
    basis, alpha, beta = lax.fori_loop(0, num_iters, step, (basis, alpha, beta))
    return Tridiagonal(basis[:num_iters], alpha, beta[:-1])


def _tridiag_eigh(alpha: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
    return jnp.linalg.eigh(t)


class Eigenpairs(NamedTuple):
    """Eigenpairs of a symmetric operator with their residual norms ``‖A v − λ v‖``."""

    values: jax.Array  # [k]
    vectors: jax.Array  # [n, k], orthonormal columns
    residuals: jax.Array  # [k]


class LanczosResult(NamedTuple):
    top: Eigenpairs  # largest (algebraic) eigenvalues, descending
    bottom: Eigenpairs  # smallest (algebraic) eigenvalues, ascending
    num_matvecs: int  # Lanczos products plus the products used for the exact residuals


def lanczos_eigh(
    matvec: Matvec,
    n: int,
    k_top: int = 5,
    k_bottom: int = 0,
    num_iters: int | None = None,
    key: jax.Array | None = None,
    dtype=None,
    v0: jax.Array | None = None,
) -> LanczosResult:
    """Extreme eigenpairs of a symmetric (possibly indefinite) operator by Lanczos.

    The largest ``k_top`` and smallest ``k_bottom`` *algebraic* eigenvalues (not largest magnitude:
    a negative eigenvalue is never mistaken for a top one). Residuals ``‖A v − λ v‖`` are computed
    exactly with ``k_top + k_bottom`` extra matvecs, so convergence is measured, not assumed.

    Args:
      matvec: ``v[n] -> A v``; must be symmetric.
      n: dimension.
      num_iters: Krylov dimension ``m`` (default ``min(n, max(3 (k_top + k_bottom), 60))``).
    """
    k = k_top + k_bottom
    if k < 1:
        raise QuarticError("ask for at least one eigenpair (k_top + k_bottom >= 1)")
    if k > n:
        raise QuarticError(f"asked for {k} eigenpairs of an operator of dimension n={n}")
    m = num_iters or min(n, max(3 * k, 60))
    if m < k:
        raise QuarticError(f"num_iters={m} is smaller than the number of eigenpairs asked ({k})")
    dtype = dtype or (v0.dtype if v0 is not None else jnp.result_type(float))
    if v0 is None:
        key = jax.random.PRNGKey(0) if key is None else key
        v0 = jax.random.normal(key, (n,), dtype)
    tri = lanczos_tridiag(matvec, v0, m)
    theta, s = _tridiag_eigh(tri.alpha, tri.beta)  # ascending
    ritz = tri.basis.T @ s  # [n, m]
    order = jnp.concatenate([jnp.arange(m - 1, m - 1 - k_top, -1), jnp.arange(k_bottom)])
    vals = theta[order]
    vecs = ritz[:, order]
    vecs = vecs / jnp.linalg.norm(vecs, axis=0, keepdims=True)
    # one product at a time: a vmap over the k vectors keeps k products' intermediates (for a
    # Gauss–Newton operator, k copies of the forward pass's tangents) in flight at once
    av = lax.map(matvec, vecs.T).T
    res = jnp.linalg.norm(av - vecs * vals[None, :], axis=0)
    top = Eigenpairs(vals[:k_top], vecs[:, :k_top], res[:k_top])
    bottom = Eigenpairs(vals[k_top:], vecs[:, k_top:], res[k_top:])
    return LanczosResult(top, bottom, m + k)


# the last matrix decomposed, by identity: {id: (matrix, result)} (quartic.core.cache's policy)
_EIGH_LAST = BoundedCache(1)


def eigh_descending(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of the symmetric ``a``, largest first: ``(w [n], v [n, n])``.

    The last ``jax.Array`` is remembered by identity (JAX arrays are immutable, so the same object
    is the same matrix), so a dense Fisher reused by many checks (every task, both alignment
    losses, every projector) is decomposed once, not once per call. A mutable numpy array is
    never cached.
    """
    if id(a) in _EIGH_LAST and _EIGH_LAST[id(a)][0] is a:
        return _EIGH_LAST[id(a)][1]
    w, v = jnp.linalg.eigh(symmetrize(a))
    out = (w[::-1], v[:, ::-1])
    if isinstance(a, jax.Array):
        _EIGH_LAST[id(a)] = (a, out)
    return out


class TopEigh(NamedTuple):
    """Output of :func:`dense_top_eigh`: the top eigenpairs with their residuals, and how."""

    pairs: Eigenpairs  # the ``k`` largest (algebraic), descending
    ritz_values: jax.Array  # [b] every Ritz value of the last block, descending (top-k first)
    converged: jax.Array  # bool: True when the block Krylov pairs passed; False: eigh was used
    restarts: jax.Array  # block Krylov passes run


def dense_top_eigh(
    a: jax.Array,
    k: int,
    *,
    block: int | None = None,
    steps: int = 12,
    max_restarts: int = 8,
    rtol: float = 1e-12,
    key: jax.Array | None = None,
    min_n: int = 512,
) -> TopEigh:
    """The ``k`` largest eigenpairs of a dense symmetric ``a`` without a full decomposition.

    Restarted block Lanczos with full reorthogonalisation: a block of ``b = block`` (default
    ``k + 10``) vectors spans a Krylov space of ``steps·b`` directions by matrix–matrix products,
    Rayleigh–Ritz on it gives Ritz pairs, and the top ``b`` restart the next pass. The pairs are
    accepted once every residual ``‖a v − λ v‖ ≤ rtol·|λ_1|`` and the basis is orthonormal to 1e-10;
    the error of the eigenvalues is then at most residual²/gap and of the top-k subspace
    residual/gap (Davis–Kahan). Otherwise (after ``max_restarts`` passes) the result is the full
    ``eigh``'s, so the answer is never worse than ``eigh``. Cost per pass ``O(n² · steps · b)``,
    against ``O(n³)`` for ``eigh``; for ``n ≤ max(min_n, steps·b)`` ``eigh`` is used directly.
    Jit-compatible (``k``, ``block``, ``steps``, ``max_restarts`` static).
    """
    n = a.shape[0]
    if not 1 <= k <= n:
        raise QuarticError(f"k must be in [1, n={n}], got {k}")
    b = min(n, block or k + 10)
    if b < k:
        raise QuarticError(f"block={b} must be at least k={k}")
    a = symmetrize(a)
    dtype = a.dtype

    def full():
        w, v = jnp.linalg.eigh(a)
        vals, vecs = w[::-1][:k], v[:, ::-1][:, :k]
        res = jnp.linalg.norm(a @ vecs - vecs * vals[None, :], axis=0)
        return Eigenpairs(vals, vecs, res), w[::-1][:b]

    if n <= max(min_n, steps * b):
        pairs, ritz = full()
        return TopEigh(pairs, ritz, jnp.asarray(False), jnp.asarray(0))

    m = steps * b

    def orth(w, basis):
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        return w

    def one_pass(q0):
        basis = jnp.zeros((n, m), dtype).at[:, :b].set(q0)

        def grow(j, basis):  # unfilled columns are zero, so they drop out of the projections
            prev = lax.dynamic_slice_in_dim(basis, (j - 1) * b, b, axis=1)
            q, _ = jnp.linalg.qr(orth(a @ prev, basis))
            q, _ = jnp.linalg.qr(orth(q, basis))  # columns QR invented for a deficient block
            return lax.dynamic_update_slice_in_dim(basis, q, j * b, axis=1)

        basis = lax.fori_loop(1, steps, grow, basis)
        ab = a @ basis
        w, s = jnp.linalg.eigh(symmetrize(basis.T @ ab))
        s = s[:, ::-1][:, :b]
        vals = w[::-1][:b]
        vecs, avecs = basis @ s, ab @ s
        res = jnp.linalg.norm(avecs - vecs * vals[None, :], axis=0)
        ortho = jnp.max(jnp.abs(basis.T @ basis - jnp.eye(m, dtype=dtype)))
        return vals, vecs, res, ortho

    def accepted(vals, res, ortho):
        scale = jnp.maximum(jnp.abs(vals[0]), jnp.finfo(dtype).tiny)
        return (jnp.max(res[:k]) <= rtol * scale) & (ortho <= 1e-10)

    key = jax.random.PRNGKey(0) if key is None else key
    q0, _ = jnp.linalg.qr(jax.random.normal(key, (n, b), dtype))

    def cond(c):
        vals, _, res, ortho, i = c
        return (i < max_restarts) & ~accepted(vals, res, ortho)

    def body(c):
        _, vecs, _, _, i = c
        return (*one_pass(vecs), i + 1)

    vals, vecs, res, ortho = one_pass(q0)
    vals, vecs, res, ortho, passes = lax.while_loop(
        cond, body, (vals, vecs, res, ortho, jnp.asarray(1))
    )
    ok = accepted(vals, res, ortho)
    pairs, ritz = lax.cond(ok, lambda: (Eigenpairs(vals[:k], vecs[:, :k], res[:k]), vals), full)
    return TopEigh(pairs, ritz, ok, passes)


_TOP_LAST = BoundedCache(1)  # as _EIGH_LAST, by (identity, k)


def top_eigh_descending(a: jax.Array, k: int, min_n: int = 512) -> tuple[jax.Array, jax.Array]:
    """The top eigenpairs of a symmetric ``a`` that the AIC needs, largest first: ``(w, v)``.

    For a positive semi-definite ``a`` (to rounding: the Cholesky factorisation of
    ``a + n·eps·|λ₁|·I`` succeeds, O(n³/3)) larger than ``min_n``: ``w`` holds the top ``k + 10``
    Ritz values and ``v [n, k]`` the top-k eigenvectors, from :func:`dense_top_eigh` (verified by
    its residuals). Otherwise (small, indefinite, or not converged): :func:`eigh_descending`, the
    whole spectrum ``w [n]`` and ``v [n, n]``; a caller tells the two apart by ``w.shape[0] < n``.
    Remembered for the last ``jax.Array`` like :func:`eigh_descending`.
    """
    n = a.shape[0]
    if n <= min_n:
        return eigh_descending(a)
    if (id(a), k) in _TOP_LAST and _TOP_LAST[id(a), k][0] is a:
        return _TOP_LAST[id(a), k][1]
    res = _dense_top_jit(a, k)
    out = None
    if bool(res.converged):
        shift = n * jnp.finfo(a.dtype).eps * jnp.abs(res.ritz_values[0])
        if bool(_psd_jit(a, shift)):
            out = (res.ritz_values, res.pairs.vectors)
    if out is None:
        out = eigh_descending(a)
    if isinstance(a, jax.Array):
        _TOP_LAST[id(a), k] = (a, out)
    return out


_dense_top_jit = jax.jit(lambda a, k: dense_top_eigh(a, k), static_argnums=1)


@jax.jit
def _psd_jit(a, shift):
    chol = jnp.linalg.cholesky(symmetrize(a) + shift * jnp.eye(a.shape[0], dtype=a.dtype))
    return jnp.all(jnp.isfinite(chol))


def dense_eigh_extremes(a: jax.Array, k_top: int, k_bottom: int = 0) -> LanczosResult:
    """The same result type from a dense symmetric matrix (the exact oracle)."""
    w, v = jnp.linalg.eigh(symmetrize(a))
    n = a.shape[0]
    order = jnp.concatenate([jnp.arange(n - 1, n - 1 - k_top, -1), jnp.arange(k_bottom)])
    vals, vecs = w[order], v[:, order]
    res = jnp.linalg.norm(a @ vecs - vecs * vals[None, :], axis=0)
    return LanczosResult(
        Eigenpairs(vals[:k_top], vecs[:, :k_top], res[:k_top]),
        Eigenpairs(vals[k_top:], vecs[:, k_top:], res[k_top:]),
        0,
    )


# ----------------------------------------------------------------------------------------------
# Trace and spectral density


class TraceEstimate(NamedTuple):
    value: jax.Array
    stderr: jax.Array


def hutchinson_trace(
    matvec: Matvec,
    n: int,
    num_samples: int,
    key: jax.Array,
    dtype=None,
    batch_size: int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``E[zᵀ A z]`` with Rademacher ``z``, and its standard error.

    ``batch_size`` products in flight at a time (``None``: all ``num_samples``), which bounds the
    memory of a large model's matvec."""
    dtype = dtype or jnp.result_type(float)
    z = jax.random.rademacher(key, (num_samples, n), dtype)
    quad = lax.map(lambda v: jnp.vdot(v, matvec(v)), z, batch_size=batch_size or num_samples)
    return TraceEstimate(quad.mean(), quad.std(ddof=1) / jnp.sqrt(num_samples))


class SpectralDensity(NamedTuple):
    nodes: jax.Array  # [num_probes, num_iters] Gauss quadrature nodes (Ritz values)
    weights: jax.Array  # [num_probes, num_iters] weights, each row sums to 1
    grid: jax.Array  # [num_grid]
    density: jax.Array  # [num_grid], Gaussian-smoothed, integrates to ~1


def slq_density(
    matvec: Matvec,
    n: int,
    num_probes: int,
    num_iters: int,
    key: jax.Array,
    num_grid: int = 400,
    sigma: float | None = None,
    dtype=None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) for the spectral density.

    Each probe ``z`` gives a ``num_iters``-point Gauss quadrature of ``zᵀ δ(A − x) z``; the nodes
    are smoothed with a Gaussian of width ``sigma`` (default 1 % of the spectral range).
    """
    dtype = dtype or jnp.result_type(float)
    probes = jax.random.rademacher(key, (num_probes, n), dtype)

    def one(z):
        tri = lanczos_tridiag(matvec, z, num_iters)
        theta, s = _tridiag_eigh(tri.alpha, tri.beta)
        return theta, s[0] ** 2

    nodes, weights = lax.map(one, probes)
    lo, hi = nodes.min(), nodes.max()
    span = jnp.maximum(hi - lo, jnp.finfo(dtype).eps)
    width = sigma if sigma is not None else 0.01 * span
    grid = jnp.linspace(lo - 0.1 * span, hi + 0.1 * span, num_grid, dtype=dtype)
    kern = jnp.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / width) ** 2)
    density = (kern * weights[None]).sum(axis=(1, 2)) / (num_probes * width * jnp.sqrt(2 * jnp.pi))
    return SpectralDensity(nodes, weights, grid, density)


# ----------------------------------------------------------------------------------------------
# Fisher information of a categorical model


def fisher_matvec(
    logits_fn: Callable[[jax.Array], jax.Array], theta: jax.Array, weights: jax.Array | None = None
) -> Matvec:
    """True Fisher ``F = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` as a matvec.

    ``logits_fn(theta) -> [N, C]`` gives one categorical distribution per example (e.g. the
    answer-position logits of a language model). This is also the Gauss–Newton matrix of the mean
    cross-entropy and the exact Hessian at ``θ*`` of the KL drift ``E KL(p_θ* ‖ p_θ)``.
    ``weights[N]`` (default uniform) reweights examples; they are normalised to sum to one.
    """
    z, jvp_fn = jax.linearize(logits_fn, theta)
    if z.ndim != 2:
        raise QuarticError(f"logits_fn must return [N, C] logits, got shape {z.shape}")
    p = jax.nn.softmax(z, axis=-1)
    w = jnp.full(z.shape[0], 1.0 / z.shape[0], z.dtype) if weights is None else weights
    w = w / w.sum()
    vjp_fn = jax.linear_transpose(jvp_fn, theta)

    def mv(v):
        jv = jvp_fn(v)
        hv = p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)
        return vjp_fn(hv * w[:, None])[0]

    return mv


def output_jacobian(logits_fn: Callable[[jax.Array], jax.Array], theta: jax.Array) -> jax.Array:
    """``J = ∂ logits / ∂θ``, shape ``[N, C, n]`` (dense; for small models and oracles)."""
    return jax.jacrev(logits_fn)(theta)


def per_example_jacobian(
    single_logits_fn: Callable[..., jax.Array], theta: jax.Array, *examples: jax.Array
) -> jax.Array:
    """``J[i] = ∂ single_logits_fn(θ, *example_i) / ∂θ``, shape ``[N, C, n]``.

    One reverse pass per class, vmapped over examples: ``C`` batched backward passes instead of
    the ``n`` products a dense matrix from matvecs needs (C ≪ n for a vocabulary-sized head).
    """
    return jax.vmap(jax.jacrev(single_logits_fn), in_axes=(None,) + (0,) * len(examples))(
        theta, *examples
    )


def fisher_from_jacobian(jac: jax.Array, logits: jax.Array) -> jax.Array:
    """Dense true Fisher ``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` from ``J [N, C, n]``.

    Uses ``diag p − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``: ``F = GᵀG / N`` with rows
    ``G_{ic} = √p_{ic} (J_{ic} − Σ_c' p_{ic'} J_{ic'})``, a single ``[N·C, n]`` product.
    """
    p = jax.nn.softmax(logits, axis=-1)
    mean_j = jnp.einsum("nc,ncp->np", p, jac)
    g = jnp.sqrt(p)[..., None] * (jac - mean_j[:, None, :])
    g = g.reshape(-1, jac.shape[-1])
    return g.T @ g / jac.shape[0]


def fisher_trace(
    single_logits_fn: Callable[..., jax.Array],
    theta: jax.Array,
    *examples: jax.Array,
    batch_size: int = 8,
) -> jax.Array:
    """Exact trace of the true Fisher ``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i``, matrix-free.

    ``tr F = (1/N) Σ_i Σ_c p_{ic} ‖J_{ic} − Σ_c' p_{ic'} J_{ic'}‖²`` from each example's ``[C, n]``
    Jacobian (``C`` backward passes), ``batch_size`` examples at a time: memory
    ``O(batch_size · C · n)``, cost about ``C`` backward passes of the whole batch. For a
    vocabulary-sized head this is cheaper than a Hutchinson estimate of useful accuracy, and exact.
    ``single_logits_fn(theta, *example_i) -> [C]``; ``examples`` are stacked along axis 0.
    """

    def one(ex):
        z, vjp = jax.vjp(lambda th: single_logits_fn(th, *ex), theta)
        if z.ndim != 1:
            raise QuarticError(f"single_logits_fn must return [C] logits, got shape {z.shape}")
        p = jax.nn.softmax(z)
        jac = jax.vmap(lambda e: vjp(e)[0])(jnp.eye(z.shape[0], dtype=z.dtype))  # [C, n]
        centred = jac - (p @ jac)[None, :]
        return jnp.sum(p * jnp.sum(centred**2, axis=1))

    return jnp.mean(lax.map(one, examples, batch_size=batch_size))


def fisher_factor(
    logits_fn: Callable[[jax.Array], jax.Array],
    theta: jax.Array,
    labels: jax.Array,
    index: jax.Array | None = None,
) -> jax.Array:
    """Score vectors ``G[r] = ∇_θ log p_θ(labels[r] | x_{index[r]})``, shape ``[R, n]``.

    ``F̂ = Gᵀ G / R`` is the *empirical* Fisher when ``labels`` are the data's labels and a
    Monte-Carlo estimate of the true Fisher when they are sampled from the model
    (:func:`sample_labels`); its rank is at most ``R``. Computed from one output Jacobian as
    ``G[r] = J_iᵀ (e_y − p_i)``, so R can be large without R backward passes.
    """
    if labels.ndim != 1:
        raise QuarticError(f"labels must be [R], got shape {labels.shape}")
    jac = output_jacobian(logits_fn, theta)
    p = jax.nn.softmax(logits_fn(theta), -1)
    index = jnp.arange(labels.shape[0]) if index is None else index
    if index.shape != labels.shape:
        raise QuarticError(f"index {index.shape} and labels {labels.shape} must match")
    resid = jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype) - p[index]
    return jnp.einsum("rc,rcp->rp", resid, jac[index])


def sample_labels(
    logits_fn: Callable[[jax.Array], jax.Array], theta: jax.Array, key: jax.Array, num_samples: int
) -> tuple[jax.Array, jax.Array]:
    """Draw ``num_samples`` labels per example from the model; returns ``(example_index, label)``."""
    z = logits_fn(theta)
    y = jax.random.categorical(key, z, axis=-1, shape=(num_samples, z.shape[0]))
    idx = jnp.broadcast_to(jnp.arange(z.shape[0]), (num_samples, z.shape[0]))
    return idx.reshape(-1), y.reshape(-1)


def monte_carlo_fisher(
    logits_fn: Callable[[jax.Array], jax.Array],
    theta: jax.Array,
    key: jax.Array,
    num_samples: int = 1,
) -> jax.Array:
    """Dense Monte-Carlo Fisher ``[n, n]`` from ``num_samples`` model-sampled labels per example.

    Equal to ``Gᵀ G / (N S)`` for the sampled scores, computed as ``mean_i J_iᵀ Ĉ_i J_i`` with
    ``Ĉ_i`` the sample second moment of ``e_y − p_i``: memory ``O(N C n)``, not ``O(N S n)``.
    """
    jac = output_jacobian(logits_fn, theta)
    return monte_carlo_fisher_from_jacobian(jac, logits_fn(theta), key, num_samples)


def monte_carlo_fisher_from_jacobian(
    jac: jax.Array, logits: jax.Array, key: jax.Array, num_samples: int = 1
) -> jax.Array:
    """:func:`monte_carlo_fisher` from the per-example Jacobian ``J [N, C, n]`` and logits
    ``[N, C]`` the caller already has (the same labels for the same ``key``: those of
    :func:`sample_labels`). Never forms the ``[N·S, n]`` scores: memory ``O(N C n)``."""
    p = jax.nn.softmax(logits, -1)
    y = jax.random.categorical(key, logits, axis=-1, shape=(num_samples, logits.shape[0]))
    r = jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype) - p[None]  # [S, N, C]
    cov = jnp.einsum("snc,snd->ncd", r, r) / num_samples
    return jnp.einsum("ncp,ncd,ndq->pq", jac, cov, jac) / logits.shape[0]


def empirical_fisher(
    logits_fn: Callable[[jax.Array], jax.Array], theta: jax.Array, labels: jax.Array
) -> jax.Array:
    """Dense empirical Fisher ``[n, n]`` from the data's labels (rank ≤ N)."""
    g = fisher_factor(logits_fn, theta, labels)
    return g.T @ g / g.shape[0]
