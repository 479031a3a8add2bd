"""Alignment collapse in a small transformer, measured exactly (issue 3; THEORY.md §3–4).

A tiny causal transformer is pretrained on a synthetic token world, aligned to answer REFUSE on two
harm categories (θ*, cached), then fine-tuned on six benign tasks. At θ* the float64 Fisher of each
skill is computed exactly; every AIC quantity, the second-order forecast (with the gradient term of
L_A) and the exact Taylor-mode coefficients are set against the simulated Δu(t) for both alignment
losses (refusal cross-entropy and KL drift). A controlled orthogonal variant removes the
Fisher-visible part of g at θ*; long fine-tuning runs give the harmfulness rate, retention and the
overlap score per task and seed (the paper's overlap–harm relation, Spearman ρ with a bootstrap
interval), with the harmful-compliance control.

    quartic run transformer_collapse --quick      # ~4 min on a 2-core CPU (θ* cached afterwards)
    -> forecast within 5 % of Δu for t·λ_max(H) ≤ 0.1 on every task; orthogonal variant: c₁=c₂=c₃=0,
       slope-4 window; harmful control far above the benign tasks
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from quartic import collapse, plotting
from quartic.models import TransformerConfig
from quartic.runs import RunDir, read_json, run_sweep, write_json_atomic
from quartic.tasks import token_world as tw
from quartic.training import make_aligned_model

TITLE = "Alignment collapse in a small transformer: exact Fisher, forecast vs Δu, overlap vs harm"
QUICK_SECONDS = 900
# The quick sweep takes 10-20 min on 2 cores today (XLA compilation of the jet, HVP and RK4
# programs dominates), beyond the quick budget: `quartic reproduce` leaves it out until it fits;
# `quartic reproduce --only transformer_collapse` runs it.
IN_QUICK_REPRODUCE = False


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "7k"
    rank: int = 10
    categories: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = tw.BENIGN_TASKS
    orthogonal_tasks: tuple[str, ...] = tw.BENIGN_TASKS
    num_times: int = 30
    long_steps: int = 2000
    long_lr: float = 0.5
    long_seeds: int = 3
    world_seed: int = 0
    model_seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            preset="2k",
            categories=(0,),
            tasks=("sort", "lookup", "addition"),
            orthogonal_tasks=("sort",),
            num_times=24,
            long_steps=400,
            long_seeds=2,
        )


@functools.cache
def _setup(config: Config, category: int):
    jax.config.update("jax_enable_x64", True)
    world = tw.TokenWorld(tw.WorldConfig(seed=config.world_seed))
    model_cfg = TransformerConfig.preset(
        config.preset,
        vocab_size=world.vocab_size,
        seq_len=world.config.seq_len,
        param_dtype="float64",
    )
    aligned = make_aligned_model(model_cfg, world, seed=config.model_seed, progress=False)
    return aligned, collapse.CollapseSetup(aligned.apply_fn, aligned.theta_star, world, category)


@functools.cache
def _fisher(config: Config, category: int):
    _, setup = _setup(config, category)
    return collapse.dense_fisher(setup)


@functools.cache
def _basis(config: Config, category: int):
    w, v = jnp.linalg.eigh(_fisher(config, category))
    return v[:, ::-1][:, : config.rank], w[::-1][: config.rank]


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    units = [("theta_star", lambda: {"report": _setup(config, config.categories[0])[0].report})]
    for k in config.categories:
        units.append(
            (
                f"curvature_{k}",
                lambda k=k: collapse.skill_curvature(
                    _setup(config, k)[1], config.rank, jax.random.PRNGKey(k)
                )[0],
            )
        )
        for task in config.tasks:
            units.append(
                (
                    f"law_{k}_{task}",
                    lambda k=k, task=task: collapse.task_law(
                        _setup(config, k)[1],
                        _fisher(config, k),
                        task,
                        config.rank,
                        num_times=config.num_times,
                    ),
                )
            )
    k0 = config.categories[0]
    for task in config.orthogonal_tasks:
        for onto in ("range", "rank"):
            units.append(
                (
                    f"orthogonal_{onto}_{k0}_{task}",
                    lambda task=task, onto=onto: collapse.orthogonal_variant(
                        _setup(config, k0)[1],
                        _fisher(config, k0),
                        task,
                        config.rank,
                        onto,
                        num_times=config.num_times + 10,
                    ),
                )
            )
    for task in (*config.tasks, "harmful"):
        for seed in range(config.long_seeds):
            units.append(
                (
                    f"long_{task}_{seed}",
                    lambda task=task, seed=seed: collapse.long_finetune(
                        _setup(config, k0)[1],
                        task,
                        *_basis(config, k0),
                        config.long_steps,
                        config.long_lr,
                        seed,
                    ),
                )
            )
    sweep = run_sweep(units, out_dir, desc="transformer_collapse")
    summary = summarize(sweep.results, config)
    summary["num_failed"] = sweep.failed
    summary["failures"] = sweep.failures
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def summarize(res: dict, config: Config) -> dict:
    out = {"theta_star": res.get("theta_star", {}).get("report")}
    out["curvature"] = {
        k: {key: v for key, v in res[f"curvature_{k}"].items() if key != "eigenvalues"}
        for k in config.categories
        if f"curvature_{k}" in res
    }
    laws = {}
    for k in config.categories:
        for task in config.tasks:
            r = res.get(f"law_{k}_{task}")
            if r is None:
                continue
            laws[f"{k}/{task}"] = {
                name: {
                    "forecast_max_rel_error_tl_le_0.1": r[name]["forecast_max_rel_error_tl_le_0.1"],
                    "forecast_parts_at_t_lambda": r[name]["forecast_parts_at_t_lambda"],
                    "onset_order": r[name]["onset_order"],
                    "ortho_ratio": r[name]["aic"]["ortho_ratio"],
                    "crossover_time": r[name]["aic"]["crossover_time"],
                    "crossover_t_lambda": r[name]["aic"]["crossover_time"] * r["lambda_max_ft"],
                    "align_grad_norm": r[name]["aic"]["align_grad_norm"],
                    "gamma_fisher": r[name]["aic"]["gamma_fisher"],
                    "quartic_coefficient": r[name]["aic"]["quartic_coefficient"],
                }
                for name in ("refusal", "kl")
            }
    out["laws"] = laws
    orth = {}
    for key, r in res.items():
        if key.startswith("orthogonal_"):
            kl = r["kl"]
            c = kl["taylor_coefficients"]
            orth[key] = {
                "projector_rank": r["projector_rank"],
                "c1_c2_c3_over_c4": [abs(x) / abs(c[3]) for x in c[:3]],
                "c4": c[3],
                "gamma_f_sq_over_8": kl["aic"]["quartic_coefficient"],
                "c4_over_gamma_f": kl["c4_over_gamma_f"],
                "ratio_to_c4_smallest_resolved_t": kl["ratio_to_c4_smallest_resolved_t"],
                "resolved_from_t": kl["resolved_from_t"],
                "slope4_window": kl["slope4_window"],
                "predicted_crossover_time": kl["aic"]["crossover_time"],
                "measured_crossover_time": kl["measured_crossover_time"],
                "forecast_max_rel_error_tl_le_0.1": kl["forecast_max_rel_error_tl_le_0.1"],
            }
    out["orthogonal"] = orth
    longs = [r for key, r in res.items() if key.startswith("long_")]
    benign = [r for r in longs if r["task"] != "harmful"]
    if benign:
        overlap = [r["overlap"][-1] for r in benign]
        f_overlap = [r["fisher_overlap"][-1] for r in benign]
        harm = [r["harmfulness"][-1] for r in benign]
        du = [r["du_kl"][-1] for r in benign]
        out["overlap_harm"] = {
            "n": len(benign),
            "spearman_overlap_harm": collapse.spearman(overlap, harm),
            "spearman_overlap_harm_ci95": collapse.bootstrap_spearman(overlap, harm),
            "spearman_fisher_overlap_harm": collapse.spearman(f_overlap, harm),
            "spearman_fisher_overlap_harm_ci95": collapse.bootstrap_spearman(f_overlap, harm),
            "spearman_overlap_du_kl": collapse.spearman(overlap, du),
        }
        per_task = {}
        for r in longs:
            d = per_task.setdefault(
                r["task"], {"harmfulness": [], "retention": [], "overlap": [], "du_kl": []}
            )
            for key in d:
                d[key].append(r[key][-1])
        out["long_per_task"] = {
            t: {k: float(np.mean(v)) for k, v in d.items()} for t, d in per_task.items()
        }
    return out


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
                quantity=f"skill {k}: Fisher share of trace in top d={c['rank']}",
                theory="(low rank?)",
                measured=f"{c['share_top_d']:.3f}; eff. rank {c['effective_rank']:.1f}",
                verdict="",
            )
        )
    errs = {
        name: [
            v[name]["forecast_max_rel_error_tl_le_0.1"] for v in summary.get("laws", {}).values()
        ]
        for name in ("refusal", "kl")
    }
    for name, e in errs.items():
        if e:
            rows.append(
                dict(
                    quantity=f"forecast vs Δu ({name}), worst task, tλ ≤ 0.1",
                    theory="≤ 0.05",
                    measured=f"{max(e):.3g}",
                    verdict="ok" if max(e) <= 0.05 else "OFF",
                )
            )
    for key, o in summary.get("orthogonal", {}).items():
        if key.startswith("orthogonal_range"):
            rows.append(
                dict(
                    quantity=f"{key}: Δu/(c₄t⁴) at smallest t; c₄/(γ_F²/8)",
                    theory="1 ± 0.05",
                    measured=f"{o['ratio_to_c4_smallest_t']:.4f}; {o['c4_over_gamma_f']:.3g}",
                    verdict="ok" if abs(o["ratio_to_c4_smallest_t"] - 1) < 0.05 else "OFF",
                )
            )
        elif o["measured_crossover_time"] is not None:
            ratio = o["measured_crossover_time"] / o["predicted_crossover_time"]
            rows.append(
                dict(
                    quantity=f"{key}: measured t× / predicted t×",
                    theory="1 ± 0.25",
                    measured=f"{ratio:.3f}",
                    verdict="ok" if abs(ratio - 1) <= 0.25 else "OFF",
                )
            )
    oh = summary.get("overlap_harm")
    if oh:
        lo, hi = oh["spearman_overlap_harm_ci95"]
        rows.append(
            dict(
                quantity=f"Spearman ρ(overlap, harm), {oh['n']} runs",
                theory="(paper: strong +)",
                measured=f"{oh['spearman_overlap_harm']:.2f} [{lo:.2f}, {hi:.2f}]",
                verdict="",
            )
        )
    for r in rows:
        r["experiment"] = "transformer_collapse"
    return rows


def _units(out_dir):
    out = {}
    for p in sorted((out_dir / "units").glob("*.json")):
        u = read_json(p)
        if u["status"] == "done":
            out[p.stem] = u["result"]
    return out


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    units = _units(out_dir)
    paths = []
    laws = [v for k, v in units.items() if k.startswith("law_")]
    if laws:
        n = len(laws)
        cols = min(3, n)
        rows_ = (n + cols - 1) // cols
        fig, axes = plotting.figure(rows_, cols, size=(4.0, 3.2))
        for ax, r in zip(axes.flat, laws, strict=False):
            t = np.array(r["t"])
            for name, col in (("kl", "C0"), ("refusal", "C1")):
                rr = r[name]
                ax.plot(t, np.abs(rr["delta_u"]), "o", ms=2.5, color=col, label=f"Δu {name}")
                ax.plot(
                    t,
                    np.abs(rr["forecast"]),
                    "-",
                    color=col,
                    lw=1,
                    label="2nd-order forecast" if name == "kl" else None,
                )
                ax.plot(
                    t,
                    rr["quartic_prediction"],
                    ":",
                    color=col,
                    lw=1,
                    label="γ_F²t⁴/8" if name == "kl" else None,
                )
            ax.axvline(0.1 / r["lambda_max_ft"], color="0.6", lw=0.8, ls="--")
            plotting.loglog(ax, "t", "|Δu|", f"{r['task']} (dashed: tλ_max = 0.1)")
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        paths.append(plotting.save(fig, fig_dir / "transformer_collapse_tasks.png"))
    orth = {k: v for k, v in units.items() if k.startswith("orthogonal_")}
    curv = [v for k, v in units.items() if k.startswith("curvature_")]
    longs = [v for k, v in units.items() if k.startswith("long_")]
    fig, axes = plotting.figure(1, 3, size=(4.2, 3.4))
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
    for i, (k, r) in enumerate(orth.items()):
        t = np.array(r["t"])
        ax.plot(t, r["kl"]["local_slope"], color=f"C{i}", label=k.replace("orthogonal_", ""))
        if r["kl"]["measured_crossover_time"]:
            ax.axvline(r["kl"]["aic"]["crossover_time"], color=f"C{i}", ls=":", lw=0.8)
    ax.axhline(4, color="0.5", ls="--", lw=0.8)
    ax.axhline(2, color="0.5", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("local slope of Δu_KL")
    ax.set_title("orthogonal variants (dotted: predicted t×)", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[0, 2]
    for r in longs:
        col = "C3" if r["task"] == "harmful" else "C0"
        ax.plot(r["overlap"][-1], r["harmfulness"][-1], "o", color=col, ms=4)
        if r["seed"] == 0:
            ax.annotate(r["task"], (r["overlap"][-1], r["harmfulness"][-1]), fontsize=6)
    ax.set_xlabel("overlap ‖PΔθ‖/‖Δθ‖ (final)")
    ax.set_ylabel("harmfulness rate (held-out)")
    ax.set_title("overlap vs harm (red: harmful control)", fontsize=9)
    paths.append(plotting.save(fig, fig_dir / "transformer_collapse.png"))
    return paths


if __name__ == "__main__":
    import quartic.cli

    raise SystemExit(quartic.cli.main(["run", "transformer_collapse", *sys.argv[1:]]))
