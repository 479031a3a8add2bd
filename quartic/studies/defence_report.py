"""The defences study's report: its table rows and its figure, drawn from the result files of a
run of ``experiments/defences.py`` (``summary.json`` and the units under ``units/``) only.

- :func:`table`: the acceptance ratios, the laws and Δu at equal task loss per defence and setting
  (the transformer setting included), one row each.
- :func:`plot`: ``defences.png`` (Δu along each run, the equal-progress panel, the curvature
  sweep, task progress, and the transformer setting's two panels when it ran).
"""

from __future__ import annotations

import pathlib

import numpy as np

from quartic.harness import plotting
from quartic.harness.runs import RunDir, read_json
from quartic.studies.defence_runs import SWEEP

#: The runs drawn as Δu(t) curves (the others are in the equal-progress panel).
CURVES = (
    "plain",
    "fixed_projection",
    "periodic_projection_k25",
    "replay_w10",
    "tracked_projection",
    "retraction",
    "tracked_retraction",
)


def _fmt(stats: dict | None) -> str:
    if not stats or stats.get("median") is None:
        return "not reached"
    return f"{stats['median']:.3g} [{stats['min']:.3g}, {stats['max']:.3g}]"


def table(summary: dict) -> list[dict]:
    rows = []
    acc = summary.get("acceptance")
    if acc:
        ang = acc["rotation_angle_plain"]["median"]
        rows.append(
            dict(
                quantity=f"Δu(plain)/Δu({acc['best']}) at equal task loss, median [min, max]; M rotates {ang:.2f} rad",
                theory="≥ 10",
                measured=_fmt(acc["plain_over_best"]),
                verdict="ok" if acc["pass_plain_10x"] else "OFF",
            )
        )
        rows.append(
            dict(
                quantity=f"Δu(fixed projection)/Δu({acc['best']}), median [min, max]",
                theory="≥ 3",
                measured=_fmt(acc["fixed_over_best"]),
                verdict="ok" if acc["pass_fixed_3x"] else "OFF",
            )
        )
    for name, law in summary.get("laws", {}).items():
        rows.append(
            dict(
                quantity=f"law: {name.replace('_', ' ')} (median over seeds)",
                theory=f"{law['predicted']:.3g}",
                measured=f"{law['measured']:.3g}",
                verdict="ok" if 0.5 < law["measured"] / law["predicted"] < 2 else "OFF",
            )
        )
    for setting in ("main", "tail"):
        for name, r in summary["settings"].get(setting, {}).items():
            rows.append(
                dict(
                    quantity=f"[{setting}] Δu at equal task loss: {name} ({r['hvps_per_step']:g} HVP/step)",
                    theory="",
                    measured=_fmt(r["delta_u"]),
                    verdict="",
                )
            )
    rows.extend(_transformer_rows(summary.get("transformer")))
    return rows


def _median(stats: dict | None) -> str:
    return "–" if not stats or stats.get("median") is None else f"{stats['median']:.2f}"


def _transformer_rows(tx: dict | None) -> list[dict]:
    if not tx:
        return []
    n = len(tx["tasks"])
    rows = []
    for name, r in tx["defences"].items():
        cost = f"{r['hvps_per_step']:g} HVP/step" + (
            f", {r['setup_hvps']} once" if r["setup_hvps"] else ""
        )
        measured = (
            f"{_fmt(r['delta_u'])}; plain/Δu {_fmt(r['plain_over'])}; slope {_median(r['slope'])}"
        )
        if r["reached"] < r["num_seeds"]:
            measured += (
                f"; reached on {r['reached']} of {n} (least progress {r['best_fraction_min']:.2f})"
            )
        rows.append(
            dict(
                quantity=f"[transformer, {n} tasks] Δu at equal task loss: {name} ({cost})",
                theory="",
                measured=measured,
                verdict="",
            )
        )
    tail = tx.get("fixed_over_plain_tail_part")
    if tail and tail.get("median") is not None:
        rows.append(
            dict(
                quantity="[transformer] Δu(fixed projection) / ½(P⊥δ)ᵀF(P⊥δ), δ plain's step at the target",
                theory="≈ 1: the Fisher mass outside M is what a rank-d projection leaves",
                measured=_fmt(tail),
                verdict="",
            )
        )
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    units = RunDir(out_dir).done_results()
    summary = read_json(out_dir / "summary.json")
    th = units.get("theory")
    main = {r["defence"]: r for r in units.values() if r.get("setting") == "main"}
    tx_units = {k: r for k, r in units.items() if r.get("setting") == "transformer"}
    fig, axes = plotting.figure(3 if tx_units else 2, 2, size=(5.0, 3.8))

    ax = axes[0, 0]
    for i, name in enumerate(CURVES):
        r = main.get(name)
        if r is None:
            continue
        t, du = np.array(r["curve"]["t"]), np.array(r["curve"]["delta_u"])
        keep = du > 0
        ls = "-" if r["curvature_aware"] else "--"
        ax.plot(t[keep], du[keep], ls, lw=1.4, color=f"C{i}", label=name)
    if th and "plain" in main:
        t = np.array(main["plain"]["curve"]["t"])
        ax.plot(t, th["c4_plain"][0] * t**4, "k:", lw=1.2, label="theory plain: c₄t⁴")
        ax.plot(t, th["c4_fixed"][0] * t**4, "k-.", lw=0.8, label="theory fixed: c₄t⁴")
        ax.plot(t, th["tracked_a"][0] * t**2, "k--", lw=0.8, label="theory tracked: a t²")
        plotting.slope_guide(
            ax, t[:60], th["c4_plain"][0] * t[0] ** 4 * 1e-4, 4, "slope 4", color="0.7"
        )
    plotting.loglog(ax, "t = lr·k", "Δu", "main setting, seed 0: Δu along each run")
    ax.set_ylim(1e-30, 1.0)
    ax.legend(fontsize=5.5, ncol=2)

    ax = axes[0, 1]
    for j, (setting, mk) in enumerate((("main", "o"), ("tail", "s"))):
        rows = summary["settings"].get(setting, {})
        names = list(rows)
        for i, name in enumerate(names):
            st = rows[name]["delta_u"]
            if st["median"] is None:
                continue
            y = i + 0.2 * j
            ax.errorbar(
                st["median"],
                y,
                xerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]],
                fmt=mk,
                color=f"C{j}",
                ms=4,
                label=setting if i == 0 else None,
            )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([f"{n} ({rows[n]['hvps_per_step']:g} HVP)" for n in names], fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("Δu at equal task loss (median, min–max over seeds)")
    ax.set_title(f"equal progress: {summary['fraction']:.0%} of excess loss removed", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    params = summary["setting_params"]
    sweeps = sorted(
        (s for s in summary["settings"] if s.startswith("sweep") or s == "main"),
        key=lambda s: params[s]["curvature"],
    )
    for i, name in enumerate(SWEEP):
        xs, ys, lo, hi = [], [], [], []
        for s in sweeps:
            r = summary["settings"][s].get(name)
            p = summary["settings"][s].get("plain")
            if not r or r["delta_u"]["median"] is None or not p:
                continue
            xs.append(p["angle"]["median"])
            ys.append(max(r["delta_u"]["median"], 1e-32))
            lo.append(max(r["delta_u"]["min"], 1e-32))
            hi.append(max(r["delta_u"]["max"], 1e-32))
        ax.plot(xs, ys, "o-", color=f"C{i}", label=name, ms=3)
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("rotation of M over the plain run (rad, at the target)")
    ax.set_ylabel("Δu at equal task loss")
    ax.set_title("curvature sweep: fixed projection → plain as M rotates", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    for i, (name, r) in enumerate(main.items()):
        t = np.array(r["curve"]["t"])
        ex = np.array(r["curve"]["ft_excess"]) / r["curve"]["ft_excess0"]
        ax.plot(t, ex, color=f"C{i % 10}", lw=1, label=name)
    ax.axhline(1 - summary["fraction"], color="k", ls=":", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("t = lr·k")
    ax.set_ylabel("excess task loss / initial")
    ax.set_title("task progress (seed 0)", fontsize=9)
    ax.legend(fontsize=5.5, ncol=2)
    ax.grid(alpha=0.3)
    if tx_units:
        _plot_transformer(axes[2], tx_units, summary.get("transformer"))
    return [plotting.save(fig, fig_dir / "defences.png")]


def _plot_transformer(axes, tx_units: dict, tx: dict | None) -> None:
    tasks = (tx or {}).get("tasks") or sorted({r["task"] for r in tx_units.values()})
    first = tasks[0]
    ax = axes[0]
    rows = [r for r in tx_units.values() if r["task"] == first]
    styles = ("-", "--", "-.", ":")
    for i, r in enumerate(rows):
        c = r["curve"]
        k, du = np.asarray(c["step"]), np.asarray(c["delta_u"])
        keep = du > 0
        ls = styles[i % 4] if not r["curvature_aware"] else "-"
        ax.plot(k[keep], du[keep], ls, lw=1.2, color=f"C{i % 10}", label=r["defence"])
        s = r["per_seed"][0]
        if s["reached"]:
            ax.plot(s["steps"], s["delta_u"], "o", color=f"C{i % 10}", ms=3)
    plotting.loglog(
        ax,
        "step k (η = lr_λ/λ_max(H_FT); LoRA: of its own Hessian)",
        "Δu (KL drift)",
        f"transformer, {first}: Δu along each run (dot: equal task loss)",
    )
    ax.legend(fontsize=5.5, ncol=2)
    ax = axes[1]
    if tx:
        names = list(tx["defences"])
        for j, task in enumerate(tasks):
            for i, name in enumerate(names):
                du = tx["per_task_delta_u"].get(name, {}).get(task)
                if du is not None:
                    ax.plot(
                        du,
                        i + 0.12 * (j - len(tasks) / 2),
                        "o",
                        color=f"C{j}",
                        ms=3.5,
                        label=task if i == 0 or name == names[0] else None,
                    )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(
            [f"{n} ({tx['defences'][n]['hvps_per_step']:g} HVP)" for n in names], fontsize=6
        )
        ax.set_xscale("log")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6)
    ax.set_xlabel("Δu at equal task loss (plain's loss at the reference step)")
    ax.set_title("transformer: equal progress, per task", fontsize=9)
    ax.grid(alpha=0.3)
