"""Scale: does the quartic window open as models grow? (docs/theory.md §3; the AIC from 2k to 1M).

Aligned transformers of 2k to 1M parameters (θ* as the collapse study builds it, float64), each with
the six benign tasks: ‖Pg‖/‖g‖ beside the random-direction baseline √(d/n), the Fisher's top-d share
and effective rank, λ_d, γ_F, t×·λ_max(H_FT), the exact Taylor coefficients and onset order, the
simulated KL drift against the second-order forecast for t·λ_max ≤ 0.1, with d = 10 and d holding
90 % of the Fisher trace. All matrix-free (quartic.studies.scaling). Then each task is fine-tuned
for long (Adam, as the collapse study): harm (harmfulness rate, KL drift) and retention at the end,
and Spearman ρ(Fisher-weighted overlap, harm) per size with a bootstrap interval. Each quantity is
fitted against n as a power law with a bootstrap interval and t×·λ_max and ‖Pg‖/‖g‖ are
extrapolated to 1.7e9 and 3e9 parameters with a prediction interval. The quartic window (t² → t⁴
crossover before the validity horizon) exists where t×·λ_max < 1.

    quartic run scaling --quick      # 2k, 30k, 100k; one seed; three tasks
    quartic run scaling --set sizes=1m seeds=0 --out DIR          # one more size, its own run
    quartic run scaling --set sizes= pool=A/summary.json,DIR/summary.json --out POOLED
                                     # refit every model of earlier runs together, train nothing
                                     # (other sizes, or other seeds of a size)
    quartic run scaling --set sizes=1m seeds=0 pretrain_lr=0.0063 --out DIR
                                     # θ* pretrained at another learning rate (not poolable with
                                     # the recipe's runs)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from quartic.core import cache
from quartic.core.errors import QuarticError
from quartic.harness.runs import RunDir, run_sweep, unit_note, write_json_atomic
from quartic.studies import collapse, scaling
from quartic.studies import scaling_report as report
from quartic.tasks import token_world as tw

TITLE = "Scale: ‖Pg‖/‖g‖, t×·λ_max and the onset order from 2k to 1M parameters, extrapolated"
QUICK_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple[str, ...] = ("2k", "7k", "30k", "100k", "300k", "1m")
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = tw.BENIGN_TASKS
    rank: int = 10
    share: float = 0.9  # the second d: the smallest holding this share of the Fisher trace
    spectrum_k: int = 40
    taylor_order: int = 6
    num_times: int = 6
    extrapolate_to: tuple[float, ...] = (1.7e9, 3e9)
    bootstrap: int = 2000
    long_steps: int = 1000  # long fine-tuning (harm, retention, overlap); 0 skips it
    long_lr: float = 1e-3  # Adam, as the collapse study
    # θ*'s pretraining learning rate; None keeps the recipe's 1e-2 for every size (a width-scaled
    # rate for one size is its own run, e.g. sizes=1m pretrain_lr=0.0063)
    pretrain_lr: float | None = None
    # summary.json files of earlier scaling runs whose models join this run's fits and report (other
    # sizes, or other seeds of a size; a model comes from one run only); with sizes=() the run only
    # pools them. Their config.json, where kept, must agree on how each model is measured.
    pool: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> Config:
        return cls(
            sizes=("2k", "30k", "100k"),
            seeds=(0,),
            tasks=("sort", "lookup", "addition"),
            taylor_order=4,
            bootstrap=500,
            long_steps=300,
        )

    def __post_init__(self):
        unknown = sorted(set(self.sizes) - set(scaling.SIZES))
        if unknown:
            raise QuarticError(f"unknown size(s) {unknown}; choose from {sorted(scaling.SIZES)}")
        bad = sorted(set(self.tasks) - set(tw.BENIGN_TASKS))
        if bad:
            raise QuarticError(f"unknown task(s) {bad}; choose from {list(tw.BENIGN_TASKS)}")
        if self.taylor_order < 4:
            raise QuarticError(f"taylor_order must be >= 4 (c₄ is read), got {self.taylor_order}")
        if not 0 < self.share < 1:
            raise QuarticError(f"share must lie in (0, 1), got {self.share}")
        if not self.sizes and not self.pool:
            raise QuarticError("no sizes to measure and no summaries to pool")
        for path in self.pool:
            if not pathlib.Path(path).is_file():
                raise QuarticError(f"pool: no summary at {path} (a scaling run's summary.json)")
        if self.pretrain_lr is not None and not self.pretrain_lr > 0:
            raise QuarticError(f"pretrain_lr must be > 0 (or None), got {self.pretrain_lr}")
        if self.long_steps < 0 or self.long_lr <= 0:
            raise QuarticError(
                f"long_steps must be >= 0 and long_lr > 0, got {self.long_steps}, {self.long_lr}"
            )


def _model_unit(config: Config, size: str, seed: int) -> dict:
    try:
        return _measure_model(config, size, seed)
    finally:  # each unit is another model: release its compiled programs (a long run compiling
        cache.clear_all()  # hundreds of them ran out of memory maps at the fourth size)


def _measure_model(config: Config, size: str, seed: int) -> dict:
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    _, setup = scaling.aligned(size, seed, pretrain_lr=config.pretrain_lr)
    cache.release_programs()  # θ*'s training programs do not run again
    seconds = {"theta_star": time.perf_counter() - t0}
    unit_note(f"θ* ({setup.n:,} parameters) in {seconds['theta_star']:.1f} s")
    t0 = time.perf_counter()
    trace = scaling.exact_trace(setup)
    spectrum, pairs = scaling.fisher_spectrum(
        setup, trace, config.spectrum_k, config.rank, config.share
    )
    cache.release_programs()  # nor do the trace's and the spectrum's
    seconds["spectrum"] = time.perf_counter() - t0
    unit_note(f"Fisher trace and top-{config.spectrum_k} spectrum in {seconds['spectrum']:.1f} s")
    tasks = {}
    for task in config.tasks:
        t0 = time.perf_counter()
        tasks[task] = scaling.task_scaling(
            setup,
            task,
            trace,
            pairs,
            spectrum["d_share"],
            config.rank,
            config.taylor_order,
            num_times=config.num_times,
        )
        seconds[task] = time.perf_counter() - t0
        unit_note(f"task {task} (AIC, onset, flow) in {seconds[task]:.1f} s")
    long = {}
    if config.long_steps:
        cache.release_programs()  # the tasks' programs (check, onset, flow) are done
        basis, eig_top = (
            pairs.vectors[:, : config.rank],
            jnp.asarray(spectrum["eigenvalues"][: config.rank]),
        )
        t0 = time.perf_counter()
        for task in config.tasks:
            long[task] = collapse.long_finetune(
                setup, task, basis, eig_top, config.long_steps, config.long_lr, seed
            )
        seconds["long"] = time.perf_counter() - t0
        unit_note(
            f"long fine-tuning, {config.long_steps} steps per task, in {seconds['long']:.1f} s"
        )
    return {"size": size, "seed": seed, "n": setup.n, "spectrum": spectrum, "tasks": tasks,
            "long": long, "seconds": seconds}  # fmt: skip


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    units = [
        (f"model_{size}_seed{seed}", lambda s=size, k=seed: _model_unit(config, s, k))
        for size in config.sizes
        for seed in config.seeds
    ]
    sweep = run_sweep(units, out_dir, desc="scaling")
    summary = summarize(sweep.results, config)
    summary["num_failed"] = sweep.failed
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


# what a pooled run must share with this one: how each model is measured (the long fine-tuning's
# settings too, where both runs fine-tune)
MEASURED_ALIKE = ("rank", "share", "spectrum_k", "taylor_order", "num_times", "pretrain_lr")


def _pooled_summary(path: str, config: Config) -> dict:
    summary = json.loads(pathlib.Path(path).read_text())
    missing = {"per_size", "rows", "long_records", "unit_seconds"} - set(summary)
    if missing:
        raise QuarticError(
            f"pool: {path} is not a scaling summary (no {', '.join(sorted(missing))})"
        )
    saved = pathlib.Path(path).with_name("config.json")
    if saved.is_file():
        other = json.loads(saved.read_text())
        keys = [*MEASURED_ALIKE, *(("long_steps", "long_lr") if config.long_steps and
                                   other.get("long_steps") else ())]  # fmt: skip
        differ = [k for k in keys if k in other and other[k] != getattr(config, k)]
        if differ:
            shown = ", ".join(f"{k}: {other[k]} there, {getattr(config, k)} here" for k in differ)
            raise QuarticError(f"pool: {path} measured its models otherwise ({shown})")
    return summary


def summarize(results: dict, config: Config) -> dict:
    pooled = [_pooled_summary(path, config) for path in config.pool]
    summary = report.summarize(results, config.extrapolate_to, config.bootstrap, pooled)
    return {**summary, "pooled_from": list(config.pool)} if config.pool else summary


def table(summary: dict) -> list[dict]:
    return report.table(summary)


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    return report.plot(out_dir, fig_dir)


if __name__ == "__main__":
    from quartic.harness import cli

    raise SystemExit(cli.main(["run", "scaling", *sys.argv[1:]]))
