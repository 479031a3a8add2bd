"""The quartic law on the quadratic and curved families (Cor 6.3, Thm 6.2; docs/theory.md §3).

For every seed: draw a quadratic problem that satisfies the AIC exactly (Pg = 0, no Fisher tail),
compute every AIC quantity with ``check_aic``, follow the exact gradient-flow path, the RK4 flow
and gradient descent, fit the exponent on ``t·λ_max(H) ∈ [1e-4, 1e-2]``, and compare Δu with
γ_F²t⁴/8, the lower bound λ_d γ_u² t⁴/8, and the second-order forecast. Then the onset ladder
(leak → 2, law → 4, PHg = 0 → 6, no coupling → 0) and the curved family (exact Taylor-mode c₄
against the paper's γ_F²/8, subspace rotation against Davis–Kahan).

    quartic run quartic_law --quick
    -> exponent 3.9990 ± 0.0002 (flow), 4.0021 ± 0.0002 (GD), ladder 1.9999 / 3.9999 / 5.9989 /
       Δu ≤ 1.1e-38, curved c₄/(γ_F²/8) = 178–338 (results/quick/quartic_law/summary.json)
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import numpy as np

import quartic as q
from quartic.core import measure, theory
from quartic.core.problems import FamilyConfig
from quartic.harness import plotting
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic
from quartic.studies import law

TITLE = "Quartic law on the quadratic and curved families (Cor 6.3), with the onset ladder"
QUICK_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Config(FamilyConfig):
    num_seeds: int = 16
    num_times: int = 60
    curved_n: int = 20
    curved_d: int = 3
    curved_curvature: float = 1.0
    curved_quartic: float = 0.5
    num_curved: int = 4
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(num_seeds=8, num_times=40, num_curved=2)


#: The ladder's rungs measured here, as spec changes (leak 0.3); the order seeds each rung's key.
_RUNG = {r.name: r for r in theory.RUNGS}
LADDER_SPECS = {
    case: _RUNG[case].change(leak=0.3)
    for case in ("first_order_leak", "quartic", "phg_zero", "no_coupling")
}


def _key(config: Config, *path: int):
    key = jax.random.PRNGKey(config.seed)
    for p in path:
        key = jax.random.fold_in(key, p)
    return key


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    units = []
    for s in range(config.num_seeds):

        def quad(s=s):
            prob, _ = q.make_quadratic(_key(config, 0, s), config.spec())
            return law.measure_quadratic(
                prob, config.d, num_times=config.num_times, gd_steps=10_000, gd_lr_lambda=1e-6
            )

        units.append((f"quadratic_{s:03d}", quad))
    for i, (case, kw) in enumerate(LADDER_SPECS.items()):

        def rung(case=case, kw=kw, i=i):
            prob, _ = q.make_quadratic(_key(config, 1, i), config.spec(**kw))
            return law.measure_ladder(prob, case)

        units.append((f"ladder_{case}", rung))
    for s in range(config.num_curved):

        def curved(s=s):
            spec = q.QuadraticSpec(n=config.curved_n, d=config.curved_d, coupling=config.coupling)
            prob, basis = q.make_curved(
                _key(config, 2, s), spec, config.curved_curvature, config.curved_quartic
            )
            return law.measure_curved(prob, basis)

        units.append((f"curved_{s:03d}", curved))
    sweep = run_sweep(units, out_dir, desc="quartic_law")
    res = sweep.results
    quad = [r for k, r in res.items() if k.startswith("quadratic_")]
    curved = [r for k, r in res.items() if k.startswith("curved_")]
    ladder = {r["case"]: r for k, r in res.items() if k.startswith("ladder_")}

    def stats(name):  # over the quadratic seeds; std with ddof 0
        s = measure.mean_std([r[name] for r in quad], ddof=0, extremes=True)
        return {k: s[k] for k in ("mean", "std", "min", "max")}

    summary = {
        "num_quadratic": len(quad),
        "num_failed": sweep.failed,
        "predicted_exponent": theory.ORDER,
        "exponent_flow": stats("exponent_flow"),
        "exponent_flow_rk4": stats("exponent_flow_rk4"),
        "exponent_gd": stats("exponent_gd"),
        "max_slope_dev_in_window": stats("max_slope_dev_in_window"),
        "next_order_max_rel_error": stats("next_order_max_rel_error"),
        "rk4_rel_error_max": max(r["rk4_rel_error"] for r in quad),
        "gd_rel_error_max": max(r["gd_rel_error"] for r in quad),
        "ladder": {
            c: {
                "predicted": r["predicted"],
                "measured": r["measured"],
                "max_abs_delta_u": r.get("max_abs_delta_u"),
            }
            for c, r in ladder.items()
        },
        "curved": [
            {
                "onset_order": r["onset_order"],
                "c4": r["c4"],
                "paper_coefficient": r["paper_coefficient"],
                "c4_over_paper": r["c4_over_paper"],
                "ratio_to_c4_smallest_t": r["ratio_to_c4_smallest_t"],
                "window": r["window"],
                "window_decades": r["window_decades"],
                "davis_kahan_max_ratio": r["davis_kahan_max_ratio"],
            }
            for r in curved
        ],
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def _verdict(ok: bool) -> str:
    return "ok" if ok else "OFF"


def table(summary: dict) -> list[dict]:
    e, g = summary["exponent_flow"], summary["exponent_gd"]
    nxt = summary["next_order_max_rel_error"]["max"]
    rows = [
        dict(
            quantity="exponent, gradient flow, tλ∈[1e-4,1e-2] (mean ± sd)",
            theory=theory.ORDER,
            measured=f"{e['mean']:.4f} ± {e['std']:.1e}",
            verdict=_verdict(abs(e["mean"] - theory.ORDER) < 0.01),
        ),
        dict(
            quantity="exponent, gradient descent (lr = 1e-6/λ_max)",
            theory=theory.ORDER,
            measured=f"{g['mean']:.4f} ± {g['std']:.1e}",
            verdict=_verdict(abs(g["mean"] - theory.ORDER) < 0.05),
        ),
        dict(
            quantity="Δu/(γ_F²t⁴/8) − 1 vs next-order term st: max rel. error, tλ ≤ 1e-2",
            theory="≤ |s₂/s₁|·t (next term)",
            measured=f"{nxt:.3g}",
            verdict="",
        ),
    ]
    for case, r in summary["ladder"].items():
        if r["measured"] is None:
            rows.append(
                dict(
                    quantity=f"ladder: {case}",
                    theory="Δu ≡ 0",
                    measured=f"max Δu = {r['max_abs_delta_u']:.1e}",
                    verdict=_verdict(r["max_abs_delta_u"] < 1e-25),
                )
            )
        else:
            rows.append(
                dict(
                    quantity=f"ladder: {case}",
                    theory=r["predicted"],
                    measured=f"{r['measured']:.3f}",
                    verdict=_verdict(abs(r["measured"] - r["predicted"]) < 0.05),
                )
            )
    for i, c in enumerate(summary["curved"]):
        rows.append(
            dict(
                quantity=f"curved #{i}: Δu/(c₄t⁴) at smallest t  [c₄/(γ_F²/8) = {c['c4_over_paper']:.1f}]",
                theory=1,
                measured=f"{c['ratio_to_c4_smallest_t']:.6f}",
                verdict=_verdict(abs(c["ratio_to_c4_smallest_t"] - 1) < 1e-3),
            )
        )
    for row in rows:
        row["experiment"] = "quartic_law"
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    units = RunDir(out_dir).done_results()
    quad = [v for k, v in units.items() if k.startswith("quadratic_")]
    curved = [v for k, v in units.items() if k.startswith("curved_")]
    ladder = [v for k, v in units.items() if k.startswith("ladder_")]
    fig, axes = plotting.figure(2, 2)
    ax = axes[0, 0]
    for i, r in enumerate(quad[:4]):
        t, col = np.array(r["t"]), f"C{i}"
        first = i == 0
        ax.plot(
            t,
            r["delta_u_rk4"],
            "o",
            ms=2.5,
            color=col,
            label="simulated flow (RK4)" if first else None,
        )
        ax.plot(
            t, r["quartic_prediction"], "-", color=col, lw=1, label="γ_F² t⁴/8" if first else None
        )
        ax.plot(
            t,
            np.abs(r["forecast"]),
            "--",
            color="k",
            lw=0.7,
            label="2nd-order forecast" if first else None,
        )
        steps = np.array(r["gd_steps"])
        keep = steps >= 10  # the discrete law k²(k−1)² is a power law only for k ≫ 1
        tg = r["gd_lr"] * steps[keep]
        ax.plot(
            tg,
            np.array(r["delta_u_gd"])[keep],
            "x",
            ms=3,
            color=col,
            label="gradient descent" if first else None,
        )
    t0 = np.array(quad[0]["t"])
    plotting.slope_guide(
        ax, t0[:25], quad[0]["delta_u_exact"][0] * 30, theory.ORDER, label="slope 4 guide"
    )
    plotting.loglog(
        ax, "t (gradient-flow time; GD: lr·k)", "Δu(t)", "Δu on 4 quadratic problems (Pg = 0)"
    )
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for i, r in enumerate(quad):
        tl, t = np.array(r["t_lambda"]), np.array(r["t"])
        ax.plot(
            tl,
            np.abs(np.array(r["ratio"]) - 1),
            "-",
            lw=1,
            color=f"C{i % 10}",
            label="measured" if i == 0 else None,
        )
        ax.plot(
            tl,
            np.abs(r["next_order_slope"] * t),
            ":",
            lw=1.5,
            color="k",
            label="|s t|, s = −(2/3)⟨a,b⟩/‖a‖²" if i == 0 else None,
        )
    ax.axvspan(1e-4, 1e-2, color="0.9", zorder=0, label="fit window")
    plotting.loglog(ax, "t · λ_max(H)", "|Δu/(γ_F²t⁴/8) − 1|", "the ratio → 1 linearly in t")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for r in ladder:
        if r["measured"] is None:
            continue
        ax.plot(r["t"], r["local_slope"], label=f"{r['case']} (pred. {r['predicted']})")
        ax.axhline(r["predicted"], color="0.6", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("local slope d log Δu / d log t")
    zero = [r for r in ladder if r["measured"] is None]
    note = f" (no coupling: max Δu = {zero[0]['max_abs_delta_u']:.0e})" if zero else ""
    ax.set_title("onset ladder: local slopes" + note, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1, 1]
    for i, r in enumerate(curved):
        t = np.array(r["t"])
        ax.plot(t, np.array(r["delta_u"]) / t**4, color=f"C{i}", label=f"curved #{i}: Δu/t⁴")
        ax.axhline(
            r["c4"], color=f"C{i}", ls="--", lw=1, label="Taylor-mode c₄" if i == 0 else None
        )
        ax.axhline(
            r["paper_coefficient"],
            color=f"C{i}",
            ls=":",
            lw=1,
            label="paper γ_F²/8" if i == 0 else None,
        )
    plotting.loglog(ax, "t", "Δu / t⁴", "curved family: exact c₄ vs the paper's γ_F²/8")
    ax.legend(fontsize=7)
    return [plotting.save(fig, fig_dir / "quartic_law.png")]


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "quartic_law", *sys.argv[1:]]))
