"""Linear baselines for the transfer study's tasks: logistic regression fitted exactly (Newton)
with its L2 penalty chosen on the validation split.

- :func:`bow_logistic` on word counts (or on counts of token groups, e.g. one column per synonym
  cluster): how much of a task a model that only counts words can learn from the same rows;
- :func:`feature_logistic` on any fixed features, e.g. a frozen transformer's pooled states at
  one depth (``Transformer.layer_features``): a linear probe of what those features hold."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from quartic.core.errors import QuarticError

__all__ = ["BowResult", "bow_logistic", "feature_logistic"]


class BowResult(NamedTuple):
    """A logistic regression fitted by :func:`bow_logistic` or :func:`feature_logistic`."""

    weights: np.ndarray  # one per feature column (bow: per token id or group; PAD's is 0)
    bias: float
    l2: float  # the penalty chosen on the validation split
    val_accuracy: float
    test_accuracy: float
    grad_norm: float  # ‖∇(penalised loss)‖ at the returned weights (Newton converged: ~1e-12)


def _bow_features(tokens: np.ndarray, vocab_size: int, groups=None) -> np.ndarray:
    """Token counts ``[N, V]`` (PAD not counted) plus a constant 1 column: ``[N, V + 1]``. With
    ``groups`` (int ``[V]``: each token id's column, −1 for none), counts per group instead:
    ``[N, max(groups) + 2]``."""
    tokens = np.asarray(tokens)
    if groups is None:
        groups = np.arange(vocab_size)
        groups[0] = -1  # PAD (id 0) carries no word
    cols = np.asarray(groups)[tokens]
    n_cols = int(np.max(groups)) + 1
    x = np.zeros((tokens.shape[0], n_cols + 1))
    rows = np.broadcast_to(np.arange(tokens.shape[0])[:, None], tokens.shape)
    keep = cols >= 0
    np.add.at(x, (rows[keep], cols[keep]), 1.0)
    x[:, n_cols] = 1.0
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


def _check_labels(labels: dict, who: str) -> dict:
    out = {}
    for k, y in labels.items():
        y = np.asarray(y)
        if not np.isin(y, (0, 1)).all():
            raise QuarticError(f"{who} needs labels in {{0, 1}}; the {k} split has others")
        out[k] = y
    return out


def _select(feats: dict, labels: dict, l2_grid) -> BowResult:
    """Fit on ``feats["train"]`` (last column the constant) for each penalty; keep the best on
    ``val`` (the largest on ties); score on ``test``."""
    best = None
    for l2 in sorted(l2_grid):
        w, gnorm = _bow_newton(feats["train"], labels["train"].astype(float), l2)
        val_acc = float(np.mean((feats["val"] @ w > 0) == labels["val"]))
        if best is None or val_acc >= best[0]:
            best = (val_acc, l2, w, gnorm)
    val_acc, l2, w, gnorm = best
    return BowResult(
        weights=w[:-1],
        bias=float(w[-1]),
        l2=float(l2),
        val_accuracy=val_acc,
        test_accuracy=float(np.mean((feats["test"] @ w > 0) == labels["test"])),
        grad_norm=gnorm,
    )


def bow_logistic(
    train: dict,
    val: dict,
    test: dict,
    vocab_size: int,
    l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    groups=None,
) -> BowResult:
    """A linear baseline for a 2-way synonym task: logistic regression on token counts.

    Fitted exactly (Newton) on ``train`` for each penalty in ``l2_grid``; the penalty with the best
    ``val`` accuracy (the largest on ties) is kept, as the transformers keep their best-validation
    checkpoint. Each split is ``{"tokens": int[N, T], "labels": int[N]}`` with labels in {0, 1}.
    It tells how much of the task a model that only counts words can learn from the same rows.
    ``groups`` (int ``[vocab_size]``, −1 for tokens not counted) counts groups of tokens in one
    column each (e.g. a synonym cluster: what a model that knows the clusters could learn).
    """
    if groups is not None and np.shape(groups) != (vocab_size,):
        raise QuarticError(f"groups must be int[{vocab_size}], got shape {np.shape(groups)}")
    splits = {"train": train, "val": val, "test": test}
    labels = _check_labels({k: d["labels"] for k, d in splits.items()}, "bow_logistic")
    feats = {k: _bow_features(d["tokens"], vocab_size, groups) for k, d in splits.items()}
    return _select(feats, labels, l2_grid)


def feature_logistic(
    features: dict, labels: dict, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)
) -> BowResult:
    """A linear probe of fixed features: logistic regression on ``features[k] [N_k, p]`` for the
    splits ``k`` = ``"train"``, ``"val"``, ``"test"`` with ``labels[k]`` in {0, 1}, each column
    standardised by its training mean and standard deviation (so one penalty grid suits features
    of any scale; ``weights`` are in those units). Fitted and selected as :func:`bow_logistic`."""
    keys = ("train", "val", "test")
    if set(features) != set(keys) or set(labels) != set(keys):
        raise QuarticError(f"feature_logistic needs the splits {keys}, got {sorted(features)}")
    labels = _check_labels(labels, "feature_logistic")
    x = {k: np.asarray(features[k], np.float64) for k in keys}
    for k in keys:
        if x[k].ndim != 2 or x[k].shape[0] != labels[k].shape[0]:
            raise QuarticError(
                f"features[{k!r}] must be [N, p] with N = {labels[k].shape[0]} labels, "
                f"got {x[k].shape}"
            )
    mean, std = x["train"].mean(0), x["train"].std(0)
    std = np.where(std > 0, std, 1.0)
    feats = {k: np.hstack([(v - mean) / std, np.ones((v.shape[0], 1))]) for k, v in x.items()}
    return _select(feats, labels, l2_grid)
