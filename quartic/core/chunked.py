"""Losses that are weighted sums over chunks of their data, evaluated one chunk at a time.

A mean over ``B`` rows is ``Σ_j w_j f(θ, rows_j)``. Any quantity that is linear in the loss (its
gradient, the Taylor series of its gradient flow, the series of u along it) is the same weighted
sum of the chunks' quantities, so a compiled program can loop over the chunks and keep one chunk's
intermediates in memory instead of all ``B`` rows'. :func:`quartic.core.theory.taylor_onset` takes
:class:`Chunked` arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from quartic.core.errors import QuarticError

__all__ = ["Chunked", "weighted_sum"]


class Chunked(NamedTuple):
    """The arguments of a loss that is a weighted sum over chunks of its data:
    ``L(θ) = Σ_j w_j f(θ, *parts_j)``, for :func:`taylor_onset` / :func:`taylor_onsets`.

    A mean over ``B`` rows is such a sum: rows split into ``J`` chunks of equal shape, ``w_j`` the
    chunk's share of the mean's denominator (``B_j / B`` for a mean over rows, ``M_j / M`` for a
    masked mean with mask sums ``M_j``, ``M = Σ_j M_j``). Every Taylor coefficient of the flow and
    of u is linear in the loss it differentiates, so ``jet`` of ``L`` is ``Σ_j w_j`` jet of the
    chunk's loss: the compiled program loops over the chunks (``lax.scan``) and holds the
    intermediates of one chunk at a time, not of all ``B`` rows. The values are those of the
    unchunked loss up to the rounding of the sum. A term that does not depend on the rows (e.g.
    a linear tilt ``−⟨πg, θ − θ*⟩`` inside ``f``) is counted ``Σ_j w_j`` times: exact when the
    weights sum to 1.

    Build it with :meth:`stack`, which checks the parts.

    Attributes:
      parts: a tuple of arguments whose every leaf has a leading axis ``J`` (part j is the leaves'
        j-th slice).
      weights: ``[J]``, the ``w_j``.
    """

    parts: tuple
    weights: jax.Array

    @classmethod
    def stack(cls, parts: Sequence[tuple], weights) -> Chunked:
        """From ``J`` argument tuples of the same structure and leaf shapes, and ``J`` weights."""
        parts = [tuple(p) for p in parts]
        w = jnp.asarray(weights)
        if not parts:
            raise QuarticError("Chunked needs at least one chunk")
        if w.ndim != 1 or w.shape[0] != len(parts):
            raise QuarticError(
                f"Chunked has {len(parts)} chunks but weights of shape {w.shape}: give one weight "
                "per chunk"
            )
        leaves0, tree0 = jax.tree_util.tree_flatten(parts[0])
        for j, p in enumerate(parts[1:], 1):
            leaves, tree = jax.tree_util.tree_flatten(p)
            if tree != tree0:
                raise QuarticError(f"chunk {j} is not structured like chunk 0: {tree} vs {tree0}")
            for a, b in zip(leaves, leaves0, strict=True):
                if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                    raise QuarticError(
                        f"chunk {j} has a leaf of shape {jnp.shape(a)} ({jnp.result_type(a)}) where "
                        f"chunk 0 has {jnp.shape(b)} ({jnp.result_type(b)}): chunks must have "
                        "equal shapes (split the rows evenly)"
                    )
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *parts)
        return cls(stacked, w)

    def check(self, name: str) -> None:
        """Raise :class:`QuarticError` unless every leaf of ``parts`` has the leading axis ``J``."""
        w = jnp.shape(self.weights)
        if len(w) != 1:
            raise QuarticError(f"{name}: Chunked weights must be [J], got shape {w}")
        for leaf in jax.tree_util.tree_leaves(self.parts):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != w[0]:
                raise QuarticError(
                    f"{name}: a Chunked leaf of shape {jnp.shape(leaf)} does not stack {w[0]} "
                    "chunks (build it with Chunked.stack)"
                )


def weighted_sum(fn, args, like):
    """``fn(*args)`` for a plain tuple, ``Σ_j w_j fn(*parts_j)`` for :class:`Chunked` (a scan over
    the chunks; ``like`` gives the output's shape and dtype, the accumulator's zero)."""
    if not isinstance(args, Chunked):
        return fn(*args)

    def body(acc, part_w):
        part, w = part_w
        out = fn(*part)
        return acc + (w.astype(out.dtype) * out).astype(acc.dtype), None

    return jax.lax.scan(body, jnp.zeros(like.shape, like.dtype), (args.parts, args.weights))[0]
