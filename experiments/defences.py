"""Defences against alignment collapse at equal fine-tuning progress (docs/defences.md).

On the curved family (``φ(θ) = θ + c‖θ‖²``: the Fisher's top subspace M(θ) rotates as θ moves;
AIC exact at θ*: Pg = 0, no Fisher tail), every defence of :mod:`quartic.studies.defences` fine-tunes by
full-batch steps of size ``lr`` until the task loss has lost ``fraction`` of its initial excess
``L_FT(θ*) − min L_FT``; Δu is read there (interpolated between the two bracketing steps). Also:
the same with a Fisher tail (a first-order leak no rank-d defence removes), and a sweep over the
curvature ``‖c‖`` (how far M rotates) for the projection defences. Figures overlay the predicted
leading terms (c₄t⁴ for the plain and fixed-projection flows, ``a t²`` for tracking).

The ``transformer`` setting runs the same defences on the small aligned transformer
(:mod:`quartic.studies.collapse_tasks`: L_A = the KL drift on a harm category, whose Hessian at θ* is the
true Fisher; L_FT = each benign task's LM loss), with ``lr = lr_λ/λ_max(H_FT(θ*))`` per task and
equal progress = the task loss plain fine-tuning has after ``transformer_ref_steps`` steps; it also
records why the projections stop where they do (the Fisher mass of the step outside M).

    quartic run defences --quick        # about 2 min on a 2-core CPU (5 seeds; 2 transformer tasks)
    quartic run defences                # about 10 min (8 seeds; 6 tasks, tracked defences)
    -> M rotates ~0.18 rad; the fixed projection ≈ plain (ratio ~1); periodic (k = 25) ~50× and
       tracked ~3e4× less Δu than plain; the retractions ≥ 1e6×; with a Fisher tail every
       projection is floored at the tail's t² leak (~150× below plain); laws k² and K² reproduced;
       transformer: every projection ~6× below plain, stopped by the Fisher tail outside M
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import numpy as np

import quartic as q
from quartic.harness import plotting
from quartic.harness.runs import RunDir, read_json, run_sweep, write_json_atomic
from quartic.studies import defences as D
from quartic.studies.defence_runs import (
    SWEEP,
    laws,
    summarise_setting,
    summarise_transformer,
    units,
)
from quartic.tasks import token_world as tw

TITLE = (
    "Defences at equal task loss on the rotating curved family: plain, projections, curvature-aware"
)
QUICK_SECONDS = 120  # 45 s on the curved family + ~90 s for 2 transformer tasks (load ~3)

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


@dataclasses.dataclass(frozen=True)
class Config:
    n: int = 40
    d: int = 4
    coupling: float = 0.5
    h_min: float = 1.0
    h_max: float = 5.0
    quartic: float = 0.1  # β of L_FT's ‖θ‖⁴ term
    curvature: float = 2.0  # ‖c‖ of the main setting
    tail: float = 0.01  # Fisher mass outside M in the "tail" setting
    sweep_curvatures: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0)  # and the main curvature
    fraction: float = 0.5  # equal progress: this fraction of the initial excess task loss removed
    lr: float = 0.001
    num_steps: int = 500
    num_seeds: int = 8
    every: int = 25  # periodic projection: recompute M every this many steps
    anchor_mu: float = 0.5
    replay_weight: float = 10.0
    lora_rank: int = 4  # task-aligned (Krylov) low-rank restriction
    lora_random_ranks: tuple[int, ...] = (20, 30)
    only: tuple[str, ...] = ()  # run only these defences (by name); empty: all
    seed: int = 0
    # the small transformer (quartic.studies.collapse_tasks, docs/defences.md §5); () leaves it out
    transformer_tasks: tuple[str, ...] = tw.BENIGN_TASKS
    transformer_preset: str = "2k"
    transformer_category: int = 0
    transformer_rank: int = 10
    transformer_lr_lambda: float = 0.5  # η·λ_max(Hessian of the trained parameters at θ*)
    transformer_ref_steps: int = 100  # equal progress: plain's task loss after this many steps
    transformer_num_steps: int = 200
    transformer_every: int = 25  # periodic projection
    transformer_anchor: float = 0.5  # L2 anchor μ = this / t_ref (t_ref = η·ref_steps)
    transformer_replay: float = 1.0  # replay weight w = this · λ_max(H_FT) / λ_1(F)
    transformer_lowrank: int = 4  # LoRA-like: the fixed Krylov subspace of L_FT at θ* (0: none)
    transformer_lora_rank: int = 2  # LoRA (A B on every dense kernel), its own η
    transformer_tracked: bool = True  # tracked projection and retraction (d + 2 HVPs a step)

    @classmethod
    def quick(cls) -> Config:
        return cls(
            num_seeds=5,
            sweep_curvatures=(0.0, 0.5, 1.0, 3.0),
            transformer_tasks=("sort", "addition"),
            transformer_ref_steps=60,
            transformer_num_steps=120,
            transformer_lowrank=0,
            transformer_tracked=False,
        )

    def __post_init__(self):
        unknown = sorted(set(self.transformer_tasks) - set(tw.BENIGN_TASKS))
        if unknown:
            raise q.QuarticError(f"unknown task(s) {unknown}; choose from {list(tw.BENIGN_TASKS)}")
        if not 0 < self.transformer_ref_steps < self.transformer_num_steps:
            raise q.QuarticError("need 0 < transformer_ref_steps < transformer_num_steps")

    def spec(self, tail: float = 0.0) -> q.QuadraticSpec:
        return q.QuadraticSpec(
            n=self.n, d=self.d, coupling=self.coupling, h_range=(self.h_min, self.h_max), tail=tail
        )

    def defences(self) -> list[D.Defence]:
        every = self._all_defences()
        if not self.only:
            return every
        self._check_only()
        return [d for d in every if d.name in self.only]

    def transformer_defences(self) -> list[str]:
        """The transformer setting's defences, by name (built per task: :func:`_tx_defence`)."""
        names = [
            "plain",
            "fixed_projection",
            f"periodic_projection_k{self.transformer_every}",
            f"anchor_tref{self.transformer_anchor:g}",
            f"replay_c{self.transformer_replay:g}",
            f"lora_r{self.transformer_lora_rank}",
            "retraction",
        ]
        if self.transformer_lowrank:
            names.insert(5, f"lowrank_krylov_r{self.transformer_lowrank}")
        if self.transformer_tracked:
            names += ["tracked_projection", "tracked_retraction"]
        if not self.only:
            return names
        self._check_only()
        return [n for n in names if n in self.only]

    def _check_only(self):
        names = {d.name for d in self._all_defences()}
        if self.transformer_tasks:
            names |= set(dataclasses.replace(self, only=()).transformer_defences())
        unknown = set(self.only) - names
        if unknown:
            raise q.QuarticError(f"unknown defences {sorted(unknown)}; known: {sorted(names)}")

    def _all_defences(self) -> list[D.Defence]:
        return [
            D.Plain(),
            D.FixedProjection(),
            D.PeriodicProjection(every=self.every),
            D.Anchor(mu=self.anchor_mu),
            D.Replay(weight=self.replay_weight),
            D.LowRank(lora_rank=self.lora_rank, basis="krylov"),
            *[D.LowRank(lora_rank=r, basis="random") for r in self.lora_random_ranks],
            D.TrackedProjection(),
            D.Retraction(tracked=False),
            D.Retraction(tracked=True),
        ]

    def settings(self) -> dict[str, tuple[float, float]]:
        """name -> (curvature, tail)."""
        out = {"main": (self.curvature, 0.0), "tail": (self.curvature, self.tail)}
        for c in self.sweep_curvatures:
            out[f"sweep_c{c:g}"] = (c, 0.0)
        return out


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    sweep = run_sweep(units(config), out_dir, desc="defences")
    res = sweep.results
    settings = {s: summarise_setting(res, s) for s in config.settings()}
    main = settings["main"]
    aware = {k: v for k, v in main.items() if v["curvature_aware"] and v["delta_u"]["median"]}
    best = min(aware, key=lambda k: aware[k]["delta_u"]["median"]) if aware else None
    acceptance = None
    if best is not None:
        b = main[best]
        acceptance = {
            "best": best,
            "plain_over_best": b["plain_over"],
            "fixed_over_best": b["fixed_over"],
            "pass_plain_10x": b["plain_over"]["min"] >= 10,
            "pass_fixed_3x": b["fixed_over"]["min"] >= 3,
            "rotation_angle_plain": main["plain"]["angle"],
        }
    summary = {
        "laws": laws(config, res),
        "fraction": config.fraction,
        "lr": config.lr,
        "num_seeds": config.num_seeds,
        "num_failed": sweep.failed,
        "failures": sweep.failures,
        "acceptance": acceptance,
        "setting_params": {
            k: {"curvature": c, "tail": t} for k, (c, t) in config.settings().items()
        },
        "settings": settings,
        "theory": res.get("theory"),
        "transformer": summarise_transformer(res, config) if config.transformer_tasks else None,
        "transformer_params": {
            "preset": config.transformer_preset,
            "category": config.transformer_category,
            "rank": config.transformer_rank,
            "lr_lambda": config.transformer_lr_lambda,
            "ref_steps": config.transformer_ref_steps,
            "num_steps": config.transformer_num_steps,
        },
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


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
    for row in rows:
        row["experiment"] = "defences"
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


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "defences", *sys.argv[1:]]))
