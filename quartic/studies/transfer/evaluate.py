"""The A2T attack (:mod:`quartic.studies.transfer.attack`) on ``M`` stacked classifiers of the
transfer study at once, and when a finite query budget is the unlimited one."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core.cache import memo
from quartic.core.errors import QuarticError
from quartic.models.transformer import TransformerConfig
from quartic.studies.transfer.attack import (
    AttackConfig,
    AttackResult,
    SynonymTable,
    attack_dataset,
    greedy_attack,
)
from quartic.studies.transfer.models import _model_fns

__all__ = ["attack_models", "budget_is_unlimited"]


@memo(maxsize=64)
def _attack_program(cfg: TransformerConfig, config: AttackConfig):
    """The attack of ``M`` stacked classifiers, its query budget an argument (``-1``: none), so
    every budget of one config shares a compiled program; ``config.query_budget`` is not read."""
    fns = _model_fns(cfg)

    def logits_fn(params, emb, tokens):
        return fns.from_embeddings(params, emb, tokens != cfg.pad_id)

    def one(params, tokens, labels, table, budget):
        return greedy_attack(
            params, tokens, labels, table, embed_fn=fns.embed, logits_fn=logits_fn, config=config,
            query_budget=budget,
        )  # fmt: skip

    # Examples first (out_axes=1), so attack_dataset's chunking along axis 0 applies unchanged.
    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None), out_axes=1))


def attack_models(
    cfg: TransformerConfig,
    params: dict,
    batch: dict,
    table: SynonymTable,
    config: AttackConfig,
    batch_size: int = 256,
) -> list[AttackResult]:
    """Attack every example of ``batch`` against each of the ``M`` stacked classifiers
    ``params``; one :class:`~quartic.studies.attack.AttackResult` (numpy) per model."""
    if cfg.lora_rank:
        raise QuarticError("attack the merged model: merge_lora(params) with lora_rank=0")
    program = _attack_program(cfg, dataclasses.replace(config, query_budget=None))
    budget = jnp.asarray(-1 if config.query_budget is None else config.query_budget, jnp.int32)
    res = attack_dataset(
        lambda p, tokens, labels, tb: program(p, tokens, labels, tb, budget),
        params, batch, table, batch_size=batch_size,
    )  # fmt: skip
    m = res.status.shape[1]
    return [AttackResult(*(np.asarray(f)[:, i] for f in res)) for i in range(m)]


def budget_is_unlimited(
    query_budget: int | None, seq_len: int, n_candidates: int, method: str = "a2t"
) -> bool:
    """Whether a budget can never bind: an example visits each of its at most ``seq_len``
    positions once with at most ``n_candidates`` candidates (and the ``"wir"`` ranking scores at
    most ``seq_len`` masked sequences first), so a budget of ``seq_len * n_candidates`` (plus
    ``seq_len`` for ``"wir"``) or more gives exactly the unlimited attack."""
    ranking = seq_len if method == "wir" else 0
    return query_budget is None or query_budget >= seq_len * n_candidates + ranking
