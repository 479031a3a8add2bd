"""The hot paths compile once: repeated calls with new values (same shapes) reuse the executable.

Compilations are counted from JAX's own ``backend_compile`` events, and traces by a Python side
effect in the traced function, so a retrace that happens to hit a cache is caught as well.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quartic.core import curvature, dynamics, problems

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_counters: list[list[int]] = []


def _listener(name, _duration, **_):
    if name == _COMPILE_EVENT:
        for c in _counters:
            c[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compiles():
    c = [0]
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def _mlp_loss(theta, x):
    """A small non-quadratic flat loss: ``mean(tanh(x W1) w2)²`` with ``theta = [W1 (4x6), w2 (6)]``."""
    w1 = jnp.reshape(theta[:24], (4, 6))
    w2 = theta[24:]
    return jnp.mean((jnp.tanh(x @ w1) @ w2) ** 2)


def test_jitted_hvp_closure_compiles_once():
    traces = [0]

    @jax.jit
    def hvp(theta, v, x):
        traces[0] += 1
        return curvature.hvp(_mlp_loss, theta, v, x)

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (16, 4), jnp.float64)
    theta = jax.random.normal(jax.random.fold_in(key, 1), (30,), jnp.float64)
    args = [(theta + i, jnp.roll(theta, i), x + i) for i in range(5)]  # eager ops compile too
    hvp(*args[0]).block_until_ready()
    with count_compiles() as c:
        outs = jax.block_until_ready([hvp(*a) for a in args])
    assert c[0] == 0
    assert traces[0] == 1
    assert hvp._cache_size() == 1
    # and it computes real, changing numbers
    assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-6


def test_jitted_lanczos_compiles_once():
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 4), jnp.float64)

    @jax.jit
    def top(theta):
        mv = curvature.hvp_fn(lambda th: _mlp_loss(th, x), theta)
        return curvature.lanczos_eigh(mv, 30, 3, 1, num_iters=20, dtype=theta.dtype).top.values

    thetas = [jax.random.normal(jax.random.PRNGKey(i), (30,), jnp.float64) for i in range(4)]
    top(thetas[0]).block_until_ready()
    with count_compiles() as c:
        vals = [np.asarray(top(t)) for t in thetas[1:]]
    assert c[0] == 0
    assert top._cache_size() == 1
    assert not np.allclose(vals[0], vals[1])


def test_jitted_trajectory_compiles_once_across_problems():
    """One compiled gradient-flow run serves every problem of a shape (problems are pytrees)."""
    spec = problems.QuadraticSpec(n=10, d=2)
    times = dynamics.log_times(1e-3, 1e-1, 5)
    traces = [0]

    @jax.jit
    def run(prob, basis):
        traces[0] += 1
        obs = dynamics.make_observer(
            prob.align_loss_fn, prob.theta_star, basis, delta_u_fn=prob.delta_u
        )
        return dynamics.gradient_flow(prob.ft_loss_fn, prob.theta_star, times, obs, substeps=2)

    probs = [problems.make_quadratic(jax.random.PRNGKey(i), spec) for i in range(4)]
    run(*probs[0]).observables["delta_u"].block_until_ready()
    with count_compiles() as c:
        outs = [np.asarray(run(*p).observables["delta_u"]) for p in probs[1:]]
    assert c[0] == 0
    assert traces[0] == 1
    assert run._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])


def test_train_step_compiles_once_across_calls():
    from quartic.core import train as training

    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4), jnp.float64)
    data = {"x": x, "y": jnp.sin(x[:, 0])}

    def loss_fn(params, batch):
        pred = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
        return jnp.mean((pred - batch["y"]) ** 2)

    params = {"w": 0.3 * jnp.ones((4, 6), jnp.float64), "v": 0.1 * jnp.ones((6,), jnp.float64)}
    opt = optax.adam(1e-2)
    kw = dict(n_steps=20, batch_size=16, chunk_size=10, progress=False)
    first = training.train(loss_fn, params, data, opt, key=jax.random.PRNGKey(1), **kw)
    with count_compiles() as c:
        second = training.train(loss_fn, first.params, data, opt, key=jax.random.PRNGKey(2), **kw)
        training.train(loss_fn, params, data, opt, key=jax.random.PRNGKey(3), **kw)
    assert c[0] == 0
    assert second.losses.shape == (20,)
    assert second.losses[-1] < first.losses[0]
