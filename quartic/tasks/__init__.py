"""Tasks: the synthetic token world (pretraining, alignment skills, fine-tuning tasks, metrics)."""

from quartic.tasks.token_world import (
    BENIGN_TASKS,
    HARMFUL_FORMATS,
    REFUSE,
    TokenWorld,
    WorldConfig,
    accuracy,
    answer_logits,
    exact_match,
    first_answer_position,
    harmfulness_rate,
    joint_logits,
    kl_to_reference,
    lm_loss,
    refusal_loss,
)

__all__ = [
    "BENIGN_TASKS",
    "HARMFUL_FORMATS",
    "REFUSE",
    "TokenWorld",
    "WorldConfig",
    "accuracy",
    "answer_logits",
    "exact_match",
    "first_answer_position",
    "harmfulness_rate",
    "joint_logits",
    "kl_to_reference",
    "lm_loss",
    "refusal_loss",
]
