"""Alignment collapse in a small transformer, measured exactly (docs/theory.md §3–4).

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
import pathlib
import sys

import jax

from quartic.core.errors import QuarticError
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic
from quartic.studies import collapse_report as report
from quartic.studies.collapse_runs import summarize, units
from quartic.tasks import token_world as tw

TITLE = "Alignment collapse in a small transformer: exact Fisher, forecast vs Δu, overlap vs harm"
QUICK_SECONDS = 240


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "7k"
    rank: int = 10
    categories: tuple[int, ...] = (0, 1)
    tasks: tuple[str, ...] = tw.BENIGN_TASKS  # the law (AIC, Δu, forecasts) per task
    orthogonal_tasks: tuple[str, ...] = tw.BENIGN_TASKS
    # Π onto F's top-k eigenvectors (k = rank is M): t× shrinks as the tail outside shrinks
    orthogonal_ranks: tuple[int, ...] = (10, 40, 160, 320, 640)
    num_times: int = 30
    taylor_order: int = 5
    long_tasks: tuple[str, ...] = tw.BENIGN_TASKS  # long fine-tuning (overlap vs harm)
    long_steps: int = 1000
    long_optimizer: str = "adam"
    long_lr: float = 1e-3
    long_seeds: int = 3
    lora_rank: int = 2  # LoRA runs (seed 0, every long task) beside full fine-tuning
    world_seed: int = 0
    model_seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            preset="2k",
            categories=(0,),
            tasks=("sort", "lookup", "addition"),
            orthogonal_tasks=("sort",),
            orthogonal_ranks=(10, 320),
            num_times=24,
            taylor_order=4,
            long_steps=400,
        )

    def __post_init__(self):
        unknown = sorted(
            set(self.tasks + self.orthogonal_tasks + self.long_tasks) - set(tw.BENIGN_TASKS)
        )
        if unknown:
            raise QuarticError(f"unknown task(s) {unknown}; choose from {list(tw.BENIGN_TASKS)}")
        if self.long_optimizer not in ("adam", "sgd"):
            raise QuarticError(
                f"long_optimizer must be 'adam' or 'sgd', got {self.long_optimizer!r}"
            )
        if self.taylor_order < 4:
            raise QuarticError(f"taylor_order must be >= 4 (c₄ is read), got {self.taylor_order}")


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    sweep = run_sweep(units(config), out_dir, desc="transformer_collapse")
    summary = summarize(sweep.results, config)
    summary["num_failed"] = sweep.failed
    summary["failures"] = sweep.failures
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def table(summary: dict) -> list[dict]:
    return report.table(summary)  # `quartic run` names the experiment in each row


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    return report.plot(out_dir, fig_dir)


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "transformer_collapse", *sys.argv[1:]]))
