"""The transfer study's summary: ΔOAcc and ΔASR (transfer − direct, in points) per (setting, arch,
size, ft) cell and pair, mean ± std over seeds (per cell also a 95 % bootstrap interval of the mean
over seeds); the size trend of ΔASR per setting and arch (least-squares slope per decade of
params with a 95 % bootstrap interval, seeds resampled within each size); the ASR against the
clean confidence margin (Spearman ρ over every attacked model); the bridge's AIC quantities
against ΔASR (Spearman ρ over pairs and over pair-seeds); and the pieces of the run (pretraining
curves, the source models' own accuracy, the bag-of-words baseline).

Every bootstrap interval is a percentile interval (:func:`quartic.core.measure.bootstrap_interval`)
of :data:`N_BOOTSTRAP` resamples at level :data:`LEVEL`, from ``np.random.default_rng(0)``: the
summary is deterministic. ``config`` is a :class:`quartic.studies.transfer.pipeline.StudyConfig`
(which has no field for the number of resamples).
"""

from __future__ import annotations

import numpy as np

from quartic.core.measure import (
    bootstrap_interval,
    bootstrap_spearman,
    json_number,
    mean_std,
    spearman,
)
from quartic.harness.runs import SweepResult

__all__ = [
    "BRIDGE_QUANTITIES",
    "LEVEL",
    "N_BOOTSTRAP",
    "summarise",
    "summarise_bridge",
    "summarise_run",
]

#: Resamples of each bootstrap interval in the summary, and the intervals' level.
N_BOOTSTRAP = 2000
LEVEL = 0.95


def _delta(a, b):
    return None if a is None or b is None else 100.0 * (a - b)


def _present(values) -> np.ndarray:
    """The values that are not ``None`` (seeds without a value dropped), as floats."""
    return np.asarray([v for v in values if v is not None], float)


def _mean_interval(values) -> list[float] | None:
    """Bootstrap interval of the mean over seeds (seeds resampled with replacement, those
    without a value dropped); ``None`` with fewer than two seeds."""
    v = _present(values)
    if v.size < 2:
        return None
    return bootstrap_interval(lambda i: v[i].mean(), v.size, N_BOOTSTRAP, level=LEVEL)


def _slope(x, y) -> float:
    """Least-squares slope of ``y`` against ``x``."""
    return float(np.polyfit(x, y, 1)[0])


def _slope_interval(x, seeds: list[np.ndarray]) -> list[float] | None:
    """Bootstrap interval of the slope of the per-size means ``seeds[k].mean()`` against ``x[k]``:
    the seeds resampled independently within each size, each size's mean recomputed from them."""

    def slope(*idx):
        return _slope(x, [v[i].mean() for v, i in zip(seeds, idx, strict=True)])

    return bootstrap_interval(slope, [v.size for v in seeds], N_BOOTSTRAP, level=LEVEL)


def summarise(config, res: dict) -> dict:
    """ΔOAcc and ΔASR (transfer − direct, points) per (setting, arch, size, ft) and pair; per
    cell, ``delta_oacc`` and each ``delta_asr_{budget}`` also hold ``interval``, the bootstrap
    interval of their mean over seeds (``None`` with fewer than two seeds)."""
    direct = {
        (r["arch"], r["size"], r["ft"], r["target"]): r
        for r in res.values()
        if r.get("kind") == "target" and r["arm"] == "direct"
    }
    cells: dict = {}
    # (setting, arch) -> {unit: its per-seed records}, the full fine-tuning units of the cells
    attacked: dict = {}
    for r in res.values():
        if r.get("kind") != "target" or r["arm"] != "transfer":
            continue
        d = direct.get((r["arch"], r["size"], r["ft"], r["target"]))
        if d is None:
            continue
        key = f"{r['setting']}|{r['arch']}|{r['size']}|{r['ft']}"
        cell = cells.setdefault(
            key,
            {"setting": r["setting"], "arch": r["arch"], "size": r["size"], "ft": r["ft"],
             "n_params": r["n_params"], "n_trainable": r["n_trainable"], "pairs": {}},
        )  # fmt: skip
        pair = {"delta_oacc": [], "oacc_transfer": [], "oacc_direct": []}
        for b in config.budget_names():
            pair[f"delta_asr_{b}"] = []
            pair[f"asr_transfer_{b}"] = []
            pair[f"asr_direct_{b}"] = []
        for st, sd in zip(r["per_seed"], d["per_seed"], strict=True):
            pair["delta_oacc"].append(_delta(st["test_accuracy"], sd["test_accuracy"]))
            pair["oacc_transfer"].append(st["test_accuracy"])
            pair["oacc_direct"].append(sd["test_accuracy"])
            for b in config.budget_names():
                at, ad = st["attacks"][b], sd["attacks"][b]
                pair[f"delta_asr_{b}"].append(
                    _delta(at["attack_success_rate"], ad["attack_success_rate"])
                )
                pair[f"asr_transfer_{b}"].append(at["attack_success_rate"])
                pair[f"asr_direct_{b}"].append(ad["attack_success_rate"])
        cell["pairs"][f"{r['source']}>{r['target']}"] = pair
        if r["ft"] == "full":
            units = attacked.setdefault((r["setting"], r["arch"]), {})
            units[("transfer", r["size"], r["source"], r["target"])] = r["per_seed"]
            units[("direct", r["size"], r["target"])] = d["per_seed"]
    for cell in cells.values():
        # Per seed, the mean over pairs; then mean ± std over seeds.
        keys = next(iter(cell["pairs"].values())).keys()
        for k in keys:
            per_seed = []
            for i in range(config.n_seeds):
                vals = [p[k][i] for p in cell["pairs"].values() if p[k][i] is not None]
                per_seed.append(float(np.mean(vals)) if vals else None)
            cell[k] = mean_std(per_seed)
            if k == "delta_oacc" or k.startswith("delta_asr_"):
                cell[k]["interval"] = _mean_interval(per_seed)
            cell[k]["per_seed"] = per_seed
        for p in cell["pairs"].values():
            for k in list(p):
                p[k] = {**mean_std(p[k]), "per_seed": p[k]}
    claims = _claims(config, cells, attacked)
    return {"cells": cells, "claims": claims}


def _asr_vs_margin(units: dict, b: str) -> dict:
    """Spearman ρ between the clean confidence margin and ASR@``b`` over every (unit, arm, seed)
    record of ``units`` with both, its bootstrap interval (records resampled), and the number of
    records ``n``; ρ and interval ``None`` with fewer than three records or no defined ρ."""
    pts = [
        (a.get("margin_clean"), a.get("attack_success_rate"))
        for per_seed in units.values()
        for a in (st["attacks"][b] for st in per_seed)
    ]
    pts = np.asarray([p for p in pts if None not in p], float).reshape(-1, 2)
    return _spearman_interval(pts[:, 0], pts[:, 1])


def _spearman_interval(x, y) -> dict:
    """Spearman ρ of paired values, its bootstrap interval (pairs resampled) and the number of
    pairs ``n``; ρ and interval ``None`` with fewer than three pairs or no defined ρ."""
    n = len(x)
    if n < 3:
        return {"rho": None, "interval": None, "n": n}
    lo, hi = bootstrap_spearman(x, y, N_BOOTSTRAP, level=LEVEL)
    return {
        "rho": json_number(spearman(x, y)),
        "interval": [lo, hi] if np.isfinite(lo) else None,
        "n": n,
    }


def _claims(config, cells: dict, attacked: dict) -> dict:
    """Per setting and arch (full fine-tuning): the sign of ΔASR at each size with the bootstrap
    intervals of ΔASR and ΔOAcc, the trend of ΔASR against log10(params) (least-squares slope
    with its bootstrap interval, seeds resampled within each size and each size's mean
    recomputed; Spearman ρ over sizes), and ASR against the clean margin (:func:`_asr_vs_margin`
    over the units of ``attacked``)."""
    out = {}
    b = config.budget_names()[0]
    for setting in config.settings:
        for arch in config.archs:
            rows = sorted(
                (c for c in cells.values()
                 if c["setting"] == setting and c["arch"] == arch and c["ft"] == "full"
                 and c[f"delta_asr_{b}"]["mean"] is not None),
                key=lambda c: c["n_params"],
            )  # fmt: skip
            if not rows:
                continue
            x = np.log10([c["n_params"] for c in rows])
            y = np.array([c[f"delta_asr_{b}"]["mean"] for c in rows])
            acc = np.array([c["delta_oacc"]["mean"] for c in rows])
            slope = _slope(x, y) if len(rows) > 1 else None
            seeds = [_present(c[f"delta_asr_{b}"]["per_seed"]) for c in rows]
            slope_interval = _slope_interval(x, seeds) if len(rows) > 1 else None
            out[f"{setting}|{arch}"] = {
                "budget": b,
                "sizes": [c["size"] for c in rows],
                "delta_asr": y.tolist(),
                "delta_asr_std": [c[f"delta_asr_{b}"]["std"] for c in rows],
                "delta_asr_interval": [c[f"delta_asr_{b}"]["interval"] for c in rows],
                "delta_oacc": acc.tolist(),
                "delta_oacc_interval": [c["delta_oacc"]["interval"] for c in rows],
                "n_sizes_asr_up": int((y > 0).sum()),
                "n_sizes_oacc_up": int((acc > 0).sum()),
                "slope_per_decade": slope,
                "slope_interval": slope_interval,
                "spearman_size": spearman(x, y) if len(rows) > 2 else None,
                "transfer_raises_asr": bool((y > 0).all()),
                "rise_shrinks_with_size": bool(slope is not None and slope < 0 and y[0] > 0),
                "asr_vs_margin": _asr_vs_margin(attacked.get((setting, arch), {}), b),
            }
    return out


BRIDGE_QUANTITIES = ("lambda_max", "overlap", "gamma_fisher", "linear_rate", "robust_loss")


def summarise_bridge(config, res: dict, cells: dict) -> dict:
    """Transfer − direct of each AIC quantity per pair and seed, and its Spearman ρ with ΔASR: over
    the pairs (means over seeds), and over the (pair, seed) points with a bootstrap interval."""
    out = {}
    b = config.budget_names()[0]
    for setting in config.settings:
        for arch in config.archs:
            cell = cells.get(f"{setting}|{arch}|{config.bridge_size}|full")
            units = [
                r for r in res.values()
                if r.get("kind") == "bridge" and r["setting"] == setting and r["arch"] == arch
            ]  # fmt: skip
            if not units or cell is None:
                continue
            rec: dict = {"size": config.bridge_size, "per_pair": {}, "spearman_pairs": {},
                         "spearman_seeds": {}, "spearman_seeds_interval": {}}  # fmt: skip
            for u in units:
                d = u["models"]["direct"]
                for s, m in u["models"].items():
                    if s == "direct":
                        continue
                    pair = f"{s}>{u['target']}"
                    if pair not in cell["pairs"]:
                        continue
                    rec["per_pair"][pair] = {
                        "delta_asr": cell["pairs"][pair][f"delta_asr_{b}"]["per_seed"],
                        **{
                            q: [mt - dt for mt, dt in zip(m[q], d[q], strict=True)]
                            for q in BRIDGE_QUANTITIES
                        },
                        "transfer": {q: m[q] for q in BRIDGE_QUANTITIES},
                        "direct": {q: d[q] for q in BRIDGE_QUANTITIES},
                    }
            pairs = rec["per_pair"].values()
            for q in BRIDGE_QUANTITIES:
                xs = [np.mean(p[q]) for p in pairs]
                ys = [np.mean([v for v in p["delta_asr"] if v is not None]) for p in pairs]
                rec["spearman_pairs"][q] = spearman(xs, ys) if len(xs) > 2 else None
                xs = [v for p in pairs for v, a in zip(p[q], p["delta_asr"], strict=True)
                      if a is not None]  # fmt: skip
                ys = [a for p in pairs for a in p["delta_asr"] if a is not None]
                rho = _spearman_interval(np.asarray(xs, float), np.asarray(ys, float))
                rec["spearman_seeds"][q] = rho["rho"]
                rec["spearman_seeds_interval"][q] = rho["interval"]
                rec[f"mean_delta_{q}"] = float(np.mean([np.mean(p[q]) for p in pairs]))
                rec[f"mean_direct_{q}"] = float(np.mean([np.mean(p["direct"][q]) for p in pairs]))
                rec[f"mean_transfer_{q}"] = float(
                    np.mean([np.mean(p["transfer"][q]) for p in pairs])
                )
            out[f"{setting}|{arch}"] = rec
    return out


def summarise_run(config, sweep: SweepResult) -> dict:
    """The whole summary of a finished (or partly failed) sweep of the study's units."""
    res = sweep.results
    summary = summarise(config, res)
    summary["bridge"] = summarise_bridge(config, res, summary["cells"])
    summary["num_failed"] = sweep.failed
    summary["failures"] = sweep.failures
    summary["budgets"] = config.budget_names()
    summary["settings"] = {
        s: {"surface_bias": config.data_config(s).surface_bias,
            "decoy_rate": config.data_config(s).decoy_rate}
        for s in config.settings
    }  # fmt: skip
    summary["pretrain"] = {
        k: {"val_curve_last": [c[-1] for c in r["val_curve"]], "objective": r["objective"],
            "size": r["size"], "arch": r["arch"], "probe": r.get("probe"),
            "task_probe": r.get("task_probe")}
        for k, r in res.items()
        if r.get("kind") == "pretrain"
    }  # fmt: skip
    summary["source_test_accuracy"] = {
        k: r["source_test_accuracy"] for k, r in res.items() if r.get("kind") == "source"
    }
    summary["bow_baseline"] = {
        f"{r['setting']}|{r['task']}": {k: r[k] for k in ("target_train", "source_train")}
        for r in res.values()
        if r.get("kind") == "baseline"
    }
    summary["unit_seconds"] = float(sum(r.get("seconds", 0.0) for r in sweep.records.values()))
    return summary


def probe_rows(summary: dict) -> list[dict]:
    """Table rows of the pretraining probe (:mod:`quartic.studies.transfer.probe`), one per
    (arch, size): pretrained and, in brackets, at initialisation."""
    rows = []
    for r in summary.get("pretrain", {}).values():
        pr = r.get("probe")
        if not pr:
            continue
        p, i = pr["pretrained"]["mean"], pr["init"]["mean"]
        rows.append(dict(
            quantity=f"{r['arch']} {r['size']} pretrained: synonym nearest neighbour / held-out "
            "synonym concept probe, mean over seeds (at init)",
            theory="probe ≥ 0.95 at sizes ≥ 30k",
            measured=f"{p['synonym_nn_rate']:.2f} / {p['concept_probe_heldout_accuracy']:.2f} "
            f"({i['synonym_nn_rate']:.2f} / {i['concept_probe_heldout_accuracy']:.2f})",
            verdict="ok" if p["concept_probe_heldout_accuracy"] >= 0.95 else "weak",
        ))  # fmt: skip
        tp = r.get("task_probe")
        bow = summary.get("bow_baseline", {})
        if not tp or not all(k in bow for k in tp):
            continue
        pre, init = (
            float(np.mean([v[arm]["mean"] for v in tp.values()])) for arm in ("pretrained", "init")
        )
        words = float(np.mean([bow[k]["target_train"]["test_accuracy"] for k in tp]))
        rows.append(dict(
            quantity=f"{r['arch']} {r['size']} pretrained: linear probe of the pooled features "
            "on each target's rows, mean over targets and seeds (at init)",
            theory=f"≥ word counts ({words:.3f}) if pretraining made the task readable",
            measured=f"{pre:.3f} ({init:.3f})",
            verdict="ok" if pre >= words else "below word counts",
        ))  # fmt: skip
    return rows
