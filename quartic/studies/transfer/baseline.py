"""A linear baseline for the transfer study's tasks: logistic regression on word counts, fitted
exactly (Newton) with its L2 penalty chosen on the validation split. It tells how much of a task a
model that only counts words can learn from the same rows."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from quartic.core.errors import QuarticError

__all__ = ["BowResult", "bow_logistic"]


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
