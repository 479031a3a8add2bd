"""What the theory predicts for the defences on the quadratic and curved families
(docs/defences.md §2): the leading Δu coefficient of plain fine-tuning, of a fixed projection, of
a projection tracked every step, and the floor a Fisher tail leaves to every projection.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from quartic.core.subspace import project_out


def projected_ft_loss(ft_loss_fn: Callable, theta_star: jax.Array, basis: jax.Array) -> Callable:
    """``L̃(θ) = L_FT(θ* + (I − P)(θ − θ*))``: its gradient flow from θ* is the fixed-projection
    flow ``θ̇ = −(I − P)∇L_FT(θ)``, so ``theory.taylor_onset(align_loss_fn, L̃, θ*)`` gives the exact
    onset of Δu under the fixed projection (Δu ≡ 0 on a quadratic without Fisher tail)."""

    def loss(theta):
        return ft_loss_fn(theta_star + project_out(basis, theta - theta_star))

    return loss


def _c_fisher_c(problem) -> jax.Array:
    base = problem.base
    return jnp.sum(base.fisher_values * (base.fisher_vectors.T @ problem.curvature) ** 2)


def plain_leak_coefficient(problem, basis: jax.Array) -> jax.Array:
    """*(ours; curved family, Pg = 0, no Fisher tail)* plain fine-tuning's ``Δu ≈ c₄ t⁴``.

    ``r = Bᵀφ(δ) = Bᵀδ + Bᵀc ‖δ‖²`` with ``δ = −tg + (t²/2)Hg + O(t³)`` and ``Bᵀg = 0`` gives
    ``r = t² Bᵀ(½ Hg + c ‖g‖²) + O(t³)``: ``c₄ = ½ ‖Λ^{1/2} Bᵀ(½ Hg + c‖g‖²)‖²`` (docs/theory.md §3,
    ``c₄ = ½ vᵀFv`` with ``v = ½ Hg + ½ ∇²φ[g, g]``). The paper's γ_F²/8 is its ``c = 0`` part.
    """
    base = problem.base
    g = base.ft_grad
    v = 0.5 * (base.ft_hessian @ g) + problem.curvature * jnp.vdot(g, g)
    fv = (base.fisher_vectors * base.fisher_values[None, :]) @ (base.fisher_vectors.T @ v)
    pv = basis @ (basis.T @ v)
    return 0.5 * jnp.vdot(pv, fv)


def tracked_leak_coefficient(problem, basis: jax.Array, lr: float) -> jax.Array:
    """*(ours; curved family, no Fisher tail)* the tracked projection's leak ``Δu ≈ a t²``.

    With ``φ(θ) = θ + c‖θ‖²`` the residual ``r = Bᵀφ`` changes over a step ``s`` by
    ``BᵀJ(θ)s + Bᵀc ‖s‖²``; a step projected off M(θ) = range(J(θ)ᵀB) kills the first term, so
    exactly ``r_K = Bᵀc Σ_k ‖s_k‖²`` and ``Δu = ½ (cᵀFc) (Σ_k ‖s_k‖²)²``. At small t,
    ``Σ_k ‖s_k‖² ≈ η t ‖(I − P)g‖²``: ``a = ½ (cᵀFc) η² ‖(I − P)g‖⁴`` (slope 2, prefactor η²).
    A projection refreshed every k steps is the same with η → kη (its blocks of k steps are the
    steps): ``Δu ≈ k² a t²``; the fixed projection is ``k η = t``.
    """
    gp = project_out(basis, problem.base.ft_grad)
    return 0.5 * _c_fisher_c(problem) * lr**2 * jnp.vdot(gp, gp) ** 2


def fixed_leak_coefficient(problem, basis: jax.Array) -> jax.Array:
    """*(ours; curved family, no Fisher tail)* the fixed projection's leading term ``Δu ≈ b t⁴``:
    Pδ ≡ 0 leaves ``r = Bᵀc ‖δ‖²`` with ``δ ≈ −t(I − P)g``, so ``b = ½ (cᵀFc) ‖(I − P)g‖⁴``.
    (The exact coefficient, every order, is :func:`projected_ft_loss` + ``taylor_onset``.)"""
    return tracked_leak_coefficient(problem, basis, 1.0)


def tail_leak_coefficient(problem, basis: jax.Array) -> jax.Array:
    """*(ours)* the floor of every rank-d projection defence when F has mass outside M: the
    projected step ``−t(I − P)g`` still meets the Fisher tail at first order, so
    ``Δu ≥ a_tail t² + O(t³)`` with ``a_tail = ½ ((I − P)g)ᵀ F ((I − P)g)`` (zero without tail)."""
    base = problem.base if hasattr(problem, "base") else problem
    gp = project_out(basis, base.ft_grad)
    return 0.5 * jnp.sum(base.fisher_values * (base.fisher_vectors.T @ gp) ** 2)
