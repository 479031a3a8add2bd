"""Test configuration: exactness claims are made in float64, and silent promotion is an error."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Imported after the switches above, so that nothing quartic builds at import sees other settings.
from quartic.harness import compile_cache  # noqa: E402

# The suite is mostly compiling: XLA:CPU's faster-compiling settings, the older fusion emitters
# and LLVM at -O0 (before JAX starts its backend; inherited by the notebooks and commands the tests
# run in subprocesses). The assertions are the same under any setting; a flag that XLA_FLAGS
# already names keeps the caller's value (XLA_FLAGS=--xla_cpu_use_fusion_emitters=true keeps XLA's
# default emitters). Compiled programs are kept between runs of the suite, as for the `quartic`
# command.
compile_cache.fast_compile_flags()
compile_cache.enable()


#: The suite's longest files, longest first (seconds in a suite run with two workers, 2 cores,
#: fresh caches, 2026-12-06: benchmarks/suite_durations.py, its -O0 run in
#: benchmarks/results/suite-durations-cpu-2core.json). Run with ``-n 2 --dist loadfile``, pytest-xdist hands each worker the
#: next file in collection order whenever it runs short (pyproject's ``--no-loadscope-reorder``
#: keeps this order instead of xdist's by-test-count one); starting with the long files lets the
#: many short ones even the two workers out at the end (by test count, one worker ran 95 s longer).
LONGEST_FIRST = (
    "test_scaling.py",  # 177 s
    "test_notebooks.py",  # 156 s
    "test_collapse.py",  # 91 s
    "test_alignment_pipeline.py",  # 62 s
    "test_theory_chunked.py",  # 40 s
    "test_diagnose.py",  # 31 s
    "test_curvature.py",  # 27 s
    "test_transfer_robustness.py",  # 26 s
    "test_aic.py",  # 26 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


@pytest.fixture(scope="session")
def theta_star_cache(tmp_path_factory):
    """One θ* cache for the session: the 2k aligned transformer is trained once, then read back by
    every test (and every notebook run, through ``QUARTIC_THETA_CACHE``) that needs it."""
    return tmp_path_factory.mktemp("theta_star")


@pytest.fixture(scope="session")
def aligned_2k(theta_star_cache):
    """``(world, aligned)``: the token world (seed 0) and its 2,184-parameter float64 θ*."""
    from quartic.models import TransformerConfig
    from quartic.studies.training import make_aligned_model
    from quartic.tasks import token_world as tw

    world = tw.TokenWorld(tw.WorldConfig(seed=0))
    cfg = TransformerConfig.preset(
        "2k", vocab_size=world.vocab_size, seq_len=world.config.seq_len, param_dtype="float64"
    )
    aligned = make_aligned_model(cfg, world, seed=0, cache_dir=theta_star_cache, progress=False)
    return world, aligned
