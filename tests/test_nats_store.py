"""The JetStream store through the Store interface, against a real nats-server: two stores on two connections stand
for two server processes sharing it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chat_service.errors import ChatError, ErrorKind
from chat_service.events import CloseReason, MemberJoined, Message, RoomClosed, Whisper
from chat_service.nats_store import DEFAULT_LIVENESS_SECONDS, NatsStore, connect
from chat_service.store import Entry, RoomRecord, Signal, Takeover
from tests.nats import NatsNode, nats_cluster, unused_port

# Bounds every wait: far above what a busy 2-core machine needs, and only reached when something is broken.
WAIT = 20.0
LIVENESS = 1.5


class Recorder:
    """A follower that keeps what it hears, and lets a test await it."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.signals: list[Signal] = []
        self.whispers: list[tuple[str, Whisper]] = []
        self._changed = asyncio.Event()

    def logged(self, entry: Entry) -> None:
        self.entries.append(entry)
        self._changed.set()

    def signalled(self, signal: Signal) -> None:
        self.signals.append(signal)
        self._changed.set()

    def whispered(self, recipient_key: str, whisper: Whisper) -> None:
        self.whispers.append((recipient_key, whisper))
        self._changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait, bounded, until `done()` holds."""
        async with asyncio.timeout(WAIT):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    def seqs(self) -> list[int]:
        return [entry.seq for entry in self.entries if isinstance(entry, Message)]


class Availability:
    """Records a store's changes of availability, and lets a test await one."""

    def __init__(self) -> None:
        self.changes: list[bool] = []
        self._changed = asyncio.Event()

    def __call__(self, available: bool) -> None:
        self.changes.append(available)
        self._changed.set()

    async def until(self, available: bool) -> None:
        async with asyncio.timeout(WAIT):
            while not self.changes or self.changes[-1] is not available:
                self._changed.clear()
                await self._changed.wait()


def token(key: str) -> str:
    return f"token-for-{key}"


def line(sender: str, text: str) -> Message:
    return Message(0, sender, text, time.time_ns())


async def open_store(node: NatsNode, **options: float) -> NatsStore:
    return await connect([node.url], replicas=1, liveness=options.pop("liveness", LIVENESS), **options)  # type: ignore[arg-type]


@pytest.fixture
async def stores(nats: NatsNode) -> AsyncIterator[tuple[NatsStore, NatsStore]]:
    """Two stores on one NATS, as two server processes see it."""
    first = await open_store(nats)
    second = await open_store(nats)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_processes_starting_together_share_one_stream_and_buckets(nats: NatsNode) -> None:
    starting = [open_store(nats) for _ in range(3)]
    # One with other limits: the stream made first stands, and this one binds to it.
    starting.append(open_store(nats, history_limit=50))
    stores = await asyncio.gather(*starting)
    try:
        room = await stores[0].create_room("shared")
        assert [await store.find_room("shared") for store in stores] == [room] * 4
    finally:
        for store in stores:
            await store.close()


async def test_a_create_race_has_one_winner_and_both_list_the_room(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    results = await asyncio.gather(first.create_room("lobby"), second.create_room("Lobby"), return_exceptions=True)
    records = [result for result in results if isinstance(result, RoomRecord)]
    refusals = [result for result in results if isinstance(result, ChatError)]
    assert len(records) == 1 and len(refusals) == 1, results
    assert refusals[0].kind is ErrorKind.ROOM_EXISTS
    assert await first.find_room("LOBBY") == await second.find_room("lobby") == records[0]
    assert await first.list_rooms() == await second.list_rooms()
    assert [room.name for room in await second.list_rooms()] == [records[0].name]


async def test_appends_from_two_processes_reach_every_follower_in_one_gap_free_order(
    stores: tuple[NatsStore, NatsStore],
) -> None:
    first, second = stores
    room = await first.create_room("race")
    heard = Recorder(), Recorder()
    assert await first.follow(room, heard[0]) == 0
    assert await second.follow(room, heard[1]) == 0
    sent = 40

    async def say(store: NatsStore, who: str) -> list[int]:
        return [(await store.append(room, line(who, f"{who} {n}"))).message.seq for n in range(sent)]

    seqs = await asyncio.gather(say(first, "ann"), say(second, "bob"))
    assert sorted(seqs[0] + seqs[1]) == list(range(1, 2 * sent + 1))
    for recorder in heard:
        await recorder.until(lambda recorder=recorder: len(recorder.entries) == 2 * sent)  # type: ignore[misc]
    assert heard[0].entries == heard[1].entries
    assert heard[0].seqs() == list(range(1, 2 * sent + 1))


async def test_a_dedup_key_logs_a_message_once(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    room = await first.create_room("dedup")
    kept = await first.append(room, line("ann", "hello"), dedup_key="ann/1")
    again = await second.append(room, line("ann", "hello again"), dedup_key="ann/1")
    assert not kept.duplicate and again.duplicate
    assert again.message == kept.message
    assert (await second.read(room, last=10)).messages == [kept.message]


async def test_a_group_commit_answers_a_re_sent_line_from_the_log(nats: NatsNode) -> None:
    first, second = await open_store(nats), await open_store(nats)
    late = None
    try:
        room = await first.create_room("batched")
        heard = Recorder(), Recorder()
        await first.follow(room, heard[0])
        await second.follow(room, heard[1])
        # Appends made together while none is in flight go as one entry: JetStream's message id names the entry,
        # not the line, so only the log can tell that a line in it comes again.
        said = await asyncio.gather(
            *(first.append(room, line("ann", text), dedup_key=f"ann/{text}") for text in ("a", "b", "c", "d"))
        )
        again = await asyncio.gather(
            second.append(room, line("bob", "e"), dedup_key="bob/e"),
            second.append(room, line("ann", "c re-sent"), dedup_key="ann/c"),
            second.append(room, line("bob", "f"), dedup_key="bob/f"),
        )
        assert again[1].duplicate and again[1].message == said[2].message
        assert not any(appended.duplicate for appended in [*said, again[0], again[2]])
        # A process that does not follow the room, or follows it afterwards as a resume on another server does, reads
        # the key from the log too.
        late = await open_store(nats)
        outside = await late.append(room, line("ann", "c from outside"), dedup_key="ann/c")
        await late.follow(room, Recorder())
        resumed = await late.append(room, line("ann", "c once more"), dedup_key="ann/c")
        assert outside.duplicate and resumed.duplicate
        assert outside.message == resumed.message == said[2].message
        texts = ["a", "b", "c", "d", "e", "f"]
        for recorder in heard:
            await recorder.until(lambda recorder=recorder: len(recorder.entries) == len(texts))  # type: ignore[misc]
            assert recorder.seqs() == list(range(1, len(texts) + 1))
            assert [entry.text for entry in recorder.entries if isinstance(entry, Message)] == texts
        backlog = await first.read(room, after=1)
        assert [message.text for message in backlog.messages] == texts[1:] and backlog.lost == 0
        info = await first._js.stream_info("CHAT_LOG", subjects_filter=f"chat.log.{room.uid}")
        assert info.state.subjects is not None and info.state.subjects[f"chat.log.{room.uid}"] < len(texts)
    finally:
        for store in (first, second, late):
            if store is not None:
                await store.close()


async def test_read_gives_the_newest_or_what_followed_a_seq(nats: NatsNode) -> None:
    store = await open_store(nats, history_limit=5)
    try:
        room = await store.create_room("history")
        for n in range(8):
            await store.append(room, line("ann", f"line {n}"))
        newest = await store.read(room, last=3)
        assert [m.text for m in newest.messages] == ["line 5", "line 6", "line 7"]
        assert (newest.lost, newest.last_seq) == (0, 8)
        resumed = await store.read(room, after=6)
        assert ([m.seq for m in resumed.messages], resumed.lost) == ([7, 8], 0)
        # Five kept of eight: after message 1, messages 2 and 3 are gone.
        lost = await store.read(room, after=1)
        assert ([m.seq for m in lost.messages], lost.lost) == ([4, 5, 6, 7, 8], 2)
        assert (await store.read(room, after=8)).messages == []
    finally:
        await store.close()


async def test_claims_take_over_vacate_and_hold_for_the_grace(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    room = await first.create_room("names")
    heard = Recorder()
    await first.follow(room, heard)
    ann = await first.claim(room, "ann", token)
    with pytest.raises(ChatError) as taken:
        await second.claim(room, "ANN", token)
    assert taken.value.kind is ErrorKind.NAME_TAKEN
    defaults = [await second.claim(room, "", token) for _ in range(2)]
    assert [seat.name for seat in defaults] == ["Unknown", "Unknown-2"]
    # A resume with the seat's token takes it from the member holding it, who is told.
    back = await second.claim(room, "ann", token, resume_token=ann.token)
    assert back.took_over and back.claim != ann.claim
    await heard.until(lambda: Takeover(ann.key, back.claim) in heard.signals)
    await first.vacate(room, ann, grace=0)  # the old claim: nothing happens
    with pytest.raises(ChatError):
        await first.claim(room, "ann", token)
    await second.vacate(room, back, grace=30)
    with pytest.raises(ChatError) as held:
        await first.claim(room, "ann", token)
    assert "held for a member whose connection dropped" in held.value.message
    returned = await first.claim(room, "ann", token, resume_token=ann.token)
    assert not returned.took_over
    await first.vacate(room, returned, grace=0)
    assert (await second.claim(room, "ann", token)).name == "ann"
    assert (first.seated, second.seated) == (0, 3)


async def test_a_held_seat_is_free_after_its_grace(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    room = await first.create_room("grace")
    seat = await first.claim(room, "ann", token)
    await first.vacate(room, seat, grace=0.2)
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await second.claim(room, "ann", token)
                break
            except ChatError as error:
                assert error.kind is ErrorKind.NAME_TAKEN
                await asyncio.sleep(0.1)


async def test_a_whisper_reaches_a_member_of_another_process(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    room = await first.create_room("whispers")
    heard = Recorder()
    await second.follow(room, heard)
    bob = await second.claim(room, "bob", token)
    await first.claim(room, "ann", token)
    whisper = Whisper("ann", "bob", "psst", time.time_ns())
    assert await first.whisper(room, "BOB", whisper) == "bob"
    await heard.until(lambda: heard.whispers == [(bob.key, whisper)])
    with pytest.raises(ChatError) as nobody:
        await first.whisper(room, "carol", whisper)
    assert nobody.value.kind is ErrorKind.MEMBER_NOT_FOUND
    await second.vacate(room, bob, grace=30)
    with pytest.raises(ChatError) as away:
        await first.whisper(room, "bob", whisper)
    assert "lost their connection" in away.value.message


async def test_signals_reach_every_follower(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    # Signalled right after the follow returns: a subscription still on its way to NATS missed it (1 time in 20).
    for number in range(20):
        room = await first.create_room(f"signals-{number}")
        heard = Recorder(), Recorder()
        await first.follow(room, heard[0])
        await second.follow(room, heard[1])
        await first.signal(room, MemberJoined("ann"))
        for recorder in heard:
            await recorder.until(lambda recorder=recorder: recorder.signals == [MemberJoined("ann")])  # type: ignore[misc]
    with pytest.raises(ChatError) as unknown:
        await first.follow(RoomRecord("gone", "uid", b"secret"), Recorder())
    assert unknown.value.kind is ErrorKind.ROOM_NOT_FOUND


async def test_the_names_of_a_process_that_died_are_free_within_seconds(nats: NatsNode) -> None:
    first = await open_store(nats)
    second = await open_store(nats)
    try:
        room = await first.create_room("crash")
        await first.claim(room, "ann", token)
        with pytest.raises(ChatError):
            await second.claim(room, "ann", token)
        # A crash: the connection goes without the store vacating or removing its heartbeat.
        await first._nc.close()
        async with asyncio.timeout(WAIT):
            while True:
                try:
                    seat = await second.claim(room, "ann", token)
                    break
                except ChatError as error:
                    assert error.kind is ErrorKind.NAME_TAKEN
                    await asyncio.sleep(0.2)
        assert seat.name == "ann"
    finally:
        await first.close()
        await second.close()


async def test_closing_a_room_is_logged_and_seen_by_every_process(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    room = await first.create_room("doomed")
    heard = Recorder(), Recorder()
    await first.follow(room, heard[0])
    await second.follow(room, heard[1])
    await first.append(room, line("ann", "bye"))
    await first.claim(room, "ann", token)
    assert await second.close_room("DOOMED", CloseReason.KILLED) == room
    closed = RoomClosed("doomed", CloseReason.KILLED)
    for recorder in heard:
        await recorder.until(lambda recorder=recorder: closed in recorder.entries)  # type: ignore[misc]
        assert recorder.seqs() == [1] and recorder.entries[-1] == closed
    with pytest.raises(ChatError) as gone:
        await first.append(room, line("ann", "too late"))
    assert gone.value.kind is ErrorKind.ROOM_NOT_FOUND
    with pytest.raises(ChatError):
        await second.read(room, last=5)
    with pytest.raises(ChatError):
        await first.close_room("doomed", CloseReason.KILLED)
    assert await first.find_room("doomed") is None and await second.list_rooms() == []
    assert first.seated == 0
    again = await first.create_room("doomed")
    assert again.uid != room.uid and (await first.claim(again, "ann", token)).name == "ann"


async def test_prune_closes_the_rooms_where_no_name_is_held(stores: tuple[NatsStore, NatsStore]) -> None:
    first, second = stores
    used = await first.create_room("used")
    await second.create_room("empty")
    await second.claim(used, "bob", token)
    assert await first.prune_rooms() == ["empty"]
    assert [room.name for room in await second.list_rooms()] == ["used"]
    assert [(room.member_count, room.last_seq) for room in await first.list_rooms()] == [(1, 0)]


async def test_rooms_left_empty_for_the_ttl_are_closed(nats: NatsNode) -> None:
    # The default liveness: with the short one a busy machine once delayed a heartbeat past it, and ann's seat, whose
    # holder then looked dead, no longer kept "used" from being swept.
    first = await open_store(nats, liveness=DEFAULT_LIVENESS_SECONDS)
    sweeper: NatsStore | None = None
    try:
        used = await first.create_room("used")
        await first.claim(used, "ann", token)
        empty = await first.create_room("empty")
        heard = Recorder()
        await first.follow(empty, heard)
        sweeper = await connect([nats.url], replicas=1, liveness=DEFAULT_LIVENESS_SECONDS, empty_room_ttl=0.4)
        await heard.until(lambda: heard.entries == [RoomClosed("empty", CloseReason.KILLED)])
        assert [room.name for room in await sweeper.list_rooms()] == ["used"]
    finally:
        if sweeper is not None:
            await sweeper.close()
        await first.close()


async def test_rooms_and_logs_outlive_a_restart_of_nats(nats: NatsNode) -> None:
    availability = Availability()
    store = await connect([nats.url], replicas=1, on_availability=availability)
    try:
        room = await store.create_room("lasting")
        heard = Recorder()
        await store.follow(room, heard)
        await store.append(room, line("ann", "remember me"))
        await nats.stop()
        await availability.until(False)
        nats.start()
        await nats.ready()
        await availability.until(True)
        assert await store.find_room("lasting") == room
        assert [m.text for m in (await store.read(room, last=5)).messages] == ["remember me"]
        # The follower's consumer went with NATS's memory; the client makes it anew and hears another process.
        other = await open_store(nats)
        try:
            assert (await other.append(room, line("bob", "still here"))).message.seq == 2
        finally:
            await other.close()
        await heard.until(lambda: heard.seqs() == [1, 2])
    finally:
        await store.close()


async def test_operations_refuse_while_nats_is_away(nats: NatsNode) -> None:
    availability = Availability()
    store = await connect([nats.url], replicas=1, on_availability=availability)
    try:
        await nats.stop()
        await availability.until(False)
        assert not store.available
        with pytest.raises(ChatError) as refused:
            await store.create_room("later")
        assert refused.value.kind is ErrorKind.STORE_UNAVAILABLE
        assert refused.value.message == "the message store is unreachable; try again shortly"
    finally:
        await store.close()


async def test_a_cluster_replicates_each_room_on_three_nodes(tmp_path: Path) -> None:
    async with nats_cluster(tmp_path / "cluster") as nodes:
        # Every URL given: the servers a cluster announces can come a moment after its health check passes.
        urls = [node.url for node in nodes]
        first = await connect(urls, replicas=None, liveness=LIVENESS)
        second = await connect(urls[::-1], replicas=None, liveness=LIVENESS)
        try:
            assert first.replicas == 3
            room = await first.create_room("everywhere")
            heard = Recorder()
            await second.follow(room, heard)
            await first.append(room, line("ann", "hello"))
            await second.append(room, line("bob", "hi"))
            await heard.until(lambda: heard.seqs() == [1, 2])
        finally:
            await first.close()
            await second.close()


async def test_losing_a_nats_node_mid_burst_loses_and_repeats_nothing(tmp_path: Path) -> None:
    async with nats_cluster(tmp_path / "cluster") as nodes:
        urls = [node.url for node in nodes]
        first = await connect(urls, replicas=None, liveness=LIVENESS)
        second = await connect(urls, replicas=None, liveness=LIVENESS)
        try:
            assert first.replicas == 3
            room = await first.create_room("sturdy")
            heard = Recorder()
            # A cluster just formed on a busy machine may leave a read unanswered for a while (a CI run timed out on
            # one): the burst starts once the second process reads the room.
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        await second.follow(room, heard)
                        break
                    except ChatError as error:
                        assert error.kind is ErrorKind.STORE_UNAVAILABLE
            burst = 100

            async def say(store: NatsStore, who: str) -> None:
                for n in range(burst):
                    await store.append(room, line(who, f"{who} {n}"), dedup_key=f"{who}/{n}")

            sending = asyncio.gather(say(first, "ann"), say(second, "bob"))
            await heard.until(lambda: len(heard.entries) >= burst // 4)
            connected = first._nc.connected_url
            assert connected is not None
            await next(node for node in nodes if node.port == connected.port).stop(kill=True)
            await sending
            await heard.until(lambda: len(heard.entries) >= 2 * burst)
            assert heard.seqs() == list(range(1, 2 * burst + 1))
            said = sorted(entry.text for entry in heard.entries if isinstance(entry, Message))
            assert said == sorted(f"{who} {n}" for who in ("ann", "bob") for n in range(burst))
        finally:
            await first.close()
            await second.close()


async def test_a_nats_without_jetstream_is_one_clear_error(tmp_path: Path) -> None:
    node = NatsNode(tmp_path, jetstream=False)
    node.start()
    try:
        await node.ready()
        with pytest.raises(ChatError) as refused:
            await connect([node.url], replicas=1, request_timeout=2)
        assert refused.value.kind is ErrorKind.STORE_UNAVAILABLE
        assert "--jetstream" in refused.value.message
    finally:
        await node.stop()


async def test_a_missing_nats_is_one_clear_error() -> None:
    with pytest.raises(ChatError) as refused:
        await connect([f"nats://127.0.0.1:{unused_port()}"], replicas=1, request_timeout=1)
    assert refused.value.kind is ErrorKind.STORE_UNAVAILABLE


async def test_lines_appended_a_few_turns_apart_share_an_entry(nats: NatsNode) -> None:
    store = await open_store(nats)
    try:
        room = await store.create_room("turns")
        heard = Recorder()
        await store.follow(room, heard)

        async def say(text: str, turns: int) -> Message:
            # A sender's pipelined lines are read a loop turn or a few apart, not all at once.
            for _ in range(turns):
                await asyncio.sleep(0)
            return (await store.append(room, line("ann", text))).message

        said = await asyncio.gather(*(say(text, turns) for turns, text in enumerate("abcd")))
        assert [message.seq for message in said] == [1, 2, 3, 4]
        await heard.until(lambda: len(heard.entries) == len(said))
        assert heard.entries == said
        info = await store._js.stream_info("CHAT_LOG", subjects_filter=f"chat.log.{room.uid}")
        assert info.state.subjects == {f"chat.log.{room.uid}": 1}
    finally:
        await store.close()
