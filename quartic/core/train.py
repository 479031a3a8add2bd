"""Generic training loops on a pure ``loss_fn(params, batch)`` (any model, any data).

:func:`train` runs minibatch training with any optax optimizer: chunks of ``chunk_size`` steps are
one jitted ``lax.scan`` (compiled once per ``(loss_fn, optimizer, batch_size, chunk_size)`` and data
shape, and reused across calls), a tqdm bar shows the ETA, and a non-finite loss, gradient or update
stops the run with :class:`TrainingDivergedError`, which carries the parameters of the last finite
step. Parameters and optimizer state are *donated* to each chunk (``donate=True``): the device
holds one copy of the training state, not two (the caller's arrays are copied once first and stay
valid).

:func:`minimize_full_batch` is a full-batch L-BFGS (Armijo / approximate-Wolfe backtracking) on the
flat parameter vector, with jitted evaluations and a Python-driven line search.

:func:`optax_promotion`: the dtype-promotion scope optax's updates need under strict promotion.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from quartic.core.cache import memo
from quartic.core.errors import DivergenceError, QuarticError

__all__ = [
    "TrainResult",
    "TrainingDivergedError",
    "minimize_full_batch",
    "optax_promotion",
    "train",
]

PyTree = Any
LossFn = Callable[[PyTree, dict], jax.Array]


class TrainingDivergedError(DivergenceError):
    """A loss or gradient became non-finite during training.

    Attributes:
      params, opt_state: the state after the last finite step (nothing finite is lost).
      step: the number of finite steps done.
      losses: ``[step]`` the losses of those steps.
      partial: ``{"step": step, "losses": [...]}`` (JSON-able, as ``DivergenceError`` promises).
    """

    def __init__(self, message, params=None, opt_state=None, step=0, losses=None):
        losses = np.zeros(0) if losses is None else np.asarray(losses)
        super().__init__(message, {"step": int(step), "losses": losses.tolist()})
        self.params, self.opt_state, self.step, self.losses = params, opt_state, step, losses

    def __reduce__(self):
        return (type(self), (str(self), self.params, self.opt_state, self.step, self.losses))


@dataclasses.dataclass
class TrainResult:
    """Result of :func:`train` / :func:`minimize_full_batch`.

    ``losses[k]`` is the loss at step k (before its update); ``grad_norms`` (full batch only) the
    gradient norm at each iteration, ``monitor_norms`` the values of the monitor at its checks;
    ``run_s`` the total wall time (compilation included); ``converged``: a tolerance was met.
    """

    params: PyTree
    opt_state: Any
    losses: np.ndarray
    grad_norms: np.ndarray | None = None
    monitor_norms: np.ndarray | None = None
    run_s: float = 0.0
    converged: bool = False


def optax_promotion():
    """optax mixes Python floats with int32 step counts (``decay ** count``), which
    ``jax_numpy_dtype_promotion="strict"`` rejects; its updates are traced under standard
    promotion. The loss and model stay under whatever the caller configured."""
    return jax.numpy_dtype_promotion("standard")


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@memo(maxsize=64)
def _minibatch_chunk(loss_fn: LossFn, optimizer, batch_size, chunk_size: int, donate: bool):
    """The jitted ``chunk_size``-step scan; cached so repeated calls never recompile.

    With ``donate`` the input ``params`` and ``opt_state`` buffers are given to the program, which
    writes the new state into them (peak device memory: one training state instead of two).

    Steps ``i >= n_active`` are skipped (a partial last chunk). Each step reports whether its loss,
    gradient and new parameters are finite; the scan does not stop or mask on failure (selecting
    the carry with ``jnp.where`` tripled the compile time), :func:`train` replays instead.
    """
    value_and_grad = jax.value_and_grad(loss_fn)

    def run(params, opt_state, data, key, n_active):
        def step(carry, xs):
            k, i = xs

            def do(carry):
                params, opt_state = carry
                loss, grads = value_and_grad(params, _sample(k, data, batch_size))
                with optax_promotion():
                    updates, opt_state = optimizer.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
                finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
                return (params, opt_state), (loss, finite)

            def skip(carry):
                return carry, (jnp.zeros((), _loss_dtype(carry[0])), jnp.ones((), bool))

            return jax.lax.cond(i < n_active, do, skip, carry)

        keys = jax.random.split(key, chunk_size)
        (params, opt_state), (losses, finite) = jax.lax.scan(
            step, (params, opt_state), (keys, jnp.arange(chunk_size))
        )
        return params, opt_state, finite, losses

    return jax.jit(run, donate_argnums=(0, 1) if donate else ())


def _sample(key, data, batch_size):
    """Rows drawn uniformly with replacement; ``batch_size`` is an int, ``None`` (everything) or a
    tuple of ``(name, int | None)`` sampling each named dataset ``data[name]`` on its own."""
    if batch_size is None:
        return data
    if isinstance(batch_size, int):
        n = jax.tree.leaves(data)[0].shape[0]
        idx = jax.random.randint(key, (batch_size,), 0, n)
        return jax.tree.map(lambda a: a[idx], data)
    keys = jax.random.split(key, len(batch_size))
    return {
        name: _sample(k, data[name], bs) for k, (name, bs) in zip(keys, batch_size, strict=True)
    }


def _loss_dtype(params):
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return leaves[0].dtype if leaves else jnp.float32


def train(
    loss_fn: LossFn,
    params: PyTree,
    data: dict,
    optimizer: optax.GradientTransformation,
    *,
    n_steps: int,
    key: jax.Array,
    batch_size: int | dict | None = 128,
    chunk_size: int = 100,
    opt_state: Any = None,
    progress: bool = True,
    desc: str = "train",
    donate: bool = True,
) -> TrainResult:
    """Minimise ``loss_fn(params, batch)`` for ``n_steps`` optimizer steps.

    Args:
      loss_fn: pure scalar loss of ``(params, batch)``; ``batch`` is ``data`` indexed by a batch of
        rows. Pass the same function object on every call to reuse the compiled step.
      data: a pytree of arrays with a common leading axis (the examples), or a dict of such
        datasets (then ``batch_size`` may be a dict giving each its own batch size).
      optimizer: any optax transformation that needs no extra update arguments.
      batch_size: rows per step, drawn uniformly with replacement; ``None``: full batch; a dict
        ``{name: rows | None}``: ``batch[name]`` drawn from ``data[name]``.
      chunk_size: steps per jitted ``lax.scan`` (one progress update and one finiteness check).
      opt_state: resume from this optimizer state (default ``optimizer.init(params)``).
      donate: donate the training state to each chunk, so the device holds it once. ``params``
        and ``opt_state`` passed in are copied first and stay usable; each chunk's start is kept
        on the host (a copy per ``chunk_size`` steps) so a divergence can still be replayed to its
        last finite step. ``False`` keeps the start on the device instead (no host copies; twice
        the device memory for the state).

    Raises:
      TrainingDivergedError: a non-finite loss, gradient or update; it carries the parameters and
        optimizer state of the last finite step and the losses so far.
    """
    if n_steps < 0 or chunk_size < 1:
        raise QuarticError(f"need n_steps >= 0 and chunk_size >= 1, got {n_steps}, {chunk_size}")
    if isinstance(batch_size, dict):
        missing = set(batch_size) - set(data)
        if missing:
            raise QuarticError(f"batch_size names datasets {sorted(missing)} that data lacks")
        batch_size = tuple(sorted(batch_size.items()))
    data = jax.tree.map(jnp.asarray, data)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    run = _minibatch_chunk(loss_fn, optimizer, batch_size, chunk_size, donate)
    if donate:  # the caller's arrays must survive the donation of the first chunk's inputs
        params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))
    losses: list[np.ndarray] = []
    done = 0
    t0 = time.perf_counter()
    with tqdm(total=n_steps, desc=desc, disable=not progress, leave=False) as bar:
        while done < n_steps:
            n_active = min(chunk_size, n_steps - done)
            key, sub = jax.random.split(key)
            # the replay of a divergence starts here; donated buffers are gone after the call, so
            # their copy lives on the host
            start = jax.device_get((params, opt_state)) if donate else (params, opt_state)
            params, opt_state, oks, chunk_losses = run(params, opt_state, data, sub, n_active)
            chunk_losses, oks = np.asarray(chunk_losses)[:n_active], np.asarray(oks)[:n_active]
            if not oks.all():
                n_ok = int(np.argmin(oks))  # steps before the first non-finite one
                # Replay the chunk's finite steps (same keys, so the same steps) to recover them.
                params, opt_state, _, _ = run(*jax.device_put(start), data, sub, n_ok)
                losses.append(chunk_losses[:n_ok])
                step = done + n_ok
                raise TrainingDivergedError(
                    f"{desc}: the loss or gradient became non-finite at step {step} (last finite "
                    f"loss {_last(losses):.4g}); lower the learning rate or check the data. The "
                    "error's .params hold the last finite state.",
                    params=params,
                    opt_state=opt_state,
                    step=step,
                    losses=np.concatenate(losses),
                )
            losses.append(chunk_losses)
            done += n_active
            bar.update(n_active)
            bar.set_postfix(loss=f"{float(np.mean(chunk_losses)):.4g}")
    return TrainResult(
        params=params,
        opt_state=opt_state,
        losses=np.concatenate(losses) if losses else np.zeros(0),
        run_s=time.perf_counter() - t0,
    )


def _last(losses):
    flat = np.concatenate(losses) if losses else np.zeros(0)
    return float(flat[-1]) if flat.size else math.nan


@memo(maxsize=32)
def _flat_value_and_grad(loss_fn: LossFn, unravel: Callable):
    def vg(theta, data):
        return jax.value_and_grad(lambda th: loss_fn(unravel(th), data))(theta)

    return jax.jit(vg)


@functools.partial(jax.jit, static_argnames="memory_size")
def _lbfgs_direction(g, s_mem, y_mem, count, head, memory_size):
    """Two-loop recursion: ``d = -H g`` with the inverse-Hessian estimate of the stored pairs.

    ``s_mem, y_mem [m, n]`` is a ring buffer; the newest pair is at ``head - 1``; ``count`` pairs
    are valid. ``H_0 = (s^T y / y^T y) I`` from the newest pair (identity when there is none).
    """
    m = memory_size
    rho = 1.0 / jnp.maximum(jnp.einsum("kn,kn->k", s_mem, y_mem), jnp.finfo(g.dtype).tiny)

    def newest_first(i, carry):
        q, alpha = carry
        j = (head - 1 - i) % m
        a = jnp.where(i < count, rho[j] * jnp.vdot(s_mem[j], q), 0.0)
        return q - a * y_mem[j], alpha.at[j].set(a)

    q, alpha = jax.lax.fori_loop(0, m, newest_first, (g, jnp.zeros((m,), g.dtype)))
    last = (head - 1) % m
    yy = jnp.vdot(y_mem[last], y_mem[last])
    gamma = jnp.where(
        count > 0,
        jnp.vdot(s_mem[last], y_mem[last]) / jnp.maximum(yy, jnp.finfo(g.dtype).tiny),
        1.0,
    )
    r = gamma * q

    def oldest_first(i, r):
        j = (head - count + i) % m
        b = rho[j] * jnp.vdot(y_mem[j], r)
        return jnp.where(i < count, r + (alpha[j] - b) * s_mem[j], r)

    return -jax.lax.fori_loop(0, m, oldest_first, r)


def minimize_full_batch(
    loss_fn: LossFn,
    params: PyTree,
    data: dict,
    *,
    max_steps: int = 500,
    gtol: float = 0.0,
    monitor_fn: Callable[[PyTree], Any] | None = None,
    monitor_tol: float = 0.0,
    check_every: int = 5,
    memory_size: int = 20,
    progress: bool = True,
    desc: str = "lbfgs",
) -> TrainResult:
    """Full-batch L-BFGS with an Armijo backtracking line search on ``loss_fn(params, data)``.

    The iteration runs on the flat parameter vector; each loss/gradient evaluation and the
    two-loop recursion are jitted (compiled once), the line search is driven from Python.
    (optax.lbfgs keeps its line search inside a ``while_loop``; on CPU that cost ~1 s per iteration
    on a 6k-parameter transformer, against ~0.05 s here.)

    Stops after ``max_steps`` iterations, at an iterate with ``||grad loss_fn|| <= gtol``, when
    ``monitor_fn(params) <= monitor_tol`` (checked every ``check_every`` iterations and at the end;
    e.g. the gradient norm of one term of the objective), or when the line search finds no
    decrease (``converged=False``). ``losses[k]`` and ``grad_norms[k]`` are the objective and its
    gradient norm at iterate k; ``monitor_norms`` the monitored values at the checks.

    Raises:
      TrainingDivergedError: the loss or gradient is not finite at the starting point.
    """
    data = jax.tree.map(jnp.asarray, data)
    theta, unravel = ravel_pytree(params)
    vg = _flat_value_and_grad(loss_fn, unravel)
    unravel = jax.jit(unravel)  # eager, it compiles one slice per leaf
    monitor = monitor_fn
    n, m = theta.size, memory_size
    s_mem = jnp.zeros((m, n), theta.dtype)
    y_mem = jnp.zeros((m, n), theta.dtype)
    count = head = 0
    f, g = vg(theta, data)
    f_val, g_norm = float(f), float(jnp.linalg.norm(g))
    if not (math.isfinite(f_val) and math.isfinite(g_norm)):
        raise TrainingDivergedError(
            f"{desc}: the loss or gradient is not finite at the starting point ({f_val})",
            params=params,
        )
    losses, gnorms, monitored = [f_val], [g_norm], []
    converged = g_norm <= gtol
    t0 = time.perf_counter()
    with tqdm(total=max_steps, desc=desc, disable=not progress, leave=False) as bar:
        for it in range(max_steps):
            if converged:
                break
            if monitor is not None and it % check_every == 0:
                monitored.append(float(monitor(unravel(theta))))
                if monitored[-1] <= monitor_tol:
                    converged = True
                    break
            d = _lbfgs_direction(g, s_mem, y_mem, count, head, memory_size=m)
            slope = float(jnp.vdot(g, d))
            if not slope < 0:  # not a descent direction: forget the curvature pairs
                count = head = 0
                d, slope = -g, -(g_norm**2)
            alpha = 1.0 if count else min(1.0, 1.0 / g_norm)
            for _ in range(40):
                f_new, g_new = vg(theta + alpha * d, data)
                f_new_val = float(f_new)
                if _accept(f_val, f_new_val, slope, float(jnp.vdot(g_new, d)), alpha):
                    break
                alpha *= 0.5
            else:
                break  # no decrease along d: at the floor of the float precision
            s, y = alpha * d, g_new - g
            if float(jnp.vdot(s, y)) > 1e-12 * float(jnp.vdot(y, y)):  # keep H positive definite
                s_mem, y_mem = s_mem.at[head].set(s), y_mem.at[head].set(y)
                head, count = (head + 1) % m, min(count + 1, m)
            theta, f, g, f_val = theta + s, f_new, g_new, f_new_val
            g_norm = float(jnp.linalg.norm(g))
            losses.append(f_val)
            gnorms.append(g_norm)
            converged = g_norm <= gtol
            bar.update(1)
            bar.set_postfix(loss=f"{f_val:.4g}", grad=f"{g_norm:.3g}")
    params = unravel(theta)
    if monitor is not None and not converged:
        monitored.append(float(monitor(params)))
        converged = monitored[-1] <= monitor_tol
    return TrainResult(
        params=params,
        opt_state=None,
        losses=np.asarray(losses),
        grad_norms=np.asarray(gnorms),
        monitor_norms=np.asarray(monitored) if monitor_fn is not None else None,
        run_s=time.perf_counter() - t0,
        converged=bool(converged),
    )


def _accept(f, f_new, slope, slope_new, alpha) -> bool:
    """Armijo decrease, or (near the float floor, where a decrease is below the rounding of
    ``f``) the approximate Wolfe test of Hager and Zhang: ``f`` kept to rounding and the
    directional derivative shrunk."""
    if not (math.isfinite(f_new) and math.isfinite(slope_new)):
        return False
    if f_new <= f + 1e-4 * alpha * slope:
        return True
    return f_new <= f + 1e-12 * abs(f) and abs(slope_new) <= 0.9 * abs(slope)
