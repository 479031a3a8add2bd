"""Defences against alignment collapse, compared at equal fine-tuning progress.

Every defence is an update rule for full-batch fine-tuning from θ*, written as a pair of pure
functions ``init(losses, rank, lr) -> DefenceState`` and ``step(losses, state) -> DefenceState``
so that a whole run is one ``lax.scan`` (:func:`run_defence`), compiled once and ``vmap``-able over
problems. Each reports its cost (:class:`Cost`): Hessian-vector products (HVPs) of the alignment or
fine-tuning loss per step, gradients per step, and the HVPs spent once at θ*.

The rules (``g = ∇L_FT(θ_k)``, ``η`` the step size, ``P = B Bᵀ`` the projector on a basis B of
the sensitive subspace M, ``M(θ)`` the top-``rank`` eigenspace of the alignment curvature at θ):

- :class:`Plain`: ``θ ← θ − η g`` (plain fine-tuning, gradient descent).
- :class:`FixedProjection`: ``θ ← θ − η (I − P) g`` with B = M(θ*) fixed: the first-order defence
  that the paper criticises.
- :class:`PeriodicProjection`: the same with B recomputed (cold Lanczos) every ``every`` steps.
- :class:`Anchor`: ``θ ← θ − η (g + μ (θ − θ*))`` (L2 anchor to θ*).
- :class:`Replay`: ``θ ← θ − η (g + w ∇L_A)`` (alignment-data replay, no curvature).
- :class:`LowRank`: ``θ ← θ − η U Uᵀ g``, a LoRA-like restriction of every update to a fixed
  r-dimensional subspace U (random, or the task's Krylov space ``span{g, Hg, …, H^{r−1}g}``).
- :class:`Reparametrised`: gradient descent on φ with ``θ = θ(φ)``, ``θ(φ₀) = θ*`` — LoRA itself
  when θ(φ) adds low-rank products to the weight matrices (:func:`quartic.studies.collapse.lora_reparam`).
- :class:`TrackedProjection` *(ours, curvature-aware)*: B = M(θ_k) re-estimated at every step by
  Lanczos warm-started from the previous basis; ``θ ← θ − η (I − P) g``.
- :class:`Retraction` *(ours, curvature-aware)*: a projected step, then one Gauss–Newton step on
  L_A inside M, ``θ ← θ' − B Λ⁻¹ Bᵀ ∇L_A(θ')``, which undoes what the alignment map's curvature
  turned into M (``tracked=True``: with the tracked basis, else with M(θ*)).
- :class:`CouplingPenalty` *(ours, rejected: it leaks at first order, docs/defences.md §2)*:
  gradient descent on ``L_FT + (μ/2) ‖Λ^{1/2} Bᵀ H ∇L_FT‖²``, penalising the coupling γ itself.

The alignment curvature is the exact Hessian of ``align_loss_fn`` (as in :func:`quartic.check_aic`),
which equals the Gauss–Newton Fisher on the safe set ``{L_A = min}``; a different matvec can be
passed as ``Losses.align_hvp_fn``. Derivations, the cost accounting and the measured comparison:
``docs/defences.md``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quartic.core import curvature, fitting, measure
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.subspace import (
    Losses,
    cold_v0,
    default_num_iters,
    project_out,
    sensitive_subspace,
    top_subspace,
)

# the predicted leaks (docs/defences.md §2) are part of this module's API
from quartic.studies.defence_leaks import (  # noqa: F401
    fixed_leak_coefficient,
    plain_leak_coefficient,
    projected_ft_loss,
    tail_leak_coefficient,
    tracked_leak_coefficient,
)

Matvec = Callable[[jax.Array], jax.Array]


class DefenceState(NamedTuple):
    """State of a defended run. ``basis [n, d]`` and ``values [d]`` hold the current estimate of
    M and its eigenvalues (zeros where a defence needs none); ``lr`` is the step size η; ``aux``
    is defence-specific (the LoRA-like subspace U)."""

    theta: jax.Array
    basis: jax.Array
    values: jax.Array
    step: jax.Array
    lr: jax.Array
    aux: Any = ()


class Cost(NamedTuple):
    """Cost of a defence: ``hvps_per_step`` (amortised), ``grads_per_step`` (gradients of L_FT
    or L_A) and ``setup_hvps`` spent once at θ*."""

    hvps_per_step: float
    grads_per_step: float
    setup_hvps: int


# ----------------------------------------------------------------------------------------------
# The sensitive subspace


#: Eigenvalues below this fraction of the largest are not inverted by the Gauss–Newton step: a
#: direction that flat is not sensitive, and 1/λ would amplify noise (e.g. where J(θ) is singular).
GN_RTOL = 1e-6


def _gn_restore(losses: Losses, basis, values, theta):
    """One Gauss–Newton step on L_A restricted to span(B): ``−B Λ⁻¹ Bᵀ ∇L_A(θ)``."""
    ga = jax.grad(losses.align_loss_fn)(theta)
    floor = GN_RTOL * jnp.max(jnp.abs(values))
    inv = jnp.where(values > floor, 1.0 / jnp.where(values > floor, values, 1.0), 0.0)
    return -basis @ (inv * (basis.T @ ga))


# ----------------------------------------------------------------------------------------------
# Defences


@dataclasses.dataclass(frozen=True)
class Defence(abc.ABC):
    """Base class: a named update rule with its cost. Subclasses define ``cost`` and ``step``
    (and ``init`` when they keep more state than θ)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def curvature_aware(self) -> bool:
        return False

    @abc.abstractmethod
    def cost(self, n: int, rank: int) -> Cost:
        """HVPs and gradients per step, HVPs at set-up, for n parameters and rank d."""

    def init(self, losses: Losses, rank: int, lr: float, subspace=None) -> DefenceState:
        """The state at θ*. ``subspace = (basis [n, rank], values [rank])`` passes a precomputed
        estimate of M(θ*) (its set-up HVPs are still this defence's cost); ignored by defences
        that use none."""
        del subspace
        th = losses.theta_star
        z = jnp.zeros((th.shape[0], rank), th.dtype)
        zero = jnp.zeros((), jnp.int32)
        return DefenceState(th, z, jnp.zeros((rank,), th.dtype), zero, jnp.asarray(lr, th.dtype))

    @abc.abstractmethod
    def step(self, losses: Losses, state: DefenceState) -> DefenceState:
        """One fine-tuning step under the defence."""

    @staticmethod
    def _sgd(state: DefenceState, update: jax.Array, **kw) -> DefenceState:
        return state._replace(theta=state.theta - state.lr * update, step=state.step + 1, **kw)


@dataclasses.dataclass(frozen=True)
class Plain(Defence):
    """Plain fine-tuning: ``θ ← θ − η ∇L_FT(θ)``."""

    @property
    def name(self) -> str:
        return "plain"

    def cost(self, n, rank):
        return Cost(0.0, 1.0, 0)

    def step(self, losses, state):
        return self._sgd(state, jax.grad(losses.ft_loss_fn)(state.theta))


@dataclasses.dataclass(frozen=True)
class _WithSubspace(Defence):
    """A defence that estimates M(θ*) at set-up (cold Lanczos, ``num_iters`` HVPs)."""

    num_iters: int | None = None
    seed: int = 0

    def _iters(self, n, rank):
        return self.num_iters or default_num_iters(n, rank)

    def init(self, losses, rank, lr, subspace=None):
        state = super().init(losses, rank, lr)
        if subspace is None:
            subspace = sensitive_subspace(losses, rank, self.num_iters, self.seed)
        basis, values = subspace
        if basis.shape != state.basis.shape:
            raise QuarticError(
                f"subspace basis must be [n, rank]={state.basis.shape}, got {basis.shape}"
            )
        return state._replace(basis=basis, values=values)


@dataclasses.dataclass(frozen=True)
class FixedProjection(_WithSubspace):
    """``θ ← θ − η (I − P) ∇L_FT(θ)`` with P the projector on M(θ*) (first-order defence)."""

    @property
    def name(self) -> str:
        return "fixed_projection"

    def cost(self, n, rank):
        return Cost(0.0, 1.0, self._iters(n, rank))

    def step(self, losses, state):
        g = jax.grad(losses.ft_loss_fn)(state.theta)
        return self._sgd(state, project_out(state.basis, g))


@dataclasses.dataclass(frozen=True)
class PeriodicProjection(_WithSubspace):
    """The fixed projection with M recomputed at the current θ every ``every`` steps (cold
    Lanczos from the same start vector, ``num_iters`` HVPs each time)."""

    every: int = 50

    def __post_init__(self):
        if self.every < 1:
            raise QuarticError(f"every must be >= 1, got {self.every}")

    @property
    def name(self) -> str:
        return f"periodic_projection_k{self.every}"

    def cost(self, n, rank):
        m = self._iters(n, rank)
        return Cost(m / self.every, 1.0, m)

    def step(self, losses, state):
        th = state.theta
        rank, n = state.values.shape[0], th.shape[0]

        def refresh(_):
            return top_subspace(
                losses.align_matvec(th), cold_v0(th, self.seed), rank, self._iters(n, rank)
            )

        due = (state.step % self.every == 0) & (state.step > 0)
        basis, values = lax.cond(due, refresh, lambda _: (state.basis, state.values), None)
        g = jax.grad(losses.ft_loss_fn)(th)
        return self._sgd(state, project_out(basis, g), basis=basis, values=values)


@dataclasses.dataclass(frozen=True)
class Anchor(Defence):
    """L2 anchor: gradient descent on ``L_FT(θ) + (μ/2) ‖θ − θ*‖²``."""

    mu: float = 0.5

    @property
    def name(self) -> str:
        return f"anchor_mu{self.mu:g}"

    def cost(self, n, rank):
        return Cost(0.0, 1.0, 0)

    def step(self, losses, state):
        g = jax.grad(losses.ft_loss_fn)(state.theta)
        return self._sgd(state, g + self.mu * (state.theta - losses.theta_star))


@dataclasses.dataclass(frozen=True)
class Replay(Defence):
    """Alignment-data replay: gradient descent on ``L_FT + w L_A`` (the restoring force of the
    retraction without its curvature: no basis, no Λ⁻¹)."""

    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"replay_w{self.weight:g}"

    def cost(self, n, rank):
        return Cost(0.0, 2.0, 0)

    def step(self, losses, state):
        g = jax.grad(losses.ft_loss_fn)(state.theta)
        ga = jax.grad(losses.align_loss_fn)(state.theta)
        return self._sgd(state, g + self.weight * ga)


@dataclasses.dataclass(frozen=True)
class LowRank(Defence):
    """LoRA-like restriction: every update is ``−η U Uᵀ g`` for a fixed orthonormal ``U [n, r]``.

    ``basis="random"``: U spans a random r-dimensional subspace (seeded). ``basis="krylov"``: U
    spans ``{g, Hg, …, H^{r−1} g}`` at θ* (``r − 1`` HVPs of L_FT once): the task-aligned case, the
    subspace in which plain fine-tuning moves to order ``t^r``.
    """

    lora_rank: int = 4
    basis: str = "random"
    seed: int = 0

    def __post_init__(self):
        if self.basis not in ("random", "krylov"):
            raise QuarticError(f"LowRank basis must be 'random' or 'krylov', got {self.basis!r}")
        if self.lora_rank < 1:
            raise QuarticError(f"lora_rank must be >= 1, got {self.lora_rank}")

    @property
    def name(self) -> str:
        return f"lowrank_{self.basis}_r{self.lora_rank}"

    def cost(self, n, rank):
        return Cost(0.0, 1.0, self.lora_rank - 1 if self.basis == "krylov" else 0)

    def init(self, losses, rank, lr, subspace=None):
        th = losses.theta_star
        n, r = th.shape[0], self.lora_rank
        if r > n:
            raise QuarticError(f"lora_rank={r} exceeds the number of parameters n={n}")
        if self.basis == "random":
            raw = jax.random.normal(jax.random.PRNGKey(self.seed), (n, r), th.dtype)
        else:
            g = jax.grad(losses.ft_loss_fn)(th)
            hv = curvature.hvp_fn(losses.ft_loss_fn, th)

            def krylov(v, _):
                w = hv(v)
                return w / jnp.linalg.norm(w), v

            _, cols = lax.scan(krylov, g / jnp.linalg.norm(g), None, length=r)
            raw = cols.T
        u, _ = jnp.linalg.qr(raw)
        state = super().init(losses, rank, lr)
        return state._replace(aux=u)

    def step(self, losses, state):
        u = state.aux
        g = jax.grad(losses.ft_loss_fn)(state.theta)
        return self._sgd(state, u @ (u.T @ g))


@dataclasses.dataclass(frozen=True, eq=False)
class Reparametrised(Defence):
    """Fine-tuning through a reparametrisation ``θ = θ(φ)`` with ``θ(φ₀) = θ*``: gradient descent
    on φ, ``φ ← φ − η ∇_φ L_FT(θ(φ))``. With θ(φ) = θ* + (low-rank products AB added to the
    weight matrices) this is LoRA itself (:func:`quartic.studies.collapse.lora_reparam`), not the fixed
    subspace of :class:`LowRank`: the reachable set is curved and the effective subspace moves
    with A and B. Compared by identity (it holds an array); build it once per run.

    Attributes: ``theta_of`` (``φ -> θ [n]``), ``phi0`` (φ₀), ``label`` (the reported name).
    """

    theta_of: Callable[[jax.Array], jax.Array] = None
    phi0: Any = None
    label: str = "reparametrised"

    @property
    def name(self) -> str:
        return self.label

    def cost(self, n, rank):
        return Cost(0.0, 1.0, 0)

    def init(self, losses, rank, lr, subspace=None):
        if self.theta_of is None or self.phi0 is None:
            raise QuarticError("Reparametrised needs theta_of and phi0")
        state = super().init(losses, rank, lr)
        return state._replace(theta=self.theta_of(self.phi0), aux=self.phi0)

    def step(self, losses, state):
        phi = state.aux
        g_phi = jax.grad(lambda p: losses.ft_loss_fn(self.theta_of(p)))(phi)
        phi = phi - state.lr * g_phi
        return state._replace(theta=self.theta_of(phi), step=state.step + 1, aux=phi)


@dataclasses.dataclass(frozen=True)
class TrackedProjection(_WithSubspace):
    """*(ours)* Track M(θ_k) at every step by ``track_iters`` Lanczos steps warm-started from the
    previous basis (``v0 = B_{k−1} 1``), and project the update off it."""

    track_iters: int | None = None

    @property
    def name(self) -> str:
        return "tracked_projection"

    @property
    def curvature_aware(self) -> bool:
        return True

    def _track(self, rank):
        return self.track_iters or rank + 2

    def cost(self, n, rank):
        return Cost(float(self._track(rank)), 1.0, self._iters(n, rank))

    def _retrack(self, losses, state):
        rank = state.values.shape[0]
        v0 = state.basis @ jnp.ones((rank,), state.basis.dtype)
        return top_subspace(losses.align_matvec(state.theta), v0, rank, self._track(rank))

    def step(self, losses, state):
        basis, values = self._retrack(losses, state)
        g = jax.grad(losses.ft_loss_fn)(state.theta)
        return self._sgd(state, project_out(basis, g), basis=basis, values=values)


@dataclasses.dataclass(frozen=True)
class Retraction(TrackedProjection):
    """*(ours)* Project the step off M, then restore: one Gauss–Newton step on L_A inside M,
    ``θ ← θ' − B Λ⁻¹ Bᵀ ∇L_A(θ')``. With ``tracked=False`` B, Λ stay those of θ* (no HVP per
    step, one extra gradient of L_A); with ``tracked=True`` they are re-tracked every step."""

    tracked: bool = False

    @property
    def name(self) -> str:
        return "tracked_retraction" if self.tracked else "retraction"

    def cost(self, n, rank):
        per = float(self._track(rank)) if self.tracked else 0.0
        return Cost(per, 2.0, self._iters(n, rank))

    def step(self, losses, state):
        if self.tracked:
            basis, values = self._retrack(losses, state)
        else:
            basis, values = state.basis, state.values
        g = jax.grad(losses.ft_loss_fn)(state.theta)
        moved = state.theta - state.lr * project_out(basis, g)
        theta = moved + _gn_restore(losses, basis, values, moved)
        return state._replace(theta=theta, basis=basis, values=values, step=state.step + 1)


@dataclasses.dataclass(frozen=True)
class CouplingPenalty(_WithSubspace):
    """*(ours)* Gradient descent on ``L_FT + (μ/2) ‖Λ^{1/2} Bᵀ H(θ) ∇L_FT(θ)‖²`` (B, Λ of θ*):
    penalise the curvature coupling γ_F (AIC condition 3) along the run. Its gradient costs one
    HVP of L_FT and the reverse pass through it, counted as 3 HVPs."""

    mu: float = 1.0

    @property
    def name(self) -> str:
        return f"coupling_penalty_mu{self.mu:g}"

    @property
    def curvature_aware(self) -> bool:
        return True

    def cost(self, n, rank):
        return Cost(3.0, 1.0, self._iters(n, rank))

    def step(self, losses, state):
        b, lam = state.basis, state.values

        def penalised(th):
            g = jax.grad(losses.ft_loss_fn)(th)
            hg = curvature.hvp(losses.ft_loss_fn, th, g)
            return losses.ft_loss_fn(th) + 0.5 * self.mu * jnp.sum(
                measure.fisher_coords(lam, b, hg) ** 2
            )

        return self._sgd(state, jax.grad(penalised)(state.theta))


# ----------------------------------------------------------------------------------------------
# Runs


class DefenceRun(NamedTuple):
    """A recorded run: ``ft_loss[K+1]`` and ``delta_u[K+1]`` at steps 0…K (step 0 is θ*),
    ``observables`` name -> ``[K+1]`` (from ``observe``), ``finite[K+1]`` (False from the first
    non-finite state on; the state is then frozen, so no NaN reaches an eigensolver), ``theta``
    the final state."""

    ft_loss: jax.Array
    delta_u: jax.Array
    observables: dict
    finite: jax.Array
    theta: jax.Array

    def checked(self) -> DefenceRun:
        """``self`` if every step is finite, else a DivergenceError with the finite prefix."""
        finite = np.asarray(self.finite)
        if finite.all():
            return self
        k = int(np.argmin(finite))
        raise DivergenceError(
            f"the defended run became non-finite at step {k}: lower the learning rate "
            f"({k} finite steps kept)",
            partial={
                "ft_loss": np.asarray(self.ft_loss[:k]).tolist(),
                "delta_u": np.asarray(self.delta_u[:k]).tolist(),
            },
        )


def run_defence(
    defence: Defence,
    losses: Losses,
    rank: int,
    lr: float,
    num_steps: int,
    observe: Callable[[jax.Array], dict] | None = None,
    subspace: tuple[jax.Array, jax.Array] | None = None,
) -> DefenceRun:
    """Run ``defence`` for ``num_steps`` steps from θ*, recording L_FT and Δu at every step.

    Pure and jit-compatible (one ``lax.scan``); jit it at the call site, ``vmap`` it over a batch
    of problems. ``observe(θ) -> {name: scalar}`` adds observables (e.g. the subspace angle);
    ``subspace`` a precomputed M(θ*) (:func:`sensitive_subspace`) shared by several defences.
    """
    if num_steps < 1:
        raise QuarticError(f"num_steps must be >= 1, got {num_steps}")
    n = losses.theta_star.shape[-1]
    if not 1 <= rank < n:
        raise QuarticError(f"rank must satisfy 1 <= rank < n={n}, got {rank}")
    observe = observe or (lambda th: {})
    state = defence.init(losses, rank, lr, subspace)

    def record(th):
        return losses.ft_loss_fn(th), losses.delta_u(th), observe(th)

    def body(carry, _):
        state, ok = carry
        new = defence.step(losses, state)
        ok = ok & jnp.all(jnp.isfinite(new.theta)) & jnp.isfinite(losses.ft_loss_fn(new.theta))
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return (state, ok), (*record(state.theta), ok)

    (final, _), (ft, du, obs, finite) = lax.scan(
        body, (state, jnp.asarray(True)), None, length=num_steps
    )
    ft0, du0, obs0 = record(losses.theta_star)
    cat = lambda a, b: jnp.concatenate([jnp.asarray(a)[None], b])
    obs = {k: cat(obs0[k], v) for k, v in obs.items()}
    return DefenceRun(cat(ft0, ft), cat(du0, du), obs, cat(True, finite), final.theta)


def ft_minimum(ft_loss_fn: Callable, theta_star: jax.Array, num_newton: int = 50) -> jax.Array:
    """``min L_FT`` by damped Newton steps with the dense Hessian (small, convex problems)."""

    def newton(_, th):
        g = jax.grad(ft_loss_fn)(th)
        h = curvature.dense_hessian(ft_loss_fn, th)
        step = jnp.linalg.solve(h, g)

        # backtracking by halving, at most 20 times: keep the step only if the loss decreases
        def halve(carry):
            s, k = carry
            return 0.5 * s, k + 1

        def worse(carry):
            s, k = carry
            return (ft_loss_fn(th - s) > ft_loss_fn(th)) & (k < 20)

        step, _ = lax.while_loop(worse, halve, (step, 0))
        return th - step

    return ft_loss_fn(lax.fori_loop(0, num_newton, newton, theta_star))


class AtTarget(NamedTuple):
    """A run read at equal task loss. ``steps`` is fractional (linear interpolation in L_FT
    between the two steps that bracket the target); ``nan`` everywhere when not reached."""

    reached: bool
    steps: float
    delta_u: float
    ft_loss: float
    best_fraction: float  # the largest fraction of the initial excess loss removed in the run


def at_target(ft_loss, delta_u, target: float, ft_min: float) -> AtTarget:
    """Where a run's task loss first falls to ``target``, and Δu there.

    The target is stated as a loss value; :func:`target_loss` makes it from a fraction of the
    initial excess ``L_FT(θ*) − min L_FT``.
    """
    ft, du = np.asarray(ft_loss, float), np.asarray(delta_u, float)
    excess0 = ft[0] - ft_min
    best = float((ft[0] - np.nanmin(ft)) / excess0) if excess0 > 0 else 0.0
    hit = np.nonzero(ft <= target)[0]
    if hit.size == 0 or not np.all(np.isfinite(ft[: hit[0] + 1])):
        return AtTarget(False, math.nan, math.nan, math.nan, best)
    k = int(hit[0])
    if k == 0:
        return AtTarget(True, 0.0, float(du[0]), float(ft[0]), best)
    f = (ft[k - 1] - target) / (ft[k - 1] - ft[k])
    return AtTarget(
        True, k - 1 + f, float(du[k - 1] + f * (du[k] - du[k - 1])), float(target), best
    )


def target_loss(ft0: float, ft_min: float, fraction: float) -> float:
    """``L_FT(θ*) − fraction · (L_FT(θ*) − min L_FT)``: the loss after removing ``fraction`` of
    the initial excess."""
    if not 0 < fraction < 1:
        raise QuarticError(f"fraction of the excess loss must be in (0, 1), got {fraction}")
    return float(ft0 - fraction * (ft0 - ft_min))


def fitted_slope(delta_u, lr: float, stop_step: float, decades: float = 1.5):
    """Log-log slope of Δu(t), ``t = lr·k``, over ``k ∈ [stop/10^decades, stop]``.

    Returns an :class:`quartic.core.fitting.ExponentFit`, or ``None`` if fewer than 3 positive points.
    """
    du = np.asarray(delta_u, float)
    k = np.arange(du.shape[0], dtype=float)
    lo = max(1.0, stop_step / 10**decades)
    keep = (k >= lo) & (k <= stop_step) & (du > 0)
    if keep.sum() < 3:
        return None
    return fitting.fit_exponent(lr * k[keep], du[keep])
