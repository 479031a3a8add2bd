"""What pretraining gives: probes of the token embeddings against the language's synonym clusters,
and of the pooled features against the tasks.

Two measurements on the embedding table ``E [V, d]`` (``params["token_embed"]``), restricted to
content tokens:

- **synonym neighbours**: the share of content tokens whose nearest other content token (cosine)
  is a synonym, against the chance rate ``mean_t (|cluster(t)| − 1) / (n_content − 1)``;
- **concept probe**: a linear probe of concept identity that must generalise across surface forms.
  One member of each cluster (of two or more) is held out by a seeded draw; the other members'
  centred, unit-norm embeddings give each concept its mean, and a held-out token is assigned the
  concept of the nearest mean by cosine (a linear classifier with no parameter to tune). Chance
  is ``1 / n_concepts``. It succeeds only
  if the embedding puts synonyms in a shared linear region: the synonym structure pretraining is
  meant to teach.

:func:`embedding_probe` runs both on one parameter set; :func:`probe_models` on every seed of a
(size, arch) and on the same models at initialisation, the baseline that says what pretraining
added.

A body can cluster synonyms and still not make a task readable: :func:`task_probe` fits a linear
probe of a task on the pooled features the classifier head reads. The encoders of the transfer
study reach the concept probe's 0.97 while their task probe stays below word counts
(``benchmarks/transfer_layer_probe.py``, docs/results.md), so the task probe, not the concept
probe, says whether pretraining has given a body what fine-tuning needs.
"""

from __future__ import annotations

import jax
import numpy as np

from quartic.core.cache import memo
from quartic.core.errors import QuarticError
from quartic.studies.transfer import baseline
from quartic.studies.transfer.models import _model_fns
from quartic.tasks import synonyms as syn

SPLITS = ("train", "val", "test")


def _features(params: dict) -> np.ndarray:
    if "token_embed" not in params:
        raise QuarticError(
            f"params hold no 'token_embed' table (keys: {sorted(params)}); pass a transformer's params"
        )
    return np.asarray(params["token_embed"], np.float64)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def embedding_probe(params: dict, lang: syn.Language, seed: int = 0) -> dict:
    """Synonym-neighbour rate and held-out-synonym concept-probe accuracy of one model."""
    emb = _features(params)
    if emb.shape[0] != lang.vocab_size:
        raise QuarticError(
            f"embedding table has {emb.shape[0]} rows, the language {lang.vocab_size} tokens"
        )
    content = np.flatnonzero(lang.is_content)
    concept = lang.concept_of[content]
    x = _unit_rows(emb[content] - emb[content].mean(0))

    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argmax(sim, axis=1)
    size = lang.cluster_size[concept]
    nn_rate = float(np.mean(concept[nearest] == concept))
    nn_chance = float(np.mean((size - 1) / (content.size - 1)))

    rng = np.random.default_rng(seed)
    held = np.zeros(content.size, bool)
    for c in range(lang.n_concepts):
        members = np.flatnonzero(concept == c)
        if members.size >= 2:
            held[rng.choice(members)] = True
    means = _unit_rows(
        np.stack([x[~held & (concept == c)].mean(0) for c in range(lang.n_concepts)])
    )
    pred = np.argmax(x[held] @ means.T, axis=1)
    return {
        "synonym_nn_rate": nn_rate,
        "synonym_nn_chance": nn_chance,
        "concept_probe_heldout_accuracy": float(np.mean(pred == concept[held])),
        "concept_probe_chance": 1.0 / lang.n_concepts,
        "concept_probe_heldout_tokens": int(held.sum()),
    }


def probe_models(pretrained: list[dict], initial: list[dict], lang: syn.Language) -> dict:
    """:func:`embedding_probe` of each seed's pretrained model and of its initialisation; per key,
    the per-seed values and their mean."""
    out = {}
    for arm, plist in (("pretrained", pretrained), ("init", initial)):
        runs = [embedding_probe(p, lang, seed=i) for i, p in enumerate(plist)]
        out[arm] = {k: [r[k] for r in runs] for k in runs[0]}
        out[arm]["mean"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    return out


@memo(maxsize=64)
def _jitted_features(cfg):
    """One jitted ``features`` per config, so the study's many probes of one body trace it once."""
    return jax.jit(_model_fns(cfg).features)


def probe_accuracies(features, params_list: list[dict], data: dict) -> np.ndarray:
    """Test accuracy of a linear probe (:func:`~quartic.studies.transfer.baseline.
    feature_logistic`, L2 chosen on ``data["val"]``, fitted on ``data["train"]``) of
    ``features(params, tokens)`` for each parameter set: ``[n_sets]`` when the features are
    ``[B, D]``, ``[n_sets, L]`` when they are ``[L, B, D]`` (one probe per leading index, e.g.
    each depth of ``Transformer.layer_features``). ``data`` maps ``"train"``, ``"val"``,
    ``"test"`` to ``{"tokens", "labels"}``."""
    if set(data) != set(SPLITS):
        raise QuarticError(f"a probe needs the splits {SPLITS}, got {sorted(data)}")
    labels = {k: np.asarray(data[k]["labels"]) for k in SPLITS}
    out = []
    for params in params_list:
        feats = {k: np.asarray(features(params, data[k]["tokens"]), np.float64) for k in SPLITS}
        stacked = feats["train"].ndim == 3
        views = range(feats["train"].shape[0]) if stacked else [None]
        accs = [
            baseline.feature_logistic(
                {k: f if j is None else f[j] for k, f in feats.items()}, labels
            ).test_accuracy
            for j in views
        ]
        out.append(accs if stacked else accs[0])
    return np.asarray(out, np.float64)


def task_probe(cfg, params_list: list[dict], data: dict) -> dict:
    """What a frozen body holds of a task: :func:`probe_accuracies` of the pooled features the
    classifier head reads (``cfg`` a classifier config, its ``pooling``); the test accuracy of
    each parameter set and their mean."""
    accs = probe_accuracies(_jitted_features(cfg), params_list, data)
    return {"seeds": accs.tolist(), "mean": float(np.mean(accs))}
