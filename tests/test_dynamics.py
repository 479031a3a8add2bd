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
