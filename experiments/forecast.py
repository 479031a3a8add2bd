"""Forecasts of the alignment-loss threshold crossing, checked against simulation (docs/forecast.md).

For many random problems of three families — ``quadratic`` (AIC exact: Pg = 0, no Fisher tail),
``leaky`` (a first-order leak and a Fisher tail) and ``curved`` (M(θ) rotates, the alignment map
is curved) — fine-tune by gradient descent (``lr = lr_lambda / λ_max(H)``) and record Δu at every
step. Each problem gets a threshold that the simulation crosses at ``t·λ_max(H) = u``, ``u``
log-uniform in ``u_range``. The crossing time is then predicted from θ* alone (pure quartic
γ_F²t⁴/8, the second-order forecast, alignment-risk's published formula) and with monitoring
(the second-order forecast re-made every ``check_every`` steps; the prediction available with
``lead`` of the time still to go), and compared with the simulated crossing.

The ``transformer`` family is the small aligned transformer (:mod:`quartic.studies.collapse_tasks`): for
every benign task, L_A = the KL drift on a harm category, L_FT = the task's LM loss, the same step
rule and checks, θ* quantities by Lanczos (:func:`quartic.studies.forecast.diagnose_lanczos`), and
``transformer_thresholds`` thresholds per task, crossed at t·λ_max log-spaced in ``u_range``.

    quartic run forecast --quick        # about 1 min on a 2-core CPU (45 s: 3 transformer tasks)
    -> median relative error of the crossing time per family and method; on the curved family
       monitoring beats the one-shot second-order forecast
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

import jax
import numpy as np
from matplotlib.ticker import NullFormatter

import quartic as q
from quartic.core.problems import FamilyConfig
from quartic.harness import plotting
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic
from quartic.studies import forecast as fc
from quartic.studies.forecast_compare import METHODS, relative_error, summarise, units
from quartic.tasks import token_world as tw

TITLE = "Time-to-threshold forecasts (quartic, second-order, monitored, peer) vs simulation"
QUICK_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Config(FamilyConfig):
    leak: float = 0.1  # ‖Pg‖/‖g‖ of the leaky family
    tail: float = 0.05  # Fisher mass outside M of the leaky family
    curvature: float = 2.0  # ‖c‖ of the curved family
    quartic: float = 0.1  # β of the curved family's L_FT
    families: tuple[str, ...] = ("quadratic", "leaky", "curved", "transformer")
    num_problems: int = 50  # per family
    chunk: int = 25  # problems per unit of work (vmapped)
    u_range: tuple[float, float] = (0.1, 2.0)  # crossing at t·λ_max(H) in this range
    lr_lambda: float = 0.005  # lr·λ_max(H)
    check_every: int = 25
    lead: float = 0.5
    taylor_order: int = 4  # the exact Taylor forecast keeps c₁…c₄ of u(t)
    seed: int = 0
    # the transformer family: one run per task, thresholds crossed at t·λ_max log-spaced in u_range
    transformer_tasks: tuple[str, ...] = tw.BENIGN_TASKS
    transformer_preset: str = "2k"
    transformer_category: int = 0
    transformer_rank: int = 10
    transformer_thresholds: int = 6  # per task
    transformer_lr_lambda: float = 0.04  # lr·λ_max(H_FT(θ*))
    transformer_u_range: tuple[float, float] = (0.5, 16.0)  # crossing at t·λ_max in this range
    transformer_taylor: bool = True  # the Taylor forecasts (jets of the transformer: slow compile)

    @classmethod
    def quick(cls) -> Config:
        return cls(
            num_problems=20,
            chunk=20,
            transformer_tasks=("sort", "lookup", "addition"),
            transformer_taylor=False,
        )

    def __post_init__(self):
        bad = set(self.families) - {"quadratic", "leaky", "curved", "transformer"}
        if bad:
            raise q.QuarticError(
                f"unknown families {sorted(bad)}: use quadratic, leaky, curved, transformer"
            )
        unknown = sorted(set(self.transformer_tasks) - set(tw.BENIGN_TASKS))
        if unknown:
            raise q.QuarticError(f"unknown task(s) {unknown}; choose from {list(tw.BENIGN_TASKS)}")

    @property
    def num_checks(self) -> int:
        steps = self.u_range[1] / self.lr_lambda * 1.25
        return int(math.ceil(steps / self.check_every))

    @property
    def transformer_num_checks(self) -> int:
        steps = self.transformer_u_range[1] / self.transformer_lr_lambda * 1.25
        return int(math.ceil(steps / self.check_every))


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    sweep = run_sweep(units(config), out_dir, desc="forecast")
    by_family: dict[str, list] = {f: [] for f in config.families}
    for r in sweep.results.values():
        by_family[r["family"]].extend(r["problems"])
    families = {f: summarise(p) for f, p in by_family.items()}
    everything = summarise([p for ps in by_family.values() for p in ps])
    curved = families.get("curved")
    acceptance = None
    if curved and curved["num_problems"]:
        err = {m: curved[m]["median_rel_error"] for m in METHODS}
        acceptance = {
            **err,
            "monitoring_beats_one_shot": err["monitored"] < err["second_order"],
            "monitoring_taylor_beats_one_shot_taylor": err["monitored_taylor"] < err["taylor"],
        }
    summary = {
        "num_problems": everything["num_problems"],
        "num_failed": sweep.failed,
        "lead": config.lead,
        "check_every": config.check_every,
        "families": families,
        "transformer_tasks": {
            t: summarise([p for p in by_family.get("transformer", []) if p["task"] == t])
            for t in dict.fromkeys(p["task"] for p in by_family.get("transformer", []))
        },
        "all": everything,
        "acceptance_curved": acceptance,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def table(summary: dict) -> list[dict]:
    rows = []
    acc = summary.get("acceptance_curved")
    if acc:
        lead = f"{summary['lead']:.0%}"
        for mon, one, key in (
            ("monitored", "second_order", "monitoring_beats_one_shot"),
            ("monitored_taylor", "taylor", "monitoring_taylor_beats_one_shot_taylor"),
        ):
            rows.append(
                dict(
                    quantity=f"curved: median rel. error of t_c, {mon} (lead {lead}) vs one-shot {one}",
                    theory="monitored < one-shot",
                    measured=f"{acc[mon]:.3g} vs {acc[one]:.3g}",
                    verdict="ok" if acc[key] else "OFF",
                )
            )
    tx = summary["families"].get("transformer")
    if tx and tx["num_problems"]:
        better = tx.get("monitored_better_when_rechecked")
        share = f"; better on {better:.0%} of {tx['num_rechecked']} re-checked" if better else ""
        rows.append(
            dict(
                quantity="transformer: median rel. error of t_c, monitored vs one-shot second_order",
                theory="",
                measured=f"{tx['monitored']['median_rel_error']:.3g} vs "
                f"{tx['second_order']['median_rel_error']:.3g}{share}",
                verdict="",
            )
        )
    for fam, r in summary["families"].items():
        for m in METHODS:
            e = r[m]
            if e["median_rel_error"] is None:  # not run on this family
                continue
            never = f", {e['never_predicted']} never" if e["never_predicted"] else ""
            rows.append(
                dict(
                    quantity=f"{fam} ({r['num_problems']}): median |t̂−t_c|/t_c, {m}{never}",
                    theory="",
                    measured=e["median_rel_error"],
                    verdict="",
                )
            )
    for row in rows:
        row["experiment"] = "forecast"
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    units = list(RunDir(out_dir).done_results().values())
    by_family: dict[str, list] = {}
    for u in units:
        by_family.setdefault(u["family"], []).extend(u["problems"])
    fams = list(by_family)
    fig, axes = plotting.figure(3, len(fams), size=(4.3, 3.6))
    styles = {
        "quartic": "^",
        "second_order": "o",
        "taylor": "d",
        "monitored": "s",
        "monitored_taylor": "P",
        "peer": "x",
    }
    for j, fam in enumerate(fams):
        probs = by_family[fam]
        ax = axes[0, j]
        first = next((p for p in probs if "curve" in p), None)
        if first is not None:
            c = first["curve"]
            t = np.asarray(c["t"])
            ax.plot(t, c["delta_u"], "k-", lw=2, label="simulated Δu")
            ax.plot(t, np.abs(c["forecast"]), "C0--", label="2nd-order forecast (θ*)")
            ax.plot(t, first["gamma_fisher"] ** 2 / 8 * t**4, "C1:", label="γ_F² t⁴/8")
            if first["taylor_coefficients"] is not None:
                ck = np.asarray(first["taylor_coefficients"])
                taylor = np.sum(ck * t[:, None] ** np.arange(1, ck.shape[0] + 1), axis=-1)
                ax.plot(t, np.abs(taylor), "C2-", lw=0.8, label="Taylor Σc_k t^k (θ*)")
            peer = fc.peer_estimate(
                t, first["gamma_fisher"], first["eps_fisher"], first["lambda_min_peer"]
            )
            ax.plot(t[peer > 0], peer[peer > 0], "C3-.", label="peer formula")
            ax.axhline(first["threshold"], color="0.5", lw=0.8)
            ax.axvline(first["simulated"], color="0.5", lw=0.8, ls=":")
            where = f" ({first['task']})" if "task" in first else ""
            plotting.loglog(ax, "t = lr·k", "Δu", f"{fam}{where}: problem 0, threshold and t_c")
            ax.set_ylim(bottom=max(1e-14, min(c["delta_u"][1:]) * 0.1))
            ax.legend(fontsize=6)
        ax = axes[1, j]
        sim = np.asarray([p["simulated"] for p in probs])
        for m, mk in styles.items():
            if not any(m in p["errors"] for p in probs):  # not run (the Taylor forecasts, if off)
                continue
            pred = np.asarray([p.get(m) for p in probs], float)  # None (never) -> nan
            med = np.median([relative_error(p, m) for p in probs])
            ax.plot(sim, pred, mk, ms=3.5, alpha=0.8, label=f"{m} (median err {med:.2g})")
        lo, hi = sim.min() * 0.5, sim.max() * 2
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        plotting.loglog(ax, "simulated t_c", "predicted t_c", f"{fam}: {len(probs)} problems")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(lo * 0.3, hi * 5)
        ax.legend(fontsize=6)
        ax = axes[2, j]
        for key, col, lab in (
            ("check_predictions", "C3", "monitored, 2nd order"),
            ("check_predictions_taylor", "C2", "monitored, Taylor"),
        ):
            if any(p[key] is None for p in probs):
                continue
            frac, err = [], []
            for p in probs:
                ct = np.asarray(p["check_times"])
                cp = np.asarray([np.inf if x is None else x for x in p[key]], float)
                keep = ct < p["simulated"]
                frac.extend(ct[keep] / p["simulated"])
                err.extend(np.abs(cp[keep] - p["simulated"]) / p["simulated"])
            frac, err = np.asarray(frac), np.asarray(err)
            ax.plot(frac, np.where(np.isfinite(err), err, np.nan), ".", color=col, ms=2, alpha=0.4)
            bins = np.linspace(0, 1, 6)
            mids = 0.5 * (bins[1:] + bins[:-1])
            med = [
                np.median(err[(frac >= a) & (frac < b)])
                if np.any((frac >= a) & (frac < b))
                else np.nan
                for a, b in zip(bins[:-1], bins[1:], strict=True)
            ]
            ax.plot(mids, med, "o-", color=col, label=f"{lab} (median per bin)")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-7)
        ax.set_xlabel("check time / simulated t_c")
        ax.set_ylabel("|t̂ − t_c| / t_c")
        ax.set_title(f"{fam}: monitoring error vs how late the check is", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return [plotting.save(fig, fig_dir / "forecast.png")]


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "forecast", *sys.argv[1:]]))
