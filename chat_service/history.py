"""A room's most recent messages, addressed by their sequence numbers."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_HISTORY = 1000


class History(Generic[T]):
    """The last `limit` messages of a room (none when `limit` is 0), appended with gap-free sequence numbers."""

    __slots__ = ("_items", "last_seq")

    def __init__(self, limit: int = DEFAULT_HISTORY) -> None:
        self._items: deque[T] = deque(maxlen=max(limit, 0))
        self.last_seq = 0

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest message kept; last_seq + 1 when none is kept."""
        return self.last_seq - len(self._items) + 1

    def append(self, seq: int, item: T) -> None:
        """Keep message `seq`, which must follow the last one, dropping the oldest beyond the limit."""
        if seq != self.last_seq + 1:
            raise ValueError(f"message {seq} does not follow message {self.last_seq}")
        self._items.append(item)
        self.last_seq = seq

    def last(self, count: int) -> list[T]:
        """The newest `count` messages kept (fewer when fewer are kept), oldest first."""
        kept = len(self._items)
        return list(itertools.islice(self._items, max(kept - max(count, 0), 0), kept))

    def after(self, seq: int) -> tuple[list[T], int]:
        """The messages kept after `seq`, oldest first, and how many messages after `seq` are no longer kept."""
        seq = min(max(seq, 0), self.last_seq)
        lost = max(self.first_seq - 1 - seq, 0)
        return self.last(self.last_seq - seq - lost), lost
