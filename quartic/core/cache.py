"""One cache policy: every memo in quartic is bounded and evicts the least recently used entry.

- A function of hashable arguments: ``@memo(maxsize=...)`` (``functools.lru_cache``, registered;
  never the unbounded ``functools.cache``).
- Anything keyed by hand (compiled programs keyed by options and shapes, per-object helpers):
  a :class:`BoundedCache`, owned by the module or object whose programs it holds and reached
  only through its owner.

Both register themselves, so :func:`clear_all` can release every compiled program and the data
its closures hold (``quartic reproduce`` does so between experiments, which share none).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import jax

from quartic.core.errors import QuarticError


class BoundedCache:
    """A dict of at most ``maxsize`` entries; reading or writing an entry makes it the most recent,
    and a write beyond ``maxsize`` drops the least recent."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise QuarticError(f"a cache holds at least one entry, got maxsize={maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        _CACHES.add(self)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, key: Hashable) -> Any:
        self._data.move_to_end(key)
        return self._data[key]

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry for ``key``, built by ``build()`` (and kept) if missing."""
        if key not in self._data:
            self[key] = build()
        return self[key]

    def clear(self) -> None:
        self._data.clear()


_CACHES: weakref.WeakSet = weakref.WeakSet()
_MEMOS: list[Callable] = []


def memo(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache(maxsize)``, registered for :func:`clear_all`."""
    if maxsize < 1:
        raise QuarticError(f"a cache holds at least one entry, got maxsize={maxsize}")

    def wrap(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _MEMOS.append(cached)
        return cached

    return wrap


def clear_all() -> None:
    """Empty every :class:`BoundedCache` and :func:`memo`, and JAX's own compilation caches, and
    hand the freed heap back to the operating system (:func:`trim_heap`)."""
    for c in list(_CACHES):
        c.clear()
    for m in _MEMOS:
        m.cache_clear()
    jax.clear_caches()
    gc.collect()
    trim_heap()


def trim_heap() -> bool:
    """Return freed heap pages to the operating system: glibc's ``malloc_trim(0)``; ``False``
    (nothing done) where there is no glibc. Compiling leaves much freed memory that glibc keeps:
    after the transformer collapse study's quick units and ``clear_all`` the process held 3,001 MiB,
    539 MiB after the trim (``benchmarks/memory.py``; benchmarks/results/memory-cpu-2core.json)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_heap() -> bool:
    """Collect garbage, then :func:`trim_heap`: between the stages of a long computation, so that
    the next compile's peak does not land on the heap the last one freed. The scaling study's 100k
    model (θ* trained, two tasks) peaked at 3,555 MiB without it and 3,311 MiB with it between its
    stages and inside each task (``benchmarks/aic_lean_compile.py``)."""
    gc.collect()
    return trim_heap()


def release_programs() -> bool:
    """Drop every compiled program of the process (``jax.clear_caches``: those compiled by other
    code too), then :func:`release_heap`. For a stage boundary after which the programs compiled
    so far will not run again (the scaling study's θ* training and Fisher spectrum, before its
    tasks compile theirs). The memos and :class:`BoundedCache` entries stay: a jitted function
    they hold compiles again when called. On XLA:CPU compiled programs hold far more than their
    code: at the end of the scaling study's 100k unit (θ* trained, spectrum, two tasks) dropping
    them freed 1,149 MiB, and releasing them at its stage boundaries lowered its peak from 2,943
    to 2,648 MiB (``benchmarks/aic_lean_compile.py``,
    benchmarks/results/unit-memory-cpu-2core.json)."""
    jax.clear_caches()
    return release_heap()


@functools.cache
def _malloc_trim():
    # looked up once: find_library may run ldconfig, and clear_all calls trim_heap every time
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


__all__ = ["BoundedCache", "clear_all", "memo", "release_heap", "release_programs", "trim_heap"]
