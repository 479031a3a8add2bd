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

import quartic as q
from quartic.core.problems import FamilyConfig
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic
from quartic.studies import defence_report as report
from quartic.studies import defences as D
from quartic.studies.defence_runs import (
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


@dataclasses.dataclass(frozen=True)
class Config(FamilyConfig):
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


def table(summary: dict) -> list[dict]:
    return report.table(summary)  # `quartic run` names the experiment in each row


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    return report.plot(out_dir, fig_dir)


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "defences", *sys.argv[1:]]))
