"""The sensitive subspace and the top of the fine-tuning spectrum, for any flat pair of losses.

- :class:`Losses`: the triple (L_A, L_FT, θ*) every study passes around, with the alignment
  curvature as a matvec (the exact Hessian of L_A unless another is given).
- :func:`sensitive_subspace` / :func:`top_subspace`: M(θ), the top-``rank`` eigenspace of the
  alignment curvature, by Lanczos from a given or a cold (seeded random) start.
- :func:`lambda_max`: λ_max of a symmetric operator (in practice H_FT, which sets every step size and
  every t·λ axis) with its residual, by Lanczos or, for a small dense matrix, by ``eigvalsh``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from quartic.core import curvature
from quartic.core.errors import QuarticError

Matvec = Callable[[jax.Array], jax.Array]


class Losses(NamedTuple):
    """The two flat losses and θ*.

    Attributes:
      align_loss_fn: ``L_A(θ[n]) -> scalar``.
      ft_loss_fn: ``L_FT(θ[n]) -> scalar``.
      theta_star: θ* ``[n]``.
      align_hvp_fn: ``θ -> (v -> F(θ) v)``, the alignment curvature as a matvec at θ (default:
        the exact Hessian of ``align_loss_fn``, :func:`quartic.core.curvature.hvp_fn`).
      delta_u_fn: ``θ -> Δu`` (default ``L_A(θ) − L_A(θ*)``).
    """

    align_loss_fn: Callable[[jax.Array], jax.Array]
    ft_loss_fn: Callable[[jax.Array], jax.Array]
    theta_star: jax.Array
    align_hvp_fn: Callable[[jax.Array], Matvec] | None = None
    delta_u_fn: Callable[[jax.Array], jax.Array] | None = None

    def align_matvec(self, theta: jax.Array) -> Matvec:
        if self.align_hvp_fn is not None:
            return self.align_hvp_fn(theta)
        return curvature.hvp_fn(self.align_loss_fn, theta)

    def delta_u(self, theta: jax.Array) -> jax.Array:
        if self.delta_u_fn is not None:
            return self.delta_u_fn(theta)
        return self.align_loss_fn(theta) - self.align_loss_fn(self.theta_star)

    @classmethod
    def of(cls, problem, **kw) -> Losses:
        """From a :class:`~quartic.QuadraticProblem` or :class:`~quartic.CurvedProblem`."""
        du = getattr(problem, "delta_u", None)
        if du is not None and "delta_u_fn" not in kw:
            kw["delta_u_fn"] = lambda th: du(th - problem.theta_star)
        return cls(problem.align_loss_fn, problem.ft_loss_fn, problem.theta_star, **kw)


def default_num_iters(n: int, rank: int) -> int:
    """Krylov dimension for a cold estimate of M: ``min(n, 3·rank + 10)``."""
    return min(n, 3 * rank + 10)


def top_subspace(
    matvec: Matvec, v0: jax.Array, rank: int, num_iters: int
) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` eigenpairs of a symmetric operator by ``num_iters`` Lanczos steps from ``v0``.

    Full reorthogonalisation (:func:`quartic.core.curvature.lanczos_tridiag`), Rayleigh–Ritz on the
    Krylov space; costs exactly ``num_iters`` matvecs (no residual check: the per-step trackers of
    :mod:`quartic.studies.defences` cannot afford ``rank`` more HVPs a step;
    :func:`quartic.core.curvature.lanczos_eigh` is the same iteration with exact residuals). Returns
    ``(basis [n, rank], values [rank])``, values descending.
    """
    if not rank <= num_iters <= v0.shape[0]:
        raise QuarticError(
            f"num_iters must satisfy rank={rank} <= num_iters <= n={v0.shape[0]}, got {num_iters}"
        )
    tri = curvature.lanczos_tridiag(matvec, v0, num_iters)
    w, s = curvature._tridiag_eigh(tri.alpha, tri.beta)
    s_top = s[:, ::-1][:, :rank]
    basis = tri.basis.T @ s_top
    basis = basis / jnp.linalg.norm(basis, axis=0, keepdims=True)
    return basis, w[::-1][:rank]


def cold_v0(theta: jax.Array, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), theta.shape, theta.dtype)


def project_out(basis: jax.Array, v: jax.Array) -> jax.Array:
    """``(I − B Bᵀ) v``: ``v`` with its part in span(B) removed (B orthonormal ``[n, d]``)."""
    return v - basis @ (basis.T @ v)


def sensitive_subspace(
    losses: Losses, rank: int, num_iters: int | None = None, seed: int = 0, theta=None
) -> tuple[jax.Array, jax.Array]:
    """M(θ) (default θ = θ*): ``(basis [n, rank], values [rank])`` by cold Lanczos on the
    alignment curvature, ``num_iters`` HVPs (default :func:`default_num_iters`)."""
    th = losses.theta_star if theta is None else theta
    m = num_iters or default_num_iters(th.shape[0], rank)
    return top_subspace(losses.align_matvec(th), cold_v0(th, seed), rank, m)


# ----------------------------------------------------------------------------------------------
# λ_max


class TopEigenvalue(NamedTuple):
    """λ_max of a symmetric operator and its residual ``‖A v − λ v‖`` (a bound on the distance
    from ``value`` to an eigenvalue; 0 for ``method="dense"``, exact to rounding)."""

    value: jax.Array
    residual: jax.Array


def lambda_max(
    operator,
    n: int | None = None,
    *,
    method: str = "lanczos",
    num_iters: int = 60,
    key: jax.Array | None = None,
    v0: jax.Array | None = None,
    dtype=None,
) -> TopEigenvalue:
    """The largest (algebraic) eigenvalue of a symmetric operator, jit-compatible.

    Args:
      operator: a matvec ``v[n] -> A v`` (``method="lanczos"``) or the ``[n, n]`` matrix
        (``method="dense"``: ``jnp.linalg.eigvalsh``, for a small matrix at hand).
      n: the dimension (Lanczos only).
      num_iters: Lanczos steps, capped at n (one more matvec gives the exact residual).
      key, v0, dtype: the start of the Krylov space (:func:`quartic.core.curvature.lanczos_eigh`:
        ``v0`` if given, else a normal draw from ``key``, default ``PRNGKey(0)``).
    """
    if method == "dense":
        a = jnp.asarray(operator)
        return TopEigenvalue(jnp.linalg.eigvalsh(a)[-1], jnp.zeros((), a.dtype))
    if method != "lanczos":
        raise QuarticError(f'method must be "lanczos" or "dense", got {method!r}')
    if n is None:
        n = v0.shape[0] if v0 is not None else None
    if n is None:
        raise QuarticError("lambda_max by Lanczos needs the dimension n (or a start vector v0)")
    top = curvature.lanczos_eigh(
        operator, n, 1, 0, num_iters=min(n, num_iters), key=key, dtype=dtype, v0=v0
    ).top
    return TopEigenvalue(top.values[0], top.residuals[0])


__all__ = [
    "Losses",
    "TopEigenvalue",
    "cold_v0",
    "default_num_iters",
    "lambda_max",
    "project_out",
    "sensitive_subspace",
    "top_subspace",
]
