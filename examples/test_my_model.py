"""A user's unit tests of the quartic law on their own model, with quartic.testing.

Copy this file next to your tests and replace ``model()`` by your losses and θ*: the losses take
``(params[, batch])``, ``params`` is any pytree. Run it with ``pytest examples/test_my_model.py``.
Here the "model" is a small quadratic whose geometry is known, so every assertion below holds.
"""

import jax
import jax.numpy as jnp
import numpy as np

import quartic
from quartic import testing
from quartic.core.problems import QuadraticSpec, make_quadratic

jax.config.update("jax_enable_x64", True)  # exactness claims are made in float64


def model():
    """Your alignment loss L_A, fine-tuning loss L_FT and aligned parameters θ* (a pytree)."""
    prob, _ = make_quadratic(jax.random.PRNGKey(0), QuadraticSpec(n=30, d=3, h_range=(1.0, 2.0)))
    unflat = lambda p: jnp.concatenate([p["layer1"], p["layer2"]])
    params = {"layer1": prob.theta_star[:20], "layer2": prob.theta_star[20:]}
    return (lambda p: prob.align_loss_fn(unflat(p))), (lambda p: prob.ft_loss_fn(unflat(p))), params


def test_alignment_loss_starts_at_t4():
    align_loss, ft_loss, params = model()
    testing.assert_onset_order(align_loss, ft_loss, params, order=4)  # exact, by Taylor mode


def test_aic_holds():
    align_loss, ft_loss, params = model()
    report = quartic.check_aic(
        align_loss, ft_loss, params, rank=3,
        thresholds=quartic.Thresholds(lam=1.0, eps_tail=1e-8, eps_ortho=1e-8, gamma=1e-6),
    )  # fmt: skip
    testing.assert_aic(report)


def test_simulated_fine_tuning_follows_the_forecast_and_t4():
    align_loss, ft_loss, params = model()
    report = quartic.check_aic(align_loss, ft_loss, params, rank=3)
    t = np.geomspace(1e-4, 1e-2, 12) / report.lambda_max_ft  # t·λ_max(H) ≪ 1
    # your own training run goes here; this one is the exact gradient flow (RK4) from θ*
    f_align, theta, _ = quartic.pytree.flat_fn(align_loss, params)
    f_ft, _, _ = quartic.pytree.flat_fn(ft_loss, params)
    observe = quartic.dynamics.make_observer(f_align, theta)
    run = quartic.dynamics.gradient_flow(f_ft, theta, t, observe).checked()
    du = np.asarray(run.observables["delta_u"])
    testing.assert_forecast_matches(report, t, du, rtol=0.02)
    testing.assert_loglog_slope(t, du, 4.0, atol=0.02)
