"""Transfer learning and adversarial robustness in miniature (THEORY.md §5; Turbal et al.,
arXiv:2501.00066): pretrain, fine-tune directly or through a source task, attack, and the bridge to
the AIC of the first paper.

The pieces, all on the project's own :class:`~quartic.models.transformer.Transformer`:

* :func:`model_config` — one model size (a preset, ``"2k"`` … ``"1m"``, sized for the pooled
  2-way classifier) in one of two architectures (:data:`ARCHS`): ``"decoder"`` (causal attention,
  classifier pools the last non-PAD position) and ``"encoder"`` (bidirectional, mean pooling).
  The language-model variant has the same body and a ``[vocab]`` head.
* Pretraining objectives (:func:`fit` with ``objective=``): ``"lm"``, next-token cross-entropy
  (the decoder); ``"mlm"``, masked-token cross-entropy (the encoder). Bidirectional attention makes
  next-token prediction trivial (the next token is visible), so the encoder is pretrained BERT-style:
  each position but ``CLS`` is masked with probability ``mask_rate`` and predicted from the rest.
  The vocabulary has no ``MASK`` token, so a masked position holds ``PAD``: PAD keys are excluded
  from attention, so the masked token is invisible to every position and its own position still
  queries the others (exactly what ``[MASK]`` is for).
* :func:`carry_body` — a classifier that carries the pretrained body (every weight but the head);
  the 2-way head is fresh. :func:`merge_lora` folds LoRA adapters into the base kernels, so the
  attack and the evaluation see an adapted model as a plain one (one compiled attack per size).
* :func:`fit` — minibatch Adam (gradient clipping 1.0) as one jitted ``lax.scan``, vmapped over
  ``M`` models (seeds, or seeds of several arms). Every ``eval_every`` steps the validation loss is
  computed *inside* the scan and the parameters with the lowest one are kept (best checkpoint by
  validation loss). Only the ``trainable`` leaves move: ``"full"`` (every weight) or ``"lora"``
  (the adapters and the classifier head; the base weights are frozen arguments, never closed
  over). One compiled program per (objective, model config, trainable set, fit config, shapes).
* :func:`attack_models` — the batched A2T attack of :mod:`quartic.studies.attack`, vmapped over the
  ``M`` models; :func:`budget_is_unlimited` says when a finite budget cannot bind (then its result
  is the unlimited one, exactly).
* :func:`robustness_geometry` — the bridge (issue 5, item 7): at a parameter point θ₀ (the start of
  the target fine-tune) the robustness loss ``L_R`` (cross-entropy on synonym-rewritten target
  examples, :func:`synonym_rewrite`) plays the alignment loss of Def 5.1 and the target-train loss
  ``L_FT`` the fine-tuning loss. Measured with :mod:`quartic.core.curvature` (HVP + Lanczos): the top
  eigenvalues of ``∇²L_R`` (sharpness), the overlap ``‖P g‖ / ‖g‖`` of the fine-tuning gradient
  with their eigenspace, the coupling ``γ_F = ‖H_R^{1/2} P H_FT g‖`` and the first-order rate
  ``∇L_R · g`` (θ₀ is not a minimiser of ``L_R``, so the premise of the quartic law fails and the
  first-order term is reported beside the AIC quantities).

Parameters are the plain nested dicts of :func:`~quartic.models.transformer.functional`; a stack
of ``M`` models is the same dict with a leading ``[M]`` axis on every leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from quartic.core import curvature, theory
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.pytree import path_name
from quartic.harness import checkpoint
from quartic.models.transformer import (
    PRESETS,
    Transformer,
    TransformerConfig,
    count_params,
    functional,
)
from quartic.studies.attack import (
    AttackConfig,
    AttackResult,
    SynonymTable,
    attack_dataset,
    greedy_attack,
)
from quartic.studies.training import _optax_promotion
from quartic.tasks.synonyms import PAD, Language

__all__ = [
    "ARCHS",
    "OBJECTIVES",
    "FitConfig",
    "FitResult",
    "BowResult",
    "attack_models",
    "bow_logistic",
    "budget_is_unlimited",
    "carry_body",
    "init_params",
    "load_params",
    "merge_lora",
    "model_config",
    "predict",
    "robustness_geometry",
    "save_params",
    "stack",
    "synonym_rewrite",
    "unstack",
]

PyTree = Any

#: Architecture -> the TransformerConfig fields that make it.
ARCHS: dict[str, dict[str, Any]] = {
    "decoder": {"causal": True, "pooling": "last"},
    "encoder": {"causal": False, "pooling": "mean"},
}
#: Training objectives of :func:`fit`.
OBJECTIVES = ("lm", "mlm", "clf")


# --------------------------------------------------------------------------------------------------
# Models and parameters


def model_config(
    size: str,
    arch: str,
    *,
    vocab_size: int,
    seq_len: int,
    head: str = "classifier",
    lora_rank: int = 0,
) -> TransformerConfig:
    """The config of a ``size`` (a preset name) model of architecture ``arch``.

    The width is chosen by :meth:`TransformerConfig.preset` for the 2-way classifier without
    adapters, so the language model (``head="lm"``) and the LoRA variant share its body exactly.
    Raises ``QuarticError`` for an unknown size, architecture or head.
    """
    if size not in PRESETS:
        raise QuarticError(f"unknown model size {size!r}; choose from {list(PRESETS)}")
    if arch not in ARCHS:
        raise QuarticError(f"unknown architecture {arch!r}; choose from {list(ARCHS)}")
    if head not in ("classifier", "lm"):
        raise QuarticError(f"head must be 'classifier' or 'lm', got {head!r}")
    if lora_rank < 0:
        raise QuarticError(f"lora_rank={lora_rank}: must be >= 0")
    try:
        base = TransformerConfig.preset(
            size, vocab_size=vocab_size, seq_len=seq_len, n_classes=2, **ARCHS[arch]
        )
    except ValueError as e:
        raise QuarticError(f"model size {size!r} does not fit this language: {e}") from e
    n_classes = 2 if head == "classifier" else None
    return dataclasses.replace(base, n_classes=n_classes, lora_rank=lora_rank)


class _ModelFns(NamedTuple):
    call: Any  # (params, tokens[B, T]) -> logits
    embed: Any  # (params, tokens[B, T]) -> [B, T, D]
    from_embeddings: Any  # (params, emb[B, T, D], mask[B, T]) -> logits
    treedef: Any
    names: tuple[str, ...]


@functools.cache
def _model_fns(cfg: TransformerConfig) -> _ModelFns:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    call, params = functional(model)
    embed, _ = functional(model, method="embed")
    from_emb, _ = functional(model, method="from_embeddings")
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = tuple(path_name(p) for p, _ in paths)
    return _ModelFns(call, embed, from_emb, treedef, names)


def init_params(cfg: TransformerConfig, seed: int) -> dict:
    """Fresh parameters of ``Transformer(cfg)`` (a nested dict of numpy-backed arrays)."""
    return functional(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]


def carry_body(classifier: dict, pretrained: dict, skip: tuple[str, ...] = ("head",)) -> dict:
    """``classifier`` with every weight that ``pretrained`` also has (same path) replaced by the
    pretrained one, except the top-level ``skip`` entries (the head). Adapters, which the
    pretrained model lacks, keep their initial values. Raises ``QuarticError`` when a shared weight
    has another shape (the bodies differ)."""

    def merge(c, p, path):
        out = {}
        for k, v in c.items():
            here = f"{path}/{k}" if path else str(k)
            if (not path and k in skip) or k not in p:
                out[k] = v
            elif isinstance(v, dict):
                out[k] = merge(v, p[k], here)
            else:
                if np.shape(v) != np.shape(p[k]):
                    raise QuarticError(
                        f"cannot carry {here}: the classifier has shape {np.shape(v)}, the "
                        f"pretrained model {np.shape(p[k])}; the two bodies must match"
                    )
                out[k] = p[k]
        return out

    return merge(classifier, pretrained, "")


def merge_lora(params: dict) -> dict:
    """Fold every LoRA adapter into its kernel (``W + A B``) and drop the adapters: the result is
    the parameter dict of the same config with ``lora_rank=0`` and computes the same function."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params and "lora_b" in params:
        out = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b")}
        out["kernel"] = params["kernel"] + jnp.einsum(
            "...ir,...ro->...io", params["lora_a"], params["lora_b"]
        )
        return out
    return {k: merge_lora(v) for k, v in params.items()}


def stack(params_list: list[dict]) -> dict:
    """``M`` parameter dicts -> one dict with a leading ``[M]`` axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def unstack(stacked: dict) -> list[dict]:
    """Inverse of :func:`stack` (numpy leaves)."""
    leaves, treedef = jax.tree.flatten(stacked)
    m = leaves[0].shape[0]
    return [treedef.unflatten([np.asarray(x[i]) for x in leaves]) for i in range(m)]


def save_params(
    directory: str | os.PathLike, cfg: TransformerConfig, params: dict, info: dict | None = None
) -> pathlib.Path:
    """Write ``params`` of ``cfg`` (one model, or a stack of ``M`` with a leading ``[M]`` axis) and
    ``info`` (JSON-able) as a :mod:`quartic.harness.checkpoint` directory (orbax arrays + ``meta.json``,
    atomic: a directory with ``meta.json`` is complete)."""
    fns = _model_fns(cfg)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(fns.names):
        raise QuarticError(f"params do not match the model config {cfg} (leaf count differs)")
    template = jax.tree.leaves(_template(cfg))
    extra = {np.ndim(x) - np.ndim(t) for x, t in zip(leaves, template, strict=True)}
    if extra not in ({0}, {1}):
        raise QuarticError(f"params are neither one model of {cfg} nor a stack of them")
    stacked = int(np.shape(leaves[0])[0]) if extra == {1} else None
    meta = {"model_config": dataclasses.asdict(cfg), "stacked": stacked, "info": info or {}}
    return checkpoint.save(directory, params, meta)


def load_params(directory: str | os.PathLike, cfg: TransformerConfig) -> tuple[dict, dict]:
    """``(params, info)`` written by :func:`save_params` for ``cfg`` (a stack stays stacked).

    Raises a :class:`~quartic.core.errors.QuarticError` when the directory holds no checkpoint or one
    written for another model config."""
    if not checkpoint.exists(directory):
        raise QuarticError(f"no checkpoint at {directory}")
    meta = checkpoint.read_meta(directory)
    if meta.get("model_config") != dataclasses.asdict(cfg):
        raise QuarticError(f"{directory} was written for another model config")
    template = _template(cfg)
    if meta["stacked"] is not None:
        m = meta["stacked"]
        template = jax.tree.map(lambda x: np.broadcast_to(x, (m, *np.shape(x))), template)
    params, meta = checkpoint.load(directory, template)
    return params, meta["info"]


@functools.cache
def _template(cfg: TransformerConfig) -> dict:
    return jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), init_params(cfg, 0))


# --------------------------------------------------------------------------------------------------
# Objectives


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


# --------------------------------------------------------------------------------------------------
# Training: M models at once, best checkpoint by validation loss


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


@functools.cache
def _fit_program(
    objective: str,
    cfg: TransformerConfig,
    trainable: str,
    fit_config: FitConfig,
    data_per_model: bool,
):
    fns = _model_fns(cfg)
    mask = _trainable_mask(fns.names, trainable)
    loss_fn = _objective(objective, cfg, fit_config.mask_rate)
    optimizer = optax.chain(optax.clip_by_global_norm(fit_config.clip), optax.adam(fit_config.lr))
    n_evals = fit_config.n_steps // fit_config.eval_every

    def full(train_leaves, frozen_leaves):
        it_t, it_f = iter(train_leaves), iter(frozen_leaves)
        return fns.treedef.unflatten([next(it_t) if m else next(it_f) for m in mask])

    def one(train_leaves, frozen_leaves, data, val, key):
        def batch_of(k):
            n = data["tokens"].shape[0]
            idx = jax.random.randint(k, (fit_config.batch_size,), 0, n, dtype=jnp.int32)
            return {name: x[idx] for name, x in data.items()}

        def step(carry, k):
            tl, opt_state = carry
            k_batch, k_loss = jax.random.split(k)
            batch = batch_of(k_batch)
            loss, grads = jax.value_and_grad(
                lambda t: loss_fn(full(t, frozen_leaves), batch, k_loss)
            )(tl)
            with _optax_promotion():
                updates, opt_state = optimizer.update(grads, opt_state, tl)
            return (optax.apply_updates(tl, updates), opt_state), loss

        val_key = jax.random.PRNGKey(0)  # fixed masks: validation losses are comparable

        def block(carry, k):
            tl, opt_state, best, best_val, best_step, i = carry
            (tl, opt_state), losses = jax.lax.scan(
                step, (tl, opt_state), jax.random.split(k, fit_config.eval_every)
            )
            v = loss_fn(full(tl, frozen_leaves), val, val_key)
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

    Returns:
      A :class:`FitResult`; ``params`` are the checkpoint with the lowest validation loss.

    Raises:
      DivergenceError: a training or validation loss was not finite (``partial`` holds the curves).
    """
    _check_objective(objective, cfg)
    program, mask = _fit_program(objective, cfg, trainable, fit_config, data_per_model)
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


@functools.cache
def _predict_program(cfg: TransformerConfig):
    call = _model_fns(cfg).call
    return jax.jit(jax.vmap(lambda p, t: jax.nn.softmax(call(p, t), axis=-1), in_axes=(0, None)))


def predict(cfg: TransformerConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """Class probabilities ``[M, N, C]`` of ``M`` stacked classifiers on ``tokens [N, T]``."""
    if cfg.n_classes is None:
        raise QuarticError("predict needs a classifier (n_classes set)")
    return np.asarray(_predict_program(cfg)(params, jnp.asarray(tokens)))


class BowResult(NamedTuple):
    """A bag-of-words logistic regression fitted by :func:`bow_logistic`."""

    weights: np.ndarray  # [V] one weight per token id (PAD's is 0)
    bias: float
    l2: float  # the penalty chosen on the validation split
    val_accuracy: float
    test_accuracy: float
    grad_norm: float  # ‖∇(penalised loss)‖ at the returned weights (Newton converged: ~1e-12)


def _bow_features(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token counts ``[N, V]`` (PAD not counted) plus a constant 1 column: ``[N, V + 1]``."""
    tokens = np.asarray(tokens)
    x = np.zeros((tokens.shape[0], vocab_size + 1))
    np.add.at(x, (np.arange(tokens.shape[0])[:, None], tokens), 1.0)
    x[:, 0] = 0.0  # PAD (id 0) carries no word
    x[:, vocab_size] = 1.0
    return x


def _bow_newton(x, y, l2, max_iter=100, tol=1e-12):
    """Minimise ``mean(softplus(−s·xw)) + l2/2 ‖w‖²`` (bias unpenalised), ``s = 2y − 1``, by
    Newton's method (the loss is strictly convex: converges quadratically)."""
    n, p = x.shape
    reg = np.full(p, l2)
    reg[-1] = 0.0

    def prob_grad(w):
        prob = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # σ(xw) without overflow
        return prob, x.T @ (prob - y) / n + reg * w

    w = np.zeros(p)
    for _ in range(max_iter):
        prob, grad = prob_grad(w)
        # the tiny ridge keeps the solve defined for a feature that is always 0 (PAD) when l2 = 0
        hess = (x.T * (prob * (1 - prob))) @ x / n + np.diag(reg) + 1e-12 * np.eye(p)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < tol * max(1.0, np.max(np.abs(w))):
            break
    return w, float(np.linalg.norm(prob_grad(w)[1]))


def bow_logistic(
    train: dict, val: dict, test: dict, vocab_size: int, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)
) -> BowResult:
    """A linear baseline for a 2-way synonym task: logistic regression on token counts.

    Fitted exactly (Newton) on ``train`` for each penalty in ``l2_grid``; the penalty with the best
    ``val`` accuracy (the largest on ties) is kept, as the transformers keep their best-validation
    checkpoint. Each split is ``{"tokens": int[N, T], "labels": int[N]}`` with labels in {0, 1}.
    It tells how much of the task a model that only counts words can learn from the same rows.
    """
    splits = {"train": train, "val": val, "test": test}
    feats = {k: _bow_features(d["tokens"], vocab_size) for k, d in splits.items()}
    labels = {k: np.asarray(d["labels"]) for k, d in splits.items()}
    for k, y in labels.items():
        if not np.isin(y, (0, 1)).all():
            raise QuarticError(f"bow_logistic needs labels in {{0, 1}}; the {k} split has others")
    best = None
    for l2 in sorted(l2_grid):
        w, gnorm = _bow_newton(feats["train"], labels["train"].astype(float), l2)
        val_acc = float(np.mean((feats["val"] @ w > 0) == labels["val"]))
        if best is None or val_acc >= best[0]:
            best = (val_acc, l2, w, gnorm)
    val_acc, l2, w, gnorm = best
    return BowResult(
        weights=w[:vocab_size],
        bias=float(w[vocab_size]),
        l2=float(l2),
        val_accuracy=val_acc,
        test_accuracy=float(np.mean((feats["test"] @ w > 0) == labels["test"])),
        grad_norm=gnorm,
    )


# --------------------------------------------------------------------------------------------------
# The attack on M models at once


@functools.cache
def _attack_program(cfg: TransformerConfig, config: AttackConfig):
    fns = _model_fns(cfg)

    def logits_fn(params, emb, tokens):
        return fns.from_embeddings(params, emb, tokens != cfg.pad_id)

    def one(params, tokens, labels, table):
        return greedy_attack(
            params, tokens, labels, table, embed_fn=fns.embed, logits_fn=logits_fn, config=config
        )

    # Examples first (out_axes=1), so attack_dataset's chunking along axis 0 applies unchanged.
    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None), out_axes=1))


def attack_models(
    cfg: TransformerConfig,
    params: dict,
    batch: dict,
    table: SynonymTable,
    config: AttackConfig,
    batch_size: int = 256,
) -> list[AttackResult]:
    """Attack every example of ``batch`` against each of the ``M`` stacked classifiers
    ``params``; one :class:`~quartic.studies.attack.AttackResult` (numpy) per model."""
    if cfg.lora_rank:
        raise QuarticError("attack the merged model: merge_lora(params) with lora_rank=0")
    program = _attack_program(cfg, config)
    res = attack_dataset(program, params, batch, table, batch_size=batch_size)
    m = res.status.shape[1]
    return [AttackResult(*(np.asarray(f)[:, i] for f in res)) for i in range(m)]


def budget_is_unlimited(query_budget: int | None, seq_len: int, n_candidates: int) -> bool:
    """Whether a budget can never bind: an example visits each of its at most ``seq_len``
    positions once with at most ``n_candidates`` candidates, so a budget of ``seq_len *
    n_candidates`` or more gives exactly the unlimited attack."""
    return query_budget is None or query_budget >= seq_len * n_candidates


# --------------------------------------------------------------------------------------------------
# The bridge: AIC quantities of the robustness loss at the start of the target fine-tune


def synonym_rewrite(lang: Language, tokens: np.ndarray, seed: int) -> np.ndarray:
    """``tokens`` with every content token replaced by a uniformly random member of its own
    cluster (itself included); fillers, ``CLS`` and ``PAD`` unchanged. The concept sequence, and
    so the label of every bias task, is preserved: a model that reads concepts is unaffected."""
    tokens = np.asarray(tokens)
    rng = np.random.default_rng(seed)
    concept = lang.concept_of[tokens]
    content = concept >= 0
    c = np.where(content, concept, 0)
    offset = np.floor(rng.random(tokens.shape) * lang.cluster_size[c]).astype(np.int32)
    return np.where(content, lang.cluster_start[c] + offset, tokens).astype(tokens.dtype)


@functools.cache
def _geometry_program(cfg: TransformerConfig, rank: int, num_iters: int):
    call = _model_fns(cfg).call

    def one(params, robust, clean, ft, key):
        theta, unravel = ravel_pytree(params)
        n = theta.shape[0]

        def ce(th, b):
            return jnp.mean(_ce(call(unravel(th), b["tokens"]), b["labels"]))

        robust_fn = lambda th: ce(th, robust)
        ft_fn = lambda th: ce(th, ft)
        g_r = jax.grad(robust_fn)(theta)
        g = jax.grad(ft_fn)(theta)
        eig = curvature.lanczos_eigh(
            curvature.hvp_fn(robust_fn, theta),
            n,
            rank,
            0,
            num_iters=num_iters,
            key=key,
            dtype=theta.dtype,
        ).top
        hg = curvature.hvp_fn(ft_fn, theta)(g)
        coords_hg = eig.vectors.T @ hg
        g_norm = jnp.linalg.norm(g)
        gamma_f = jnp.linalg.norm(jnp.sqrt(jnp.clip(eig.values, 0.0)) * coords_hg)
        tiny = jnp.finfo(theta.dtype).tiny
        return {
            "robust_loss": robust_fn(theta),
            "clean_loss": ce(theta, clean),
            "ft_loss": ft_fn(theta),
            "eigenvalues": eig.values,
            "residuals": eig.residuals,
            "lambda_max": eig.values[0],
            "lambda_d": eig.values[-1],
            "overlap": jnp.linalg.norm(eig.vectors.T @ g) / jnp.maximum(g_norm, tiny),
            "gamma_fisher": gamma_f,
            "gamma_unweighted": jnp.linalg.norm(coords_hg),
            "quartic_coefficient": theory.quartic_coefficient(gamma_f),
            "robust_grad_norm": jnp.linalg.norm(g_r),
            "ft_grad_norm": g_norm,
            # d L_R / dt under gradient flow on L_FT is -∇L_R·g: the first-order leak c₁.
            "linear_rate": -jnp.vdot(g_r, g),
            "grad_cosine": jnp.vdot(g_r, g) / jnp.maximum(jnp.linalg.norm(g_r) * g_norm, tiny),
        }

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None)))


def robustness_geometry(
    cfg: TransformerConfig,
    params: dict,
    robust_batch: dict,
    clean_batch: dict,
    ft_batch: dict,
    *,
    rank: int = 4,
    num_iters: int = 24,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """AIC quantities of the robustness "skill" at ``M`` stacked classifiers (see the module
    docstring): ``L_R`` = cross-entropy on ``robust_batch`` (synonym-rewritten examples), ``L_FT`` =
    cross-entropy on ``ft_batch`` (the target training set); ``clean_batch`` holds the same
    examples as ``robust_batch`` before the rewrite. Every entry has a leading ``[M]`` axis."""
    n = count_params(cfg)
    if not 1 <= rank <= num_iters <= n:
        raise QuarticError(
            f"need 1 <= rank ({rank}) <= num_iters ({num_iters}) <= n ({n}) for Lanczos"
        )
    if cfg.lora_rank:
        raise QuarticError("measure the merged model: merge_lora(params) with lora_rank=0")
    program = _geometry_program(cfg, rank, num_iters)
    as_j = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    out = program(
        params, as_j(robust_batch), as_j(clean_batch), as_j(ft_batch), jax.random.PRNGKey(seed)
    )
    return {k: np.asarray(v) for k, v in out.items()}
