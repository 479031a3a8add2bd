"""Time-to-threshold forecasts checked against simulation, per problem: the units of
``experiments/forecast.py`` (docs/forecast.md).

:func:`family_unit` runs a chunk of problems of one family (quadratic, leaky, curved) through one
compiled program (the forecasts at θ* and the checked gradient-descent run,
:func:`quartic.studies.forecast.checked_run`), :func:`transformer_unit` one task of the small
transformer; :func:`units` lists them for a sweep and :func:`summarise` reduces their problems to
median relative errors per method (:data:`METHODS`). Each takes the experiment's ``config`` (any
object with its fields).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import theory
from quartic.core.cache import memo
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.measure import json_number
from quartic.core.problems import QuadraticSpec, make_curved
from quartic.core.subspace import lambda_max
from quartic.studies import collapse, collapse_tasks
from quartic.studies import forecast as fc

#: The forecasts compared, in the summary's order.
METHODS = ("quartic", "second_order", "taylor", "monitored", "monitored_taylor", "peer")


def _family_params(config, family: str) -> tuple[QuadraticSpec, float, float]:
    """(spec, curvature, β). Quadratic families are curved problems with c = 0, β = 0, so that
    every family runs through the same compiled program."""
    if family == "quadratic":
        return config.spec(), 0.0, 0.0
    if family == "leaky":
        return config.spec(leak=config.leak, tail=config.tail), 0.0, 0.0
    return config.spec(), config.curvature, config.quartic


def _problems(spec: QuadraticSpec, keys, curvature: float, beta: float):
    """Problems stacked over ``keys``, drawn eagerly (per-primitive kernels are cached and shared
    with the other experiments and tests of the same shape)."""
    probs = []
    for key in keys:
        prob, _ = make_curved(key, spec, 1.0, beta)
        probs.append(dataclasses.replace(prob, curvature=curvature * prob.curvature))
    return jax.tree.map(lambda *x: jnp.stack(x), *probs)


@memo(maxsize=16)
def _simulate_fn(rank: int, num_checks: int, check_every: int, taylor_order: int):
    def one(p, lr):
        diag = fc.diagnose_dense(p.align_loss_fn, p.ft_loss_fn, p.theta_star, rank)
        run = fc.simulate_with_checks(
            p.align_loss_fn,
            p.ft_loss_fn,
            p.theta_star,
            lr,
            num_checks,
            check_every,
            taylor_order=taylor_order,
        )
        return diag, run

    return jax.jit(jax.vmap(one))


@memo(maxsize=16)
def _lambda_max_fn():
    return jax.jit(jax.vmap(lambda p: lambda_max(p.base.ft_hessian, method="dense").value))


def _key(config, *path: int):
    key = jax.random.PRNGKey(config.seed)
    for p in path:
        key = jax.random.fold_in(key, p)
    return key


def family_unit(config, family: str, chunk_index: int) -> dict:
    spec, curvature, beta = _family_params(config, family)
    fam = config.families.index(family)
    start = chunk_index * config.chunk
    size = min(config.chunk, config.num_problems - start)
    keys = [_key(config, fam, i) for i in range(start, start + size)]
    probs = _problems(spec, keys, curvature, beta)
    lam = np.asarray(_lambda_max_fn()(probs))
    lrs = config.lr_lambda / lam
    sim = _simulate_fn(config.d, config.num_checks, config.check_every, config.taylor_order)
    diag, run = jax.device_get(sim(probs, jnp.asarray(lrs)))
    taylor = run.check_taylor[:, 0]  # the first check is at θ*
    rng = np.random.default_rng([config.seed, fam, chunk_index])
    u = np.exp(rng.uniform(*np.log(config.u_range), size))
    out = []
    for i in range(size):
        one_run = jax.tree.map(lambda x, i=i: x[i], run)
        one_diag = jax.tree.map(lambda x, i=i: x[i], diag)
        if not bool(one_run.finite):
            raise DivergenceError(f"{family} problem {start + i} diverged; lower lr_lambda")
        out.append(
            _record(
                config,
                start + i,
                u[i],
                lam[i],
                lrs[i],
                one_run,
                one_diag,
                taylor[i],
                start + i == 0,
            )
        )
    return {"family": family, "problems": out}


def _record(config, index, u, lam, lr, run, diag, taylor, curve: bool, lr_lambda=None) -> dict:
    """One problem: the threshold that the simulation crosses at t·λ_max = u, every prediction
    of its crossing time and their errors (``taylor``: c₁…c_K at θ*, or None)."""
    du = np.asarray(run.delta_u)
    k_thr = int(round(u / (lr_lambda or config.lr_lambda)))
    threshold = float(du[k_thr])
    if not threshold > 0:
        raise QuarticError(f"problem {index}: Δu = {threshold} at the threshold")
    pred = fc.predictions(run, diag, float(lr), threshold, config.lead, taylor_coefficients=taylor)
    tolist = lambda x: None if x is None else np.asarray(x).tolist()
    rec = {
        "index": index,
        "u": float(u),
        "lambda_max": float(lam),
        "lr": float(lr),
        "threshold": threshold,
        "simulated": pred.simulated,
        # a prediction that never crosses (inf) is stored as None: unit records are finite JSON
        **{m: json_number(getattr(pred, m)) for m in METHODS},
        "monitored_check_time": pred.monitored_check_time,
        "errors": {k: json_number(v) for k, v in pred.relative_errors().items()},
        "gamma_fisher": float(diag.gamma_fisher),
        "eps_fisher": float(diag.eps_fisher),
        "ortho_norm": float(diag.ortho_norm),
        "lambda_min_peer": fc.peer_lambda_min(diag.eigenvalues),
        "taylor_coefficients": tolist(taylor),
        "check_times": pred.check_times.tolist(),
        "check_predictions": [json_number(x) for x in pred.check_predictions],
        "check_predictions_taylor": None
        if pred.check_predictions_taylor is None
        else [json_number(x) for x in pred.check_predictions_taylor],
    }
    if taylor is None:  # the Taylor forecasts were not run: no entry at all
        for k in ("taylor", "monitored_taylor"):
            del rec[k]
        for k in ("taylor", "monitored_taylor", "monitored_taylor_remaining"):
            del rec["errors"][k]
    if curve:
        idx = np.unique(np.round(np.geomspace(1, du.shape[0] - 1, 150)).astype(int))
        rec["curve"] = {
            "t": (lr * idx).tolist(),
            "delta_u": du[idx].tolist(),
            "forecast": np.asarray(theory.Forecast(*diag.forecast).gd(idx, lr)).tolist(),
        }
    return rec


# ----------------------------------------------------------------------------------------------
# The small transformer: one compiled program (diagnosis at θ* and the checked run) for every task


def _tx_setup(config):
    return collapse.aligned_setup(config.transformer_preset, config.transformer_category)[1]


@memo(maxsize=16)
def _tx_simulate_fn(config):
    setup = _tx_setup(config)
    taylor = config.taylor_order if config.transformer_taylor else None

    def one(theta_star, batch, kl_data, lr, lam):
        losses = collapse_tasks.losses(setup, theta_star, batch, kl_data)
        a, f = losses.align_loss_fn, losses.ft_loss_fn
        diag = fc.diagnose_lanczos(a, f, theta_star, config.transformer_rank, lam)
        run = fc.simulate_with_checks(
            a,
            f,
            theta_star,
            lr,
            config.transformer_num_checks,
            config.check_every,
            delta_u_fn=losses.delta_u_fn,
            taylor_order=taylor,
        )
        return diag, run

    return jax.jit(one)


def transformer_unit(config, task: str) -> dict:
    """One benign task: ``transformer_thresholds`` problems (thresholds) on one simulated run."""
    setup = _tx_setup(config)
    batch = setup.task_batch(task)
    lam = collapse_tasks.lambda_max_ft(setup, batch)
    lr = config.transformer_lr_lambda / lam
    diag, run = jax.device_get(
        _tx_simulate_fn(config)(setup.theta, batch, setup.align_data["kl"], lr, lam)
    )
    if not bool(run.finite):
        raise DivergenceError(f"transformer task {task} diverged; lower lr_lambda")
    taylor = None if run.check_taylor is None else np.asarray(run.check_taylor[0])
    us = np.geomspace(*config.transformer_u_range, config.transformer_thresholds)
    base = config.transformer_tasks.index(task) * config.transformer_thresholds
    out = [
        {
            "task": task,
            **_record(
                config,
                base + j,
                u,
                lam,
                lr,
                run,
                diag,
                taylor,
                j == 0,
                config.transformer_lr_lambda,
            ),
        }
        for j, u in enumerate(us)
    ]
    return {"family": "transformer", "task": task, "problems": out}


def units(config):
    units = []
    num_chunks = -(-config.num_problems // config.chunk)
    for family in config.families:
        if family == "transformer":
            for task in config.transformer_tasks:
                units.append((f"transformer_{task}", lambda t=task: transformer_unit(config, t)))
            continue
        for c in range(num_chunks):
            units.append((f"{family}_{c:03d}", lambda f=family, c=c: family_unit(config, f, c)))
    return units


def relative_error(p: dict, m: str) -> float:
    """A problem's relative error for method ``m``; ``inf`` where it never predicted a crossing
    (stored as None)."""
    e = p["errors"][m]
    return math.inf if e is None else e


def summarise(problems: list[dict]) -> dict:
    out = {"num_problems": len(problems)}
    for m in (*METHODS, "monitored_remaining", "monitored_taylor_remaining"):
        if problems and not any(m in p["errors"] for p in problems):  # not run (Taylor, if off)
            out[m] = {"median_rel_error": None, "q25": None, "q75": None, "never_predicted": 0}
            continue
        e = np.asarray([relative_error(p, m) for p in problems if m in p["errors"]], float)
        out[m] = {
            "median_rel_error": float(np.median(e)) if e.size else None,
            "q25": float(np.quantile(e, 0.25)) if e.size else None,
            "q75": float(np.quantile(e, 0.75)) if e.size else None,
            "never_predicted": int(np.sum(~np.isfinite(e))),
        }
    # problems that cross before the first re-check are scored on the check at θ*, where the
    # monitored forecast is the one-shot forecast: compare on the others
    late = [p for p in problems if p["monitored_check_time"] > 0]
    out["num_rechecked"] = len(late)
    for mon, one in (("monitored", "second_order"), ("monitored_taylor", "taylor")):
        better = [
            relative_error(p, mon) < relative_error(p, one) for p in late if one in p["errors"]
        ]
        out[f"{mon}_better_when_rechecked"] = float(np.mean(better)) if better else None
    return out
