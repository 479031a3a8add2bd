"""quartic.testing: each assertion passes where the law holds and fails, with the measured value,
the expected one and the hint, where it does not. The cases are the onset ladder's rungs on the
quadratic family, whose geometry is set exactly (``QuadraticSpec``)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic
from quartic import testing
from quartic.core.problems import QuadraticSpec, make_quadratic

KEY = jax.random.PRNGKey(3)


def _problem(**knobs):
    return make_quadratic(KEY, QuadraticSpec(n=24, d=3, **knobs), dtype=jnp.float64)[0]


def _pytree_losses(prob):
    """The problem's losses on a two-leaf pytree, as a user's model would have them."""
    split = lambda p: jnp.concatenate([p["w"], p["b"]])
    params = {"w": prob.theta_star[:20], "b": prob.theta_star[20:]}
    return (lambda p: prob.align_loss_fn(split(p))), (lambda p: prob.ft_loss_fn(split(p))), params


def test_onset_order_passes_on_each_rung_and_takes_pytrees():
    for knobs, order in [({}, 4), ({"leak": 0.3}, 2), ({"phg_zero": True}, 6)]:
        align, ft, params = _pytree_losses(_problem(**knobs))
        onset = testing.assert_onset_order(align, ft, params, order, max_order=7)
        assert onset.onset()[0] == order


def test_onset_order_failure_names_the_leak():
    align, ft, params = _pytree_losses(_problem(leak=0.3))
    with pytest.raises(AssertionError) as err:
        testing.assert_onset_order(align, ft, params, order=4)
    msg = str(err.value)
    assert "measured 2 (t^2), expected 4 (t^4)" in msg
    assert "first-order leak" in msg and "onset is t², not t⁴" in msg


def test_onset_order_failure_when_theta_is_not_aligned():
    prob = _problem()
    shifted = prob.theta_star + 1e-2 * jnp.ones_like(prob.theta_star)
    with pytest.raises(AssertionError, match=r"measured 1 \(t\^1\).*\n.*\n.*premise fails"):
        testing.assert_onset_order(prob.align_loss_fn, prob.ft_loss_fn, shifted, order=4)


def _flow_delta_u(prob, t):
    return np.asarray(jax.vmap(lambda s: prob.delta_u(prob.flow(s) - prob.theta_star))(t))


def test_loglog_slope_of_a_simulated_flow():
    prob = _problem(h_range=(1.0, 2.0))
    t = np.geomspace(1e-4, 1e-2, 20)  # t·λ_max(H) ≤ 2e-2: the next order bends the slope by ~1 %
    fit = testing.assert_loglog_slope(t, _flow_delta_u(prob, t), 4.0, atol=0.02)
    assert abs(fit.exponent - 4.0) <= 0.02
    leak = _problem(leak=0.3, h_range=(1.0, 2.0))
    with pytest.raises(AssertionError) as err:
        testing.assert_loglog_slope(t, _flow_delta_u(leak, t), 4.0, atol=0.02)
    msg = str(err.value)
    assert "expected 4.0 ± 0.02" in msg and "a first-order leak dominates" in msg
    measured = float(msg.split("measured ")[1].split(" ")[0])
    assert abs(measured - 2.0) < 0.01  # the message carries the real fit


def test_forecast_matches_and_fails_beyond_its_horizon():
    prob = _problem(h_range=(1.0, 2.0))
    report = quartic.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=3)
    small = np.geomspace(1e-4, 1e-2, 10) / report.lambda_max_ft
    err = testing.assert_forecast_matches(report, small, _flow_delta_u(prob, small), rtol=0.05)
    assert err.max() < 0.05
    large = np.geomspace(1.0, 3.0, 5) / report.lambda_max_ft
    with pytest.raises(AssertionError, match=r"worst relative error .*\nhint: t·λ_max\(H_FT\) = "):
        testing.assert_forecast_matches(report, large, _flow_delta_u(prob, large), rtol=0.05)


def test_aic_assertion_prints_the_leak_and_refuses_to_pass_vacuously():
    th = quartic.Thresholds(eps_ortho=1e-8, gamma=1e-6, eps_tail=1e-8, lam=1.0)
    good = _problem()
    report = quartic.check_aic(
        good.align_loss_fn, good.ft_loss_fn, good.theta_star, rank=3, thresholds=th
    )
    assert testing.assert_aic(report) is report
    bad = _problem(leak=0.21)
    report = quartic.check_aic(bad.align_loss_fn, bad.ft_loss_fn, bad.theta_star, 3, thresholds=th)
    with pytest.raises(AssertionError, match=r"first-order leak: ‖Pg‖/‖g‖ = 0.21; onset is t²"):
        testing.assert_aic(report)
    unjudged = quartic.check_aic(good.align_loss_fn, good.ft_loss_fn, good.theta_star, rank=3)
    with pytest.raises(quartic.QuarticError, match="judges none"):
        testing.assert_aic(unjudged)


def test_the_documented_example_passes():
    """docs/testing.md shows examples/test_my_model.py verbatim, and its tests pass."""
    root = pathlib.Path(__file__).resolve().parents[1]
    path = root / "examples" / "test_my_model.py"
    assert path.read_text().rstrip() in (root / "docs" / "testing.md").read_text()
    spec = importlib.util.spec_from_file_location("quartic_example_test_my_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()
