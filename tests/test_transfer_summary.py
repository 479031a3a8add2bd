"""quartic.studies.transfer.summary on synthetic unit records: the bootstrap intervals of ΔOAcc and
ΔASR per cell, the interval of the size slope of ΔASR, the Spearman ρ between the clean confidence
margin and ASR, the bridge's ρ over (pair, seed) points with its interval, and the experiment's
table with and without them. No model is trained."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest

from quartic.core.measure import bootstrap_spearman, spearman
from quartic.harness.cli import load_experiment
from quartic.studies.transfer.summary import (
    BRIDGE_QUANTITIES,
    LEVEL,
    N_BOOTSTRAP,
    summarise,
    summarise_bridge,
)

EXP = load_experiment("transfer_robustness")  # its table
B = "80"
Q = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]


def config(n_seeds, settings=("surface",), archs=("decoder",)):
    """What summarise (and summarise_bridge) reads of a StudyConfig."""
    return types.SimpleNamespace(
        n_seeds=n_seeds, settings=settings, archs=archs, budget_names=lambda: [B], bridge_size="2k"
    )


def unit(arm, size, n_params, target, acc, asr, margin=None, source=None, **kw):
    """A target unit's record as pipeline.target_unit writes it (the keys summarise reads), one
    per-seed record per entry of ``acc``/``asr``."""
    margin = margin if margin is not None else [0.25] * len(acc)
    return {
        "kind": "target",
        "setting": kw.get("setting", "surface"),
        "size": size,
        "arch": kw.get("arch", "decoder"),
        "ft": kw.get("ft", "full"),
        "arm": arm,
        "source": source,
        "target": target,
        "n_params": n_params,
        "n_trainable": n_params,
        "per_seed": [
            {
                "seed": i,
                "test_accuracy": a,
                "attacks": {B: {"attack_success_rate": s, "margin_clean": m}},
            }
            for i, (a, s, m) in enumerate(zip(acc, asr, margin, strict=True))
        ],
    }


def pair_res(size, n_params, acc_d, asr_d, acc_t, asr_t, **kw):
    """One direct and one transfer unit (hate > political) of a size."""
    return {
        f"direct_{size}": unit("direct", size, n_params, "political", acc_d, asr_d, **kw),
        f"transfer_{size}": unit(
            "transfer", size, n_params, "political", acc_t, asr_t, source="hate", **kw
        ),
    }


def test_identical_seeds_collapse_the_interval_and_one_seed_gives_none():
    # dyadic values: ΔOAcc = ΔASR = 100 (0.75 − 0.5) = 25 exactly, at every seed
    res = pair_res("2k", 2_000, [0.5] * 3, [0.25] * 3, [0.75] * 3, [0.5] * 3)
    cell = summarise(config(3), res)["cells"]["surface|decoder|2k|full"]
    for k in ("delta_oacc", f"delta_asr_{B}"):
        assert cell[k]["mean"] == 25.0 and cell[k]["interval"] == [25.0, 25.0]
    assert "interval" not in cell["oacc_transfer"]  # only the transfer − direct differences
    one = summarise(config(1), pair_res("2k", 2_000, [0.5], [0.25], [0.75], [0.5]))
    cell = one["cells"]["surface|decoder|2k|full"]
    assert cell["delta_oacc"]["mean"] == 25.0 and cell["delta_oacc"]["interval"] is None
    assert cell[f"delta_asr_{B}"]["interval"] is None
    # a seed without a value (ASR undefined: nothing to attack) is dropped: one seed left
    res = pair_res("2k", 2_000, [0.5, 0.5], [0.25, None], [0.75, 0.75], [0.5, 0.5])
    cell = summarise(config(2), res)["cells"]["surface|decoder|2k|full"]
    assert cell[f"delta_asr_{B}"]["per_seed"] == [25.0, None]
    assert cell[f"delta_asr_{B}"]["interval"] is None
    assert cell["delta_oacc"]["interval"] == [25.0, 25.0]


def test_interval_contains_the_mean_and_is_the_numpy_bootstrap():
    rng = np.random.default_rng(7)
    n = 5
    acc_d, asr_d = rng.uniform(0.4, 0.7, (2, n)), rng.uniform(0.1, 0.5, (2, n))
    acc_t, asr_t = rng.uniform(0.4, 0.7, (2, n)), rng.uniform(0.1, 0.5, (2, n))
    res = {}
    for j, (s, t) in enumerate((("hate", "political"), ("gender", "hate"))):
        res[f"d{j}"] = unit("direct", "2k", 2_000, t, acc_d[j].tolist(), asr_d[j].tolist())
        res[f"t{j}"] = unit(
            "transfer", "2k", 2_000, t, acc_t[j].tolist(), asr_t[j].tolist(), source=s
        )
    summary = summarise(config(n), res)
    cell = summary["cells"]["surface|decoder|2k|full"]
    claim = summary["claims"]["surface|decoder"]
    for k, delta in (
        ("delta_oacc", 100 * (acc_t - acc_d)),
        (f"delta_asr_{B}", 100 * (asr_t - asr_d)),
    ):
        v = delta.mean(axis=0)  # per seed, the mean over the two pairs
        np.testing.assert_allclose(cell[k]["per_seed"], v, rtol=0, atol=1e-12)
        boot = np.random.default_rng(0)
        means = [v[boot.integers(0, n, n)].mean() for _ in range(N_BOOTSTRAP)]
        np.testing.assert_allclose(cell[k]["interval"], np.quantile(means, Q), rtol=0, atol=1e-12)
        lo, hi = cell[k]["interval"]
        assert lo < cell[k]["mean"] < hi
    assert claim["delta_asr_interval"] == [cell[f"delta_asr_{B}"]["interval"]]
    assert claim["delta_oacc_interval"] == [cell["delta_oacc"]["interval"]]
    assert claim["slope_per_decade"] is None and claim["slope_interval"] is None  # one size


SIZES = (("2k", 1_000), ("7k", 10_000), ("30k", 100_000), ("100k", 1_000_000))


def sized_res(delta_asr, n_seeds):
    """Direct ASR 0.25 at every size; transfer ASR 0.25 + ΔASR/100 (``delta_asr[size][seed]``)."""
    res = {}
    for (size, n), d in zip(SIZES, delta_asr, strict=True):
        asr_t = [0.25 + x / 100 for x in d]
        res |= pair_res(size, n, [0.5] * n_seeds, [0.25] * n_seeds, [0.5] * n_seeds, asr_t)
    return res


def test_slope_interval_collapses_on_an_exact_line():
    # ΔASR = 40 − 5 log10(n) at every seed: 25, 20, 15, 10 points
    line = [[40.0 - 5.0 * np.log10(n)] * 3 for _, n in SIZES]
    claim = summarise(config(3), sized_res(line, 3))["claims"]["surface|decoder"]
    slope = claim["slope_per_decade"]
    assert slope == pytest.approx(-5.0, abs=1e-12)
    lo, hi = claim["slope_interval"]
    assert lo == pytest.approx(slope, abs=1e-12) and hi == pytest.approx(slope, abs=1e-12)
    assert claim["rise_shrinks_with_size"] and claim["delta_asr_interval"][0] == pytest.approx(
        [25.0, 25.0], abs=1e-12
    )


def test_slope_interval_with_noise_contains_the_least_squares_slope():
    rng = np.random.default_rng(3)
    n_seeds = 4
    noisy = [(30.0 - 4.0 * np.log10(n) + rng.normal(0, 3, n_seeds)).tolist() for _, n in SIZES]
    summary = summarise(config(n_seeds), sized_res(noisy, n_seeds))
    claim = summary["claims"]["surface|decoder"]
    x = np.log10([n for _, n in SIZES])
    per_seed = [
        np.asarray(summary["cells"][f"surface|decoder|{s}|full"][f"delta_asr_{B}"]["per_seed"])
        for s, _ in SIZES
    ]
    slope = np.polyfit(x, [v.mean() for v in per_seed], 1)[0]
    assert claim["slope_per_decade"] == pytest.approx(slope, abs=1e-12)
    lo, hi = claim["slope_interval"]
    assert lo < slope < hi
    # the same bootstrap by hand: per resample, each size's seeds drawn in size order
    boot = np.random.default_rng(0)
    slopes = [
        np.polyfit(x, [v[boot.integers(0, v.size, v.size)].mean() for v in per_seed], 1)[0]
        for _ in range(N_BOOTSTRAP)
    ]
    np.testing.assert_allclose([lo, hi], np.quantile(slopes, Q), rtol=0, atol=1e-12)


def test_asr_against_margin_rho_is_the_constructed_sign():
    # Per (setting, arch): transfer units of the setting and the direct units they pair with
    # (shared by both settings), full fine-tuning only. Decoder: ASR falls with the margin
    # (ρ = −1); encoder: rises (ρ = +1). Every record's margin distinct.
    n_seeds, margins = 3, iter(np.linspace(0.05, 0.45, 200))
    res = {}
    for arch, sign in (("decoder", -1), ("encoder", +1)):
        for size, n in SIZES[:2]:
            for arm, setting, source, ft in (
                ("direct", "surface", None, "full"),
                ("transfer", "surface", "hate", "full"),
                ("transfer", "plain", "hate", "full"),
                ("direct", "surface", None, "lora"),
                ("transfer", "surface", "hate", "lora"),
            ):
                m = [float(next(margins)) for _ in range(n_seeds)]
                asr = [0.5 + sign * x for x in m] if ft == "full" else [0.9, 0.1, 0.5]
                if arm == "transfer" and setting == "plain" and size == "2k":
                    asr[0] = None  # undefined ASR: the record is dropped
                res[f"{arm}_{setting}_{arch}_{size}_{ft}"] = unit(
                    arm, size, n, "political", [0.6] * n_seeds, asr, m,
                    source=source, setting=setting, arch=arch, ft=ft,
                )  # fmt: skip
    claims = summarise(config(n_seeds, ("surface", "plain"), ("decoder", "encoder")), res)["claims"]
    for arch, sign in (("decoder", -1), ("encoder", +1)):
        for setting, n in (("surface", 2 * 2 * n_seeds), ("plain", 2 * 2 * n_seeds - 1)):
            m = claims[f"{setting}|{arch}"]["asr_vs_margin"]
            assert m["n"] == n
            assert m["rho"] == pytest.approx(sign, abs=1e-12)
            np.testing.assert_allclose(m["interval"], [sign, sign], rtol=0, atol=1e-12)


def test_table_shows_the_intervals_and_reads_old_summaries():
    rng = np.random.default_rng(1)
    noisy = [(20.0 + rng.normal(0, 2, 3)).tolist() for _ in SIZES]
    summary = summarise(config(3), sized_res(noisy, 3))
    summary["budgets"] = [B]
    table = EXP.table(summary)
    rows = {r["quantity"]: r for r in table}
    cell = summary["cells"]["surface|decoder|2k|full"][f"delta_asr_{B}"]
    lo, hi = cell["interval"]
    row = next(r for q, r in rows.items() if "2k" in q and "ΔASR@80" in q)
    assert row["measured"].endswith(
        f"/ {cell['mean']:+.1f} ± {cell['std']:.1f} [{lo:+.1f}, {hi:+.1f}]"
    )
    claim = summary["claims"]["surface|decoder"]
    row = next(r for q, r in rows.items() if "shrinks with size" in q)
    lo, hi = claim["slope_interval"]
    assert row["measured"] == f"{claim['slope_per_decade']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
    assert row["verdict"].endswith("(interval includes 0)" if lo <= 0 <= hi else "excludes 0)")
    assert any("confidence margin" in q for q in rows)
    raises = next(r for q, r in rows.items() if "transfer raises ASR" in q)
    assert raises["verdict"] == "holds"  # every size's interval above 0 (ΔASR ≈ 20 ± 2)
    # every mean above 0, but one size's interval reaching below it: not shown
    straddles = summarise(config(3), sized_res([*noisy[:3], [-6.0, 1.0, 8.0]], 3))
    straddles["budgets"] = [B]
    assert straddles["claims"]["surface|decoder"]["transfer_raises_asr"]
    raises = next(r for r in EXP.table(straddles) if "transfer raises ASR" in r["quantity"])
    assert raises["verdict"].startswith("not shown") and "(3 with" in raises["measured"]
    # a summary written before the intervals: the same rows, as they were
    old = copy.deepcopy(summary)
    for c in old["cells"].values():
        for k in c:
            if isinstance(c[k], dict):
                c[k].pop("interval", None)
    for c in old["claims"].values():
        for k in ("slope_interval", "delta_asr_interval", "delta_oacc_interval", "asr_vs_margin"):
            del c[k]
    old_rows = EXP.table(old)
    assert len(old_rows) == len(table) - 1
    assert all("[" not in r["measured"] and "interval" not in r["verdict"] for r in old_rows)


def test_bridge_rho_over_pair_seed_points_has_the_bootstrap_interval():
    # Three pairs × 5 seeds. Transfer − direct of λ_max is 2 ΔASR (ρ = +1, the interval collapses);
    # of the overlap, noise: its ρ and interval are those of the 15 (pair, seed) points.
    rng = np.random.default_rng(11)
    n = 5
    pairs = (("hate", "political"), ("political", "gender"), ("gender", "hate"))
    asr_d, asr_t = rng.uniform(0.1, 0.4, (3, n)), rng.uniform(0.2, 0.6, (3, n))
    res, noise = {}, rng.normal(size=(3, n))
    for j, (s, t) in enumerate(pairs):
        res[f"d{j}"] = unit("direct", "2k", 2_000, t, [0.6] * n, asr_d[j].tolist())
        res[f"t{j}"] = unit("transfer", "2k", 2_000, t, [0.6] * n, asr_t[j].tolist(), source=s)
        zero = {q: [0.0] * n for q in BRIDGE_QUANTITIES}
        moved = {**zero, "lambda_max": (200 * (asr_t[j] - asr_d[j])).tolist(),
                 "overlap": noise[j].tolist()}  # fmt: skip
        res[f"b{j}"] = {"kind": "bridge", "setting": "surface", "arch": "decoder", "target": t,
                        "models": {"direct": zero, s: moved}}  # fmt: skip
    cfg = config(n)
    summary = summarise(cfg, res)
    summary["bridge"] = summarise_bridge(cfg, res, summary["cells"])
    rec = summary["bridge"]["surface|decoder"]
    assert rec["spearman_seeds"]["lambda_max"] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(rec["spearman_seeds_interval"]["lambda_max"], [1, 1], atol=1e-12)
    x, y = noise.ravel(), 100 * (asr_t - asr_d).ravel()
    assert rec["spearman_seeds"]["overlap"] == pytest.approx(spearman(x, y), abs=1e-12)
    lo, hi = bootstrap_spearman(x, y, N_BOOTSTRAP, level=LEVEL)
    np.testing.assert_allclose(rec["spearman_seeds_interval"]["overlap"], [lo, hi], atol=1e-12)
    assert lo <= rec["spearman_seeds"]["overlap"] <= hi
    # a constant quantity has no ρ and no interval
    assert rec["spearman_seeds"]["robust_loss"] is None
    assert rec["spearman_seeds_interval"]["robust_loss"] is None
    # the table shows ρ over the points with its interval
    summary["budgets"] = [B]
    rows = {r["quantity"]: r["measured"] for r in EXP.table(summary)}
    key = "[surface] decoder bridge: Spearman(Δoverlap, ΔASR) over (pair, seed) points [95% bootstrap interval]"
    assert rows[key] == f"{spearman(x, y):+.2f} [{lo:+.2f}, {hi:+.2f}]"
