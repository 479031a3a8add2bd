"""Simulated trajectories against the exact quadratic path; vmap over seeds; compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import quartic as q
from quartic.core import dynamics


def _problems(num, spec):
    keys = jax.random.split(jax.random.PRNGKey(0), num)
    return jax.vmap(lambda k: q.make_quadratic(k, spec)[0])(keys)


def test_rk4_flow_matches_the_exact_path():
    spec = q.QuadraticSpec(n=20, d=2)
    prob, basis = q.make_quadratic(jax.random.PRNGKey(1), spec)
    lam = float(jnp.linalg.eigvalsh(prob.ft_hessian)[-1])
    ts = dynamics.log_times(1e-4 / lam, 1.0 / lam, 30)
    observe = dynamics.make_observer(
        prob.align_loss_fn, prob.theta_star, basis, prob.fisher_values[:2], delta_u_fn=prob.delta_u
    )
    traj = jax.jit(lambda: dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, ts, observe))()
    exact = prob.flow(ts)
    # RK4 with 16 substeps per record: relative error O((h λ)^4); measured 3.6e-10 (Δu), 1.9e-10
    # (projection, overlap), 1.3e-10 (θ): the tolerances are about 3× those
    np.testing.assert_allclose(traj.observables["delta_u"], prob.delta_u(exact), rtol=1e-9)
    np.testing.assert_allclose(traj.theta, exact[-1], rtol=4e-10, atol=1e-14)
    coords = exact @ basis
    np.testing.assert_allclose(
        traj.observables["proj_norm"], jnp.linalg.norm(coords, axis=-1), rtol=6e-10
    )
    overlap = jnp.linalg.norm(coords, axis=-1) / jnp.linalg.norm(exact, axis=-1)
    np.testing.assert_allclose(traj.observables["overlap"], overlap, rtol=6e-10)


def test_the_scaling_studys_coarse_flow_is_within_rk4s_error_bound():
    """The scaling study's flow (six times up to t·λ_max = 0.1, ``FLOW_SUBSTEPS`` RK4 steps per
    interval) against the exact path. Per step RK4's amplification factor differs from e^{−z}
    (z = hλ) by z⁵/120, i.e. z⁴/120 relative to the step's increment; every mode's increments share
    a sign, so each mode's displacement is off by at most z_max⁴/120 of itself, and the whole
    displacement δ by ε = z_max⁴/120 · ‖δ‖. Δu = ½ δᵀFδ is then off by at most ‖Fδ‖ ε + ½‖F‖ε²
    (not ε relative: Δu is small because δ is nearly orthogonal to F's top directions, and that
    cancellation is not preserved relative to Δu). The tolerances are those bounds."""
    from quartic.studies.scaling import FLOW_SUBSTEPS

    spec = q.QuadraticSpec(n=20, d=2)
    prob, basis = q.make_quadratic(jax.random.PRNGKey(1), spec)
    lam = float(jnp.linalg.eigvalsh(prob.ft_hessian)[-1])
    ts = dynamics.log_times(1e-3 / lam, 0.1 / lam, 6)
    z_max = lam * float(np.max(np.diff(np.concatenate([[0.0], ts])))) / FLOW_SUBSTEPS
    assert z_max < 0.031  # the grid's ratio 100^(1/5): its last interval over two steps
    observe = dynamics.make_observer(
        prob.align_loss_fn, prob.theta_star, basis, prob.fisher_values[:2], delta_u_fn=prob.delta_u
    )
    run = jax.jit(
        lambda: dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, ts, observe, FLOW_SUBSTEPS)
    )
    traj = run()
    exact = prob.flow(ts)
    f = jax.hessian(prob.align_loss_fn)(prob.theta_star)
    delta = np.asarray(exact) - np.asarray(prob.theta_star)[None, :]
    eps = z_max**4 / 120 * np.linalg.norm(delta, axis=-1)
    np.testing.assert_array_less(np.linalg.norm(traj.theta - exact[-1]), eps[-1])
    bound = np.linalg.norm(delta @ f, axis=-1) * eps + 0.5 * np.linalg.norm(f, 2) * eps**2
    err = np.abs(np.asarray(traj.observables["delta_u"]) - np.asarray(prob.delta_u(exact)))
    np.testing.assert_array_less(err, bound)


def test_vmapped_seeds_equal_single_runs_and_compile_once():
    spec = q.QuadraticSpec(n=16, d=2)
    probs = _problems(4, spec)
    ts = dynamics.log_times(1e-3, 1e-1, 12)
    traces = []

    def one(p):
        traces.append(1)
        obs = dynamics.make_observer(p.align_loss_fn, p.theta_star, delta_u_fn=p.delta_u)
        return dynamics.gradient_flow(p.ft_loss_fn, p.theta_star, ts, obs).observables["delta_u"]

    run = jax.jit(jax.vmap(one))
    batched = run(probs)
    run(probs)
    assert len(traces) == 1  # traced once for the whole batch, not per seed or per call
    for i in range(4):
        single = jax.tree.map(lambda x, i=i: x[i], probs)
        np.testing.assert_allclose(batched[i], jax.jit(one)(single), rtol=1e-12)


def test_optax_adam_run_records_and_is_finite():
    spec = q.QuadraticSpec(n=12, d=2)
    prob, _ = q.make_quadratic(jax.random.PRNGKey(2), spec)
    observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star, delta_u_fn=prob.delta_u)
    steps = dynamics.log_steps(200, 10)
    traj = dynamics.run_optimizer(
        prob.ft_loss_fn, prob.theta_star, optax.adam(1e-3), steps, observe, lr=1e-3
    ).checked()
    assert traj.observables["delta_u"].shape == steps.shape
    assert np.all(np.diff(np.asarray(traj.steps)) > 0)
    # the first Adam step moves every coordinate by lr·sign(g): ‖δ₁‖ = lr·√n exactly
    one = dynamics.run_optimizer(
        prob.ft_loss_fn, prob.theta_star, optax.adam(1e-3), np.array([1]), observe, lr=1e-3
    )
    np.testing.assert_allclose(one.observables["delta_norm"][0], 1e-3 * np.sqrt(12), rtol=1e-6)
