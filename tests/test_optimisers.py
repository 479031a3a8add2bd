"""Other optimisers' leading Δu terms (quartic.core.theory) against simulated optax runs, float64."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quartic.core import theory
from quartic.harness import cli
from quartic.harness.runs import RunDir
from quartic.studies import optimisers as study


@pytest.fixture(scope="module")
def exp():
    return cli.load_experiment("optimisers")


@pytest.fixture(scope="module")
def cfg(exp):
    """The tests' config: the experiment's problem (n = 40), shorter runs. η = 2·10⁻⁵ leaves
    ≥ 47 SGD steps before the first crossover; records to t·λ_max = 0.12 bracket all three."""
    return exp.Config(
        noise_seeds=256, sgd_lr=2e-5, sgd_t_max=0.12, momentum_steps=300, adam_steps=100
    )


def _fisher_mv(prob):
    return lambda v: prob.fisher_vectors @ (prob.fisher_values * (prob.fisher_vectors.T @ v))


# ----------------------------------------------------------------------------------------------
# SGD with gradient noise


def test_sgd_noise_delta_u_is_the_exact_covariance_sum(exp, cfg):
    """½ tr(F Cov θ_k) against the brute-force sum η² Σ_{j<k} AʲΣAʲ, and → ½ η t tr(FΣ)."""
    prob = study.family_problem(cfg)
    sigma = study.noise_shape(cfg)
    exact_fn = jax.jit(theory.sgd_noise_delta_u)
    lr, steps = 1e-2, np.array([1, 2, 7, 40])
    exact = exact_fn(prob.fisher, prob.ft_hessian, sigma, lr, steps)
    f, s_np = np.asarray(prob.fisher), np.asarray(sigma)
    amat = np.eye(cfg.n) - lr * np.asarray(prob.ft_hessian)
    for k, val in zip(steps, exact, strict=True):
        cov, power = np.zeros((cfg.n, cfg.n)), np.eye(cfg.n)
        for _ in range(k):
            cov += lr**2 * power @ s_np @ power.T
            power = amat @ power
        assert float(val) == pytest.approx(0.5 * np.trace(f @ cov), rel=1e-10)
    # first order in t: ½ η t tr(FΣ), relative error O(t λ_max)
    lr = 1e-7
    rate = theory.sgd_noise_rate(lr, np.trace(f @ s_np))
    val = exact_fn(prob.fisher, prob.ft_hessian, sigma, lr, np.array([10, 20, 30, 40]))
    assert float(val[0]) == pytest.approx(float(rate) * lr * 10, rel=1e-5)


def test_sgd_crossover_time_is_where_the_two_terms_meet():
    """The constant in docs/theory.md: ½ η t tr(FΣ) = γ_F² t⁴/8 at t_c, and the two-term law's local
    slope there is SGD_CROSSOVER_SLOPE = 2.5."""
    lr, tr, gamma = 1e-5, 3.0, 0.2
    tc = float(theory.sgd_noise_crossover_time(lr, tr, gamma))
    assert float(theory.sgd_noise_rate(lr, tr)) * tc == pytest.approx(
        float(theory.quartic_coefficient(gamma)) * tc**4, rel=1e-12
    )
    t = tc * np.array([0.999, 1.001])
    y = np.asarray(theory.sgd_expected_delta_u(t, lr, tr, gamma))
    slope = np.log(y[1] / y[0]) / np.log(t[1] / t[0])
    assert slope == pytest.approx(theory.SGD_CROSSOVER_SLOPE, abs=1e-4)


def test_sgd_crossover_within_25_percent_at_three_noise_levels(exp, cfg):
    """Monte Carlo over 256 noise seeds per level (vmapped); t_c spans t_c·λ_max ≈ 0.005…0.05."""
    for i in range(3):
        r = study.sgd_level(cfg, i)
        assert abs(r["t_c_measured"] / r["t_c_predicted"] - 1) < 0.25, r["sigma"]
        # the measurement is sharper than the acceptance: a few MC standard errors
        err = abs(r["t_c_measured"] - r["t_c_predicted"])
        assert err < 3 * r["t_c_measured_stderr"] + 0.02 * r["t_c_predicted"], r["sigma"]
        # without Monte-Carlo noise (exact expectation) the leading-order t_c is within 3 %
        assert abs(r["t_c_exact_expectation"] / r["t_c_predicted"] - 1) < 0.03, r["sigma"]


# ----------------------------------------------------------------------------------------------
# Heavy ball


def test_momentum_coefficients_brute_force_and_limits():
    k = 60
    a, b = (np.asarray(x) for x in theory.momentum_coefficients(k, 0.0))
    np.testing.assert_array_equal(a, np.arange(k + 1))
    np.testing.assert_array_equal(b, np.arange(k + 1) * (np.arange(k + 1) - 1) / 2)
    beta = 0.9
    a, b = (np.asarray(x) for x in theory.momentum_coefficients(k, beta))
    for kk in (1, 2, 5, 60):
        a_bf = sum((1 - beta ** (j + 1)) / (1 - beta) for j in range(kk))
        b_bf = sum(a[i] * (1 - beta ** (kk - i)) / (1 - beta) for i in range(kk))
        assert a[kk] == pytest.approx(a_bf, rel=1e-13) and b[kk] == pytest.approx(b_bf, rel=1e-13)
    assert a[2] == pytest.approx(2 + beta) and b[2] == 1.0  # δ₂ = −η(2+β)g + η²Hg exactly


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_momentum_leading_term_within_10_percent_and_error_order(beta, exp, cfg):
    """Δu_k = ½η⁴b_k²γ_F² + … against optax.sgd(momentum=β) while η a_k λ_max ≤ 0.05; the error
    is first order in η (halves with η at fixed k); the plain GD forecast is far off."""
    errs = []
    for lr_eff in (cfg.momentum_lr_eff, cfg.momentum_lr_eff / 2):
        r = study.momentum_case(dataclasses.replace(cfg, momentum_lr_eff=lr_eff), beta)
        assert r["num_small_t"] >= 20
        assert r["max_rel_error_small_t"] < 0.10, r["max_rel_error_small_t"]
        assert r["max_rel_error_plain_gd_small_t"] > 0.5
        du, fc = np.asarray(r["delta_u"]), np.asarray(r["forecast"])
        errs.append(abs(fc[-1] / du[-1] - 1))
    assert errs[0] / errs[1] == pytest.approx(2.0, rel=0.1)


def test_simulations_compile_once_per_record_grid(exp, cfg):
    """Learning rates, momenta and the problem are traced: new values reuse the executable."""
    study.momentum_case(cfg, 0.5)
    size = study.simulate_momentum._cache_size()
    study.momentum_case(dataclasses.replace(cfg, momentum_lr_eff=3e-5, seed=1), 0.7)
    assert study.simulate_momentum._cache_size() == size


# ----------------------------------------------------------------------------------------------
# Adam


def test_ema_ages_brute_force():
    for b in (0.0, 0.5, 0.9, 0.999):
        ages = np.asarray(theory.ema_ages(40, b))
        for j in (1, 2, 7, 40):
            w = (1 - b) * b ** (j - np.arange(1, j + 1)) / (1 - b**j)
            assert ages[j] == pytest.approx(float(w @ (np.arange(1, j + 1) - 1)), abs=1e-12)
    assert float(theory.ema_ages(2, 0.3)[2]) == pytest.approx(1 / 1.3)


def test_adam_leading_terms_within_1_percent(exp, cfg):
    """Family (Pg = 0, Pu ≠ 0): ½(ηk)²uᵀFu, slope 2; built with Pu = 0: the coupling term. The
    displacement itself is second-order accurate: halving η divides its error by 4."""
    r = study.adam_case(cfg, "family", 0.9, 0.999)
    assert r["leading_kind"].startswith("first order") and r["pg_fisher_pg"] < 1e-25
    # measured 3.4e-4 (leading term) and 6.1e-6 (forecast): tolerances about 3× those
    assert r["max_rel_error_leading"] < 1e-3 and r["max_rel_error_forecast"] < 2e-5
    assert r["ratio_to_flow_law_at_last_step"] > 1e6  # the flow's t⁴ law is far off for Adam
    half = study.adam_case(dataclasses.replace(cfg, adam_lr=cfg.adam_lr / 2), "family", 0.9, 0.999)
    ratio = r["max_displacement_rel_error"] / half["max_displacement_rel_error"]
    assert r["max_displacement_rel_error"] < 1e-4 and ratio == pytest.approx(4.0, rel=0.1)
    for b1 in (0.9, 0.0):
        r = study.adam_case(cfg, "orthogonal", b1, 0.999)
        assert r["leading_kind"].startswith("coupling") and r["u_fisher_u"] < 1e-25
        # measured 3.0e-3 (b1 = 0.9) and 1.7e-3 (b1 = 0)
        assert r["max_rel_error_leading"] < 0.01, (b1, r["max_rel_error_leading"])
        assert r["pg_fisher_pg"] > 1e-3  # Pg ≠ 0: gradient descent would leak, Adam does not


def test_adam_coupling_cancels_when_b1_equals_b2(exp, cfg):
    prob = study.adam_orthogonal_problem(cfg)
    g, hvp = prob.ft_grad, lambda v: prob.ft_hessian @ v
    fc = theory.AdamForecast.from_vectors(jnp.zeros_like(g), _fisher_mv(prob), g, hvp, 1e-8)
    steps = np.array([10, 100])
    same = np.asarray(fc.coupling_term(steps, 1e-6, 0.9, 0.9))
    diff = np.asarray(fc.coupling_term(steps, 1e-6, 0.9, 0.999))
    assert np.all(same < 1e-10 * diff)  # only the ε/|g| part is left, squared


def test_optimisers_smoke(tmp_path, monkeypatch, exp, cfg):
    # the shapes and record grids of the tests above, so the compiled simulations are reused
    config = dataclasses.replace(
        cfg, noise_stds=(5e-4,), noise_batches=4, momentum_betas=(0.9,), adam_b1s=(0.9,),
        adam_b2s=(0.999,),
    )  # fmt: skip
    summary = exp.run(config, tmp_path)
    assert RunDir(tmp_path).read_summary() == summary and summary["n_failed"] == 0
    (sgd,) = summary["sgd"].values()
    assert sgd["t_c_predicted"] > 0 and math.isfinite(sgd["t_c_measured"])
    assert not summary["sgd_ok"]  # one noise level is not the acceptance's three
    assert summary["momentum_ok"] and summary["momentum_max_rel_error"] < 0.1
    assert summary["adam_ok"] and set(summary["adam"]) == {
        "adam_family_b1=0.9_b2=0.999",
        "adam_orthogonal_b1=0.9_b2=0.999",
    }
    assert len(RunDir(tmp_path).read_metrics()) > 0
    paths = exp.plot(tmp_path, tmp_path)
    assert [p.name for p in paths] == ["optimisers.png"] and paths[0].stat().st_size > 10_000
    assert len(exp.table(summary)) == 4

    def boom(*args, **kwargs):
        raise AssertionError("a finished unit was recomputed")

    for fn in ("sgd_level", "momentum_case", "adam_case"):
        monkeypatch.setattr(exp, fn, boom)
    assert exp.run(config, tmp_path) == summary
