"""History, resume and exactly-once sends through real stubs against a real server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.server import ChatServer, Config
from tests.conftest import UNLIMITED, running, start_server_process
from tests.streams import Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Stub]:
    """A stub on a channel to a server run with `config`."""
    async with running(config) as server, grpc.aio.insecure_channel(server.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def _resume(room: str, name: str, token: str, last_seq: int) -> pb.ChatRequest:
    resume = pb.ChatRequest.Resume(token=token, last_seq=last_seq)
    return pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name=name, resume=resume))


def _say(text: str, client_id: str) -> pb.ChatRequest:
    return pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=text, client_id=client_id))


async def _messages(stream: Stream, count: int) -> list[pb.Message]:
    return [(await stream.next_of("message")).message for _ in range(count)]


async def _alice_and_bob_dropped(stub: Stub) -> tuple[Stream, pb.Joined]:
    """alice in room r, and the Joined of bob, whose stream has just broken."""
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, joined = await Stream.joined(stub, "r", "bob")
    await _drop(bob)
    return alice, joined


async def _drop(stream: Stream) -> None:
    """Break the stream the way a vanished client does, and wait until the call has ended."""
    stream.call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream.call.read()


async def test_join_with_history_gets_the_last_messages_first(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    for i in range(1, 6):
        await alice.say(f"line {i}")
    await _messages(alice, 5)
    bob = Stream(stub)
    await bob.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="r", name="bob", history=3)))
    joined = (await bob.next()).joined
    assert (joined.last_seq, joined.replayed, joined.lost, joined.resumed) == (5, 3, 0, False)
    assert [m.seq for m in await _messages(bob, 3)] == [3, 4, 5]
    await alice.say("live")
    live = await bob.next()
    assert (live.message.seq, live.message.text) == (6, "live")


async def test_resume_replays_exactly_what_was_missed_then_goes_live(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, joined = await Stream.joined(stub, "r", "bob")
    await alice.next_of("member_joined")
    for i in range(1, 6):
        await alice.say(f"line {i}")
    assert [m.seq for m in await _messages(bob, 2)] == [1, 2]
    await _drop(bob)
    left = (await alice.next_of("member_left")).member_left
    assert (left.name, left.reason) == ("bob", pb.LEAVE_REASON_DISCONNECTED)
    for i in range(6, 11):
        await alice.say(f"line {i}")

    back = Stream(stub)
    await back.call.write(_resume("r", "bob", joined.resume_token, 2))
    rejoined = (await back.next()).joined
    assert (rejoined.name, rejoined.resumed, rejoined.replayed, rejoined.lost) == ("bob", True, 8, 0)
    assert rejoined.resume_token == joined.resume_token
    await alice.say("after")
    assert [m.seq for m in await _messages(back, 9)] == list(range(3, 12))
    returned = (await alice.next_of("member_joined")).member_joined
    assert (returned.name, returned.returned) == ("bob", True)


async def test_resume_while_the_old_stream_lives_swaps_it_quietly(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    old, joined = await Stream.joined(stub, "r", "bob")
    await alice.next_of("member_joined")
    await alice.say("one")
    await _messages(alice, 1)
    await _messages(old, 1)
    new = Stream(stub)
    await new.call.write(_resume("r", "bob", joined.resume_token, 1))
    assert (await new.next()).joined.replayed == 0
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await old.next()
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert "resumed on another connection" in (ended.value.details() or "")
    await alice.say("two")
    # The room saw no leave and no join: the next thing alice sees is her own line.
    assert (await alice.next()).message.text == "two"
    assert (await new.next()).message.seq == 2


async def test_a_gap_larger_than_history_is_counted_and_the_sequence_goes_on() -> None:
    async with serving(Config(port=0, history=10, grace_seconds=1.0, limits=UNLIMITED)) as stub:
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        bob, joined = await Stream.joined(stub, "r", "bob")
        await _drop(bob)
        for i in range(1, 26):
            await alice.say(f"line {i}")
        # Her own copies show that every line was logged: the resume comes on another stream, which may overtake them.
        await _messages(alice, 25)
        back = Stream(stub)
        await back.call.write(_resume("r", "bob", joined.resume_token, 0))
        rejoined = (await back.next()).joined
        assert (rejoined.replayed, rejoined.lost, rejoined.last_seq) == (10, 15, 25)
        await alice.say("live")
        assert [m.seq for m in await _messages(back, 11)] == list(range(16, 27))


async def test_the_same_client_id_is_broadcast_once(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, _ = await Stream.joined(stub, "r", "bob")
    await alice.next_of("member_joined")
    await alice.call.write(_say("hello", "id-1"))
    await alice.call.write(_say("hello", "id-1"))
    await alice.call.write(_say("next", "id-2"))
    first, again, after = await _messages(alice, 3)
    assert (first.seq, first.client_id) == (1, "id-1")
    assert again == first, "a repeat gets the original message back"
    assert (after.seq, after.text) == (2, "next")
    assert [(m.seq, m.text) for m in await _messages(bob, 2)] == [(1, "hello"), (2, "next")]

    whisper = pb.ChatRequest(whisper=pb.ChatRequest.SendWhisper(recipient="bob", text="psst", client_id="id-3"))
    await alice.call.write(whisper)
    await alice.call.write(whisper)
    await alice.say("end")
    assert [e.WhichOneof("kind") for e in [await bob.next(), await bob.next()]] == ["whisper", "message"]
    echoes = [await alice.next(), await alice.next(), await alice.next()]
    assert [e.WhichOneof("kind") for e in echoes] == ["whisper", "whisper", "message"]


async def test_a_line_resent_after_a_resume_is_not_broadcast_again(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, joined = await Stream.joined(stub, "r", "bob")
    await bob.call.write(_say("maybe lost", "b-1"))
    assert (await bob.next_of("message")).message.seq == 1
    await _drop(bob)
    back = Stream(stub)
    # The client never saw its line come back, so it resumes from before it and sends it again.
    await back.call.write(_resume("r", "bob", joined.resume_token, 0))
    await back.call.write(_say("maybe lost", "b-1"))
    await back.say("new")
    rejoined = (await back.next()).joined
    assert rejoined.replayed == 1
    seen = [(m.seq, m.client_id) for m in await _messages(back, 3)]
    assert seen == [(1, "b-1"), (1, "b-1"), (2, "")]
    assert [(m.seq, m.text) for m in await _messages(alice, 2)] == [(1, "maybe lost"), (2, "new")]


async def test_name_is_held_while_its_member_may_resume() -> None:
    async with serving(Config(port=0, resume_grace_seconds=0.5, grace_seconds=1.0)) as stub:
        alice, _ = await _alice_and_bob_dropped(stub)
        await alice.next_of("member_left")
        await alice.whisper("bob", "there?")
        error = (await alice.next()).error
        assert (error.code, "lost their connection" in error.message) == (pb.ERROR_CODE_MEMBER_NOT_FOUND, True)
        impostor = Stream(stub)
        await impostor.join("r", "bob")
        refusal = (await impostor.next()).error
        assert refusal.code == pb.ERROR_CODE_NAME_TAKEN
        assert "connection dropped" in refusal.message
        # Once the grace period is over the name is free again.
        async with asyncio.timeout(5):
            while True:
                await impostor.join("r", "bob")
                event = await impostor.next()
                if event.HasField("joined"):
                    break
                assert event.error.code == pb.ERROR_CODE_NAME_TAKEN
                await asyncio.sleep(0.1)


async def test_resume_after_the_grace_period_still_replays_under_a_free_name() -> None:
    async with serving(Config(port=0, resume_grace_seconds=0, grace_seconds=1.0)) as stub:
        alice, joined = await _alice_and_bob_dropped(stub)
        await alice.say("missed")
        back = Stream(stub)
        await back.call.write(_resume("r", "bob", joined.resume_token, 0))
        rejoined = (await back.next()).joined
        assert (rejoined.resumed, rejoined.replayed) == (True, 1)
        assert rejoined.resume_token != joined.resume_token
        assert (await back.next()).message.text == "missed"
        await alice.next_of("member_left")
        back_again = (await alice.next_of("member_joined")).member_joined
        assert (back_again.name, back_again.returned) == ("bob", True)


async def test_a_token_is_no_resume_for_a_name_it_was_not_issued_for() -> None:
    async with serving(Config(port=0, resume_grace_seconds=0, grace_seconds=1.0)) as stub:
        alice, joined = await _alice_and_bob_dropped(stub)
        impostor = Stream(stub)
        await impostor.call.write(_resume("r", "mallory", joined.resume_token, 0))
        refusal = (await impostor.next()).error
        assert refusal.code == pb.ERROR_CODE_BAD_REQUEST
        assert "not issued for the name 'mallory'" in refusal.message
        forged = joined.resume_token[:-4] + ("AAAA" if not joined.resume_token.endswith("AAAA") else "BBBB")
        await impostor.call.write(_resume("r", "bob", forged, 0))
        assert (await impostor.next()).error.code == pb.ERROR_CODE_BAD_REQUEST
        # Nobody was announced as back: after bob left, the next arrival alice hears of is carol's plain join.
        await alice.next_of("member_left")
        await Stream.joined(stub, "r", "carol")
        arrival = (await alice.next_of("member_joined")).member_joined
        assert (arrival.name, arrival.returned) == ("carol", False)


async def test_resume_is_refused_for_a_gone_room_or_a_wrong_token(stub: Stub, server: ChatServer) -> None:
    await Stream.joined(stub, "r", "alice", create=True)
    bob, joined = await Stream.joined(stub, "r", "bob")
    room_uid = joined.resume_token.split(".")[0]
    stranger = Stream(stub)
    await stranger.call.write(_resume("r", "bob", f"{room_uid}.guessed", 0))
    assert (await stranger.next()).error.code == pb.ERROR_CODE_NAME_TAKEN
    await stranger.call.write(_resume("r", "bob", "elsewhere.guessed", 0))
    assert (await stranger.next()).error.code == pb.ERROR_CODE_ROOM_NOT_FOUND

    token = [("authorization", f"Bearer {server.admin_token}")]
    await stub.KillRoom(pb.KillRoomRequest(room="r"), metadata=token)
    await bob.expect_end()
    await stranger.call.write(_resume("r", "bob", joined.resume_token, 0))
    gone = (await stranger.next()).error
    assert gone.code == pb.ERROR_CODE_ROOM_NOT_FOUND
    assert "no longer exists" in gone.message
    # A new room of the same name is not the one the token was for.
    await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    await stranger.call.write(_resume("r", "bob", joined.resume_token, 0))
    assert (await stranger.next()).error.code == pb.ERROR_CODE_ROOM_NOT_FOUND


async def test_an_over_long_client_id_is_an_error_event(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    await alice.call.write(_say("hi", "x" * 65))
    error = (await alice.next()).error
    assert error.code == pb.ERROR_CODE_BAD_REQUEST
    await alice.call.write(_say("hi", "x" * 64))
    assert (await alice.next()).message.client_id == "x" * 64


async def test_an_error_event_names_the_client_id_of_the_request_it_answers(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    await alice.call.write(_say("bad\x1bline", "7"))
    whisper = pb.ChatRequest.SendWhisper(recipient="nobody", text="psst", client_id="8")
    await alice.call.write(pb.ChatRequest(whisper=whisper))
    await alice.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="r")))
    errors = [(await alice.next()).error for _ in range(3)]
    assert [(error.code, error.client_id) for error in errors] == [
        (pb.ERROR_CODE_INVALID_TEXT, "7"),
        (pb.ERROR_CODE_MEMBER_NOT_FOUND, "8"),
        (pb.ERROR_CODE_ALREADY_JOINED, ""),
    ]


async def test_an_action_reaches_every_member_marked_as_one(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, _ = await Stream.joined(stub, "r", "bob")
    await alice.call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text="waves", action=True)))
    await alice.say("plain")
    said = [(await bob.next_of("message")).message for _ in range(2)]
    assert [(message.text, message.action) for message in said] == [("waves", True), ("plain", False)]


@pytest.fixture
async def history_of_three(tmp_path: Path) -> AsyncIterator[str]:
    proc = start_server_process(tmp_path / "state", "--history", "3", "--resume-grace", "5")
    try:
        yield proc.address
    finally:
        await asyncio.to_thread(proc.stop)


async def test_history_flag_of_the_server_executable(history_of_three: str) -> None:
    async with grpc.aio.insecure_channel(history_of_three) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        alice, _ = await Stream.joined(stub, "r", "alice", create=True)
        for i in range(5):
            await alice.say(f"line {i}")
        await _messages(alice, 5)
        bob = Stream(stub)
        await bob.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="r", name="bob", history=20)))
        assert (await bob.next()).joined.replayed == 3
