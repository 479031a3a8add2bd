"""One cache policy: every memo in quartic is bounded and evicts the least recently used entry.

- A function of hashable arguments: ``functools.lru_cache(maxsize=...)`` (never the unbounded
  ``functools.cache``).
- Anything keyed by hand (compiled programs keyed by options and shapes, per-object helpers):
  a :class:`BoundedCache`, owned by the module or object whose programs it holds and reached
  only through its owner.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from quartic.core.errors import QuarticError


class BoundedCache:
    """A dict of at most ``maxsize`` entries; reading or writing an entry makes it the most recent,
    and a write beyond ``maxsize`` drops the least recent."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise QuarticError(f"a cache holds at least one entry, got maxsize={maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()

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


__all__ = ["BoundedCache"]
