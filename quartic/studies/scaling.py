"""Does the quartic window open as models grow? The AIC from 2k to 1M parameters, matrix-free.

For an aligned transformer of each size (θ* as the collapse study builds it, float64 at every size:
1M parameters are 8 MB) and each benign task, every quantity of the AIC and of the Taylor onset is
measured without an ``n × n`` matrix:

- the skill's true Fisher F = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i as a Gauss–Newton matvec
  (:class:`quartic.core.aic.GaussNewton`, one jvp and one vjp), its exact trace from per-example
  Jacobians (:func:`quartic.core.curvature.fisher_trace`: 34 backward passes of the batch, cheaper
  than a Hutchinson estimate), its top eigenpairs by Lanczos with their residuals;
- per task: :func:`quartic.core.aic.check_aic` (``method="lanczos"``, the KL drift as L_A: its
  Hessian at θ* is F exactly; F's top pairs from the model's one Lanczos, not one per task), the
  exact Taylor coefficients c₁…c₆ (jets), the simulated KL drift along the gradient flow of the
  task (RK4) against the second-order forecast.

:func:`fisher_spectrum` is task-independent (one per model); :func:`task_scaling` is one task.
:func:`power_law` fits ``y = a nᵇ`` with a bootstrap and extrapolates with a prediction interval.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import aic, cache, curvature, dynamics, fitting, jit, theory
from quartic.core.cache import memo
from quartic.core.chunked import Chunked, weighted_sum
from quartic.core.errors import QuarticError, require_float64
from quartic.models.transformer import PRESETS, TransformerConfig, count_params
from quartic.studies import collapse
from quartic.studies.training import AlignConfig, make_aligned_model
from quartic.tasks import token_world as tw

#: The sizes of the study: the model presets plus a 300k model (4 layers, 4 heads, d_ff = 4 d);
#: ``"10m"`` and ``"30m"`` are for a GPU (benchmarks/gpu.sh).
SIZES: dict[str, tuple[int, int, int, int]] = {
    **PRESETS,
    "300k": (300_000, 4, 4, 4),
    "10m": (10_000_000, 8, 8, 4),
    "30m": (30_000_000, 12, 8, 4),
}


def model_config(size: str, world: tw.TokenWorld) -> TransformerConfig:
    """A float64 config of about ``size`` parameters (the preset's rule: width closest to target;
    for a preset size, exactly the preset's config, ``TransformerConfig.preset``)."""
    if size not in SIZES:
        raise QuarticError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    target, layers, heads, ff = SIZES[size]
    v, t = world.vocab_size, world.config.seq_len
    cfgs = [
        TransformerConfig(v, t, d, heads, layers, ff * d, param_dtype="float64")
        for d in range(heads, 2048 + 1, heads)
    ]
    return min(cfgs, key=lambda c: abs(count_params(c, include_lora=False) - target))


@memo(maxsize=4)
def aligned(
    size: str,
    seed: int = 0,
    category: int = 0,
    world_seed: int = 0,
    pretrain_lr: float | None = None,
):
    """θ* of ``size`` (model seed ``seed``) and its :class:`~quartic.studies.collapse.CollapseSetup`
    (presets through :func:`collapse.aligned_setup`, so the θ* cache is shared). ``pretrain_lr``
    replaces the recipe's pretraining learning rate (:class:`~quartic.studies.training.AlignConfig`,
    1e-2), e.g. scaled to the width; its θ* is trained and cached apart."""
    if size in PRESETS and pretrain_lr is None:
        return collapse.aligned_setup(size, category, world_seed, seed)
    require_float64(f"the {size} model of the scaling study")
    world = tw.TokenWorld(tw.WorldConfig(seed=world_seed))
    align = AlignConfig() if pretrain_lr is None else AlignConfig(pretrain_lr=pretrain_lr)
    model = make_aligned_model(
        model_config(size, world), world, seed=seed, align=align, progress=False
    )
    return model, collapse.CollapseSetup(model.apply_fn, model.theta_star, world, category)


@dataclasses.dataclass(frozen=True)
class ChunkedGaussNewton(aic.GaussNewton):
    """:class:`~quartic.core.aic.GaussNewton` whose product loops over the rows of its batch in
    ``J`` equal chunks of about ``rows`` (``lax.scan``): ``F v = (1/J) Σ_j F_j v``, F_j the
    chunk's Fisher (a mean over its rows), the same F up to the rounding of the sum.

    The plain form linearises the logits of all N rows once and keeps that linearisation for every
    product (1.95 GiB at 1M parameters, N = 384); this one linearises one chunk inside each product,
    so a product costs one more forward pass of the batch and memory holds one chunk's."""

    rows: int = 64

    def matvec(self, theta, to_params, params, batch):
        if batch is None:
            raise QuarticError("ChunkedGaussNewton needs the Fisher's batch (fisher_batch)")
        total = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(batch)}
        if len(total) != 1:
            raise QuarticError(f"the Fisher batch's arrays disagree on the rows: {sorted(total)}")
        (total,) = total
        r = _even_rows(total, self.rows)
        parts = jax.tree_util.tree_map(lambda x: x.reshape((total // r, r) + x.shape[1:]), batch)
        fn = self.logits_fn

        def mv(v):
            def step(acc, part):
                logits = lambda th: fn(to_params(th, params), part)
                return acc + curvature.fisher_matvec(logits, theta)(v), None

            return jax.lax.scan(step, jnp.zeros_like(v), parts)[0] / (total // r)

        return mv


def fisher_ops(setup: collapse.CollapseSetup, rows: int | None = None) -> aic.GaussNewton:
    """The skill's true Fisher as a :class:`~quartic.core.aic.GaussNewton` of the answer logits
    (one object per setup and ``rows``, so every check of the setup reuses one compiled program);
    ``rows``: a :class:`ChunkedGaussNewton` of that many rows per chunk."""
    apply_fn, to_params = setup.apply_fn, setup.to_params
    logits = lambda th, batch: tw.answer_logits(apply_fn, to_params(th), batch)
    if rows is None:
        return setup.compiled(("scaling_gauss_newton",), lambda: aic.GaussNewton(logits))
    return setup.compiled(("scaling_gauss_newton", rows), lambda: ChunkedGaussNewton(logits, rows))


def chunked_loss(fn: Callable[..., jax.Array]) -> Callable[[jax.Array, Chunked], jax.Array]:
    """``L(θ, c) = Σ_j w_j fn(θ, *c.parts_j)`` for a :class:`~quartic.core.chunked.Chunked` ``c``,
    as a loss for :func:`quartic.core.aic.check_aic` whose gradients and Hessian products hold one
    chunk at a time.

    Its value is a scan over the chunks; its derivative (a ``custom_jvp``) is ``⟨∇L, θ̇⟩`` with
    ``∇L = Σ_j w_j ∇fn_j`` a scan of the chunks' gradients, so ``jax.grad`` does not keep the
    whole batch's forward pass for its backward one (2.1 GiB for the KL drift's 384 rows at 1M
    parameters). A product ``Hv`` (``curvature.hvp_fn``, forward-over-reverse) recomputes one
    chunk's forward and backward pass at a time; ``jax.linearize`` of ``∇L`` would keep every
    chunk's residuals instead (``benchmarks/hvp_linearize.py``). The data are not differentiated
    (their tangents are taken as zero)."""
    grad_chunk = lambda th, part: jax.grad(fn)(th, *part)

    def loss(theta, c):
        scalar = jax.ShapeDtypeStruct((), theta.dtype)

        @jax.custom_jvp
        def value(th):
            return weighted_sum(lambda *part: fn(th, *part), c, scalar)

        @value.defjvp
        def value_jvp(primals, tangents):
            (th,), (dth,) = primals, tangents
            return value(th), jnp.vdot(weighted_sum(lambda *part: grad_chunk(th, part), c, th), dth)

        return value(theta)

    return loss


def aic_args(setup: collapse.CollapseSetup, ft_data: tuple, rows: int | None) -> dict:
    """The loss, data and Fisher keywords of the scaling study's
    :func:`~quartic.core.aic.check_aic` (KL drift as L_A, ``setup.ft_fn`` as L_FT, the skill's
    Gauss–Newton F): whole batches for ``rows=None``; else both losses as :func:`chunked_loss` over
    :func:`kl_chunks` / :func:`ft_chunks` and F as a :class:`ChunkedGaussNewton`, so no
    linearisation of a whole batch is kept through the check (at 1M parameters XLA gave those of
    F, L_FT and L_A 1.95, 2.92 and 2.08 GiB of buffers; the check's peak resident memory fell from
    9.0 to 7.6 GiB with chunks of 64 rows, and no further with 32: the rest is not per row). Same
    values up to rounding; each Hessian or Fisher product recomputes its chunks' forward (and
    backward) passes."""
    kl_fn, kl_data = setup.align_fns["kl"], setup.align_data["kl"]
    if rows is None:
        return dict(
            align_loss_fn=kl_fn,
            align_batch=kl_data,
            ft_loss_fn=setup.ft_fn,
            ft_batch=ft_data,
            fisher=fisher_ops(setup),
            fisher_batch=setup.skill,
        )
    chunked = lambda name, fn: setup.compiled(("scaling_chunked", name), lambda: chunked_loss(fn))
    return dict(
        align_loss_fn=chunked("kl", kl_fn),
        align_batch=kl_chunks(kl_data, rows),
        ft_loss_fn=chunked("ft", setup.ft_fn),
        ft_batch=ft_chunks(ft_data, rows),
        fisher=fisher_ops(setup, rows),
        fisher_batch=setup.skill,
    )


#: Bytes of per-example Jacobians ``[batch, C, n]`` that :func:`exact_trace` keeps in flight.
TRACE_JACOBIAN_BYTES = 2**30


def trace_batch(n: int, classes: int, itemsize: int = 8, most: int = 8) -> int:
    """Examples per batch of :func:`exact_trace` at ``n`` parameters and ``classes`` logits: the
    most (up to ``most``) whose ``[batch, classes, n]`` Jacobians fit in
    :data:`TRACE_JACOBIAN_BYTES`, at least 1. With the token world's 34 logits in float64: 8 up
    to 490k parameters, 3 at 1M (where 8 meant 2.3 GB of Jacobians: the trace alone peaked at
    5.06 GiB, 2.36 with 3, 3 % slower; ``benchmarks/trace_batch.py``), 1 above 2.0M."""
    return int(min(most, max(1, TRACE_JACOBIAN_BYTES // (classes * n * itemsize))))


def exact_trace(setup: collapse.CollapseSetup, batch_size: int | None = None) -> float:
    """``tr F`` exactly, from per-example Jacobians of the answer logits (no n × n matrix),
    ``batch_size`` examples at a time (default :func:`trace_batch`)."""
    apply_fn, to_params = setup.apply_fn, setup.to_params
    if batch_size is None:
        batch_size = trace_batch(setup.n, setup.world.vocab_size, setup.theta.dtype.itemsize)

    def single(th, tok, p):
        return apply_fn(to_params(th), tok[None, :])[0, p, :]

    tokens = jnp.asarray(setup.skill["tokens"])
    pos = tw.first_answer_position(setup.skill["mask"])
    fn = setup.compiled(
        ("scaling_trace", batch_size),
        lambda: jax.jit(
            lambda th, tok, p: curvature.fisher_trace(single, th, tok, p, batch_size=batch_size)
        ),
    )
    return float(fn(setup.theta, tokens, pos))


def fisher_spectrum(
    setup: collapse.CollapseSetup, trace: float, k: int = 40, rank: int = 10, share: float = 0.9
) -> tuple[dict, jax.Array]:
    """F's top ``k`` eigenpairs by Lanczos (``3k`` steps, residuals reported), with the top-``rank``
    share of the trace, the d that holds ``share`` of it (``None`` when more than ``k``), and the
    effective rank ``tr(F)² / tr(F²)`` bracketed exactly: ``Σ_top λ² ≤ tr F² ≤ Σ_top λ² + λ_k·tail``.
    Returns ``(numbers, top-k pairs)``: the pairs serve every task's check of this θ*
    (``check_aic(fisher_eigenpairs=...)``), so F's Lanczos runs once per model."""
    gn = fisher_ops(setup)
    data = setup.skill

    def run(theta, batch):
        mv = gn.matvec(theta, lambda th, _: th, None, batch)
        return curvature.lanczos_eigh(mv, theta.shape[0], k, 0, num_iters=3 * k, dtype=theta.dtype)

    res = setup.compiled(("scaling_spectrum", k), lambda: jax.jit(run))(setup.theta, data).top
    w = np.asarray(res.values)
    cum = np.cumsum(np.clip(w, 0, None)) / trace
    hit = np.nonzero(cum >= share)[0]
    tail = max(trace - float(np.sum(w)), 0.0)
    sq = float(np.sum(w**2))
    out = {
        "k": k,
        "eigenvalues": w.tolist(),
        "residuals": np.asarray(res.residuals).tolist(),
        "trace": trace,
        "share_top_d": float(cum[rank - 1]),
        "d_share": int(hit[0]) + 1 if hit.size else None,
        "share": share,
        "share_top_k": float(cum[-1]),
        "effective_rank_bounds": [trace**2 / (sq + w[-1] * tail), trace**2 / sq],
    }
    return out, res


#: Above this many parameters the AIC check and the Taylor onset loop over row chunks
#: (:func:`aic_args`, :func:`taylor_args`).
CHUNK_ABOVE = 30_000


def chunk_rows(n: int) -> int | None:
    """Rows per chunk of the check's and the Taylor onset's data at ``n`` parameters (``None``:
    whole batches).

    The nested jets hold about rows × order activations of the model at once: order 6 over the
    256-row task batch needed 6.1 GiB at 100k parameters, 8.3 GiB at 300k and 17.7 GiB at 1M (2.6
    GiB at 100k in chunks of 64 rows; 2.4 in chunks of 32, which took longer). The values are
    unchanged up to rounding."""
    return None if n <= CHUNK_ABOVE else 64


def check_compiler_options(n: int) -> dict[str, bool | int] | None:
    """XLA options for the AIC check's program at ``n`` parameters: at the chunked sizes (above
    :data:`CHUNK_ABOVE`), where memory binds, :func:`quartic.core.jit.lean_compile_options` (its
    compile set the 100k unit's peak; ``benchmarks/aic_lean_compile.py``), else XLA's defaults
    (``None``). The study and ``benchmarks/scaling_child.py`` both take them from here."""
    return jit.lean_compile_options() if chunk_rows(n) else None


def _even_rows(total: int, rows: int) -> int:
    """The largest divisor of ``total`` that is at most ``rows`` (chunks of equal shape)."""
    if rows < 1:
        raise QuarticError(f"rows per chunk must be >= 1, got {rows}")
    return max(r for r in range(1, min(rows, total) + 1) if total % r == 0)


def _split_rows(batch: dict, rows: int) -> list[dict]:
    total = {int(np.shape(v)[0]) for v in batch.values()}
    if len(total) != 1:
        raise QuarticError(f"the batch's arrays disagree on the number of rows: {sorted(total)}")
    (total,) = total
    r = _even_rows(total, rows)
    return [{k: v[i : i + r] for k, v in batch.items()} for i in range(0, total, r)]


def ft_chunks(ft_data: tuple, rows: int) -> Chunked:
    """``ft_data = (batch, πg, θ*)`` of ``setup.ft_fn`` as a :class:`~quartic.core.chunked.Chunked`
    of about ``rows`` rows per chunk (a divisor of the batch's rows, so the chunks are equal).

    ``L_FT`` is the masked mean ``Σ m·ℓ / max(M, 1)``, ``M = Σ m``
    (:func:`quartic.tasks.token_world.lm_loss`): with mask sums ``M_j ≥ 1`` per chunk it is exactly
    ``Σ_j (M_j/M) L_j``, and these weights sum to 1, so the tilt ``−⟨πg, θ − θ*⟩`` (the same in
    every chunk) is counted once. A chunk with ``M_j < 1`` (no answer position) would break both:
    :class:`QuarticError`, use larger chunks."""
    batch, shift, theta = ft_data
    parts = _split_rows(batch, rows)
    sums = np.asarray([float(np.sum(np.asarray(p["mask"], np.float64))) for p in parts])
    if np.any(sums < 1.0):
        raise QuarticError(
            f"a chunk of {len(parts[0]['mask'])} rows has mask sum {sums.min():g} < 1: the chunked "
            "masked mean would not equal the batch's; use larger chunks"
        )
    return Chunked.stack([((p, shift, theta),) for p in parts], sums / sums.sum())


def kl_chunks(kl_data: dict, rows: int) -> Chunked:
    """The KL drift's data (``setup.align_data["kl"]``, a mean over rows) as a
    :class:`~quartic.core.chunked.Chunked` of about ``rows`` rows per chunk, weights ``1/J``."""
    parts = _split_rows(kl_data, rows)
    return Chunked.stack([(p,) for p in parts], np.full(len(parts), 1.0 / len(parts)))


def taylor_args(
    setup: collapse.CollapseSetup, ft_data: tuple, rows: int | None
) -> tuple[tuple | Chunked, tuple | Chunked]:
    """``(align_args, ft_args)`` of :func:`quartic.core.theory.taylor_onset` for the KL drift and
    ``setup.ft_fn``: plain tuples for ``rows=None``, else row chunks (:func:`kl_chunks`,
    :func:`ft_chunks`) that give the same coefficients up to rounding in a fraction of the memory."""
    kl_data = setup.align_data["kl"]
    if rows is None:
        return (kl_data,), (ft_data,)
    return kl_chunks(kl_data, rows), ft_chunks(ft_data, rows)


#: RK4 steps per record interval of the study's flow. On its grid (``num_times`` log-spaced times up
#: to t·λ_max = 0.1) a step is at most h·λ_max = 0.1·(1 − r⁻¹)/2 with r the grid ratio (0.03 for
#: 6 times over two decades), and RK4's error on the displacement δ is at most (hλ)⁴/120 ≈ 7e-9 of
#: ‖δ‖; on Δu it is at most ‖Fδ‖ times that (not relative to Δu, which is small by cancellation).
#: The forecast errors it is compared with are 1e-3 and up. Both bounds are tested against the exact
#: path of a quadratic (tests/test_dynamics.py).
FLOW_SUBSTEPS = 2

#: Lanczos steps for λ_max(H_FT) in the study's checks: on the 2k and 30k models 30 steps give a
#: residual of 1e-15 relative (20 give 1e-10); the report warns above 1e-6 (aic.LAMBDA_MAX_RTOL).
STUDY_LAMBDA_MAX_ITERS = 30


def task_scaling(
    setup: collapse.CollapseSetup,
    task: str,
    trace: float,
    spectrum: curvature.Eigenpairs,
    d_share: int | None,
    rank: int = 10,
    taylor_order: int = 6,
    t_lambda: tuple[float, float] = (1e-3, 0.1),
    num_times: int = 6,
    flow_substeps: int = FLOW_SUBSTEPS,
    lambda_max_iters: int = STUDY_LAMBDA_MAX_ITERS,
) -> dict:
    """Every scaling quantity of one benign task at θ* (the KL drift as the alignment loss);
    ``spectrum``: F's top pairs (:func:`fisher_spectrum`, at least ``rank`` and ``d_share``);
    ``flow_substeps`` RK4 steps per record interval of the simulated flow; ``lambda_max_iters``
    Lanczos steps for λ_max(H_FT) (its residual is in the result, a warning above 1e-6)."""
    batch = setup.task_batch(task)
    ft_data = (batch, jnp.zeros_like(setup.theta), setup.theta)
    kl_fn = setup.align_fns["kl"]
    rows = chunk_rows(setup.n)
    rep = aic.check_aic(
        params=setup.theta,
        rank=rank,
        method="lanczos",
        fisher_trace=trace,
        fisher_eigenpairs=spectrum,
        lambda_max_iters=lambda_max_iters,
        compiler_options=check_compiler_options(setup.n),
        **aic_args(setup, ft_data, rows),
    )
    cache.release_heap()  # each compile's freed heap, before the next compile
    align_args, ft_args = taylor_args(setup, ft_data, rows)
    onset = theory.taylor_onset(
        kl_fn, setup.ft_fn, setup.theta, taylor_order, align_args=align_args, ft_args=ft_args
    )
    coef = np.asarray(onset.coefficients)
    order, _ = onset.onset(rtol=1e-6)
    cache.release_heap()
    q4 = rep.quartic_coefficient
    lam = rep.lambda_max_ft
    ts = dynamics.log_times(t_lambda[0] / lam, t_lambda[1] / lam, num_times)
    flow = collapse._flow_fn(setup, flow_substeps)
    traj = flow(
        setup.theta,
        jnp.asarray(ts),
        ft_data,
        rep.basis,
        jnp.asarray(rep.eigenvalues[:rank]),
        setup.align_value("refusal", setup.theta),
    ).checked()
    du = np.asarray(jax.device_get(traj.observables)["du_kl"])
    cache.release_heap()
    fc = np.asarray(rep.forecast.flow(ts))
    err = collapse.forecast_errors(ts, du, fc, np.asarray(rep.forecast.taylor()), 0.0)
    g = setup.grad_of("ft_fn")(setup.theta, ft_data)
    g_norm = float(jnp.linalg.norm(g))
    share_ratio = (
        float(jnp.linalg.norm(spectrum.vectors[:, :d_share].T @ g)) / g_norm if d_share else None
    )
    slope = fitting.local_slope(ts, np.abs(du))
    return {
        "task": task,
        "n": setup.n,
        "rank": rank,
        "ortho_ratio": rep.ortho_ratio,
        "random_ortho_ratio": math.sqrt(rank / setup.n),
        "ortho_ratio_d_share": share_ratio,
        "random_ortho_ratio_d_share": math.sqrt(d_share / setup.n) if d_share else None,
        "lambda_d": rep.lambda_d,
        "tail_mass": rep.tail_mass,
        "gamma_fisher": rep.gamma_fisher,
        "crossover_time": rep.crossover_time,
        "lambda_max_ft": lam,
        "lambda_max_ft_residual": rep.lambda_max_ft_residual,
        "t_cross_lambda": rep.crossover_time * lam,
        "residuals_max": float(np.max(rep.residuals)),
        "taylor_coefficients": coef.tolist(),
        "onset_order": order,
        "c4_over_gamma_f": float(coef[3] / q4) if order == 4 and q4 > 0 else None,
        "flow_t_lambda": (ts * lam).tolist(),
        "flow_delta_u": du.tolist(),
        "flow_onset_slope": float(slope[0]),
        "forecast_max_rel_error": float(np.max(err["relative"])),
        "warnings": rep.warnings,
    }


def power_law(n, y, extrapolate_to=(), num: int = 2000, seed: int = 0, level: float = 0.95):
    """Fit ``log y = log a + b log n`` by least squares; bootstrap (pairs resampled) intervals of
    ``b`` and of ``y`` at each ``extrapolate_to`` size, the latter a prediction interval (each
    bootstrap prediction plus a residual drawn from that fit). Non-positive or non-finite ``y`` are
    dropped (their count is returned). ``None`` when fewer than two sizes remain."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    keep = np.isfinite(y) & (y > 0)
    x, ly = np.log(n[keep]), np.log(y[keep])
    if np.unique(x).size < 2:
        return None
    b, a = np.polyfit(x, ly, 1)
    rng = np.random.default_rng(seed)
    slopes, preds = [], []
    xe = np.log(np.asarray(extrapolate_to, float))
    for _ in range(num):
        i = rng.integers(0, x.size, x.size)
        if np.unique(x[i]).size < 2:
            continue
        bb, aa = np.polyfit(x[i], ly[i], 1)
        resid = ly[i] - (aa + bb * x[i])
        slopes.append(bb)
        preds.append(aa + bb * xe + rng.choice(resid, xe.size))
    q = [(1 - level) / 2, (1 + level) / 2]
    preds = np.asarray(preds).reshape(len(slopes), xe.size)
    return {
        "exponent": float(b),
        "prefactor": float(np.exp(a)),
        "exponent_interval": np.quantile(slopes, q).tolist(),
        "dropped": int((~keep).sum()),
        "points": int(keep.sum()),
        "extrapolation": {
            f"{ne:.3g}": {
                "fit": float(np.exp(a + b * lx)),
                "interval": np.exp(np.quantile(preds[:, j], q)).tolist(),
            }
            for j, (ne, lx) in enumerate(zip(extrapolate_to, xe, strict=True))
        },
    }
