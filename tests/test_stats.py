"""The counters behind the metrics, driven through the registry and the limits with no network."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from chat_service.errors import ChatError, ErrorKind
from chat_service.events import Joined, Resume
from chat_service.limits import Limiter, Limits, Rate
from chat_service.stats import Stats, cumulative
from tests.test_limits import FakeClock
from tests.test_rooms import Registries, drain, take


async def test_the_registry_counts_lines_whispers_writes_evictions_and_refused_caps(registry: Registries) -> None:
    rooms = await registry(max_rooms=1, max_members=2)
    stats = rooms.stats
    alice = await rooms.join("r", "alice", create=True)
    bob = await rooms.join("r", "bob")
    for attempt in (rooms.create_room("s"), rooms.join("r", "carol")):
        with pytest.raises(ChatError):
            await attempt
    await alice.say("one")
    await alice.say("two")
    await alice.whisper("bob", "psst")
    # Alice's first write: her join, bob's, two lines and the whisper, with nothing left behind them.
    assert len(await take(alice)) == 5
    joined = drain(bob)[0]
    assert isinstance(joined, Joined)
    await rooms.join("r", "bob", resume=Resume(joined.resume_token, 0))
    assert stats.received == {"say": 2, "whisper": 1}
    assert stats.refused == {"rooms": 0, "joins": 0, "lines": 0, "max_rooms": 1, "max_members": 1}
    assert stats.evicted == {"too_slow": 0, "resumed_elsewhere": 1}
    assert cumulative(stats.write_sizes)[1] == 5
    assert stats.write_sizes[3] == 1


def test_the_limiter_counts_each_refusal_by_its_limit() -> None:
    limiter = Limiter(Limits(rooms=Rate(1 / 60, 1), joins=Rate(1.0, 1), lines=Rate(1.0, 1)), FakeClock())
    lines = limiter.lines("10.0.0.1", "r", "alice")
    assert lines is not None
    charges: list[Callable[[], None]] = [
        lambda: limiter.create_room("10.0.0.1", "r"),
        lambda: limiter.join("10.0.0.1"),
        lines.charge,
    ]
    for charge in charges:
        charge()
        for _ in range(3):
            with pytest.raises(ChatError) as info:
                charge()
            assert info.value.kind is ErrorKind.RATE_LIMITED
    assert limiter.stats.refused == {"rooms": 3, "joins": 3, "lines": 3, "max_rooms": 0, "max_members": 0}


def test_histograms_come_out_as_cumulative_power_of_two_buckets() -> None:
    stats = Stats()
    for events, left in ((1, 0), (2, 1), (200, 5000), (3, 1 << 40)):
        stats.wrote(events, left)
    sizes, total = cumulative(stats.write_sizes)
    assert total == 206
    assert sizes[:4] == [("1", 1), ("2", 2), ("4", 3), ("8", 3)]
    assert sizes[-2:] == [("32768", 4), ("+Inf", 4)]
    depths, waiting = cumulative(stats.queue_depths)
    assert waiting == 1 + 3 + 5200 + 3 + (1 << 40)
    assert depths[-2:] == [("32768", 3), ("+Inf", 4)]
