"""Test configuration: exactness claims are made in float64, and silent promotion is an error."""

import os

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
FAST_FLAGS_ADDED = compile_cache.fast_compile_flags()
compile_cache.enable()


@pytest.fixture(scope="session")
def fast_flags_added() -> tuple[str, ...]:
    """The fast-compile flags this suite added to ``XLA_FLAGS`` (none that the caller named), for
    a subprocess that computes more than it compiles to drop again."""
    return FAST_FLAGS_ADDED


#: The suite's longest files, longest first (seconds in a suite run with two workers, 2 cores,
#: fresh caches, 2026-12-07, commit 3a9d3bb: benchmarks/suite_durations.py,
#: benchmarks/results/suite-durations-3a9d3bb.json). Run with ``-n 2 --dist loadfile``, pytest-xdist
#: hands each worker the next file in collection order whenever it runs short (pyproject's
#: ``--no-loadscope-reorder`` keeps this order instead of xdist's by-test-count one); starting with
#: the long files lets the many short ones even the two workers out at the end (by test count, one
#: worker ran 95 s longer).
LONGEST_FIRST = (
    "test_scaling.py",  # 293 s
    "test_notebooks.py",  # 176 s
    "test_collapse.py",  # 115 s
    "test_theory_chunked.py",  # 70 s
    "test_transfer_robustness.py",  # 44 s
    "test_diagnose.py",  # 36 s
    "test_scaling_report.py",  # 36 s
    "test_curvature.py",  # 35 s
    "test_aic.py",  # 31 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


@pytest.fixture(scope="session", autouse=True)
def quartic_cache(tmp_path_factory):
    """The suite's ``QUARTIC_CACHE``: one folder for the session, shared by its xdist workers (the
    parent of their temporary folders). Each θ* is trained once per suite run, by whichever test
    asks first; the library's checkpoint lock makes another worker asking meanwhile wait and read
    it (``make_aligned_model``). A θ* from an earlier run or a study is never read: the suite
    trains what it checks with the code under test. Commands the tests start inherit it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "quartic_cache"
    cache.mkdir(exist_ok=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("QUARTIC_CACHE", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(scope="session")
def theta_star_cache(quartic_cache):
    """The session's θ* cache (``$QUARTIC_CACHE/theta_star``, the library's default): the 2k
    aligned transformer is trained once, then read back by every test (and every notebook run,
    through ``QUARTIC_THETA_CACHE``) that needs it."""
    return quartic_cache / "theta_star"


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
