"""Transfer learning and adversarial robustness in miniature (docs/theory.md §5; Turbal et al.,
arXiv:2501.00066): pretrain, fine-tune directly or through a source task, attack, and the bridge to
the AIC of the first paper. All on the project's own :class:`~quartic.models.transformer.Transformer`
and the synonym language of :mod:`quartic.tasks.synonyms`. One module per job:

* :mod:`~quartic.studies.transfer.models` — :func:`model_config`, one model size (a preset,
  ``"2k"`` … ``"1m"``, sized for the pooled 2-way classifier) in one of two architectures
  (:data:`ARCHS`): ``"decoder"`` (causal attention, the classifier pools the last non-PAD position)
  and ``"encoder"`` (bidirectional, mean pooling); the language-model variant has the same body and
  a ``[vocab]`` head. :func:`carry_body` carries a pretrained body (every weight but the head) into
  a classifier with a fresh 2-way head; :func:`merge_lora` folds LoRA adapters into the base
  kernels, so the attack and the evaluation see an adapted model as a plain one;
  :func:`save_params` / :func:`load_params` keep stacks of seeds as checkpoints.
* :mod:`~quartic.studies.transfer.trainer` — the objectives (``"lm"``, ``"mlm"``, ``"clf"``) and
  :func:`fit`, ``M`` models in one jitted, vmapped ``lax.scan`` with the best checkpoint by
  validation loss; :func:`predict`.
* :mod:`~quartic.studies.transfer.attack` — the batched A2T synonym attack;
  :mod:`~quartic.studies.transfer.robustness_metrics` — OAcc, AUA, ASR and the rest from its raw
  per-example results; :mod:`~quartic.studies.transfer.evaluate` — :func:`attack_models`, the
  attack vmapped over ``M`` models, and :func:`budget_is_unlimited`.
* :mod:`~quartic.studies.transfer.baseline` — :func:`bow_logistic`, a bag-of-words logistic
  regression fitted exactly, to put the transformers' clean accuracy in scale, and
  :func:`feature_logistic`, the same fit on fixed features (a linear probe of a frozen body).
* :mod:`~quartic.studies.transfer.bridge` — :func:`robustness_geometry`: sharpness, overlap and
  coupling of the robustness loss at the start of the target fine-tune (the AIC quantities).
* :mod:`~quartic.studies.transfer.pipeline` — the whole study as resumable units (pretrain,
  source, direct and transfer fine-tunes, attacks, baseline, bridge) and
  :mod:`~quartic.studies.transfer.summary` — ΔOAcc and ΔASR per cell, the size trend and the
  bridge's correlations; ``experiments/transfer_robustness.py`` runs them.
"""

from quartic.studies.transfer.baseline import BowResult, bow_logistic, feature_logistic
from quartic.studies.transfer.bridge import robustness_geometry, synonym_rewrite
from quartic.studies.transfer.evaluate import attack_models, budget_is_unlimited
from quartic.studies.transfer.models import (
    ARCHS,
    carry_body,
    init_params,
    load_params,
    merge_lora,
    model_config,
    save_params,
    stack,
    unstack,
)
from quartic.studies.transfer.trainer import OBJECTIVES, FitConfig, FitResult, fit, predict

__all__ = [
    "ARCHS",
    "OBJECTIVES",
    "BowResult",
    "FitConfig",
    "FitResult",
    "attack_models",
    "bow_logistic",
    "feature_logistic",
    "budget_is_unlimited",
    "carry_body",
    "fit",
    "init_params",
    "load_params",
    "merge_lora",
    "model_config",
    "predict",
    "robustness_geometry",
    "save_params",
    "stack",
    "synonym_rewrite",
    "unstack",
]
