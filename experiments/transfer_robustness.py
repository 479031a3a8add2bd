"""Transfer learning and adversarial robustness: the companion paper in miniature.

docs/theory.md §5 (Turbal et al., arXiv:2501.00066) at small scale, end to end on the project's own
transformers and the synthetic synonym language (``quartic.tasks.synonyms``); the study itself is
``quartic.studies.transfer`` (its ``pipeline`` module lists the stages). Pretrain per (size,
architecture, seed); fine-tune on a small target task directly or through a large source task
(3 of the 6 pairs of the three bias tasks by default, full fine-tuning, LoRA on request); attack
the target test set with
the A2T attack at each query budget; compare with a bag-of-words baseline; and measure the bridge
to the first paper (the AIC quantities of the robustness loss at the start of the target
fine-tune) against ΔASR. The surface-form knob is swept over ``settings`` (``surface``: source
positives written only in privileged forms, negatives carrying decoys; ``plain``: no bias).

    quartic run transfer_robustness --quick   # 2 sizes, 1 setting (docs/results.md: its time)
    quartic run transfer_robustness           # the full run: 4 sizes, 5 seeds, 146 units, 1:12:30
                                              # on 2 cores, resumable
    quartic run transfer_robustness --set sizes=2k,7k,30k,100k,1m pretrain_lrs=encoder_1m:1e-3
                                              # + the 1M preset, its encoder at the rate its
                                              # probe sets (2:06 more on 2 cores)
    quartic run transfer_robustness --set pooling= probe_steps=0 lr=1e-3 target_steps=200 \
        n_seeds=3 pairs= lora_size=100k plain_sizes=2k,7k,30k
                                              # the study's first recipe and design (39 min,
                                              # models below word counts; docs/results.md)

The fine-tuning recipe is LP-FT with mean pooling (``StudyConfig``'s defaults): the 30k and 100k
decoders trained this way beat a word-count model on the same rows.
    -> ΔOAcc and ΔASR (points) per size and architecture beside the paper's GPT-2 number
       (+3.67 accuracy, +20.4 ASR), whether they rise/shrink with size, and the bridge's Spearman ρ
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np
from matplotlib.ticker import NullFormatter

from quartic.harness import plotting
from quartic.harness.runs import read_json
from quartic.models.transformer import PRESETS
from quartic.studies.transfer import pipeline
from quartic.studies.transfer import summary as transfer_summary

TITLE = "Transfer learning vs adversarial robustness (ΔOAcc, ΔASR by model size) and the AIC bridge"
QUICK_SECONDS = 490  # 8.1 min on 2 cores with empty caches, LP-FT defaults (2026-12-06)

#: The paper's one number: GPT-2 on hate speech, transfer − direct, in points.
PAPER = {"delta_oacc": 3.67, "delta_asr": 20.4}


@dataclasses.dataclass(frozen=True)
class Config(pipeline.StudyConfig):
    """The full study by default (4 sizes, both architectures, both settings, 3 pairs, 5 seeds)."""

    @classmethod
    def quick(cls) -> Config:
        return cls(
            sizes=("2k", "30k"),
            n_seeds=3,
            lora_size="2k",
            lora_archs=("decoder", "encoder"),
            n_source=1_600,
            n_val=200,
            n_test=200,
            settings=("surface",),
            pairs=("hate>political", "political>gender", "gender>hate"),
            corpus_size=4_000,
            pretrain_steps=600,
            source_steps=300,
            source_eval_every=100,
            target_steps=150,
            target_eval_every=25,
            n_val_eval=200,
            n_attack=200,
            bridge_examples=128,
        )


def run(config: Config, out_dir: pathlib.Path) -> dict:
    return pipeline.run(config, out_dir, extra={"paper": PAPER})


# ----------------------------------------------------------------------------------------------
# Table and figures


def _ci(interval: list | None, digits: int = 1) -> str:
    """`` [lo, hi]`` of a bootstrap interval, or nothing where there is none (an old summary, or
    fewer than two seeds)."""
    return "" if not interval else f" [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def _rho(rho: float | None, interval: list | None) -> str:
    """A Spearman ρ and its bootstrap interval, if any."""
    return "n/a" if rho is None else f"{rho:+.2f}{_ci(interval, 2)}"


def _pm(stats: dict | None, digits: int = 1) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    pm = f"{stats['mean']:+.{digits}f} ± {stats['std']:.{digits}f}"
    return pm + _ci(stats.get("interval"), digits)


def table(summary: dict) -> list[dict]:
    rows = transfer_summary.probe_rows(summary)
    b = summary["budgets"][0]
    paper = f"GPT-2 hate: {PAPER['delta_oacc']:+.2f} / {PAPER['delta_asr']:+.1f}"
    for cell in sorted(
        summary["cells"].values(), key=lambda c: (c["setting"], c["arch"], c["ft"], c["n_params"])
    ):
        rows.append(
            dict(
                quantity=(
                    f"[{cell['setting']}] {cell['arch']} {cell['size']} ({cell['n_params']:,} "
                    f"params, {cell['ft']}): ΔOAcc / ΔASR@{b} (points, mean ± std over seeds)"
                ),
                theory=paper,
                measured=f"{_pm(cell['delta_oacc'])} / {_pm(cell[f'delta_asr_{b}'])}",
                verdict="ASR up" if (cell[f"delta_asr_{b}"]["mean"] or 0) > 0 else "ASR down",
            )
        )
    for key, c in summary["claims"].items():
        setting, arch = key.split("|")
        measured = f"{c['n_sizes_asr_up']} of {len(c['sizes'])}"
        verdict = "holds" if c["transfer_raises_asr"] else "does not hold"
        if c.get("delta_asr_interval") is not None:
            above = sum(1 for ci in c["delta_asr_interval"] if ci and ci[0] > 0)
            measured += f" ({above} with the 95 % bootstrap interval above 0)"
            if c["transfer_raises_asr"] and above < len(c["sizes"]):
                verdict = "not shown (a size's interval reaches 0)"  # every mean > 0, not every CI
        rows.append(
            dict(
                quantity=f"[{setting}] {arch}: transfer raises ASR@{c['budget']} (sizes with ΔASR > 0)",
                theory="ΔASR > 0",
                measured=measured,
                verdict=verdict,
            )
        )
        slope, ci = c["slope_per_decade"], c.get("slope_interval")
        verdict = "holds" if c["rise_shrinks_with_size"] else "does not hold"
        if ci:
            verdict += (
                " (interval excludes 0)" if ci[0] > 0 or ci[1] < 0 else " (interval includes 0)"
            )
        rows.append(
            dict(
                quantity=f"[{setting}] {arch}: the ASR rise shrinks with size (slope of ΔASR per decade of params)",
                theory="< 0",
                measured="n/a" if slope is None else f"{slope:+.1f}{_ci(ci)}",
                verdict=verdict,
            )
        )
        m = c.get("asr_vs_margin")
        if m:
            rho = _rho(m["rho"], m["interval"])
            rows.append(
                dict(
                    quantity=f"[{setting}] {arch}: Spearman ρ(clean confidence margin, "
                    f"ASR@{c['budget']}) over {m['n']} attacked models (unit, arm, seed), full FT",
                    theory="",
                    measured=rho,
                    verdict="",
                )
            )
    for key, r in sorted(summary.get("bow_baseline", {}).items()):
        setting, task = key.split("|")
        rows.append(
            dict(
                quantity=(
                    f"[{setting}] {task}: bag-of-words logistic baseline, test accuracy (%) from "
                    f"{r['target_train']['n_rows']:,} target / {r['source_train']['n_rows']:,} "
                    "source rows"
                ),
                theory="",
                measured=(
                    f"{100 * r['target_train']['test_accuracy']:.1f} / "
                    f"{100 * r['source_train']['test_accuracy']:.1f}"
                ),
                verdict="",
            )
        )
    for key, r in summary.get("bridge", {}).items():
        setting, arch = key.split("|")
        for q in ("lambda_max", "overlap", "gamma_fisher"):
            rho = r["spearman_pairs"][q]
            rows.append(
                dict(
                    quantity=f"[{setting}] {arch} bridge: Spearman(Δ{q}, ΔASR) over pairs",
                    theory="",
                    measured="n/a" if rho is None else f"{rho:+.2f}",
                    verdict="",
                )
            )
            if "spearman_seeds_interval" in r:  # summaries before it lack it
                rows.append(
                    dict(
                        quantity=(
                            f"[{setting}] {arch} bridge: Spearman(Δ{q}, ΔASR) over (pair, seed) "
                            f"points [{transfer_summary.LEVEL:.0%} bootstrap interval]"
                        ),
                        theory="",
                        measured=_rho(r["spearman_seeds"][q], r["spearman_seeds_interval"][q]),
                        verdict="",
                    )
                )
    for row in rows:
        row["experiment"] = "transfer_robustness"
    return rows


def _bars(stats: list[dict]) -> np.ndarray:
    """``[2, n]`` error bars: to the ends of each cell's bootstrap interval of the mean over
    seeds, or ± its std over seeds where it has none (an old summary, a LoRA cell)."""
    lo_hi = [s.get("interval") or [s["mean"] - s["std"], s["mean"] + s["std"]] for s in stats]
    means = np.array([s["mean"] for s in stats])
    return np.abs(np.array(lo_hi).T - means)


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    summary = read_json(pathlib.Path(out_dir) / "summary.json")
    b = summary["budgets"][0]
    cells = list(summary["cells"].values())
    archs = sorted({c["arch"] for c in cells})
    settings = sorted({c["setting"] for c in cells}, reverse=True)
    paths = []
    fig, axes = plotting.figure(2, max(len(archs), 1), size=(4.4, 3.2))
    for j, arch in enumerate(archs):
        for row, (key, label, ref) in enumerate(
            ((f"delta_asr_{b}", f"ΔASR@{b} (points)", PAPER["delta_asr"]),
             ("delta_oacc", "ΔOAcc (points)", PAPER["delta_oacc"]))
        ):  # fmt: skip
            ax = axes[row, j]
            for i, setting in enumerate(settings):
                for ft, marker in (("full", "o-"), ("lora", "s")):
                    sel = sorted(
                        (c for c in cells if c["arch"] == arch and c["setting"] == setting
                         and c["ft"] == ft and c[key]["mean"] is not None),
                        key=lambda c: c["n_params"],
                    )  # fmt: skip
                    if not sel:
                        continue
                    x = np.array([c["n_params"] for c in sel]) * (1.06 if ft == "lora" else 1)
                    ax.errorbar(
                        x, [c[key]["mean"] for c in sel], yerr=_bars([c[key] for c in sel]),
                        fmt=marker, color=f"C{i}", capsize=3, ms=4,
                        mfc="white" if ft == "lora" else None,
                        label=f"{setting}" + (" (LoRA)" if ft == "lora" else ""),
                    )  # fmt: skip
            ax.axhline(0.0, color="k", lw=0.8)
            ax.axhline(ref, color="0.5", ls=":", lw=1.2, label="paper: GPT-2, hate")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("parameters")
            ax.set_ylabel(label)
            ax.set_title(
                f"{arch}: transfer − direct (bars: {transfer_summary.LEVEL:.0%} interval, seeds)",
                fontsize=9,
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    paths.append(plotting.save(fig, pathlib.Path(fig_dir) / "transfer_robustness.png"))

    if len(settings) > 1:
        fig, axes = plotting.figure(1, max(len(archs), 1), size=(4.4, 3.2))
        sizes = sorted({c["size"] for c in cells}, key=lambda s: PRESETS[s][0])
        for j, arch in enumerate(archs):
            ax = axes[0, j]
            width = 0.8 / len(settings)
            for i, setting in enumerate(settings):
                sel = {c["size"]: c for c in cells if c["arch"] == arch and
                       c["setting"] == setting and c["ft"] == "full"}  # fmt: skip
                xs = [k + (i - (len(settings) - 1) / 2) * width for k in range(len(sizes))]
                ys = [sel[s][f"delta_asr_{b}"]["mean"] if s in sel else np.nan for s in sizes]
                es = [sel[s][f"delta_asr_{b}"]["std"] if s in sel else np.nan for s in sizes]
                sb = summary["settings"][setting]
                ax.bar(xs, ys, width, yerr=es, capsize=2, color=f"C{i}",
                       label=f"{setting} (surface_bias {sb['surface_bias']:g}, decoys {sb['decoy_rate']:g})")  # fmt: skip
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels(sizes)
            ax.set_xlabel("model size")
            ax.set_ylabel(f"ΔASR@{b} (points)")
            ax.set_title(f"{arch}: the surface-form knob", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6)
        paths.append(plotting.save(fig, pathlib.Path(fig_dir) / "transfer_robustness_surface.png"))

    bridge = summary.get("bridge", {})
    if bridge:
        labels = {"lambda_max": "Δ λ_max(∇²L_R)", "overlap": "Δ overlap ‖Pg‖/‖g‖",
                  "gamma_fisher": "Δ coupling γ_F"}  # fmt: skip
        fig, axes = plotting.figure(1, len(labels), size=(3.6, 3.1))
        for j, (q, label) in enumerate(labels.items()):
            ax = axes[0, j]
            for i, (key, rec) in enumerate(sorted(bridge.items())):
                xs = [v for p in rec["per_pair"].values() for v in p[q]]
                ys = [np.nan if a is None else a for p in rec["per_pair"].values()
                      for a in p["delta_asr"]]  # fmt: skip
                ci = rec.get("spearman_seeds_interval", {}).get(q)
                tag = _rho(rec["spearman_seeds"][q], ci)
                ax.plot(
                    xs, ys, "o", ms=3.5, color=f"C{i}", label=f"{key.replace('|', ', ')}: ρ {tag}"
                )
            ax.axhline(0.0, color="k", lw=0.6)
            ax.axvline(0.0, color="k", lw=0.6)
            ax.set_xlabel(f"{label}, transfer − direct")
            ax.set_ylabel(f"ΔASR@{b} (points)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(
            f"bridge at the start of the target fine-tune ({next(iter(bridge.values())).get('size', '')} "
            "model; one point per pair and seed)", fontsize=9,
        )  # fmt: skip
        paths.append(plotting.save(fig, pathlib.Path(fig_dir) / "transfer_robustness_bridge.png"))
    return paths


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "transfer_robustness", *sys.argv[1:]]))
