"""Models: a small flax-nnx transformer (LM or classifier head) with LoRA and a pure view."""

from quartic.models.transformer import *  # noqa: F403  (the names of transformer.__all__)
from quartic.models.transformer import __all__  # noqa: F401
