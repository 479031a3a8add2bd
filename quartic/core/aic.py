"""The Alignment Instability Condition (Def 5.1), measured.

:func:`check_aic` takes two losses and a parameter point θ* and returns an :class:`AICReport`
with every quantity of the condition as a number, each verdict as (value, threshold, passed), and
a plain warning when the premise fails (θ* not an aligned optimum: ‖∇L_A(θ*)‖ not small, so Δu
grows linearly and no quartic law applies).

The "alignment curvature" F is, by default, the exact Hessian of ``align_loss_fn`` at θ*
(= the true Fisher at a well-fit optimum of a log-loss, and exactly the true Fisher for the KL
drift loss); a dense matrix or a matvec (e.g. :func:`quartic.core.curvature.fisher_matvec`) can be given
instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core import curvature, pytree, theory
from quartic.core.cache import BoundedCache
from quartic.core.errors import QuarticError
from quartic.core.measure import fisher_weighted
from quartic.core.subspace import lambda_max


@dataclass(frozen=True)
class Thresholds:
    """The caller's thresholds for Def 5.1 (the paper fixes none).

    ``lam``: every kept direction sharp, ``λ_d ≥ lam``; ``eps_tail``: ``Σ_{j>d} λ_j ≤ eps_tail``;
    ``eps_ortho``: ``‖Pg‖ ≤ eps_ortho``; ``gamma``: ``‖F^{1/2}PHg‖ ≥ gamma``; ``grad_tol``: the premise
    ``‖∇L_A(θ*)‖ ≤ grad_tol``. ``None`` leaves a condition unjudged (its value is still reported).
    """

    lam: float | None = None
    eps_tail: float | None = None
    eps_ortho: float | None = None
    gamma: float | None = None
    grad_tol: float | None = 1e-6


@dataclass
class Verdict:
    value: float
    threshold: float | None
    passed: bool | None  # None: no threshold given
    rule: str

    def __str__(self):
        mark = {True: "pass", False: "FAIL", None: "  - "}[self.passed]
        thr = "" if self.threshold is None else f" (threshold {self.threshold:.3g})"
        return f"[{mark}] {self.rule}: {self.value:.4g}{thr}"


@dataclass
class AICReport:
    """Every measured quantity of the AIC at θ* (floats), verdicts and warnings.

    ``basis`` (``[n, d]``, the top-d eigenvectors) and ``eigenvalues`` are arrays; ``to_dict``
    gives a JSON-able view without the basis (a NaN or inf is written as ``None``, JSON ``null``).

    What the fields hold depends on ``method``:

    - ``"dense"``: ``trace`` is exact (F's diagonal), ``tail_mass`` the exact ``Σ_{j>d} λ_j`` (as
      ``trace − Σ top-d``), ``tail_mass_stderr`` 0 and ``residuals`` ``None``. ``eigenvalues`` is the
      whole spectrum of F (``[n]``, descending) when F is indefinite, small (n ≤ 512) or
      ``full_spectrum=True``; otherwise the top ``d + 10`` (block Lanczos, verified by residuals).
    - ``"lanczos"``: ``eigenvalues`` holds only the top d (``[d]``) with their exact residuals
      ``‖F v − λ v‖`` in ``residuals``; ``trace`` is a Hutchinson estimate and ``tail_mass`` =
      trace − Σ top-d, an estimate with standard error ``tail_mass_stderr``.

    In both, ``lambda_max_ft`` (λ_max(H_FT), which sets ``validity_horizon`` and every t·λ axis)
    comes from a Lanczos run of at most ``lambda_max_iters`` steps (default
    :data:`LAMBDA_MAX_ITERS`); ``lambda_max_ft_residual`` is its exact residual ‖H v − λ v‖, a bound
    on the distance from λ to an eigenvalue of H_FT.

    When F is indefinite (an alignment Hessian with negative curvature, e.g. a refusal
    cross-entropy with ``fisher=None``), ``tail_mass`` and ``crossover_time`` are computed on F's
    positive part F₊ (negative directions do not raise Δu at second order, and on F itself the tail
    can be negative and t× undefined); ``negative_mass`` holds the mass of F's negative part
    found (dense: Σ min(λ_j, 0) exactly; Lanczos: only what the quadratic forms in g and Hg
    reveal) and a warning says so.

    ``forecast`` is the second-order forecast of Δu (gradient term kept). It always uses the exact
    Hessian of ``align_loss_fn``, also when ``fisher=`` is given (``fisher`` replaces the Hessian for
    the AIC quantities only). It expands θ(t) to second order, so on a curved alignment map
    (``L_A = ½ φ(θ)ᵀFφ(θ)`` with φ nonlinear) its t⁴ coefficient misses the output-curvature term of
    c₄ and stays off as t → 0: :func:`quartic.core.theory.taylor_onset` gives the exact c₄.
    """

    method: str
    n: int
    rank: int
    eigenvalues: np.ndarray  # top eigenvalues of the alignment curvature, descending
    lambda_d: float
    trace: float
    tail_mass: float
    tail_mass_stderr: float
    align_grad_norm: float
    ft_grad_norm: float
    ortho_norm: float
    ortho_ratio: float
    gamma_fisher: float
    gamma_unweighted: float
    quartic_coefficient: float
    lower_bound_coefficient: float
    crossover_time: float
    lambda_max_ft: float
    linear_rate: float  # c₁ = −∇L_Aᵀg, the t¹ coefficient of Δu
    forecast: theory.Forecast
    verdicts: dict[str, Verdict]
    warnings: list[str] = field(default_factory=list)
    basis: Any = None
    residuals: np.ndarray | None = None
    lambda_max_ft_residual: float = math.nan
    negative_mass: float = 0.0

    @property
    def premise_holds(self) -> bool | None:
        return self.verdicts["premise"].passed

    @property
    def holds(self) -> bool | None:
        """All judged conditions pass (None when none was judged)."""
        judged = [v.passed for v in self.verdicts.values() if v.passed is not None]
        return all(judged) if judged else None

    @property
    def validity_horizon(self) -> float:
        """``1 / λ_max(H_FT)``: the law is observed for ``t·λ_max(H) ≪ 1`` (docs/theory.md §3)."""
        return 1.0 / self.lambda_max_ft if self.lambda_max_ft > 0 else math.inf

    def to_dict(self) -> dict:
        """A JSON-able view: floats and lists, NaN and inf as ``None`` (JSON ``null``)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("basis",):
                continue
            v = getattr(self, f.name)
            if f.name == "verdicts":
                v = {k: dataclasses.asdict(x) for k, x in v.items()}
            elif f.name == "forecast":
                v = {k: float(x) for k, x in v._asdict().items()}
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[f.name] = v
        out["taylor_forecast"] = np.asarray(self.forecast.taylor()).tolist()
        return _json_safe(out)

    def __str__(self) -> str:
        lines = [
            f"Alignment Instability Condition at θ* (n={self.n}, d={self.rank}, {self.method})",
            f"  top eigenvalues   {np.array2string(self.eigenvalues[:8], precision=4)}",
            f"  λ_d               {self.lambda_d:.4g}",
            f"  tail mass Σλ_j>d  {self.tail_mass:.4g}",
            f"  ‖∇L_A(θ*)‖        {self.align_grad_norm:.4g}",
            f"  ‖Pg‖ / ‖g‖        {self.ortho_norm:.4g} / {self.ft_grad_norm:.4g}"
            f" = {self.ortho_ratio:.4g}",
            f"  γ_F = ‖F½PHg‖     {self.gamma_fisher:.4g}",
            f"  γ_u = ‖PHg‖       {self.gamma_unweighted:.4g}",
            f"  Δu ≈ c t⁴:  c = γ_F²/8 = {self.quartic_coefficient:.4g}"
            f"   (lower bound λ_d γ_u²/8 = {self.lower_bound_coefficient:.4g})",
            f"  crossover t×      {self.crossover_time:.4g}"
            f"   validity t ≪ 1/λ_max(H) = {self.validity_horizon:.4g}"
            f"   (λ_max(H) residual {self.lambda_max_ft_residual:.2g})",
            f"  eigenvalues, trace, tail: {self._fields_note()}",
            "  forecast: second order in θ(t) and the exact Hessian of L_A (not fisher=); on a"
            " curved alignment map it misses c₄'s output-curvature term: theory.taylor_onset",
            "  verdicts:",
        ]
        lines += [f"    {v}" for v in self.verdicts.values()]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _fields_note(self) -> str:
        if self.method == "dense":
            whole = self.eigenvalues.shape[0] == self.n
            return f"dense: {'the whole spectrum' if whole else 'top pairs'}, exact trace and tail"
        return (
            f"lanczos: top {self.rank} only, trace and tail by Hutchinson"
            f" (tail ± {self.tail_mass_stderr:.2g})"
        )


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# Lanczos steps for λ_max(H_FT); its residual is reported and checked against LAMBDA_MAX_RTOL.
LAMBDA_MAX_ITERS = 60
LAMBDA_MAX_RTOL = 1e-6


def _judge(value, threshold, rule, larger_is_bad=True) -> Verdict:
    if threshold is None:
        return Verdict(float(value), None, None, rule)
    ok = value <= threshold if larger_is_bad else value >= threshold
    return Verdict(float(value), float(threshold), bool(ok), rule)


@dataclass(frozen=True)
class GaussNewton:
    """``fisher=GaussNewton(logits_fn)``: F is the true Fisher (the Gauss–Newton matrix)
    ``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` of the categorical outputs
    ``logits_fn(params[, fisher_batch]) -> [N, C]``, applied matrix-free (one jvp and one vjp per
    product, :func:`quartic.core.curvature.fisher_matvec`) inside the compiled check, with
    ``fisher_batch`` an argument of it (not a constant folded into the program)."""

    logits_fn: Callable

    def matvec(self, theta, to_params, params, batch):
        fn = self.logits_fn
        logits = lambda th: (
            fn(to_params(th, params)) if batch is None else fn(to_params(th, params), batch)
        )
        return curvature.fisher_matvec(logits, theta)


# compiled programs, by the functions and options they close over (quartic.core.cache's policy)
_MEASURE_CACHE = BoundedCache(64)
_DENSE_CACHE = BoundedCache(16)


def _dense_fn(align_loss_fn, fisher, to_params, mask_key, no_align_batch, chunk_size):
    """One jitted program building F ``[n, n]`` from batched products (the exact Hessian of
    ``L_A``, a given matvec or a :class:`GaussNewton`)."""
    cache_key = (align_loss_fn, fisher, mask_key, no_align_batch, chunk_size)
    if cache_key not in _DENSE_CACHE:

        def build(theta, params, align_batch, f_batch):
            if isinstance(fisher, GaussNewton):
                mv = fisher.matvec(theta, to_params, params, f_batch)
            elif fisher is not None:
                mv = fisher
            else:
                args = lambda th: (
                    (to_params(th, params),)
                    if no_align_batch
                    else (to_params(th, params), align_batch)
                )
                mv = curvature.hvp_fn(lambda th: align_loss_fn(*args(th)), theta)
            return curvature.dense_matrix(mv, theta.shape[0], theta.dtype, chunk_size)

        _DENSE_CACHE[cache_key] = jax.jit(build)
    return _DENSE_CACHE[cache_key]


def _measure_fn(
    align_loss_fn,
    ft_loss_fn,
    fisher_mv,
    to_params,
    mask_key,
    no_align_batch,
    no_ft_batch,
    dense_given,
    method,
    rank,
    num_iters,
    trace_samples,
    chunk_size,
    exact_trace=False,
    trace_batch=None,
    eig_given=False,
    lambda_max_iters=LAMBDA_MAX_ITERS,
    compiler_options=(),
):
    """One jitted program per (losses, selection, settings): params, data, F and the key are its
    arguments, so repeated checks (other tasks, other batches of the same shapes) reuse it.
    ``compiler_options``: sorted ``(name, value)`` pairs, XLA options of this program."""
    cache_key = (
        align_loss_fn,
        ft_loss_fn,
        fisher_mv,
        mask_key,
        no_align_batch,
        no_ft_batch,
        dense_given,
        method,
        rank,
        num_iters,
        trace_samples,
        chunk_size,
        exact_trace,
        trace_batch,
        eig_given,
        lambda_max_iters,
        compiler_options,
    )
    if cache_key in _MEASURE_CACHE:
        return _MEASURE_CACHE[cache_key]

    def measure(theta, params, f_given, f_eig, align_batch, ft_batch, key, f_batch, f_trace):
        n = theta.shape[0]
        la = lambda th: align_loss_fn(
            *((to_params(th, params),) if no_align_batch else (to_params(th, params), align_batch))
        )
        lf = lambda th: ft_loss_fn(
            *((to_params(th, params),) if no_ft_batch else (to_params(th, params), ft_batch))
        )
        grad_a = jax.grad(la)(theta)
        g = jax.grad(lf)(theta)
        h_ft = curvature.hvp_fn(lf, theta)
        h_a = curvature.hvp_fn(la, theta)
        hg = h_ft(g)
        if dense_given:
            f_mv = lambda v: f_given @ v
        elif isinstance(fisher_mv, GaussNewton):
            f_mv = fisher_mv.matvec(theta, to_params, params, f_batch)
        else:
            f_mv = fisher_mv if fisher_mv is not None else h_a
        out = {"align_loss_fn": la(theta), "ft_loss_fn": lf(theta)}
        # F g and F Hg: one product of F in the program
        f_g, f_hg = curvature.matvec_pair(f_mv, g, hg)
        if method == "dense":
            # built and decomposed once per matrix, outside (curvature.top_eigh_descending)
            w, v = f_eig
            top, basis = w[:rank], v[:, :rank]
        if method == "dense" and w.shape[0] < n:
            # top pairs only, F positive semi-definite (checked outside): tail = trace − Σ top-d
            trace = jnp.trace(f_given)
            zero = jnp.zeros_like(trace)
            out.update(trace=trace, tail=trace - jnp.sum(top), tail_se=zero, eigenvalues=w)
            out.update(neg_floor=zero, neg_mass=zero, tail_pos=trace - jnp.sum(top))
            out.update(g_f_g_pos=jnp.vdot(g, f_g), hg_f_hg_pos=jnp.vdot(hg, f_hg))
        elif method == "dense":
            out.update(trace=jnp.sum(w), tail=jnp.sum(w[rank:]), tail_se=jnp.zeros_like(w[0]))
            out["eigenvalues"] = w
            # F's positive part, for an indefinite F (negative eigenvalues beyond rounding)
            w_pos = jnp.clip(w, 0.0)
            out.update(
                neg_floor=n * jnp.finfo(w.dtype).eps * jnp.abs(w).max(),
                neg_mass=jnp.sum(jnp.clip(w, None, 0.0)),
                tail_pos=jnp.sum(w_pos[rank:]),
                g_f_g_pos=jnp.sum(w_pos * (v.T @ g) ** 2),
                hg_f_hg_pos=jnp.sum(w_pos * (v.T @ hg) ** 2),
            )
        else:
            if eig_given:  # F's top pairs, known to the caller (one Lanczos for many checks)
                pairs = curvature.Eigenpairs(*(x[..., :rank] for x in f_eig))
            else:
                pairs = curvature.lanczos_eigh(
                    f_mv, n, rank, 0, num_iters=num_iters, key=key, dtype=theta.dtype
                ).top
            top, basis = pairs.values, pairs.vectors
            if exact_trace:  # given by the caller (e.g. curvature.fisher_trace)
                est = curvature.TraceEstimate(jnp.asarray(f_trace, theta.dtype), jnp.zeros(()))
            else:
                est = curvature.hutchinson_trace(
                    f_mv, n, trace_samples, jax.random.fold_in(key, 1), theta.dtype, trace_batch
                )
            out.update(trace=est.value, tail=est.value - jnp.sum(top), tail_se=est.stderr)
            out.update(eigenvalues=top, residuals=pairs.residuals)
        lam_ft = lambda_max(h_ft, n, num_iters=lambda_max_iters, key=key, dtype=theta.dtype)
        out["lam_max_ft"], out["lam_max_ft_residual"] = lam_ft.value, lam_ft.residual
        coords_hg = basis.T @ hg
        out.update(
            top=top,
            basis=basis,
            grad_a=grad_a,
            g=g,
            gamma_f=fisher_weighted(top, coords_hg),
            gamma_u=jnp.linalg.norm(coords_hg),
            ortho=jnp.linalg.norm(basis.T @ g),
            g_norm=jnp.linalg.norm(g),
            g_f_g=jnp.vdot(g, f_g),
            hg_f_hg=jnp.vdot(hg, f_hg),
            # the rank-d positive part (what Lanczos knows of F₊)
            g_f_g_top=jnp.sum(jnp.clip(top, 0.0) * (basis.T @ g) ** 2),
            hg_f_hg_top=jnp.sum(jnp.clip(top, 0.0) * coords_hg**2),
            forecast=theory.Forecast.from_vectors(grad_a, h_a, g, hg),
        )
        return out

    fn = jax.jit(measure, compiler_options=dict(compiler_options) or None)
    _MEASURE_CACHE[cache_key] = fn
    return fn


def _check_eigenpairs(pairs, method: str, n: int, rank: int) -> None:
    """Refuse given Fisher eigenpairs that cannot be F's top-``rank`` pairs at these parameters."""
    if method != "lanczos":
        raise QuarticError(f"fisher_eigenpairs needs method='lanczos', got {method!r}")
    if not isinstance(pairs, curvature.Eigenpairs):
        raise QuarticError(
            f"fisher_eigenpairs must be a curvature.Eigenpairs, got {type(pairs).__name__}"
        )
    values, vectors, residuals = (np.shape(x) for x in pairs)
    k = values[0] if len(values) == 1 else -1
    if k < rank or vectors != (n, k) or residuals != (k,):
        raise QuarticError(
            f"fisher_eigenpairs must hold k >= rank = {rank} pairs of n = {n} parameters "
            f"(values [k], vectors [n, k], residuals [k]); got shapes {values}, {vectors}, "
            f"{residuals}"
        )
    w = np.asarray(pairs.values)
    if not np.all(np.isfinite(w)) or np.any(np.diff(w[:rank]) > 0):
        raise QuarticError(
            f"fisher_eigenpairs.values must be finite and descending; got {w[:rank].tolist()}"
        )


def check_aic(
    align_loss_fn: Callable,
    ft_loss_fn: Callable,
    params: Any,
    rank: int,
    *,
    align_batch: Any = None,
    ft_batch: Any = None,
    fisher: jax.Array | Callable | None = None,
    where=None,
    method: str = "dense",
    thresholds: Thresholds = Thresholds(),
    num_iters: int | None = None,
    trace_samples: int = 64,
    key: jax.Array | None = None,
    chunk_size: int | None = 256,
    fisher_batch: Any = None,
    fisher_trace: float | None = None,
    trace_batch: int | None = None,
    full_spectrum: bool = False,
    fisher_eigenpairs: curvature.Eigenpairs | None = None,
    lambda_max_iters: int = LAMBDA_MAX_ITERS,
    compiler_options: Mapping[str, bool | int | float | str] | None = None,
) -> AICReport:
    """Measure the Alignment Instability Condition (Def 5.1) at ``params`` = θ*.

    Args:
      align_loss_fn: ``L_A(params[, align_batch]) -> scalar``.
      ft_loss_fn: ``L_FT(params[, ft_batch]) -> scalar``.
      params: θ*, any pytree (or a flat vector).
      rank: d, the dimension of the sensitive subspace M.
      fisher: the alignment curvature F: ``None`` (exact Hessian of L_A), a dense ``[n, n]``
        matrix, a matvec ``v[n] -> F v`` on the flat (selected) parameters, or
        :class:`GaussNewton` (the true Fisher of categorical outputs, matrix-free; its data is
        ``fisher_batch``).
      where: parameter subset (see :func:`quartic.core.pytree.select`): one layer, LoRA weights.
      method: ``"dense"`` (exact, from the dense ``[n, n]`` matrix built by batched products: for a
        positive semi-definite F above 512 parameters the top-d pairs come from restarted block
        Lanczos verified by its residuals (:func:`quartic.core.curvature.top_eigh_descending`),
        the tail is ``trace − Σ top-d`` and ``eigenvalues`` holds the top ``d + 10``; otherwise, or
        with ``full_spectrum=True``, the whole ``eigh``) or ``"lanczos"`` (matrix-free: top-d by
        Lanczos with full reorthogonalisation, memory ``O(n·(num_iters + d))``; the tail mass comes
        from a Hutchinson trace estimate with its standard error, ``trace_batch`` products at a
        time, or from ``fisher_trace`` when the caller has the exact trace, e.g.
        :func:`quartic.core.curvature.fisher_trace`).
      fisher_eigenpairs: F's top eigenpairs, already known (``method="lanczos"`` only): a
        :class:`~quartic.core.curvature.Eigenpairs` of at least ``rank`` pairs, descending, e.g.
        from one Lanczos of F shared by the checks of several fine-tuning tasks at the same θ*.
        The check takes the first ``rank`` (and their residuals, reported as given) instead of
        running its own Lanczos of F.
      lambda_max_iters: Lanczos steps for λ_max(H_FT) (at most n). Its residual is reported
        (``lambda_max_ft_residual``) and a warning is raised above ``LAMBDA_MAX_RTOL`` relative,
        so fewer steps cost accuracy only where the report says so.
      compiler_options: XLA options for the check's compiled program (``jax.jit``'s
        ``compiler_options``), e.g. :func:`quartic.core.jit.lean_compile_options` where its compile
        would set the process's peak memory. The values are the same program's, up to the rounding
        of other machine code.
      thresholds: the caller's thresholds for each condition.

    Returns:
      An :class:`AICReport`. ``gamma_fisher = ‖F^{1/2} P H g‖`` is computed in F's eigenbasis as
      ``‖√λ ⊙ Bᵀ H g‖``; ``crossover_time`` uses the full F (two matvecs), not its rank-d part
      (F's positive part when F is indefinite). The report's docstring says what each field holds
      under ``"dense"`` and ``"lanczos"``, and that ``forecast`` uses the Hessian of
      ``align_loss_fn`` whatever ``fisher`` is.
    """
    if method not in ("dense", "lanczos"):
        raise QuarticError(f"method must be 'dense' or 'lanczos', got {method!r}")
    theta, to_params, mask_key = pytree.flat_view(params, where)
    n = theta.shape[0]
    if not isinstance(rank, int) or not 1 <= rank < n:
        raise QuarticError(
            f"rank must be an integer with 1 <= rank < n (the number of parameters, {n}); "
            f"got {rank!r}"
        )
    pytree.check_finite(theta, "params")
    for name, fn, batch in (
        ("align_loss_fn", align_loss_fn, align_batch),
        ("ft_loss_fn", ft_loss_fn, ft_batch),
    ):
        args = (params,) if batch is None else (params, batch)
        shape = jax.eval_shape(fn, *args).shape
        if shape != ():
            raise QuarticError(f"{name} must return a scalar, got shape {shape}")
    if fisher is not None and not callable(fisher) and not isinstance(fisher, GaussNewton):
        f_given = jnp.asarray(fisher)
        if f_given.shape != (n, n):
            raise QuarticError(f"fisher must be [n, n] = [{n}, {n}], got shape {f_given.shape}")
    else:
        f_given = None
    if fisher_trace is not None and not (method == "lanczos" and math.isfinite(fisher_trace)):
        raise QuarticError(
            f"fisher_trace must be a finite number and needs method='lanczos', got {fisher_trace!r}"
        )
    if fisher_eigenpairs is not None:
        _check_eigenpairs(fisher_eigenpairs, method, n, rank)
    if not isinstance(lambda_max_iters, int) or lambda_max_iters < 2:
        raise QuarticError(
            f"lambda_max_iters must be an integer >= 2 (Lanczos steps), got {lambda_max_iters!r}"
        )
    if compiler_options is not None and not isinstance(compiler_options, Mapping):
        raise QuarticError(
            "compiler_options must be a mapping of XLA option names to values, got "
            f"{type(compiler_options).__name__}"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    f_callable = fisher if callable(fisher) or isinstance(fisher, GaussNewton) else None
    dense_given = f_given is not None
    if method == "dense" and not dense_given:  # products with F itself still use its operator
        build = _dense_fn(
            align_loss_fn, f_callable, to_params, mask_key, align_batch is None, chunk_size
        )
        f_given = build(theta, params, align_batch, fisher_batch)
    measure = _measure_fn(
        align_loss_fn,
        ft_loss_fn,
        f_callable,
        to_params,
        mask_key,
        align_batch is None,
        ft_batch is None,
        dense_given,
        method,
        rank,
        num_iters,
        trace_samples,
        chunk_size,
        fisher_trace is not None,
        trace_batch,
        fisher_eigenpairs is not None,
        lambda_max_iters,
        tuple(sorted((compiler_options or {}).items())),
    )
    if method != "dense":
        f_eig = fisher_eigenpairs
    elif full_spectrum:
        f_eig = curvature.eigh_descending(f_given)
    else:
        f_eig = curvature.top_eigh_descending(f_given, rank)
    f_trace = 0.0 if fisher_trace is None else fisher_trace
    m = measure(theta, params, f_given, f_eig, align_batch, ft_batch, key, fisher_batch, f_trace)
    for name in ("align_loss_fn", "ft_loss_fn"):
        if not bool(jnp.isfinite(m[name])):
            raise QuarticError(f"{name} is not finite at the given parameters: {float(m[name])}")
    pytree.check_finite(m["grad_a"], "the gradient of align_loss_fn")
    pytree.check_finite(m["g"], "the gradient of ft_loss_fn")
    pytree.check_finite(m["eigenvalues"], "the alignment curvature's eigenvalues")
    top, basis, forecast = m["top"], m["basis"], m["forecast"]
    residuals = np.asarray(m["residuals"]) if "residuals" in m else None
    eigenvalues, trace, tail = m["eigenvalues"], m["trace"], m["tail"]
    tail_se, lam_max_ft = float(m["tail_se"]), float(m["lam_max_ft"])
    gamma_f, gamma_u, ortho, g_norm = m["gamma_f"], m["gamma_u"], m["ortho"], m["g_norm"]
    g_f_g, hg_f_hg = m["g_f_g"], m["hg_f_hg"]
    ga_norm = float(jnp.linalg.norm(m["grad_a"]))
    lam_ft_res = float(m["lam_max_ft_residual"])

    # An indefinite F (negative curvature of L_A): tail and t× on its positive part F₊.
    indefinite_notes, neg_mass = [], 0.0
    if method == "dense":
        if float(m["neg_mass"]) < -float(m["neg_floor"]):
            neg_mass = float(m["neg_mass"])
            tail, g_f_g, hg_f_hg = m["tail_pos"], m["g_f_g_pos"], m["hg_f_hg_pos"]
            indefinite_notes.append(
                f"F is indefinite (negative mass Σ min(λ_j, 0) = {neg_mass:.3g}, smallest "
                f"eigenvalue {float(eigenvalues[-1]):.3g}): tail mass and crossover time are "
                "computed on F's positive part"
            )
    else:
        neg = min(float(g_f_g), float(hg_f_hg), 0.0)
        if neg < 0:
            neg_mass = neg
            g_f_g, hg_f_hg = m["g_f_g_top"], m["hg_f_hg_top"]
            indefinite_notes.append(
                f"F is indefinite (gᵀFg = {float(m['g_f_g']):.3g}, (Hg)ᵀF(Hg) = "
                f"{float(m['hg_f_hg']):.3g}): the crossover time is computed on the positive part "
                "of F's top-d eigenpairs, and the Hutchinson tail mass includes negative mass, so "
                "its verdict is not judged; use method='dense' for F₊ exactly"
            )

    t = thresholds
    verdicts = {
        "premise": _judge(ga_norm, t.grad_tol, "premise ‖∇L_A(θ*)‖ ≤ tol"),
        "low_rank_tail": _judge(
            float(tail),
            None if (indefinite_notes and method == "lanczos") else t.eps_tail,
            "1. tail mass Σ_{j>d} λ_j ≤ ε₁",
        ),
        "low_rank_sharp": _judge(float(top[-1]), t.lam, "1. λ_d ≥ λ", larger_is_bad=False),
        "orthogonality": _judge(float(ortho), t.eps_ortho, "2. ‖Pg‖ ≤ ε₂"),
        "coupling": _judge(float(gamma_f), t.gamma, "3. ‖F½PHg‖ ≥ γ", larger_is_bad=False),
    }
    warnings = []
    if verdicts["premise"].passed is False:
        warnings.append(
            f"θ* is not at an aligned optimum: ‖∇L_A(θ*)‖ = {ga_norm:.3g} > {t.grad_tol:.3g}. "
            f"Δu grows linearly, Δu ≈ {float(-forecast.ga_g):.3g}·t at small t; "
            "no quartic law applies here."
        )
    warnings += indefinite_notes
    if not lam_ft_res <= LAMBDA_MAX_RTOL * max(abs(lam_max_ft), 1e-300):
        warnings.append(
            f"λ_max(H_FT) = {lam_max_ft:.6g} from {min(n, lambda_max_iters)} Lanczos steps has "
            f"residual {lam_ft_res:.2g} (> {LAMBDA_MAX_RTOL:g} relative): it, the validity "
            "horizon and every t·λ_max scale are uncertain by up to that much"
        )
    if float(top[-1]) <= 0:
        warnings.append(f"λ_d = {float(top[-1]):.3g} ≤ 0: the rank-{rank} subspace is not sharp.")
    if residuals is not None:
        scale = float(jnp.abs(top).max())
        bad = residuals > 1e-6 * max(scale, 1e-300)
        if bad.any():
            warnings.append(
                f"Lanczos did not converge for {int(bad.sum())} of {rank} eigenpairs "
                f"(max residual {residuals.max():.2g}); raise num_iters."
            )

    return AICReport(
        method=method,
        n=n,
        rank=rank,
        eigenvalues=np.asarray(eigenvalues),
        lambda_d=float(top[-1]),
        trace=float(trace),
        tail_mass=float(tail),
        tail_mass_stderr=float(tail_se),
        align_grad_norm=ga_norm,
        ft_grad_norm=float(g_norm),
        ortho_norm=float(ortho),
        ortho_ratio=float(ortho / g_norm) if g_norm > 0 else 0.0,
        gamma_fisher=float(gamma_f),
        gamma_unweighted=float(gamma_u),
        quartic_coefficient=float(theory.quartic_coefficient(gamma_f)),
        lower_bound_coefficient=float(theory.lower_bound_coefficient(top[-1], gamma_u)),
        crossover_time=float(theory.crossover_time(g_f_g, hg_f_hg)),
        lambda_max_ft=lam_max_ft,
        linear_rate=float(-forecast.ga_g),
        forecast=forecast,
        verdicts=verdicts,
        warnings=warnings,
        basis=basis,
        residuals=residuals,
        lambda_max_ft_residual=lam_ft_res,
        negative_mass=neg_mass,
    )
