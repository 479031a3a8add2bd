"""Fine-tuning trajectories from θ*: gradient flow, gradient descent, any optax optimizer.

Each run is one ``lax.scan`` over the record points (log-spaced times or steps), with an inner
``fori_loop`` over the integration or optimiser steps in between, so a run compiles once and a
batch of problems runs under ``jax.vmap``. The functions here are pure and jit-compatible; a
non-finite state freezes the run (no NaN propagation) and is flagged in ``Trajectory.finite``;
:meth:`Trajectory.checked` turns that into a :class:`~quartic.core.errors.DivergenceError` that keeps
everything recorded before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from quartic.core import measure
from quartic.core.errors import DivergenceError, QuarticError

Observer = Callable[[jax.Array], dict]


class Trajectory(NamedTuple):
    """Recorded run. ``times[T]`` (flow time, or ``lr·k`` for optimiser steps), ``steps[T]``
    (optimiser steps; equal to ``times`` for the flow), ``observables`` name -> ``[T]``,
    ``finite[T]`` (False from the first non-finite state on), ``theta`` the final state."""

    times: jax.Array
    steps: jax.Array
    observables: dict
    finite: jax.Array
    theta: jax.Array

    def checked(self) -> Trajectory:
        """``self`` if every record is finite, else a DivergenceError carrying the finite prefix."""
        finite = np.asarray(self.finite)
        if finite.all():
            return self
        k = int(np.argmin(finite))
        partial = {
            "times": np.asarray(self.times[:k]).tolist(),
            **{name: np.asarray(v[:k]).tolist() for name, v in self.observables.items()},
        }
        raise DivergenceError(
            f"the run diverged before record {k} (t = {float(self.times[k]):.4g}, step "
            f"{int(self.steps[k])}): the state became non-finite; lower the learning rate "
            f"(gradient descent is stable only for lr·λ_max(H) < 2). "
            f"{k} finite records kept.",
            partial=partial,
        )


def make_observer(
    align_loss_fn: Callable[[jax.Array], jax.Array],
    theta_star: jax.Array,
    basis: jax.Array | None = None,
    eigenvalues: jax.Array | None = None,
    curvature_fn: Callable[[jax.Array], jax.Array] | None = None,
    delta_u_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Observer:
    """The standard observables along a run.

    Args:
      align_loss_fn: flat L_A.
      theta_star: θ* [n].
      basis: ``B [n, d]`` of M(θ*); with it, ``proj_norm = ‖Pδ‖`` and ``overlap = ‖Pδ‖/‖δ‖``.
      eigenvalues: the top-d eigenvalues at θ*; with it, ``fisher_proj_norm = ‖F^{1/2}Pδ‖``.
      curvature_fn: ``theta -> [n, n]`` alignment curvature; with it (small n only) the largest
        principal angle ``angle`` between M(θ) and M(θ*) (``sin`` of it in ``sin_angle``).
      delta_u_fn: a cancellation-free ``Δu(θ)`` (default ``L_A(θ) − L_A(θ*)``).
    """
    u_star = align_loss_fn(theta_star)
    du = delta_u_fn or (lambda th: align_loss_fn(th) - u_star)

    def observe(theta):
        delta = theta - theta_star
        out = {"delta_u": du(theta), "delta_norm": jnp.linalg.norm(delta)}
        if basis is not None:
            coords = basis.T @ delta
            out["proj_norm"] = jnp.linalg.norm(coords)
            out["overlap"] = out["proj_norm"] / jnp.maximum(out["delta_norm"], 1e-300)
            if eigenvalues is not None:
                out["fisher_proj_norm"] = measure.fisher_weighted(eigenvalues, coords)
        if curvature_fn is not None and basis is not None:
            d = basis.shape[1]
            _, v = jnp.linalg.eigh(curvature_fn(theta))
            b_now = v[:, ::-1][:, :d]
            resid = b_now - basis @ (basis.T @ b_now)
            s = jnp.clip(jnp.linalg.norm(resid, 2), 0.0, 1.0)
            out["sin_angle"] = s
            out["angle"] = jnp.arcsin(s)
        return out

    return observe


def _finite_state(theta, obs):
    ok = jnp.all(jnp.isfinite(theta))
    for v in obs.values():
        ok = ok & jnp.all(jnp.isfinite(v))
    return ok


def _check_grid(name, grid):
    if isinstance(grid, jax.core.Tracer):
        return  # checked by the caller that made the grid concrete
    g = np.asarray(grid)
    if g.ndim != 1 or g.size == 0:
        raise QuarticError(f"{name} must be a non-empty 1-D array")
    if np.any(np.diff(g) <= 0) or g[0] <= 0:
        raise QuarticError(f"{name} must be positive and strictly increasing")


def gradient_flow(
    ft_loss_fn: Callable[[jax.Array], jax.Array],
    theta0: jax.Array,
    times: jax.Array,
    observe: Observer,
    substeps: int = 16,
) -> Trajectory:
    """Gradient flow ``θ̇ = −∇L_FT(θ)`` from ``theta0`` by classical RK4 (order 4, fixed steps).

    Between consecutive record times the interval is split into ``substeps`` equal steps, so the
    step scales with t on a geometric grid and the relative error stays ``O((h λ_max)^4)``.
    """
    _check_grid("times", times)
    times = jnp.asarray(times, theta0.dtype)
    grad = jax.grad(ft_loss_fn)
    f = lambda th: -grad(th)

    def rk4(th, h):
        k1 = f(th)
        k2 = f(th + 0.5 * h * k1)
        k3 = f(th + 0.5 * h * k2)
        k4 = f(th + h * k3)
        return th + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)

    def segment(carry, t_next):
        th, t_prev, ok = carry
        h = (t_next - t_prev) / substeps
        new = lax.fori_loop(0, substeps, lambda _, x: rk4(x, h), th)
        obs = observe(new)
        ok = ok & _finite_state(new, obs)
        th = jnp.where(ok, new, th)
        return (th, t_next, ok), (obs, ok)

    init = (theta0, jnp.zeros((), theta0.dtype), jnp.asarray(True))
    (theta, _, _), (obs, finite) = lax.scan(segment, init, times)
    return Trajectory(times, times, obs, finite, theta)


def run_optimizer(
    ft_loss_fn: Callable[[jax.Array], jax.Array],
    theta0: jax.Array,
    optimizer: optax.GradientTransformation,
    record_steps: jax.Array,
    observe: Observer,
    lr: float = 1.0,
    grad_noise: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    key: jax.Array | None = None,
) -> Trajectory:
    """Run any optax optimizer on ``ft_loss_fn`` and record at ``record_steps`` (ints, ascending).

    ``times = lr · steps`` puts runs on the flow's time axis. ``grad_noise(key, theta) -> [n]``
    (optional) is added to every gradient (stochastic gradients with a known covariance).
    """
    _check_grid("record_steps", record_steps)
    steps = jnp.asarray(record_steps, jnp.int32)
    grad = jax.grad(ft_loss_fn)
    key = jax.random.PRNGKey(0) if key is None else key

    def one(i, carry):
        th, state = carry
        gr = grad(th)
        if grad_noise is not None:
            gr = gr + grad_noise(jax.random.fold_in(key, i), th)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
            upd, state = optimizer.update(gr, state, th)
        return optax.apply_updates(th, upd), state

    def segment(carry, k_next):
        th, state, k_prev, ok = carry
        new, new_state = lax.fori_loop(k_prev, k_next, one, (th, state))
        obs = observe(new)
        ok = ok & _finite_state(new, obs)
        th = jnp.where(ok, new, th)
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        return (th, state, k_next, ok), (obs, ok)

    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(theta0)
    init = (theta0, opt_state, jnp.zeros((), jnp.int32), jnp.asarray(True))
    (theta, _, _, _), (obs, finite) = lax.scan(segment, init, steps)
    times = lr * steps.astype(theta0.dtype)
    return Trajectory(times, steps, obs, finite, theta)


def gradient_descent(
    ft_loss_fn: Callable[[jax.Array], jax.Array],
    theta0: jax.Array,
    lr: float,
    record_steps: jax.Array,
    observe: Observer,
) -> Trajectory:
    """Full-batch gradient descent ``θ_{k+1} = θ_k − lr ∇L_FT(θ_k)`` (optax.sgd)."""
    return run_optimizer(ft_loss_fn, theta0, optax.sgd(lr), record_steps, observe, lr=lr)


def log_times(t_min: float, t_max: float, num: int) -> np.ndarray:
    """A geometric grid of record times (the law is read on log-log axes)."""
    if not 0 < t_min < t_max:
        raise QuarticError(f"need 0 < t_min < t_max, got {t_min}, {t_max}")
    return np.geomspace(t_min, t_max, num)


def log_steps(k_max: int, num: int) -> np.ndarray:
    """Distinct, roughly geometric integer record steps in ``[1, k_max]``."""
    return np.unique(np.round(np.geomspace(1, k_max, num)).astype(np.int64))
