"""A synthetic language with synonyms, and three binary "bias" tasks written in it.

This is the small-scale world for the transfer-learning / adversarial-robustness protocol of
docs/theory.md §5 (Turbal et al., arXiv:2501.00066). Everything is generated from integer seeds with
numpy, so a world is reproduced exactly from its config.

Vocabulary (``V = 2 + n_stop + sum(cluster sizes)`` tokens, in this order):

* ``PAD = 0`` and ``CLS = 1``: specials. Every sequence starts with ``CLS``; classification
  sequences are right-padded with ``PAD``.
* ``n_stop`` filler / stop tokens: function words. They carry grammar, never meaning, and the
  attack may not touch them.
* content tokens, grouped by **concept**: concept ``c`` is realised by a cluster of
  ``min_synonyms..max_synonyms`` interchangeable surface tokens (synonyms), stored contiguously.
  The clusters partition the content vocabulary. In each cluster the first ``max(1, size // 2)``
  members of a seeded permutation are *privileged* surface forms (used by ``surface_bias``).

Grammar (the pretraining corpus): a Markov chain over concepts. From concept ``c`` the next
concept is drawn from ``transition[c]`` (each concept has ``branching`` likely successors, mixed
with 10 % uniform so every concept is reachable); after each content token a filler token follows
with probability ``stop_rate``, drawn from the concept's own filler distribution. Each concept is
rendered as a *uniformly random member of its cluster*, independently at every occurrence, so two
synonyms have the same distribution of left and right contexts: a language model pretrained on this
corpus has every reason to put synonyms close together in embedding space, and no way to tell them
apart except by their identity.

Bias tasks: task ``k`` is a set of cue concepts (``bias_tasks`` makes three, "hate", "political",
"gender", sharing ``n_shared`` concepts and each owning the rest). An example is a grammatical
sequence of random length in which every occurrence of the task's own cue concepts is replaced by
a random non-cue content token; exactly half the examples (the true positives) then get
``1..max_cue_occurrences`` cue tokens written over random content positions. Labels are 1 =
biased. Label noise flips exactly ``round(label_noise * n_class)`` labels of each class, so classes
stay balanced and the Bayes accuracy is ``1 - label_noise``.

The surface-form knob ``surface_bias`` in [0, 1] acts on the **source** split only (the large
training set used when the task is the source of a transfer): each cue token of a positive source
example is drawn from its cluster's privileged forms with probability ``surface_bias`` and from
the whole cluster otherwise. At 0 any synonym carries the cue equally; at 1 only privileged forms
ever appear in the source task's positives, so a model fine-tuned on the source can learn the cue
as a property of particular surface forms rather than of the concept. ``decoy_rate`` in [0, 1]
(default 0) sharpens this: a negative source example carries, with that probability, cue
concepts written in *non-privileged* forms, so in the source task the unprivileged synonyms of a
cue are actively evidence of "not biased". The target splits (``target_train``, ``val``,
``test``) are always generated with both knobs at 0.

Splits follow the paper: ``source_train`` (~12k), ``target_train`` (``target_fraction`` = 5 % of
the source size, ~600), ``val`` and ``test`` (~1.6k each); ``TaskDataConfig.quick()`` is a much
smaller scale for smoke tests. Batches are dicts ``{"tokens": int32[N, T], "labels": int32[N]}``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from quartic.core.errors import QuarticError

__all__ = [
    "CLS",
    "PAD",
    "TASK_NAMES",
    "BiasTask",
    "Language",
    "LanguageConfig",
    "TaskDataConfig",
    "TaskSplits",
    "bias_tasks",
    "cue_present",
    "make_language",
    "make_task_splits",
    "pretrain_corpus",
]

PAD = 0
CLS = 1
N_SPECIAL = 2
TASK_NAMES = ("hate", "political", "gender")

# Weight of the uniform component mixed into the sparse chains, so every concept and filler occurs.
_UNIFORM_MIX = 0.1


@dataclass(frozen=True)
class LanguageConfig:
    """Size and grammar of the synthetic language.

    Attributes:
      n_concepts: number of concepts (synonym clusters).
      min_synonyms, max_synonyms: cluster sizes are uniform on ``[min_synonyms, max_synonyms]``;
        ``min_synonyms >= 2`` so every content token has at least one synonym.
      n_stop: number of filler / stop tokens.
      branching: number of likely successors of each concept in the grammar chain.
      stop_rate: probability that a filler token follows a content token.
      seed: seeds the whole language (clusters, privileged forms, grammar).
    """

    n_concepts: int = 60
    min_synonyms: int = 2
    max_synonyms: int = 8
    n_stop: int = 16
    branching: int = 6
    stop_rate: float = 0.35
    seed: int = 0

    def __post_init__(self):
        if self.n_concepts < 2:
            raise QuarticError(f"n_concepts={self.n_concepts}: need at least 2 concepts.")
        if not 2 <= self.min_synonyms <= self.max_synonyms:
            raise QuarticError(
                f"min_synonyms={self.min_synonyms}, max_synonyms={self.max_synonyms}: need "
                "2 <= min_synonyms <= max_synonyms (every content token needs a synonym)."
            )
        if self.n_stop < 1:
            raise QuarticError(f"n_stop={self.n_stop}: need at least one filler token.")
        if not 1 <= self.branching <= self.n_concepts:
            raise QuarticError(
                f"branching={self.branching}: must lie in [1, n_concepts={self.n_concepts}]."
            )
        if not 0.0 <= self.stop_rate < 1.0:
            raise QuarticError(f"stop_rate={self.stop_rate}: must lie in [0, 1).")


@dataclass(frozen=True, eq=False)
class Language:
    """A built language: vocabulary layout, synonym clusters and grammar (numpy arrays).

    Attributes:
      config: the ``LanguageConfig`` it was built from.
      concept_of: ``int32[V]``, the concept of each content token; -1 for specials and fillers.
      is_stop: ``bool[V]``, filler / stop tokens.
      is_special: ``bool[V]``, ``PAD`` and ``CLS``.
      is_privileged: ``bool[V]``, privileged surface forms (a subset of each cluster).
      cluster_start: ``int32[n_concepts]``, first token of each concept's cluster.
      cluster_size: ``int32[n_concepts]``.
      transition: ``float64[n_concepts, n_concepts]``, concept -> next concept.
      filler_given_concept: ``float64[n_concepts, n_stop]``, filler after a concept.
    """

    config: LanguageConfig
    concept_of: np.ndarray
    is_stop: np.ndarray
    is_special: np.ndarray
    is_privileged: np.ndarray
    cluster_start: np.ndarray
    cluster_size: np.ndarray
    transition: np.ndarray
    filler_given_concept: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.concept_of.shape[0])

    @property
    def n_concepts(self) -> int:
        return self.config.n_concepts

    @property
    def first_stop(self) -> int:
        return N_SPECIAL

    @property
    def is_content(self) -> np.ndarray:
        """``bool[V]``: content tokens, the only ones an attack may replace."""
        return self.concept_of >= 0

    @property
    def is_word(self) -> np.ndarray:
        """``bool[V]``: tokens that count as words (content and fillers; not PAD/CLS)."""
        return ~self.is_special

    def cluster(self, concept: int) -> np.ndarray:
        """``int32[size]``: the surface tokens of ``concept``."""
        if not 0 <= concept < self.n_concepts:
            raise QuarticError(f"concept {concept} is outside [0, {self.n_concepts}).")
        start = int(self.cluster_start[concept])
        return np.arange(start, start + int(self.cluster_size[concept]), dtype=np.int32)

    def synonyms_of(self, token: int) -> np.ndarray:
        """``int32[size - 1]``: the cluster mates of ``token`` (itself excluded; empty for fillers
        and specials)."""
        if not 0 <= token < self.vocab_size:
            raise QuarticError(f"token {token} is outside the vocabulary [0, {self.vocab_size}).")
        concept = int(self.concept_of[token])
        if concept < 0:
            return np.zeros((0,), np.int32)
        members = self.cluster(concept)
        return members[members != token]

    @property
    def candidates(self) -> np.ndarray:
        """``int32[V, max_synonyms - 1]``: row ``t`` lists the cluster mates of ``t`` in cluster
        order, then -1 padding. Rows of fillers and specials are all -1. This is the substitution
        table the batched attack indexes (a token is never its own candidate)."""
        width = self.config.max_synonyms - 1
        table = np.full((self.vocab_size, width), -1, np.int32)
        for token in np.flatnonzero(self.is_content):
            mates = self.synonyms_of(int(token))
            table[token, : mates.shape[0]] = mates
        return table


def make_language(config: LanguageConfig = LanguageConfig()) -> Language:
    """Build the language of ``config`` (deterministic in ``config.seed``)."""
    rng = np.random.default_rng([config.seed, 0x5EED])
    n_c, n_stop = config.n_concepts, config.n_stop
    sizes = rng.integers(config.min_synonyms, config.max_synonyms + 1, size=n_c).astype(np.int32)
    first_content = N_SPECIAL + n_stop
    starts = (first_content + np.concatenate([[0], np.cumsum(sizes)[:-1]])).astype(np.int32)
    vocab = first_content + int(sizes.sum())

    concept_of = np.full((vocab,), -1, np.int32)
    is_privileged = np.zeros((vocab,), bool)
    for c in range(n_c):
        members = np.arange(starts[c], starts[c] + sizes[c])
        concept_of[members] = c
        n_priv = max(1, int(sizes[c]) // 2)
        is_privileged[rng.permutation(members)[:n_priv]] = True
    is_special = np.zeros((vocab,), bool)
    is_special[:N_SPECIAL] = True
    is_stop = np.zeros((vocab,), bool)
    is_stop[N_SPECIAL:first_content] = True

    def sparse_rows(n_rows: int, n_cols: int, k: int) -> np.ndarray:
        rows = np.zeros((n_rows, n_cols))
        for r in range(n_rows):
            support = rng.choice(n_cols, size=k, replace=False)
            rows[r, support] = rng.dirichlet(np.ones(k))
        return (1.0 - _UNIFORM_MIX) * rows + _UNIFORM_MIX / n_cols

    transition = sparse_rows(n_c, n_c, config.branching)
    filler = sparse_rows(n_c, n_stop, min(3, n_stop))
    return Language(
        config=config,
        concept_of=concept_of,
        is_stop=is_stop,
        is_special=is_special,
        is_privileged=is_privileged,
        cluster_start=starts,
        cluster_size=sizes,
        transition=transition,
        filler_given_concept=filler,
    )


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs[n, k]`` -> ``int64[n]``."""
    u = rng.random((probs.shape[0], 1))
    idx = (np.cumsum(probs, axis=1) < u).sum(axis=1)
    return np.minimum(idx, probs.shape[1] - 1)


def _render(lang: Language, rng: np.random.Generator, concepts: np.ndarray) -> np.ndarray:
    """A uniformly random surface form of each concept (same shape as ``concepts``)."""
    offset = np.floor(rng.random(concepts.shape) * lang.cluster_size[concepts]).astype(np.int32)
    return lang.cluster_start[concepts] + offset


def _grammatical(lang: Language, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """``int32[n, length]`` of content and filler tokens from the grammar chain (no specials)."""
    tokens = np.empty((n, length), np.int32)
    concept = rng.integers(0, lang.n_concepts, size=n)
    tokens[:, 0] = _render(lang, rng, concept)
    filler_next = rng.random(n) < lang.config.stop_rate
    for t in range(1, length):
        fill = _sample_rows(rng, lang.filler_given_concept[concept]) + lang.first_stop
        nxt = _sample_rows(rng, lang.transition[concept])
        word = _render(lang, rng, nxt)
        tokens[:, t] = np.where(filler_next, fill, word)
        concept = np.where(filler_next, concept, nxt)
        # A filler never follows a filler: after one, the next token is a content token.
        filler_next = ~filler_next & (rng.random(n) < lang.config.stop_rate)
    return tokens


def pretrain_corpus(lang: Language, n_sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """The generic next-token pretraining corpus: ``int32[n_sequences, seq_len]``, each sequence
    ``CLS`` followed by ``seq_len - 1`` grammatical tokens (no padding)."""
    if n_sequences < 1 or seq_len < 2:
        raise QuarticError(
            f"n_sequences={n_sequences}, seq_len={seq_len}: need at least 1 sequence of length 2."
        )
    rng = np.random.default_rng([lang.config.seed, seed, 0xC0])
    body = _grammatical(lang, rng, n_sequences, seq_len - 1)
    return np.concatenate([np.full((n_sequences, 1), CLS, np.int32), body], axis=1)


@dataclass(frozen=True)
class BiasTask:
    """A binary bias task: label 1 (biased) iff the text carries one of ``cue_concepts``."""

    name: str
    cue_concepts: tuple[int, ...]


def bias_tasks(
    lang: Language, n_cues: int = 6, n_shared: int = 2, seed: int = 0
) -> tuple[BiasTask, ...]:
    """The three tasks of ``TASK_NAMES``: ``n_shared`` cue concepts common to all three, plus
    ``n_cues - n_shared`` concepts owned by each task alone (so every pair shares exactly the
    ``n_shared`` common ones)."""
    if not 0 <= n_shared < n_cues:
        raise QuarticError(
            f"n_cues={n_cues}, n_shared={n_shared}: need 0 <= n_shared < n_cues so that the "
            "tasks' cue sets are only partly shared."
        )
    n_tasks = len(TASK_NAMES)
    needed = n_shared + n_tasks * (n_cues - n_shared)
    if needed >= lang.n_concepts:
        raise QuarticError(
            f"{n_tasks} tasks with n_cues={n_cues}, n_shared={n_shared} use {needed} concepts, "
            f"but the language has {lang.n_concepts}; some concepts must stay non-cue."
        )
    rng = np.random.default_rng([lang.config.seed, seed, 0xB1A5])
    chosen = [int(c) for c in rng.choice(lang.n_concepts, size=needed, replace=False)]
    shared, own = chosen[:n_shared], chosen[n_shared:]
    per = n_cues - n_shared
    return tuple(
        BiasTask(name, tuple(sorted(shared + own[k * per : (k + 1) * per])))
        for k, name in enumerate(TASK_NAMES)
    )


@dataclass(frozen=True)
class TaskDataConfig:
    """Sizes and noise of a task's splits (defaults: the paper's scale).

    Attributes:
      n_source: size of ``source_train``.
      target_fraction: ``target_train`` has ``round(target_fraction * n_source)`` examples; in
        ``(0, 1]``.
      n_val, n_test: sizes of ``val`` and ``test``.
      min_len, max_len: sequence lengths (``CLS`` included) are uniform on ``[min_len, max_len]``;
        arrays are padded to ``max_len``.
      max_cue_occurrences: a positive carries ``1..max_cue_occurrences`` cue tokens.
      label_noise: fraction of each class whose label is flipped, in ``[0, 0.5)``.
      surface_bias: in ``[0, 1]``; see the module docstring (source split only).
      decoy_rate: in ``[0, 1]``; see the module docstring (source split only).
    """

    n_source: int = 12_000
    target_fraction: float = 0.05
    n_val: int = 1_600
    n_test: int = 1_600
    min_len: int = 24
    max_len: int = 48
    max_cue_occurrences: int = 3
    label_noise: float = 0.15
    surface_bias: float = 0.0
    decoy_rate: float = 0.0

    @classmethod
    def quick(cls, **overrides) -> TaskDataConfig:
        """A much smaller scale (source 1600, target 80, val/test 200) for smoke runs."""
        base = dict(n_source=1_600, n_val=200, n_test=200, min_len=16, max_len=32)
        return cls(**{**base, **overrides})

    @property
    def n_target(self) -> int:
        return round(self.target_fraction * self.n_source)

    def __post_init__(self):
        if not 0.0 < self.target_fraction <= 1.0:
            raise QuarticError(
                f"target_fraction={self.target_fraction}: must lie in (0, 1] (the paper uses "
                "0.05); a target set of 0 examples cannot be fine-tuned on."
            )
        for name in ("n_source", "n_val", "n_test"):
            if getattr(self, name) < 2:
                raise QuarticError(f"{name}={getattr(self, name)}: need at least 2 examples.")
        if self.n_target < 2:
            raise QuarticError(
                f"target_fraction={self.target_fraction} of n_source={self.n_source} gives "
                f"{self.n_target} target examples; need at least 2 (one per class)."
            )
        if self.max_cue_occurrences < 1:
            raise QuarticError(
                f"max_cue_occurrences={self.max_cue_occurrences}: a positive needs >= 1 cue."
            )
        # Fillers never follow fillers, so a sequence of L - 1 words has >= ceil((L-1)/2) content
        # positions; they must be able to hold every cue occurrence.
        if not 2 * self.max_cue_occurrences + 1 <= self.min_len <= self.max_len:
            raise QuarticError(
                f"min_len={self.min_len}, max_len={self.max_len}: need "
                f"2 * max_cue_occurrences + 1 = {2 * self.max_cue_occurrences + 1} <= min_len "
                "<= max_len."
            )
        if not 0.0 <= self.label_noise < 0.5:
            raise QuarticError(f"label_noise={self.label_noise}: must lie in [0, 0.5).")
        for name in ("surface_bias", "decoy_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QuarticError(f"{name}={getattr(self, name)}: must lie in [0, 1].")


class TaskSplits(NamedTuple):
    """The four splits of one task, each ``{"tokens": int32[N, T], "labels": int32[N]}``."""

    source_train: dict
    target_train: dict
    val: dict
    test: dict


def _check_task(lang: Language, task: BiasTask) -> np.ndarray:
    cues = np.asarray(task.cue_concepts, dtype=np.int64)
    if cues.ndim != 1 or cues.shape[0] == 0:
        raise QuarticError(f"task {task.name!r}: the cue set is empty.")
    bad = cues[(cues < 0) | (cues >= lang.n_concepts)]
    if bad.shape[0]:
        raise QuarticError(
            f"task {task.name!r}: cue concepts {bad.tolist()} are outside the vocabulary's "
            f"concepts [0, {lang.n_concepts})."
        )
    if np.unique(cues).shape[0] != cues.shape[0]:
        raise QuarticError(f"task {task.name!r}: the cue set {task.cue_concepts} has repeats.")
    if cues.shape[0] >= lang.n_concepts:
        raise QuarticError(f"task {task.name!r}: every concept is a cue; leave some non-cue.")
    return cues


def _write_cues(
    lang: Language,
    rng: np.random.Generator,
    tokens: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    cues: np.ndarray,
    max_occ: int,
    form: str,
    surface_bias: float,
) -> None:
    """Overwrite ``1..max_occ`` random content positions of ``tokens[rows]`` with cue tokens.

    ``form``: "any" (privileged with probability ``surface_bias``, else any member) or
    "unprivileged" (decoys).
    """
    if rows.shape[0] == 0:
        return
    sub = tokens[rows]
    n, t = sub.shape
    positions = np.arange(t)[None, :]
    slot_ok = lang.is_content[sub] & (positions >= 1) & (positions < lengths[rows][:, None])
    keys = np.where(slot_ok, rng.random((n, t)), np.inf)
    order = np.argsort(keys, axis=1)
    k = rng.integers(1, max_occ + 1, size=n)
    concepts = cues[rng.integers(0, cues.shape[0], size=(n, max_occ))]
    uniform = _render(lang, rng, concepts)
    if form == "any":
        privileged = _render_subset(lang, rng, concepts, lang.is_privileged)
        forms = np.where(rng.random((n, max_occ)) < surface_bias, privileged, uniform)
    else:
        forms = _render_subset(lang, rng, concepts, ~lang.is_privileged & lang.is_content)
    for j in range(max_occ):
        write = k > j
        idx = np.flatnonzero(write)
        sub[idx, order[idx, j]] = forms[idx, j]
    tokens[rows] = sub


def _render_subset(
    lang: Language, rng: np.random.Generator, concepts: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """A uniformly random member of each concept's cluster among tokens with ``allowed[token]``."""
    max_size = int(lang.cluster_size.max())
    members = lang.cluster_start[concepts][..., None] + np.arange(max_size)
    in_cluster = np.arange(max_size) < lang.cluster_size[concepts][..., None]
    ok = in_cluster & allowed[np.minimum(members, lang.vocab_size - 1)]
    keys = np.where(ok, rng.random(ok.shape), np.inf)
    pick = np.argmin(keys, axis=-1)
    return np.take_along_axis(members, pick[..., None], axis=-1)[..., 0].astype(np.int32)


def _task_examples(
    lang: Language,
    cues: np.ndarray,
    cfg: TaskDataConfig,
    n: int,
    rng: np.random.Generator,
    surface_bias: float,
    decoy_rate: float,
) -> dict:
    t = cfg.max_len
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=n)
    tokens = np.concatenate(
        [np.full((n, 1), CLS, np.int32), _grammatical(lang, rng, n, t - 1)], axis=1
    )
    # Remove the task's own cues from the background: only inserted cues carry the label.
    non_cue = np.setdiff1d(np.arange(lang.n_concepts), cues)
    is_cue = np.isin(lang.concept_of[tokens], cues) & lang.is_content[tokens]
    replacement = _render(lang, rng, non_cue[rng.integers(0, non_cue.shape[0], size=(n, t))])
    tokens = np.where(is_cue, replacement, tokens).astype(np.int32)

    y = np.zeros((n,), np.int32)
    y[rng.permutation(n)[: n // 2]] = 1
    _write_cues(
        lang, rng, tokens, lengths, np.flatnonzero(y == 1), cues, cfg.max_cue_occurrences,
        "any", surface_bias,
    )  # fmt: skip
    if decoy_rate > 0.0:
        decoy = np.flatnonzero((y == 0) & (rng.random(n) < decoy_rate))
        _write_cues(
            lang, rng, tokens, lengths, decoy, cues, cfg.max_cue_occurrences, "unprivileged", 0.0
        )
    tokens = np.where(np.arange(t)[None, :] < lengths[:, None], tokens, PAD).astype(np.int32)

    labels = y.copy()
    for cls in (0, 1):
        members = np.flatnonzero(y == cls)
        n_flip = round(cfg.label_noise * members.shape[0])
        labels[rng.choice(members, size=n_flip, replace=False)] = 1 - cls
    return {"tokens": tokens, "labels": labels}


def make_task_splits(
    lang: Language, task: BiasTask, config: TaskDataConfig = TaskDataConfig(), seed: int = 0
) -> TaskSplits:
    """The four splits of ``task`` (deterministic in ``lang.config.seed``, ``task`` and ``seed``).

    Each split has its own random stream, so changing ``surface_bias``, ``decoy_rate`` or
    ``n_source`` leaves ``target_train``, ``val`` and ``test`` unchanged.
    """
    cues = _check_task(lang, task)
    name_key = zlib.crc32(task.name.encode())
    streams = np.random.SeedSequence([lang.config.seed, seed, name_key, *cues.tolist()]).spawn(4)
    rngs = [np.random.default_rng(s) for s in streams]
    sizes = (config.n_source, config.n_target, config.n_val, config.n_test)
    knobs = ((config.surface_bias, config.decoy_rate), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    splits = [
        _task_examples(lang, cues, config, n, rng, bias, decoy)
        for n, rng, (bias, decoy) in zip(sizes, rngs, knobs, strict=True)
    ]
    return TaskSplits(*splits)


def cue_present(lang: Language, task: BiasTask, tokens: np.ndarray) -> np.ndarray:
    """``bool[N]``: whether each sequence carries one of ``task``'s cue concepts (the noise-free
    label when ``decoy_rate == 0``)."""
    cues = _check_task(lang, task)
    tokens = np.asarray(tokens)
    return (np.isin(lang.concept_of[tokens], cues) & lang.is_content[tokens]).any(axis=1)
