"""The registry driven directly over each store, with no network: events come out as plain values."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from collections.abc import Awaitable, Callable

import pytest

from chat_service import tokens
from chat_service.errors import ChatError, ErrorKind
from chat_service.events import (
    CloseReason,
    Event,
    Joined,
    LeaveReason,
    MemberJoined,
    MemberLeft,
    Members,
    Message,
    Problem,
    Resume,
    RoomClosed,
    Whisper,
)
from chat_service.rooms import PRESENCE_RUN, Lease, Member, RoomRegistry, WriteSlots

Registries = Callable[..., Awaitable[RoomRegistry[Event]]]


def drain(member: Member[Event]) -> list[Event]:
    """Everything queued for `member` now, without waiting."""
    return [*(member._backlog or []), *member._queue]


def tokenless(events: list[Event]) -> list[Event]:
    """`events` with Joined's random resume token blanked, for comparing with expected values."""
    return [dataclasses.replace(e, resume_token="") if isinstance(e, Joined) else e for e in events]


async def take(member: Member[Event]) -> list[Event]:
    """The next batch the member's stream would write; [] once its membership has ended."""
    written: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()

    async def write(batch: list[Event]) -> None:
        written.set_result(batch)
        await asyncio.Event().wait()

    delivering = asyncio.create_task(member.deliver(write))
    await asyncio.wait((delivering, written), timeout=1, return_when=asyncio.FIRST_COMPLETED)
    delivering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await delivering
    if written.done():
        return written.result()
    assert delivering.cancelled() or delivering.done(), "neither a batch nor the end came within 1 s"
    return []


async def taken_until(
    member: Member[Event], done: Callable[[list[Event]], bool], events: list[Event] | None = None
) -> list[Event]:
    """`events` and the batches the member's stream writes next, until `done` holds for them all: a store shared
    between processes may deliver after the operation that caused an event returns."""
    events = [] if events is None else events
    for _ in range(20):
        if events and done(events):
            return events
        events = events + await take(member)
    raise AssertionError(f"the events never came; these did: {events}")


async def settled(rooms: RoomRegistry[Event], *names: str) -> list[Member[Event]]:
    """Members `names` of room r (the first makes it), each past the batch that answered its join."""
    members = [await rooms.join("r", name, create=i == 0) for i, name in enumerate(names)]
    for member in members:
        await take(member)
    return members


async def test_join_sees_members_and_others_see_join(registry: Registries) -> None:
    rooms = await registry()
    alice = await rooms.join("lobby", "alice", create=True)
    bob = await rooms.join("lobby", "bob")
    assert tokenless(await take(alice)) == [
        Joined("lobby", "alice", ("alice",), 0, True, False, "", 0, 0),
        MemberJoined("bob"),
    ]
    assert tokenless(await take(bob)) == [Joined("lobby", "bob", ("alice", "bob"), 0, False, False, "", 0, 0)]


async def test_messages_are_numbered_and_reach_everyone_in_one_order(registry: Registries) -> None:
    rooms = await registry()
    members = await settled(rooms, "a", "b", "c")
    await members[2].say("one")
    await members[0].say("two")
    for member in members:
        texts = [(e.seq, e.sender, e.text) for e in await take(member) if isinstance(e, Message)]
        assert texts == [(1, "c", "one"), (2, "a", "two")]
    assert [(r.name, r.member_count, r.last_seq) for r in await rooms.list_rooms()] == [("r", 3, 2)]


async def test_broadcast_is_encoded_once_and_shared(registry: Registries) -> None:
    calls: list[Event] = []

    def encode(event: Event) -> Event:
        calls.append(event)
        return event

    rooms = await registry(encode=encode)
    members = [await rooms.join("r", f"m{i}", create=i == 0) for i in range(50)]
    calls.clear()
    await members[0].say("hi")
    said = [(await taken_until(m, lambda events: isinstance(events[-1], Message)))[-1] for m in members]
    assert [event for event in calls if isinstance(event, Message)] == said[:1]
    assert len({id(event) for event in said}) == 1


async def test_whisper_goes_to_recipient_and_sender_only(registry: Registries) -> None:
    rooms = await registry()
    alice, bob, carol = await settled(rooms, "alice", "bob", "carol")
    await alice.whisper("bob", "psst")
    expected = [Whisper("alice", "bob", "psst", drain(bob)[0].sent_at_ns)]  # type: ignore[union-attr]
    assert drain(alice) == expected
    assert drain(bob) == expected
    assert drain(carol) == []


async def test_whisper_to_self_arrives_once(registry: Registries) -> None:
    rooms = await registry()
    alice = await rooms.join("r", "alice", create=True)
    await take(alice)
    await alice.whisper("alice", "note to self")
    assert len(drain(alice)) == 1


@pytest.mark.parametrize(
    ("room", "name", "create", "kind"),
    [
        ("missing", "bob", False, ErrorKind.ROOM_NOT_FOUND),
        ("r", "alice", False, ErrorKind.NAME_TAKEN),
        ("r", "bob", True, ErrorKind.ROOM_EXISTS),
        ("bad room", "bob", True, ErrorKind.INVALID_NAME),
        ("r", "b\x00b", False, ErrorKind.INVALID_NAME),
        ("r", "x" * 33, False, ErrorKind.INVALID_NAME),
    ],
)
async def test_join_refusals(room: str, name: str, create: bool, kind: ErrorKind, registry: Registries) -> None:
    rooms = await registry()
    await rooms.join("r", "alice", create=True)
    with pytest.raises(ChatError) as info:
        await rooms.join(room, name, create=create)
    assert info.value.kind is kind
    assert [r.member_count for r in await rooms.list_rooms()] == [1]


async def test_default_names_are_numbered_and_freed(registry: Registries) -> None:
    rooms = await registry()
    first = await rooms.join("r", "", create=True)
    second = await rooms.join("r", "")
    assert (first.name, second.name) == ("Unknown", "Unknown-2")
    await first.leave()
    assert (await rooms.join("r", "")).name == "Unknown"


async def test_leave_tells_the_others_and_ends_the_batches(registry: Registries) -> None:
    rooms = await registry()
    alice, bob = await settled(rooms, "alice", "bob")
    await bob.leave()
    await bob.leave()
    assert await take(bob) == []
    assert await take(alice) == [MemberLeft("bob", LeaveReason.LEFT)]
    with pytest.raises(ChatError) as info:
        await bob.say("anyone?")
    assert info.value.kind is ErrorKind.NOT_JOINED


async def test_kill_closes_room_for_every_member_and_forgets_it(registry: Registries) -> None:
    rooms = await registry()
    alice = await rooms.join("r", "alice", create=True)
    bob = await rooms.join("r", "bob")
    assert await rooms.kill_room("r") == 2
    assert await rooms.list_rooms() == []
    for member in (alice, bob):
        batch = await take(member)
        assert batch[-1] == RoomClosed("r", CloseReason.KILLED)
        assert await take(member) == []
    with pytest.raises(ChatError) as info:
        await rooms.kill_room("r")
    assert info.value.kind is ErrorKind.ROOM_NOT_FOUND
    await rooms.create_room("r")


async def test_rooms_past_the_limit_are_refused_until_one_is_killed(registry: Registries) -> None:
    rooms = await registry(max_rooms=2)
    await rooms.create_room("a")
    await rooms.join("b", "bob", create=True)
    with pytest.raises(ChatError) as created:
        await rooms.create_room("c")
    with pytest.raises(ChatError) as joined:
        await rooms.join("c", "carol", create=True)
    for info in (created, joined):
        assert info.value.kind is ErrorKind.ROOM_LIMIT
        assert "limit of rooms (2)" in info.value.message
    assert [room.name for room in await rooms.list_rooms()] == ["a", "b"]
    await rooms.kill_room("a")
    await rooms.create_room("c")


async def test_shutdown_closes_every_room_and_refuses_new_ones(registry: Registries) -> None:
    rooms = await registry()
    members = {room: await rooms.join(room, "m", create=True) for room in ("a", "b")}
    if rooms.store.shared:
        pytest.skip("a shared store's rooms outlive a server: test_shutdown_over_a_shared_store_hands_members_over")
    await rooms.shutdown()
    assert await rooms.list_rooms() == []
    for room, member in members.items():
        assert (await take(member))[-1] == RoomClosed(room, CloseReason.SERVER_SHUTDOWN)
        assert await take(member) == []
    with pytest.raises(ChatError):
        await rooms.create_room("c")


async def test_shutdown_over_a_shared_store_hands_members_over(registry: Registries, store_kind: str) -> None:
    if store_kind == "memory":
        pytest.skip(
            "the in-memory store's rooms go with the server: test_shutdown_closes_every_room_and_refuses_new_ones"
        )
    leaving, staying = await registry(), await registry()
    member = await leaving.join("r", "m", create=True)
    joined = (await take(member))[0]
    other = await staying.join("r", "other")
    assert isinstance(joined, Joined)
    await leaving.shutdown()
    # A status the client resumes after, not RoomClosed: the room lives on, and the name waits for the resume.
    assert member.dropped.result().kind is ErrorKind.SERVER_RESTARTING
    assert await take(member) == []
    assert (await taken_until(other, lambda events: MemberLeft("m", LeaveReason.DISCONNECTED) in events))[-1] == (
        MemberLeft("m", LeaveReason.DISCONNECTED)
    )
    with pytest.raises(ChatError) as taken:
        await staying.join("r", "m")
    assert taken.value.kind is ErrorKind.NAME_TAKEN
    back = await staying.join("r", "m", resume=Resume(joined.resume_token, joined.last_seq))
    answer = (await take(back))[0]
    assert isinstance(answer, Joined)
    assert (answer.resumed, answer.members) == (True, ("m", "other"))


async def test_member_lists_and_kills_count_the_members_of_every_process(registry: Registries, store_kind: str) -> None:
    if store_kind == "memory":
        pytest.skip("one process holds every member of an in-memory store")
    here, there = await registry(), await registry()
    alice = await here.join("r", "alice", create=True)
    await take(alice)
    bob = await there.join("r", "bob")
    joined = (await take(bob))[0]
    assert isinstance(joined, Joined)
    assert joined.members == ("alice", "bob")
    crowd = [await there.join("r", f"c{i}") for i in range(PRESENCE_RUN + 2)]
    for member in crowd:
        await member.leave()
    last = (Members(("alice", "bob")), MemberLeft(crowd[-1].name, LeaveReason.LEFT))
    events = await taken_until(alice, lambda events: events[-1] in last)
    assert MemberJoined("bob") in events
    # Past a run of joins and leaves, the list as it is when written: the members of both processes.
    lists = [event.names for event in events if isinstance(event, Members)]
    assert lists
    assert all({"alice", "bob"} <= set(names) for names in lists)
    assert await here.kill_room("r") == 2


async def test_the_store_going_away_is_told_once_and_rosters_are_read_again_when_it_is_back(
    registry: Registries,
) -> None:
    rooms = await registry()
    (alice,) = await settled(rooms, "alice")
    record = await rooms.store.find_room("r")
    assert record is not None
    # A name claimed with no signal, as joins elsewhere go unheard while the store is away.
    await rooms.store.claim(record, "ghost", lambda key: tokens.issue(record, key))
    rooms.store_changed(False)
    rooms.store_changed(False)
    told = await take(alice)
    assert [(type(event), event.error.kind) for event in told if isinstance(event, Problem)] == [
        (Problem, ErrorKind.STORE_UNAVAILABLE)
    ]
    assert len(told) == 1
    rooms.store_changed(True)
    await asyncio.wait_for(asyncio.gather(*rooms._tasks), 10)
    joined = drain(await rooms.join("r", "bob"))[0]
    assert isinstance(joined, Joined)
    assert joined.members == ("alice", "bob", "ghost")


async def test_waiting_member_wakes_on_a_message(registry: Registries) -> None:
    rooms = await registry()
    alice = await rooms.join("r", "alice", create=True)
    bob = await rooms.join("r", "bob")
    await take(bob)
    batches: asyncio.Queue[list[Event]] = asyncio.Queue()

    async def write(batch: list[Event]) -> None:
        batches.put_nowait(batch)

    delivering = asyncio.create_task(bob.deliver(write))
    await asyncio.sleep(0)
    assert batches.empty()
    await alice.say("wake up")
    batch = await asyncio.wait_for(batches.get(), 1)
    assert [e.text for e in batch if isinstance(e, Message)] == ["wake up"]
    await bob.leave()
    await asyncio.wait_for(delivering, 1)


async def test_batches_are_bounded(registry: Registries) -> None:
    rooms = await registry(batch_limit=4)
    alice = await rooms.join("r", "alice", create=True)
    for i in range(9):
        await alice.say(str(i))
    sizes = [len(await take(alice)) for _ in range(3)]
    assert sizes == [4, 4, 2]


async def test_slow_member_is_evicted_and_the_room_goes_on(registry: Registries) -> None:
    rooms = await registry(queue_limit=5)
    fast = await rooms.join("r", "fast", create=True)
    slow = await rooms.join("r", "slow")
    await take(fast)
    for i in range(10):
        await fast.say(str(i))
        await take(fast)
    assert slow.dropped.done()
    assert slow.dropped.result().kind is ErrorKind.TOO_SLOW
    assert await take(slow) == []
    assert [r.member_count for r in await rooms.list_rooms()] == [1]
    await fast.say("after")
    assert [type(e) for e in await take(fast)] == [Message]


async def test_eviction_is_announced_to_the_rest(registry: Registries) -> None:
    rooms = await registry(queue_limit=3)
    fast = await rooms.join("r", "fast", create=True)
    await rooms.join("r", "slow")
    await take(fast)
    events: list[Event] = []
    # The join's own answer does not count against the bound: the fourth message is the one that overflows.
    for i in range(4):
        await fast.say(str(i))
        events += await take(fast)
    events = await taken_until(fast, lambda events: isinstance(events[-1], MemberLeft), events)
    assert events[-2:] == [Message(4, "fast", "3", events[-2].sent_at_ns), MemberLeft("slow", LeaveReason.TOO_SLOW)]  # type: ignore[union-attr]
    assert [r.member_count for r in await rooms.list_rooms()] == [1]


async def test_report_queues_an_error_for_one_member(registry: Registries) -> None:
    rooms = await registry()
    alice, bob = await settled(rooms, "alice", "bob")
    error = ChatError(ErrorKind.INVALID_TEXT, "too long")
    alice.report(error)
    assert drain(alice) == [Problem(error)]
    assert drain(bob) == []


async def test_a_room_of_stalled_members_is_evicted_at_once(registry: Registries, store_kind: str) -> None:
    limit = 4000
    rooms = await registry(queue_limit=limit)
    sender = await rooms.join("r", "sender", create=True)
    stalled = []
    # Fewer over NATS, where every join is a few round trips.
    for i in range(3000 if store_kind == "memory" else 30):
        stalled.append(await rooms.join("r", f"m{i}"))
        await take(sender)
    filler = Message(0, "filler", "filler", 0)
    for member in stalled:
        member._queue.clear()
        member._queue.extend([filler] * (limit - 1))
        member._presence = 0
    # Every stalled queue overflows at the same message; the evictions reach the one who stays as a member list.
    await sender.say("fills")
    await sender.say("overflows")
    assert all(member.dropped.done() for member in stalled)
    await rooms.flush_departures()
    assert [r.member_count for r in await rooms.list_rooms()] == [1]
    events = await taken_until(sender, lambda events: events[-1] == Members(("sender",)))
    left = [event for event in events if isinstance(event, MemberLeft)]
    assert len(left) == PRESENCE_RUN
    assert {event.reason for event in left} == {LeaveReason.TOO_SLOW}
    assert events[-1] == Members(("sender",))


async def test_write_slots_cap_writes_in_flight_and_serve_in_order() -> None:
    slots = WriteSlots(2)
    first, second = await slots.acquire(), await slots.acquire()
    order: list[int] = []
    leases: list[Lease] = []

    async def wait_then_note(n: int) -> None:
        leases.append(await slots.acquire())
        order.append(n)

    waiters = [asyncio.create_task(wait_then_note(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []
    first.release()
    first.release()
    await waiters[0]
    assert order == [0]
    waiters[1].cancel()
    second.release()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == [0, 2]
    for lease in leases:
        lease.release()


async def test_a_lease_held_too_long_gives_its_slot_back() -> None:
    slots = WriteSlots(1, hold_limit=0.01)
    stuck = await slots.acquire()
    next_lease = await asyncio.wait_for(slots.acquire(), 1)
    stuck.release()
    next_lease.release()
    again = await asyncio.wait_for(slots.acquire(), 1)
    again.release()


async def test_events_arriving_while_waiting_for_a_slot_join_the_batch(registry: Registries) -> None:
    rooms = await registry(write_slots=1)
    alice = await rooms.join("r", "alice", create=True)
    bob = await rooms.join("r", "bob")
    await take(alice)
    rooms.slots.hold_limit = 60
    held = await rooms.slots.acquire()
    batches: asyncio.Queue[list[Event]] = asyncio.Queue()

    async def write(batch: list[Event]) -> None:
        batches.put_nowait(batch)

    delivering = asyncio.create_task(bob.deliver(write))
    for text in ("one", "two", "three"):
        await alice.say(text)
        await asyncio.sleep(0)
    assert batches.empty()
    held.release()
    batch = await asyncio.wait_for(batches.get(), 1)
    assert [e.text for e in batch if isinstance(e, Message)] == ["one", "two", "three"]
    await bob.leave()
    await asyncio.wait_for(delivering, 1)


async def test_a_stream_ending_in_line_for_a_slot_neither_keeps_one_nor_loses_its_events(
    registry: Registries, store_kind: str
) -> None:
    if store_kind != "memory":
        pytest.skip("the steps need a line fanned out before `say` returns, as the in-memory store does")
    rooms = await registry(write_slots=1)
    alice = await rooms.join("r", "alice", create=True)
    bob = await rooms.join("r", "bob")
    await take(bob)
    written: list[list[Event]] = []

    async def write(batch: list[Event]) -> None:
        written.append(batch)

    # A line finds bob waiting for events, and the free slot is his at once; his stream ends before he writes.
    delivering = asyncio.create_task(bob.deliver(write))
    await asyncio.sleep(0)
    await alice.say("one")
    delivering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await delivering
    (await asyncio.wait_for(rooms.slots.acquire(), 1)).release()
    # In line behind a held slot when his membership ends, he still writes what was queued, then stops.
    # What the ended stream did not write is another stream's concern (a resume's backlog).
    bob._queue.clear()
    held = await rooms.slots.acquire()
    delivering = asyncio.create_task(bob.deliver(write))
    await asyncio.sleep(0)
    await alice.say("two")
    await bob.leave()
    held.release()
    await asyncio.wait_for(delivering, 1)
    assert [[e.text for e in batch if isinstance(e, Message)] for batch in written] == [["two"]]
    (await asyncio.wait_for(rooms.slots.acquire(), 1)).release()


async def test_a_crowd_leaving_reaches_a_prompt_reader_as_one_member_list(
    registry: Registries, store_kind: str
) -> None:
    rooms = await registry(queue_limit=16)
    reader, talker = await settled(rooms, "reader", "talker")
    # Over NATS a crowd smaller but still past the bound: every join is a few round trips.
    size = 100 if store_kind == "memory" else 24
    crowd = [await rooms.join("r", f"c{i}") for i in range(size)]
    await talker.say("before")
    for member in crowd[: size // 2]:
        await member.leave()
    await talker.say("after")
    for member in crowd[size // 2 :]:
        await member.leave(LeaveReason.DISCONNECTED)
    assert not reader.dropped.done()
    events = await take(reader)
    # The first joins come one by one; the list stands for all the rest, as the room is when it is written, and no
    # join or leave follows it.
    assert [type(event) for event in events[:PRESENCE_RUN]] == [MemberJoined] * PRESENCE_RUN
    assert events[PRESENCE_RUN] == Members(("reader", "talker"))
    assert [event.text for event in events[PRESENCE_RUN + 1 :] if isinstance(event, Message)] == ["before", "after"]
    assert len(events) == PRESENCE_RUN + 3
    await rooms.join("r", "late")
    assert await take(reader) == [MemberJoined("late")]


async def test_joins_and_leaves_never_count_against_the_bound(registry: Registries, store_kind: str) -> None:
    rooms = await registry(queue_limit=4)
    (idle,) = await settled(rooms, "idle")
    for i in range(200 if store_kind == "memory" else 20):
        await (await rooms.join("r", f"c{i}")).leave()
    assert not idle.dropped.done()
    assert len(idle._queue) <= PRESENCE_RUN + 1
    sender = await rooms.join("r", "sender")
    for i in range(4):
        await sender.say(str(i))
    assert not idle.dropped.done()
    await sender.say("one too many")
    assert idle.dropped.result().kind is ErrorKind.TOO_SLOW


async def test_an_evicted_member_is_freed_without_a_garbage_collection(registry: Registries) -> None:
    rooms = await registry(queue_limit=1)
    fast, slow = await settled(rooms, "fast", "slow")
    gc.collect()
    gc.disable()
    try:
        del slow
        await fast.say("fills")
        await take(fast)
        await fast.say("overflows")
        assert [name for name, _ in _live_members()] == ["fast"]
    finally:
        gc.enable()


def _live_members() -> list[tuple[str, Member[Event]]]:
    return [(obj.name, obj) for obj in gc.get_objects() if isinstance(obj, Member)]


async def test_a_member_waiting_for_events_keeps_nothing_it_wrote(registry: Registries) -> None:
    rooms = await registry()
    alice = await rooms.join("idle", "alice", create=True)
    wrote = asyncio.Event()

    async def write(batch: list[Event]) -> None:
        wrote.set()

    delivering = asyncio.create_task(alice.deliver(write))
    await asyncio.wait_for(wrote.wait(), 10)
    # From the write's return to its next wait `deliver` does not yield, so it is waiting by the time this test runs.
    assert alice._waiter is not None, "the member did not wait for events after its first batch"
    # An idle member would otherwise hold its Joined, with the room's member list, for as long as it stays.
    gc.collect()
    assert not [obj for obj in gc.get_objects() if isinstance(obj, Joined) and obj.room == "idle"]
    await alice.leave()
    await asyncio.wait_for(delivering, 10)


async def test_default_names_take_the_lowest_number_given_back(registry: Registries) -> None:
    rooms = await registry()
    first, second, third = [await rooms.join("r", "", create=i == 0) for i in range(3)]
    assert [m.name for m in (first, second, third)] == ["Unknown", "Unknown-2", "Unknown-3"]
    await second.leave()
    assert (await rooms.join("r", "")).name == "Unknown-2"
    await rooms.join("r", "Unknown-4")
    assert (await rooms.join("r", "")).name == "Unknown-5"
    await first.leave(LeaveReason.DISCONNECTED)
    # A name held for a resume is not handed out; once given back it is the lowest again.
    assert (await rooms.join("r", "")).name == "Unknown-6"
    await third.leave()
    assert (await rooms.join("r", "")).name == "Unknown-3"


async def test_members_past_the_limit_are_refused_counting_names_held_for_a_resume(registry: Registries) -> None:
    rooms = await registry(max_members=2)
    alice = await rooms.join("r", "alice", create=True)
    bob = await rooms.join("r", "bob")
    for attempt in (rooms.join("r", "carol"), rooms.join("other", "carol", create=True)):
        with pytest.raises(ChatError) as info:
            await attempt
        assert info.value.kind is ErrorKind.MEMBER_LIMIT
        assert "limit of members (2)" in info.value.message
    assert [room.name for room in await rooms.list_rooms()] == ["r"]
    token = drain(alice)[0].resume_token  # type: ignore[union-attr]
    await alice.leave(LeaveReason.DISCONNECTED)
    with pytest.raises(ChatError):
        await rooms.join("r", "carol")
    # The resume takes back the name it held: it is not one more.
    alice = await rooms.join("r", "alice", resume=Resume(token, 0))
    await bob.leave()
    await rooms.join("r", "carol")
    await rooms.kill_room("r")
    await rooms.join("s", "dave", create=True)
    await rooms.join("s", "erin")
