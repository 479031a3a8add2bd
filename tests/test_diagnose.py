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
from quartic.studies.diagnose import diagnose
from quartic.tasks import token_world as tw


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
            "quartic.harness.cli",
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


@pytest.fixture(scope="module")
def raw_checkpoint(tmp_path_factory):
    """A freshly initialised (not aligned) 300-parameter transformer of the seed-0 token world,
    saved the way ``quartic diagnose`` reads θ*: (checkpoint dir, world)."""
    from flax import nnx

    from quartic.models import Transformer, TransformerConfig
    from quartic.studies import training

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
    path = tmp_path_factory.mktemp("ckpt") / "raw"
    return training.save_theta_star(path, Transformer(cfg, rngs=nnx.Rngs(0)), meta), world


def _diagnose_argv(ckpt, out, *extra, data=("--task", "sort")):
    return ["diagnose", "--checkpoint", str(ckpt), *data, "--out", str(out), *extra]


@pytest.mark.slow
def test_cli_on_a_saved_model_that_is_not_aligned_warns_and_shows_the_linear_term(
    raw_checkpoint, tmp_path, capsys
):
    """A freshly initialised transformer: its refusal loss has a large gradient, so the CLI must
    say the quartic law does not apply and report the linear rate. The fine-tuning data come as
    the user's own file (``--data``; the sort task's rows, which ``load_batch`` reads back exactly)."""
    from quartic.harness import cli

    ckpt, world = raw_checkpoint
    data = _save(tmp_path / "sort.npz", **world.task("sort", "train"))
    argv = _diagnose_argv(
        ckpt,
        tmp_path / "out",
        "--loss",
        "refusal",
        "--lr",
        "0.01",
        "--horizon",
        "20",
        "--rank",
        "4",
        data=("--data", str(data)),
    )
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "not at an aligned optimum" in out and "no quartic law applies" in out
    assert "linear term dominates" in out
    assert (tmp_path / "out" / "diagnosis.json").exists()


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_batch_reads_both_formats_exactly(tmp_path):
    world = tw.TokenWorld(tw.WorldConfig(seed=0))
    b = world.task("sort", "train")
    got = tw.load_batch(_save(tmp_path / "b.npz", **b), world.vocab_size, world.config.seq_len)
    for k in ("tokens", "targets", "mask"):
        np.testing.assert_array_equal(got[k], b[k])
    # whole sequences: tokens / targets are the two shifts, the mask covers every non-PAD target
    seqs = np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)
    np.save(tmp_path / "s.npy", seqs)
    got = tw.load_batch(tmp_path / "s.npy", world.vocab_size, world.config.seq_len)
    np.testing.assert_array_equal(got["tokens"], b["tokens"])
    np.testing.assert_array_equal(got["targets"], b["targets"])
    np.testing.assert_array_equal(got["mask"], (b["targets"] != tw.PAD).astype(np.float32))
    # tokens alone: targets default to the left shift
    got = tw.load_batch(
        _save(tmp_path / "t.npz", tokens=seqs[:, :-1]), world.vocab_size, world.config.seq_len
    )
    np.testing.assert_array_equal(got["targets"][:, :-1], b["tokens"][:, 1:])
    assert (got["targets"][:, -1] == tw.PAD).all()


def _bad_data(tmp_path, world, kind):
    b = {k: np.asarray(v) for k, v in world.task("sort", "train").items()}
    if kind == "nan":
        tokens = b["tokens"].astype(np.float64)
        tokens[3, 4] = np.nan
        return _save(tmp_path / "d.npz", tokens=tokens)
    if kind == "nan_mask":
        b["mask"][0, 0] = np.nan
        return _save(tmp_path / "d.npz", **b)
    if kind == "out_of_vocab":
        b["tokens"][0, 0] = world.vocab_size
        return _save(tmp_path / "d.npz", **b)
    if kind == "fractional":
        return _save(tmp_path / "d.npz", tokens=b["tokens"] + 0.5)
    if kind == "shape":
        return _save(tmp_path / "d.npz", tokens=b["tokens"][:, :5])
    if kind == "no_tokens":
        return _save(tmp_path / "d.npz", ids=b["tokens"])
    if kind == "empty_mask":
        return _save(tmp_path / "d.npz", **{**b, "mask": np.zeros_like(b["mask"])})
    if kind == "not_numpy":
        (tmp_path / "d.npz").write_text("tokens,targets\n1,2\n")
        return tmp_path / "d.npz"
    return tmp_path / "missing.npz"


@pytest.mark.parametrize(
    "extra, data_kind, expected",
    [
        (("--rank", "100000"), None, "rank must be an integer with 1 <= rank < n"),
        (("--rank", "0"), None, "rank must be an integer with 1 <= rank < n"),
        (("--explained-variance", "1.5"), None, "explained_variance must be in (0, 1]"),
        (("--rank", "2", "--lr", "nan"), None, "lr must be a positive finite number, got nan"),
        (("--rank", "2", "--horizon", "0"), None, "horizon must be at least 1 step"),
        (("--rank", "2", "--category", "99"), None, "category must be in [0, "),
        (("--rank", "2", "--threshold", "-1"), None, "threshold must be positive"),
        (
            (
                "--rank",
                "2",
            ),
            "missing",
            "no data file",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "not_numpy",
            "could not read",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "nan",
            "'tokens' in",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "nan_mask",
            "'mask' in",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "out_of_vocab",
            "the model's vocabulary is [0, 34)",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "fractional",
            "must hold integer token ids, found 1.5",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "shape",
            "must have shape [examples, 12]",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "no_tokens",
            "has no 'tokens' array (it holds: ids)",
        ),
        (
            (
                "--rank",
                "2",
            ),
            "empty_mask",
            "zero everywhere",
        ),
        (("--rank", "2", "--task", "poetry"), None, "unknown task 'poetry'"),
        (("--rank", "2", "--data", "x.npz"), None, "not allowed with argument --task"),
        (
            (
                "--lr",
                "0.01",
            ),
            None,
            "one of the arguments --rank --explained-variance is required",
        ),
    ],
)
def test_cli_diagnose_bad_input_is_one_line(
    raw_checkpoint, tmp_path, capsys, extra, data_kind, expected
):
    from quartic.harness import cli

    ckpt, world = raw_checkpoint
    if "--lr" not in extra:
        extra = (*extra, "--lr", "0.01")
    if data_kind is not None:
        data = ("--data", str(_bad_data(tmp_path, world, data_kind)))
    elif "--task" in extra:
        data = ()
    else:
        data = ("--task", "sort")
    code = cli.main(_diagnose_argv(ckpt, tmp_path / "out", *extra, data=data))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("quartic: error: ") and "Traceback" not in err
    assert expected in lines[0], lines[0]
    if data_kind == "nan":
        assert "NaN or inf (1 entries)" in lines[0]
    assert not (tmp_path / "out").exists()
