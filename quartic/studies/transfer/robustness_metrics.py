"""Robustness metrics of an attack, from its per-example results (docs/theory.md §5).

With ``N`` examples of which ``S`` were successfully attacked, ``F`` resisted the attack and the
rest were skipped (already misclassified):

* OAcc  = (S + F) / N               clean accuracy (exactly the attacked examples are correct);
* AUA   = F / N                     accuracy under attack;
* ASR   = S / (S + F)               attack success rate, skipped examples excluded;

so AUA = OAcc · (1 − ASR) holds as an identity between the counts. Also reported, as in
TextAttack: the mean number of queries over attacked examples (S + F), the mean percentage of
words perturbed over *successful* attacks, and the confidence margin ``mean |p(class 1) − 0.5|``
of the binary classifier, on clean inputs and after the attack (over all ``N``; a skipped
example keeps its clean probabilities).

A ratio whose denominator is empty (ASR with no correct example, % words with no success) is
``nan``; the counts in the same record say why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from quartic.core.errors import QuarticError
from quartic.studies.transfer.attack import FAILED, SKIPPED, SUCCEEDED, AttackResult

__all__ = ["RobustnessMetrics", "robustness_metrics"]


@dataclass(frozen=True)
class RobustnessMetrics:
    """Counts and rates of one attack run (see the module docstring for the formulas)."""

    n_examples: int
    n_skipped: int
    n_succeeded: int
    n_failed: int
    clean_accuracy: float
    accuracy_under_attack: float
    attack_success_rate: float
    mean_queries: float
    pct_words_perturbed: float
    margin_clean: float
    margin_attacked: float

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def robustness_metrics(result: AttackResult) -> RobustnessMetrics:
    """OAcc, AUA, ASR, mean queries, % words perturbed and confidence margins of ``result``."""
    status = np.asarray(result.status)
    if status.ndim != 1 or status.shape[0] == 0:
        raise QuarticError(f"result.status must be a non-empty [N] array; got {status.shape}.")
    unknown = np.setdiff1d(status, [SKIPPED, SUCCEEDED, FAILED])
    if unknown.shape[0]:
        raise QuarticError(f"result.status holds unknown codes {unknown.tolist()}.")
    clean_probs = np.asarray(result.clean_probs, np.float64)
    adv_probs = np.asarray(result.adv_probs, np.float64)
    if clean_probs.shape != (status.shape[0], 2) or adv_probs.shape != clean_probs.shape:
        raise QuarticError(
            "the confidence margin |p - 0.5| is defined for binary classifiers: probabilities "
            f"must be [N, 2]; got {list(clean_probs.shape)} and {list(adv_probs.shape)}."
        )
    n = status.shape[0]
    succeeded = status == SUCCEEDED
    attacked = succeeded | (status == FAILED)
    n_succ, n_att = int(succeeded.sum()), int(attacked.sum())
    queries = np.asarray(result.queries, np.float64)
    frac = np.asarray(result.n_perturbed, np.float64) / np.maximum(
        np.asarray(result.n_words, np.float64), 1.0
    )
    return RobustnessMetrics(
        n_examples=n,
        n_skipped=n - n_att,
        n_succeeded=n_succ,
        n_failed=n_att - n_succ,
        clean_accuracy=n_att / n,
        accuracy_under_attack=(n_att - n_succ) / n,
        attack_success_rate=_ratio(n_succ, n_att),
        mean_queries=_ratio(queries[attacked].sum(), n_att),
        pct_words_perturbed=_ratio(100.0 * frac[succeeded].sum(), n_succ),
        margin_clean=float(np.abs(clean_probs[:, 1] - 0.5).mean()),
        margin_attacked=float(np.abs(adv_probs[:, 1] - 0.5).mean()),
    )
