"""Token buckets per client address and per member, so that one client cannot lock the others out or drown them.

Plain Python with the clock passed in: no gRPC, no sleeping, testable with a fake clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from chat_service.errors import ChatError, ErrorKind
from chat_service.stats import Stats
from chat_service.throttled_log import ThrottledLog

# Seconds from a clock that never goes back (time.monotonic, loop.time).
Clock = Callable[[], float]

# A room costs memory until it is killed or pruned: ten a minute lets a person make what they need and keeps one
# address from filling --max-rooms (10,000 took a script 5.9 s; at this rate it takes 16 hours).
DEFAULT_ROOMS_PER_MINUTE = 10.0
DEFAULT_ROOM_BURST = 10
# Every join is announced to the whole room, so churn drowns the others as lines do; a burst of 20 lets a few
# people behind one address (an office, a campus) come back together after a server restart.
DEFAULT_JOINS_PER_SECOND = 5.0
DEFAULT_JOIN_BURST = 20
# ergo allows a burst of 5 then 2 a second but delays the rest; a refused line has to be typed again, so the
# burst here lets a pasted block of 20 lines through whole, and 5 a second is still faster than anyone types.
DEFAULT_LINES_PER_SECOND = 5.0
DEFAULT_LINE_BURST = 20
# Each tracked address costs about 180 bytes (measured with tracemalloc); past this many the least recently seen
# is forgotten.
DEFAULT_TRACKED_ADDRESSES = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    """A steady `per_second` after a `burst`; a rate of 0 means unlimited."""

    per_second: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0


NO_LIMIT = Rate(0.0, 1)


class TokenBucket:
    """Holds up to `burst` tokens, refilled at `per_second`; each request takes one."""

    __slots__ = ("_rate", "_tokens", "_updated")

    def __init__(self, rate: Rate, now: float) -> None:
        self._rate = rate
        self._tokens = float(rate.burst)
        self._updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be (and nothing is taken)."""
        # Inlined rather than shared with `full`: this runs for every line said.
        rate = self._rate
        tokens = self._tokens + (now - self._updated) * rate.per_second
        tokens = min(tokens, rate.burst)
        self._updated = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / rate.per_second

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled: it then behaves exactly as a new one, so it can be forgotten."""
        return self._tokens + (now - self._updated) * self._rate.per_second >= self._rate.burst


class AddressBuckets:
    """One bucket per client address, in a table that forgets full buckets and holds at most `max_addresses`."""

    def __init__(self, rate: Rate, clock: Clock, max_addresses: int = DEFAULT_TRACKED_ADDRESSES) -> None:
        self.rate = rate
        self._clock = clock
        self._max = max_addresses
        # Ordered by last use, so the head is the address seen longest ago: the first to be full, or forgotten.
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, address: str) -> float:
        """Take a token for `address`: 0.0 if allowed, else the seconds to wait."""
        if self.rate.unlimited:
            return 0.0
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.pop(address, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, now)
        buckets[address] = bucket
        wait = bucket.take(now)
        self._forget(now)
        return wait

    def _forget(self, now: float) -> None:
        # Each call forgets at most a couple of heads, so the cost stays constant while idle addresses drain away.
        buckets = self._buckets
        for _ in range(2):
            head = next(iter(buckets))
            if len(buckets) > self._max or buckets[head].full(now):
                del buckets[head]
            else:
                return


def client_address(peer: str) -> str:
    """The client's IP from a gRPC peer string such as 'ipv4:127.0.0.7:54321' or 'ipv6:[::1]:5'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    # Unix sockets and anything unforeseen: the whole string, so such peers share one bucket per socket name.
    return peer


@dataclass(frozen=True)
class Limits:
    """The server's rate limits: per address for rooms created and joins, per member for lines and whispers."""

    rooms: Rate = field(default_factory=lambda: Rate(DEFAULT_ROOMS_PER_MINUTE / 60, DEFAULT_ROOM_BURST))
    joins: Rate = field(default_factory=lambda: Rate(DEFAULT_JOINS_PER_SECOND, DEFAULT_JOIN_BURST))
    lines: Rate = field(default_factory=lambda: Rate(DEFAULT_LINES_PER_SECOND, DEFAULT_LINE_BURST))
    max_addresses: int = DEFAULT_TRACKED_ADDRESSES


class Limiter:
    """Applies `Limits`: each check returns normally or raises ChatError(RATE_LIMITED) with the wait.

    Each refusal is counted in `stats` and logged, at most once per limit and address per interval."""

    def __init__(self, limits: Limits, clock: Clock, stats: Stats | None = None) -> None:
        self.limits = limits
        self.clock = clock
        self.stats = stats if stats is not None else Stats()
        self._rooms = AddressBuckets(limits.rooms, clock, limits.max_addresses)
        self._joins = AddressBuckets(limits.joins, clock, limits.max_addresses)
        # A flood is what these limits refuse, so their log lines must not follow it.
        self._log = ThrottledLog(logging.getLogger(__name__), clock=clock)

    def create_room(self, address: str, room: str = "") -> None:
        """Charge one room creation to `address`."""
        if wait := self._rooms.take(address):
            self.refused("rooms", address, room)
            per_minute = self.limits.rooms.per_second * 60
            raise _limited(f"this address creates rooms too fast (at most {per_minute:g} a minute)", wait)

    def join(self, address: str, room: str = "", member: str = "") -> None:
        """Charge one join (or resume) to `address`."""
        if wait := self._joins.take(address):
            self.refused("joins", address, room, member)
            raise _limited(
                f"this address joins rooms too fast (at most {self.limits.joins.per_second:g} a second)", wait
            )

    def lines(self, address: str = "", room: str = "", member: str = "") -> LineLimit | None:
        """A new member's limit on lines and whispers; None when they are unlimited."""
        if self.limits.lines.unlimited:
            return None
        return LineLimit(self.limits.lines, self.clock, lambda: self.refused("lines", address, room, member))

    def refused(self, limit: str, address: str, room: str = "", member: str = "") -> None:
        """Count a request refused by `limit` and log it, unless that limit refused `address` within an interval."""
        self.stats.refused[limit] += 1
        where = ", ".join(f"{what} {name}" for what, name in (("room", room), ("member", member)) if name)
        self._log.info(
            limit,
            "Refused a request from %s over the %s rate limit%s",
            address,
            limit,
            f" ({where})" if where else "",
            client=address,
            extra={"limit": limit, "peer": address, "room": room, "member": member},
        )


class LineLimit:
    """One member's flood control: its lines and whispers share one bucket."""

    __slots__ = ("_bucket", "_clock", "_rate", "_refused")

    def __init__(self, rate: Rate, clock: Clock, refused: Callable[[], None] = lambda: None) -> None:
        self._rate = rate
        self._clock = clock
        self._bucket = TokenBucket(rate, clock())
        self._refused = refused

    def charge(self) -> None:
        """Charge one line or whisper; raises ChatError(RATE_LIMITED) with the wait when the member floods."""
        if wait := self._bucket.take(self._clock()):
            self._refused()
            raise _limited(f"you are sending lines too fast (at most {self._rate.per_second:g} a second)", wait)


def _limited(what: str, wait: float) -> ChatError:
    # The wait travels in Error.retry_after (or in the status message, for a unary call), not in this sentence.
    return ChatError(ErrorKind.RATE_LIMITED, what, retry_after=wait)
