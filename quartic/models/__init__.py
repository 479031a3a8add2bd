"""Models: a small flax-nnx transformer (LM or classifier head) with LoRA and a pure view."""

from quartic.models.transformer import (
    PRESETS,
    BaseParam,
    LoRAParam,
    Transformer,
    TransformerConfig,
    count_params,
    functional,
    merge_params,
    update_params,
)

__all__ = [
    "PRESETS",
    "BaseParam",
    "LoRAParam",
    "Transformer",
    "TransformerConfig",
    "count_params",
    "functional",
    "merge_params",
    "update_params",
]
