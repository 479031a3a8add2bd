"""Model families with known geometry: the quadratic manifold and a curved family.

``QuadraticProblem`` (docs/theory.md §1–3): θ* = 0, ``L_A(θ) = ½ θᵀFθ``, ``L_FT(θ) = gᵀθ + ½ θᵀHθ``.
Its gradient-flow path and gradient-descent iterates are exact, through the eigendecomposition of
H, so the t⁴ law can be checked to float64 precision.

``CurvedProblem``: ``L_A(θ) = ½ φ(θ)ᵀ F φ(θ)`` with ``φ(θ) = θ + c ‖θ‖²`` (so the Fisher
``J(θ)ᵀFJ(θ)`` and its top subspace rotate as θ moves) and
``L_FT(θ) = gᵀθ + ½ θᵀHθ + (β/4) ‖θ‖⁴`` (so the flow has no closed form).

Both are pytrees (``jax.tree_util.register_dataclass``), so a batch of problems built with
``jax.vmap`` over seeds runs in one compiled simulation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core.errors import QuarticError


def _phi_flow(lam: jax.Array, t: jax.Array) -> jax.Array:
    """``(1 − e^{−λt}) / λ``, accurate for ``λt → 0`` and ``λ ≤ 0``."""
    x = lam * t
    small = jnp.abs(x) < 1e-3
    xs = jnp.where(small, 1.0, x)
    series = t * (1 - x / 2 + x**2 / 6 - x**3 / 24 + x**4 / 120)
    return jnp.where(small, series, -jnp.expm1(-xs) / jnp.where(small, 1.0, lam))


def _phi_gd(lam: jax.Array, k: jax.Array, eta: float) -> jax.Array:
    """``(1 − (1 − ηλ)^k) / λ`` (the GD analogue), with its ``λ → 0`` limit ``kη``."""
    tiny = jnp.abs(eta * lam) < 1e-300
    lam_safe = jnp.where(tiny, 1.0, lam)
    val = -jnp.expm1(k * jnp.log1p(-eta * lam_safe)) / lam_safe
    return jnp.where(tiny, k * eta, val)


def fisher_eig(fisher: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigendecomposition of a PSD Fisher with rounding-level eigenvalues set to exactly zero.

    ``½ δᵀFδ`` evaluated as a dense product has an absolute error floor ``≈ ε λ_max ‖δ‖²``, which
    swamps a t⁴ signal at small t when δ is mostly orthogonal to M. Evaluated as
    ``½ Σ_j w_j (v_jᵀδ)²`` with the null directions exactly zero, it is accurate to relative
    ``≈ ε / (t γ)``. Eigenvalues below ``n · ε · max|w|`` are below float resolution and are zeroed.
    """
    w, v = jnp.linalg.eigh(0.5 * (fisher + fisher.T))
    floor = w.shape[-1] * jnp.finfo(w.dtype).eps * jnp.abs(w).max()
    return jnp.where(jnp.abs(w) <= floor, 0.0, w), v


def _half_quad(values, vectors, x):
    coords = x @ vectors
    return 0.5 * jnp.sum(jnp.broadcast_to(values, coords.shape) * coords**2, axis=-1)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuadraticProblem:
    """The quadratic manifold model with explicit F, H and g (all float arrays).

    Build it as ``QuadraticProblem(fisher=F, ft_hessian=H, ft_grad=g)``; F is kept in factored form
    (``fisher_values``, ``fisher_vectors``, see :func:`fisher_eig`) so that Δu is computed without
    cancellation. Generators pass the exact factors.

    Attributes:
      fisher: ``F [n, n]``, symmetric positive semi-definite.
      ft_hessian: ``H [n, n]``, symmetric.
      ft_grad: ``g [n]``.
    """

    fisher: jax.Array
    ft_hessian: jax.Array
    ft_grad: jax.Array
    fisher_values: jax.Array | None = None
    fisher_vectors: jax.Array | None = None

    def __post_init__(self):
        f, h, g = self.fisher, self.ft_hessian, self.ft_grad
        if not all(isinstance(x, jax.Array | np.ndarray) for x in (f, h, g)):
            return  # inside jax transformations the leaves may be placeholders
        if isinstance(g, jax.core.Tracer) or self.fisher_values is not None:
            return  # traced, or rebuilt from its leaves (e.g. a vmapped batch): already checked
        if g.ndim != 1:
            raise QuarticError(f"ft_grad must be a vector [n], got shape {g.shape}")
        n = g.shape[0]
        for name, m in (("fisher", f), ("ft_hessian", h)):
            if m.shape != (n, n):
                raise QuarticError(f"{name} must be [n, n] = [{n}, {n}], got shape {m.shape}")
        for name, m in (("fisher", f), ("ft_hessian", h), ("ft_grad", g)):
            if not bool(jnp.all(jnp.isfinite(m))):
                raise QuarticError(f"{name} contains non-finite values (NaN or inf)")
        if self.fisher_values is None:
            w, v = fisher_eig(jnp.asarray(f))
            object.__setattr__(self, "fisher_values", w)
            object.__setattr__(self, "fisher_vectors", v)

    @property
    def n(self) -> int:
        return self.ft_grad.shape[-1]

    @property
    def theta_star(self) -> jax.Array:
        return jnp.zeros_like(self.ft_grad)

    def align_loss_fn(self, theta: jax.Array) -> jax.Array:
        """``L_A(θ) = ½ θᵀFθ`` (factored: accurate at small θ)."""
        return _half_quad(self.fisher_values, self.fisher_vectors, theta)

    def ft_loss_fn(self, theta: jax.Array) -> jax.Array:
        return self.ft_grad @ theta + 0.5 * theta @ (self.ft_hessian @ theta)

    def _h_eig(self):
        return jnp.linalg.eigh(self.ft_hessian)

    def flow(self, t: jax.Array) -> jax.Array:
        """Exact gradient-flow displacement ``δ(t) = −(1 − e^{−Ht}) H⁻¹ g``; ``t`` scalar or [T]."""
        lam, u = self._h_eig()
        coef = u.T @ self.ft_grad
        t = jnp.asarray(t, self.ft_grad.dtype)
        shape = t.shape + lam.shape
        phi = _phi_flow(jnp.broadcast_to(lam, shape), jnp.broadcast_to(t[..., None], shape))
        return -(phi * jnp.broadcast_to(coef, phi.shape)) @ u.T

    def gd(self, k: jax.Array, lr: float) -> jax.Array:
        """Exact gradient-descent displacement after ``k`` steps of size ``lr``; ``k`` scalar or [K]."""
        lam, u = self._h_eig()
        coef = u.T @ self.ft_grad
        k = jnp.asarray(k, self.ft_grad.dtype)
        shape = k.shape + lam.shape
        phi = _phi_gd(jnp.broadcast_to(lam, shape), jnp.broadcast_to(k[..., None], shape), lr)
        return -(phi * jnp.broadcast_to(coef, phi.shape)) @ u.T

    def delta_u(self, delta: jax.Array) -> jax.Array:
        """Alignment loss rise ``½ δᵀFδ`` for ``δ[..., n]``."""
        return _half_quad(self.fisher_values, self.fisher_vectors, delta)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CurvedProblem:
    """A curved alignment map and a non-quadratic fine-tuning loss (see module docstring).

    ``curvature[n]`` is ``c`` in ``φ(θ) = θ + c ‖θ‖²``; ``quartic`` is ``β``. Build it with
    :func:`make_curved` or :meth:`from_quadratic`.
    """

    base: QuadraticProblem
    curvature: jax.Array
    quartic: jax.Array

    @classmethod
    def from_quadratic(cls, base: QuadraticProblem, curvature, quartic=0.0) -> CurvedProblem:
        c = jnp.asarray(curvature, base.ft_grad.dtype)
        if c.shape != base.ft_grad.shape:
            raise QuarticError(f"curvature must be [n]={base.ft_grad.shape}, got {c.shape}")
        return cls(base, c, jnp.asarray(quartic, base.ft_grad.dtype))

    @property
    def n(self) -> int:
        return self.base.n

    @property
    def theta_star(self) -> jax.Array:
        return self.base.theta_star

    def phi(self, theta: jax.Array) -> jax.Array:
        return theta + self.curvature * jnp.sum(theta * theta, axis=-1, keepdims=True)

    def align_loss_fn(self, theta: jax.Array) -> jax.Array:
        return self.base.align_loss_fn(self.phi(theta))

    def ft_loss_fn(self, theta: jax.Array) -> jax.Array:
        sq = theta @ theta
        return self.base.ft_loss_fn(theta) + 0.25 * self.quartic * sq * sq

    def as_quadratic(self) -> QuadraticProblem:
        """The quadratic model with the same F, H, g at θ* (what a θ*-only analysis sees)."""
        return self.base

    def fisher_at(self, theta: jax.Array) -> jax.Array:
        """Gauss–Newton Fisher ``J(θ)ᵀ F J(θ)`` at θ, ``J = I + 2 c θᵀ``; its top-d subspace is M(θ)."""
        jac = jnp.eye(self.n, dtype=theta.dtype) + 2.0 * jnp.outer(self.curvature, theta)
        f = (
            self.base.fisher_vectors * self.base.fisher_values[None, :]
        ) @ self.base.fisher_vectors.T
        return jac.T @ f @ jac

    def fisher_lipschitz(self) -> jax.Array:
        """``L_F`` with ``‖F(θ) − F(θ*)‖ ≤ L_F ‖θ‖ + O(‖θ‖²)``: ``4 ‖c‖ λ_1``."""
        return 4.0 * jnp.linalg.norm(self.curvature) * jnp.max(self.base.fisher_values)


# ----------------------------------------------------------------------------------------------
# Generators


@dataclass(frozen=True)
class QuadraticSpec:
    """Knobs of the random quadratic family.

    Attributes:
      n: dimension. d: rank of the sensitive subspace M.
      lam_top: ``(λ_1, λ_d)``: the d sharp Fisher eigenvalues are log-spaced in this range.
      tail: Fisher mass outside M, ``Σ_{j>d} λ_j`` (spread over the other directions).
      leak: ``‖Pg‖ / ‖g‖``, the first-order leak of the fine-tuning gradient into M.
      coupling: spectral norm of the off-diagonal Hessian block ``P H P⊥``.
      h_range: ``(min, max)`` eigenvalues of the diagonal blocks of H (its conditioning).
      phg_zero: choose ``g`` in the null space of the coupling block, so ``PHg = 0`` but
        ``PH²g ≠ 0`` (the slope-6 rung of the onset ladder).
      g_norm: ``‖g‖``.
    """

    n: int = 40
    d: int = 4
    lam_top: tuple[float, float] = (10.0, 2.0)
    tail: float = 0.0
    leak: float = 0.0
    coupling: float = 0.5
    h_range: tuple[float, float] = (1.0, 5.0)
    phg_zero: bool = False
    g_norm: float = 1.0

    def __post_init__(self):
        if not 1 <= self.d < self.n:
            raise QuarticError(f"rank d must satisfy 1 <= d < n; got d={self.d}, n={self.n}")
        if not 0 <= self.leak <= 1:
            raise QuarticError(f"leak is a ratio ‖Pg‖/‖g‖ in [0, 1], got {self.leak}")
        if self.tail < 0 or self.coupling < 0:
            raise QuarticError("tail and coupling must be non-negative")
        if self.phg_zero and self.n - self.d <= self.d:
            raise QuarticError("phg_zero needs n - d > d so the coupling block has a null space")


def _spd(key, k, lo, hi, dtype):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (k, k), dtype))
    ev = jnp.exp(jnp.linspace(jnp.log(lo), jnp.log(hi), k)).astype(dtype)
    return (q * ev[None, :]) @ q.T


@dataclass(frozen=True)
class FamilyConfig:
    """The random quadratic family's knobs, as a base for an experiment's frozen config (the
    experiment adds its own fields after these). :meth:`spec` is the family's
    :class:`QuadraticSpec`, with any of its other fields given."""

    n: int = 40
    d: int = 4
    coupling: float = 0.5
    h_min: float = 1.0
    h_max: float = 5.0

    def spec(self, **fields) -> QuadraticSpec:
        base = dict(n=self.n, d=self.d, coupling=self.coupling, h_range=(self.h_min, self.h_max))
        return QuadraticSpec(**{**base, **fields})


def make_quadratic(key: jax.Array, spec: QuadraticSpec = QuadraticSpec(), dtype=None):
    """Draw a :class:`QuadraticProblem` with the geometry set by ``spec``; returns it and ``B``.

    The sensitive subspace is a random d-dimensional subspace with orthonormal basis ``B [n, d]``
    (returned, so tests can compare with what :func:`quartic.check_aic` finds).
    """
    dtype = dtype or jnp.result_type(float)
    n, d = spec.n, spec.d
    kq, kf, kh1, kh2, kk, kg, kl = jax.random.split(key, 7)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (n, n), dtype))
    b, c = q[:, :d], q[:, d:]
    lam = jnp.exp(jnp.linspace(jnp.log(spec.lam_top[0]), jnp.log(spec.lam_top[1]), d)).astype(dtype)
    tail_w = jax.random.uniform(kf, (n - d,), dtype, 0.5, 1.5)
    tail = spec.tail * tail_w / tail_w.sum()
    fisher_values = jnp.concatenate([lam, tail])
    fisher = (q * fisher_values[None, :]) @ q.T
    h_mm = _spd(kh1, d, *spec.h_range, dtype)
    h_pp = _spd(kh2, n - d, *spec.h_range, dtype)
    k = jax.random.normal(kk, (d, n - d), dtype)
    k = spec.coupling * k / jnp.linalg.norm(k, 2)
    h_block = jnp.block([[h_mm, k], [k.T, h_pp]])
    hess = q @ h_block @ q.T
    hess = 0.5 * (hess + hess.T)
    g_perp = jax.random.normal(kg, (n - d,), dtype)
    if spec.phg_zero:
        # project g⊥ onto the null space of K (rank ≤ d) so that P H g = B K g⊥ = 0
        _, _, vt = jnp.linalg.svd(k, full_matrices=True)
        null = vt[d:]
        g_perp = null.T @ (null @ g_perp)
    g_perp = g_perp / jnp.linalg.norm(g_perp)
    g_par = jax.random.normal(kl, (d,), dtype)
    g_par = g_par / jnp.linalg.norm(g_par)
    g = spec.g_norm * (c @ g_perp * jnp.sqrt(1 - spec.leak**2) + b @ g_par * spec.leak)
    return QuadraticProblem(fisher, hess, g, fisher_values, q), b


def make_curved(
    key: jax.Array,
    spec: QuadraticSpec = QuadraticSpec(),
    curvature: float = 1.0,
    quartic: float = 0.1,
    dtype=None,
):
    """A :class:`CurvedProblem` around a random quadratic of ``spec``; returns it and ``B``.

    ``c`` has norm ``curvature`` and a random direction, so the subspace rotates as θ moves.
    """
    kq, kc = jax.random.split(key)
    quad, b = make_quadratic(kq, spec, dtype)
    c = jax.random.normal(kc, (spec.n,), quad.ft_grad.dtype)
    c = curvature * c / jnp.linalg.norm(c)
    return CurvedProblem.from_quadratic(quad, c, quartic), b


def replace(problem, **changes):
    """``dataclasses.replace`` for problems (e.g. ``replace(p, ft_grad=g2)``)."""
    return dataclasses.replace(problem, **changes)
