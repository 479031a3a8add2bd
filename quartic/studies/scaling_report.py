"""The scaling study's report: its summary (per-size medians, power-law fits and the extrapolation,
overlap vs harm after long fine-tuning), its table rows and its figure, from the unit results of
``experiments/scaling.py``.

- :func:`summarize`: per size, [min, median, max] of each quantity over seeds × tasks; each fitted
  quantity against n as a power law (:func:`quartic.studies.scaling.power_law`); the verdict.
- :func:`verdict`: one plain sentence from the extrapolated t×·λ_max.
- :func:`table`, :func:`plot`: the rows of ``quartic reproduce``'s table and ``scaling.png``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from quartic.core.errors import QuarticError
from quartic.harness import plotting
from quartic.studies import collapse
from quartic.studies.scaling import power_law

FITTED = ("ortho_ratio", "t_cross_lambda", "gamma_fisher", "lambda_d", "ortho_ratio_d_share")
EXTRAPOLATED = ("t_cross_lambda", "ortho_ratio")
# bootstrap seeds a verdict must hold under (seed 0 gives the reported interval): 1.7e9's lower end
# over 20 seeds of the 2k-1M fit ranged 0.89-1.07 (benchmarks/verdict_seeds.py)
VERDICT_SEEDS = 10
LONG_KEYS = ("harmfulness", "retention", "du_kl", "fisher_overlap")
FINAL_KEYS = (*LONG_KEYS, "overlap")  # a long run's final values that its record keeps


def _min_median_max(values) -> list[float] | None:
    v = np.asarray(values, float)
    return [float(v.min()), float(np.median(v)), float(v.max())] if v.size else None


def _rows(results: dict) -> list[dict]:
    rows = []
    for unit in results.values():
        spec = unit["spectrum"]
        for r in unit["tasks"].values():
            rows.append({**r, "seed": unit["seed"], "share_top_d": spec["share_top_d"],
                         "effective_rank": spec["effective_rank_bounds"][0]})  # fmt: skip
    return rows


def summarize(results: dict, extrapolate_to=(1.7e9, 3e9), bootstrap: int = 2000, pooled=()) -> dict:
    """The summary of the unit results ``{name: unit}`` (each unit one model: its size, seed, n,
    Fisher spectrum, per-task quantities and, when run, its long fine-tuning records).

    ``pooled``: summaries of earlier runs (this function's output) whose models join this one's:
    the same summary as one run over every model would give. A size measured in one run only keeps
    its per-size entry as it was computed; a size measured in several (other seeds) gets its entry
    recomputed from their rows, spectra and long-run records together. A (size, seed) may come from
    one run only.
    """
    own = _own_summary(results)
    sources = [*pooled, own]
    found: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        for size in source["per_size"]:
            found.setdefault(size, []).append(i)
    rows = sorted(
        (r for source in sources for r in source["rows"]), key=lambda r: (r["n"], r["seed"])
    )
    finals = {size: [] for size in found}  # the long-run records of each size, all sources
    for source in sources:
        sizes = list(source["per_size"])
        for r in source["long_records"]:
            finals[sizes[r["size_index"]]].append(r)
    per_size = {}
    for size, where in found.items():
        if len(where) == 1:
            per_size[size] = sources[where[0]]["per_size"][size]
        else:
            per_size[size] = _merged_entry(size, [sources[i] for i in where], rows, finals[size])
    per_size = dict(sorted(per_size.items(), key=lambda item: item[1]["n"][0]))  # in order of n
    index = {size: i for i, size in enumerate(per_size)}
    long_records = sorted(  # renumbered into the pooled order of sizes
        ({**r, "size_index": index[size]} for size, rs in finals.items() for r in rs),
        key=lambda r: (r["size_index"], r["seed"]),
    )
    n = np.asarray([x["n"] for x in rows], float)
    fits = {
        k: power_law(n, _column(rows, k), extrapolate_to if k in EXTRAPOLATED else (), bootstrap)
        for k in (*FITTED, "share_top_d", "effective_rank")
    }
    checks = t_cross_fits(rows, extrapolate_to, bootstrap, range(1, VERDICT_SEEDS))
    return {
        "per_size": per_size,
        "fits": fits,
        "verdict": verdict(fits.get("t_cross_lambda"), extrapolate_to, checks),
        "rows": rows,
        "long_records": long_records,
        "unit_seconds": {k: v for source in sources for k, v in source["unit_seconds"].items()},
    }


def _column(rows: list[dict], key: str) -> list[float]:
    return [np.nan if x[key] is None else x[key] for x in rows]


def t_cross_fits(rows: list[dict], extrapolate_to, bootstrap: int, seeds) -> list[dict | None]:
    """The power-law fit of t×·λ_max over ``rows`` under each bootstrap seed of ``seeds`` (seed 0
    is the summary's ``fits``; :func:`verdict` checks its state against the others)."""
    n = np.asarray([x["n"] for x in rows], float)
    y = _column(rows, "t_cross_lambda")
    return [power_law(n, y, extrapolate_to, bootstrap, seed=seed) for seed in seeds]


def _merged_entry(size: str, sources: list[dict], rows: list[dict], finals: list[dict]) -> dict:
    """The per-size entry of a size that several pooled runs measured, each with other seeds."""
    models = []
    for source in sources:
        e = source["per_size"][size]
        if "seeds" not in e or any("overlap" not in r for r in source["long_records"]):
            raise QuarticError(
                f"size {size} is in several of the pooled runs, and one of their summaries "
                "predates pooling seeds (no per-size seeds or long-run overlap); rerun that run's "
                "command to rewrite its summary from its units"
            )
        models.extend(zip(e["seeds"], e["n"], e["spectrum"], strict=True))
    seeds = [m[0] for m in models]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise QuarticError(
            f"size {size}, seed(s) {twice}, are in two of the pooled runs; a model may come from "
            "one run only"
        )
    if len({m[1] for m in models}) > 1:
        raise QuarticError(f"size {size} has different parameter counts in the pooled runs")
    models.sort(key=lambda m: m[0])
    n = models[0][1]
    return _size_entry(
        [{"seed": s, "n": k, "spectrum": spec} for s, k, spec in models],
        [r for r in rows if r["n"] == n],
        sorted(finals, key=lambda r: r["seed"]),
    )


def _size_entry(models: list[dict], rows: list[dict], finals: list[dict]) -> dict:
    """One size's entry from its models (seed, n, spectrum), their task rows and the final values
    of their long fine-tuning runs."""
    pick = lambda k: [x[k] for x in rows if x[k] is not None]  # noqa: E731
    entry = {
        "n": [m["n"] for m in models],
        "seeds": [m["seed"] for m in models],
        "spectrum": [m["spectrum"] for m in models],
    }
    for k in (*FITTED, "random_ortho_ratio", "random_ortho_ratio_d_share",
              "forecast_max_rel_error", "flow_onset_slope", "c4_over_gamma_f"):  # fmt: skip
        entry[k] = _min_median_max(pick(k))
    entry["onset_orders"] = sorted({x["onset_order"] for x in rows if x["onset_order"]})
    if finals:
        entry["long"] = {k: _min_median_max([r[k] for r in finals]) for k in LONG_KEYS}
        runs = [{**r, **{k: [r[k]] for k in FINAL_KEYS}} for r in finals]  # as one-step runs
        entry["overlap_harm"] = collapse.overlap_harm(runs) if len(runs) >= 3 else None
    return entry


def _own_summary(results: dict) -> dict:
    """Per-size entries, rows, long-run records and unit times of one run's unit results."""
    units = sorted(results.values(), key=lambda u: (u["n"], u["seed"]))
    rows = sorted(_rows(results), key=lambda r: (r["n"], r["seed"]))
    sizes = list(dict.fromkeys(u["size"] for u in units))  # in order of n
    long_records = [
        {"size_index": i, "task": t, "seed": u["seed"], **{k: r[k][-1] for k in FINAL_KEYS}}
        for i, size in enumerate(sizes)
        for u in units
        if u["size"] == size
        for t, r in u.get("long", {}).items()
    ]
    per_size = {}
    for i, size in enumerate(sizes):
        group = [u for u in units if u["size"] == size]
        per_size[size] = _size_entry(
            [
                {
                    "seed": u["seed"],
                    "n": u["n"],
                    "spectrum": {k: v for k, v in u["spectrum"].items() if k != "eigenvalues"},
                }
                for u in group
            ],  # fmt: skip
            [x for x in rows if x["n"] == group[0]["n"]],
            [r for r in long_records if r["size_index"] == i],
        )
    return {
        "per_size": per_size,
        "rows": rows,
        "long_records": long_records,
        "unit_seconds": {name: u.get("seconds") for name, u in results.items()},
    }


def verdict(fit: dict | None, sizes, checks=()) -> str:
    """One plain sentence from the extrapolated t×·λ_max: the window is open where the prediction
    interval lies below 1, closed where it lies above, undetermined where it holds 1.

    ``checks``: the same fit with other bootstrap seeds. A state holds only if every seed gives it:
    an interval that ends near 1 can cross it from one seed's resampling to the next, and that is
    the resampling's noise, not a finding; the sentence then gives the ends' range over the seeds.
    """
    if fit is None:
        return "Too few sizes to extrapolate t×·λ_max."
    parts = []
    for s in sizes:
        key = f"{s:.3g}"
        e = fit["extrapolation"][key]
        lo, hi = e["interval"]
        ends = np.asarray(
            [e["interval"], *(c["extrapolation"][key]["interval"] for c in checks if c)]
        )
        per_seed = ["open" if b < 1 else "closed" if a > 1 else "undetermined" for a, b in ends]
        alone = per_seed[0]
        state = alone if len(set(per_seed)) == 1 else "undetermined"
        note = ""
        if alone != state:
            note = (f" (the interval's ends cross 1 between {len(ends)} bootstrap seeds: lower "
                    f"{ends[:, 0].min():.2f}–{ends[:, 0].max():.2f}, upper "
                    f"{ends[:, 1].min():.2g}–{ends[:, 1].max():.2g})")  # fmt: skip
        parts.append(
            f"at n = {s:.2g} t×·λ_max ≈ {e['fit']:.2g} (95 % PI {lo:.2g}–{hi:.2g}): {state}{note}"
        )
    return (
        "The quartic window (t×·λ_max < 1) is predicted "
        + "; ".join(parts)
        + f" (fit exponent {fit['exponent']:.2f}, interval "
        + f"{fit['exponent_interval'][0]:.2f} to {fit['exponent_interval'][1]:.2f})."
    )


def table(summary: dict) -> list[dict]:
    rows = []
    for size, e in summary["per_size"].items():
        if e["ortho_ratio"] is None:
            continue
        rows.append(dict(
            quantity=f"{size} (n={e['n'][0]}): ‖Pg‖/‖g‖ median vs random √(d/n)",
            theory="≈ √(d/n) if benign g were random",
            measured=f"{e['ortho_ratio'][1]:.3g} vs {e['random_ortho_ratio'][1]:.3g}",
            verdict="info",
        ))  # fmt: skip
        rows.append(dict(
            quantity=f"{size}: t×·λ_max(H) median [min, max]",
            theory="< 1 for a t⁴ window",
            measured=f"{e['t_cross_lambda'][1]:.3g} [{e['t_cross_lambda'][0]:.3g}, "
            f"{e['t_cross_lambda'][2]:.3g}]",
            verdict="open" if e["t_cross_lambda"][2] < 1 else "closed",
        ))  # fmt: skip
    for size, e in summary["per_size"].items():
        oh = e.get("overlap_harm")
        if oh and oh["spearman_fisher_overlap_du_kl"] is not None:
            lo, hi = oh["spearman_fisher_overlap_du_kl_ci95"]
            rows.append(dict(
                quantity=f"{size}: Spearman ρ(‖F½PΔθ‖, Δu_KL) after long FT, {oh['n']} runs",
                theory="> 0 if overlap drives harm",
                measured=f"{oh['spearman_fisher_overlap_du_kl']:.2f} [{lo:.2f}, {hi:.2f}]; "
                f"harmfulness median {e['long']['harmfulness'][1]:.2f}, "
                f"retention {e['long']['retention'][1]:.2f}",
                verdict="info",
            ))  # fmt: skip
    for k in EXTRAPOLATED:
        fit = summary["fits"].get(k)
        if fit:
            lo, hi = fit["exponent_interval"]
            theory = "-0.5 for a random direction" if k == "ortho_ratio" else "< 0 if it opens"
            rows.append(dict(quantity=f"{k} ∝ n^b: b", theory=theory,
                             measured=f"{fit['exponent']:.3f} [{lo:.3f}, {hi:.3f}]",
                             verdict="info"))  # fmt: skip
    rows.append(dict(quantity="window at 1.7e9-3e9 params", theory="t×·λ_max < 1",
                     measured=summary["verdict"], verdict="info"))  # fmt: skip
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib.pyplot as plt

    summary_path = pathlib.Path(out_dir) / "summary.json"
    if not summary_path.exists():
        return []
    summary = json.loads(summary_path.read_text())
    rows = summary["rows"]
    n = np.asarray([r["n"] for r in rows], float)
    grid = np.geomspace(n.min(), 3e9, 100)
    fig, axes = plt.subplots(3, 2, figsize=(10, 12))
    _plot_long(axes[2], summary)
    for ax, key in zip(axes[:2].ravel(), ("ortho_ratio", "t_cross_lambda", "gamma_fisher", "lambda_d"),
                       strict=True):  # fmt: skip
        y = np.asarray([np.nan if r[key] is None else r[key] for r in rows], float)
        ax.loglog(n, y, "o", alpha=0.5, label=key)
        fit = summary["fits"].get(key)
        if fit:
            ax.loglog(grid, fit["prefactor"] * grid ** fit["exponent"], "-", label="power-law fit")
            for s, e in fit["extrapolation"].items():
                ax.errorbar(float(s), e["fit"], yerr=[[e["fit"] - e["interval"][0]],
                            [e["interval"][1] - e["fit"]]], fmt="s", capsize=4)  # fmt: skip
        if key == "ortho_ratio":
            ax.loglog(grid, np.sqrt(rows[0]["rank"] / grid), "k--", label="random √(d/n)")
        if key == "t_cross_lambda":
            ax.axhline(1.0, color="k", ls=":", label="window closes (t×·λ = 1)")
        ax.set_xlabel("parameters n")
        ax.legend(fontsize=7)
    return [plotting.save(fig, pathlib.Path(fig_dir) / "scaling.png")]


def _plot_long(axes, summary: dict) -> None:
    """Long fine-tuning: the Fisher-weighted overlap against the KL drift, and harm against n."""
    ax_overlap, ax_harm = axes
    for size, e in summary["per_size"].items():
        if "long" not in e:
            continue
        ax_harm.errorbar(
            e["n"][0], e["long"]["du_kl"][1],
            yerr=[[e["long"]["du_kl"][1] - e["long"]["du_kl"][0]],
                  [e["long"]["du_kl"][2] - e["long"]["du_kl"][1]]],
            fmt="o", capsize=4, label=size,
        )  # fmt: skip
    for r in summary.get("long_records", []):
        ax_overlap.loglog(
            r["fisher_overlap"], r["du_kl"], "o", alpha=0.6, color=f"C{r['size_index']}"
        )
    ax_overlap.set_xlabel("‖F½PΔθ‖ after long fine-tuning")
    ax_overlap.set_ylabel("Δu_KL (harm)")
    ax_harm.set_xscale("log")
    ax_harm.set_yscale("log")
    ax_harm.set_xlabel("parameters n")
    ax_harm.set_ylabel("Δu_KL after long FT: median [min, max]")
    ax_harm.legend(fontsize=7)
