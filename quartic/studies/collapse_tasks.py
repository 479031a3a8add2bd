"""The aligned small transformer as a family of problems (L_A, L_FT), one per benign task.

For the experiments that run quartic's generic machinery (:mod:`quartic.studies.defences`,
:mod:`quartic.studies.forecast`) on the transformer of :mod:`quartic.studies.collapse`:

- θ* is built by :func:`quartic.studies.collapse.aligned_setup` (cached on disk, once per process), as
  ``experiments/transformer_collapse.py`` builds it;
- the alignment loss is the **KL drift** from θ*'s own answers on the harm category
  (``CollapseSetup.align_fns["kl"]``): ``Δu = L_A`` exactly, its gradient at θ* is exactly 0 and
  its Hessian there is exactly the true Fisher (docs/theory.md §3), so the AIC premise holds by
  construction and the exact Hessian of L_A is the alignment curvature;
- the fine-tuning loss is one benign task's LM loss on its train batch.

Every function takes the task data as an argument (:func:`losses` is meant to be called inside a
trace), so one compiled program serves every task: the task batches share a shape. Compiled
helpers are kept by the setup (:meth:`quartic.studies.collapse.CollapseSetup.compiled`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quartic.core import curvature, subspace
from quartic.studies import collapse

#: Lanczos steps for λ_max(H_FT) at θ* (the top eigenvalue of a 2k-parameter LM Hessian converges
#: to float64 precision well within this).
LAMBDA_ITERS = 30


def losses(
    setup: collapse.CollapseSetup, theta_star: jax.Array, batch: dict, kl_data: dict
) -> subspace.Losses:
    """The flat pair (KL drift on the skill, LM loss on ``batch``) as :class:`quartic.core.subspace.Losses`,
    closing over *traced* data: call it inside the jitted function that receives ``batch`` and
    ``kl_data`` (``setup.align_data["kl"]``) as arguments. ``delta_u_fn`` is the KL itself."""
    kl_fn, lm_fn = setup.align_fns["kl"], setup.lm_fn

    def align(th):
        return kl_fn(th, kl_data)

    return subspace.Losses(align, lambda th: lm_fn(th, batch), theta_star, delta_u_fn=align)


def lambda_max_ft(setup: collapse.CollapseSetup, batch: dict, theta=None) -> float:
    """``λ_max(H_FT)`` at θ (default θ*) by :data:`LAMBDA_ITERS` Lanczos steps (one compiled
    program for every task)."""
    lm_fn = setup.lm_fn

    def top(th, b):
        mv = curvature.hvp_fn(lambda x: lm_fn(x, b), th)
        return subspace.lambda_max(mv, v0=jnp.ones_like(th), num_iters=LAMBDA_ITERS).value

    fn = setup.compiled(("collapse_tasks.lambda_max", LAMBDA_ITERS), lambda: jax.jit(top))
    th = setup.theta if theta is None else theta
    return float(fn(th, batch))
