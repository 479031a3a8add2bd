"""The shared measurements: crossing times (each interpolation, never = inf), statistics, spectra."""

import math
import platform
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from quartic.core import measure
from quartic.core.errors import QuarticError


def test_crossing_time_interpolates_on_each_scale():
    t = np.array([1.0, 2.0, 4.0])
    v = np.array([1.0, 4.0, 16.0])  # v = t²
    assert measure.crossing_time(t, v, 2.5) == pytest.approx(1.5)
    # log-log: a power law is crossed exactly where it reaches the level
    assert measure.crossing_time(t, v, 8.0, scale="log") == pytest.approx(math.sqrt(8.0), rel=1e-14)
    # geometric in t, linear in v: halfway in v between 4 and 16 is √(2·4)
    assert measure.crossing_time(t, v, 10.0, scale="log_t") == pytest.approx(math.sqrt(8.0))
    for scale in ("linear", "log_t", "log"):
        assert measure.crossing_time(t, v, 0.5, scale=scale) == 1.0  # already there
        assert measure.crossing_time(t, v, 17.0, scale=scale) == math.inf  # never
    with pytest.raises(QuarticError, match="scale"):
        measure.crossing_time(t, v, 2.0, scale="cubic")


def test_rising_crossing_waits_for_an_upward_pass():
    t = np.arange(1.0, 6.0)
    v = np.array([5.0, 1.0, 2.0, 6.0, 7.0])
    assert measure.crossing_time(t, v, 4.0) == 1.0
    assert measure.crossing_time(t, v, 4.0, rising=True) == pytest.approx(3.5)
    assert measure.first_index_at_or_above([np.nan, 5.0], 4.0, rising=True) is None
    assert measure.finite_or(math.inf, None) is None and measure.finite_or(2.0, None) == 2.0


def test_time_to_threshold_bisects_to_the_root():
    assert measure.time_to_threshold(lambda s: s**4, 16.0, t_max=10.0) == pytest.approx(
        2.0, rel=1e-12
    )
    assert measure.time_to_threshold(lambda s: s**4, 1e9, t_max=10.0) == math.inf


def test_statistics():
    assert measure.spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    assert math.isnan(measure.spearman([1, 2, 3], [5, 5, 5]))
    lo, hi = measure.bootstrap_spearman(np.arange(20.0), np.arange(20.0) ** 3, num=50)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    s = measure.mean_std([1.0, None, 3.0])
    assert s == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert measure.mean_std([1.0, 3.0], ddof=0, extremes=True)["std"] == pytest.approx(1.0)
    assert measure.mean_std([None])["mean"] is None


def test_effective_rank_and_fisher_norm():
    assert measure.effective_rank(jnp.array([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert measure.effective_rank(jnp.array([1.0, 0.0])) == pytest.approx(1.0)
    from quartic.studies.diagnose import curvature_rank_report  # the same definition, clipped

    rep = curvature_rank_report(np.array([2.0, 2.0, -1e-12]), trace=4.0)
    assert rep["effective_rank"] == pytest.approx(2.0) and rep["share_top"][1] == 0.5
    basis = jnp.eye(3)[:, :2]
    lam = jnp.array([4.0, -1.0])  # a negative eigenvalue contributes nothing
    v = jnp.array([1.0, 5.0, 7.0])
    assert float(measure.fisher_norm(lam, basis, v)) == pytest.approx(2.0)
    np.testing.assert_allclose(measure.fisher_coords(lam, basis, v), [2.0, 0.0])


def test_bounded_cache_evicts_the_least_recently_used():
    from quartic.core.cache import BoundedCache

    c = BoundedCache(2)
    built = []
    c.get("a", lambda: built.append("a") or 1)
    c.get("b", lambda: built.append("b") or 2)
    assert c.get("a", lambda: built.append("a!") or 0) == 1  # kept, and now the most recent
    c["c"] = 3  # drops b
    assert "b" not in c and "a" in c and len(c) == 2
    assert built == ["a", "b"]
    with pytest.raises(QuarticError, match="maxsize"):
        BoundedCache(0)


def test_clear_all_empties_every_registered_cache_and_memo():
    import jax

    from quartic.core.cache import BoundedCache, clear_all, memo

    calls = []

    @memo(maxsize=4)
    def square(x):
        calls.append(x)
        return x * x

    c = BoundedCache(3)
    c["k"] = jax.jit(lambda x: x + 1)
    assert square(3) == 9 and square(3) == 9 and calls == [3]
    clear_all()
    assert len(c) == 0 and square.cache_info().currsize == 0
    assert square(3) == 9 and calls == [3, 3]  # computed again after the clear
    with pytest.raises(QuarticError, match="maxsize"):
        memo(0)


def test_release_programs_drops_compiled_programs_and_keeps_the_memos():
    """A jitted helper kept in a BoundedCache and a memo's entry survive release_programs; the
    helper's compiled program does not (it compiles again when called, to the same value)."""
    import jax
    import jax.numpy as jnp

    from quartic.core.cache import BoundedCache, memo, release_programs

    @memo(maxsize=4)
    def table(k):
        return k * 10

    c = BoundedCache(2)
    f = c.get("plus", lambda: jax.jit(lambda x: jnp.sin(x) + 1))
    x = jnp.arange(3.0)
    first = f(x)
    assert f._cache_size() == 1 and table(2) == 20
    release_programs()
    assert f._cache_size() == 0
    assert len(c) == 1 and table.cache_info().currsize == 1
    np.testing.assert_array_equal(c["plus"](x), first)
    assert f._cache_size() == 1


def test_average_ranks_match_their_definition_row_by_row():
    """Each element's rank is the mean of the 0-based positions its value takes in sorted order:
    (number of smaller elements + number of elements not larger − 1) / 2."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, (40, 17)).astype(float)  # many ties
    less = (a[:, :, None] > a[:, None, :]).sum(-1)
    leq = (a[:, :, None] >= a[:, None, :]).sum(-1)
    np.testing.assert_array_equal(measure.average_ranks(a), (less + leq - 1) / 2)
    np.testing.assert_array_equal(measure.average_ranks(a[0]), (less[0] + leq[0] - 1) / 2)


@pytest.mark.parametrize("n", [2, 7, 18, 60])
def test_bootstrap_spearman_equals_resampling_spearman_one_by_one(n):
    """All resamples ranked at once give bootstrap_interval's interval over spearman of each
    resample, bit for bit (the same draws; np.corrcoef's arithmetic on exact centred ranks), with
    ties and constant resamples (dropped) among them; and spearman equals np.corrcoef of the ranks."""
    rng = np.random.default_rng(n)
    x, y = rng.integers(0, 4, n).astype(float), rng.normal(size=n)
    y[: n // 2] = 1.0
    one_by_one = measure.bootstrap_interval(
        lambda i: measure.spearman(x[i], y[i]), n, num=500, seed=n
    )
    assert list(measure.bootstrap_spearman(x, y, num=500, seed=n)) == one_by_one
    rx, ry = measure.average_ranks(x), measure.average_ranks(y)
    assert measure.spearman(x, y) == float(np.corrcoef(rx, ry)[0, 1])


def test_bootstrap_spearman_is_nan_when_no_resample_ranks():
    lo, hi = measure.bootstrap_spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], num=20)
    assert np.isnan(lo) and np.isnan(hi)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="malloc_trim is glibc's",
)
def test_trim_heap_returns_freed_heap_to_the_system():
    """200 MB of small (heap, not mmap) blocks freed but for the last: glibc keeps the pages
    until malloc_trim hands them back; trim_heap must give back at least half of them."""
    from quartic.core.cache import trim_heap

    def rss_mb():
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    trim_heap()
    blocks = [bytearray(2000) for _ in range(100_000)]  # ~200 MB in 2 kB blocks (< mmap threshold)
    last = blocks[-1]  # pins the heap's top, so free() alone cannot shrink it
    del blocks
    before = rss_mb()
    assert trim_heap() is True
    assert before - rss_mb() > 100, (before, rss_mb())
    del last
