"""The aligned model θ* of the token world (pretrain -> align -> full-batch float64 polish), on
the generic loops of :mod:`quartic.core.train`.

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
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from quartic.core.errors import QuarticError
from quartic.core.train import minimize_full_batch, optax_promotion, train
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
    "checkpoint_key",
    "load_theta_star",
    "make_aligned_model",
    "make_evaluator",
    "save_theta_star",
]

#: The generic loop's promotion scope under its former private name (still imported from here).
_optax_promotion = optax_promotion

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
        loaded instead of training; ``use_cache=False`` neither reads nor writes one. Processes
        sharing the cache train each θ* once: while one trains it, the others wait on the
        checkpoint's lock (:func:`quartic.harness.checkpoint.lock`) and then load it.

    Returns:
      :class:`AlignedModel`; see ``report["before"]``, ``["after"]`` and ``["grad_ratio"]``.
    """
    align = align or AlignConfig()
    if (config.vocab_size, config.seq_len) != (world.vocab_size, world.config.seq_len):
        raise QuarticError(
            f"config has vocab_size={config.vocab_size}, seq_len={config.seq_len} but the world "
            f"has {world.vocab_size}, {world.config.seq_len}"
        )
    if config.n_classes is not None or not config.causal:
        raise QuarticError(
            "make_aligned_model needs a causal LM config (n_classes=None, causal=True)"
        )
    key = checkpoint_key(config, world.config, seed, align)
    path = Path(cache_dir or _default_cache_dir()) / key
    if not use_cache:
        return _train_aligned(config, world, seed, align, None, progress)
    # Processes that share the cache (parallel runs, the test suite's workers) train each θ* once:
    # the first holds the checkpoint's lock while it trains, the others wait and then read it.
    with checkpoint.lock(path):
        if checkpoint.exists(path):
            model, meta = load_theta_star(path)
            apply_fn, theta_star = functional(model, nnx.Param)
            report = {**meta["report"], "cached": True}
            return AlignedModel(model, apply_fn, theta_star, report, path)
        return _train_aligned(config, world, seed, align, path, progress)


def _train_aligned(
    config: TransformerConfig,
    world: tw.TokenWorld,
    seed: int,
    align: AlignConfig,
    path: Path | None,
    progress: bool,
) -> AlignedModel:
    """The three phases of :func:`make_aligned_model`; the checkpoint is saved to ``path``
    unless it is None."""
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
    if path is not None:
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
