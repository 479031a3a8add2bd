"""A2T-style synonym-substitution attack, batched and jit-compatible.

The attack of docs/theory.md §5 (Yoo & Qi 2021, "A2T", as used by Turbal et al., arXiv:2501.00066):

1. **Rank positions** by the gradient norm ``||dL/de_t||_2`` of the cross-entropy of the true
   label with respect to each token embedding ``e_t`` (one backward pass per example). Only
   positions holding a *perturbable* token (a content token with at least one candidate) are
   ranked; stop / filler words, ``PAD`` and ``CLS`` are never touched. Ties go to the earlier
   position.
2. **Greedy substitution**, positions in that order, each visited once: evaluate up to
   ``max_candidates`` synonyms of the token in one batched forward; if the best one lowers the
   true-class probability below its current value, keep it (A2T / TextAttack's
   ``GreedyWordSwapWIR``: a position that no candidate improves is left as it is). Candidates
   are compared by log-probability, which orders them as the probability does but still
   separates them when a confident model rounds ``p(true)`` to exactly 1.
3. **Stop** with *success* as soon as the prediction is no longer the true label, and with
   *failure* when the example has spent its query budget, changed its maximum number of words, or
   run out of ranked positions.

Queries: one query per candidate sequence evaluated (the clean forward and the gradient pass are
not counted). As in TextAttack, when fewer than ``K`` queries remain only the first remaining
candidates of a position are evaluated, so the budget is never exceeded and the count is exact.

Word cap: a sentence of ``n_words`` words may change at most
``max(min_perturb_words, ceil(max_perturb_rate * n_words))`` of them (TextAttack's
``MaxModificationRate(max_rate=0.1, min_threshold=4)`` in the A2T recipe); ``n_words`` counts the
tokens with ``table.is_word`` (for the synonym language: content and filler tokens, not ``PAD`` or
``CLS``). The ceiling is computed in exact integer arithmetic.

Examples the model already misclassifies are *skipped*: not attacked, zero queries.

**A second attack with the same constraints** (``AttackConfig(method="wir")``; the ranking is
:func:`wir_order`): greedy word importance by deletion, in the style of TextFooler (Jin et al.
2020) and TextAttack's ``GreedyWordSwapWIR(wir_method="delete")``. Step 1 is replaced: each
eligible position ``t`` is masked (its token replaced by ``config.mask_token``, ``PAD`` for the
synonym language, which the models exclude from attention, so the word is deleted) and the
positions are ranked by the drop ``p(true | x) − p(true | x without t)``, largest first, ties to
the earlier position. The ranking is computed from log-probabilities, which order the positions
as the probabilities do and still separate them when a confident model rounds them to 1. Each
masked sequence is a model query, so the ranking spends one query per eligible position (as in
TextAttack; when the budget is smaller than that, the example fails with the whole budget spent
and no word changed). Step 2 and 3, the word cap, the stop words, each position at most once and
the candidate query accounting are exactly A2T's (the same code).

Model interface (generic, no model class is assumed)::

    embed_fn(params, tokens: int32[B, T]) -> emb: [B, T, D]
    logits_fn(params, emb: [B, T, D], tokens: int32[B, T]) -> logits: [B, C]

``embed_fn`` returns whatever the model adds up at the input (token plus positional embedding
is fine: the gradient with respect to a sum is the gradient with respect to each term).
``logits_fn`` gets the tokens as well so that it can build a padding mask; models that do not
need one ignore them. For a flax nnx module with ``embed`` and ``from_embeddings`` methods::

    graphdef, state = nnx.split(model)
    embed_fn = lambda state, tokens: nnx.merge(graphdef, state).embed(tokens)
    logits_fn = lambda state, emb, tokens: nnx.merge(graphdef, state).from_embeddings(emb)
    attack_fn = make_attack_fn(embed_fn, logits_fn, AttackConfig())
    result = attack_fn(state, tokens, labels, table)

Every example is attacked in parallel: the greedy loop is one ``lax.while_loop`` over ranked
positions with per-example masks (running / succeeded / failed / skipped) and per-example query
counters; each step evaluates ``[B, K]`` candidate sequences in one forward of ``B * K`` rows.
The loop ends when no example is still running. Examples do not interact, so attacking a batch
gives the same result as attacking each example alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quartic.core.errors import QuarticError

__all__ = [
    "FAILED",
    "METHODS",
    "SKIPPED",
    "SUCCEEDED",
    "AttackConfig",
    "AttackResult",
    "SynonymTable",
    "attack_dataset",
    "greedy_attack",
    "importance_order",
    "make_attack_fn",
    "max_perturbed_words",
    "synonym_table",
    "wir_order",
]

#: Attacks of :class:`AttackConfig`: ``"a2t"`` (gradient ranking) and ``"wir"`` (deletion ranking).
METHODS = ("a2t", "wir")

PyTree = Any
EmbedFn = Callable[[PyTree, jax.Array], jax.Array]
LogitsFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

# Per-example status codes of an AttackResult.
SKIPPED = 0  # misclassified before the attack: not attacked
SUCCEEDED = 1  # the prediction was flipped
FAILED = 2  # budget, word cap or positions ran out first
_RUNNING = 3  # internal only; never in a returned result


@dataclass(frozen=True)
class AttackConfig:
    """A2T's constraints (defaults: the paper's 80-query setting).

    Attributes:
      max_candidates: synonyms tried per position (A2T: 20); the table may hold fewer.
      query_budget: candidate evaluations allowed per example (80, 500, ...), or ``None`` for no
        limit.
      max_perturb_rate: fraction of the words that may change, in ``(0, 1]``.
      min_perturb_words: the cap is never below this many words (A2T: 4).
      method: ``"a2t"`` (rank positions by gradient) or ``"wir"`` (rank by the drop in the
        true-class probability when the word is deleted), see the module docstring.
      mask_token: the token id that deletes a word for ``"wir"`` (``PAD``, excluded from
        attention by the models).
    """

    max_candidates: int = 20
    query_budget: int | None = 80
    max_perturb_rate: float = 0.1
    min_perturb_words: int = 4
    method: str = "a2t"
    mask_token: int = 0

    def __post_init__(self):
        if self.max_candidates < 1:
            raise QuarticError(f"max_candidates={self.max_candidates}: need at least 1.")
        if self.query_budget is not None and self.query_budget < 1:
            raise QuarticError(
                f"query_budget={self.query_budget}: need at least 1 query per example, or None "
                "for an unlimited budget."
            )
        if not 0.0 < self.max_perturb_rate <= 1.0:
            raise QuarticError(
                f"max_perturb_rate={self.max_perturb_rate}: must lie in (0, 1] (A2T uses 0.1)."
            )
        if self.min_perturb_words < 0:
            raise QuarticError(f"min_perturb_words={self.min_perturb_words}: must be >= 0.")
        if self.method not in METHODS:
            raise QuarticError(f"method={self.method!r}: choose one of {METHODS}.")
        if self.mask_token < 0:
            raise QuarticError(f"mask_token={self.mask_token}: must be a token id (>= 0).")


class SynonymTable(NamedTuple):
    """What the attack may substitute (all indexed by token id).

    Attributes:
      candidates: ``int32[V, K]``; row ``t`` lists the replacements of ``t``, then -1 padding.
      perturbable: ``bool[V]``; tokens the attack may replace (content words).
      is_word: ``bool[V]``; tokens that count as words for the perturbation cap.
    """

    candidates: jax.Array
    perturbable: jax.Array
    is_word: jax.Array


def synonym_table(candidates, perturbable, is_word) -> SynonymTable:
    """Check and package a substitution table (see ``SynonymTable``).

    For the synonym language: ``synonym_table(lang.candidates, lang.is_content, lang.is_word)``.
    Rows of tokens that are not perturbable are blanked, so a protected token can never be
    replaced whatever the table says.
    """
    cand = np.asarray(candidates)
    pert = np.asarray(perturbable)
    word = np.asarray(is_word)
    if cand.ndim != 2 or not np.issubdtype(cand.dtype, np.integer):
        raise QuarticError(
            f"candidates must be an integer array [V, K]; got {cand.dtype}{list(cand.shape)}."
        )
    v = cand.shape[0]
    for name, arr in (("perturbable", pert), ("is_word", word)):
        if arr.shape != (v,) or arr.dtype != np.bool_:
            raise QuarticError(
                f"{name} must be a bool array [V={v}]; got {arr.dtype}{list(arr.shape)}."
            )
    if cand.size and (cand.min() < -1 or cand.max() >= v):
        raise QuarticError(
            f"candidates hold ids outside [-1, {v}): min {cand.min()}, max {cand.max()}."
        )
    if cand.size and (cand >= 0).any() and not pert[cand[cand >= 0]].all():
        raise QuarticError("candidates propose a token that is not perturbable (a stop word?).")
    cand = np.where(pert[:, None], cand, -1).astype(np.int32)
    return SynonymTable(jnp.asarray(cand), jnp.asarray(pert), jnp.asarray(word))


class AttackResult(NamedTuple):
    """Per-example outcome of an attack on ``B`` examples.

    Attributes:
      adv_tokens: ``int32[B, T]``, the final (perturbed) sequences; equal to the input when
        skipped.
      labels: ``int32[B]``, the true labels.
      status: ``int32[B]``: ``SKIPPED``, ``SUCCEEDED`` or ``FAILED``.
      queries: ``int32[B]``, candidate evaluations spent.
      n_perturbed: ``int32[B]``, positions changed.
      n_words: ``int32[B]``, words in the sentence.
      max_perturbed: ``int32[B]``, the word cap of each example.
      clean_probs: ``[B, C]``, class probabilities on the clean input.
      adv_probs: ``[B, C]``, class probabilities on ``adv_tokens``.
    """

    adv_tokens: jax.Array
    labels: jax.Array
    status: jax.Array
    queries: jax.Array
    n_perturbed: jax.Array
    n_words: jax.Array
    max_perturbed: jax.Array
    clean_probs: jax.Array
    adv_probs: jax.Array


def max_perturbed_words(n_words: jax.Array, config: AttackConfig) -> jax.Array:
    """``max(min_perturb_words, ceil(max_perturb_rate * n_words))`` in exact integer arithmetic
    (``0.1 * 30`` is ``3.0000000000000004`` in floating point; the cap is 3, not 4)."""
    rate = Fraction(config.max_perturb_rate).limit_denominator(1_000_000)
    num, den = rate.numerator, rate.denominator
    n = n_words.astype(jnp.int32)
    ceil = (n * num + (den - 1)) // den
    return jnp.maximum(ceil, config.min_perturb_words).astype(jnp.int32)


def _true_class_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1).sum()


def _eligible_order(
    tokens, table: SynonymTable, max_candidates, key
) -> tuple[jax.Array, jax.Array]:
    """Positions by increasing ``key [B, T]``, eligible ones (perturbable, with at least one of the
    first ``max_candidates`` candidates) first, ties to the earlier position; and their count."""
    cand = table.candidates[:, :max_candidates]
    eligible = table.perturbable[tokens] & (cand[tokens] >= 0).any(axis=-1)
    keys = jnp.where(eligible, key, jnp.inf)
    order = jnp.argsort(keys, axis=1, stable=True).astype(jnp.int32)
    return order, eligible.sum(axis=1, dtype=jnp.int32)


def importance_order(
    params: PyTree,
    tokens: jax.Array,
    labels: jax.Array,
    table: SynonymTable,
    embed_fn: EmbedFn,
    logits_fn: LogitsFn,
    max_candidates: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradient word-importance ranking (A2T step 1).

    Args:
      tokens: ``int32[B, T]``; labels: ``int32[B]``.
      max_candidates: only the first ``max_candidates`` columns of the table count.

    Returns:
      ``(order, n_eligible, saliency, logits)``: ``order`` ``int32[B, T]`` lists positions by
      decreasing ``saliency[b, t] = ||d CE(b) / d emb[b, t]||_2``, eligible positions (perturbable
      with >= 1 candidate) first; ``n_eligible`` ``int32[B]`` counts them; ``saliency`` is
      ``[B, T]`` (ineligible positions included); ``logits`` ``[B, C]`` are the clean logits.
    """
    emb = embed_fn(params, tokens)

    def loss_fn(e):
        logits = logits_fn(params, e, tokens)
        return _true_class_loss(logits, labels), logits

    # Summing per-example losses keeps each example's gradient its own: examples do not interact.
    grad, logits = jax.grad(loss_fn, has_aux=True)(emb)
    saliency = jnp.sqrt(jnp.sum(jnp.square(grad), axis=-1))
    order, n_eligible = _eligible_order(tokens, table, max_candidates, -saliency)
    return order, n_eligible, saliency, logits


def wir_order(
    params: PyTree,
    tokens: jax.Array,
    labels: jax.Array,
    table: SynonymTable,
    embed_fn: EmbedFn,
    logits_fn: LogitsFn,
    max_candidates: int | None = None,
    mask_token: int = 0,
    positions_per_forward: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Deletion word-importance ranking (TextFooler / TextAttack ``wir_method="delete"``).

    Every position ``t`` of every example is masked (``mask_token``), ``positions_per_forward``
    positions at a time (``None``: all ``T`` in one forward of ``B * T`` rows; the attack passes
    its candidate count, so no ranking forward is larger than a candidate step's). Eligible
    positions (perturbable with >= 1 candidate) are ordered by decreasing drop of the true-class
    probability, read from the masked log-probability (the same order), ties to the earlier
    position.

    Returns:
      ``(order, n_eligible, drop, logits)`` as :func:`importance_order`: ``order`` ``int32[B, T]``
      eligible positions first; ``n_eligible`` ``int32[B]``; ``drop [B, T]`` is
      ``p(true | x) − p(true | x with t masked)`` (ineligible positions included); ``logits``
      ``[B, C]`` are the clean logits.
    """
    t = tokens.shape[1]
    if positions_per_forward is not None and positions_per_forward < 1:
        raise QuarticError(f"positions_per_forward={positions_per_forward}: need at least 1.")
    logits = logits_fn(params, embed_fn(params, tokens), tokens)
    positions = jnp.arange(t, dtype=jnp.int32)

    def masked_true_logp(s):  # [B]: log p(true | example with position s masked)
        masked = jnp.where(positions[None, :] == s, jnp.int32(mask_token), tokens)
        logp = jax.nn.log_softmax(logits_fn(params, embed_fn(params, masked), masked), axis=-1)
        return jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]

    # ``positions_per_forward`` positions at a time: all B·T masked rows in one forward held
    # 18 GiB for 300 rows of 64 tokens on 3 models; the attack's own steps run B·K rows.
    group = min(t, positions_per_forward or t)
    masked_true = jax.lax.map(masked_true_logp, positions, batch_size=group).T  # [B, T]
    clean_true = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=1)
    drop = jnp.exp(clean_true) - jnp.exp(masked_true)
    # the lower p(true) without t, the larger the drop
    order, n_eligible = _eligible_order(tokens, table, max_candidates, masked_true)
    return order, n_eligible, drop, logits


def greedy_attack(
    params: PyTree,
    tokens: jax.Array,
    labels: jax.Array,
    table: SynonymTable,
    *,
    embed_fn: EmbedFn,
    logits_fn: LogitsFn,
    config: AttackConfig = AttackConfig(),
    query_budget: jax.Array | None = None,
) -> AttackResult:
    """Attack every example of ``tokens[B, T]`` with true ``labels[B]`` (see the module docstring):
    A2T, or with ``config.method == "wir"`` the deletion-ranked attack under the same constraints.

    Jit-compatible (``embed_fn``, ``logits_fn`` and ``config`` static); use ``make_attack_fn``
    for the jitted version. ``query_budget``, an integer scalar that may be traced, replaces
    ``config.query_budget`` (a negative value: no budget), so that one compiled program serves
    every budget; the budget only enters integer comparisons, so the result is the same.
    """
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if tokens.ndim != 2 or labels.shape != tokens.shape[:1]:
        raise QuarticError(
            f"tokens must be [B, T] and labels [B]; got {list(tokens.shape)} and "
            f"{list(labels.shape)}."
        )
    b, t = tokens.shape
    cand_table = table.candidates[:, : config.max_candidates].astype(jnp.int32)
    k = cand_table.shape[1]
    wir = config.method == "wir"
    # An unlimited budget is one that can never bind: at most T positions of K candidates (and,
    # for "wir", T masked sequences to rank them).
    unlimited = t * k + 1 + (t if wir else 0)
    if query_budget is not None:
        budget = jnp.where(query_budget < 0, unlimited, query_budget).astype(jnp.int32)
    elif config.query_budget is not None:
        budget = config.query_budget
    else:
        budget = unlimited

    rank_fn = wir_order if wir else importance_order
    order, n_eligible, _, clean_logits = rank_fn(
        params, tokens, labels, table, embed_fn, logits_fn, config.max_candidates,
        **({"mask_token": config.mask_token, "positions_per_forward": k} if wir else {}),
    )  # fmt: skip
    clean_logp = jax.nn.log_softmax(clean_logits, axis=-1)
    correct = jnp.argmax(clean_logp, axis=-1).astype(jnp.int32) == labels
    # The deletion ranking spends one query per eligible position, at most the budget.
    ranked = jnp.minimum(n_eligible, budget) if wir else jnp.zeros_like(n_eligible)
    n_words = table.is_word[tokens].sum(axis=1, dtype=jnp.int32)
    cap = max_perturbed_words(n_words, config)
    positions = jnp.arange(t, dtype=jnp.int32)

    def true_class(x):  # [B, ..., C] -> [B, ...]: the entry of each example's true label
        lab = labels.reshape(labels.shape + (1,) * (x.ndim - 1))
        return jnp.take_along_axis(x, lab, axis=-1)[..., 0]

    def settle(state):
        """Mark running examples that can go no further as failed."""
        s, *_, queries, n_changed, status = state
        stuck = (s >= n_eligible) | (n_changed >= cap) | (queries >= budget)
        status = jnp.where((status == _RUNNING) & stuck, FAILED, status)
        return state[:-1] + (status,)

    def step(state):
        s, cur, logp, queries, n_changed, status = state
        running = status == _RUNNING
        pos = jax.lax.dynamic_index_in_dim(order, s, axis=1, keepdims=False)  # [B]
        at_pos = positions[None, :] == pos[:, None]  # [B, T]
        orig = jnp.take_along_axis(cur, pos[:, None], axis=1)[:, 0]  # [B]
        cands = cand_table[orig]  # [B, K]
        valid = cands >= 0
        # Evaluate the first `remaining` valid candidates, so the budget is never exceeded.
        rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32)
        remaining = budget - queries
        evaluate = valid & (rank <= remaining[:, None]) & running[:, None]
        n_eval = evaluate.sum(axis=1, dtype=jnp.int32)

        safe = jnp.where(valid, cands, orig[:, None])
        trial = jnp.where(at_pos[:, None, :], safe[:, :, None], cur[:, None, :])  # [B, K, T]
        flat = trial.reshape(b * k, t)
        trial_logits = logits_fn(params, embed_fn(params, flat), flat)
        # Log-probabilities order candidates as probabilities do, and still separate them where
        # a confident model rounds p(true) to exactly 1.
        trial_logp = jax.nn.log_softmax(trial_logits, axis=-1).reshape(b, k, -1)
        score = jnp.where(evaluate, true_class(trial_logp), jnp.inf)
        best = jnp.argmin(score, axis=1).astype(jnp.int32)
        score_best = jnp.take_along_axis(score, best[:, None], axis=1)[:, 0]
        improve = running & (score_best < true_class(logp))

        best_tok = jnp.take_along_axis(safe, best[:, None], axis=1)  # [B, 1]
        cur = jnp.where(improve[:, None] & at_pos, best_tok, cur)
        best_logp = jnp.take_along_axis(trial_logp, best[:, None, None], axis=1)[:, 0]
        logp = jnp.where(improve[:, None], best_logp, logp)
        flipped = jnp.argmax(logp, axis=-1).astype(jnp.int32) != labels
        status = jnp.where(improve & flipped, SUCCEEDED, status)
        state = (s + 1, cur, logp, queries + n_eval, n_changed + improve.astype(jnp.int32), status)
        return settle(state)

    def keep_going(state):
        s, *_, status = state
        return (s < t) & jnp.any(status == _RUNNING)

    zeros = jnp.zeros((b,), jnp.int32)
    status0 = jnp.where(correct, _RUNNING, SKIPPED).astype(jnp.int32)
    queries0 = jnp.where(correct, ranked, 0).astype(jnp.int32)
    state = settle((jnp.zeros((), jnp.int32), tokens, clean_logp, queries0, zeros, status0))
    _, adv, adv_logp, queries, n_changed, status = jax.lax.while_loop(keep_going, step, state)
    return AttackResult(
        adv_tokens=adv,
        labels=labels,
        status=status,
        queries=queries,
        n_perturbed=n_changed,
        n_words=n_words,
        max_perturbed=cap,
        clean_probs=jnp.exp(clean_logp),
        adv_probs=jnp.exp(adv_logp),
    )


def make_attack_fn(
    embed_fn: EmbedFn, logits_fn: LogitsFn, config: AttackConfig = AttackConfig()
) -> Callable[[PyTree, jax.Array, jax.Array, SynonymTable], AttackResult]:
    """``jit(greedy_attack)`` for one model interface and config:
    ``attack_fn(params, tokens[B, T], labels[B], table) -> AttackResult``. It compiles once per
    input shape."""

    def attack_fn(params, tokens, labels, table):
        return greedy_attack(
            params, tokens, labels, table, embed_fn=embed_fn, logits_fn=logits_fn, config=config
        )

    return jax.jit(attack_fn)


def attack_dataset(
    attack_fn: Callable[..., AttackResult],
    params: PyTree,
    batch: dict,
    table: SynonymTable,
    batch_size: int = 256,
) -> AttackResult:
    """Attack ``batch = {"tokens": [N, T], "labels": [N]}`` in chunks of ``batch_size`` (the last
    chunk padded with copies of its last example so every chunk has one shape and ``attack_fn``
    compiles once). Returns one ``AttackResult`` of numpy arrays over the ``N`` examples; raises
    ``QuarticError`` if the model's clean logits are not finite."""
    tokens = np.asarray(batch["tokens"], np.int32)
    labels = np.asarray(batch["labels"], np.int32)
    n = tokens.shape[0]
    if n == 0 or labels.shape != (n,):
        raise QuarticError(
            f"batch needs tokens [N, T] and labels [N] with N >= 1; got {list(tokens.shape)} and "
            f"{list(labels.shape)}."
        )
    if batch_size < 1:
        raise QuarticError(f"batch_size={batch_size}: need at least 1.")
    size = min(batch_size, n)
    parts = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        out = attack_fn(params, tokens[idx], labels[idx], table)
        keep = min(size, n - start)
        parts.append(jax.tree.map(lambda x, keep=keep: np.asarray(x)[:keep], out))
    result = AttackResult(*(np.concatenate(fields) for fields in zip(*parts, strict=True)))
    bad = ~np.isfinite(result.clean_probs).all(axis=1)
    if bad.any():
        raise QuarticError(
            f"the model gave non-finite logits for {int(bad.sum())} of {n} clean examples (first: "
            f"index {int(np.flatnonzero(bad)[0])}); check the parameters before attacking."
        )
    return result
