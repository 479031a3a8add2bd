"""Training loops and the aligned model theta* (pretrain -> align -> full-batch float64 polish).

:func:`train` runs minibatch training with any optax optimizer on a pure
``loss_fn(params, batch)``: chunks of ``chunk_size`` steps are one jitted ``lax.scan`` (compiled
once per ``(loss_fn, optimizer, batch_size, chunk_size)`` and data shape, and reused across calls),
a tqdm bar shows the ETA, and a non-finite loss, gradient or update stops the run with
:class:`TrainingDivergedError`, which carries the parameters of the last finite step. Parameters
and optimizer state are *donated* to each chunk (``donate=True``): the device holds one copy of
the training state, not two (the caller's arrays are copied once first and stay valid).

:func:`minimize_full_batch` is a full-batch L-BFGS (Armijo / approximate-Wolfe backtracking) on the
flat parameter vector, with jitted evaluations and a Python-driven line search.

:func:`make_aligned_model` builds theta* in three phases on a :class:`~quartic.tasks.TokenWorld`:

1. *pretrain* (Adam, ``fast_dtype``) on the pretraining mixture: benign tasks, general text and
   harmful prompts with complying answers. REFUSE never occurs, so the pretrained model complies.
2. *align* (Adam, ``fast_dtype``, continuing the same optimizer) on the alignment mixture: the
   same rows with every harmful answer replaced by REFUSE (weighted ``refusal_weight``), so the
   model learns to refuse while it keeps answering the benign prompts.
3. *polish* (full-batch L-BFGS in the model's ``param_dtype``) on
   ``L_A + anchor_weight * KL(p_aligned || p_theta)`` over ``polish_retain`` benign prompts per
   task, where ``p_aligned`` are the answers after phase 2. The anchor is 0 with 0 gradient where
   the polish starts; ``L_A`` saturates (its infimum 0 is approached as the REFUSE margin grows),
   so L-BFGS grows the margin until ``||grad L_A|| <= grad_rtol * ||grad L_A(pretrained)||`` while
   the anchor holds the benign answers in place. The gradient and the Fisher of ``L_A`` shrink
   together (both scale with ``1 - p(REFUSE)``): a smaller ``grad_rtol`` also flattens the skill's
   Fisher.

With ``config.lora_rank > 0`` only the base weights are trained (``wrt=BaseParam``); the adapters
keep their zero-initialised ``B``, so theta* is the same function with or without adapters.

Checkpoints (:func:`save_theta_star` / :func:`load_theta_star`, :mod:`quartic.harness.checkpoint`):
``<cache_dir>/<key>/params/`` is an orbax checkpoint of every ``nnx.Param`` of the model, one array
per ``/``-joined path (``blocks/0/attn/q_proj/kernel``), and ``<cache_dir>/<key>/meta.json`` holds
the model config, world config, seed, alignment config and the report. ``key`` (:func:`checkpoint_key`) hashes all four, so
a changed config never reuses a stale theta*.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from quartic.core.errors import DivergenceError, QuarticError
from quartic.harness import checkpoint
from quartic.models.transformer import (
    BaseParam,
    Transformer,
    TransformerConfig,
    count_params,
    functional,
    update_params,
)
from quartic.tasks import token_world as tw

__all__ = [
    "AlignConfig",
    "AlignedModel",
    "TrainResult",
    "TrainingDivergedError",
    "checkpoint_key",
    "load_theta_star",
    "make_aligned_model",
    "make_evaluator",
    "minimize_full_batch",
    "save_theta_star",
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


def _optax_promotion():
    """optax mixes Python floats with int32 step counts (``decay ** count``), which
    ``jax_numpy_dtype_promotion="strict"`` rejects; its updates are traced under standard
    promotion. The loss and model stay under whatever the caller configured."""
    return jax.numpy_dtype_promotion("standard")


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@functools.lru_cache(maxsize=64)
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
                with _optax_promotion():
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
        raise ValueError(f"need n_steps >= 0 and chunk_size >= 1, got {n_steps}, {chunk_size}")
    if isinstance(batch_size, dict):
        missing = set(batch_size) - set(data)
        if missing:
            raise ValueError(f"batch_size names datasets {sorted(missing)} that data lacks")
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


@functools.lru_cache(maxsize=32)
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


# ----- the aligned model theta* -----

# Part of every checkpoint key: bump it when the world's generator or the training recipe changes,
# so that no stale theta* is reused.
CHECKPOINT_FORMAT = 3  # 3: orbax arrays (quartic.harness.checkpoint)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """The three phases of :func:`make_aligned_model` (defaults: ~7k-parameter model, 2 CPU cores).

    Attributes:
      pretrain_steps, pretrain_lr: Adam (warm-up, cosine decay) on the pretraining mixture.
      align_steps, align_lr: Adam (cosine decay) on the alignment mixture, continuing the
        pretraining run's optimizer state.
      batch_size: rows per Adam step in both phases.
      refusal_weight: weight of each REFUSE target in the alignment mixture (a benign answer
        token weighs 1); 10 makes refusal about half of an average batch's loss.
      polish_steps: at most this many full-batch L-BFGS iterations.
      polish_retain: benign train rows per task whose answers the polish anchors.
      anchor_weight: weight of the KL anchor in the polish objective.
      grad_rtol: the polish stops once ``||grad L_A|| <= grad_rtol * ||grad L_A(pretrained)||``.
      fast_dtype: dtype of the two Adam phases (``None``: the model's ``param_dtype``); the polish
        and every reported number use the model's ``param_dtype``.
      chunk_size: optimizer steps per jitted scan.
    """

    pretrain_steps: int = 1500
    pretrain_lr: float = 1e-2
    align_steps: int = 400
    align_lr: float = 3e-3
    batch_size: int = 64
    refusal_weight: float = 10.0
    polish_steps: int = 300
    polish_retain: int = 32
    anchor_weight: float = 1.0
    grad_rtol: float = 5e-5
    fast_dtype: str | None = "float32"
    chunk_size: int = 250

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class AlignedModel:
    """theta* and how it was made.

    Attributes:
      model: the :class:`Transformer` holding theta* (adapters, if any, still at their zero init).
      apply_fn, theta_star: ``functional(model, nnx.Param)``: ``apply_fn(theta_star, tokens)``.
      report: JSON-able numbers: ``before`` (pretrained) and ``after`` (theta*) metrics from
        :func:`make_evaluator`, ``grad_ratio = ||grad L_A(theta*)|| / ||grad L_A(pretrained)||``,
        timings, the polish's iterations, ``n_params``, ``cached``.
      path: the checkpoint directory (``None`` when not saved).
    """

    model: Transformer
    apply_fn: Callable
    theta_star: dict
    report: dict
    path: Path | None = None


def _cast(tree, dtype):
    # On the host: eager ``astype`` would compile one conversion per parameter shape.
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(dtype)), tree)


def make_evaluator(apply_fn: Callable, world: tw.TokenWorld) -> Callable[[dict], dict]:
    """``evaluate(params) -> dict`` of alignment and retention metrics on ``world`` (JSON-able).

    Keys: ``align_loss`` = L_A (refusal cross-entropy over the train prompts of every category) and
    ``align_grad_norm`` = ||grad L_A|| over ``params``; ``harmfulness_train`` / ``_heldout``: share
    of harmful prompts whose greedy answer is not REFUSE; ``comply_accuracy_heldout``: answer-token
    accuracy of the complying answers on the held-out harmful prompts; ``benign_accuracy`` (per
    task), ``benign_accuracy_mean``, ``benign_exact_match_mean``: held-out benign answers
    (teacher-forced greedy). Two compiled functions, reused on every call;
    ``evaluate.align_grad_norm(params)`` is the first alone.
    """
    skill_train = jax.tree.map(jnp.asarray, world.skill(None, "train"))
    parts = [world.task(n, "heldout") for n in tw.BENIGN_TASKS]
    parts += [world.harmful(None, "heldout"), world.skill(None, "heldout"), world.skill(None)]
    sizes = np.cumsum([0] + [len(p["tokens"]) for p in parts])
    evalset = jax.tree.map(jnp.asarray, tw.concat(parts))

    # The data are arguments, not closed-over constants (XLA would fold them into the program).
    @jax.jit
    def align_stats(params, skill):
        value, grad = jax.value_and_grad(tw.refusal_loss, argnums=1)(apply_fn, params, skill)
        return value, jnp.linalg.norm(ravel_pytree(grad)[0])

    @jax.jit
    def row_stats(params, batch):
        logits = apply_fn(params, batch["tokens"])
        targets, m = batch["targets"], batch["mask"] > 0
        hit = jnp.argmax(logits, axis=-1).astype(targets.dtype) == targets
        pos = tw.first_answer_position(batch["mask"])
        greedy = jnp.take_along_axis(jnp.argmax(logits, axis=-1), pos[:, None], axis=1)[:, 0]
        return (
            jnp.sum(hit & m, axis=1),
            jnp.sum(m, axis=1),
            jnp.all(hit | ~m, axis=1),
            greedy != tw.REFUSE,
        )

    def evaluate(params: dict) -> dict:
        value, gnorm = align_stats(params, skill_train)
        n_hit, n_mask, exact, not_refused = (np.asarray(x) for x in row_stats(params, evalset))
        rows = [slice(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        k = len(tw.BENIGN_TASKS)
        benign = {
            name: float(n_hit[r].sum() / max(n_mask[r].sum(), 1))
            for name, r in zip(tw.BENIGN_TASKS, rows[:k], strict=True)
        }
        comply = rows[k]
        return {
            "align_loss": float(value),
            "align_grad_norm": float(gnorm),
            "harmfulness_train": float(not_refused[rows[k + 2]].mean()),
            "harmfulness_heldout": float(not_refused[rows[k + 1]].mean()),
            "comply_accuracy_heldout": float(n_hit[comply].sum() / max(n_mask[comply].sum(), 1)),
            "benign_accuracy": benign,
            "benign_accuracy_mean": float(np.mean(list(benign.values()))),
            "benign_exact_match_mean": float(np.mean([exact[r].mean() for r in rows[:k]])),
        }

    evaluate.align_grad_norm = lambda params: align_stats(params, skill_train)[1]
    return evaluate


def checkpoint_key(
    config: TransformerConfig, world_config: tw.WorldConfig, seed: int, align: AlignConfig
) -> str:
    """A short hash of everything theta* depends on."""
    text = json.dumps(
        {
            "format": CHECKPOINT_FORMAT,
            "model": config.to_dict(),
            "world": json.loads(world_config.to_json()),
            "seed": int(seed),
            "align": json.loads(align.to_json()),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_theta_star(directory: str | os.PathLike, model: Transformer, meta: dict) -> Path:
    """Write every ``nnx.Param`` of ``model`` and ``meta`` (which must hold ``"model_config"``) to
    ``directory`` (:mod:`quartic.harness.checkpoint`: orbax arrays + ``meta.json``). Returns it."""
    if "model_config" not in meta:
        raise QuarticError("meta must hold 'model_config' (the TransformerConfig as a dict)")
    _, params = functional(model, nnx.Param)
    return checkpoint.save(directory, params, meta)


def load_theta_star(directory: str | os.PathLike) -> tuple[Transformer, dict]:
    """Rebuild the model saved by :func:`save_theta_star`; returns ``(model, meta)``."""
    directory = Path(directory)
    if not checkpoint.exists(directory):
        raise QuarticError(f"no θ* checkpoint at {directory} (expected meta.json and params/)")
    meta = json.loads((directory / "meta.json").read_text())
    model = Transformer(TransformerConfig.from_dict(meta["model_config"]), rngs=nnx.Rngs(0))
    _, template = functional(model, nnx.Param)
    params, meta = checkpoint.load(directory, template)
    update_params(model, params, nnx.Param)
    return model, meta


def _default_cache_dir() -> Path:
    return Path(os.environ.get("QUARTIC_CACHE", "results/cache")) / "theta_star"


def make_aligned_model(
    config: TransformerConfig,
    world: tw.TokenWorld,
    seed: int = 0,
    align: AlignConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> AlignedModel:
    """Pretrain, align and polish a :class:`Transformer` on ``world``: theta* (module docstring).

    Args:
      config: the model; ``vocab_size`` and ``seq_len`` must match the world. Use
        ``param_dtype="float64"`` for a theta* whose gradient is small in float64 terms.
      world: the :class:`~quartic.tasks.TokenWorld`.
      seed: initialisation and minibatch seed.
      align: the phases' settings (default :class:`AlignConfig`).
      cache_dir: checkpoints live in ``cache_dir/<checkpoint_key>/`` (default
        ``$QUARTIC_CACHE/theta_star`` or ``results/cache/theta_star``). A matching checkpoint is
        loaded instead of training; ``use_cache=False`` neither reads nor writes one.

    Returns:
      :class:`AlignedModel`; see ``report["before"]``, ``["after"]`` and ``["grad_ratio"]``.
    """
    align = align or AlignConfig()
    if (config.vocab_size, config.seq_len) != (world.vocab_size, world.config.seq_len):
        raise ValueError(
            f"config has vocab_size={config.vocab_size}, seq_len={config.seq_len} but the world "
            f"has {world.vocab_size}, {world.config.seq_len}"
        )
    if config.n_classes is not None or not config.causal:
        raise ValueError(
            "make_aligned_model needs a causal LM config (n_classes=None, causal=True)"
        )
    key = checkpoint_key(config, world.config, seed, align)
    path = Path(cache_dir or _default_cache_dir()) / key
    if use_cache and checkpoint.exists(path):
        model, meta = load_theta_star(path)
        apply_fn, theta_star = functional(model, nnx.Param)
        return AlignedModel(model, apply_fn, theta_star, {**meta["report"], "cached": True}, path)

    t_start = time.perf_counter()
    model = Transformer(config, rngs=nnx.Rngs(seed))
    apply_fn, params = functional(model, BaseParam)
    # The Adam phases run on a copy whose every parameter (adapters too) has the fast dtype.
    fast = jnp.dtype(align.fast_dtype or config.param_dtype)
    fast_model = nnx.clone(model)
    update_params(fast_model, _cast(functional(model, nnx.Param)[1], fast), nnx.Param)
    fast_apply_fn, _ = functional(fast_model, BaseParam)
    rng = jax.random.key(seed)
    k_pre, k_align = jax.random.split(rng)
    timings = {}

    # 1. pretraining: the model learns the tasks and complies with harmful prompts.
    # 2. alignment: the same data with REFUSE for every harmful answer. Both phases share one
    # loss, optimizer (one schedule over both) and data shape, so one compiled chunk serves both.
    lm_objective = lambda p, b: tw.lm_loss(fast_apply_fn, p, b)
    schedule = optax.join_schedules(
        [
            optax.warmup_cosine_decay_schedule(
                0.0,
                align.pretrain_lr,
                min(100, align.pretrain_steps // 10 + 1),
                align.pretrain_steps,
                align.pretrain_lr / 20,
            ),
            optax.cosine_decay_schedule(align.align_lr, align.align_steps, 0.05),
        ],
        [align.pretrain_steps],
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    t0 = time.perf_counter()
    pre = train(
        lm_objective,
        _cast(params, fast),
        world.pretraining_mixture(),
        optimizer,
        n_steps=align.pretrain_steps,
        key=k_pre,
        batch_size=align.batch_size,
        chunk_size=align.chunk_size,
        progress=progress,
        desc="pretrain",
    )
    params = _cast(pre.params, config.dtype)
    timings["pretrain_s"] = time.perf_counter() - t0
    evaluate = make_evaluator(apply_fn, world)
    before = evaluate(params)

    t0 = time.perf_counter()
    ali = train(
        lm_objective,
        pre.params,
        world.alignment_mixture(align.refusal_weight),
        optimizer,
        n_steps=align.align_steps,
        key=k_align,
        batch_size=align.batch_size,
        chunk_size=align.chunk_size,
        opt_state=pre.opt_state,
        progress=progress,
        desc="align",
    )
    params = _cast(ali.params, config.dtype)
    timings["align_s"] = time.perf_counter() - t0

    # 3. polish: full-batch L-BFGS in the model's dtype on L_A + KL to the aligned model's own
    # benign answers. The KL term is 0 with 0 gradient where the polish starts, so it only resists
    # changes of the benign answers while L-BFGS grows the REFUSE margin until grad L_A is tiny.
    t0 = time.perf_counter()
    retain = tw.concat(
        [jax.tree.map(lambda a: a[: align.polish_retain], world.task(n)) for n in tw.BENIGN_TASKS]
    )
    polish_data = {
        "skill": world.skill(None, "train"),
        "retain": retain,
        "ref_logits": jax.jit(apply_fn)(params, jnp.asarray(retain["tokens"])),
    }

    def polish_objective(p, d):
        skill, retain = tw.joint_logits(apply_fn, p, d["skill"], d["retain"])
        kl = tw.kl_from_logits(retain, d["ref_logits"], d["retain"])
        return tw.refusal_loss_from_logits(skill, d["skill"]) + align.anchor_weight * kl

    pol = minimize_full_batch(
        polish_objective,
        params,
        polish_data,
        max_steps=align.polish_steps,
        monitor_fn=evaluate.align_grad_norm,  # ||grad L_A||, the same compiled function
        monitor_tol=align.grad_rtol * before["align_grad_norm"],
        progress=progress,
        desc="polish",
    )
    params = pol.params
    timings["polish_s"] = time.perf_counter() - t0

    update_params(model, params, BaseParam)
    after = evaluate(params)
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "n_params": count_params(config),
        "n_trained_params": int(ravel_pytree(params)[0].size),
        "before": before,
        "after": after,
        "grad_ratio": after["align_grad_norm"] / before["align_grad_norm"],
        "pretrain_final_loss": float(np.mean(pre.losses[-50:])),
        "align_final_loss": float(np.mean(ali.losses[-50:])),
        "polish_iterations": int(pol.losses.size - 1),
        "polish_converged": bool(pol.converged),
        "polish_objective": [float(pol.losses[0]), float(pol.losses[-1])]
        if pol.losses.size
        else [],
        "timings": timings,
        "cached": False,
    }
    saved = None
    if use_cache:
        meta = {
            "model_config": config.to_dict(),
            "world_config": json.loads(world.config.to_json()),
            "seed": int(seed),
            "align_config": json.loads(align.to_json()),
            "checkpoint_format": CHECKPOINT_FORMAT,
            "report": report,
        }
        saved = save_theta_star(path, model, meta)
    apply_all, theta_star = functional(model, nnx.Param)
    return AlignedModel(model, apply_all, theta_star, report, saved)
