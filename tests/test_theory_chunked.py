"""Row-chunked Taylor onsets (core.chunked.Chunked, accepted by theory.taylor_onset): the same coefficients as the whole batch, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quartic import QuarticError
from quartic.core import theory


def _problem(rows=48, n=30):
    """A smooth non-quadratic L_FT (a mean over rows) and L_A (a mean over other rows)."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x, y = jax.random.normal(k[0], (rows, n)), jax.random.normal(k[1], (rows,))
    a = jax.random.normal(k[2], (rows, n))
    ft = lambda th, x, y: jnp.mean(jnp.log1p(jnp.exp(jnp.tanh(x @ th) - y)))
    align = lambda th, a: jnp.mean(jnp.cos(a @ th) ** 2)
    align2 = lambda th, a: jnp.mean(jnp.sin(a @ th) ** 3)
    return ft, align, align2, x, y, a, 0.3 * jax.random.normal(k[3], (n,))


def test_chunked_onset_equals_the_whole_batch():
    """Uneven weights (a mean over 48 rows as 16 + 16 + 16 weighted 1/3, and as 24 + 24 of a
    reweighted mean) give c₁…c₆ and θ^{(k)}(0) of the unchunked flow to 1e-12 relative; a chunked
    and a plain alignment loss share one flow (taylor_onsets)."""
    ft, align, align2, x, y, a, th = _problem()
    ref = theory.taylor_onsets((align, align2), ft, th, 6, ((a,), (a,)), (x, y))
    ft_c = theory.Chunked.stack([(x[j::3], y[j::3]) for j in range(3)], [1 / 3] * 3)
    al_c = theory.Chunked.stack([(a[:24],), (a[24:],)], [0.5, 0.5])
    got = theory.taylor_onsets((align, align2), ft, th, 6, (al_c, (a,)), ft_c)
    for r, g in zip(ref, got, strict=True):
        c_r, c_g = np.asarray(r.coefficients), np.asarray(g.coefficients)
        assert np.all(np.abs(c_r) > 1e-8)  # all resolved: relative errors mean something
        np.testing.assert_allclose(c_g, c_r, rtol=1e-12, atol=0)
        d_r, d_g = np.asarray(r.flow_derivatives), np.asarray(g.flow_derivatives)
        assert np.abs(d_g - d_r).max() <= 1e-12 * np.abs(d_r).max()
    one = theory.taylor_onset(align, ft, th, 3, align_args=al_c, ft_args=(x, y))
    np.testing.assert_allclose(one.coefficients, ref[0].coefficients[:3], rtol=1e-12)


def test_chunked_rejects_bad_input():
    ft, align, _, x, y, a, th = _problem()
    halves = [(x[:24], y[:24]), (x[24:], y[24:])]
    with pytest.raises(QuarticError, match="one weight per chunk"):
        theory.Chunked.stack(halves, [1.0])
    with pytest.raises(QuarticError, match="equal shapes"):
        theory.Chunked.stack([(x[:20], y[:20]), (x[20:], y[20:])], [0.5, 0.5])
    with pytest.raises(QuarticError, match="not structured like"):
        theory.Chunked.stack([(x[:24], y[:24]), (x[24:],)], [0.5, 0.5])
    with pytest.raises(QuarticError, match="at least one chunk"):
        theory.Chunked.stack([], [])
    by_hand = theory.Chunked((x, y), jnp.ones(3) / 3)  # not stacked: 48 rows, 3 weights
    with pytest.raises(QuarticError, match="ft_args: a Chunked leaf"):
        theory.taylor_onset(align, ft, th, 2, align_args=(a,), ft_args=by_hand)
    with pytest.raises(QuarticError, match="align_args\\[0\\]"):
        theory.taylor_onset(align, ft, th, 2, align_args=theory.Chunked((a,), jnp.ones(2)))


def _random_setup():
    """A freshly initialised 2k transformer (chunking is exact at any θ: no training needed)."""
    from flax import nnx

    from quartic.models.transformer import Transformer, functional
    from quartic.studies import collapse, scaling
    from quartic.tasks import token_world as tw

    world = tw.TokenWorld(tw.WorldConfig(seed=0))
    model = Transformer(scaling.model_config("2k", world), rngs=nnx.Rngs(0))
    apply_fn, params = functional(model, nnx.Param)
    return collapse.CollapseSetup(apply_fn, params, world, 0)


def test_scaling_chunks_sum_to_the_batch_losses():
    """ft_chunks / kl_chunks weights make Σ_j w_j L_j the full batch's L_FT (masked mean, with a
    tilt) and KL drift to rounding; chunk sizes round down to a divisor of the rows."""
    from quartic.studies import scaling

    setup = _random_setup()
    th = setup.theta
    probe = th + 1e-2 * jax.random.normal(jax.random.PRNGKey(1), th.shape, th.dtype)
    batch = setup.task_batch("sort")
    shift = 1e-3 * jax.random.normal(jax.random.PRNGKey(2), th.shape, th.dtype)
    ft_data = (batch, shift, th)
    align_args, ft_args = scaling.taylor_args(setup, ft_data, 100)
    rows = batch["tokens"].shape[0]
    assert ft_args.parts[0][0]["tokens"].shape[:2] == (rows // 64, 64)  # 100 → 64 divides 256
    np.testing.assert_allclose(float(jnp.sum(ft_args.weights)), 1.0, rtol=1e-15)
    chunked = lambda fn, c: sum(
        w * fn(probe, *jax.tree_util.tree_map(lambda v, j=j: v[j], c.parts))
        for j, w in enumerate(c.weights)
    )
    kl = setup.align_fns["kl"]
    np.testing.assert_allclose(
        chunked(setup.ft_fn, ft_args), setup.ft_fn(probe, ft_data), rtol=1e-13
    )
    np.testing.assert_allclose(
        chunked(kl, align_args), kl(probe, setup.align_data["kl"]), rtol=1e-12
    )
    assert scaling.taylor_args(setup, ft_data, None) == ((setup.align_data["kl"],), (ft_data,))
    assert scaling.chunk_rows(2_000) is None and scaling.chunk_rows(10**6) >= 32
    empty = {**batch, "mask": batch["mask"].at[:8].set(0.0)}
    with pytest.raises(QuarticError, match="mask sum"):
        scaling.ft_chunks((empty, shift, th), 8)


@pytest.mark.slow
def test_chunked_onset_on_the_transformer():
    """The scaling study's chunked Taylor onset (64 task rows as 4 × 16, the KL drift's 384 rows as
    6 × 64) equals the unchunked one on a 2k transformer to 1e-12 relative (order 3)."""
    from quartic.studies import scaling

    setup = _random_setup()
    th = setup.theta
    ft_data = (setup.task_batch("sort", np.arange(64)), jnp.zeros_like(th), th)
    kl = setup.align_fns["kl"]
    ref = theory.taylor_onset(kl, setup.ft_fn, th, 3, *scaling.taylor_args(setup, ft_data, None))
    got = theory.taylor_onset(kl, setup.ft_fn, th, 3, *scaling.taylor_args(setup, ft_data, 16))
    c_r, c_g = np.asarray(ref.coefficients), np.asarray(got.coefficients)
    # c₁ = −∇L_Aᵀg = 0 at θ* (the KL drift's gradient vanishes): rounding on both sides
    assert abs(c_g[0]) <= 1e-12 * abs(c_r[1])
    np.testing.assert_allclose(c_g[1:], c_r[1:], rtol=1e-12)
    d_r, d_g = np.asarray(ref.flow_derivatives), np.asarray(got.flow_derivatives)
    assert np.abs(d_g - d_r).max() <= 1e-12 * np.abs(d_r).max()


@pytest.mark.slow
def test_chunked_aic_check_equals_the_whole_batch():
    """check_aic with both losses as scaling.chunked_loss and F as ChunkedGaussNewton (chunks of
    64 rows) gives every quantity of the whole-batch check to 1e-12 on a 2k transformer."""
    from quartic.core import aic
    from quartic.studies import scaling

    setup = _random_setup()
    th = setup.theta
    ft_data = (setup.task_batch("sort"), jnp.zeros_like(th), th)
    kw = dict(params=th, rank=10, method="lanczos", num_iters=60, fisher_trace=1.0)
    whole = aic.check_aic(**kw, **scaling.aic_args(setup, ft_data, None))
    chunked_kw = scaling.aic_args(setup, ft_data, 64)
    assert isinstance(chunked_kw["fisher"], scaling.ChunkedGaussNewton)
    chunked = aic.check_aic(**kw, **chunked_kw)
    for name in (
        "lambda_d",
        "ortho_norm",
        "gamma_fisher",
        "gamma_unweighted",
        "tail_mass",
        "crossover_time",
        "lambda_max_ft",
    ):
        np.testing.assert_allclose(
            getattr(chunked, name), getattr(whole, name), rtol=1e-12, err_msg=name
        )
    np.testing.assert_allclose(chunked.eigenvalues[:10], whole.eigenvalues[:10], rtol=1e-12)
    t_whole, t_chunked = np.asarray(whole.forecast.taylor()), np.asarray(chunked.forecast.taylor())
    np.testing.assert_allclose(t_chunked[1:], t_whole[1:], rtol=1e-12)  # c₁ = 0: rounding


def test_the_onsets_fast_compiled_program_gives_plain_jits_coefficients(monkeypatch):
    """The onset program is compiled with core.jit's fast-compile options (other machine code, the
    same program): c₁…c₆ and θ^{(k)}(0) equal those of the program compiled with XLA's default
    options to 1e-12 relative in float64 (rounding only)."""
    from quartic.core import jit

    if jit.fast_compile_options() is None:
        pytest.skip("this backend or jaxlib compiles the onset with XLA's defaults: one program")
    ft, align, align2, x, y, a, th = _problem()
    fast = theory.taylor_onsets((align, align2), ft, th, 6, ((a,), (a,)), (x, y))
    compiled = []
    # XLA's own defaults, named: the suite's XLA_FLAGS (conftest) set the fast ones process-wide
    xla_default = {"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 2}
    plain_jit = lambda f: compiled.append(f) or jax.jit(f, compiler_options=xla_default)
    monkeypatch.setattr(theory, "compile_bound_jit", plain_jit)
    theory._taylor_fn.cache_clear()
    plain = theory.taylor_onsets((align, align2), ft, th, 6, ((a,), (a,)), (x, y))
    theory._taylor_fn.cache_clear()  # later tests get the fast program back
    assert len(compiled) == 1  # the plain program was built, not read from the memo
    for f, p in zip(fast, plain, strict=True):
        c_f, c_p = np.asarray(f.coefficients), np.asarray(p.coefficients)
        assert np.all(np.abs(c_p) > 1e-8)
        np.testing.assert_allclose(c_f, c_p, rtol=1e-12, atol=0)
        d_f, d_p = np.asarray(f.flow_derivatives), np.asarray(p.flow_derivatives)
        assert np.abs(d_f - d_p).max() <= 1e-12 * np.abs(d_p).max()


@pytest.mark.parametrize("kind", ["fast", "lean"])
def test_compile_options_apply_on_a_known_jaxlib_and_cpu_only(monkeypatch, kind):
    """Both option sets of quartic.core.jit (the onset's fast ones, the AIC check's lean ones)."""
    from quartic.core import jit

    options = getattr(jit, f"{kind}_compile_options")
    monkeypatch.setattr(jit.jaxlib, "__version__", "0.10.2")
    monkeypatch.setattr(jit.jax, "default_backend", lambda: "cpu")
    assert options() == getattr(jit, f"{kind.upper()}_COMPILE_OPTIONS")
    monkeypatch.setattr(jit.jax, "default_backend", lambda: "gpu")
    assert options() is None
    monkeypatch.setattr(jit.jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(jit.jaxlib, "__version__", "0.12.0")
    assert options() is None


def test_the_onset_runs_inside_another_jit():
    """Traced inputs (the forecast study's scan calls it so): the onset joins the outer program,
    whose compile options apply (per-program options are for top-level programs only), with the
    coefficients of the top-level call to rounding."""
    ft, align, _, x, y, a, th = _problem()
    top = theory.taylor_onset(align, ft, th, 4, (a,), (x, y)).coefficients
    inner = jax.jit(lambda t: theory.taylor_onset(align, ft, t, 4, (a,), (x, y)).coefficients)
    np.testing.assert_allclose(inner(th), top, rtol=1e-12, atol=0)
