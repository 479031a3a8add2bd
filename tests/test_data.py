"""Loaders: a loss over many equal batches is the full-data loss, exactly, through every measurement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic.core import data
from quartic.core.errors import QuarticError
from quartic.studies.diagnose import diagnose


def _net_loss(params, batch):
    pred = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
    return jnp.mean((pred - batch["y"]) ** 2)


def _setup():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(3, 4)) / 2, "w2": rng.normal(size=(4,))}
    full = {"x": rng.normal(size=(64, 3)), "y": rng.normal(size=(64,))}
    align = {"x": rng.normal(size=(32, 3)), "y": rng.normal(size=(32,))}
    return params, full, align


def _loader(full, size=16):  # a generator: consumed once, like a real loader
    for i in range(0, len(full["y"]), size):
        yield {k: v[i : i + size] for k, v in full.items()}


def test_mean_over_equal_batches_is_the_full_data_loss_and_its_derivatives():
    params, full, _ = _setup()
    loss, stacked = data.over_batches(_net_loss, _loader(full))
    assert stacked["x"].shape == (4, 16, 3)
    np.testing.assert_allclose(loss(params, stacked), _net_loss(params, full), rtol=1e-14)
    g_all = jax.grad(loss)(params, stacked)
    g_full = jax.grad(_net_loss)(params, full)
    for k in params:
        np.testing.assert_allclose(g_all[k], g_full[k], rtol=1e-13, atol=1e-15)
    # the same loss function object each time (compiled callers cache on it)
    assert data.over_batches(_net_loss, _loader(full))[0] is loss


def test_diagnose_from_a_loader_equals_diagnose_from_the_arrays():
    params, full, align = _setup()
    loss, stacked = data.over_batches(_net_loss, _loader(full))
    common = dict(lr=1e-3, horizon=30, rank=2, align_batch=align, run=True)
    a = diagnose(_net_loss, _net_loss, params, ft_batch=full, **common)
    b = diagnose(_net_loss, loss, params, ft_batch=stacked, **common)
    np.testing.assert_allclose(b.forecast, a.forecast, rtol=1e-10)
    np.testing.assert_allclose(b.actual, a.actual, rtol=1e-10)
    for name in ("gamma_fisher", "gamma_unweighted", "ortho_norm", "lambda_max_ft"):
        np.testing.assert_allclose(getattr(b.report, name), getattr(a.report, name), rtol=1e-10)
    # and check_aic takes it as well
    r = q.check_aic(_net_loss, loss, params, 2, align_batch=align, ft_batch=stacked)
    np.testing.assert_allclose(r.gamma_fisher, a.report.gamma_fisher, rtol=1e-10)


@pytest.mark.parametrize(
    "batches, match",
    [
        ([], "yielded no batches"),
        (
            [{"x": np.ones((4, 3))}, {"x": np.ones((3, 3))}],
            "batch 1 of the loader has leaf 0 of shape",
        ),
        ([{"x": np.ones((4, 3))}, {"z": np.ones((4, 3))}], "another structure"),
        ([{"x": np.ones((4, 3))}, {"x": np.full((4, 3), np.nan)}], "batch 1 of the loader has NaN"),
    ],
)
def test_bad_loaders_are_named(batches, match):
    with pytest.raises(QuarticError, match=match):
        data.stack_batches(batches)


def test_max_batches_stops_an_endless_loader():
    def endless():
        while True:
            yield {"x": np.zeros(2)}

    assert data.stack_batches(endless(), max_batches=3)["x"].shape == (3, 2)
    with pytest.raises(QuarticError, match="max_batches"):
        data.stack_batches(endless(), max_batches=0)
