"""A room's most recent messages, addressed by their sequence numbers, within a byte budget shared by every room."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_HISTORY = 1000
DEFAULT_HISTORY_BYTES = 256 * 1024 * 1024
# What a kept message costs beyond the UTF-8 of its text and names: the Message object, its text's str header, its
# seq and time ints, its slot in the room's deque, and its entry (a tuple) in the budget's order; measured with
# sys.getsizeof on CPython 3.11 (the sender's name is the seat's own str, not a copy).
MESSAGE_OVERHEAD = 256
# The budget's order may hold this many entries of messages already gone before it is rebuilt without them.
_STALE_SLACK = 1024


def unsized(_: object) -> int:
    """The size of a message whose bytes are not counted: only its overhead is."""
    return 0


class HistoryBudget(Generic[T]):
    """The bytes all rooms' histories may hold together; past it, the oldest message on the server goes first.

    The oldest message server-wide, not the largest room's: one queue of every message kept, in the order they were
    said, finds it in O(1), and a quiet room keeps its last words until the busy ones have said more since.
    """

    __slots__ = ("_order", "held", "kept", "limit", "size")

    def __init__(self, limit: int = DEFAULT_HISTORY_BYTES, size: Callable[[T], int] = unsized) -> None:
        self.limit = limit
        self.size = size
        self.held = 0
        self.kept = 0
        # Entries stay when their message leaves by another way (a room's own limit, a kill); they are skipped when
        # they come up, and all of them are swept out once they outnumber the live ones.
        self._order: deque[tuple[History[T], int]] = deque()

    def cost(self, item: T) -> int:
        """The bytes one kept message is charged for."""
        return self.size(item) + MESSAGE_OVERHEAD

    def charge(self, history: History[T], seq: int, item: T) -> None:
        """Count message `seq`, just kept by `history`, and drop the oldest messages kept while over the limit."""
        self.held += self.cost(item)
        self.kept += 1
        order = self._order
        order.append((history, seq))
        while self.held > self.limit and order:
            oldest, oldest_seq = order.popleft()
            if oldest.holds(oldest_seq):
                oldest.drop_oldest()
        if len(order) > 2 * self.kept + _STALE_SLACK:
            self._order = deque(entry for entry in order if entry[0].holds(entry[1]))

    def refund(self, item: T) -> None:
        """Stop counting a message a history no longer keeps."""
        self.held -= self.cost(item)
        self.kept -= 1


class History(Generic[T]):
    """The last `limit` messages of a room (none when `limit` is 0), appended with gap-free sequence numbers."""

    __slots__ = ("_budget", "_items", "last_seq", "limit")

    def __init__(self, limit: int = DEFAULT_HISTORY, budget: HistoryBudget[T] | None = None) -> None:
        self._items: deque[T] = deque()
        self.limit = max(limit, 0)
        self._budget = budget
        self.last_seq = 0

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest message kept; last_seq + 1 when none is kept."""
        return self.last_seq - len(self._items) + 1

    def holds(self, seq: int) -> bool:
        """Whether message `seq` is still kept."""
        return self.first_seq <= seq <= self.last_seq

    def append(self, seq: int, item: T) -> None:
        """Keep message `seq`, which must follow the last one, dropping the oldest beyond the limit or the budget."""
        if seq != self.last_seq + 1:
            raise ValueError(f"message {seq} does not follow message {self.last_seq}")
        self.last_seq = seq
        if self.limit == 0:
            return
        self._items.append(item)
        if len(self._items) > self.limit:
            self.drop_oldest()
        if self._budget is not None:
            self._budget.charge(self, seq, item)

    def drop_oldest(self) -> None:
        """Forget the oldest message kept."""
        item = self._items.popleft()
        if self._budget is not None:
            self._budget.refund(item)

    def clear(self) -> None:
        """Forget every message kept, as when the room closes; the sequence numbers stay."""
        while self._items:
            self.drop_oldest()

    def last(self, count: int) -> list[T]:
        """The newest `count` messages kept (fewer when fewer are kept), oldest first."""
        kept = len(self._items)
        return list(itertools.islice(self._items, max(kept - max(count, 0), 0), kept))

    def after(self, seq: int) -> tuple[list[T], int]:
        """The messages kept after `seq`, oldest first, and how many messages after `seq` are no longer kept."""
        seq = min(max(seq, 0), self.last_seq)
        lost = max(self.first_seq - 1 - seq, 0)
        return self.last(self.last_seq - seq - lost), lost
