"""A Session and the `chat` client that lose their connection: they reconnect, resume, and lose nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_cli import render
from chat_cli.protocol import Incoming, SessionError
from chat_cli.session import Session
from chat_service.server import ChatServer, Config
from tests.conftest import ServerProcess, executable, running, start_server_process
from tests.proc import Proc
from tests.proxy import Proxy
from tests.recorder import Recorder
from tests.streams import Stream

GONE = "room lobby no longer exists (it was closed, or the server restarted); you are back in the waiting state"


@pytest.fixture
async def proxy(server: ChatServer) -> AsyncIterator[Proxy]:
    """A cuttable loopback proxy in front of the in-process server."""
    async with Proxy(server.port) as forwarding:
        yield forwarding


@contextlib.asynccontextmanager
async def carol_behind(proxy: Proxy, *, create: bool = False) -> AsyncIterator[tuple[Session, Recorder]]:
    """A Session that joined (or created) room lobby as carol through the proxy, closed on exit."""
    seen = Recorder()
    async with Session(proxy.address, seen) as carol:
        await carol.connect()
        assert await (carol.create if create else carol.join)("lobby", "carol") is not None
        yield carol, seen


async def cut_until_reconnecting(proxy: Proxy, seen: Recorder) -> None:
    """Cut the network and wait until the session has failed one attempt to come back."""
    proxy.cut()
    await seen.until_true(lambda: len(seen.attempts) >= 2)


SENDERS = 9
LINES_EACH = 112
# Each sender says its first lines freely, waits for the cut, says more while the proxied member is away,
# and says the rest once that member has resumed.
WAIT_FOR_CUT_AT = 40
WAIT_FOR_RESUME_AT = 80
CUT_AFTER = 50
PENDING = ["carol while cut 0", "carol while cut 1", "carol while cut 2"]
TOTAL = SENDERS * LINES_EACH + len(PENDING)


class Burst:
    """Members on direct streams saying their lines around the cut of a proxied member, and what each heard."""

    def __init__(self, members: list[Stream], proxy: Proxy) -> None:
        self.members = members
        self.proxy = proxy
        self.seen = Recorder()
        self.cut, self.resumed, self.halfway = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def on_event(self, incoming: Incoming, me: str) -> None:
        """The proxied Session's handler: it records, and cuts the network in the middle of the burst."""
        self.seen(incoming, me)
        if len(self.seen.messages) == CUT_AFTER and not self.cut.is_set():
            self.proxy.cut()
            self.cut.set()
        if isinstance(incoming, pb.Event) and incoming.joined.resumed:
            self.resumed.set()

    async def speak(self, index: int) -> None:
        for n in range(LINES_EACH):
            if n == WAIT_FOR_CUT_AT:
                await self.cut.wait()
            if n == WAIT_FOR_RESUME_AT:
                await self.resumed.wait()
            await self.members[index].say(f"m{index} line {n}")

    async def listen(self, index: int) -> list[pb.Event]:
        events: list[pb.Event] = []
        count = 0
        while count < TOTAL:
            event = await self.members[index].next()
            events.append(event)
            count += event.HasField("message")
            if count == SENDERS * WAIT_FOR_RESUME_AT:
                self.halfway.set()
        return events


@pytest.mark.unlimited
async def test_burst_through_a_cut_reaches_every_member_exactly_once(
    stub: chat_pb2_grpc.ChatServiceAsyncStub, proxy: Proxy
) -> None:
    members = [(await Stream.joined(stub, "burst", "m0", create=True))[0]]
    members += [(await Stream.joined(stub, "burst", f"m{i}"))[0] for i in range(1, SENDERS)]
    burst = Burst(members, proxy)
    seen = burst.seen
    async with Session(proxy.address, burst.on_event) as carol, asyncio.timeout(30):
        await carol.connect()
        await carol.join("burst", "carol")
        speakers = [asyncio.create_task(burst.speak(i)) for i in range(SENDERS)]
        listeners = [asyncio.create_task(burst.listen(i)) for i in range(SENDERS)]
        await seen.until_true(lambda: len(seen.attempts) >= 2)
        # The server has had every line said before the resume, so some must be replayed.
        await burst.halfway.wait()
        for text in PENDING[:2]:
            assert await carol.say(text)
        assert await carol.whisper("m0", "carol whispers while cut")
        assert await carol.say(PENDING[2])
        assert carol.reconnecting
        proxy.restore()
        await asyncio.gather(*speakers)
        heard = await asyncio.gather(*listeners)
        await seen.until_true(lambda: len(seen.messages) >= TOTAL)
        # Anything delivered twice would come before the echo of a line said after everything else.
        await carol.say("the end")
        await seen.until_true(lambda: seen.messages[-1].text == "the end")

    assert seen.lost == []
    # The server sent no message twice: none had to be dropped on this side.
    assert carol.repeats_dropped == 0
    assert [message.seq for message in seen.messages] == list(range(1, TOTAL + 2))
    resume = seen.joined[-1]
    assert (resume.resumed, resume.lost) == (True, 0)
    assert resume.replayed > 0
    for events in heard:
        messages = [event.message for event in events if event.HasField("message")]
        assert [message.seq for message in messages] == list(range(1, TOTAL + 1))
        assert [message.text for message in messages if message.sender == "carol"] == PENDING
    assert [event.whisper.text for event in heard[0] if event.HasField("whisper")] == ["carol whispers while cut"]
    assert [text for text in seen.texts() if text.startswith("carol")] == PENDING
    assert [whisper.text for whisper in seen.whispers] == ["carol whispers while cut"]


async def test_lines_written_into_a_dead_connection_are_sent_again_once(
    stub: chat_pb2_grpc.ChatServiceAsyncStub, proxy: Proxy
) -> None:
    alice, _ = await Stream.joined(stub, "lobby", "alice", create=True)
    async with carol_behind(proxy) as (carol, seen):
        await alice.next_of("member_joined")
        # The network goes silent: the lines leave the client, and the cut then throws them away unseen.
        proxy.freeze()
        assert not await carol.say("into the void")
        assert not await carol.whisper("alice", "psst")
        proxy.cut()
        await seen.until("reconnecting")
        assert (await alice.next_of("member_left")).member_left.reason == pb.LEAVE_REASON_DISCONNECTED
        proxy.restore()
        await seen.until_true(lambda: bool(seen.joined[-1].resumed))
        await carol.say("after")
        await seen.until_true(lambda: "after" in seen.texts())
        heard = [await alice.next() for _ in range(4)]

    assert seen.texts() == ["into the void", "after"]
    assert [whisper.text for whisper in seen.whispers] == ["psst"]
    assert [event.WhichOneof("kind") for event in heard] == ["member_joined", "message", "whisper", "message"]
    assert heard[0].member_joined.returned
    assert [heard[1].message.text, heard[2].whisper.text, heard[3].message.text] == ["into the void", "psst", "after"]
    assert seen.lost == []


async def test_room_killed_while_reconnecting_sends_the_member_back_to_waiting(
    server: ChatServer, stub: chat_pb2_grpc.ChatServiceAsyncStub, proxy: Proxy
) -> None:
    await Stream.joined(stub, "lobby", "alice", create=True)
    async with carol_behind(proxy) as (carol, seen):
        # Refused at once: it must not wait to be re-sent, nor count among the lines dropped.
        assert not await carol.whisper("nobody", "hello?")
        await seen.until("error")
        await cut_until_reconnecting(proxy, seen)
        assert (carol.room, carol.name, carol.reconnecting) == ("lobby", "carol", True)
        assert carol.who() == ("lobby", ["alice", "carol"])
        for refused in (carol.join("other"), carol.create("other")):
            with pytest.raises(SessionError, match=r"you are already in room lobby \(reconnecting to it\); /leave"):
                await refused
        assert await carol.say("nobody will hear this")
        await server.registry.kill_room("lobby")
        proxy.restore()
        await seen.until("lost")
        assert seen.lost == [f"{GONE}; 1 unsent line was dropped"]
        assert (carol.room, carol.reconnecting) == (None, False)
        assert await carol.create("lobby", "carol") is not None


@dataclass
class CutOff:
    """alice in lobby on a direct stream, and carol in lobby through a proxy that has just been cut."""

    stub: chat_pb2_grpc.ChatServiceAsyncStub
    alice: Stream
    proxy: Proxy
    carol: Session
    seen: Recorder


@contextlib.asynccontextmanager
async def carol_cut_off(config: Config) -> AsyncIterator[CutOff]:
    """A server run with `config`, alice, and carol reconnecting after a cut."""
    async with (
        running(config) as server,
        Proxy(server.port) as proxy,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        alice, _ = await Stream.joined(stub, "lobby", "alice", create=True)
        async with carol_behind(proxy) as (carol, seen):
            await cut_until_reconnecting(proxy, seen)
            yield CutOff(stub, alice, proxy, carol, seen)


async def test_a_gap_longer_than_history_is_told_and_the_sequence_goes_on() -> None:
    async with carol_cut_off(Config(port=0, grace_seconds=1.0, history=5)) as cut:
        alice, proxy, carol, seen = cut.alice, cut.proxy, cut.carol, cut.seen
        for n in range(1, 13):
            await alice.say(f"line {n}")
        await alice.next_of("member_left")
        proxy.restore()
        await seen.until_true(lambda: bool(seen.joined[-1].resumed))
        resume = seen.joined[-1]
        assert (resume.replayed, resume.lost) == (5, 7)
        assert render.event(pb.Event(joined=resume), "carol") == (
            "* reconnected to lobby as carol; 5 missed messages replayed; "
            "7 could not be recovered (older than the server keeps)"
        )
        await alice.say("live")
        await seen.until_true(lambda: seen.messages[-1].text == "live")
        assert carol.repeats_dropped == 0
    assert [message.seq for message in seen.messages] == list(range(8, 14))


async def test_name_taken_while_away_sends_the_member_back_to_waiting() -> None:
    # No grace period: the name is free for anyone as soon as the server notices the broken stream.
    async with carol_cut_off(Config(port=0, grace_seconds=1.0, resume_grace_seconds=0)) as cut:
        stub, alice, proxy, carol, seen = cut.stub, cut.alice, cut.proxy, cut.carol, cut.seen
        await alice.next_of("member_left")
        await Stream.joined(stub, "lobby", "carol")
        proxy.restore()
        await seen.until("lost")
        assert seen.lost == [
            "someone else took the name carol in room lobby while you were away; you are back in the waiting state"
        ]
        assert carol.room is None


async def test_server_restart_while_reconnecting_sends_the_member_back_to_waiting(tmp_path: Path) -> None:
    seen = Recorder()
    first = start_server_process(tmp_path / "state")
    restarted: ServerProcess | None = None
    try:
        async with Session(first.address, seen) as alice:
            await alice.connect()
            await alice.create("lobby", "alice")
            first.process.send_signal(signal.SIGTERM)
            await seen.until("reconnecting")
            assert [kind for kind, _ in seen.seen] == ["joined", "room_closed", "reconnecting"]
            assert await asyncio.to_thread(first.process.wait, 10) == 0
            assert await alice.say("anyone?")
            # The in-memory store starts empty: the room is gone for good.
            restarted = await asyncio.to_thread(start_server_process, tmp_path / "state", "--port", str(first.port))
            assert restarted.port == first.port
            await seen.until("lost")
            assert seen.lost == [f"{GONE}; 1 unsent line was dropped"]
            assert alice.room is None
            assert await alice.create("lobby", "alice") is not None
    finally:
        for server in (first, restarted):
            if server is not None:
                server.stop()


async def test_leave_while_reconnecting_stops_trying(proxy: Proxy) -> None:
    async with carol_behind(proxy, create=True) as (carol, seen):
        await cut_until_reconnecting(proxy, seen)
        assert await carol.say("never sent")
        assert await carol.leave() == "lobby"
        assert (carol.room, carol.reconnecting) == (None, False)
        attempts = len(seen.attempts)
        proxy.restore()
        # Waiting again, so a join works, and the round trip gives a stray attempt time to show.
        assert await carol.join("lobby", "carol-again") is not None
        await carol.leave()
        assert len(seen.attempts) == attempts
        assert seen.lost == []


async def test_close_while_reconnecting_ends_at_once(proxy: Proxy) -> None:
    seen = Recorder()
    async with Session(proxy.address, seen) as carol:
        await carol.connect()
        await carol.create("lobby", "carol")
        await cut_until_reconnecting(proxy, seen)
        async with asyncio.timeout(2):
            await carol.close()
        assert carol.room is None


class WatchedProxy(Proxy):
    """A Proxy that also tells when a connection arrives."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.connected = asyncio.Event()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        await super()._accept(client_reader, client_writer)


async def test_close_during_an_attempt_that_hangs_ends_at_once(server: ChatServer) -> None:
    seen = Recorder()
    proxy = WatchedProxy(server.port)
    async with proxy, Session(proxy.address, seen) as carol:
        await carol.connect()
        await carol.create("lobby", "carol")
        proxy.cut()
        await seen.until("reconnecting")
        # A network that takes connections and then goes silent: the attempt hangs until its timeout.
        proxy.connected.clear()
        proxy.restore()
        proxy.freeze()
        async with asyncio.timeout(5):
            await proxy.connected.wait()
            await carol.close()
    assert carol.room is None
    assert len(seen.attempts) == 1


def _chat_behind(proxy: Proxy) -> Proc:
    return Proc([executable("chat"), "--host", "127.0.0.1", "--port", str(proxy.port)], env=dict(os.environ))


async def test_chat_through_a_cut_prints_every_message_once(
    stub: chat_pb2_grpc.ChatServiceAsyncStub, proxy: Proxy
) -> None:
    alice, _ = await Stream.joined(stub, "lobby", "alice", create=True)

    async def alice_says(*texts: str) -> None:
        for text in texts:
            await alice.say(text)
        # Once alice has her echoes back, the server has every line.
        for _ in texts:
            await alice.next_of("message")

    await alice_says("early 0", "early 1")
    with _chat_behind(proxy) as carol:

        async def expect(text: str) -> str:
            return await asyncio.to_thread(carol.expect, text)

        carol.send("/join lobby carol")
        await expect("* you joined lobby as carol (members: alice, carol)")
        await expect("] alice : early 1")
        await alice_says(*(f"before {n}" for n in range(5)))
        await expect("alice : before 4")
        proxy.cut()
        await expect("* connection to the server lost; reconnecting to lobby in ")
        await alice_says(*(f"during {n}" for n in range(5)))
        carol.send("said while cut")
        await expect("(pending) said while cut")
        proxy.restore()
        await expect("* reconnected to lobby as carol; 5 missed messages replayed")
        await expect("carol : said while cut")
        await alice_says(*(f"after {n}" for n in range(5)))
        await expect("alice : after 4")
        assert await asyncio.to_thread(carol.finish) == 0
        assert "Traceback" not in carol.stderr

    said = [line for line in carol.output if " : " in line]
    assert [re.sub(r"^\[history \d\d:\d\d\] ", "[history] ", line) for line in said[:2]] == [
        "[history] alice : early 0",
        "[history] alice : early 1",
    ]
    assert said[2:] == [
        *(f"alice : before {n}" for n in range(5)),
        *(f"alice : during {n}" for n in range(5)),
        "carol : said while cut",
        *(f"alice : after {n}" for n in range(5)),
    ]
    assert carol.output.count("(pending) said while cut") == 1
    assert carol.output[-1] == "* you left lobby"
