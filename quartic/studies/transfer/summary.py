"""The transfer study's summary: ΔOAcc and ΔASR (transfer − direct, in points) per (setting, arch,
size, ft) cell and pair, mean ± std over seeds; the size trend of ΔASR per setting and arch; the
bridge's AIC quantities against ΔASR (Spearman ρ over pairs and over pair-seeds); and the pieces
of the run (pretraining curves, the source models' own accuracy, the bag-of-words baseline).

``config`` is a :class:`quartic.studies.transfer.pipeline.StudyConfig`.
"""

from __future__ import annotations

import numpy as np

from quartic.core.measure import mean_std, spearman
from quartic.harness.runs import SweepResult

__all__ = ["BRIDGE_QUANTITIES", "summarise", "summarise_bridge", "summarise_run"]


def _delta(a, b):
    return None if a is None or b is None else 100.0 * (a - b)


def summarise(config, res: dict) -> dict:
    """ΔOAcc and ΔASR (transfer − direct, points) per (setting, arch, size, ft) and pair."""
    direct = {
        (r["arch"], r["size"], r["ft"], r["target"]): r
        for r in res.values()
        if r.get("kind") == "target" and r["arm"] == "direct"
    }
    cells: dict = {}
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
    for cell in cells.values():
        # Per seed, the mean over pairs; then mean ± std over seeds.
        keys = next(iter(cell["pairs"].values())).keys()
        for k in keys:
            per_seed = []
            for i in range(config.n_seeds):
                vals = [p[k][i] for p in cell["pairs"].values() if p[k][i] is not None]
                per_seed.append(float(np.mean(vals)) if vals else None)
            cell[k] = {**mean_std(per_seed), "per_seed": per_seed}
        for p in cell["pairs"].values():
            for k in list(p):
                p[k] = {**mean_std(p[k]), "per_seed": p[k]}
    claims = _claims(config, cells)
    return {"cells": cells, "claims": claims}


def _claims(config, cells: dict) -> dict:
    """Per setting and arch (full fine-tuning): the sign of ΔASR at each size, and the trend of
    ΔASR against log10(params) (least-squares slope and Spearman ρ over sizes)."""
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
            slope = float(np.polyfit(x, y, 1)[0]) if len(rows) > 1 else None
            out[f"{setting}|{arch}"] = {
                "budget": b,
                "sizes": [c["size"] for c in rows],
                "delta_asr": y.tolist(),
                "delta_asr_std": [c[f"delta_asr_{b}"]["std"] for c in rows],
                "delta_oacc": acc.tolist(),
                "n_sizes_asr_up": int((y > 0).sum()),
                "n_sizes_oacc_up": int((acc > 0).sum()),
                "slope_per_decade": slope,
                "spearman_size": spearman(x, y) if len(rows) > 2 else None,
                "transfer_raises_asr": bool((y > 0).all()),
                "rise_shrinks_with_size": bool(slope is not None and slope < 0 and y[0] > 0),
            }
    return out


BRIDGE_QUANTITIES = ("lambda_max", "overlap", "gamma_fisher", "linear_rate", "robust_loss")


def summarise_bridge(config, res: dict, cells: dict) -> dict:
    """Transfer − direct of each AIC quantity per pair and seed, and its Spearman ρ with ΔASR."""
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
                         "spearman_seeds": {}}  # fmt: skip
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
                rec["spearman_seeds"][q] = spearman(xs, ys) if len(xs) > 2 else None
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
            "size": r["size"], "arch": r["arch"], "probe": r.get("probe")}
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
    return rows
