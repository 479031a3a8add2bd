"""The defences compared: the units of ``experiments/defences.py`` (docs/defences.md) and their
summaries.

- :func:`defence_unit`: one defence on one setting of the rotating curved family (every seed in
  one compiled program, :func:`quartic.studies.defences.run_defence`), stopped at equal task loss;
  :func:`theory_unit`: the predicted leaks of that family.
- :func:`transformer_diagnostics_unit`, :func:`transformer_unit`: the same on the small
  transformer's tasks (:mod:`quartic.studies.collapse_tasks`), LoRA included.
- :func:`units` lists them for a sweep; :func:`summarise_setting`, :func:`summarise_transformer`
  and :func:`laws` reduce them.

Each takes the experiment's ``config`` (any object with its fields and its ``settings()``,
``defences()`` and ``transformer_defences()``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import curvature, dynamics, theory
from quartic.core.cache import memo
from quartic.core.errors import DivergenceError, QuarticError
from quartic.core.problems import make_curved
from quartic.core.subspace import lambda_max
from quartic.studies import collapse, collapse_tasks
from quartic.studies import defences as D

#: The defences of the sweep over the curvature (the ones whose difference is the rotation of M).
SWEEP = ("plain", "fixed_projection", "tracked_projection", "retraction", "tracked_retraction")

# ----------------------------------------------------------------------------------------------
# Compiled pieces (one compile per defence, reused across settings and seeds)


@memo(maxsize=16)
def _problems(config, curvature: float, tail: float):
    """The setting's problems, stacked over seeds, and their true bases B.

    Each is drawn with a unit curvature vector and a unit Fisher tail, then scaled, so that the
    settings share their draws. Drawn eagerly (per-primitive compiled kernels are cached and
    shared by every experiment and test of the same shape; a jit of the generator alone costs
    seconds of compile time)."""
    spec = config.spec(tail=1.0)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.num_seeds)
    probs, bases = [], []
    for key in keys:
        prob, basis = make_curved(key, spec, 1.0, config.quartic)
        base, d = prob.base, spec.d
        w = base.fisher_values * jnp.concatenate(
            [jnp.ones((d,), base.fisher_values.dtype), jnp.full((spec.n - d,), tail)]
        )
        v = base.fisher_vectors
        base = dataclasses.replace(base, fisher=(v * w[None, :]) @ v.T, fisher_values=w)
        probs.append(dataclasses.replace(prob, base=base, curvature=curvature * prob.curvature))
        bases.append(basis)
    return jax.tree.map(lambda *x: jnp.stack(x), *probs), jnp.stack(bases)


@memo(maxsize=16)
def _prelude(config, setting: str):
    """The setting's problems, true bases, ``min L_FT`` and the Lanczos estimate of M(θ*)."""
    curvature, tail = config.settings()[setting]
    probs, true_basis = _problems(config, curvature, tail)
    ft_min, subspace = _prelude_fn(config.d)(probs)
    return probs, true_basis, ft_min, subspace


@memo(maxsize=16)
def _prelude_fn(rank: int):
    def one(p):
        losses = D.Losses.of(p)
        return D.ft_minimum(p.ft_loss_fn, p.theta_star), D.sensitive_subspace(losses, rank)

    return jax.jit(jax.vmap(one))


#: Runs that record the rotation angle of M(θ) at every step (an eigh per step).
ANGLE = ("plain", "fixed_projection")


@memo(maxsize=16)
def _runner(defence: D.Defence, rank: int, num_steps: int):
    def one(p, subspace, true_basis, lr):
        obs = dynamics.make_observer(
            p.align_loss_fn, p.theta_star, true_basis, curvature_fn=p.fisher_at
        )
        observe = (lambda th: {"angle": obs(th)["angle"]}) if defence.name in ANGLE else None
        return D.run_defence(
            defence, D.Losses.of(p), rank, lr, num_steps, observe=observe, subspace=subspace
        )

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))


def _interp(values, step: float) -> float:
    values = np.asarray(values)
    return float(np.interp(step, np.arange(values.shape[0]), values))


def _curve_indices(num_steps: int, num: int = 120) -> np.ndarray:
    return np.unique(np.round(np.geomspace(1, num_steps, num)).astype(int))


def defence_unit(config, setting: str, defence: D.Defence) -> dict:
    curvature, tail = config.settings()[setting]
    probs, true_basis, ft_min, subspace = _prelude(config, setting)
    run = _runner(defence, config.d, config.num_steps)(probs, subspace, true_basis, config.lr)
    run = jax.device_get(run)
    ft_min = np.asarray(ft_min)
    per_seed = []
    for i in range(config.num_seeds):
        ft, du = np.asarray(run.ft_loss[i]), np.asarray(run.delta_u[i])
        angle = run.observables.get("angle")
        if not np.all(run.finite[i]):
            k = int(np.argmin(run.finite[i]))
            raise DivergenceError(
                f"{defence.name} diverged on seed {i} ({setting}) at step {k}; lower lr"
            )
        target = D.target_loss(ft[0], ft_min[i], config.fraction)
        at = D.at_target(ft, du, target, ft_min[i])
        fit = D.fitted_slope(du, config.lr, at.steps, decades=1.0) if at.reached else None
        per_seed.append(
            {
                "reached": at.reached,
                "steps": at.steps if at.reached else None,
                "t": config.lr * at.steps if at.reached else None,
                "delta_u": at.delta_u if at.reached else None,
                "best_fraction": at.best_fraction,
                "slope": fit.exponent if fit is not None else None,
                "angle": _interp(angle[i], at.steps) if at.reached and angle is not None else None,
            }
        )
    idx = _curve_indices(config.num_steps)
    cost = defence.cost(config.n, config.d)
    return {
        "setting": setting,
        "curvature": curvature,
        "tail": tail,
        "defence": defence.name,
        "curvature_aware": defence.curvature_aware,
        "hvps_per_step": cost.hvps_per_step,
        "grads_per_step": cost.grads_per_step,
        "setup_hvps": cost.setup_hvps,
        "per_seed": per_seed,
        "curve": {
            "t": (config.lr * idx).tolist(),
            "delta_u": np.asarray(run.delta_u[0])[idx].tolist(),
            "ft_excess": (np.asarray(run.ft_loss[0])[idx] - ft_min[0]).tolist(),
            "ft_excess0": float(run.ft_loss[0][0] - ft_min[0]),
        },
    }


@memo(maxsize=16)
def _theory_fn(rank: int, lr: float):
    def one(p, b):
        hg = p.base.ft_hessian @ p.base.ft_grad
        lam = jnp.sort(p.base.fisher_values)[::-1][:rank]
        gamma_f = jnp.linalg.norm(jnp.sqrt(lam) * (b.T @ hg))
        return {
            "c4_plain": D.plain_leak_coefficient(p, b),
            "c4_fixed": D.fixed_leak_coefficient(p, b),
            "tracked_a": D.tracked_leak_coefficient(p, b, lr),
            "tail_a": D.tail_leak_coefficient(p, b),
            "gamma_f2_8": theory.quartic_coefficient(gamma_f),
        }

    return jax.jit(jax.vmap(one))


def theory_unit(config) -> dict:
    """Predicted leading terms, per seed (docs/defences.md §2), on the main setting: c₄ of the
    plain and of the fixed-projection flows (Δu ≈ c₄t⁴), the tracked leak a (Δu ≈ a t²), the
    paper's γ_F²/8 (which ignores the curvature of the alignment map); on the tail setting: the
    first-order floor a_tail of every rank-d projection (Δu ≈ a_tail t²)."""
    out = {}
    for setting in ("main", "tail"):
        curvature, tail = config.settings()[setting]
        probs, true_basis = _problems(config, curvature, tail)
        vals = jax.device_get(_theory_fn(config.d, config.lr)(probs, true_basis))
        if setting == "main":
            out.update({k: np.asarray(v).tolist() for k, v in vals.items() if k != "tail_a"})
        else:
            out["tail_a"] = np.asarray(vals["tail_a"]).tolist()
    return out


# ----------------------------------------------------------------------------------------------
# The small transformer (docs/defences.md §5). Every program takes the task's data as arguments:
# one compilation per defence serves every task.


def _tx_setup(config):
    return collapse.aligned_setup(config.transformer_preset, config.transformer_category)[1]


@memo(maxsize=16)
def _tx_lora(config):
    """``(φ₀, θ(φ))`` of LoRA on every dense kernel (the key convention of ``collapse``)."""
    r = config.transformer_lora_rank
    return collapse.lora_reparam(_tx_setup(config), r, jax.random.PRNGKey(r))


def _tx_defence(config, name: str, scale=1.0) -> D.Defence:
    """The defence ``name`` with its per-task strength ``scale`` (the anchor's μ, the replay
    weight w; traced inside the runner, so one program serves every task)."""
    if name == "plain":
        return D.Plain()
    if name == "fixed_projection":
        return D.FixedProjection()
    if name.startswith("periodic_projection"):
        return D.PeriodicProjection(every=config.transformer_every)
    if name.startswith("anchor"):
        return D.Anchor(mu=scale)
    if name.startswith("replay"):
        return D.Replay(weight=scale)
    if name.startswith("lowrank_krylov"):
        return D.LowRank(lora_rank=config.transformer_lowrank, basis="krylov")
    if name.startswith("lora"):
        phi0, theta_of = _tx_lora(config)
        return D.Reparametrised(theta_of=theta_of, phi0=phi0, label=name)
    if name == "retraction":
        return D.Retraction(tracked=False)
    if name == "tracked_projection":
        return D.TrackedProjection()
    if name == "tracked_retraction":
        return D.Retraction(tracked=True)
    raise QuarticError(f"unknown transformer defence {name!r}")


@memo(maxsize=16)
def _tx_runner(config, name: str):
    setup = _tx_setup(config)

    def one(theta_star, batch, kl_data, lr, subspace, scale):
        losses = collapse_tasks.losses(setup, theta_star, batch, kl_data)
        defence = _tx_defence(config, name, scale)
        return D.run_defence(
            defence,
            losses,
            config.transformer_rank,
            lr,
            config.transformer_num_steps,
            subspace=subspace,
        )

    return jax.jit(one)


@memo(maxsize=16)
def _tx_diagnose_fn(config):
    """M(θ*) by Lanczos, and what explains a projection's floor, along plain GD to the reference
    step: the first-order leak coefficients at θ*, ½gᵀFg (plain) and ½g⊥ᵀFg⊥ (g⊥ = (I − P)g, what
    any rank-d projection keeps), the quadratic form ½δᵀFδ of the plain displacement at the
    reference split into its M part and its tail part ½(P⊥δ)ᵀF(P⊥δ), Δu there, and how far M
    has turned by then: the largest principal angle between M(θ_ref) and M(θ*) (sensitive to a
    swap of the d-th and (d+1)-th eigenvectors when their gap is small), the mean squared cosine
    ‖B*ᵀB_ref‖²_F/d, and the share of M(θ_ref)'s eigenvalue mass that M(θ*) captures. F is the
    exact Hessian of the KL at θ* (at θ_ref: of the KL at θ_ref)."""
    setup = _tx_setup(config)
    rank, ref = config.transformer_rank, config.transformer_ref_steps

    def diagnose(theta_star, batch, kl_data, lr):
        losses = collapse_tasks.losses(setup, theta_star, batch, kl_data)
        grad = jax.grad(losses.ft_loss_fn)
        g = grad(theta_star)
        theta_ref = jax.lax.fori_loop(0, ref, lambda _, th: th - lr * grad(th), theta_star)
        # one Lanczos body for both points, one batched HVP for every quadratic form: each
        # inlined transformer HVP costs seconds of compile time
        bases, values = jax.lax.map(
            lambda th: D.sensitive_subspace(losses, rank, theta=th),
            jnp.stack([theta_star, theta_ref]),
        )
        basis, b_ref = bases[0], bases[1]
        cos2 = (basis.T @ b_ref) ** 2  # [i, j]: M(θ*)'s i-th vs M(θ_ref)'s j-th eigenvector
        proj = lambda v: basis @ (basis.T @ v)
        delta = theta_ref - theta_star
        vecs = jnp.stack([g, g - proj(g), delta, proj(delta), delta - proj(delta)])
        fvecs = jax.vmap(curvature.hvp_fn(losses.align_loss_fn, theta_star))(vecs)
        forms = 0.5 * jnp.sum(vecs * fvecs, axis=1)
        resid = b_ref - proj(b_ref)
        out = {
            "eigenvalues": values[0],
            "grad_norm": jnp.linalg.norm(g),
            "ortho_ratio": jnp.linalg.norm(basis.T @ g) / jnp.linalg.norm(g),
            "leak_plain": forms[0],
            "leak_tail": forms[1],
            "delta_norm_ref": jnp.linalg.norm(delta),
            "overlap_ref": jnp.linalg.norm(basis.T @ delta) / jnp.linalg.norm(delta),
            "quad_ref": forms[2],
            "quad_m_ref": forms[3],
            "quad_tail_ref": forms[4],
            "delta_u_ref": losses.delta_u(theta_ref),
            "angle_ref": jnp.arcsin(jnp.clip(jnp.linalg.norm(resid, 2), 0.0, 1.0)),
            "overlap_subspace_ref": jnp.sum(cos2) / rank,
            "overlap_fisher_ref": jnp.sum(values[1] * jnp.sum(cos2, 0)) / jnp.sum(values[1]),
        }
        return (basis, values[0]), out

    return jax.jit(diagnose)


@memo(maxsize=16)
def _tx_lora_lambda_fn(config):
    """λ_max of LoRA's own Hessian ∇²_φ L_FT(θ(φ)) at φ₀ (its step size is lr_λ over this)."""
    setup = _tx_setup(config)
    phi0, theta_of = _tx_lora(config)

    def top(batch):
        mv = curvature.hvp_fn(lambda p: setup.lm_fn(theta_of(p), batch), phi0)
        return lambda_max(mv, v0=jnp.ones_like(phi0), num_iters=collapse_tasks.LAMBDA_ITERS).value

    return jax.jit(top)


@memo(maxsize=16)
def _tx_prelude(config, task: str) -> dict:
    """Per task: η, M(θ*), the plain run (it fixes the equal-progress target), the per-task
    strengths of the anchor and the replay, LoRA's η, and the diagnostics."""
    setup = _tx_setup(config)
    batch, kl = setup.task_batch(task), setup.align_data["kl"]
    lam = collapse_tasks.lambda_max_ft(setup, batch)
    lr = config.transformer_lr_lambda / lam
    subspace, diag = _tx_diagnose_fn(config)(setup.theta, batch, kl, lr)
    diag = {k: np.asarray(v).tolist() for k, v in jax.device_get(diag).items()}
    plain = jax.device_get(_tx_runner(config, "plain")(setup.theta, batch, kl, lr, subspace, 0.0))
    ref = config.transformer_ref_steps
    t_ref = lr * ref
    lam_lora = float(_tx_lora_lambda_fn(config)(batch))
    return {
        "batch": batch,
        "subspace": subspace,
        "plain": plain,
        "lambda_max_ft": lam,
        "lr": lr,
        "target": float(plain.ft_loss[ref]),
        "t_ref": t_ref,
        "anchor_mu": config.transformer_anchor / t_ref,
        "replay_weight": config.transformer_replay * lam / diag["eigenvalues"][0],
        "lambda_max_lora": lam_lora,
        "lr_lora": config.transformer_lr_lambda / lam_lora,
        "diagnostics": diag,
    }


def transformer_diagnostics_unit(config, task: str) -> dict:
    pre = _tx_prelude(config, task)
    keys = ("lambda_max_ft", "lr", "target", "t_ref", "anchor_mu", "replay_weight")
    return {
        "task": task,
        **{k: pre[k] for k in keys},
        "lambda_max_lora": pre["lambda_max_lora"],
        "lr_lora": pre["lr_lora"],
        "ft_loss0": float(pre["plain"].ft_loss[0]),
        **pre["diagnostics"],
    }


def transformer_unit(config, task: str, name: str) -> dict:
    pre = _tx_prelude(config, task)
    setup = _tx_setup(config)
    lr = pre["lr_lora"] if name.startswith("lora") else pre["lr"]
    scale = {"anchor": pre["anchor_mu"], "replay": pre["replay_weight"]}.get(name.split("_")[0])
    if name == "plain":
        run = pre["plain"]
    else:
        runner = _tx_runner(config, name)
        kl = setup.align_data["kl"]
        args = (setup.theta, pre["batch"], kl, lr, pre["subspace"], scale or 0.0)
        run = jax.device_get(runner(*args))
    ft, du = np.asarray(run.ft_loss), np.asarray(run.delta_u)
    if not np.all(run.finite):
        k = int(np.argmin(run.finite))
        raise DivergenceError(f"{name} diverged on the transformer task {task} at step {k}")
    at = D.at_target(ft, du, pre["target"], pre["target"])
    fit = D.fitted_slope(du, lr, at.steps, decades=1.0) if at.reached else None
    defence = _tx_defence(config, name)
    cost = defence.cost(setup.n, config.transformer_rank)
    idx = _curve_indices(config.transformer_num_steps, 80)
    return {
        "setting": "transformer",
        "task": task,
        "defence": name,
        "curvature_aware": defence.curvature_aware,
        "hvps_per_step": cost.hvps_per_step,
        "grads_per_step": cost.grads_per_step,
        "setup_hvps": cost.setup_hvps,
        "lr": lr,
        "scale": scale,
        "per_seed": [
            {
                "task": task,
                "reached": at.reached,
                "steps": at.steps if at.reached else None,
                "t": lr * at.steps if at.reached else None,
                "delta_u": at.delta_u if at.reached else None,
                "best_fraction": at.best_fraction,
                "slope": fit.exponent if fit is not None else None,
                "angle": None,
            }
        ],
        "curve": {
            "step": idx.tolist(),
            "t_lambda": (lr * pre["lambda_max_ft"] * idx).tolist(),
            "delta_u": du[idx].tolist(),
            "ft_loss": ft[idx].tolist(),
            "target": pre["target"],
        },
    }


def _tx_assemble(units: dict, config_tasks=None) -> dict:
    """The per-(task, defence) units as one pseudo-unit per defence whose ``per_seed`` runs over
    the tasks (in the order of ``config_tasks`` when given), for :func:`summarise_setting`."""
    out: dict[str, dict] = {}
    rows = [r for r in units.values() if r.get("setting") == "transformer"]
    order = list(config_tasks) if config_tasks else sorted({r["task"] for r in rows})
    rows.sort(key=lambda r: order.index(r["task"]) if r["task"] in order else len(order))
    for r in rows:
        agg = out.setdefault(r["defence"], {**r, "per_seed": []})
        agg["per_seed"] = agg["per_seed"] + r["per_seed"]
    tasks_by_defence = {k: [s["task"] for s in v["per_seed"]] for k, v in out.items()}
    # only the tasks every defence has (a failed unit must not shift the per-task ratios)
    common = set.intersection(*map(set, tasks_by_defence.values())) if out else set()
    for v in out.values():
        v["per_seed"] = [s for s in v["per_seed"] if s["task"] in common]
    return {f"transformer__{k}": v for k, v in out.items()}


def summarise_transformer(units: dict, config=None) -> dict | None:
    tasks = config.transformer_tasks if config is not None else None
    assembled = _tx_assemble(units, tasks)
    if not assembled:
        return None
    defences = summarise_setting(assembled, "transformer")
    diag = {
        r["task"]: r
        for k, r in units.items()
        if k.startswith("transformer_") and "ortho_ratio" in r
    }
    plain_du = {s["task"]: s["delta_u"] for s in assembled["transformer__plain"]["per_seed"]}
    fixed = assembled.get("transformer__fixed_projection")
    tail_ratio = []
    if fixed is not None:
        for s in fixed["per_seed"]:
            d = diag.get(s["task"])
            if d is not None and s["delta_u"] is not None and d["quad_tail_ref"] > 0:
                tail_ratio.append(s["delta_u"] / d["quad_tail_ref"])
    per_task = {
        name: {s["task"]: s["delta_u"] for s in r["per_seed"]}
        for name, r in ((k.split("__", 1)[1], v) for k, v in assembled.items())
    }
    return {
        "tasks": [s["task"] for s in assembled["transformer__plain"]["per_seed"]],
        "defences": defences,
        "per_task_delta_u": per_task,
        "plain_delta_u": plain_du,
        "fixed_over_plain_tail_part": _stats(tail_ratio),
        "diagnostics": diag,
    }


# ----------------------------------------------------------------------------------------------


def units(config):
    units = [("theory", lambda: theory_unit(config))]
    for setting in config.settings():
        for defence in config.defences():
            if setting.startswith("sweep") and defence.name not in SWEEP:
                continue
            name = f"{setting}__{defence.name}"
            units.append((name, lambda s=setting, d=defence: defence_unit(config, s, d)))
    for task in config.transformer_tasks:
        units.append(
            (f"transformer_{task}", lambda t=task: transformer_diagnostics_unit(config, t))
        )
        for name in config.transformer_defences():
            units.append(
                (
                    f"transformer_{task}__{name}",
                    lambda t=task, n=name: transformer_unit(config, t, n),
                )
            )
    return units


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def _ratios(num, den) -> list:
    """Per-seed ``num/den`` (None where either is missing)."""
    return [
        a / b if (a is not None and b is not None and b > 0) else None
        for a, b in zip(num, den, strict=True)
    ]


def summarise_setting(units: dict, setting: str) -> dict:
    rows = {r["defence"]: r for r in units.values() if r.get("setting") == setting}
    if "plain" not in rows:
        return {}
    plain = [s["delta_u"] for s in rows["plain"]["per_seed"]]
    fixed = [s["delta_u"] for s in rows.get("fixed_projection", {"per_seed": []})["per_seed"]]
    out = {}
    for name, r in rows.items():
        du = [s["delta_u"] for s in r["per_seed"]]

        out[name] = {
            "curvature_aware": r["curvature_aware"],
            "hvps_per_step": r["hvps_per_step"],
            "grads_per_step": r["grads_per_step"],
            "setup_hvps": r["setup_hvps"],
            "reached": sum(s["reached"] for s in r["per_seed"]),
            "num_seeds": len(r["per_seed"]),
            "best_fraction_min": min(s["best_fraction"] for s in r["per_seed"]),
            "delta_u": _stats(du),
            "steps": _stats([s["steps"] for s in r["per_seed"]]),
            "slope": _stats([s["slope"] for s in r["per_seed"]]),
            "angle": _stats([s["angle"] for s in r["per_seed"]]),
            "plain_over": _stats(_ratios(plain, du)),
            "fixed_over": _stats(_ratios(fixed, du)) if fixed else None,
        }
    return out


def _per_seed(res: dict, setting: str, name: str, key: str = "delta_u") -> np.ndarray | None:
    unit = res.get(f"{setting}__{name}")
    if unit is None:
        return None
    return np.asarray([np.nan if s[key] is None else s[key] for s in unit["per_seed"]], float)


def laws(config, res: dict) -> dict:
    """Measured ratios next to the predicted ones (docs/defences.md §2): a projection refreshed
    every k steps leaves k² times the tracked leak (fixed: k = K, the steps to the target); with
    a Fisher tail every rank-d projection is floored at a_tail t²."""
    out = {}
    tracked = _per_seed(res, "main", "tracked_projection")
    periodic = _per_seed(res, "main", f"periodic_projection_k{config.every}")
    fixed = _per_seed(res, "main", "fixed_projection")
    steps = _per_seed(res, "main", "fixed_projection", "steps")
    if tracked is not None and periodic is not None:
        out["periodic_over_tracked"] = {
            "measured": float(np.nanmedian(periodic / tracked)),
            "predicted": float(config.every**2),
        }
    if tracked is not None and fixed is not None:
        out["fixed_over_tracked"] = {
            "measured": float(np.nanmedian(fixed / tracked)),
            "predicted": float(np.nanmedian(steps**2)),
        }
    th = res.get("theory")
    best = _per_seed(res, "tail", "tracked_retraction")
    t_stop = _per_seed(res, "tail", "tracked_retraction", "t")
    if th is not None and best is not None:
        out["tail_floor"] = {
            "measured": float(np.nanmedian(best)),
            "predicted": float(np.nanmedian(np.asarray(th["tail_a"]) * t_stop**2)),
        }
    return out
