"""Sharded sweeps and dense Hessians on 4 (simulated) devices equal the single-device results.

The device count must be fixed before JAX initialises, so the check runs in a fresh subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; it prints one JSON line of measured
differences, which the test asserts on.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quartic.core.errors import QuarticError
from quartic.harness import distributed

# The work both checks share: 3 seeds x 2 loss scales of gradient-flow trajectories on random
# quadratic problems (6 runs: not a multiple of the device count, so the sweep pads), and the dense
# Hessian of a non-quadratic loss with n = 30 (padded with zero columns).
COMMON = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    import jax.numpy as jnp
    import numpy as np
    from quartic.core import curvature, dynamics, problems
    from quartic.harness import distributed

    spec = problems.QuadraticSpec(n=8, d=2)
    times = dynamics.log_times(1e-3, 1e-1, 6)

    def run(key, scale):
        prob, basis = problems.make_quadratic(key, spec)
        observe = dynamics.make_observer(prob.align_loss_fn, prob.theta_star, basis,
                                         delta_u_fn=prob.delta_u)
        ft = lambda th: scale * prob.ft_loss_fn(th)
        traj = dynamics.gradient_flow(ft, prob.theta_star, times, observe, substeps=4)
        return traj.observables["delta_u"], traj.theta

    def grid():
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        return distributed.product(keys, np.array([0.5, 1.0]))

    def hessian_problem():
        a = jax.random.normal(jax.random.PRNGKey(1), (40, 30), jnp.float64) / 5.0
        loss = lambda th: jnp.sum(jnp.log(jnp.cosh(a @ th))) + 0.25 * jnp.sum(th * th) ** 2
        return loss, jax.random.normal(jax.random.PRNGKey(2), (30,), jnp.float64)
    """
)

SCRIPT = COMMON + textwrap.dedent(
    """
    out = {"device_count": jax.device_count()}
    k_grid, s_grid = grid()
    du_s, th_s = distributed.sweep(run, k_grid, s_grid)
    du_1, th_1 = jax.jit(jax.vmap(run))(jnp.asarray(k_grid), jnp.asarray(s_grid))
    out["sweep_shape"] = list(du_s.shape)
    out["sweep_devices"] = distributed.shard_info(du_s)["num_devices"]
    out["sweep_diff"] = float(max(np.abs(np.asarray(du_s) - np.asarray(du_1)).max(),
                                  np.abs(np.asarray(th_s) - np.asarray(th_1)).max()))
    out["sweep_scale"] = float(np.abs(np.asarray(du_1)).max())
    loss, theta = hessian_problem()
    h_s = distributed.sharded_dense_hessian(loss, theta, chunk_size=4)
    h_1 = jax.jit(lambda th: curvature.dense_hessian(loss, th, 4))(theta)
    h_ref = jax.hessian(loss)(theta)
    out["hess_devices"] = distributed.shard_info(h_s)["num_devices"]
    out["hess_diff"] = float(np.abs(np.asarray(h_s) - np.asarray(h_1)).max())
    out["hess_oracle_diff"] = float(np.abs(np.asarray(h_s) - np.asarray(h_ref)).max())
    out["hess_scale"] = float(np.abs(np.asarray(h_1)).max())
    out["hess_shape"] = list(h_s.shape)
    print("RESULT " + json.dumps(out))
    """
)

# One of two processes (2 host devices each) of a multi-process job on this machine, joined through
# quartic.harness.distributed.initialize (jax.distributed: a coordinator on localhost, CPU collectives).
WORKER = COMMON + textwrap.dedent(
    """
    import sys
    pid, port = int(sys.argv[1]), sys.argv[2]
    assert distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                                  initialization_timeout=120)
    k_grid, s_grid = grid()
    du, th = distributed.to_host(distributed.sweep(run, k_grid, s_grid))
    loss, theta = hessian_problem()
    h = distributed.to_host(distributed.sharded_dense_hessian(loss, theta, chunk_size=4))
    out = {"pid": pid, "processes": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "du": np.asarray(du).tolist(),
           "theta": np.asarray(th).tolist(), "hessian": np.asarray(h).tolist()}
    print("RESULT " + json.dumps(out))
    """
)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _result(stdout: str) -> dict:
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def four_devices():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=_env(4), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout)


@pytest.mark.slow
def test_subprocess_sees_four_devices(four_devices):
    assert four_devices["device_count"] == 4
    assert four_devices["sweep_devices"] == 4


def test_sharded_sweep_equals_one_device(four_devices):
    r = four_devices
    assert r["sweep_shape"] == [6, 6]
    assert r["sweep_scale"] > 1e-10  # a real signal, not zeros
    assert r["sweep_diff"] <= 1e-12


def test_sharded_dense_hessian_equals_one_device(four_devices):
    r = four_devices
    assert r["hess_shape"] == [30, 30]
    assert r["hess_scale"] > 1.0
    assert r["hess_devices"] == 4
    assert r["hess_diff"] <= 1e-12
    assert r["hess_oracle_diff"] <= 1e-10


def test_product_orders_last_axis_fastest():
    a, b = distributed.product(np.arange(3), np.array([10.0, 20.0]))
    np.testing.assert_array_equal(a, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(b, [10.0, 20.0] * 3)


def test_sweep_on_one_device_matches_vmap_and_rejects_ragged_inputs():
    fn = lambda x, y: jnp.sin(x) * y
    x = jnp.linspace(0.0, 1.0, 5)
    y = jnp.arange(5.0)
    np.testing.assert_allclose(distributed.to_host(distributed.sweep(fn, x, y)), jax.vmap(fn)(x, y))
    # a second sweep of the same function reuses the compiled program
    hits = distributed._sweep_program.cache_info().hits
    again = distributed.to_host(distributed.sweep(fn, x + 1.0, y))
    assert distributed._sweep_program.cache_info().hits == hits + 1
    np.testing.assert_allclose(again, jax.vmap(fn)(x + 1.0, y))
    with pytest.raises(QuarticError, match="leading"):
        distributed.sweep(fn, x, jnp.arange(4.0))


def test_initialize_is_a_noop_without_a_cluster(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("QUARTIC_DISTRIBUTED", raising=False)
    assert distributed.initialize() is False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process():
    """A real multi-process job: two processes of 2 host devices each, joined by
    ``distributed.initialize`` (jax.distributed), sweep and dense Hessian over all 4 devices; each
    process gathers the whole result, and both equal the single-process vmap / oracle to 1e-12."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(pid), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(2),
        )  # fmt: skip
        for pid in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    results = [_result(out) for out, _ in outs]
    ns: dict = {}
    exec(COMMON, ns)  # the same problems, computed here on one device
    k_grid, s_grid = ns["grid"]()
    du_1, th_1 = jax.jit(jax.vmap(ns["run"]))(jnp.asarray(k_grid), jnp.asarray(s_grid))
    loss, theta = ns["hessian_problem"]()
    h_ref = jax.hessian(loss)(theta)
    for r in results:
        assert (r["processes"], r["devices"], r["local_devices"]) == (2, 4, 2)
        assert np.abs(np.asarray(du_1)).max() > 1e-10  # a real signal, not zeros
        np.testing.assert_allclose(r["du"], du_1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(r["theta"], th_1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(r["hessian"], h_ref, rtol=0, atol=1e-10)
    assert results[0]["du"] == results[1]["du"] and results[0]["hessian"] == results[1]["hessian"]
