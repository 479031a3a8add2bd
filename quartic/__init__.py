"""quartic: the geometry of alignment collapse, computed exactly.

Public API (see ``docs/`` for the map from the paper's definitions and theorems to functions):

- :func:`check_aic` — the Alignment Instability Condition (Def 5.1) at θ*, measured.
- :mod:`quartic.curvature` — HVPs, dense Hessians, Lanczos, Hutchinson, SLQ, Fisher matrices.
- :mod:`quartic.theory` — the predicted exponent, both readings of the constant, the second-order
  forecast, crossover times, the onset ladder, exact Taylor-mode onset.
- :class:`QuadraticProblem`, :class:`CurvedProblem` — model families with known geometry.
- :mod:`quartic.dynamics` — gradient flow, gradient descent and optax runs, recorded.
- :mod:`quartic.fitting` — log-log slopes and ratios.
- :mod:`quartic.data` — a dataset given as a loader (iterable of batches) as one exact loss.
"""

from quartic import curvature, data, dynamics, fitting, pytree, theory
from quartic.aic import AICReport, Thresholds, check_aic
from quartic.errors import DivergenceError, QuarticError
from quartic.problems import (
    CurvedProblem,
    QuadraticProblem,
    QuadraticSpec,
    make_curved,
    make_quadratic,
)

__version__ = "0.1.0"

__all__ = [
    "AICReport",
    "CurvedProblem",
    "DivergenceError",
    "QuadraticProblem",
    "QuadraticSpec",
    "QuarticError",
    "Thresholds",
    "check_aic",
    "curvature",
    "data",
    "dynamics",
    "fitting",
    "make_curved",
    "make_quadratic",
    "pytree",
    "theory",
]
