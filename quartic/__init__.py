"""quartic: the geometry of alignment collapse, computed exactly.

Public API (see ``docs/`` for the map from the paper's definitions and theorems to functions):

- :func:`check_aic` — the Alignment Instability Condition (Def 5.1) at θ*, measured.
- :mod:`quartic.core.curvature` — HVPs, dense Hessians, Lanczos, Hutchinson, SLQ, Fisher matrices.
- :mod:`quartic.core.theory` — the predicted exponent, both readings of the constant, the second-order
  forecast, crossover times, the onset ladder, exact Taylor-mode onset.
- :class:`QuadraticProblem`, :class:`CurvedProblem` — model families with known geometry.
- :mod:`quartic.core.dynamics` — gradient flow, gradient descent and optax runs, recorded.
- :mod:`quartic.core.fitting` — log-log slopes and ratios.
- :mod:`quartic.core.data` — a dataset given as a loader (iterable of batches) as one exact loss.
"""

import importlib
import sys

from quartic.core import curvature, data, dynamics, fitting, measure, pytree, theory
from quartic.core.aic import AICReport, Thresholds, check_aic
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.problems import (
    CurvedProblem,
    QuadraticProblem,
    QuadraticSpec,
    make_curved,
    make_quadratic,
)

# The core modules stay importable under their short names (`import quartic.curvature`,
# `from quartic.theory import ...`): they are the public API, and these are the same module objects.
for _name in (
    "aic",
    "curvature",
    "data",
    "dynamics",
    "errors",
    "fitting",
    "measure",
    "problems",
    "pytree",
    "theory",
):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{__name__}.core.{_name}")
del _name

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
    "measure",
    "pytree",
    "theory",
]
