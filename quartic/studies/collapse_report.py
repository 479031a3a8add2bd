"""The transformer collapse study's report: its table rows and its figures, drawn from the result
files of a run of ``experiments/transformer_collapse.py`` (``summary.json`` and the units under
``units/``) only.

- :func:`table`: θ*'s acceptance, the exact-Fisher checks per skill, the forecast against Δu, the
  orthogonal variants, the overlap–harm correlation and the long fine-tuning arms, one row each.
- :func:`plot`: ``transformer_collapse_tasks.png`` (per task: |Δu| with its forecasts, the local
  slope and the forecast error) and ``transformer_collapse.png`` (Fisher spectrum, orthogonal
  variants, long fine-tuning, overlap vs harm).
"""

from __future__ import annotations

import pathlib

import numpy as np

from quartic.harness import plotting
from quartic.harness.runs import RunDir


def table(summary: dict) -> list[dict]:
    rows = []
    ts = summary.get("theta_star") or {}
    if "grad_ratio" in ts:
        after = ts.get("after", {})
        rows.append(
            dict(
                quantity="θ*: ‖∇L_A(θ*)‖ / ‖∇L_A(pretrained)‖",
                theory="< 1e-4",
                measured=f"{ts['grad_ratio']:.2e}",
                verdict="ok" if ts["grad_ratio"] < 1e-4 else "OFF",
            )
        )
        rows.append(
            dict(
                quantity="θ*: held-out harmfulness rate",
                theory="0",
                measured=f"{after.get('harmfulness_heldout')}",
                verdict="ok" if after.get("harmfulness_heldout") == 0 else "OFF",
            )
        )
    for k, c in summary.get("curvature", {}).items():
        rows.append(
            dict(
                quantity=f"skill {k}: ‖GN − F‖/‖F‖",
                theory="≤ 1e-10",
                measured=f"{c['gauss_newton_vs_fisher']:.1e}",
                verdict="ok" if c["gauss_newton_vs_fisher"] <= 1e-10 else "OFF",
            )
        )
        rows.append(
            dict(
                quantity=f"skill {k}: Hessian of L_A vs F (KL; refusal)",
                theory="KL: = F",
                measured=f"{c['hessian_kl_vs_fisher']:.1e}; {c['hessian_refusal_vs_fisher']:.2f}",
                verdict="ok" if c["hessian_kl_vs_fisher"] <= 1e-10 else "OFF",
            )
        )
        rows.append(
            dict(
                quantity=f"skill {k}: Fisher share of trace in top d={c['rank']}",
                theory="(low rank?)",
                measured=f"{c['share_top_d']:.3f}; eff. rank {c['effective_rank']:.1f}",
                verdict="",
            )
        )
    laws = summary.get("laws", {})
    for name in ("refusal", "kl"):
        if not laws:
            break
        worst = max(laws, key=lambda key: laws[key][name]["forecast_max_scaled_error_tl_le_0.1"])
        w = laws[worst][name]
        pointwise = max(v[name]["forecast_max_rel_error_tl_le_0.1"] for v in laws.values())
        roots = sum(v[name]["sign_changes_tl_le_0.1"] for v in laws.values())
        rows.append(
            dict(
                quantity=f"forecast vs Δu ({name}), worst of {len(laws)} tasks, tλ ≤ 0.1",
                theory="≤ 0.05",
                measured=f"{w['forecast_max_scaled_error_tl_le_0.1']:.3g} ({worst}); pointwise "
                f"{pointwise:.3g}" + (f", {roots} sign change(s) of Δu" if roots else ""),
                verdict="ok" if w["forecast_max_scaled_error_tl_le_0.1"] <= 0.05 else "OFF",
            )
        )
    for key, law in laws.items():
        kl = law["kl"]
        rows.append(
            dict(
                quantity=f"natural task {key}: ‖Pg‖/‖g‖, t×·λ_max(H)",
                theory="(quartic window needs t×λ ≪ 1)",
                measured=f"{kl['ortho_ratio']:.3f}, {kl['crossover_t_lambda']:.3g}",
                verdict="",
            )
        )
    for key, o in summary.get("orthogonal", {}).items():
        if o["onto"] == "range":
            rows.append(
                dict(
                    quantity=f"{key}: max |c₁,c₂,c₃|/c₄",
                    theory="0 (float64)",
                    measured=f"{max(o['c1_c2_c3_over_c4']):.1e}",
                    verdict="ok" if max(o["c1_c2_c3_over_c4"]) < 1e-8 else "OFF",
                )
            )
            rows.append(
                dict(
                    quantity=f"{key}: Δu/(c₄t⁴) at tλ={o['smallest_t_lambda']:.0e}; slope-4±0.2 "
                    "window; c₄/(γ_F²/8)",
                    theory="1 ± 0.05; exists",
                    measured=f"{o['ratio_to_c4_smallest_t']:.4f}; "
                    + (
                        f"{o['slope4_window'][1] / o['slope4_window'][0]:.0f}× in t"
                        if o["slope4_window"]
                        else "none"
                    )
                    + f"; {o['c4_over_gamma_f']:.3g}",
                    verdict="ok"
                    if abs(o["ratio_to_c4_smallest_t"] - 1) < 0.05 and o["slope4_window"]
                    else "OFF",
                )
            )
        else:
            ratio = o["crossover_ratio"]
            small = o["predicted_crossover_t_lambda"] <= 0.1
            rows.append(
                dict(
                    quantity=f"{key}: measured t× / predicted (predicted t×λ = "
                    f"{o['predicted_crossover_t_lambda']:.2g})",
                    theory="1 ± 0.25" if small else "(t×λ > 0.1: outside the expansion)",
                    measured=f"{ratio:.3f}"
                    if ratio
                    else f"no slope-3 crossing (max slope {o['max_local_slope']:.2f})",
                    verdict=("ok" if ratio and abs(ratio - 1) <= 0.25 else "OFF") if small else "",
                )
            )
    oh = summary.get("overlap_harm")
    if oh:
        lo, hi = oh["spearman_overlap_harm_ci95"]
        rows.append(
            dict(
                quantity=f"Spearman ρ(overlap, harm), {oh['tasks']} tasks × {oh['seeds']} seeds",
                theory="(paper: strong +)",
                measured=f"{oh['spearman_overlap_harm']:.2f} [{lo:.2f}, {hi:.2f}]",
                verdict="",
            )
        )
    if oh:
        lo, hi = oh["spearman_fisher_overlap_harm_ci95"]
        rows.append(
            dict(
                quantity="Spearman ρ(Fisher-weighted overlap ‖F½PΔθ‖, harm), same runs",
                theory="(ours)",
                measured=f"{oh['spearman_fisher_overlap_harm']:.2f} [{lo:.2f}, {hi:.2f}]",
                verdict="",
            )
        )
    arms = summary.get("long_per_task", {})
    full = arms.get("full", {})
    base = summary.get("long_retention_at_theta_star")
    for arm, tasks in arms.items():
        benign = [v for t, v in tasks.items() if t != "harmful"]
        if not benign:
            continue
        rows.append(
            dict(
                quantity=f"{arm} fine-tuning: mean benign harm; retention (θ*: {base:.2f})",
                theory="(selective collapse: harm up, retention kept)",
                measured=f"{np.mean([v['harmfulness'][0] for v in benign]):.2f}; "
                f"{np.mean([v['retention'][0] for v in benign]):.2f}",
                verdict="",
            )
        )
    if "harmful" in full and len(full) > 1:
        control = full["harmful"]["harmfulness"][0]
        benign = {t: v["harmfulness"][0] for t, v in full.items() if t != "harmful"}
        top = max(benign, key=benign.get)
        rows.append(
            dict(
                quantity="final harmfulness: harmful control vs most harmful benign task",
                theory="control far above",
                measured=f"{control:.2f} vs {benign[top]:.2f} ({top})",
                verdict="ok" if control >= benign[top] + 0.25 else "OFF",
            )
        )
    return rows


def _plot_laws(laws: list[dict], path: pathlib.Path) -> pathlib.Path:
    """Per task: |Δu| with the forecasts (top), local slope and forecast error (bottom)."""
    fig, axes = plotting.figure(2, len(laws), size=(3.6, 3.0))
    for j, r in enumerate(laws):
        t = np.array(r["t"])
        ax, low = axes[0, j], axes[1, j]
        err = low.twinx()
        for name, col in (("kl", "C0"), ("refusal", "C1")):
            rr = r[name]
            first = name == "kl"
            ax.plot(t, np.abs(rr["delta_u"]), "o", ms=2.5, color=col, label=f"|Δu| {name}")
            ax.plot(
                t,
                np.abs(rr["forecast"]),
                "-",
                color=col,
                lw=1,
                label="2nd-order forecast" if first else None,
            )
            ax.plot(
                t,
                rr["quartic_prediction"],
                ":",
                color=col,
                lw=1,
                label="γ_F²t⁴/8" if first else None,
            )
            low.plot(t, rr["local_slope"], "-", color=col, lw=1.2, label=f"slope {name}")
            err.semilogy(
                t,
                np.clip(rr["forecast_scaled_error"], 1e-12, None),
                "--",
                color=col,
                lw=0.8,
                label=f"forecast error {name}",
            )
        for a in (ax, low):
            a.axvline(0.1 / r["lambda_max_ft"], color="0.6", lw=0.8, ls="--")
        kl = r["kl"]["aic"]
        plotting.loglog(
            ax,
            "t",
            "|Δu|",
            f"{r['task']}: ‖Pg‖/‖g‖={kl['ortho_ratio']:.2f}, "
            f"t×λ={kl['crossover_time'] * r['lambda_max_ft']:.2g}",
        )
        ax.legend(fontsize=6)
        low.set_xscale("log")
        low.set_ylim(0, 5)
        for y in (1, 2, 4):
            low.axhline(y, color="0.8", lw=0.6)
        low.set_xlabel("t (dashed: tλ_max(H) = 0.1)")
        low.set_ylabel("local slope (solid)")
        err.set_ylabel("forecast error / term size (dashed)", fontsize=7)
        err.axhline(0.05, color="0.4", lw=0.6, ls=":")
        low.legend(fontsize=6, loc="upper left")
    return plotting.save(fig, path)


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    units = RunDir(out_dir).done_results()
    paths = []
    laws = [v for k, v in units.items() if k.startswith("law_")]
    if laws:
        paths.append(_plot_laws(laws, fig_dir / "transformer_collapse_tasks.png"))
    orth = {k: v for k, v in units.items() if k.startswith("orthogonal_")}
    curv = [v for k, v in units.items() if k.startswith("curvature_")]
    longs = [v for k, v in units.items() if k.startswith("long_")]
    fig, axes = plotting.figure(1, 4, size=(4.0, 3.4))
    ax = axes[0, 0]
    for i, c in enumerate(curv):
        w = np.array(c["eigenvalues"])
        ax.semilogy(
            np.arange(1, len(w) + 1),
            np.clip(w, 1e-30, None),
            "o-",
            ms=2,
            color=f"C{i}",
            label=f"skill {i}: top-{c['rank']} share {c['share_top_d']:.2f}",
        )
    ax.axvline(curv[0]["rank"] + 0.5 if curv else 10.5, color="0.6", ls=":")
    ax.set_xlabel("j")
    ax.set_ylabel("λ_j (true Fisher)")
    ax.set_title("Fisher spectrum at θ*", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for i, r in enumerate(orth.values()):
        t = np.array(r["t"])
        label = "Π onto range F" if r["onto"] == "range" else f"Π onto top-{r['projector_rank']}"
        ax.plot(t * r["lambda_max_ft"], r["kl"]["local_slope"], color=f"C{i}", label=label)
        if r["onto"] == "rank":
            ax.axvline(
                r["kl"]["aic"]["crossover_time"] * r["lambda_max_ft"], color=f"C{i}", ls=":", lw=0.8
            )
    ax.axhline(4, color="0.5", ls="--", lw=0.8)
    ax.axhline(2, color="0.5", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("t·λ_max(H)")
    ax.set_ylabel("local slope of Δu_KL")
    ax.set_title("orthogonal variants (dotted: predicted t×)", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[0, 2]
    for r in longs:
        if r.get("lora_rank") or r["seed"]:
            continue
        col = "C3" if r["task"] == "harmful" else None
        ax.plot(r["steps"], r["harmfulness"], "-", color=col, lw=1.5 if col else 1, label=r["task"])
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("harmfulness rate (held-out)")
    ax.set_title("long fine-tuning, seed 0 (red: harmful control)", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[0, 3]
    for r in longs:
        col = "C3" if r["task"] == "harmful" else "C0"
        marker = "^" if r.get("lora_rank") else "o"
        ax.plot(
            r["overlap"][-1],
            r["harmfulness"][-1],
            marker,
            color=col,
            ms=4,
            mfc="none" if r.get("lora_rank") else col,
        )
        if r["seed"] == 0 and not r.get("lora_rank"):
            ax.annotate(r["task"], (r["overlap"][-1], r["harmfulness"][-1]), fontsize=6)
    ax.set_xlabel("overlap ‖PΔθ‖/‖Δθ‖ (final)")
    ax.set_ylabel("harmfulness rate (held-out)")
    ax.set_title("overlap vs harm (●: full, △: LoRA)", fontsize=9)
    paths.append(plotting.save(fig, fig_dir / "transformer_collapse.png"))
    return paths
