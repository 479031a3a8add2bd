"""What the theory predicts: exponents, coefficients, forecasts, crossover times, exact onset.

Everything that tests, experiments and figures compare against lives here (docs/theory.md §3), so
nobody retypes the 4. Formulas name the paper's result they come from (arXiv:2602.15799) or are
marked *(ours)* when derived in docs/theory.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet

from quartic.core.cache import memo
from quartic.core.chunked import Chunked, weighted_sum
from quartic.core.curvature import matvec_pair
from quartic.core.errors import QuarticError
from quartic.core.jit import compile_bound_jit

#: Cor 6.3: the alignment loss grows like t^ORDER at onset.
ORDER = 4


def onset_order(m: int) -> int:
    """Onset-order ladder *(ours)*: if the first ``m − 1`` Taylor coefficients of δ(t) lie in M⊥
    and the m-th does not, ``Δu ∝ t^{2m}``. m = 1: leak (2); m = 2: the paper's law (4); m = 3: 6."""
    if m < 1:
        raise QuarticError(f"the ladder starts at m = 1, got {m}")
    return 2 * m


class Rung(NamedTuple):
    """One rung of the onset ladder: a quadratic problem that satisfies the AIC with one condition
    broken, and the exponents it predicts.

    Attributes:
      name: the case.
      field: the :class:`~quartic.QuadraticSpec` field that breaks the condition (``None``: the
        AIC base itself).
      value: its value; ``None`` where the size is the caller's choice (``leak``, ``tail``).
      onset: the onset exponent (``None``: Δu ≡ 0, no growth at any order).
      late: the exponent after the crossover t× (``None``: the onset holds throughout).
    """

    name: str
    field: str | None
    value: float | bool | None
    onset: int | None
    late: int | None

    def change(self, **sizes) -> dict:
        """The spec fields to replace in an AIC base, ``sizes`` giving ``leak``/``tail``."""
        if self.field is None:
            return {}
        if self.value is not None:
            return {self.field: self.value}
        if self.field not in sizes:
            raise QuarticError(f"the rung {self.name!r} needs a size for {self.field!r}")
        return {self.field: sizes[self.field]}


#: The onset ladder (docs/theory.md §3): every rung, in order. Fisher mass outside M sees δ's first
#: Taylor coefficient (−g), like a leak: the m = 1 rung as well.
RUNGS = (
    Rung("quartic", None, None, onset_order(2), None),
    Rung("first_order_leak", "leak", None, onset_order(1), ORDER),
    Rung("fisher_tail", "tail", None, onset_order(1), ORDER),
    Rung("phg_zero", "phg_zero", True, onset_order(3), None),
    Rung("no_coupling", "coupling", 0.0, None, None),
)

#: Predicted onset exponents of the ladder, by case name.
LADDER = {r.name: r.onset for r in RUNGS}


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
# The second-order forecast (docs/theory.md §3)


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
        """From ``∇L_A``, a matvec of ``H_A`` (exact Hessian of L_A), ``g`` and ``Hg``. The two
        products ``H_A g`` and ``H_A Hg`` are one batched product (``vmap``): one copy of the
        matvec in the compiled program, one forward pass shared by both tangents."""
        ha_g, ha_hg = matvec_pair(align_hvp, g, hg)
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


def quartic_time_to_threshold(coefficient, threshold) -> jax.Array:
    """Pure quartic law ``c₄ t⁴ = threshold`` solved for t."""
    return (jnp.asarray(threshold) / coefficient) ** 0.25


# ----------------------------------------------------------------------------------------------
# Exact onset by Taylor-mode AD *(ours, beyond the paper)*


class TaylorOnset(NamedTuple):
    """Taylor expansion of ``u(t) = L_A(θ(t))`` along the gradient flow of L_FT from θ*.

    Attributes:
      coefficients: ``[K]``, ``c_k = u^{(k)}(0) / k!`` for k = 1..K: the series' coefficients,
        ``Δu(t) = Σ c_k t^k`` (so ``c₄ = γ_F²/8`` on a quadratic).
      flow_derivatives: ``[K, n]``, the raw derivatives ``θ^{(k)}(0)`` for k = 1..K, *not* divided by
        k! (for a quadratic L_FT these are ``(−1)^k H^{k−1} g``; δ(t)'s Taylor coefficients are
        ``θ^{(k)}(0) / k!``).
    """

    coefficients: jax.Array
    flow_derivatives: jax.Array

    def time_scale(self) -> float:
        """τ = ‖θ'(0)‖ / ‖θ''(0)‖ = ‖g‖ / ‖Hg‖: the flow's own time scale (1 when undefined)."""
        d = np.asarray(self.flow_derivatives)
        if d.ndim != 2 or d.shape[0] < 2:
            return 1.0
        n1, n2 = np.linalg.norm(d[0]), np.linalg.norm(d[1])
        return float(n1 / n2) if n1 > 0 and n2 > 0 and np.isfinite(n1 / n2) else 1.0

    def onset(
        self, rtol: float = 1e-8, atol: float | None = None, scale: str = "time"
    ) -> tuple[int | None, float]:
        """The true onset order (the first coefficient that is not zero) and its value.

        ``atol`` given: ``c_k`` is zero when ``|c_k| ≤ atol`` (an absolute scale the caller knows,
        e.g. the rounding floor of :func:`quartic.studies.ladder.taylor_rounding_floor`).
        Otherwise each term is measured at the flow's time scale τ (:meth:`time_scale`): ``c_k`` is
        zero when ``|c_k| τ^k ≤ rtol · max_j |c_j| τ^j``. The terms ``c_k τ^k`` all have the units of
        L_A and do not grow with k like ``λ_max(H)^k``, so raising the order of the expansion does
        not turn a genuine low-order coefficient into "zero". ``scale="largest"`` is the rule
        relative to the largest coefficient, unscaled (its answer can change with the order).
        """
        if scale not in ("time", "largest"):
            raise QuarticError(f"scale must be 'time' or 'largest', got {scale!r}")
        c = np.asarray(self.coefficients, dtype=float)
        if atol is not None:
            nz = np.nonzero(np.abs(c) > atol)[0]
        else:
            tau = self.time_scale() if scale == "time" else 1.0
            terms = np.abs(c) * tau ** np.arange(1, c.shape[0] + 1)
            scale = terms.max()
            if scale == 0:
                return None, 0.0
            nz = np.nonzero(terms > rtol * scale)[0]
        if nz.size == 0:
            return None, 0.0
        return int(nz[0]) + 1, float(c[nz[0]])


def taylor_onset(
    align_loss_fn: Callable[..., jax.Array],
    ft_loss_fn: Callable[..., jax.Array],
    theta_star: jax.Array,
    order: int = 6,
    align_args: tuple = (),
    ft_args: tuple = (),
) -> TaylorOnset:
    """Exact Taylor coefficients c₁…c_K of ``u(t) = L_A(θ(t))``, ``θ̇ = −∇L_FT(θ)``, ``θ(0) = θ*``.

    The flow's derivatives follow recursively: given θ', …, θ^{(k)}, one ``jet`` of ``−∇L_FT``
    along them gives d^k/dt^k of θ̇, i.e. θ^{(k+1)}. A final ``jet`` of L_A gives u's derivatives.
    The first non-zero c_m is the true onset order, for any smooth model, with no assumption
    (it includes the output-curvature terms that the paper's γ omits).

    ``align_loss_fn(theta, *align_args)`` and ``ft_loss_fn(theta, *ft_args)``: data passed as
    arguments are not baked into the compiled program, which is cached per (losses, order).
    Either may be a :class:`Chunked` instead of a tuple, ``L(θ) = Σ_j w_j f(θ, *parts_j)``: the
    same coefficients (up to rounding) with one chunk's intermediates in memory at a time (the
    jets' memory grows like rows × order). Several alignment losses along one flow:
    :func:`taylor_onsets`.
    """
    return taylor_onsets((align_loss_fn,), ft_loss_fn, theta_star, order, (align_args,), ft_args)[0]


def taylor_onsets(
    align_loss_fns: Sequence[Callable[..., jax.Array]],
    ft_loss_fn: Callable[..., jax.Array],
    theta_star: jax.Array,
    order: int = 6,
    align_args: Sequence[tuple] | None = None,
    ft_args: tuple = (),
) -> list[TaylorOnset]:
    """:func:`taylor_onset` for several alignment losses along the same flow, in one program.

    The flow's derivatives (the costly nested ``jet`` of ``−∇L_FT``) are computed and compiled
    once; each loss adds one ``jet`` of its own. ``align_args[i]`` are the arguments of
    ``align_loss_fns[i]`` (default: none); each, and ``ft_args``, may be a :class:`Chunked`.
    """
    if order < 1:
        raise QuarticError(f"order must be >= 1, got {order}")
    if theta_star.ndim != 1:
        raise QuarticError(f"theta_star must be flat [n], got shape {theta_star.shape}")
    fns = tuple(align_loss_fns)
    args = (
        tuple(a if isinstance(a, Chunked) else tuple(a) for a in align_args)
        if align_args is not None
        else ((),) * len(fns)
    )
    if len(args) != len(fns):
        raise QuarticError(
            f"align_args has {len(args)} entries for {len(fns)} alignment losses: give one tuple "
            "of arguments per loss"
        )
    for i, a in enumerate(args):
        if isinstance(a, Chunked):
            a.check(f"align_args[{i}]")
    if isinstance(ft_args, Chunked):
        ft_args.check("ft_args")
    else:
        ft_args = tuple(ft_args)
    fast = theta_star.shape[0] <= FAST_COMPILE_MAX_PARAMS
    coeffs, derivs = _taylor_fn(fns, ft_loss_fn, order, fast)(theta_star, args, ft_args)
    return [TaylorOnset(c, derivs) for c in coeffs]


#: The onset program is compiled with core.jit's fast-compile options up to this many parameters.
#: First call (compile + run), then each later run, XLA's defaults → fast options, order 6, the
#: scaling study's models on 2 CPU cores (benchmarks/onset_compile.py): 2k 34.0 → 15.3 s,
#: 0.34 → 0.64 s; 30k 55.6 → 28.5 s, 1.9 → 3.3 s; 100k 111.0 → 84.6 s, 4.8 → 8.8 s. At 100k six
#: later runs (the full scaling study makes 18 per size) give back the 26 s saved.
FAST_COMPILE_MAX_PARAMS = 50_000


@memo(maxsize=32)
def _taylor_fn(align_loss_fns, ft_loss_fn, order, fast_compile):
    # With Chunked arguments each jet is Σ_j w_j (the chunk's jet): the series are linear in the
    # loss. A plain tuple of arguments is the one-chunk case, traced as before.
    def run(theta_star, align_args, ft_args):
        neg_grad = lambda th, *a: -jax.grad(ft_loss_fn)(th, *a)
        like = jax.ShapeDtypeStruct(theta_star.shape, theta_star.dtype)
        derivs = [weighted_sum(lambda *a: neg_grad(theta_star, *a), ft_args, like)]
        for _ in range(order - 1):
            top = lambda *a, d=tuple(derivs): jet.jet(
                lambda th: neg_grad(th, *a), (theta_star,), (list(d),)
            )[1][-1]
            derivs.append(weighted_sum(top, ft_args, like))
        fact = jnp.asarray([math.factorial(k) for k in range(1, order + 1)], theta_star.dtype)
        ulike = jax.ShapeDtypeStruct((order,), theta_star.dtype)
        coeffs = []
        for fn, a in zip(align_loss_fns, align_args, strict=True):
            useries = lambda *b, fn=fn: jnp.stack(
                jet.jet(lambda th: fn(th, *b), (theta_star,), (derivs,))[1]
            )
            coeffs.append(weighted_sum(useries, a, ulike) / fact)
        return coeffs, jnp.stack(derivs)

    return compile_bound_jit(run) if fast_compile else jax.jit(run)


# ----------------------------------------------------------------------------------------------
# --- Other optimisers (ours) ---
#
# Derivations: docs/optimisers.md. Each optimiser's first steps are expanded in powers of the
# learning rate η about θ*, on a quadratic L_FT (gradient g + Hδ), to the order where the alignment
# loss first sees the sensitive subspace.


#: The local log-log slope of ``E Δu = r t + c₄ t⁴`` where its two terms are equal, (1 + 4)/2:
#: the measured SGD crossover is where the slope of E Δu passes this value.
SGD_CROSSOVER_SLOPE = (1 + ORDER) / 2


def sgd_noise_rate(lr, trace_f_sigma) -> jax.Array:
    """*(ours)* ``E Δu ≈ r t + γ_F² t⁴/8`` under SGD with additive gradient noise of covariance Σ:
    ``r = ½ η tr(FΣ)``.

    The iterates' fluctuation ``e_k`` obeys ``e_{k+1} = (I − ηH) e_k − η ξ_k``, so
    ``Cov e_k = η² Σ_{j<k} (I − ηH)^j Σ (I − ηH)^j = η t Σ (1 + O(t λ_max(H)))`` with ``t = ηk``,
    and ``E ½ eᵀFe = ½ tr(F Cov e_k)``. docs/theory.md writes ``tr(FPΣP)``: that is the same number when
    F has no mass outside M (F = PFP); with a Fisher tail the full ``tr(FΣ)`` is the correct one.
    """
    return 0.5 * jnp.asarray(lr) * jnp.asarray(trace_f_sigma)


def sgd_expected_delta_u(t, lr, trace_f_sigma, gamma_fisher) -> jax.Array:
    """*(ours)* The two leading terms of ``E Δu(t)`` under noisy SGD with Pg = 0 and no tail:
    ``½ η t tr(FΣ) + γ_F² t⁴/8`` (their crossover is :func:`sgd_noise_crossover_time`)."""
    t = jnp.asarray(t)
    return sgd_noise_rate(lr, trace_f_sigma) * t + quartic_coefficient(gamma_fisher) * t**4


def sgd_noise_delta_u(fisher, ft_hessian, sigma, lr, steps) -> jax.Array:
    """*(ours, exact on quadratics)* The noise part ``½ tr(F Cov θ_k)`` of ``E Δu`` after ``k``
    SGD steps, ``θ_{k+1} = θ_k − η(∇L_FT(θ_k) + ξ_k)``, ``ξ_k ~ (0, Σ)`` independent.

    ``E Δu_k = Δu(E δ_k) + ½ tr(F Cov δ_k)`` exactly (Δu is quadratic), and ``E δ_k`` is the
    noise-free gradient-descent path. In H's eigenbasis (values μ, ``Σ̃ = UᵀΣU``)
    ``Coṽ_{ab} = η² Σ̃_{ab} Σ_{j<k} (ρ_a ρ_b)^j``, ``ρ = 1 − ημ``; the geometric sum is evaluated
    as ``expm1(k ℓ)/expm1(ℓ)``, ``ℓ = log1p(−ημ_a) + log1p(−ημ_b)``, accurate for ``ημ → 0``.

    Args:
      fisher: ``F [n, n]``. ft_hessian: ``H [n, n]``, with ``η λ_max(H) < 1``.
      sigma: ``Σ [n, n]``. lr: η. steps: ``k`` scalar or ``[K]``.

    Returns:
      ``[K]`` (or a scalar): ``½ tr(F Cov θ_k)``; ``½ η t tr(FΣ)`` to first order in t = ηk.
    """
    mu, u = jnp.linalg.eigh(ft_hessian)
    f_t = u.T @ fisher @ u
    s_t = u.T @ sigma @ u
    k = jnp.asarray(steps, mu.dtype)
    log_rho = jnp.log1p(-lr * mu)
    ell = log_rho[:, None] + log_rho[None, :]
    flat = ell == 0
    ell_safe = jnp.where(flat, -1.0, ell)
    shape = k.shape + ell.shape
    kk = jnp.broadcast_to(k[..., None, None], shape)
    geo = jnp.where(
        jnp.broadcast_to(flat, shape),
        kk,
        jnp.expm1(kk * jnp.broadcast_to(ell_safe, shape))
        / jnp.broadcast_to(jnp.expm1(ell_safe), shape),
    )
    cov_t = lr**2 * jnp.broadcast_to(s_t, shape) * geo
    return 0.5 * jnp.sum(cov_t * jnp.broadcast_to(f_t, shape), axis=(-2, -1))


def momentum_coefficients(num_steps: int, beta) -> tuple[jax.Array, jax.Array]:
    """*(ours)* Heavy-ball displacement ``δ_k = −η a_k g + η² b_k Hg + O(η³)`` for k = 0..K.

    optax's ``sgd(η, momentum=β)``: ``m_{k+1} = ∇L_FT(θ_k) + β m_k``, ``θ_{k+1} = θ_k − η m_{k+1}``,
    ``m_0 = 0``. At order η the momentum is ``(1 − β^{j+1})/(1 − β) g``, so
    ``a_k = Σ_{j<k} (1 − β^{j+1})/(1 − β)``; the η² part of the gradient, ``−η a_j Hg``, is
    accumulated the same way: ``b_k = Σ_{i<k} a_i (1 − β^{k−i})/(1 − β)``. By recursion (exact,
    no cancellation): ``m¹ ← 1 + β m¹``, ``a ← a + m¹``, ``m² ← β m² + a_old``, ``b ← b + m²``.
    β = 0 gives gradient descent, ``a_k = k``, ``b_k = k(k−1)/2``; for ``k ≫ 1/(1−β)``,
    ``a_k ≈ k/(1−β)`` and ``b_k ≈ k²/(2(1−β)²)`` (gradient descent with step η/(1−β)); for
    ``k ≪ 1/(1−β)``, ``a_k ≈ k(k+1)/2`` and ``b_k = O(k⁴)``.

    Returns:
      ``a [K+1]``, ``b [K+1]`` (index k = 0..K; ``num_steps = K`` must be static).
    """
    beta = jnp.asarray(beta, jnp.result_type(float))

    def step(carry, _):
        a, b, m1, m2 = carry
        m1 = 1.0 + beta * m1
        m2 = beta * m2 + a
        new = (a + m1, b + m2, m1, m2)
        return new, new[:2]

    zero = jnp.zeros_like(beta)
    _, (a, b) = jax.lax.scan(step, (zero, zero, zero, zero), None, length=num_steps)
    return jnp.concatenate([zero[None], a]), jnp.concatenate([zero[None], b])


def momentum_forecast(forecast: Forecast, steps, lr, beta) -> jax.Array:
    """*(ours)* The second-order forecast of Δu after ``k`` heavy-ball steps: the
    :class:`Forecast` at ``s = η a_k``, ``q = η² b_k`` (:func:`momentum_coefficients`).

    With Pg = 0 and no tail the leading term is ``½ η⁴ b_k² ‖F^{1/2}PHg‖²``; its relative error is
    ``O(η a_k λ_max(H))``, as for the flow. ``steps`` must be concrete (they size the recursion).
    """
    steps = np.asarray(steps)
    a, b = momentum_coefficients(int(steps.max()), beta)
    return forecast.evaluate(lr * a[steps], lr**2 * b[steps])


def ema_ages(num_steps: int, decay) -> jax.Array:
    """*(ours)* The bias-corrected EMA of the gradients' ages: ``ā_j = Σ_{i≤j} w_{ji} (i − 1)``,
    ``w_{ji} = (1 − b) b^{j−i} / (1 − b^j)``: Adam's weights at step j on the gradient taken at
    θ_{i−1}, i.e. ``(i − 1)`` steps after θ*.

    ``b = 0``: ``ā_j = j − 1``; ``j ≫ 1/(1 − b)``: ``ā_j ≈ j − 1 − b/(1 − b)``; ``j ≪ 1/(1 − b)``:
    ``ā_j ≈ (j − 1)/2``. Computed by the EMA recursion (no cancellation); ``0 ≤ b < 1``.

    Returns:
      ``[K+1]`` for j = 0..K (``ā_0 = 0``); ``num_steps = K`` static.
    """
    decay = jnp.asarray(decay, jnp.result_type(float))

    def step(m, j):
        m = decay * m + (1.0 - decay) * (j - 1.0)
        return m, m

    j = jnp.arange(1, num_steps + 1, dtype=decay.dtype)
    _, m = jax.lax.scan(step, jnp.zeros_like(decay), j)
    # 1 − b^j, also for b = 0 (log 0 = −inf, expm1(−inf) = −1)
    ages = m / -jnp.expm1(j * jnp.log(decay))
    return jnp.concatenate([jnp.zeros_like(decay)[None], ages])


def adam_coefficients(num_steps: int, b1, b2) -> tuple[jax.Array, jax.Array]:
    """*(ours)* ``A1_k = Σ_{j≤k} ā_j(b1)`` and ``A2_k = Σ_{j≤k} ā_j(b2)`` (:func:`ema_ages`), the
    η² coefficients of Adam's displacement (:func:`adam_displacement`). ``[K+1]`` each."""
    return jnp.cumsum(ema_ages(num_steps, b1)), jnp.cumsum(ema_ages(num_steps, b2))


def adam_directions(g: jax.Array, ft_hvp: Callable, eps) -> jax.Array:
    """*(ours)* The three directions of Adam's second-order displacement, ``[3, n]``:

    ``u = D⁻¹g`` (the first step's direction; sign(g) when ε ≪ |g|), ``v₁ = D⁻¹Hu`` (the change of
    the first moment) and ``v₂ = |g| D⁻² Hu`` (the change of the second moment), with
    ``D = diag(|g|) + ε``. ``ft_hvp(v) = Hv``.
    """
    d = jnp.abs(g) + eps
    u = g / d
    hu = ft_hvp(u)
    return jnp.stack([u, hu / d, jnp.abs(g) * hu / d**2])


def adam_step_coefficients(steps, lr, b1, b2) -> jax.Array:
    """``[K, 3]``: the coefficients ``(−ηk, η² A1_k, −η² A2_k)`` of ``(u, v₁, v₂)`` in δ_k."""
    steps = np.asarray(steps)
    a1, a2 = adam_coefficients(int(steps.max()), b1, b2)
    k = jnp.asarray(steps, a1.dtype)
    return jnp.stack([-lr * k, lr**2 * a1[steps], -(lr**2) * a2[steps]], axis=-1)


def adam_displacement(steps, lr, g: jax.Array, ft_hvp: Callable, b1, b2, eps) -> jax.Array:
    """*(ours)* Adam's displacement to second order in η after ``k`` steps of ``optax.adam``:

        δ_k = −η k u + η² (A1_k D⁻¹ − A2_k |g| D⁻²) H u + O(η³),   u = D⁻¹ g,  D = |g| + ε.

    At step j the first moment is the weighted mean of ``g + Hδ_{i−1} ≈ g − η(i−1)Hu``, i.e.
    ``m̂_j = g − η ā_j(b1) Hu``; the second ``v̂_j = g² − 2η ā_j(b2) g⊙Hu``, so
    ``√v̂_j ≈ |g| − η ā_j(b2) sign(g)⊙Hu`` and ``m̂_j/(√v̂_j + ε) ≈ u − η ā_j(b1) D⁻¹Hu
    + η ā_j(b2) |g| D⁻² Hu``. Summing the steps gives the formula. Valid while no gradient
    coordinate changes much (:func:`adam_gradient_drift` ≪ 1). With ``b1 = b2`` and ε ≪ |g| the η²
    term cancels (Adam then moves along sign(g) to this order).

    Args: ``steps`` concrete ints ``[K]``; ``g [n]``; ``ft_hvp(v) = Hv``. Returns ``[K, n]``.
    """
    steps = np.asarray(steps)
    c = adam_step_coefficients(steps, lr, b1, b2)
    return c @ adam_directions(g, ft_hvp, eps)


def adam_gradient_drift(steps, lr, g: jax.Array, ft_hvp: Callable, eps) -> jax.Array:
    """``ρ_k = η k max_i |(Hu)_i| / (|g_i| + ε)``: a bound on the relative change of any gradient
    coordinate after k steps. Adam's expansion (:func:`adam_displacement`) needs ``ρ_k ≪ 1``."""
    d = jnp.abs(g) + eps
    rate = jnp.max(jnp.abs(ft_hvp(g / d)) / d)
    return lr * jnp.asarray(np.asarray(steps), d.dtype) * rate


class AdamForecast(NamedTuple):
    """*(ours)* Scalars at θ* that give the second-order forecast of Δu under Adam.

    With ``δ_k = c₀ u + c₁ v₁ + c₂ v₂`` (:func:`adam_directions`, coefficients from
    :func:`adam_step_coefficients`):

        Δu ≈ ∇L_Aᵀδ_k + ½ δ_kᵀ H_A δ_k = Σ_i c_i lin_i + ½ Σ_ij c_i c_j gram_ij.

    Attributes: ``lin [3] = ∇L_Aᵀ v_i``; ``gram [3, 3] = v_iᵀ H_A v_j``.

    What replaces the AIC's quantities: orthogonality is ``‖F^{1/2}Pu‖`` (``gram[0, 0]`` is its
    square), not ``‖Pg‖`` — a diagonal preconditioner rotates g, so Pg = 0 does not give Pu = 0 and
    Δu grows like ``½ (ηk)² uᵀFu`` (slope 2 in k). Where Pu = 0, the coupling ``PHg`` is replaced by
    ``P (A1_k D⁻¹ − A2_k |g| D⁻²) H D⁻¹ g``, which for ε ≪ |g| is
    ``(A1_k − A2_k) P D⁻¹ H D⁻¹ g``: it vanishes when b1 = b2.
    """

    lin: jax.Array
    gram: jax.Array

    @classmethod
    def from_vectors(
        cls, grad_a: jax.Array, align_hvp: Callable, g: jax.Array, ft_hvp: Callable, eps
    ) -> AdamForecast:
        """From ``∇L_A``, a matvec of ``H_A``, ``g`` and a matvec of ``H`` (the FT Hessian)."""
        v = adam_directions(g, ft_hvp, eps)
        hv = jax.vmap(align_hvp)(v)  # one batched product of H_A, as matvec_pair
        return cls(v @ grad_a, v @ hv.T)

    def _quad(self, c):
        lin = jnp.sum(c * jnp.broadcast_to(self.lin, c.shape), axis=-1)
        return lin + 0.5 * jnp.einsum("...i,ij,...j->...", c, self.gram, c)

    def evaluate(self, steps, lr, b1, b2) -> jax.Array:
        """The forecast of Δu after ``steps`` (``[K]``, concrete) Adam steps."""
        return self._quad(adam_step_coefficients(steps, lr, b1, b2))

    def first_order(self, steps, lr) -> jax.Array:
        """Its η-leading part, ``−ηk ∇L_Aᵀu + ½ (ηk)² uᵀH_A u`` (the leak through D⁻¹)."""
        s = lr * jnp.asarray(np.asarray(steps), self.gram.dtype)
        return -s * self.lin[0] + 0.5 * s**2 * self.gram[0, 0]

    def coupling_term(self, steps, lr, b1, b2) -> jax.Array:
        """The η⁴ part that the coupling alone gives, ``½ ‖H_A^{1/2}(c₁v₁ + c₂v₂)‖²``: the
        leading term where Pu = 0 (Adam's analogue of ``γ_F² t⁴/8``)."""
        c = adam_step_coefficients(steps, lr, b1, b2)
        c = c * jnp.asarray([0.0, 1.0, 1.0], c.dtype)[None, :]
        return 0.5 * jnp.einsum("...i,ij,...j->...", c, self.gram, c)
