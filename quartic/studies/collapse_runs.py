"""The transformer collapse study's units and summary (``experiments/transformer_collapse.py``,
docs/transformer.md): θ*'s report, the skill's exact Fisher and how every other curvature compares
with it, the law per (category, task), the orthogonal variants and the long fine-tuning runs
(:mod:`quartic.studies.collapse`), listed by :func:`units` and reduced by :func:`summarize`.

Each takes the experiment's ``config`` (any object with its fields).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from quartic.core import curvature, measure
from quartic.core.cache import BoundedCache, memo
from quartic.studies import collapse


def _setup(config, category: int):
    return collapse.aligned_setup(config.preset, category, config.world_seed, config.model_seed)


#: (config, category) -> F, filled by whichever unit computes it first
_FISHER = BoundedCache(8)


def _fisher(config, category: int):
    if (config, category) not in _FISHER:
        _FISHER[config, category] = collapse.dense_fisher(_setup(config, category)[1])
    return _FISHER[config, category]


def _curvature(config, category: int) -> dict:
    out, _FISHER[config, category] = collapse.skill_curvature(
        _setup(config, category)[1], config.rank, jax.random.PRNGKey(category)
    )
    return out


@memo(maxsize=8)
def _basis(config, category: int):
    w, v = curvature.eigh_descending(_fisher(config, category))
    return v[:, : config.rank], w[: config.rank]


def units(config) -> list:
    k0 = config.categories[0]
    units = [("theta_star", lambda: {"report": _setup(config, k0)[0].report})]
    for k in config.categories:
        units.append((f"curvature_{k}", lambda k=k: _curvature(config, k)))
        for task in config.tasks:
            law = functools.partial(
                collapse.task_law,
                task=task,
                rank=config.rank,
                num_times=config.num_times,
                taylor_order=config.taylor_order,
            )
            units.append(
                (
                    f"law_{k}_{task}",
                    lambda k=k, law=law: law(_setup(config, k)[1], _fisher(config, k)),
                )
            )
    variants = [("range", None)] + [("rank", d) for d in config.orthogonal_ranks]
    for task in config.orthogonal_tasks:
        for onto, d in variants:
            name = f"orthogonal_{onto}{d or ''}_{k0}_{task}"
            variant = functools.partial(
                collapse.orthogonal_variant,
                task=task,
                rank=config.rank,
                onto=onto,
                num_times=config.num_times,
                taylor_order=config.taylor_order,
                projector_rank=d,
            )
            units.append((name, lambda v=variant: v(_setup(config, k0)[1], _fisher(config, k0))))
    runs = [(t, s, 0) for t in (*config.long_tasks, "harmful") for s in range(config.long_seeds)]
    runs += (
        [(t, 0, config.lora_rank) for t in (*config.long_tasks, "harmful")]
        if config.lora_rank
        else []
    )
    for task, seed, lora in runs:
        units.append(
            (
                f"long_{task}_{seed}" + (f"_lora{lora}" if lora else ""),
                lambda task=task, seed=seed, lora=lora: collapse.long_finetune(
                    _setup(config, k0)[1],
                    task,
                    *_basis(config, k0),
                    config.long_steps,
                    config.long_lr,
                    seed,
                    optimizer=config.long_optimizer,
                    lora_rank=lora,
                ),
            )
        )
    return units


def _mean_sd(values) -> list[float]:
    s = measure.mean_std(values)
    return [s["mean"], s["std"]]


def summarize(res: dict, config) -> dict:
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
            laws[f"{k}/{task}"] = {"lambda_max_ft": r["lambda_max_ft"]} | {
                name: {
                    key: r[name][key]
                    for key in (
                        "forecast_max_rel_error_tl_le_0.1",
                        "forecast_max_scaled_error_tl_le_0.1",
                        "sign_changes_tl_le_0.1",
                        "forecast_parts_at_t_lambda",
                        "onset_order",
                        "taylor_coefficients",
                    )
                }
                | {
                    key: r[name]["aic"][key]
                    for key in (
                        "ortho_ratio",
                        "crossover_time",
                        "align_grad_norm",
                        "gamma_fisher",
                        "quartic_coefficient",
                    )
                }
                | {"crossover_t_lambda": r[name]["aic"]["crossover_time"] * r["lambda_max_ft"]}
                for name in ("refusal", "kl")
            }
    out["laws"] = laws
    orth = {}
    for key, r in res.items():
        if key.startswith("orthogonal_"):
            kl = r["kl"]
            c = kl["taylor_coefficients"]
            predicted = kl["aic"]["crossover_time"]
            measured = kl["measured_crossover_time"]
            orth[key] = {
                "onto": r["onto"],
                "projector_rank": r["projector_rank"],
                "c1_c2_c3_over_c4": [abs(x) / abs(c[3]) for x in c[:3]],
                "c4": c[3],
                "gamma_f_sq_over_8": kl["aic"]["quartic_coefficient"],
                "c4_over_gamma_f": kl["c4_over_gamma_f"],
                "ratio_to_c4_smallest_t": kl["ratio_to_c4_smallest_t"],
                "smallest_t_lambda": r["t_lambda"][0],
                "slope4_window": kl["slope4_window"],
                "max_local_slope": float(np.max(kl["local_slope"])),
                "predicted_crossover_time": predicted,
                "predicted_crossover_t_lambda": predicted * r["lambda_max_ft"],
                "measured_crossover_time": measured,
                "crossover_ratio": measured / predicted if measured else None,
            }
    out["orthogonal"] = orth
    longs = [r for key, r in res.items() if key.startswith("long_")]
    full = [r for r in longs if not r.get("lora_rank")]
    benign = [r for r in full if r["task"] != "harmful"]
    if len(benign) >= 3:
        out["overlap_harm"] = collapse.overlap_harm(benign)
    per_task = {}
    for r in longs:
        arm = f"lora{r['lora_rank']}" if r.get("lora_rank") else "full"
        d = per_task.setdefault(arm, {}).setdefault(r["task"], {})
        for key in ("harmfulness", "retention", "overlap", "fisher_overlap", "du_kl", "delta_norm"):
            d.setdefault(key, []).append(r[key][-1])
    out["long_per_task"] = {
        arm: {t: {k: _mean_sd(v) for k, v in d.items()} for t, d in tasks.items()}
        for arm, tasks in per_task.items()
    }
    if longs:
        out["long_retention_at_theta_star"] = float(longs[0]["retention"][0])
        out["long_setting"] = {
            "optimizer": config.long_optimizer,
            "lr": config.long_lr,
            "steps": config.long_steps,
        }
    return out
