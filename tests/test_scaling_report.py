"""The scaling study's report on constructed unit results: the power-law fit and its extrapolation
(exact on noise-free data), the verdict's three states, and the per-size long fine-tuning summary
(overlap vs harm)."""

import math

import numpy as np
import pytest

from quartic.studies import scaling_report
from quartic.studies.scaling import power_law

SIZES = {"2k": 2_000, "30k": 30_000, "300k": 300_000}


def test_power_law_recovers_an_exact_law_and_its_extrapolation():
    n = np.repeat(list(SIZES.values()), 3).astype(float)
    y = 3.0 * n**-0.5
    fit = power_law(n, [*y[:-1], -1.0], extrapolate_to=(1.7e9,), num=200)
    # noise-free: every bootstrap refit is the same line, so the intervals collapse (float64)
    assert fit["exponent"] == pytest.approx(-0.5, abs=1e-12)
    assert fit["prefactor"] == pytest.approx(3.0, rel=1e-10)
    assert fit["exponent_interval"] == pytest.approx([-0.5, -0.5], abs=1e-12)
    e = fit["extrapolation"]["1.7e+09"]
    assert e["fit"] == pytest.approx(3.0 / math.sqrt(1.7e9), rel=1e-10)
    assert e["interval"] == pytest.approx([e["fit"]] * 2, rel=1e-10)
    assert (fit["dropped"], fit["points"]) == (1, 8)
    assert power_law([1e3, 1e3], [1.0, 2.0]) is None  # one size: nothing to fit


@pytest.mark.parametrize(
    "interval, state", [((0.1, 0.5), "open"), ((2.0, 9.0), "closed"), ((0.2, 75.0), "undetermined")]
)
def test_verdict_reads_the_prediction_interval(interval, state):
    fit = {
        "exponent": -0.1,
        "exponent_interval": [-0.3, 0.1],
        "extrapolation": {"1.7e+09": {"fit": 0.3, "interval": list(interval)}},
    }
    assert f": {state} " in scaling_report.verdict(fit, (1.7e9,))
    assert scaling_report.verdict(None, (1.7e9,)).startswith("Too few sizes")


def test_a_verdict_must_hold_under_every_bootstrap_seed():
    """An interval ending just above 1 under one seed's resampling and below it under another's is
    undetermined, with the ends' range; seeds that agree keep the state."""

    def fit(lo, hi):
        return {"exponent": -0.02, "exponent_interval": [-0.08, 0.03],
                "extrapolation": {"1.7e+09": {"fit": 3.0, "interval": [lo, hi]}}}  # fmt: skip

    crossing = scaling_report.verdict(fit(1.01, 9.2), (1.7e9,), [fit(0.89, 8.7), None])
    assert ": undetermined (the interval's ends cross 1 between 2 bootstrap seeds" in crossing
    assert "lower 0.89–1.01" in crossing
    assert ": closed " in scaling_report.verdict(fit(1.01, 9.2), (1.7e9,), [fit(1.2, 8.7)])
    assert ": open " in scaling_report.verdict(fit(0.1, 0.9), (1.7e9,), [fit(0.2, 0.95)])


def _unit(size: str, seed: int, overlaps: list[float], harms: list[float]) -> dict:
    n = SIZES[size]
    task_row = {
        "n": n,
        "rank": 10,
        "ortho_ratio": 0.3,
        "random_ortho_ratio": math.sqrt(10 / n),
        "ortho_ratio_d_share": None,
        "random_ortho_ratio_d_share": None,
        "t_cross_lambda": 3.0,
        "gamma_fisher": 1.0,
        "lambda_d": 0.1,
        "forecast_max_rel_error": 0.01,
        "flow_onset_slope": 2.0,
        "c4_over_gamma_f": None,
        "onset_order": 2,
    }
    tasks = [f"task{i}" for i in range(len(overlaps))]
    long = {
        t: {
            "task": t,
            "seed": seed,
            "harmfulness": [0.0, h / 10],
            "retention": [0.9, 0.8],
            "du_kl": [0.0, h],
            "fisher_overlap": [0.0, o],
            "overlap": [0.0, o],
        }
        for t, o, h in zip(tasks, overlaps, harms, strict=True)
    }
    return {
        "size": size,
        "seed": seed,
        "n": n,
        "spectrum": {"share_top_d": 0.9, "effective_rank_bounds": [5.0, 6.0], "eigenvalues": [1.0]},
        "tasks": {t: {**task_row, "task": t} for t in tasks},
        "long": long,
    }


def test_summary_ranks_overlap_against_harm_per_size():
    results = {
        "a": _unit("2k", 0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),  # harm rises with overlap
        "b": _unit("2k", 1, [0.4, 0.5, 0.6], [4.0, 5.0, 6.0]),
        "c": _unit("30k", 0, [0.1, 0.2, 0.3], [3.0, 2.0, 1.0]),  # and falls here
    }
    s = scaling_report.summarize(results, extrapolate_to=(1.7e9,), bootstrap=100)
    small, large = s["per_size"]["2k"], s["per_size"]["30k"]
    assert small["overlap_harm"]["n"] == 6 and small["overlap_harm"]["seeds"] == 2
    assert small["overlap_harm"]["spearman_fisher_overlap_du_kl"] == pytest.approx(1.0)
    assert large["overlap_harm"]["spearman_fisher_overlap_du_kl"] == pytest.approx(-1.0)
    assert small["long"]["du_kl"] == [1.0, 3.5, 6.0]
    assert small["long"]["retention"] == [0.8, 0.8, 0.8]
    assert len(s["long_records"]) == 9
    assert s["fits"]["ortho_ratio"]["exponent"] == pytest.approx(0.0, abs=1e-12)
    assert "Spearman" in " ".join(r["quantity"] for r in scaling_report.table(s))


def test_summary_without_long_runs_has_no_overlap_harm():
    unit = _unit("2k", 0, [0.1, 0.2], [1.0, 2.0])
    unit["long"] = {}
    s = scaling_report.summarize({"a": unit}, extrapolate_to=(1.7e9,), bootstrap=10)
    assert "long" not in s["per_size"]["2k"] and s["long_records"] == []
    assert s["verdict"].startswith("Too few sizes")


def test_undefined_correlations_are_null_not_nan():
    from quartic.studies import collapse

    records = list(_unit("2k", 0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])["long"].values())
    for r in records:
        r["harmfulness"] = [0.0, 0.0]  # no held-out prompt flips
    oh = collapse.overlap_harm(records)
    assert oh["spearman_fisher_overlap_harm"] is None
    assert oh["spearman_fisher_overlap_harm_ci95"] == [None, None]
    assert oh["spearman_fisher_overlap_du_kl"] == pytest.approx(1.0)  # the KL drift still ranks


def _as_json(summary: dict) -> dict:
    import json

    return json.loads(json.dumps(summary))


def test_pooling_summaries_equals_one_run_over_every_model():
    """A run that pools an earlier run's summary reports what one run over both runs' models
    would: the per-size entries, the rows, the long-run records, the fits and the verdict."""
    small = {"a": _unit("2k", 0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),
             "b": _unit("2k", 1, [0.4, 0.5, 0.6], [4.0, 5.0, 6.0])}  # fmt: skip
    large = {"c": _unit("30k", 0, [0.1, 0.2, 0.3], [3.0, 2.0, 1.0]),
             "d": _unit("300k", 0, [0.2, 0.3, 0.1], [2.0, 3.0, 1.0])}  # fmt: skip
    for i, unit in enumerate((*small.values(), *large.values())):
        for row in unit["tasks"].values():  # sizes differ, so the fits have something to fit
            row["t_cross_lambda"] = 3.0 / (1 + i) ** 0.5
    kw = {"extrapolate_to": (1.7e9,), "bootstrap": 50}
    whole = _as_json(scaling_report.summarize({**small, **large}, **kw))
    assert whole["fits"]["t_cross_lambda"]["exponent"] < 0
    first = _as_json(scaling_report.summarize(small, **kw))
    assert _as_json(scaling_report.summarize(large, **kw, pooled=[first])) == whole
    last = _as_json(scaling_report.summarize(large, **kw))  # pooled the other way round
    assert _as_json(scaling_report.summarize(small, **kw, pooled=[last])) == whole
    assert _as_json(scaling_report.summarize({}, **kw, pooled=[first, last])) == whole


def test_pooling_splits_of_one_size_by_seed_equals_one_run():
    """Seeds of one size measured in different runs pool into the entry one run over all of them
    gives (its medians, its overlap-harm ρ over every long run), in either order."""
    a, b = (
        _unit("2k", 0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),
        _unit("2k", 1, [0.4, 0.5, 0.6], [4.0, 6.0, 5.0]),
    )
    c = _unit("30k", 0, [0.1, 0.2, 0.3], [3.0, 2.0, 1.0])
    b["tasks"]["task1"]["t_cross_lambda"] = 7.0  # so the median is a median of both seeds
    kw = {"extrapolate_to": (1.7e9,), "bootstrap": 50}
    whole = _as_json(scaling_report.summarize({"a": a, "b": b, "c": c}, **kw))
    entry = whole["per_size"]["2k"]
    assert entry["seeds"] == [0, 1] and entry["overlap_harm"]["n"] == 6
    assert entry["t_cross_lambda"] == [3.0, 3.0, 7.0]
    seed0 = _as_json(scaling_report.summarize({"a": a, "c": c}, **kw))
    seed1 = _as_json(scaling_report.summarize({"b": b}, **kw))
    assert _as_json(scaling_report.summarize({"b": b}, **kw, pooled=[seed0])) == whole
    assert _as_json(scaling_report.summarize({"a": a, "c": c}, **kw, pooled=[seed1])) == whole
    assert _as_json(scaling_report.summarize({}, **kw, pooled=[seed1, seed0])) == whole


def test_pooling_refuses_a_model_measured_in_two_runs():
    from quartic.core.errors import QuarticError

    first = scaling_report.summarize({"a": _unit("2k", 0, [0.1, 0.2], [1.0, 2.0])}, bootstrap=10)
    with pytest.raises(QuarticError, match=r"size 2k, seed\(s\) \[0\], are in two"):
        scaling_report.summarize({"b": _unit("2k", 0, [0.1, 0.2], [1.0, 2.0])}, pooled=[first])
    old = _as_json(first)  # a summary written before seeds could be pooled
    del old["per_size"]["2k"]["seeds"]
    with pytest.raises(QuarticError, match="predates pooling seeds"):
        scaling_report.summarize({"b": _unit("2k", 1, [0.1, 0.2], [1.0, 2.0])}, pooled=[old])


def test_scaling_config_checks_what_it_pools(tmp_path):
    import dataclasses
    import json

    from quartic.core.errors import QuarticError
    from quartic.harness.cli import load_experiment

    exp = load_experiment("scaling")
    with pytest.raises(QuarticError, match="no summary at"):
        exp.Config(pool=(str(tmp_path / "missing.json"),))
    with pytest.raises(QuarticError, match="no sizes to measure"):
        exp.Config(sizes=())
    not_scaling = tmp_path / "summary.json"
    not_scaling.write_text('{"per_size": {}}')
    with pytest.raises(QuarticError, match="is not a scaling summary"):
        exp.summarize({}, exp.Config(sizes=(), pool=(str(not_scaling),)))
    quick = tmp_path / "quick"  # a run whose models were measured otherwise: the quick config
    quick.mkdir()
    unit = _unit("2k", 0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    (quick / "summary.json").write_text(json.dumps(scaling_report.summarize({"a": unit})))
    (quick / "config.json").write_text(json.dumps(dataclasses.asdict(exp.Config.quick())))
    pool = (str(quick / "summary.json"),)
    with pytest.raises(QuarticError, match="taylor_order: 4 there, 6 here, long_steps: 300 there"):
        exp.summarize({}, exp.Config(sizes=(), pool=pool))
    assert exp.summarize({}, exp.Config(sizes=(), pool=pool, long_steps=0, taylor_order=4))


def test_a_pool_only_run_writes_the_pooled_summary(tmp_path):
    """``sizes=()`` trains nothing: the run's summary is its pooled runs' summary, refitted."""
    import json

    from quartic.harness.cli import load_experiment

    exp = load_experiment("scaling")
    units = {"a": _unit("2k", 0, [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),
             "c": _unit("30k", 0, [0.1, 0.2, 0.3], [3.0, 2.0, 1.0])}  # fmt: skip
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(scaling_report.summarize(units, (1.7e9, 3e9), bootstrap=20)))
    config = exp.Config(sizes=(), pool=(str(earlier),), bootstrap=20)
    summary = exp.run(config, tmp_path / "pooled")
    assert summary["pooled_from"] == [str(earlier)] and summary["num_failed"] == 0
    on_disk = json.loads((tmp_path / "pooled" / "summary.json").read_text())
    assert {k: v for k, v in on_disk.items() if k not in ("pooled_from", "num_failed")} == (
        json.loads(earlier.read_text())
    )


def test_pooling_the_committed_full_run_alone_reproduces_its_fits():
    """The committed 2k-100k summary, pooled by itself, gives back its own fits and verdict: the
    pooled 2k-1M summaries next to it were refitted from exactly these rows."""
    import json
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "results" / "full" / "scaling" / "summary.json"
    committed = json.loads(path.read_text())
    again = _as_json(scaling_report.summarize({}, (1.7e9, 3e9), 2000, pooled=[committed]))
    for key in ("per_size", "fits", "verdict", "rows", "long_records"):
        assert again[key] == committed[key], key


@pytest.mark.parametrize("name", ["scaling_2k_300k", "scaling_2k_1m", "scaling_2k_1m_seeds"])
def test_the_committed_pooled_summaries_refit_to_their_fits_and_verdicts(name):
    """Each committed pooled summary, refitted by itself with the current code (the verdict now
    checked over VERDICT_SEEDS bootstrap seeds), gives back its fits and its verdict."""
    import json
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "results" / "full" / name / "summary.json"
    committed = json.loads(path.read_text())
    again = _as_json(scaling_report.summarize({}, (1.7e9, 3e9), 2000, pooled=[committed]))
    assert again["fits"] == committed["fits"]
    assert again["verdict"] == committed["verdict"]


def test_a_pretraining_learning_rate_reaches_the_theta_star_recipe(monkeypatch):
    """``pretrain_lr`` trains the size's θ* (here a preset's, which otherwise comes from the
    collapse study) with that rate in the recipe, the model config unchanged."""
    import jax

    from quartic.core.errors import QuarticError
    from quartic.harness.cli import load_experiment
    from quartic.models import TransformerConfig
    from quartic.studies import scaling

    seen = {}

    def fake(config, world, seed, align, progress):
        seen.update(config=config, seed=seed, align=align)
        raise RuntimeError("recorded")

    monkeypatch.setattr(scaling, "make_aligned_model", fake)
    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        with pytest.raises(RuntimeError, match="recorded"):
            scaling.aligned("2k", 3, pretrain_lr=0.0063)
    finally:
        jax.config.update("jax_enable_x64", before)
    world = scaling.tw.TokenWorld(scaling.tw.WorldConfig(seed=0))
    assert seen["align"].pretrain_lr == 0.0063 and seen["seed"] == 3
    assert seen["config"] == TransformerConfig.preset(
        "2k", vocab_size=world.vocab_size, seq_len=world.config.seq_len, param_dtype="float64"
    )
    exp = load_experiment("scaling")
    with pytest.raises(QuarticError, match="pretrain_lr must be > 0"):
        exp.Config(pretrain_lr=0.0)
