"""What the server counts for its metrics: plain numbers the event loop bumps and a scrape reads from another thread.

Nothing here knows Prometheus (chat_service.metrics turns these into metric families when scraped), so the registry
and the limits count without a lock: a few list additions per write, and nothing per member.
"""

from __future__ import annotations

# Power-of-two buckets: bucket i counts values from 2**(i-1) + 1 to 2**i. A slot for every bit of a 64-bit count
# makes bit_length() an index that needs no clamping (min() alone cost four times the rest); the metric shows
# POWERS buckets and folds the rest into +Inf.
POWERS = 16
SLOTS = 64
# Where a histogram's list keeps the sum of what it counted, after its buckets.
SUM = SLOTS
REASONS = ("too_slow", "resumed_elsewhere")
LIMITS = ("rooms", "joins", "lines", "max_rooms", "max_members")


class Stats:
    """Counters of one server: requests received and refused, events written, members evicted."""

    __slots__ = ("evicted", "queue_depths", "received", "refused", "write_sizes")

    def __init__(self) -> None:
        # Keys fixed here and never added to, so a scrape thread may copy these dicts while the loop counts.
        self.received = {"say": 0, "whisper": 0}
        self.evicted = dict.fromkeys(REASONS, 0)
        self.refused = dict.fromkeys(LIMITS, 0)
        # Histograms as bucket counts then their sum, in one list each: events per write (whose sum is every event
        # written), and the events waiting for a member as a write to it starts.
        self.write_sizes = [0] * (SUM + 1)
        self.queue_depths = [0] * (SUM + 1)

    def wrote(self, events: int, left: int) -> None:
        """Count one write of `events` (1 or more) events, with `left` more still queued behind them."""
        # Lists rather than objects with attributes: this runs at every write, and each lookup costs as much as
        # the counting.
        sizes = self.write_sizes
        sizes[(events - 1).bit_length()] += 1
        sizes[SUM] += events
        depths = self.queue_depths
        waiting = events + left
        depths[(waiting - 1).bit_length()] += 1
        depths[SUM] += waiting


def cumulative(histogram: list[int]) -> tuple[list[tuple[str, float]], int]:
    """Prometheus buckets (upper bound, observations at or below it) ending with +Inf, and the sum."""
    # One copy, taken in a single step under the GIL, so that the buckets and the sum agree with each other while
    # the loop goes on counting.
    counts = list(histogram)
    buckets: list[tuple[str, float]] = []
    running = 0
    for index, count in enumerate(counts[:POWERS]):
        running += count
        buckets.append((str(2**index), running))
    buckets.append(("+Inf", running + sum(counts[POWERS:SUM])))
    return buckets, counts[SUM]
