"""The store interface driven directly, against every store: what a server process may rely on from any of them.

Nothing here relies on a follower being called before an operation returns: a store shared between processes
delivers later, so the tests wait (with a bound) for what the follower hears.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import pytest

from chat_service import tokens
from chat_service.errors import ChatError, ErrorKind
from chat_service.events import CloseReason, MemberJoined, Message, RoomClosed, RoomInfo, Whisper
from chat_service.memory_store import MemoryStore
from chat_service.store import Entry, RoomRecord, Seat, Signal, Store, Takeover
from chat_service.validation import name_key

T = TypeVar("T")
TIMEOUT = 10.0


class Recorder:
    """A follower that queues what it hears, for the test to await."""

    def __init__(self) -> None:
        self.entries: asyncio.Queue[Entry] = asyncio.Queue()
        self.signals: asyncio.Queue[Signal] = asyncio.Queue()
        self.whispers: asyncio.Queue[tuple[str, Whisper]] = asyncio.Queue()

    def logged(self, entry: Entry) -> None:
        self.entries.put_nowait(entry)

    def signalled(self, signal: Signal) -> None:
        self.signals.put_nowait(signal)

    def whispered(self, recipient_key: str, whisper: Whisper) -> None:
        self.whispers.put_nowait((recipient_key, whisper))


async def heard(queue: asyncio.Queue[T]) -> T:
    return await asyncio.wait_for(queue.get(), TIMEOUT)


async def seqs(recorder: Recorder, count: int) -> list[int]:
    """The seqs of the next `count` messages the recorder hears."""
    entries = [await heard(recorder.entries) for _ in range(count)]
    return [entry.seq for entry in entries if isinstance(entry, Message)]


async def claim(store: Store, room: RoomRecord, name: str, resume_token: str = "") -> Seat:
    return await store.claim(room, name, lambda key: tokens.issue(room, key), resume_token)


def line(text: str, sender: str = "alice") -> Message:
    return Message(0, sender, text, 1, "", False)


async def refused(kind: ErrorKind, operation: object) -> str:
    """The message of the ChatError of `kind` that awaiting `operation` raises."""
    assert asyncio.iscoroutine(operation)
    with pytest.raises(ChatError) as info:
        await operation
    assert info.value.kind is kind, info.value.message
    return info.value.message


async def test_rooms_are_made_once_found_listed_capped_and_closed(store: Store) -> None:
    lobby = await store.create_room("lobby")
    assert "too like 'Lobby'" in await refused(ErrorKind.ROOM_EXISTS, store.create_room("Lobby"))
    assert await store.find_room("LOBBY") == lobby
    assert await store.find_room("attic") is None
    await store.create_room("b")
    await store.create_room("a")
    assert "limit of rooms (3)" in await refused(ErrorKind.ROOM_LIMIT, store.create_room("c"))
    assert [room.name for room in await store.list_rooms()] == ["a", "b", "lobby"]
    assert store.room_count == 3
    assert await store.close_room("Lobby", CloseReason.KILLED) == lobby
    assert await store.find_room("lobby") is None
    await refused(ErrorKind.ROOM_NOT_FOUND, store.close_room("lobby", CloseReason.KILLED))
    again = await store.create_room("lobby")
    assert again.uid != lobby.uid
    await refused(ErrorKind.ROOM_NOT_FOUND, claim(store, lobby, "alice"))


async def test_closing_a_room_logs_room_closed_last_and_frees_its_names(store: Store) -> None:
    room = await store.create_room("r")
    recorder = Recorder()
    assert await store.follow(room, recorder) == 0
    await claim(store, room, "alice")
    await store.append(room, line("one"))
    await store.close_room("r", CloseReason.KILLED)
    assert await seqs(recorder, 1) == [1]
    assert await heard(recorder.entries) == RoomClosed("r", CloseReason.KILLED)
    assert store.seated == 0


async def test_prune_closes_exactly_the_rooms_where_no_name_is_held(store: Store) -> None:
    busy, held, empty = [await store.create_room(name) for name in ("busy", "held", "empty")]
    await claim(store, busy, "alice")
    await store.vacate(held, await claim(store, held, "bob"), grace=60)
    recorder = Recorder()
    await store.follow(empty, recorder)
    assert await store.prune_rooms() == ["empty"]
    assert await heard(recorder.entries) == RoomClosed("empty", CloseReason.KILLED)
    assert [room.name for room in await store.list_rooms()] == ["busy", "held"]


async def test_names_are_claimed_once_and_defaults_are_numbered(store: Store) -> None:
    room = await store.create_room("r")
    alice = await claim(store, room, "Alice")
    assert (alice.name, alice.key, alice.took_over) == ("Alice", name_key("Alice"), False)
    assert tokens.proves(alice.token, room, alice.key)
    message = await refused(ErrorKind.NAME_TAKEN, claim(store, room, "alice"))
    assert message == (
        "someone in room 'r' is already called 'Alice' (too like 'alice' to tell apart); pick another name"
    )
    first, second = await claim(store, room, ""), await claim(store, room, "")
    assert (first.name, second.name) == ("Unknown", "Unknown-2")
    await store.vacate(room, first, grace=0)
    assert (await claim(store, room, "")).name == "Unknown"
    await claim(store, room, "carol")
    assert store.seated == 4
    assert "limit of members (4)" in await refused(ErrorKind.MEMBER_LIMIT, claim(store, room, "bob"))
    assert await store.list_rooms() == [RoomInfo("r", 4, 0)]


async def test_members_are_the_names_held_live_sorted(store: Store) -> None:
    room = await store.create_room("r")
    assert await store.members(room) == []
    bob = await claim(store, room, "bob")
    await claim(store, room, "Alice")
    await claim(store, room, "carol")
    await store.vacate(room, bob, grace=60)
    assert await store.members(room) == ["Alice", "carol"]
    await store.close_room("r", CloseReason.KILLED)
    await refused(ErrorKind.ROOM_NOT_FOUND, store.members(room))


async def test_a_resume_takes_a_live_seat_over_and_signals_it(store: Store) -> None:
    room = await store.create_room("r")
    recorder = Recorder()
    await store.follow(room, recorder)
    old = await claim(store, room, "alice")
    new = await claim(store, room, "alice", resume_token=old.token)
    assert (new.name, new.token, new.took_over) == ("alice", old.token, True)
    assert new.claim != old.claim
    assert await heard(recorder.signals) == Takeover(old.key, new.claim)
    await refused(ErrorKind.NAME_TAKEN, claim(store, room, "alice", resume_token=tokens.issue(room, old.key)))
    # The old holder's leaving comes after the takeover: the name stays live under the new claim.
    await store.vacate(room, old, grace=0)
    assert [info.member_count for info in await store.list_rooms()] == [1]
    assert store.seated == 1


async def test_a_vacated_name_is_held_for_the_grace_then_freed(store: Store) -> None:
    room = await store.create_room("r")
    bob = await claim(store, room, "bob")
    await store.vacate(room, bob, grace=60)
    assert [info.member_count for info in await store.list_rooms()] == [0]
    assert "connection dropped" in await refused(ErrorKind.NAME_TAKEN, claim(store, room, "bob"))
    back = await claim(store, room, "bob", resume_token=bob.token)
    assert (back.token, back.took_over) == (bob.token, False)
    await store.vacate(room, back, grace=0.05)
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                fresh = await claim(store, room, "bob")
            except ChatError as error:
                assert error.kind is ErrorKind.NAME_TAKEN
                # The grace runs out on the store's clock; there is nothing to await for it.
                await asyncio.sleep(0.05)
            else:
                break
    assert fresh.token != bob.token
    # A resume token of a name that was freed claims it anew.
    await store.vacate(room, fresh, grace=0)
    renewed = await claim(store, room, "bob", resume_token=bob.token)
    assert (renewed.took_over, renewed.token != bob.token) == (False, True)


async def test_appends_get_gap_free_seqs_in_the_order_followers_hear_them(store: Store) -> None:
    room = await store.create_room("r")
    recorder = Recorder()
    await store.follow(room, recorder)
    appended = await asyncio.gather(*(store.append(room, line(str(i))) for i in range(20)))
    assert sorted(a.message.seq for a in appended) == list(range(1, 21))
    assert not any(a.duplicate for a in appended)
    assert await seqs(recorder, 20) == list(range(1, 21))
    assert [info.last_seq for info in await store.list_rooms()] == [20]


async def test_appends_started_together_are_logged_in_the_order_called(store: Store) -> None:
    room = await store.create_room("r")
    # Into a room not followed and not yet written (the NATS store's writer then learns the log's tail itself), then
    # into the room followed. Each task runs to its first pause before the next starts, as pipelined lines do.
    for first in (1, 41):
        if first == 41:
            await store.follow(room, Recorder())
        appends = [asyncio.create_task(store.append(room, line(str(seq)))) for seq in range(first, first + 40)]
        appended = await asyncio.gather(*appends)
        assert [(a.message.seq, a.message.text) for a in appended] == [
            (seq, str(seq)) for seq in range(first, first + 40)
        ]


async def test_an_append_with_a_known_dedup_key_is_logged_once(store: Store) -> None:
    room = await store.create_room("r")
    recorder = Recorder()
    await store.follow(room, recorder)
    first = await store.append(room, line("hello"), dedup_key="k1")
    again = await store.append(room, line("hello again"), dedup_key="k1")
    other = await store.append(room, line("next"), dedup_key="k2")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.message == first.message
    assert (first.message.seq, first.message.text, other.message.seq) == (1, "hello", 2)
    assert await seqs(recorder, 2) == [1, 2]


async def test_read_gives_the_newest_or_what_followed_a_seq_and_counts_the_lost(store: Store) -> None:
    room = await store.create_room("r")
    for i in range(8):
        await store.append(room, line(str(i)))
    newest = await store.read(room, last=3)
    assert ([m.seq for m in newest.messages], newest.lost, newest.last_seq) == ([6, 7, 8], 0, 8)
    resumed = await store.read(room, after=1)
    assert ([m.seq for m in resumed.messages], resumed.lost, resumed.last_seq) == ([4, 5, 6, 7, 8], 2, 8)
    assert [m.text for m in resumed.messages] == ["3", "4", "5", "6", "7"]
    caught_up = await store.read(room, after=8)
    assert (caught_up.messages, caught_up.lost) == ([], 0)


async def test_a_follower_hears_from_the_seq_follow_returns_until_it_unfollows(store: Store) -> None:
    room = await store.create_room("r")
    await store.append(room, line("before"))
    early = Recorder()
    assert await store.follow(room, early) == 1
    await store.append(room, line("heard"))
    assert await seqs(early, 1) == [2]
    await store.unfollow(room)
    await store.append(room, line("unheard"))
    late = Recorder()
    assert await store.follow(room, late) == 3
    await store.append(room, line("heard again"))
    await store.signal(room, MemberJoined("bob"))
    assert await seqs(late, 1) == [4]
    assert await heard(late.signals) == MemberJoined("bob")
    assert early.entries.empty()
    assert early.signals.empty()
    await refused(ErrorKind.ROOM_NOT_FOUND, store.follow(RoomRecord("gone", "uid", b"secret"), Recorder()))


async def test_a_whisper_reaches_the_live_recipient_and_not_a_held_or_missing_one(store: Store) -> None:
    room = await store.create_room("r")
    recorder = Recorder()
    await store.follow(room, recorder)
    await claim(store, room, "alice")
    bob = await claim(store, room, "Bob")
    whisper = Whisper("alice", "bob", "psst", 1)
    assert await store.whisper(room, "bob", whisper) == "Bob"
    assert await heard(recorder.whispers) == (bob.key, whisper)
    message = await refused(ErrorKind.MEMBER_NOT_FOUND, store.whisper(room, "carol", whisper))
    assert message == "nobody named 'carol' is in room 'r'"
    await store.vacate(room, bob, grace=60)
    message = await refused(ErrorKind.MEMBER_NOT_FOUND, store.whisper(room, "bob", whisper))
    assert message == "bob lost their connection and may be back shortly; try again later"
    assert recorder.whispers.empty()


async def test_closing_the_memory_store_closes_every_room(store: Store) -> None:
    if not isinstance(store, MemoryStore):
        pytest.skip("a shared store keeps its rooms for the other server processes")
    recorders = {}
    for name in ("a", "b"):
        recorders[name] = Recorder()
        await store.follow(await store.create_room(name), recorders[name])
    await store.close()
    for name, recorder in recorders.items():
        assert await heard(recorder.entries) == RoomClosed(name, CloseReason.SERVER_SHUTDOWN)
    assert await store.list_rooms() == []
    await refused(ErrorKind.ROOM_NOT_FOUND, store.create_room("c"))
