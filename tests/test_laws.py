"""The laws, tested as laws: exponents on geometric grids, ratios to exact coefficients.

Tolerances come from the expansions in docs/theory.md §3 (float64 throughout).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic import QuarticError, testing
from quartic.core import dynamics, fitting, theory

SEEDS = range(8)


def _coupling_vectors(prob, basis, d):
    h, g = prob.ft_hessian, prob.ft_grad
    sq = jnp.sqrt(prob.fisher_values[:d])  # generator: the first d factors are M
    hg = h @ g
    a = sq * (basis.T @ hg)
    b = sq * (basis.T @ (h @ hg))
    c = sq * (basis.T @ (h @ (h @ hg)))
    return a, b, c


def _lam_max(prob):
    return float(jnp.linalg.eigvalsh(prob.ft_hessian)[-1])


@pytest.mark.parametrize("h_range", [(1.0, 2.0), (1.0, 5.0)])
def test_quartic_ratio_approaches_one_linearly(h_range):
    """Δu/(γ_F² t⁴/8) − 1 = s t + s₂ t² + O(t³) on 8 random problems (Pg = 0, no tail)."""
    for seed in SEEDS:
        spec = q.QuadraticSpec(n=40, d=4, h_range=h_range)
        prob, basis = q.make_quadratic(jax.random.PRNGKey(seed), spec)
        a, b, c = _coupling_vectors(prob, basis, spec.d)
        s1, s2 = theory.next_order_slope(a, b), theory.next_order_curvature(a, b, c)
        lam = _lam_max(prob)
        # lower end: where float64 still resolves the O(t) term (Δu error ≈ ε/(tγ) relative)
        ts = np.geomspace(1e-4, 1e-2, 25) / lam
        du = prob.delta_u(prob.flow(ts))
        ratio = fitting.ratio_to_prediction(
            ts, du, theory.quartic_coefficient(jnp.linalg.norm(a)), 4
        )
        lin = s1 * ts
        rel = np.abs((ratio - 1) / lin - 1)
        # the linear term alone is off by ≈ (s₂/s₁) t, the next term of the expansion
        assert np.all(rel <= 1.05 * np.abs(s2 / s1) * ts + 1e-4), seed
        # and with it, what remains is third order: ≤ 1e-3 of the linear term here
        assert np.all(np.abs(ratio - 1 - lin - s2 * ts**2) <= 1e-3 * np.abs(lin)), seed
        if h_range == (1.0, 2.0):
            # the acceptance criterion: within 1 % of the next-order term for t·λ_max ≤ 1e-2
            assert rel.max() < 0.01, (seed, rel.max())
        slope = fitting.local_slope(ts, du)
        assert np.all(np.abs(slope - theory.ORDER) <= 0.01), (seed, slope)


def test_leak_crossover_time_is_where_t2_meets_t4():
    spec = q.QuadraticSpec(n=30, d=3, leak=1e-6, coupling=1.0)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(2), spec)
    rep = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=3)
    tx = rep.crossover_time
    assert tx * rep.lambda_max_ft < 1e-4  # deep inside the expansion's validity
    ts = np.geomspace(tx / 100, tx * 100, 81)
    slope = fitting.local_slope(ts, prob.delta_u(prob.flow(ts)))
    assert abs(slope[0] - 2) < 0.05 and abs(slope[-1] - 4) < 0.3
    # at t×, ½t²gᵀFg = (t⁴/8)‖F½Hg‖²: equal terms give local slope (2+4)/2 = 3 up to O(t)
    assert abs(np.interp(np.log(tx), np.log(ts), slope) - 3) < 0.1


def _gd_forecast_errors(spec, k=20, lrs=(4e-4, 2e-4, 1e-4, 5e-5)):
    prob, _ = q.make_quadratic(jax.random.PRNGKey(4), spec)
    rep = q.check_aic(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, rank=spec.d)
    errs = [abs(float(prob.delta_u(prob.gd(k, lr)) / rep.forecast.gd(k, lr)) - 1) for lr in lrs]
    return np.array(errs[:-1]) / np.array(errs[1:])


def test_gradient_descent_matches_discrete_forecast_with_error_linear_in_lr():
    # the quartic regime (Pg = 0, no tail): Δu_k ~ q²(Hg)ᵀF(Hg)/2 with q = η²k(k−1)/2, and the
    # first omitted term is O(η k) smaller: the error halves when η halves at fixed k
    ratios = _gd_forecast_errors(q.QuadraticSpec(n=30, d=3))
    np.testing.assert_allclose(ratios, 2.0, rtol=0.02)
    # with a leak the t² term dominates and the forecast's t³ term is exact: error O(η²)
    ratios = _gd_forecast_errors(q.QuadraticSpec(n=30, d=3, tail=0.05, leak=0.05))
    np.testing.assert_allclose(ratios, 4.0, rtol=0.02)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(4), q.QuadraticSpec(n=30, d=3))
    # the simulated iterates equal the closed form
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star, delta_u_fn=prob.delta_u)
    traj = dynamics.gradient_descent(
        prob.ft_loss_fn, prob.theta_star, 1e-3, np.array([5, 20]), observe
    )
    np.testing.assert_allclose(
        traj.observables["delta_u"], prob.delta_u(prob.gd(np.array([5, 20]), 1e-3)), rtol=1e-9
    )


def test_flow_forecast_is_exact_to_second_order():
    """The forecast with the gradient term equals Δu up to O(t³·δ) terms on a non-optimum θ*."""
    spec = q.QuadraticSpec(n=20, d=2, leak=0.1, tail=0.1)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(9), spec)
    shift = 0.05 * jax.random.normal(jax.random.PRNGKey(10), (20,))
    la = lambda th: prob.align_loss_fn(th - shift) - prob.align_loss_fn(-shift)
    rep = q.check_aic(la, prob.ft_loss_fn, prob.theta_star, rank=2)
    ts = np.geomspace(1e-4, 1e-2, 10) / rep.lambda_max_ft
    du = jax.vmap(la)(prob.flow(ts))
    err = np.abs(du - rep.forecast.flow(ts))
    # error O(t³): its log-log slope is 3 (from −(t³/6)∇L_Aᵀ(H²g))
    testing.assert_loglog_slope(ts, err, 3.0, atol=0.05)
    assert np.all(err / np.abs(du) < 0.02)


def test_taylor_mode_onset_on_quadratics():
    for seed in range(3):
        spec = q.QuadraticSpec(n=20, d=3)
        prob, basis = q.make_quadratic(jax.random.PRNGKey(seed), spec)
        onset = theory.taylor_onset(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, order=6)
        c = onset.coefficients
        a, _, _ = _coupling_vectors(prob, basis, 3)
        c4 = theory.quartic_coefficient(jnp.linalg.norm(a))
        assert np.all(np.abs(c[:3]) <= 1e-13 * abs(c4))
        np.testing.assert_allclose(c[3], c4, rtol=1e-10)
        assert onset.onset() == (4, pytest.approx(float(c4), rel=1e-10))
        h, g = prob.ft_hessian, prob.ft_grad
        hk = g
        for k in range(1, 7):
            expected = (-1) ** k * hk
            np.testing.assert_allclose(
                onset.flow_derivatives[k - 1], expected, rtol=0, atol=1e-12 * np.abs(expected).max()
            )
            hk = h @ hk


def test_onset_order_does_not_change_with_the_expansion_order():
    """A t⁴ onset with a small c₄ and H's spectrum spread over [1, 300]: at order 12 the
    coefficients grow like λ_max(H)^k, and a zero test relative to the largest coefficient
    calls c₄ zero (it finds 8); measured at the flow's time scale the answer stays 4."""
    n = 20
    h = jnp.diag(jnp.geomspace(1.0, 300.0, n)).at[0, n - 1].set(1e-3).at[n - 1, 0].set(1e-3)
    f = jnp.zeros((n, n)).at[0, 0].set(1.0)
    g = jnp.zeros(n).at[n - 1].set(1.0).at[1].set(1.0)
    la, lf = (lambda th: 0.5 * th @ f @ th), (lambda th: g @ th + 0.5 * th @ h @ th)
    c4 = theory.quartic_coefficient(jnp.sqrt(f[0, 0]) * (h @ g)[0])  # Pg = 0, M = e₁
    for order in (6, 12):
        onset = theory.taylor_onset(la, lf, jnp.zeros(n), order=order)
        assert onset.onset() == (4, pytest.approx(float(c4), rel=1e-10)), order
    c = np.abs(np.asarray(onset.coefficients))
    assert c[3] < 1e-8 * c.max()  # the relative rule without the time scale would miss c₄
    assert onset.onset(atol=1e-12) == (4, pytest.approx(float(c4), rel=1e-10))
    assert onset.onset(atol=2 * c.max())[0] is None


def test_curved_family_onset_window_and_exact_c4():
    spec = q.QuadraticSpec(n=20, d=3)
    prob, basis = q.make_curved(jax.random.PRNGKey(0), spec, curvature=1.0, quartic=0.5)
    onset = theory.taylor_onset(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, order=5)
    order, c4 = onset.onset()
    assert order == 4
    lam = _lam_max(prob.base)
    ts = np.geomspace(1e-6, 1e-1, 40) / lam
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star)
    traj = jax.jit(lambda: dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, ts, observe))()
    du = np.asarray(traj.checked().observables["delta_u"])
    slope = fitting.local_slope(ts, du)
    window = fitting.slope_window(ts, slope, 4.0, 0.1)
    assert window is not None and window[1] / window[0] > 100
    # Δu/t⁴ → c₄ (the Taylor-mode value) as t → 0, with error O(t): 9.1e-7 at t·λ = 1e-6
    ratio = du / (c4 * ts**4)
    assert abs(ratio[0] - 1) < 2e-6
    # the paper's γ_F²/8 misses the output-curvature term: report it, and check it is not c₄
    a, _, _ = _coupling_vectors(prob.base, basis, 3)
    paper = float(theory.quartic_coefficient(jnp.linalg.norm(a)))
    assert abs(c4 / paper - 1) > 0.5


def test_curved_subspace_rotation_within_davis_kahan():
    spec = q.QuadraticSpec(n=16, d=2, lam_top=(10.0, 4.0))
    prob, basis = q.make_curved(jax.random.PRNGKey(1), spec, curvature=0.5, quartic=0.1)
    ts = np.geomspace(1e-3, 3e-1, 12)
    observe = dynamics.make_observer(
        prob.align_loss_fn, prob.theta_star, basis, curvature_fn=prob.fisher_at
    )
    traj = jax.jit(lambda: dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, ts, observe))()
    sin = np.asarray(traj.observables["sin_angle"])
    dist = np.asarray(traj.observables["delta_norm"])
    gap = float(prob.base.fisher_values[1] - prob.base.fisher_values[2])
    # Davis–Kahan (Yu–Wang–Samworth form): sin Θ ≤ 2 ‖F(θ) − F(θ*)‖ / gap, and to first order
    # ‖F(θ) − F(θ*)‖ ≤ L_F ‖θ − θ*‖
    bound = 2 * float(prob.fisher_lipschitz()) * dist / gap
    # the angle is 3.3 % of the bound here: the bound holds with that much room, no more than 3×
    assert np.all(sin > 0) and np.all(sin <= 0.1 * bound)
    # the angle grows linearly with ‖δ‖ (the subspace rotates at first order)
    testing.assert_loglog_slope(dist[:6], sin[:6], 1.0, atol=0.1)


def test_diverging_run_stops_with_a_message_and_keeps_its_records():
    prob, _ = q.make_quadratic(
        jax.random.PRNGKey(0), q.QuadraticSpec(n=10, d=2, h_range=(1.0, 10.0))
    )
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star, delta_u_fn=prob.delta_u)
    steps = dynamics.log_steps(5000, 30)
    traj = dynamics.gradient_descent(prob.ft_loss_fn, prob.theta_star, 0.5, steps, observe)
    with pytest.raises(q.DivergenceError, match="lower the learning rate") as err:
        traj.checked()
    kept = err.value.partial["delta_u"]
    assert 0 < len(kept) < len(steps) and np.all(np.isfinite(kept))


def test_bad_grids_are_rejected():
    prob, _ = q.make_quadratic(jax.random.PRNGKey(0), q.QuadraticSpec(n=10, d=2))
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star)
    with pytest.raises(QuarticError, match="increasing"):
        dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, np.array([0.2, 0.1]), observe)
    with pytest.raises(QuarticError, match="t_min"):
        dynamics.log_times(1.0, 0.5, 10)
