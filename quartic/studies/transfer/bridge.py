"""The bridge to the AIC (docs/theory.md §5): at a parameter point θ₀ (the start of the target
fine-tune) the robustness loss ``L_R`` (cross-entropy on synonym-rewritten target examples,
:func:`synonym_rewrite`) plays the alignment loss of Def 5.1 and the target-train loss ``L_FT`` the
fine-tuning loss. Measured with :mod:`quartic.core.curvature` (HVP + Lanczos): the top eigenvalues
of ``∇²L_R`` (sharpness), the overlap ``‖P g‖ / ‖g‖`` of the fine-tuning gradient with their
eigenspace, the coupling ``γ_F = ‖H_R^{1/2} P H_FT g‖`` and the first-order rate ``∇L_R · g``
(θ₀ is not a minimiser of ``L_R``, so the premise of the quartic law fails and the first-order
term is reported beside the AIC quantities).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from quartic.core import curvature, measure, theory
from quartic.core.cache import memo
from quartic.core.errors import QuarticError
from quartic.models.transformer import TransformerConfig, count_params
from quartic.studies.transfer.models import _model_fns
from quartic.studies.transfer.trainer import _ce
from quartic.tasks.synonyms import Language

__all__ = ["robustness_geometry", "synonym_rewrite"]


def synonym_rewrite(lang: Language, tokens: np.ndarray, seed: int) -> np.ndarray:
    """``tokens`` with every content token replaced by a uniformly random member of its own
    cluster (itself included); fillers, ``CLS`` and ``PAD`` unchanged. The concept sequence, and
    so the label of every bias task, is preserved: a model that reads concepts is unaffected."""
    tokens = np.asarray(tokens)
    rng = np.random.default_rng(seed)
    concept = lang.concept_of[tokens]
    content = concept >= 0
    c = np.where(content, concept, 0)
    offset = np.floor(rng.random(tokens.shape) * lang.cluster_size[c]).astype(np.int32)
    return np.where(content, lang.cluster_start[c] + offset, tokens).astype(tokens.dtype)


@memo(maxsize=64)
def _geometry_program(cfg: TransformerConfig, rank: int, num_iters: int):
    call = _model_fns(cfg).call

    def one(params, robust, clean, ft, key):
        theta, unravel = ravel_pytree(params)
        n = theta.shape[0]

        def ce(th, b):
            return jnp.mean(_ce(call(unravel(th), b["tokens"]), b["labels"]))

        robust_fn = lambda th: ce(th, robust)
        ft_fn = lambda th: ce(th, ft)
        g_r = jax.grad(robust_fn)(theta)
        g = jax.grad(ft_fn)(theta)
        eig = curvature.lanczos_eigh(
            curvature.hvp_fn(robust_fn, theta),
            n,
            rank,
            0,
            num_iters=num_iters,
            key=key,
            dtype=theta.dtype,
        ).top
        hg = curvature.hvp_fn(ft_fn, theta)(g)
        coords_hg = eig.vectors.T @ hg
        g_norm = jnp.linalg.norm(g)
        gamma_f = measure.fisher_weighted(eig.values, coords_hg)
        tiny = jnp.finfo(theta.dtype).tiny
        return {
            "robust_loss": robust_fn(theta),
            "clean_loss": ce(theta, clean),
            "ft_loss": ft_fn(theta),
            "eigenvalues": eig.values,
            "residuals": eig.residuals,
            "lambda_max": eig.values[0],
            "lambda_d": eig.values[-1],
            "overlap": jnp.linalg.norm(eig.vectors.T @ g) / jnp.maximum(g_norm, tiny),
            "gamma_fisher": gamma_f,
            "gamma_unweighted": jnp.linalg.norm(coords_hg),
            "quartic_coefficient": theory.quartic_coefficient(gamma_f),
            "robust_grad_norm": jnp.linalg.norm(g_r),
            "ft_grad_norm": g_norm,
            # d L_R / dt under gradient flow on L_FT is -∇L_R·g: the first-order leak c₁.
            "linear_rate": -jnp.vdot(g_r, g),
            "grad_cosine": jnp.vdot(g_r, g) / jnp.maximum(jnp.linalg.norm(g_r) * g_norm, tiny),
        }

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None)))


def robustness_geometry(
    cfg: TransformerConfig,
    params: dict,
    robust_batch: dict,
    clean_batch: dict,
    ft_batch: dict,
    *,
    rank: int = 4,
    num_iters: int = 24,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """AIC quantities of the robustness "skill" at ``M`` stacked classifiers (see the module
    docstring): ``L_R`` = cross-entropy on ``robust_batch`` (synonym-rewritten examples), ``L_FT`` =
    cross-entropy on ``ft_batch`` (the target training set); ``clean_batch`` holds the same
    examples as ``robust_batch`` before the rewrite. Every entry has a leading ``[M]`` axis."""
    n = count_params(cfg)
    if not 1 <= rank <= num_iters <= n:
        raise QuarticError(
            f"need 1 <= rank ({rank}) <= num_iters ({num_iters}) <= n ({n}) for Lanczos"
        )
    if cfg.lora_rank:
        raise QuarticError("measure the merged model: merge_lora(params) with lora_rank=0")
    program = _geometry_program(cfg, rank, num_iters)
    as_j = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    out = program(
        params, as_j(robust_batch), as_j(clean_batch), as_j(ft_batch), jax.random.PRNGKey(seed)
    )
    return {k: np.asarray(v) for k, v in out.items()}
