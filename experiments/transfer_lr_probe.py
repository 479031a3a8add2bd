"""Is the direct arm of ``transfer_robustness`` under-tuned? Other fine-tuning schedules, same data.

The transformers fine-tuned directly on 600 target rows reach 52–68 % clean accuracy, below a
bag-of-words logistic regression on the same rows (70–75 %). This probe reruns the direct arm of
an existing ``transfer_robustness`` run (its config, its cached pretrained bodies, its seeds) at one
size under other schedules ``lr:steps:batch`` (best checkpoint by validation loss, evaluated every
``target_eval_every`` steps as there), attacks each as there, and sets the clean accuracy and ASR
beside the linear baseline. The run's own schedule is included: it reproduces the run's direct
units exactly (same keys, same program), which the probe checks.

    quartic run transfer_lr_probe           # 6 min on 2 cores after the main run
    quartic run transfer_lr_probe --quick   # 32 s after `quartic run transfer_robustness --quick`
    -> per architecture and schedule: clean accuracy and ASR (mean ± std over seeds of the mean
       over targets), the bag-of-words baseline, and whether the run's own schedule reproduced
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import numpy as np

from quartic.core.errors import QuarticError
from quartic.core.measure import mean_std
from quartic.harness import plotting
from quartic.harness.config import config_from_dict
from quartic.harness.runs import RunDir, read_json, run_sweep, write_json_atomic
from quartic.studies.transfer import pipeline

TITLE = "Probe: other fine-tuning schedules for transfer_robustness's direct arm"
QUICK_SECONDS = 35.0  # measured 32 s on 2 cores (the main run's cache present)


@dataclasses.dataclass(frozen=True)
class Config:
    # a finished (or started) run; empty: the transfer_robustness folder beside this run's
    transfer_results: str = ""
    size: str = "30k"
    archs: tuple[str, ...] = ("decoder", "encoder")
    targets: tuple[str, ...] = ("hate", "political", "gender")
    # lr:steps:batch; the first is compared with the run's own direct units
    schedules: tuple[str, ...] = ("1e-3:200:32", "3e-4:400:32", "1e-4:1000:32", "3e-4:400:128")

    @classmethod
    def quick(cls) -> Config:
        return cls(archs=("decoder",), targets=("hate",), schedules=cls.schedules[:2])


def parse_schedule(text: str) -> tuple[float, int, int]:
    try:
        lr, steps, batch = text.split(":")
        out = float(lr), int(steps), int(batch)
    except ValueError:
        raise QuarticError(f"schedule {text!r} is not lr:steps:batch (e.g. 3e-4:400:32)") from None
    if not (out[0] > 0 and out[1] > 0 and out[2] > 0):
        raise QuarticError(f"schedule {text!r}: lr, steps and batch must be positive")
    return out


def transfer_dir(config: Config, out_dir: pathlib.Path) -> pathlib.Path:
    """The run probed: ``transfer_results``, or the ``transfer_robustness`` folder beside
    ``out_dir`` (``results/transfer_robustness`` for ``results/transfer_lr_probe``, and the same
    under ``results/quick`` or a ``reproduce --out`` root)."""
    if config.transfer_results:
        return pathlib.Path(config.transfer_results)
    return pathlib.Path(out_dir).parent / "transfer_robustness"


def transfer_config(config: Config, run_dir: pathlib.Path) -> pipeline.StudyConfig:
    """The config of the ``transfer_robustness`` run at ``run_dir``."""
    path = RunDir(run_dir).config_path
    if not path.exists():
        raise QuarticError(
            f"no transfer_robustness run at {run_dir} (no config.json); run "
            "`quartic run transfer_robustness` first or set transfer_results"
        )
    tconfig = config_from_dict(pipeline.StudyConfig, read_json(path))
    if config.size not in tconfig.sizes:
        raise QuarticError(f"size {config.size!r} is not in that run's sizes {tconfig.sizes}")
    for t in config.targets:
        if t not in {t for _, t in tconfig.pair_list()}:
            raise QuarticError(f"target {t!r} is not a target of that run")
    return tconfig


def _unit_name(arch: str, target: str, schedule: str) -> str:
    return f"{arch}__{target}__" + schedule.replace(":", "_").replace(".", "p").replace("-", "m")


def run(config: Config, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    RunDir(out_dir).write_config(config)
    schedules = {s: parse_schedule(s) for s in config.schedules}
    cache = transfer_dir(config, out_dir)
    tconfig = transfer_config(config, cache)
    setting = tconfig.settings[0]  # the direct arm is shared by the settings; it uses the first

    def unit(arch, target, schedule):
        lr, steps, batch = schedules[schedule]
        probe = dataclasses.replace(tconfig, lr=lr, target_steps=steps, batch_size=batch)
        rec = pipeline.target_unit(probe, cache, setting, config.size, arch, "full", target)
        return {"arch": arch, "target": target, "schedule": schedule, "per_seed": rec["per_seed"]}

    units = [
        (_unit_name(a, t, s), lambda a=a, t=t, s=s: unit(a, t, s))
        for a in config.archs
        for t in config.targets
        for s in config.schedules
    ]
    units += [
        (f"baseline__{t}", lambda t=t: pipeline.baseline_unit(tconfig, setting, t))
        for t in config.targets
    ]
    res = run_sweep(units, out_dir, desc="transfer_lr_probe").results
    summary = summarise(config, cache, tconfig, res)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


def summarise(config: Config, run_dir: pathlib.Path, tconfig, res: dict) -> dict:
    budget = tconfig.budget_names()[0]
    run_units = RunDir(run_dir).done_results()
    own = f"{tconfig.lr:g}:{tconfig.target_steps}:{tconfig.batch_size}"
    cells, reproduced = {}, []
    for arch in config.archs:
        for schedule in config.schedules:
            parsed = parse_schedule(schedule)
            recs = [res.get(_unit_name(arch, t, schedule)) for t in config.targets]
            if any(r is None for r in recs):
                continue
            acc = np.mean([[s["test_accuracy"] for s in r["per_seed"]] for r in recs], axis=0)
            asr = np.mean(
                [
                    [s["attacks"][budget]["attack_success_rate"] for s in r["per_seed"]]
                    for r in recs
                ],
                axis=0,
            )
            best = [s["best_step"] for r in recs for s in r["per_seed"]]
            cells[f"{arch}|{schedule}"] = {
                "arch": arch, "schedule": schedule, "oacc": mean_std(100 * acc),
                "asr": mean_std(100 * asr), "best_step": best,
                "best_at_end": float(np.mean(np.asarray(best) == parsed[1])),
            }  # fmt: skip
            if parsed == (tconfig.lr, tconfig.target_steps, tconfig.batch_size):
                for r in recs:
                    name = f"direct__{arch}__{config.size}__full__{r['target']}"
                    if name in run_units:
                        reproduced.append(r["per_seed"] == run_units[name]["per_seed"])
    baseline = {
        t: 100 * res[f"baseline__{t}"]["target_train"]["test_accuracy"]
        for t in config.targets
        if f"baseline__{t}" in res
    }
    return {
        "size": config.size,
        "budget": budget,
        "cells": cells,
        "bow_baseline": baseline,
        "bow_baseline_mean": float(np.mean(list(baseline.values()))) if baseline else None,
        "run_schedule": own,
        "reproduces_run": bool(reproduced) and all(reproduced),
        "n_compared": len(reproduced),
    }


def table(summary: dict) -> list[dict]:
    rows = []
    base = summary["bow_baseline_mean"]
    for c in summary["cells"].values():
        rows.append(
            dict(
                experiment="transfer_lr_probe",
                quantity=(
                    f"direct {c['arch']} {summary['size']}, schedule {c['schedule']} "
                    f"(lr:steps:batch): OAcc / ASR@{summary['budget']} (%)"
                ),
                theory="" if base is None else f"bag-of-words {base:.1f}",
                measured=(
                    f"{c['oacc']['mean']:.1f} ± {c['oacc']['std']:.1f} / "
                    f"{c['asr']['mean']:.1f} ± {c['asr']['std']:.1f}"
                ),
                verdict=""
                if base is None
                else ("below" if c["oacc"]["mean"] < base else "at/above"),
            )
        )
    rows.append(
        dict(
            experiment="transfer_lr_probe",
            quantity=f"the run's own schedule {summary['run_schedule']} reproduces its direct units",
            theory="identical",
            measured=f"{summary['n_compared']} units compared",
            verdict="yes" if summary["reproduces_run"] else "no",
        )
    )
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    summary = read_json(pathlib.Path(out_dir) / "summary.json")
    cells = list(summary["cells"].values())
    archs = sorted({c["arch"] for c in cells})
    fig, axes = plotting.figure(1, len(archs), size=(4.2, 3.2))
    for j, arch in enumerate(archs):
        ax = axes[0, j]
        mine = [c for c in cells if c["arch"] == arch]
        x = np.arange(len(mine))
        ax.bar(x, [c["oacc"]["mean"] for c in mine], yerr=[c["oacc"]["std"] for c in mine],
               color="C0", alpha=0.8, label="direct fine-tuning")  # fmt: skip
        if summary["bow_baseline_mean"] is not None:
            ax.axhline(
                summary["bow_baseline_mean"], color="C3", ls="--", label="bag-of-words (same rows)"
            )
        ax.set_xticks(x, [c["schedule"] for c in mine], rotation=30, fontsize=7)
        ax.set_ylim(45, 80)
        ax.set_xlabel("lr:steps:batch")
        ax.set_ylabel("clean accuracy (%)")
        ax.set_title(f"{arch} {summary['size']}: direct arm, other schedules", fontsize=9)
        ax.legend(fontsize=7)
    return [plotting.save(fig, pathlib.Path(fig_dir) / "transfer_lr_probe.png")]


if __name__ == "__main__":
    from quartic.harness.cli import main

    raise SystemExit(main(["run", "transfer_lr_probe", *sys.argv[1:]]))
