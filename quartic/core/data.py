"""Datasets given as loaders: a loss over many batches as one exact function.

Every quartic measurement (:func:`quartic.check_aic`, :func:`quartic.studies.diagnose.diagnose`, the HVPs
and the trajectories) takes a loss ``f(params, batch)`` and *one* batch. A dataset that comes as a
loader — any iterable of batches: a list, a generator, a ``tf.data`` / PyTorch loader yielding
numpy-convertible arrays — becomes one batch with :func:`over_batches`::

    loss, data = quartic.core.data.over_batches(ft_loss_fn, loader)
    report = quartic.check_aic(align_loss_fn, loss, theta_star, rank=8, ft_batch=data)

``loss(params, data) = (1/B) Σ_b ft_loss_fn(params, batch_b)``, evaluated one batch at a time
(``lax.map``, so memory holds one batch's activations, also under HVPs). When ``ft_loss_fn`` is a
mean over the examples of its batch and the batches have equal sizes, this is exactly the mean over
the whole dataset, so every derivative is the full-data one (no sampling noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax import lax

from quartic.core.cache import memo
from quartic.core.errors import QuarticError

PyTree = Any

__all__ = ["over_batches", "stack_batches"]


def stack_batches(loader: Iterable[PyTree], max_batches: int | None = None) -> PyTree:
    """The batches of ``loader`` stacked along a new leading axis ``[B, ...]`` (numpy, on host).

    Every batch must have the structure and leaf shapes of the first (a last, smaller batch is an
    error: drop it, e.g. ``drop_last=True``); floating leaves must be finite. ``max_batches`` stops
    after that many batches (for an endless loader).
    """
    if max_batches is not None and max_batches < 1:
        raise QuarticError(f"max_batches must be at least 1, got {max_batches}")
    first_tree = None
    columns: list[list[np.ndarray]] = []
    count = 0
    for i, batch in enumerate(loader):
        leaves, tree = jax.tree_util.tree_flatten(batch)
        leaves = [np.asarray(x) for x in leaves]
        if first_tree is None:
            if not leaves:
                raise QuarticError("batch 0 of the loader holds no arrays")
            first_tree, columns = tree, [[] for _ in leaves]
        elif tree != first_tree:
            raise QuarticError(
                f"batch {i} of the loader has another structure than batch 0 ({tree} vs {first_tree})"
            )
        for j, (x, col) in enumerate(zip(leaves, columns, strict=True)):
            if col and x.shape != col[0].shape:
                raise QuarticError(
                    f"batch {i} of the loader has leaf {j} of shape {x.shape}, batch 0 "
                    f"{col[0].shape}: batches must be the same size (drop the last, smaller one)"
                )
            if x.dtype.kind in "fc" and not np.isfinite(x).all():
                raise QuarticError(
                    f"batch {i} of the loader has NaN or inf in leaf {j} "
                    f"({int((~np.isfinite(x)).sum())} entries)"
                )
            col.append(x)
        count += 1
        if max_batches is not None and count == max_batches:
            break
    if first_tree is None:
        raise QuarticError("the loader yielded no batches")
    return jax.tree_util.tree_unflatten(first_tree, [np.stack(col) for col in columns])


@memo(maxsize=64)
def _mean_over_batches(loss_fn: Callable) -> Callable:
    # One wrapper per loss function, so that jitted callers see the same function object each time
    # (their compilation caches are keyed on it).
    def loss(params, batches):
        return lax.map(lambda b: loss_fn(params, b), batches).mean()

    loss.__name__ = f"mean_over_batches({getattr(loss_fn, '__name__', 'loss')})"
    return loss


def over_batches(
    loss_fn: Callable, loader: Iterable[PyTree], max_batches: int | None = None
) -> tuple[Callable, PyTree]:
    """``(loss, data)`` with ``loss(params, data) = mean_b loss_fn(params, batch_b)`` over the
    batches of ``loader`` (stacked by :func:`stack_batches`, evaluated one at a time). Pass them
    where a loss and its batch go (``check_aic(..., ft_batch=data)``, ``diagnose``)."""
    return _mean_over_batches(loss_fn), stack_batches(loader, max_batches)
