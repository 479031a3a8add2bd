"""quartic diagnose: forecast against a real run, the premise warning, one-line CLI errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic import QuarticError
from quartic.diagnose import diagnose


def test_forecast_agrees_with_the_run_inside_the_expansion():
    prob, _ = q.make_quadratic(
        jax.random.PRNGKey(0), q.QuadraticSpec(n=20, d=2, tail=0.01, leak=0.05)
    )
    d = diagnose(
        prob.align_loss_fn,
        prob.ft_loss_fn,
        prob.theta_star,
        lr=1e-4,
        horizon=200,
        explained_variance=0.99,
        threshold=1e-8,
        run=True,
    )
    assert d.rank == 2 and d.explained_variance >= 0.99
    assert d.parting_step is None  # t·λ_max ≤ 0.1 over the horizon: within 10 % everywhere
    np.testing.assert_allclose(d.forecast[5:], d.actual[5:], rtol=0.1)
    assert (d.forecast_crossing_step is None) == (d.actual_crossing_step is None)
    assert "agree within 10 %" in str(d)


def test_non_aligned_model_gets_the_linear_warning():
    prob, _ = q.make_quadratic(jax.random.PRNGKey(1), q.QuadraticSpec(n=12, d=2))
    shift = 0.2 * jnp.ones(12)
    la = lambda th: prob.align_loss_fn(th - shift)
    d = diagnose(la, prob.ft_loss_fn, prob.theta_star, lr=1e-3, horizon=50, rank=2)
    assert not d.premise_holds
    assert "linear term dominates" in str(d)
    assert any("no quartic law applies" in w for w in d.report.warnings)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=2, explained_variance=0.9), "exactly one"),
        (dict(rank=2, lr=-1.0), "lr"),
        (dict(rank=2, horizon=0), "horizon"),
        (dict(rank=50), "rank"),
    ],
)
def test_bad_input(kwargs, match):
    prob, _ = q.make_quadratic(jax.random.PRNGKey(1), q.QuadraticSpec(n=12, d=2))
    base = dict(lr=1e-3, horizon=10)
    with pytest.raises(QuarticError, match=match):
        diagnose(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, **{**base, **kwargs})


def test_cli_missing_checkpoint_is_one_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "quartic.cli",
            "diagnose",
            "--checkpoint",
            "/nonexistent/x",
            "--task",
            "sort",
            "--lr",
            "0.1",
            "--rank",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no θ* checkpoint" in lines[0]


def test_cli_on_a_saved_model_that_is_not_aligned_warns_and_shows_the_linear_term(tmp_path, capsys):
    """A freshly initialised transformer saved as a checkpoint: its refusal loss has a large
    gradient, so the CLI must say the quartic law does not apply and report the linear rate."""
    from flax import nnx

    from quartic import cli, training
    from quartic.models import Transformer, TransformerConfig
    from quartic.tasks import token_world as tw

    world = tw.TokenWorld(tw.WorldConfig(seed=0))
    cfg = TransformerConfig(
        vocab_size=world.vocab_size,
        seq_len=world.config.seq_len,
        d_model=4,
        n_heads=1,
        n_layers=1,
        d_ff=8,
        param_dtype="float64",
    )
    meta = {"model_config": cfg.to_dict(), "world_config": json.loads(world.config.to_json())}
    ckpt = training.save_theta_star(tmp_path / "raw", Transformer(cfg, rngs=nnx.Rngs(0)), meta)
    argv = [
        "diagnose",
        "--checkpoint",
        str(ckpt),
        "--task",
        "sort",
        "--loss",
        "refusal",
        "--lr",
        "0.01",
        "--horizon",
        "20",
        "--rank",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "not at an aligned optimum" in out and "no quartic law applies" in out
    assert "linear term dominates" in out
    assert (tmp_path / "out" / "diagnosis.json").exists()
