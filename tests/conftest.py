"""Test configuration: exactness claims are made in float64, and silent promotion is an error."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Imported after the switches above, so that nothing quartic builds at import sees other settings.
from quartic.harness import compile_cache  # noqa: E402

# Compiled programs are kept between runs of the suite, as for the `quartic` command.
compile_cache.enable()
