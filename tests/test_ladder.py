"""The ablation ladder measured, and the window of slope 4 predicted from θ* (quartic.studies.ladder)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quartic as q
from quartic.core import measure, theory
from quartic.harness import cli
from quartic.harness.runs import RunDir
from quartic.studies import ablation, ladder

BASE = q.QuadraticSpec(n=30, d=3, coupling=1.0)


@pytest.fixture(scope="module")
def exp():
    return cli.load_experiment("ablation_ladder")


@pytest.fixture(scope="module")
def cfg(exp):
    """The experiment on BASE's shapes, small: the smoke test reuses the compiled programs."""
    return exp.Config(
        n=BASE.n, d=BASE.d, points_per_decade=20, phase_num=3, phase_seeds=(0,), check_aic=False
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_ladder_exponents_on_the_quadratic_family(exp, cfg, seed):
    """Each rung's onset exponent (and the slope after t×) within 0.1 of theory.LADDER, fitted on
    two decades of t ending at min(10⁻³/λ_max, t×/100); after t× on the predicted window."""
    rungs = ablation.ladder_quadratic(dataclasses.replace(cfg, seed=seed))["rungs"]
    assert [r for r in rungs] == [name for name, _, _ in ladder.RUNGS]
    for name, onset, late in ladder.RUNGS:
        r = rungs[name]
        assert r["onset_predicted"] == onset and r["late_predicted"] == late
        assert r["taylor_onset"] == onset, name  # the exact Taylor coefficients agree
        if onset is None:
            # Δu ≡ 0: rounding only, n (ε t ‖g‖)² λ₁
            assert r["max_abs_delta_u"] <= r["machine_bound"] < 1e-28, name
            continue
        assert len(r["onset_window"]) == 2
        # measured deviations 1e-5 .. 1.8e-3 (the leak's t⁴ term): about 3× the largest
        assert abs(r["onset_measured"] - onset) < 0.005, (name, r["onset_measured"])
        if late is None:
            continue
        lo, hi = r["window_predicted"]
        assert math.log10(hi / lo) > 1.0, name  # leak 1e-6 leaves a window of over a decade
        assert abs(r["late_measured"] - late) < 0.1, (name, r["late_measured"])
        assert r["late_max_slope_dev"] <= 0.1 + 1e-3  # the local slope stays in 4 ± tol there
        # where the slope passes 3 (= (2 + 4)/2) is t× = 2√(gᵀFg)/‖F½Hg‖
        assert r["t_cross_measured"] == pytest.approx(r["t_cross_predicted"], rel=0.01), name


def test_crossover_slope_is_exactly_three_with_the_cubic_term():
    """½At² − ½Ct³ + (B/8)t⁴ has local slope 3 at t× = 2√(A/B) for any C: why slope 3 locates t×."""
    for a, b, c in [(1.0, 1.0, 0.0), (1.0, 4.0, 0.7), (2e-8, 3.0, -1e-4)]:
        coeffs = np.array([0.0, a / 2, -c / 2, b / 8])
        tx = 2 * math.sqrt(a / b)
        np.testing.assert_allclose(ladder.series_slope(coeffs, np.array([tx])), 3.0, rtol=1e-12)


def test_series_slope_and_crossing_time_oracles():
    t = np.geomspace(1e-3, 1e3, 601)
    s = ladder.series_slope(np.array([0.0, 1.0, 0.0, 1.0]), t)  # t² + t⁴: slope 2 → 4
    np.testing.assert_allclose(s, (2 + 4 * t**2) / (1 + t**2), rtol=1e-12)
    cross = lambda lvl: measure.crossing_time(t, s, lvl, scale="log_t", rising=True)  # noqa: E731
    assert cross(3.0) == pytest.approx(1.0, rel=1e-4)
    assert cross(5.0) == math.inf
    # t⁴ + t⁵ at t = 1e-100: t⁴ underflows, the factored form does not
    s = ladder.series_slope(np.array([0.0, 0.0, 0.0, 1.0, 1.0]), np.array([1e-100]))
    assert s[0] == pytest.approx(4.0)


@jax.jit
def _taylor_ad(prob):
    return theory.taylor_onset(prob.align_loss_fn, prob.ft_loss_fn, prob.theta_star, order=5)


def test_quadratic_taylor_equals_taylor_mode_ad():
    for spec in (BASE, q.QuadraticSpec(n=30, d=3, leak=1e-3, tail=0.01)):
        prob, _ = q.make_quadratic(jax.random.PRNGKey(1), spec)
        closed = ladder.quadratic_taylor(prob, 5)
        ad = _taylor_ad(prob)
        c, cad = np.asarray(closed.coefficients), np.asarray(ad.coefficients)
        np.testing.assert_allclose(c[3:], cad[3:], rtol=1e-11)
        np.testing.assert_allclose(c, cad, rtol=1e-9, atol=1e-14 * np.abs(cad).max())
        np.testing.assert_allclose(closed.flow_derivatives, ad.flow_derivatives, atol=1e-10)


def _onset_order(prob):
    taylor = ladder.quadratic_taylor(prob, 6)
    fact = np.array([math.factorial(k) for k in range(1, 7)], float)
    floor = ladder.taylor_rounding_floor(
        np.asarray(taylor.flow_derivatives) / fact[:, None],
        lambda v: jnp.sqrt(2 * prob.delta_u(v)),
        float(prob.fisher_values.max()),
    )
    return ladder.onset_from_coefficients(taylor.coefficients, floor)


def test_rounding_floor_tells_a_tiny_leak_from_rounding():
    """c₂ ∝ ‖Pg‖² = 1e-14 is genuine; c₃ ≈ 1e-17 with Pg = 0 is rounding (a relative threshold
    against the largest coefficient gets one of the two wrong)."""
    specs = ladder.ladder_specs(BASE, leak=1e-7, tail=1e-12)
    expect = {name: onset for name, onset, _ in ladder.RUNGS}
    for name, spec in specs.items():
        prob, _ = q.make_quadratic(jax.random.PRNGKey(2), spec)
        assert _onset_order(prob) == expect[name], name
    prob, _ = q.make_quadratic(jax.random.PRNGKey(2), specs["first_order_leak"])
    c = np.abs(np.asarray(ladder.quadratic_taylor(prob, 6).coefficients))
    assert c[1] / c.max() < 1e-12  # so small that TaylorOnset.onset's relative rule misses it
    assert theory.TaylorOnset(jnp.asarray(c), jnp.zeros((1,))).onset()[0] != 2


def test_next_order_window_edge_is_tol_over_next_order_slope():
    """With Pg = 0: c₅/c₄ = theory.next_order_slope(a, b), so the right edge is tol/|s|."""
    prob, basis = q.make_quadratic(jax.random.PRNGKey(4), BASE)
    h, g = prob.ft_hessian, prob.ft_grad
    sq = jnp.sqrt(prob.fisher_values[: BASE.d])
    a, b = sq * (basis.T @ (h @ g)), sq * (basis.T @ (h @ (h @ g)))
    s = float(theory.next_order_slope(a, b))
    c = np.asarray(ladder.quadratic_taylor(prob, 6).coefficients)
    assert c[4] / c[3] == pytest.approx(s, rel=1e-10)
    t = np.geomspace(1e-8, 1.0, 200)
    win = ladder.next_order_window(c, t, 0.1)
    assert win.lo == t[0] and win.hi == pytest.approx(0.1 / abs(s), rel=1e-12)
    lead = ladder.leading_order_window(0.0, s, 0.1)
    assert lead.lo == 0 and lead.width == math.inf
    lead = ladder.leading_order_window(1e-4, s, 0.1)
    assert lead.lo == pytest.approx(1e-4 * math.sqrt(19))


def test_family_grid_cells_are_the_generator_s_problems():
    leaks, couplings = np.array([1e-4, 1e-2]), np.array([0.1, 1.0, 2.0])
    probs, _ = ladder.family_grid(jax.random.PRNGKey(5), BASE, leaks, couplings)
    assert probs.ft_grad.shape == (6, BASE.n)
    i = 0
    for leak in leaks:
        for coupling in couplings:
            spec = q.QuadraticSpec(n=30, d=3, leak=float(leak), coupling=float(coupling))
            ref, _ = q.make_quadratic(jax.random.PRNGKey(5), spec)
            np.testing.assert_array_equal(probs.ft_hessian[i], ref.ft_hessian)
            np.testing.assert_array_equal(probs.ft_grad[i], ref.ft_grad)
            i += 1


def test_phase_classifier_far_from_the_boundary():
    """Hand-picked cells, far on either side: measured and all predictions agree."""
    spec = q.QuadraticSpec(n=30, d=3)
    cells = ladder.phase_cells(
        jax.random.PRNGKey(1), spec, np.array([1e-7, 1e-4, 1e-2]), np.array([0.01, 2.0]), tol=0.1
    )
    width = {(c.leak, c.coupling): c for c in cells}
    deep = width[(1e-7, 2.0)]  # tiny leak, strong coupling: a window of ~3 decades
    for w in (deep.measured, deep.taylor, deep.next_order, deep.leading):
        assert w.width > 2.0, deep
    for key in [(1e-2, 0.01), (1e-2, 2.0), (1e-4, 0.01)]:  # leak dominates until t·λ ~ 1
        c = width[key]
        for w in (c.measured, c.taylor, c.next_order, c.leading):
            assert w.width < 0.5, c
    # the measured edges follow the Taylor prediction
    assert abs(math.log10(deep.measured.hi / deep.taylor.hi)) < 0.1
    assert abs(math.log10(deep.measured.lo / deep.taylor.lo)) < 0.1


def test_agreement_counts_and_boundary_adjacency():
    pred = np.array([[3.0, 2.0, 0.5], [2.0, 0.8, -np.inf], [0.2, -np.inf, -np.inf]])
    meas = pred.copy()
    meas[0, 2] = 1.2  # next to the boundary (its neighbour (0, 1) is predicted ≥ 1)
    meas[2, 2] = 1.5  # far: every neighbour is predicted < 1
    out = ladder.agreement(meas, pred, 1.0)
    assert out["fraction_agree"] == pytest.approx(7 / 9)
    near = {tuple(r["cell"]): r["next_to_boundary"] for r in out["disagree"]}
    assert near == {(0, 2): True, (2, 2): False}
    assert not out["all_disagreements_next_to_boundary"]
    with pytest.raises(q.QuarticError):
        ladder.agreement(meas, pred[:2], 1.0)


def test_ladder_specs_need_an_aic_base():
    with pytest.raises(q.QuarticError, match="satisfy the AIC"):
        ladder.ladder_specs(q.QuadraticSpec(leak=0.1), 1e-6, 1e-10)


def test_ablation_ladder_smoke(tmp_path, monkeypatch, exp, cfg):
    mod, config = exp, cfg
    summary = mod.run(config, tmp_path)
    saved = RunDir(tmp_path).read_summary()
    assert saved == summary and summary["n_failed"] == 0
    # the rungs' slopes are checked once, in test_ladder_exponents_on_the_quadratic_family
    assert summary["quadratic_ladder_ok"]
    quad = summary["quadratic"]
    assert quad["first_order_leak"]["t_cross_measured"] == pytest.approx(
        quad["first_order_leak"]["t_cross_predicted"], rel=0.05
    )
    assert quad["no_coupling"]["max_abs_delta_u"] <= quad["no_coupling"]["machine_bound"]
    # on the curved family ∇²φ[g, g] reaches M at order t²: PHg = 0 and no coupling both give
    # onset 4 (the exact Taylor-mode order), not 6 and ≡ 0; the leak still gives 2
    curved = summary["curved"]
    expect = {"phg_zero": 4, "no_coupling": 4, "first_order_leak": 2, "quartic": 4}
    assert {k: curved[k]["onset_predicted"] for k in expect} == expect
    assert curved["phg_zero"]["ladder_predicted"] == 6
    assert summary["curved_max_exponent_error"] < 0.1
    # the 3 × 3 phase diagram: every cell's measured onset agrees with the Taylor boundary
    # (1.0 measured), and a disagreement anywhere must sit next to the boundary
    assert summary["phase_agreement_taylor"] == 1.0
    assert summary["phase_disagreements_next_to_boundary_taylor"] is True
    assert summary["phase"]["0"]["taylor"]["num_cells"] == 9
    assert len(RunDir(tmp_path).read_metrics()) > 0
    paths = mod.plot(tmp_path, tmp_path)
    assert [p.name for p in paths] == ["ablation_ladder.png"] and paths[0].stat().st_size > 10_000
    rows = mod.table(summary)
    assert any(r["quantity"].startswith("phg_zero") and r["verdict"] == "ok" for r in rows)

    # a rerun skips every finished unit: the unit functions must not be called again
    def boom(*args, **kwargs):
        raise AssertionError("a finished unit was recomputed")

    for fn in ("ladder_quadratic", "ladder_curved", "phase_seed"):
        monkeypatch.setattr(mod, fn, boom)
    assert mod.run(config, tmp_path) == summary
