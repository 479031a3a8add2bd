"""Errors that quartic reports to its user.

A `QuarticError` means the input was wrong (a shape, a rank, a non-finite value, a bad config
override), not that quartic has a bug: the command line prints its message as one line, without a
traceback, so the message must say what was wrong and what to do about it. It subclasses
`ValueError` so that callers who already catch `ValueError` keep working.

A `DivergenceError` means a computation left the finite numbers (a learning rate that diverges, a
loss that became NaN). It carries whatever was recorded before that happened in `partial`, so that
nothing already computed is lost: `quartic.harness.runs.run_sweep` records it as a failed unit and goes on.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DivergenceError", "QuarticError", "require_float64"]


class QuarticError(ValueError):
    """Bad input from the user; the message says what was wrong and what to do."""


def require_float64(what: str) -> None:
    """Raise a :class:`QuarticError` unless 64-bit JAX is on. Library code never flips the global
    switch (the caller's arrays would change dtype under it): the entry point turns it on."""
    import jax

    if not jax.config.jax_enable_x64:
        raise QuarticError(
            f"{what} needs float64: enable it first with jax.config.update('jax_enable_x64', True)"
        )


class DivergenceError(QuarticError):
    """A computation diverged (non-finite loss, exploding iterates).

    Attributes:
      partial: the results recorded before the divergence (JSON-able; `{}` when none), e.g. the
        metrics of the steps that were still finite.
    """

    def __init__(self, message: str, partial: Any = None):
        super().__init__(message)
        self.partial = {} if partial is None else partial

    def __reduce__(self):
        # Keep `partial` when the error crosses a process boundary (pickling drops extra init args).
        return (type(self), (str(self), self.partial))
