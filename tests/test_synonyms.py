"""The synthetic language with synonyms and its three bias tasks."""

from __future__ import annotations

import numpy as np
import pytest

from quartic.core.errors import QuarticError
from quartic.tasks.synonyms import (
    CLS,
    PAD,
    TASK_NAMES,
    BiasTask,
    LanguageConfig,
    TaskDataConfig,
    bias_tasks,
    cue_present,
    make_language,
    make_task_splits,
    pretrain_corpus,
)


@pytest.fixture(scope="module")
def lang():
    return make_language(LanguageConfig())


@pytest.fixture(scope="module")
def tasks(lang):
    return bias_tasks(lang)


def test_language_is_deterministic_per_seed():
    a, b = make_language(LanguageConfig(seed=4)), make_language(LanguageConfig(seed=4))
    for field in ("concept_of", "is_privileged", "transition", "filler_given_concept"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = make_language(LanguageConfig(seed=5))
    assert a.vocab_size != c.vocab_size or (a.concept_of != c.concept_of).any()
    np.testing.assert_array_equal(pretrain_corpus(a, 8, 16, 1), pretrain_corpus(b, 8, 16, 1))
    assert (pretrain_corpus(a, 8, 16, 1) != pretrain_corpus(a, 8, 16, 2)).any()


def test_clusters_partition_the_content_vocabulary(lang):
    cfg = lang.config
    v = lang.vocab_size
    kinds = lang.is_special.astype(int) + lang.is_stop.astype(int) + lang.is_content.astype(int)
    assert (kinds == 1).all()  # special, stop and content partition the vocabulary
    assert lang.is_special[[PAD, CLS]].all() and lang.is_stop.sum() == cfg.n_stop
    clusters = [lang.cluster(c) for c in range(cfg.n_concepts)]
    members = np.concatenate(clusters)
    np.testing.assert_array_equal(np.sort(members), np.flatnonzero(lang.is_content))
    assert members.shape[0] == np.unique(members).shape[0]  # disjoint
    sizes = np.array([c.shape[0] for c in clusters])
    assert sizes.min() >= cfg.min_synonyms and sizes.max() <= cfg.max_synonyms
    assert 40 <= cfg.n_concepts <= 80 and sizes.min() < sizes.max()

    table = lang.candidates
    assert table.shape == (v, cfg.max_synonyms - 1) and table.dtype == np.int32
    assert (table[~lang.is_content] == -1).all()
    for c, cluster in enumerate(clusters):
        privileged = lang.is_privileged[cluster].sum()
        assert privileged == max(1, cluster.shape[0] // 2)
        for tok in cluster:
            mates = lang.synonyms_of(int(tok))
            assert tok not in mates and set(mates.tolist()) | {tok} == set(cluster.tolist())
            assert (lang.concept_of[mates] == c).all()
            row = table[tok]
            np.testing.assert_array_equal(row[row >= 0], mates)
            assert (row[mates.shape[0] :] == -1).all()
    assert lang.synonyms_of(CLS).shape == (0,) and lang.synonyms_of(2).shape == (0,)
    with pytest.raises(QuarticError, match="outside the vocabulary"):
        lang.synonyms_of(v)


def test_synonyms_share_contexts_in_the_pretraining_corpus(lang):
    corpus = pretrain_corpus(lang, 20_000, 64, seed=0)
    assert corpus.dtype == np.int32 and (corpus[:, 0] == CLS).all()
    assert not np.isin(corpus[:, 1:], [PAD, CLS]).any()
    prev, nxt = corpus[:, :-1].ravel(), corpus[:, 1:].ravel()
    # What follows a token, at the level of concepts (fillers are their own categories).
    follow = np.where(lang.concept_of[nxt] >= 0, lang.concept_of[nxt], lang.n_concepts + nxt)

    def next_dist(tok):
        h = np.bincount(follow[prev == tok], minlength=lang.n_concepts + lang.vocab_size)
        return h / h.sum()

    def tv(p, q):
        return 0.5 * np.abs(p - q).sum()

    same, other = [], []
    for c in range(lang.n_concepts):
        cluster = lang.cluster(c)
        first = next_dist(cluster[0])
        same.append(tv(first, next_dist(cluster[1])))
        other.append(tv(first, next_dist(lang.cluster((c + 1) % lang.n_concepts)[0])))
    # Synonyms: the same context distribution up to sampling noise; other concepts: different.
    assert max(same) < 0.15 and min(other) > 0.4, (max(same), min(other))


def test_tasks_cue_sets_partly_shared(lang, tasks):
    assert tuple(t.name for t in tasks) == TASK_NAMES
    sets = [set(t.cue_concepts) for t in tasks]
    for i in range(3):
        assert len(sets[i]) == 6 and all(0 <= c < lang.n_concepts for c in sets[i])
        for j in range(i + 1, 3):
            assert len(sets[i] & sets[j]) == 2  # shared, but not equal
    assert bias_tasks(lang) == tasks and bias_tasks(lang, seed=1) != tasks


def test_split_sizes_balance_noise_and_format(lang, tasks):
    splits = make_task_splits(lang, tasks[0], TaskDataConfig())
    sizes = {k: v["tokens"].shape[0] for k, v in splits._asdict().items()}
    assert sizes == {"source_train": 12_000, "target_train": 600, "val": 1_600, "test": 1_600}
    for split in splits:
        tokens, labels = split["tokens"], split["labels"]
        n = labels.shape[0]
        assert tokens.dtype == np.int32 and labels.dtype == np.int32 and tokens.shape[1] == 48
        assert labels.sum() == n // 2  # balanced exactly
        # Label noise: exactly round(0.15 * n/2) flips per class, against the cue-presence label.
        clean = cue_present(lang, tasks[0], tokens)
        assert clean.sum() == n // 2
        assert (clean != labels).sum() == 2 * round(0.15 * (n // 2))
        # CLS first, PAD only as a right tail, lengths in [min_len, max_len].
        assert (tokens[:, 0] == CLS).all()
        lengths = (tokens != PAD).sum(axis=1)
        assert lengths.min() >= 24 and lengths.max() <= 48
        assert (tokens[np.arange(48)[None, :] >= lengths[:, None]] == PAD).all()
        assert not (tokens[:, 1:] == CLS).any()
    quick = make_task_splits(lang, tasks[1], TaskDataConfig.quick())
    assert [s["labels"].shape[0] for s in quick] == [1_600, 80, 200, 200]


def test_splits_deterministic_per_seed_and_task(lang, tasks):
    cfg = TaskDataConfig.quick()
    a = make_task_splits(lang, tasks[0], cfg, seed=0)
    b = make_task_splits(lang, tasks[0], cfg, seed=0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert (make_task_splits(lang, tasks[0], cfg, seed=1).test["tokens"] != a.test["tokens"]).any()
    assert (make_task_splits(lang, tasks[1], cfg, seed=0).test["tokens"] != a.test["tokens"]).any()


def test_label_noise_zero_means_labels_are_cue_presence(lang, tasks):
    splits = make_task_splits(lang, tasks[2], TaskDataConfig.quick(label_noise=0.0))
    for split in splits:
        np.testing.assert_array_equal(split["labels"], cue_present(lang, tasks[2], split["tokens"]))


def cue_tokens(lang, task, tokens):
    is_cue = np.isin(lang.concept_of[tokens], task.cue_concepts) & lang.is_content[tokens]
    return tokens[is_cue]


def test_surface_bias_acts_on_the_source_split_only(lang, tasks):
    task = tasks[0]
    base = make_task_splits(lang, task, TaskDataConfig.quick(label_noise=0.0))
    biased = make_task_splits(lang, task, TaskDataConfig.quick(label_noise=0.0, surface_bias=1.0))
    for name in ("target_train", "val", "test"):
        x, y = getattr(base, name), getattr(biased, name)
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    src = biased.source_train
    cues = cue_tokens(lang, task, src["tokens"][src["labels"] == 1])
    assert cues.shape[0] > 800 and lang.is_privileged[cues].all()
    assert cue_tokens(lang, task, src["tokens"][src["labels"] == 0]).shape[0] == 0
    # At 0, cue forms are uniform over each cluster: the privileged share matches its expectation.
    src = base.source_train
    cues = cue_tokens(lang, task, src["tokens"][src["labels"] == 1])
    share = lang.is_privileged[cues].mean()
    sizes = lang.cluster_size[lang.concept_of[cues]]
    expected = np.mean(np.maximum(1, sizes // 2) / sizes)
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / cues.shape[0])
    assert not lang.is_privileged[cues].all()


def test_decoys_are_unprivileged_cues_in_source_negatives(lang, tasks):
    task = tasks[1]
    cfg = TaskDataConfig.quick(label_noise=0.0, surface_bias=1.0, decoy_rate=1.0)
    src = make_task_splits(lang, task, cfg).source_train
    negatives = src["tokens"][src["labels"] == 0]
    per_example = [cue_tokens(lang, task, row) for row in negatives]
    assert all(c.shape[0] >= 1 and not lang.is_privileged[c].any() for c in per_example)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_fraction": 0.0}, "target_fraction"),
        ({"target_fraction": -0.1}, "target_fraction"),
        ({"target_fraction": 1.5}, "target_fraction"),
        ({"target_fraction": 1e-5}, "target examples"),
        ({"label_noise": 0.5}, "label_noise"),
        ({"surface_bias": 1.2}, "surface_bias"),
        ({"decoy_rate": -0.1}, "decoy_rate"),
        ({"n_val": 1}, "n_val"),
        ({"min_len": 6}, "min_len"),
        ({"max_cue_occurrences": 0}, "max_cue_occurrences"),
    ],
)
def test_bad_task_config_raises(kwargs, name):
    with pytest.raises(QuarticError, match=name):
        TaskDataConfig(**kwargs)


def test_bad_language_and_tasks_raise(lang):
    with pytest.raises(QuarticError, match="min_synonyms"):
        LanguageConfig(min_synonyms=1)
    with pytest.raises(QuarticError, match="branching"):
        LanguageConfig(branching=0)
    with pytest.raises(QuarticError, match="outside the vocabulary"):
        make_task_splits(lang, BiasTask("x", (3, lang.n_concepts)), TaskDataConfig.quick())
    with pytest.raises(QuarticError, match="empty"):
        make_task_splits(lang, BiasTask("x", ()), TaskDataConfig.quick())
    with pytest.raises(QuarticError, match="repeats"):
        make_task_splits(lang, BiasTask("x", (3, 3)), TaskDataConfig.quick())
    with pytest.raises(QuarticError, match="n_shared"):
        bias_tasks(lang, n_cues=3, n_shared=3)
    with pytest.raises(QuarticError, match="non-cue"):
        bias_tasks(lang, n_cues=30, n_shared=1)
