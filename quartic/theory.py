"""What the theory predicts: exponents, coefficients, forecasts, crossover times, exact onset.

Everything that tests, experiments and figures compare against lives here (THEORY.md §3), so
nobody retypes the 4. Formulas name the paper's result they come from (arXiv:2602.15799) or are
marked *(ours)* when derived in THEORY.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet

from quartic.errors import QuarticError

#: Cor 6.3: the alignment loss grows like t^ORDER at onset.
ORDER = 4


def onset_order(m: int) -> int:
    """Onset-order ladder *(ours)*: if the first ``m − 1`` Taylor coefficients of δ(t) lie in M⊥
    and the m-th does not, ``Δu ∝ t^{2m}``. m = 1: leak (2); m = 2: the paper's law (4); m = 3: 6."""
    if m < 1:
        raise QuarticError(f"the ladder starts at m = 1, got {m}")
    return 2 * m


#: Predicted onset exponents of the ablation ladder (THEORY.md §3), by case name.
LADDER = {
    "first_order_leak": onset_order(1),
    "quartic": onset_order(2),
    "phg_zero": onset_order(3),
    "no_coupling": None,  # Δu ≡ 0: no growth at any order
}


def quartic_coefficient(gamma_fisher) -> jax.Array:
    """Reading (a): ``Δu(t) = γ_F² t⁴ / 8 + O(t⁵)`` with ``γ_F = ‖F^{1/2} P H g‖`` (Pg = 0, no tail)."""
    return jnp.asarray(gamma_fisher) ** 2 / 8


def lower_bound_coefficient(lambda_d, gamma_unweighted) -> jax.Array:
    """Reading (b): ``Δu ≥ λ_d γ_u² t⁴ / 8`` with ``γ_u = ‖P H g‖`` (a lower bound)."""
    return jnp.asarray(lambda_d) * jnp.asarray(gamma_unweighted) ** 2 / 8


def drift_lower_bound(t, gamma, eps) -> jax.Array:
    """Thm 6.2: ``‖F^{1/2} P δ(t)‖ ≥ (γ/2) t² − ε t`` (before O(t³) terms)."""
    t = jnp.asarray(t)
    return 0.5 * gamma * t**2 - eps * t


def next_order_slope(a: jax.Array, b: jax.Array) -> jax.Array:
    """*(ours)* ``Δu / (γ_F² t⁴/8) = 1 + s t + O(t²)`` with ``s = −(2/3)⟨a, b⟩/‖a‖²``,
    ``a = F^{1/2} P H g``, ``b = F^{1/2} P H² g`` (exact for quadratic L_FT, Pg = 0, no tail)."""
    return -(2.0 / 3.0) * jnp.vdot(a, b) / jnp.vdot(a, a)


def next_order_curvature(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """*(ours)* the t² coefficient of the same ratio: ``(‖b‖²/9 + ⟨a, c⟩/6) / ‖a‖²``,
    ``c = F^{1/2} P H³ g``. So ``ratio − 1 − s t = O(t²)`` with a known constant, and the relative
    error of the linear term alone is about ``(this / s) · t``."""
    return (jnp.vdot(b, b) / 9 + jnp.vdot(a, c) / 6) / jnp.vdot(a, a)


def crossover_time(g_fisher_g, hg_fisher_hg) -> jax.Array:
    """*(ours)* ``t× = 2 √(gᵀFg) / ‖F^{1/2} H g‖``: where the leak's t² term ``½ t² gᵀFg`` equals the
    curvature's t⁴ term ``(t⁴/8) ‖F^{1/2}Hg‖²``. Zero when there is no leak."""
    return 2.0 * jnp.sqrt(jnp.maximum(g_fisher_g, 0.0)) / jnp.sqrt(hg_fisher_hg)


def sgd_noise_crossover_time(lr, trace_f_sigma, gamma_fisher) -> jax.Array:
    """*(ours)* SGD noise adds ``½ η t tr(FPΣP)``; it dominates until ``t_c = (4η tr(FΣ)/γ_F²)^{1/3}``."""
    return (4.0 * lr * trace_f_sigma / gamma_fisher**2) ** (1.0 / 3.0)


# ----------------------------------------------------------------------------------------------
# The second-order forecast (THEORY.md §3)


class Forecast(NamedTuple):
    """Scalars at θ* that define the second-order forecast of Δu.

    With ``δ₂ = −s g + q Hg`` (flow: ``s = t, q = t²/2``; gradient descent after k steps of size
    η: ``s = ηk, q = η² k(k−1)/2``):

        Δu ≈ ∇L_Aᵀ δ₂ + ½ δ₂ᵀ H_A δ₂.

    Attributes: ``ga_g = ∇L_Aᵀg``, ``ga_hg = ∇L_Aᵀ(Hg)``, ``g_ha_g = gᵀH_A g``,
    ``g_ha_hg = gᵀH_A(Hg)``, ``hg_ha_hg = (Hg)ᵀH_A(Hg)``.
    """

    ga_g: jax.Array
    ga_hg: jax.Array
    g_ha_g: jax.Array
    g_ha_hg: jax.Array
    hg_ha_hg: jax.Array

    @classmethod
    def from_vectors(cls, grad_a, align_hvp: Callable, g, hg) -> Forecast:
        """From ``∇L_A``, a matvec of ``H_A`` (exact Hessian of L_A), ``g`` and ``Hg``."""
        ha_g, ha_hg = align_hvp(g), align_hvp(hg)
        return cls(
            jnp.vdot(grad_a, g),
            jnp.vdot(grad_a, hg),
            jnp.vdot(g, ha_g),
            jnp.vdot(g, ha_hg),
            jnp.vdot(hg, ha_hg),
        )

    def evaluate(self, s, q) -> jax.Array:
        return (
            -s * self.ga_g
            + q * self.ga_hg
            + 0.5 * (s**2 * self.g_ha_g - 2 * s * q * self.g_ha_hg + q**2 * self.hg_ha_hg)
        )

    def flow(self, t) -> jax.Array:
        """Forecast of Δu(t) along gradient flow."""
        t = jnp.asarray(t)
        return self.evaluate(t, 0.5 * t**2)

    def gd(self, k, lr) -> jax.Array:
        """Forecast of Δu after ``k`` gradient-descent steps of size ``lr``."""
        k = jnp.asarray(k, jnp.result_type(float))
        return self.evaluate(lr * k, 0.5 * lr**2 * k * (k - 1))

    def taylor(self) -> jax.Array:
        """Its Taylor coefficients ``[c1, c2, c3, c4]`` in t (flow)."""
        return jnp.stack(
            [
                -self.ga_g,
                0.5 * (self.ga_hg + self.g_ha_g),
                -0.5 * self.g_ha_hg,
                self.hg_ha_hg / 8,
            ]
        )

    def fisher_only(self) -> Forecast:
        """The form that drops ∇L_A (what a pure-Fisher analysis predicts)."""
        z = jnp.zeros_like(self.ga_g)
        return self._replace(ga_g=z, ga_hg=z)


def time_to_threshold(
    forecast_fn: Callable[[jax.Array], jax.Array],
    threshold: float,
    t_max: float,
    num: int = 4096,
) -> float:
    """First ``t ∈ (0, t_max]`` with ``forecast_fn(t) ≥ threshold`` (``inf`` if none).

    Located on a geometric grid, then refined by bisection to float64 precision.
    """
    ts = jnp.geomspace(t_max * 1e-8, t_max, num)
    vals = np.asarray(forecast_fn(ts))
    hit = np.nonzero(vals >= threshold)[0]
    if hit.size == 0:
        return math.inf
    i = int(hit[0])
    if i == 0:
        return float(ts[0])
    lo, hi = float(ts[i - 1]), float(ts[i])
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float(forecast_fn(jnp.asarray(mid))) >= threshold:
            hi = mid
        else:
            lo = mid
    return hi


def quartic_time_to_threshold(coefficient, threshold) -> jax.Array:
    """Pure quartic law ``c₄ t⁴ = threshold`` solved for t."""
    return (jnp.asarray(threshold) / coefficient) ** 0.25


# ----------------------------------------------------------------------------------------------
# Exact onset by Taylor-mode AD *(ours, beyond the paper)*


class TaylorOnset(NamedTuple):
    """Taylor expansion of ``u(t) = L_A(θ(t))`` along the gradient flow of L_FT from θ*.

    Attributes:
      coefficients: ``[K]``, ``c_k = u^{(k)}(0) / k!`` for k = 1..K.
      flow_derivatives: ``[K, n]``, ``θ^{(k)}(0)`` for k = 1..K (for a quadratic L_FT these are
        ``(−1)^k H^{k−1} g``).
    """

    coefficients: jax.Array
    flow_derivatives: jax.Array

    def onset(self, rtol: float = 1e-8) -> tuple[int | None, float]:
        """The true onset order (first coefficient not zero relative to the largest) and its value."""
        c = np.asarray(self.coefficients)
        scale = np.abs(c).max()
        if scale == 0:
            return None, 0.0
        nz = np.nonzero(np.abs(c) > rtol * scale)[0]
        return int(nz[0]) + 1, float(c[nz[0]])


def taylor_onset(
    align_loss_fn: Callable[[jax.Array], jax.Array],
    ft_loss_fn: Callable[[jax.Array], jax.Array],
    theta_star: jax.Array,
    order: int = 6,
) -> TaylorOnset:
    """Exact Taylor coefficients c₁…c_K of ``u(t) = L_A(θ(t))``, ``θ̇ = −∇L_FT(θ)``, ``θ(0) = θ*``.

    The flow's derivatives follow recursively: given θ', …, θ^{(k)}, one ``jet`` of ``−∇L_FT``
    along them gives d^k/dt^k of θ̇, i.e. θ^{(k+1)}. A final ``jet`` of L_A gives u's derivatives.
    The first non-zero c_m is the true onset order, for any smooth model, with no assumption
    (it includes the output-curvature terms that the paper's γ omits).
    """
    if order < 1:
        raise QuarticError(f"order must be >= 1, got {order}")
    if theta_star.ndim != 1:
        raise QuarticError(f"theta_star must be flat [n], got shape {theta_star.shape}")
    neg_grad = lambda th: -jax.grad(ft_loss_fn)(th)
    derivs = [neg_grad(theta_star)]
    for _ in range(order - 1):
        _, series = jet.jet(neg_grad, (theta_star,), (derivs,))
        derivs.append(series[-1])
    u0, useries = jet.jet(align_loss_fn, (theta_star,), (derivs,))
    del u0
    fact = jnp.asarray([math.factorial(k) for k in range(1, order + 1)], theta_star.dtype)
    coeffs = jnp.stack(useries) / fact
    return TaylorOnset(coeffs, jnp.stack(derivs))
