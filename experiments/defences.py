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
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

import quartic as q
from quartic.core import curvature, dynamics, theory
from quartic.core.subspace import lambda_max
from quartic.harness import plotting
from quartic.harness.runs import RunDir, read_json, run_sweep, write_json_atomic
from quartic.studies import collapse, collapse_tasks
from quartic.studies import defences as D
from quartic.tasks import token_world as tw

TITLE = (
    "Defences at equal task loss on the rotating curved family: plain, projections, curvature-aware"
)
QUICK_SECONDS = 120  # 45 s on the curved family + ~90 s for 2 transformer tasks (load ~3)

#: The runs drawn as Δu(t) curves (the others are in the equal-progress panel).
CURVES = (
    "plain",
    "fixed_projection",
    "periodic_projection_k25",
    "replay_w10",
    "tracked_projection",
    "retraction",
    "tracked_retraction",
)

#: The defences of the sweep over the curvature (the ones whose difference is the rotation of M).
SWEEP = ("plain", "fixed_projection", "tracked_projection", "retraction", "tracked_retraction")


@dataclasses.dataclass(frozen=True)
class Config:
    n: int = 40
    d: int = 4
    coupling: float = 0.5
    h_min: float = 1.0
    h_max: float = 5.0
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

    def spec(self, tail: float = 0.0) -> q.QuadraticSpec:
        return q.QuadraticSpec(
            n=self.n, d=self.d, coupling=self.coupling, h_range=(self.h_min, self.h_max), tail=tail
        )

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


# ----------------------------------------------------------------------------------------------
# Compiled pieces (one compile per defence, reused across settings and seeds)


@cache
def _problems(config: Config, curvature: float, tail: float):
    """The setting's problems, stacked over seeds, and their true bases B.

    Each is drawn with a unit curvature vector and a unit Fisher tail, then scaled, so that the
    settings share their draws. Drawn eagerly (per-primitive compiled kernels are cached and
    shared by every experiment and test of the same shape; a jit of the generator alone costs
    seconds of compile time)."""
    spec = config.spec(tail=1.0)
    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.num_seeds)
    probs, bases = [], []
    for key in keys:
        prob, basis = q.make_curved(key, spec, 1.0, config.quartic)
        base, d = prob.base, spec.d
        w = base.fisher_values * jnp.concatenate(
            [jnp.ones((d,), base.fisher_values.dtype), jnp.full((spec.n - d,), tail)]
        )
        v = base.fisher_vectors
        base = dataclasses.replace(base, fisher=(v * w[None, :]) @ v.T, fisher_values=w)
        probs.append(dataclasses.replace(prob, base=base, curvature=curvature * prob.curvature))
        bases.append(basis)
    return jax.tree.map(lambda *x: jnp.stack(x), *probs), jnp.stack(bases)


@cache
def _prelude(config: Config, setting: str):
    """The setting's problems, true bases, ``min L_FT`` and the Lanczos estimate of M(θ*)."""
    curvature, tail = config.settings()[setting]
    probs, true_basis = _problems(config, curvature, tail)
    ft_min, subspace = _prelude_fn(config.d)(probs)
    return probs, true_basis, ft_min, subspace


@cache
def _prelude_fn(rank: int):
    def one(p):
        losses = D.Losses.of(p)
        return D.ft_minimum(p.ft_loss_fn, p.theta_star), D.sensitive_subspace(losses, rank)

    return jax.jit(jax.vmap(one))


#: Runs that record the rotation angle of M(θ) at every step (an eigh per step).
ANGLE = ("plain", "fixed_projection")


@cache
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


def defence_unit(config: Config, setting: str, defence: D.Defence) -> dict:
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
            raise q.DivergenceError(
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


@cache
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


def theory_unit(config: Config) -> dict:
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


def _tx_setup(config: Config):
    return collapse.aligned_setup(config.transformer_preset, config.transformer_category)[1]


@cache
def _tx_lora(config: Config):
    """``(φ₀, θ(φ))`` of LoRA on every dense kernel (the key convention of ``collapse``)."""
    r = config.transformer_lora_rank
    return collapse.lora_reparam(_tx_setup(config), r, jax.random.PRNGKey(r))


def _tx_defence(config: Config, name: str, scale=1.0) -> D.Defence:
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
    raise q.QuarticError(f"unknown transformer defence {name!r}")


@cache
def _tx_runner(config: Config, name: str):
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


@cache
def _tx_diagnose_fn(config: Config):
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


@cache
def _tx_lora_lambda_fn(config: Config):
    """λ_max of LoRA's own Hessian ∇²_φ L_FT(θ(φ)) at φ₀ (its step size is lr_λ over this)."""
    setup = _tx_setup(config)
    phi0, theta_of = _tx_lora(config)

    def top(batch):
        mv = curvature.hvp_fn(lambda p: setup.lm_fn(theta_of(p), batch), phi0)
        return lambda_max(mv, v0=jnp.ones_like(phi0), num_iters=collapse_tasks.LAMBDA_ITERS).value

    return jax.jit(top)


@cache
def _tx_prelude(config: Config, task: str) -> dict:
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


def transformer_diagnostics_unit(config: Config, task: str) -> dict:
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


def transformer_unit(config: Config, task: str, name: str) -> dict:
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
        raise q.DivergenceError(f"{name} diverged on the transformer task {task} at step {k}")
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


def summarise_transformer(units: dict, config: Config | None = None) -> dict | None:
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


def _units(config: Config):
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


def run(config: Config, out_dir: pathlib.Path) -> dict:
    jax.config.update("jax_enable_x64", True)
    RunDir(out_dir).write_config(config)
    sweep = run_sweep(_units(config), out_dir, desc="defences")
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
        "laws": _laws(config, res),
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


def _per_seed(res: dict, setting: str, name: str, key: str = "delta_u") -> np.ndarray | None:
    unit = res.get(f"{setting}__{name}")
    if unit is None:
        return None
    return np.asarray([np.nan if s[key] is None else s[key] for s in unit["per_seed"]], float)


def _laws(config: Config, res: dict) -> dict:
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


def _fmt(stats: dict | None) -> str:
    if not stats or stats.get("median") is None:
        return "not reached"
    return f"{stats['median']:.3g} [{stats['min']:.3g}, {stats['max']:.3g}]"


def table(summary: dict) -> list[dict]:
    rows = []
    acc = summary.get("acceptance")
    if acc:
        ang = acc["rotation_angle_plain"]["median"]
        rows.append(
            dict(
                quantity=f"Δu(plain)/Δu({acc['best']}) at equal task loss, median [min, max]; M rotates {ang:.2f} rad",
                theory="≥ 10",
                measured=_fmt(acc["plain_over_best"]),
                verdict="ok" if acc["pass_plain_10x"] else "OFF",
            )
        )
        rows.append(
            dict(
                quantity=f"Δu(fixed projection)/Δu({acc['best']}), median [min, max]",
                theory="≥ 3",
                measured=_fmt(acc["fixed_over_best"]),
                verdict="ok" if acc["pass_fixed_3x"] else "OFF",
            )
        )
    for name, law in summary.get("laws", {}).items():
        rows.append(
            dict(
                quantity=f"law: {name.replace('_', ' ')} (median over seeds)",
                theory=f"{law['predicted']:.3g}",
                measured=f"{law['measured']:.3g}",
                verdict="ok" if 0.5 < law["measured"] / law["predicted"] < 2 else "OFF",
            )
        )
    for setting in ("main", "tail"):
        for name, r in summary["settings"].get(setting, {}).items():
            rows.append(
                dict(
                    quantity=f"[{setting}] Δu at equal task loss: {name} ({r['hvps_per_step']:g} HVP/step)",
                    theory="",
                    measured=_fmt(r["delta_u"]),
                    verdict="",
                )
            )
    rows.extend(_transformer_rows(summary.get("transformer")))
    for row in rows:
        row["experiment"] = "defences"
    return rows


def _median(stats: dict | None) -> str:
    return "–" if not stats or stats.get("median") is None else f"{stats['median']:.2f}"


def _transformer_rows(tx: dict | None) -> list[dict]:
    if not tx:
        return []
    n = len(tx["tasks"])
    rows = []
    for name, r in tx["defences"].items():
        cost = f"{r['hvps_per_step']:g} HVP/step" + (
            f", {r['setup_hvps']} once" if r["setup_hvps"] else ""
        )
        measured = (
            f"{_fmt(r['delta_u'])}; plain/Δu {_fmt(r['plain_over'])}; slope {_median(r['slope'])}"
        )
        if r["reached"] < r["num_seeds"]:
            measured += (
                f"; reached on {r['reached']} of {n} (least progress {r['best_fraction_min']:.2f})"
            )
        rows.append(
            dict(
                quantity=f"[transformer, {n} tasks] Δu at equal task loss: {name} ({cost})",
                theory="",
                measured=measured,
                verdict="",
            )
        )
    tail = tx.get("fixed_over_plain_tail_part")
    if tail and tail.get("median") is not None:
        rows.append(
            dict(
                quantity="[transformer] Δu(fixed projection) / ½(P⊥δ)ᵀF(P⊥δ), δ plain's step at the target",
                theory="≈ 1: the Fisher mass outside M is what a rank-d projection leaves",
                measured=_fmt(tail),
                verdict="",
            )
        )
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    units = RunDir(out_dir).done_results()
    summary = read_json(out_dir / "summary.json")
    th = units.get("theory")
    main = {r["defence"]: r for r in units.values() if r.get("setting") == "main"}
    tx_units = {k: r for k, r in units.items() if r.get("setting") == "transformer"}
    fig, axes = plotting.figure(3 if tx_units else 2, 2, size=(5.0, 3.8))

    ax = axes[0, 0]
    for i, name in enumerate(CURVES):
        r = main.get(name)
        if r is None:
            continue
        t, du = np.array(r["curve"]["t"]), np.array(r["curve"]["delta_u"])
        keep = du > 0
        ls = "-" if r["curvature_aware"] else "--"
        ax.plot(t[keep], du[keep], ls, lw=1.4, color=f"C{i}", label=name)
    if th and "plain" in main:
        t = np.array(main["plain"]["curve"]["t"])
        ax.plot(t, th["c4_plain"][0] * t**4, "k:", lw=1.2, label="theory plain: c₄t⁴")
        ax.plot(t, th["c4_fixed"][0] * t**4, "k-.", lw=0.8, label="theory fixed: c₄t⁴")
        ax.plot(t, th["tracked_a"][0] * t**2, "k--", lw=0.8, label="theory tracked: a t²")
        plotting.slope_guide(
            ax, t[:60], th["c4_plain"][0] * t[0] ** 4 * 1e-4, 4, "slope 4", color="0.7"
        )
    plotting.loglog(ax, "t = lr·k", "Δu", "main setting, seed 0: Δu along each run")
    ax.set_ylim(1e-30, 1.0)
    ax.legend(fontsize=5.5, ncol=2)

    ax = axes[0, 1]
    for j, (setting, mk) in enumerate((("main", "o"), ("tail", "s"))):
        rows = summary["settings"].get(setting, {})
        names = list(rows)
        for i, name in enumerate(names):
            st = rows[name]["delta_u"]
            if st["median"] is None:
                continue
            y = i + 0.2 * j
            ax.errorbar(
                st["median"],
                y,
                xerr=[[st["median"] - st["min"]], [st["max"] - st["median"]]],
                fmt=mk,
                color=f"C{j}",
                ms=4,
                label=setting if i == 0 else None,
            )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([f"{n} ({rows[n]['hvps_per_step']:g} HVP)" for n in names], fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("Δu at equal task loss (median, min–max over seeds)")
    ax.set_title(f"equal progress: {summary['fraction']:.0%} of excess loss removed", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    params = summary["setting_params"]
    sweeps = sorted(
        (s for s in summary["settings"] if s.startswith("sweep") or s == "main"),
        key=lambda s: params[s]["curvature"],
    )
    for i, name in enumerate(SWEEP):
        xs, ys, lo, hi = [], [], [], []
        for s in sweeps:
            r = summary["settings"][s].get(name)
            p = summary["settings"][s].get("plain")
            if not r or r["delta_u"]["median"] is None or not p:
                continue
            xs.append(p["angle"]["median"])
            ys.append(max(r["delta_u"]["median"], 1e-32))
            lo.append(max(r["delta_u"]["min"], 1e-32))
            hi.append(max(r["delta_u"]["max"], 1e-32))
        ax.plot(xs, ys, "o-", color=f"C{i}", label=name, ms=3)
        ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("rotation of M over the plain run (rad, at the target)")
    ax.set_ylabel("Δu at equal task loss")
    ax.set_title("curvature sweep: fixed projection → plain as M rotates", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    for i, (name, r) in enumerate(main.items()):
        t = np.array(r["curve"]["t"])
        ex = np.array(r["curve"]["ft_excess"]) / r["curve"]["ft_excess0"]
        ax.plot(t, ex, color=f"C{i % 10}", lw=1, label=name)
    ax.axhline(1 - summary["fraction"], color="k", ls=":", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("t = lr·k")
    ax.set_ylabel("excess task loss / initial")
    ax.set_title("task progress (seed 0)", fontsize=9)
    ax.legend(fontsize=5.5, ncol=2)
    ax.grid(alpha=0.3)
    if tx_units:
        _plot_transformer(axes[2], tx_units, summary.get("transformer"))
    return [plotting.save(fig, fig_dir / "defences.png")]


def _plot_transformer(axes, tx_units: dict, tx: dict | None) -> None:
    tasks = (tx or {}).get("tasks") or sorted({r["task"] for r in tx_units.values()})
    first = tasks[0]
    ax = axes[0]
    rows = [r for r in tx_units.values() if r["task"] == first]
    styles = ("-", "--", "-.", ":")
    for i, r in enumerate(rows):
        c = r["curve"]
        k, du = np.asarray(c["step"]), np.asarray(c["delta_u"])
        keep = du > 0
        ls = styles[i % 4] if not r["curvature_aware"] else "-"
        ax.plot(k[keep], du[keep], ls, lw=1.2, color=f"C{i % 10}", label=r["defence"])
        s = r["per_seed"][0]
        if s["reached"]:
            ax.plot(s["steps"], s["delta_u"], "o", color=f"C{i % 10}", ms=3)
    plotting.loglog(
        ax,
        "step k (η = lr_λ/λ_max(H_FT); LoRA: of its own Hessian)",
        "Δu (KL drift)",
        f"transformer, {first}: Δu along each run (dot: equal task loss)",
    )
    ax.legend(fontsize=5.5, ncol=2)
    ax = axes[1]
    if tx:
        names = list(tx["defences"])
        for j, task in enumerate(tasks):
            for i, name in enumerate(names):
                du = tx["per_task_delta_u"].get(name, {}).get(task)
                if du is not None:
                    ax.plot(
                        du,
                        i + 0.12 * (j - len(tasks) / 2),
                        "o",
                        color=f"C{j}",
                        ms=3.5,
                        label=task if i == 0 or name == names[0] else None,
                    )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(
            [f"{n} ({tx['defences'][n]['hvps_per_step']:g} HVP)" for n in names], fontsize=6
        )
        ax.set_xscale("log")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6)
    ax.set_xlabel("Δu at equal task loss (plain's loss at the reference step)")
    ax.set_title("transformer: equal progress, per task", fontsize=9)
    ax.grid(alpha=0.3)


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "defences", *sys.argv[1:]]))
