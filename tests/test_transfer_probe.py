"""The pretraining probe on embeddings whose structure is known: synonyms placed at their concept's
point (both measures exactly 1), the same tables with the concepts shuffled (near chance), and the
errors for tables that do not fit the language."""

import numpy as np
import pytest

from quartic.core.errors import QuarticError
from quartic.studies.transfer import probe
from quartic.tasks import synonyms as syn

LANG = syn.make_language(syn.LanguageConfig())


def _table(concept_of: np.ndarray, noise: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(LANG.n_concepts, 48))
    emb = rng.normal(size=(LANG.vocab_size, 48))
    content = concept_of >= 0
    emb[content] = points[concept_of[content]] + noise * emb[content]
    return {"token_embed": emb}


def test_synonyms_at_their_concept_point_are_found_exactly():
    r = probe.embedding_probe(_table(LANG.concept_of, noise=0.01), LANG)
    assert r["synonym_nn_rate"] == 1.0
    assert r["concept_probe_heldout_accuracy"] == 1.0
    assert r["concept_probe_heldout_tokens"] == int(np.sum(LANG.cluster_size >= 2))
    assert r["concept_probe_chance"] == pytest.approx(1 / LANG.n_concepts)


def test_shuffled_concepts_fall_to_chance():
    shuffled = LANG.concept_of.copy()
    content = shuffled >= 0
    shuffled[content] = np.random.default_rng(1).permutation(shuffled[content])
    r = probe.embedding_probe(_table(shuffled, noise=0.01), LANG)
    # the table clusters tokens that are not synonyms: no signal left about the real clusters
    assert r["synonym_nn_rate"] < 5 * r["synonym_nn_chance"] + 0.05
    assert r["concept_probe_heldout_accuracy"] < 0.2


def test_probe_models_reports_both_arms_per_seed():
    good, bad = _table(LANG.concept_of, 0.01), _table(LANG.concept_of, 100.0)
    out = probe.probe_models([good, good], [bad, bad], LANG)
    assert out["pretrained"]["concept_probe_heldout_accuracy"] == [1.0, 1.0]
    assert out["pretrained"]["mean"]["synonym_nn_rate"] == 1.0
    assert out["init"]["mean"]["concept_probe_heldout_accuracy"] < 0.5


def test_tables_that_do_not_fit_the_language_are_refused():
    with pytest.raises(QuarticError, match="token_embed"):
        probe.embedding_probe({"embed": np.zeros((3, 2))}, LANG)
    with pytest.raises(QuarticError, match="rows"):
        probe.embedding_probe({"token_embed": np.zeros((3, 2))}, LANG)
