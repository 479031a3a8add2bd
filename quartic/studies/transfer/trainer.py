"""Training for the transfer study: the three objectives and one loop that trains ``M`` models at
once, keeping each one's best checkpoint by validation loss.

* Objectives (:func:`fit` with ``objective=``): ``"lm"``, next-token cross-entropy (the
  decoder); ``"mlm"``, masked-token cross-entropy (the encoder); ``"clf"``, the classifier's
  cross-entropy. Bidirectional attention makes next-token prediction trivial (the next token is
  visible), so the encoder is pretrained BERT-style: each position but ``CLS`` is masked with
  probability ``mask_rate`` and predicted from the rest. The vocabulary has no ``MASK`` token, so
  a masked position holds ``PAD``: PAD keys are excluded from attention, so the masked token is
  invisible to every position and its own position still queries the others (exactly what
  ``[MASK]`` is for).
* :func:`fit` — minibatch Adam (gradient clipping 1.0) as one jitted ``lax.scan``, vmapped over
  ``M`` models (seeds, or seeds of several arms). Every ``eval_every`` steps the validation loss is
  computed *inside* the scan and the parameters with the lowest one are kept (best checkpoint by
  validation loss). Only the ``trainable`` leaves move: ``"full"`` (every weight), ``"lora"``
  (the adapters and the classifier head) or ``"head"``; the frozen weights are arguments, never
  closed over. One compiled program per (objective, model config, trainable set, fit config,
  shapes).
* :func:`predict` — class probabilities of ``M`` stacked classifiers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quartic.core.cache import memo
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.train import optax_promotion
from quartic.models.transformer import TransformerConfig
from quartic.studies.transfer.models import _model_fns
from quartic.tasks.synonyms import PAD

__all__ = ["OBJECTIVES", "FitConfig", "FitResult", "fit", "predict"]

#: Training objectives of :func:`fit`.
OBJECTIVES = ("lm", "mlm", "clf")


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-row cross-entropy: ``logits [..., C]``, integer ``labels [...]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _lm_loss(call, params, tokens):
    logits = call(params, tokens[:, :-1])
    target = tokens[:, 1:]
    w = (target != PAD).astype(logits.dtype)
    return jnp.sum(_ce(logits, target) * w) / jnp.maximum(jnp.sum(w), 1.0)


def _mlm_loss(call, params, tokens, key, mask_rate):
    pos = jnp.arange(tokens.shape[1])[None, :]
    draw = jax.random.uniform(key, tokens.shape, jnp.float32)
    masked = (draw < mask_rate) & (pos >= 1) & (tokens != PAD)
    logits = call(params, jnp.where(masked, PAD, tokens))
    w = masked.astype(logits.dtype)
    return jnp.sum(_ce(logits, tokens) * w) / jnp.maximum(jnp.sum(w), 1.0)


def _objective(objective: str, cfg: TransformerConfig, mask_rate: float):
    """``loss(params, batch, key) -> scalar`` of ``objective``."""
    call = _model_fns(cfg).call
    if objective == "lm":
        return lambda p, b, k: _lm_loss(call, p, b["tokens"])
    if objective == "mlm":
        return lambda p, b, k: _mlm_loss(call, p, b["tokens"], k, mask_rate)
    return lambda p, b, k: jnp.mean(_ce(call(p, b["tokens"]), b["labels"]))


def _check_objective(objective: str, cfg: TransformerConfig) -> None:
    if objective not in OBJECTIVES:
        raise QuarticError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
    if (objective == "clf") != (cfg.n_classes is not None):
        raise QuarticError(
            f"objective {objective!r} needs a {'classifier' if objective == 'clf' else 'LM'} "
            f"head; the model has n_classes={cfg.n_classes}"
        )
    if objective == "lm" and not cfg.causal:
        raise QuarticError("next-token pretraining needs causal attention; use 'mlm' for encoders")
    if objective == "mlm" and cfg.causal:
        raise QuarticError("masked-token pretraining is for the bidirectional encoder")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """One training stage.

    Attributes:
      n_steps: optimizer steps; a multiple of ``eval_every``.
      batch_size: rows per step, drawn uniformly with replacement.
      lr: Adam learning rate (after clipping the gradient's global norm to ``clip``).
      eval_every: steps between validation checks (the best check's parameters are returned).
      clip: gradient-norm clip.
      mask_rate: masked fraction for the ``"mlm"`` objective.
    """

    n_steps: int
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 50
    clip: float = 1.0
    mask_rate: float = 0.15

    def __post_init__(self):
        if self.n_steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise QuarticError(
                f"n_steps={self.n_steps}, batch_size={self.batch_size}, "
                f"eval_every={self.eval_every}: all must be >= 1"
            )
        if self.n_steps % self.eval_every:
            raise QuarticError(
                f"n_steps={self.n_steps} is not a multiple of eval_every={self.eval_every}"
            )
        if not self.lr > 0 or not self.clip > 0:
            raise QuarticError(f"lr={self.lr}, clip={self.clip}: both must be > 0")
        if not 0.0 < self.mask_rate < 1.0:
            raise QuarticError(f"mask_rate={self.mask_rate}: must lie in (0, 1)")


class FitResult(NamedTuple):
    """Per model (leading axis ``M``): the best parameters (full dicts, stacked), their validation
    loss and step, the mean training loss and validation loss of every eval block."""

    params: dict
    best_val_loss: np.ndarray  # [M]
    best_step: np.ndarray  # [M]
    train_curve: np.ndarray  # [M, n_steps / eval_every]
    val_curve: np.ndarray  # [M, n_steps / eval_every]


def _trainable_mask(names: tuple[str, ...], trainable: str) -> tuple[bool, ...]:
    if trainable == "full":
        return tuple(True for _ in names)
    if trainable == "head":
        return tuple(n.startswith("head/") for n in names)
    if trainable == "lora":
        mask = tuple(("lora_" in n) or n.startswith("head/") for n in names)
        if not any("lora_" in n for n in names):
            raise QuarticError("trainable='lora' needs a model with lora_rank > 0")
        return mask
    raise QuarticError(f"trainable must be 'full', 'lora' or 'head', got {trainable!r}")


def _features(features_fn, params: dict, tokens: jax.Array, rows: int) -> jax.Array:
    """``features_fn(params, tokens)`` over ``tokens [N, T]`` in chunks of ``rows`` rows (the last
    one filled with copies of the first rows and cut off), so memory holds one chunk's
    activations. Not ``lax.map(..., batch_size=rows)`` of a one-row function: that vmaps the body
    over rows of shape ``[1, T]``, which XLA rounds differently from the training step's
    ``[rows, T]`` batches (probed parameters 3e-7 to 2e-6 apart at 2k and 30k, compiling 0.3–0.6
    s longer; ``benchmarks/results/probe-features-laxmap-variant-cpu-2core.json`` says how it was
    measured)."""
    n = tokens.shape[0]
    chunks = -(-n // rows)
    padded = jnp.concatenate([tokens, tokens[: chunks * rows - n]]) if chunks * rows > n else tokens
    out = jax.lax.map(lambda t: features_fn(params, t), padded.reshape(chunks, rows, -1))
    return out.reshape(chunks * rows, -1)[:n]


@memo(maxsize=64)
def _fit_program(
    objective: str,
    cfg: TransformerConfig,
    trainable: str,
    fit_config: FitConfig,
    data_per_model: bool,
    cache_features: bool,
):
    fns = _model_fns(cfg)
    mask = _trainable_mask(fns.names, trainable)
    loss_fn = _objective(objective, cfg, fit_config.mask_rate)
    optimizer = optax.chain(optax.clip_by_global_norm(fit_config.clip), optax.adam(fit_config.lr))
    n_evals = fit_config.n_steps // fit_config.eval_every

    def full(train_leaves, frozen_leaves):
        it_t, it_f = iter(train_leaves), iter(frozen_leaves)
        return fns.treedef.unflatten([next(it_t) if m else next(it_f) for m in mask])

    if cache_features:
        # A linear probe: the body is frozen, so the head's input (the pooled features) is the
        # same at every step. Compute it once per row and train the head on it: the same steps
        # without a forward pass of the body each. The training rows go through the body in
        # chunks of a step's batch shape and the validation rows in one piece, the shapes the
        # body had before, so that XLA rounds them as it did (benchmarks/probe_features.py).
        def prepare(train_leaves, frozen_leaves, data, val):
            params = full(train_leaves, frozen_leaves)
            embed = lambda d, rows: {  # noqa: E731
                "features": _features(fns.features, params, d["tokens"], rows),
                "labels": d["labels"],
            }
            return embed(data, fit_config.batch_size), embed(val, val["tokens"].shape[0])

        def objective_loss(tl, frozen_leaves, batch, key):
            logits = fns.head(full(tl, frozen_leaves), batch["features"])
            return jnp.mean(_ce(logits, batch["labels"]))
    else:
        prepare = lambda train_leaves, frozen_leaves, data, val: (data, val)  # noqa: E731

        def objective_loss(tl, frozen_leaves, batch, key):
            return loss_fn(full(tl, frozen_leaves), batch, key)

    def one(train_leaves, frozen_leaves, data, val, key):
        data, val = prepare(train_leaves, frozen_leaves, data, val)

        def batch_of(k):
            n = data["labels" if "labels" in data else "tokens"].shape[0]
            idx = jax.random.randint(k, (fit_config.batch_size,), 0, n, dtype=jnp.int32)
            return {name: x[idx] for name, x in data.items()}

        def step(carry, k):
            tl, opt_state = carry
            k_batch, k_loss = jax.random.split(k)
            batch = batch_of(k_batch)
            loss, grads = jax.value_and_grad(
                lambda t: objective_loss(t, frozen_leaves, batch, k_loss)
            )(tl)
            with optax_promotion():
                updates, opt_state = optimizer.update(grads, opt_state, tl)
            return (optax.apply_updates(tl, updates), opt_state), loss

        val_key = jax.random.PRNGKey(0)  # fixed masks: validation losses are comparable

        def block(carry, k):
            tl, opt_state, best, best_val, best_step, i = carry
            (tl, opt_state), losses = jax.lax.scan(
                step, (tl, opt_state), jax.random.split(k, fit_config.eval_every)
            )
            v = objective_loss(tl, frozen_leaves, val, val_key)
            better = v < best_val
            best = jax.tree.map(lambda a, b: jnp.where(better, a, b), tl, best)
            best_val = jnp.where(better, v, best_val)
            i = i + 1
            best_step = jnp.where(better, i * fit_config.eval_every, best_step)
            return (tl, opt_state, best, best_val, best_step, i), (jnp.mean(losses), v)

        opt_state = optimizer.init(train_leaves)
        inf = jnp.asarray(jnp.inf, train_leaves[0].dtype)
        zero = jnp.zeros((), jnp.int32)
        carry = (train_leaves, opt_state, train_leaves, inf, zero, zero)
        carry, (train_curve, val_curve) = jax.lax.scan(block, carry, jax.random.split(key, n_evals))
        _, _, best, best_val, best_step, _ = carry
        return best, best_val, best_step, train_curve, val_curve

    data_axis = 0 if data_per_model else None
    return jax.jit(jax.vmap(one, in_axes=(0, 0, data_axis, None, 0))), mask


def fit(
    objective: str,
    cfg: TransformerConfig,
    params: dict,
    train_data: dict,
    val_data: dict,
    keys: jax.Array,
    fit_config: FitConfig,
    *,
    trainable: str = "full",
    data_per_model: bool = False,
    cache_features: bool = True,
    desc: str = "fit",
) -> FitResult:
    """Train ``M`` models (``params`` stacked ``[M, ...]``, ``keys [M, 2]``) on one objective.

    Args:
      objective: ``"lm"``, ``"mlm"`` (pretraining; ``cfg`` has an LM head) or ``"clf"``.
      train_data, val_data: ``{"tokens": int32[N, T]}`` (and ``"labels": int32[N]`` for
        ``"clf"``); with ``data_per_model`` the training data has a leading ``[M]`` axis (each
        model its own set, e.g. its own source task).
      trainable: ``"full"``, ``"lora"`` (adapters and head; needs ``cfg.lora_rank > 0``) or
        ``"head"`` (a linear probe of the frozen body).
      cache_features: for ``trainable="head"``, compute the frozen body's pooled features once
        per row and train the head on them (the same steps up to rounding, without a forward
        pass of the body per step); ``False`` runs the body at every step (the reference).

    Returns:
      A :class:`FitResult`; ``params`` are the checkpoint with the lowest validation loss.

    Raises:
      DivergenceError: a training or validation loss was not finite (``partial`` holds the curves).
    """
    _check_objective(objective, cfg)
    probe = cache_features and trainable == "head" and objective == "clf"
    program, mask = _fit_program(objective, cfg, trainable, fit_config, data_per_model, probe)
    fns = _model_fns(cfg)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(fns.names):
        raise QuarticError(f"{desc}: params do not match the model config (leaf count differs)")
    train_leaves = [x for x, m in zip(leaves, mask, strict=True) if m]
    frozen_leaves = [x for x, m in zip(leaves, mask, strict=True) if not m]
    train_data = {k: jnp.asarray(v) for k, v in train_data.items()}
    val_data = {k: jnp.asarray(v) for k, v in val_data.items()}
    best, best_val, best_step, train_curve, val_curve = program(
        train_leaves, frozen_leaves, train_data, val_data, keys
    )
    train_curve, val_curve = np.asarray(train_curve), np.asarray(val_curve)
    if not (np.isfinite(train_curve).all() and np.isfinite(val_curve).all()):
        raise DivergenceError(
            f"{desc}: a training or validation loss became non-finite; lower the learning rate",
            {"train_curve": train_curve.tolist(), "val_curve": val_curve.tolist()},
        )
    it_b, it_f = iter(best), iter(frozen_leaves)
    merged = [next(it_b) if m else next(it_f) for m in mask]
    return FitResult(
        params=fns.treedef.unflatten(merged),
        best_val_loss=np.asarray(best_val),
        best_step=np.asarray(best_step),
        train_curve=train_curve,
        val_curve=val_curve,
    )


@memo(maxsize=64)
def _predict_program(cfg: TransformerConfig):
    call = _model_fns(cfg).call
    return jax.jit(jax.vmap(lambda p, t: jax.nn.softmax(call(p, t), axis=-1), in_axes=(0, None)))


def predict(cfg: TransformerConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """Class probabilities ``[M, N, C]`` of ``M`` stacked classifiers on ``tokens [N, T]``."""
    if cfg.n_classes is None:
        raise QuarticError("predict needs a classifier (n_classes set)")
    return np.asarray(_predict_program(cfg)(params, jnp.asarray(tokens)))
