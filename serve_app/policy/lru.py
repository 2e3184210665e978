"""A map bounded in size and in age, for state kept per user or session."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedLru(Generic[K, V]):
    """Least recently written entries go first once ``max_entries`` is reached; an entry older than
    ``ttl_s`` is gone. Memory is O(max_entries) whatever the number of distinct keys."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if max_entries <= 0 or ttl_s <= 0:
            raise ValueError("max_entries and ttl_s must be positive")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        written, value = entry
        if self._clock() - written > self.ttl_s:
            del self._entries[key]
            return None
        return value

    def drop_values(self, value: V) -> None:
        for key in [k for k, (_, v) in self._entries.items() if v == value]:
            del self._entries[key]
