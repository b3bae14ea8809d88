"""The client's Session state machine against a real server, with no terminal in between."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chat_cli import render
from chat_cli.protocol import SessionError
from chat_cli.session import Session
from chat_service.server import ChatServer
from tests.conftest import ServerProcess, start_server_process
from tests.proc import chat
from tests.recorder import Recorder


async def test_session_tracks_state_and_members(server: ChatServer) -> None:
    alice_saw, bob_saw = Recorder(), Recorder()
    async with Session(server.address, alice_saw) as alice, Session(server.address, bob_saw) as bob:
        await alice.connect()
        await bob.connect()
        assert (alice.room, alice.name) == (None, None)
        joined = await alice.create("lobby", "alice")
        # Delivered before create() returns, so a front end prints the join before anything that follows it.
        assert alice_saw.seen == [("joined", "alice")]
        assert joined is not None and joined.created
        assert (alice.room, alice.name) == ("lobby", "alice")

        assert await bob.join("nowhere") is None
        assert bob_saw.seen == [("error", "")]
        assert bob.room is None
        assert await bob.join("lobby", "bob") is not None
        assert bob.who() == ("lobby", ["alice", "bob"])
        await alice_saw.until("member_joined")
        assert alice.who() == ("lobby", ["alice", "bob"])

        await bob.whisper("alice", "psst")
        await alice_saw.until("whisper")
        assert await bob.leave() == "lobby"
        assert bob.room is None
        await alice_saw.until("member_left")
        assert alice.who() == ("lobby", ["alice"])

        await server.registry.kill_room("lobby")
        await alice_saw.until("room_closed")
        assert alice.room is None
        assert alice_saw.lost == bob_saw.lost == []


@pytest.fixture
def small_queue_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A `chat-server` process that drops a member as soon as 16 events wait for it, and lets lines flood."""
    server = start_server_process(tmp_path / "state", "--max-queue", "16", "--lines-per-second", "0")
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
        if server.process.stdout is not None:
            server.process.stdout.close()


async def test_session_too_slow_to_read_is_back_to_waiting_with_the_servers_reason(
    small_queue_server: ServerProcess,
) -> None:
    seen = Recorder()
    with chat(small_queue_server) as sender:
        sender.send("/create r fast")
        sender.expect("* room r created")
        async with Session(small_queue_server.address, seen) as slow:
            await slow.connect()
            await slow.join("r", "slow")
            sender.expect("* slow joined")
            # Blocking calls stall this event loop, so the session reads nothing until the server gives up on it;
            # the lines are large so that the transport's buffers fill and the server's queue for it overflows.
            for n in range(2000):
                sender.send(f"{n:04} {'x' * 4000}")
            sender.expect("* slow left (too slow, disconnected)")
            await seen.until("lost")
            assert slow.room is None
            assert seen.lost == [
                "you were disconnected from room 'r': more than 16 events were waiting for you to read them"
            ]


async def test_session_refuses_what_the_state_forbids(server: ChatServer) -> None:
    async with Session(server.address, Recorder()) as session:
        await session.connect()
        for attempt in (session.say("hi"), session.whisper("bob", "hi"), session.leave()):
            with pytest.raises(SessionError, match="you are not in a room"):
                await attempt
        with pytest.raises(SessionError, match="you are not in a room"):
            session.who()
        await session.create("lobby")
        with pytest.raises(SessionError, match="you are already in room lobby; /leave first"):
            await session.join("lobby")
        with pytest.raises(SessionError, match="you are already in room lobby; /leave first"):
            await session.create("other")


async def test_join_replays_recent_history_marked_as_such_before_returning(server: ChatServer) -> None:
    alice_saw, bob_saw, carol_saw = Recorder(), Recorder(), Recorder()
    async with (
        Session(server.address, alice_saw) as alice,
        Session(server.address, bob_saw, history=3) as bob,
        Session(server.address, carol_saw, history=0) as carol,
    ):
        await alice.create("lobby", "alice")
        for n in range(5):
            await alice.say(f"line {n}")
        await alice_saw.until_true(lambda: len(alice_saw.messages) == 5)
        joined = await bob.join("lobby", "bob")
        assert joined is not None
        assert (joined.last_seq, joined.replayed) == (5, 3)
        assert [(m.seq, m.text) for m in bob_saw.history] == [(3, "line 2"), (4, "line 3"), (5, "line 4")]
        assert [kind for kind, _ in bob_saw.seen] == ["joined", "history", "history", "history"]
        await carol.join("lobby", "carol")
        assert carol_saw.history == []
        await alice.say("live")
        for saw in (bob_saw, carol_saw):
            await saw.until("message")
            assert [(m.seq, m.text) for m in saw.messages] == [(6, "live")]


async def test_each_line_carries_its_own_client_id(server: ChatServer) -> None:
    seen = Recorder()
    async with Session(server.address, seen) as alice:
        await alice.create("lobby", "alice")
        assert not await alice.say("one")
        assert not await alice.say("two")
        assert not await alice.whisper("alice", "note to self")
        await seen.until("whisper")
        ids = [message.client_id for message in seen.messages] + [seen.whispers[0].client_id]
        assert [message.text for message in seen.messages] == ["one", "two"]
        assert all(ids) and len(set(ids)) == 3


async def test_a_member_list_replaces_the_sessions_members(server: ChatServer) -> None:
    saw = Recorder()
    async with Session(server.address, saw) as alice:
        await alice.connect()
        await alice.create("lobby", "alice")
        # Joined in one registry step each, with no await between them: the run reaches alice as one member list.
        crowd = [await server.registry.join("lobby", f"c{i:02}") for i in range(20)]
        await saw.until("members")
        assert alice.who() == ("lobby", ["alice", *(f"c{i:02}" for i in range(20))])
        for member in crowd:
            await member.leave()
        await saw.until_true(lambda: alice.who() == ("lobby", ["alice"]))
    assert render.members_now(["alice", "bob"]) == "* members now: alice, bob"
    assert render.members_now([f"c{i}" for i in range(1100)]) == "* 1,100 members now"
