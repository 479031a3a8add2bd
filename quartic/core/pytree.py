"""Flat views of pytrees and parameter subsets.

The curvature and theory code works on a flat vector ``theta`` of shape ``[n]``; models keep their
parameters as pytrees. This module is the one place that converts between the two, and the one
place where a *subset* of the parameters (one layer, the LoRA adapters) is selected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from quartic.core.errors import QuarticError

PyTree = Any


def path_name(path) -> str:
    """A pytree key path as ``/``-joined keys and indices (``blocks/0/attn/q_proj/kernel``): the
    name a parameter has in checkpoints and reports."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class _KeyPathName(str):
    """A leaf's name (``blocks/0/lora_a``, :func:`path_name`) that is also its key path: a
    ``where`` predicate can test the name as a string (``"lora" in name``) or read ``.path``
    (the ``jax.tree_util`` key path)."""

    path: tuple

    def __new__(cls, path):
        obj = super().__new__(cls, path_name(path))
        obj.path = tuple(path)
        return obj


def ravel(params: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flatten ``params`` to ``theta[n]``; returns ``(theta, unravel)``."""
    theta, unravel = ravel_pytree(params)
    return theta, unravel


def _selection(params: PyTree, where) -> tuple[list, Any, list[bool]]:
    """``(leaves, treedef, keep)``: which leaves of ``params`` the selection ``where`` keeps."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_path]
    if where is None:
        keep = [True] * len(leaves)
    elif callable(where):
        keep = [bool(where(_KeyPathName(path), leaf)) for path, leaf in leaves_with_path]
    else:
        mask_leaves, mask_def = jax.tree_util.tree_flatten(where)
        if mask_def != treedef:
            raise QuarticError(
                f"parameter mask does not have the structure of params: {mask_def} vs {treedef}"
            )
        keep = [bool(m) for m in mask_leaves]
    if not any(keep):
        raise QuarticError("the parameter subset is empty: the mask selects no leaf")
    return leaves, treedef, keep


def select(params: PyTree, where: PyTree | Callable[[tuple, Any], bool] | None):
    """Split ``params`` into the selected leaves and a function that puts them back.

    Args:
      params: any pytree of arrays.
      where: ``None`` (everything), a pytree of booleans with the structure of ``params`` (a
        leaf-level mask), or a predicate ``where(name, leaf) -> bool`` where ``name`` is the leaf's
        name as a string (``"blocks/0/attn/q_proj/kernel"``, :func:`path_name`), so
        ``lambda name, _: "lora" in name`` works; ``name.path`` is the ``jax.tree_util`` key path
        for predicates written against key paths.

    Returns:
      ``(sub, merge)``: ``sub`` is a list of the selected leaves, ``merge(sub) -> params`` rebuilds
      the full pytree with the other leaves held at their current values.
    """
    leaves, treedef, keep = _selection(params, where)
    idx = [i for i, k in enumerate(keep) if k]
    sub = [leaves[i] for i in idx]

    def merge(new_sub):
        out = list(leaves)
        for i, leaf in zip(idx, new_sub, strict=True):
            out[i] = leaf
        return jax.tree_util.tree_unflatten(treedef, out)

    return sub, merge


def flat_fn(
    fn: Callable[..., Any],
    params: PyTree,
    batch: Any = None,
    where=None,
) -> tuple[Callable[[jax.Array], Any], jax.Array, Callable[[jax.Array], PyTree]]:
    """``fn(params[, batch])`` as a function of the flat selected parameters.

    Returns ``(f, theta, to_params)`` with ``f(theta) == fn(params[, batch])`` at the starting
    point and ``to_params(theta)`` the full pytree.
    """
    sub, merge = select(params, where)
    theta, unravel = ravel(sub)

    def to_params(th):
        return merge(unravel(th))

    if batch is None:
        return (lambda th: fn(to_params(th))), theta, to_params
    return (lambda th: fn(to_params(th), batch)), theta, to_params


def flat_view(params: PyTree, where=None):
    """``(theta, to_params, mask_key)`` where ``to_params(theta, params)`` puts the flat selected
    parameters back into ``params`` *given as an argument*, so a jitted function that takes
    ``params`` and data as arguments captures no array (one compilation serves every batch).
    ``mask_key`` is a hashable description of the selection (for compilation caches)."""
    leaves, treedef, keep = _selection(params, where)
    idx = tuple(i for i, k in enumerate(keep) if k)
    theta, unravel = ravel([leaves[i] for i in idx])

    def to_params(th, full):
        out = jax.tree_util.tree_leaves(full)
        for i, leaf in zip(idx, unravel(th), strict=True):
            out[i] = leaf
        return jax.tree_util.tree_unflatten(treedef, out)

    shapes = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in leaves)
    return theta, to_params, (treedef, shapes, idx)


def scalar_loss(loss_fn: Callable[[jax.Array], Any], theta: jax.Array, name: str) -> jax.Array:
    """Evaluate ``loss_fn(theta)`` once and check it is a finite scalar, naming ``name`` if not."""
    shape = jax.eval_shape(loss_fn, theta).shape
    if shape != ():
        raise QuarticError(f"{name} must return a scalar, got shape {shape}")
    value = jax.jit(loss_fn)(theta)
    if shape != ():
        raise QuarticError(f"{name} must return a scalar, got shape {shape}")
    if not bool(jnp.isfinite(value)):
        raise QuarticError(f"{name} is not finite at the given parameters: {float(value)}")
    return value


def check_finite(x: jax.Array, name: str) -> None:
    """Raise a :class:`QuarticError` naming ``name`` if ``x`` has a NaN or an infinity."""
    if not bool(jnp.all(jnp.isfinite(x))):
        raise QuarticError(f"{name} contains non-finite values (NaN or inf)")
