"""A member's lines are pipelined: each goes to the store as soon as it is read, while the ones before it are still
being logged, and yet the member's requests take effect in the order sent. Through a real server over each store."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import nats as nats_client
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service import nats_store
from chat_service.errors import ChatError
from chat_service.events import Message
from chat_service.memory_store import MemoryStore
from chat_service.server import ChatServer, Config
from chat_service.service import DEFAULT_LINES_IN_FLIGHT
from chat_service.store import Appended, RoomRecord, Store
from chat_service.validation import MAX_TEXT_BYTES
from tests.conftest import UNLIMITED, empty_nats, make_store
from tests.lagging_store import LaggingStore
from tests.nats import NatsNode
from tests.streams import Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub

WAIT = 20.0


# A server over each: "slow-log" stands for a store whose log is slower than its whispers, as JetStream's commits
# are next to core NATS, but without a network, so that a request overtaking the lines before it always shows.
KINDS = ["memory", "slow-log", "nats"]
# Loop turns a slow log's append takes.
SLOW_TURNS = 20


class SlowLog(LaggingStore):
    """The lagging in-memory store, but its appends queue in call order and are logged SLOW_TURNS loop turns later;
    while `flowing` is clear they wait."""

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(inner)
        self._queued: deque[tuple[RoomRecord, Message, str, asyncio.Future[Appended]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._appended = asyncio.Event()
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def append(self, room: RoomRecord, message: Message, dedup_key: str = "") -> Appended:
        kept: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queued.append((room, message, dedup_key, kept))
        self._appended.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        return await kept

    async def until_waiting(self, count: int) -> None:
        """Wait, bounded, until `count` appends wait for their callers."""
        async with asyncio.timeout(WAIT):
            while self.waiting() < count:
                self._appended.clear()
                await self._appended.wait()

    def waiting(self) -> int:
        """Appends not logged yet whose callers still wait for them."""
        return sum(not kept.done() for *_, kept in self._queued)

    async def _write(self) -> None:
        try:
            while self._queued:
                await self.flowing.wait()
                for _ in range(SLOW_TURNS):
                    await asyncio.sleep(0)
                room, message, dedup_key, kept = self._queued.popleft()
                if kept.done():
                    continue
                try:
                    kept.set_result(await self.inner.append(room, message, dedup_key))
                except ChatError as error:
                    kept.set_exception(error)
        finally:
            self._writer = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        await super().close()


@pytest.fixture(params=KINDS)
async def kind(request: pytest.FixtureRequest) -> str:
    """Which store the server runs over: one of KINDS, but for "nats" the URL of the session's nats-server, emptied."""
    if request.param != "nats":
        return str(request.param)
    node: NatsNode = request.getfixturevalue("shared_nats")
    await empty_nats(node.url)
    return node.url


@contextlib.asynccontextmanager
async def serving(kind: str, lines_in_flight: int = DEFAULT_LINES_IN_FLIGHT) -> AsyncIterator[Stub]:
    """A stub of a real server without rate limits over a new store of `kind`."""
    store: Store | None = None
    if kind == "slow-log":
        store = SlowLog(MemoryStore())
    elif kind != "memory":
        store = await make_store(kind)
    async with serving_over(store, lines_in_flight) as stub:
        yield stub


@contextlib.asynccontextmanager
async def serving_over(store: Store | None, lines_in_flight: int = DEFAULT_LINES_IN_FLIGHT) -> AsyncIterator[Stub]:
    """A stub of a real server without rate limits over `store` (None: a new in-memory one)."""
    config = Config(port=0, grace_seconds=1.0, limits=UNLIMITED, lines_in_flight=lines_in_flight)
    chat = ChatServer(config, token="test-admin-token", store=store)
    await chat.start()
    try:
        async with grpc.aio.insecure_channel(chat.address) as channel:
            yield chat_pb2_grpc.ChatServiceStub(channel)
    finally:
        await chat.stop()


async def say(stream: Stream, text: str, client_id: str) -> None:
    await stream.call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=text, client_id=client_id)))


async def heard(stream: Stream, count: int) -> list[pb.Event]:
    """The next `count` messages, whispers and errors of `stream`, skipping presence."""
    events: list[pb.Event] = []
    while len(events) < count:
        event = await stream.next(WAIT)
        if event.WhichOneof("kind") in ("message", "whisper", "error"):
            events.append(event)
    return events


async def log_entries(url: str) -> int:
    """How many entries the JetStream log holds, over every room."""
    connection = await nats_client.connect(url)
    try:
        info = await connection.jetstream().stream_info(nats_store.LOG_STREAM)
        return info.state.messages
    finally:
        await connection.close()


@pytest.mark.parametrize("lines_in_flight", [DEFAULT_LINES_IN_FLIGHT, 1])
async def test_a_burst_of_lines_is_logged_in_order_in_shared_entries(
    shared_nats: NatsNode, lines_in_flight: int
) -> None:
    await empty_nats(shared_nats.url)
    count = 100 if lines_in_flight > 1 else 20
    async with serving(shared_nats.url, lines_in_flight) as stub:
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        bob, _ = await Stream.joined(stub, "r", "bob")
        for n in range(count):
            await say(alice, f"line {n}", f"c{n}")
        expected = [(n + 1, "alice", f"line {n}", f"c{n}") for n in range(count)]
        for stream in (alice, bob):
            events = await heard(stream, count)
            assert [(e.message.seq, e.message.sender, e.message.text, e.message.client_id) for e in events] == expected
        # Each line waiting for the one before to be kept, as with one in flight, logs one entry per line.
        entries = await log_entries(shared_nats.url)
        assert entries < count if lines_in_flight > 1 else entries == count


async def test_a_whisper_after_lines_comes_after_them(kind: str) -> None:
    async with serving(kind) as stub:
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        bob, _ = await Stream.joined(stub, "r", "bob")
        for n in range(30):
            await say(alice, f"line {n}", f"c{n}")
        whisper = pb.ChatRequest.SendWhisper(recipient="bob", text="psst", client_id="w")
        await alice.call.write(pb.ChatRequest(whisper=whisper))
        events = await heard(bob, 31)
        assert [e.message.text for e in events[:30]] == [f"line {n}" for n in range(30)]
        assert (events[30].whisper.sender, events[30].whisper.text) == ("alice", "psst")


async def test_a_refused_line_among_good_ones_is_reported_by_its_id(kind: str) -> None:
    async with serving(kind) as stub:
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        for n in range(10):
            await say(alice, "x" * (MAX_TEXT_BYTES + 1) if n == 4 else f"line {n}", f"c{n}")
        events = await heard(alice, 10)
        errors = [e.error for e in events if e.WhichOneof("kind") == "error"]
        assert [(error.code, error.client_id) for error in errors] == [(pb.ERROR_CODE_INVALID_TEXT, "c4")]
        logged = [(e.message.seq, e.message.client_id) for e in events if e.WhichOneof("kind") == "message"]
        assert logged == [(seq, f"c{n}") for seq, n in enumerate([0, 1, 2, 3, 5, 6, 7, 8, 9], start=1)]


async def test_a_stream_cancelled_with_lines_in_flight_leaves_none_behind() -> None:
    store = SlowLog(MemoryStore())
    async with serving_over(store) as stub:
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        bob, _ = await Stream.joined(stub, "r", "bob")
        store.flowing.clear()
        for n in range(5):
            await say(alice, f"line {n}", f"c{n}")
        await store.until_waiting(5)
        alice.call.cancel()
        assert (await bob.next_of("member_left", WAIT)).member_left.name == "alice"
        # The lines' tasks go with the stream rather than wait for a store that does not answer. Nothing announces
        # that they have gone, so it is asked for, bounded.
        async with asyncio.timeout(WAIT):
            while store.waiting():  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def test_lines_sent_before_a_half_close_are_all_logged_before_the_member_goes(kind: str) -> None:
    async with serving(kind) as stub:
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        bob, _ = await Stream.joined(stub, "r", "bob")
        for n in range(20):
            await say(alice, f"line {n}", f"c{n}")
        await alice.call.done_writing()
        texts = []
        while (event := await bob.next(WAIT)).WhichOneof("kind") != "member_left":
            assert event.WhichOneof("kind") == "message", event
            texts.append(event.message.text)
        assert texts == [f"line {n}" for n in range(20)]
        await alice.expect_end(WAIT)
