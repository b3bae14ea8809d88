"""The chat contract through real gRPC stubs against a real server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.server import ChatServer
from tests.conftest import start_server_process
from tests.streams import Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub


async def test_create_join_say_reaches_everyone_in_order(stub: Stub) -> None:
    alice, joined = await Stream.joined(stub, "lobby", "alice", create=True)
    assert (joined.room, joined.name, list(joined.members), joined.created) == ("lobby", "alice", ["alice"], True)
    bob, joined = await Stream.joined(stub, "lobby", "bob")
    assert list(joined.members) == ["alice", "bob"]
    assert not joined.created
    assert (await alice.next()).member_joined.name == "bob"

    await alice.say("hello")
    await bob.say("hi alice")
    for stream in (alice, bob):
        first, second = (await stream.next()).message, (await stream.next()).message
        assert (first.seq, first.sender, first.text) == (1, "alice", "hello")
        assert (second.seq, second.sender, second.text) == (2, "bob", "hi alice")
        assert second.sent_at.ToNanoseconds() >= first.sent_at.ToNanoseconds() > 0

    await bob.leave()
    assert await bob.expect_end() == []
    left = (await alice.next()).member_left
    assert (left.name, left.reason) == ("bob", pb.LEAVE_REASON_LEFT)


async def test_default_name_is_unknown_then_numbered(stub: Stub) -> None:
    await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    names = [(await Stream.joined(stub, "r"))[1].name for _ in range(3)]
    assert names == ["Unknown", "Unknown-2", "Unknown-3"]


async def test_explicit_name_taken_is_refused_and_stream_lives_on(stub: Stub) -> None:
    await Stream.joined(stub, "r", "alice", create=True)
    stream = Stream(stub)
    await stream.join("r", "alice")
    error = (await stream.next()).error
    assert error.code == pb.ERROR_CODE_NAME_TAKEN
    assert "alice" in error.message
    await stream.join("r", "alice2")
    assert (await stream.next()).joined.name == "alice2"


@pytest.mark.parametrize(
    "lookalike", ["Alice", "ALICE", "\u0430lice", "a1ice"], ids=["capital", "upper", "cyrillic-a", "digit-one"]
)
async def test_a_name_too_like_a_members_is_refused(stub: Stub, lookalike: str) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    stream = Stream(stub)
    await stream.join("r", lookalike)
    error = (await stream.next()).error
    assert error.code == pb.ERROR_CODE_NAME_TAKEN
    assert f"already called 'alice' (too like {lookalike!r} to tell apart)" in error.message
    await stream.join("r", "bob")
    assert list((await stream.next()).joined.members) == ["alice", "bob"]
    assert (await alice.next()).member_joined.name == "bob"


async def test_names_are_shown_as_typed_and_whispers_find_them_in_any_case(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "Alice", create=True)
    bob, joined = await Stream.joined(stub, "r", "jose\u0301")
    assert list(joined.members) == ["Alice", "jos\u00e9"]
    await bob.whisper("ALICE", "psst")
    for stream in (alice, bob):
        whisper = (await stream.next_of("whisper")).whisper
        assert (whisper.sender, whisper.recipient) == ("jos\u00e9", "Alice")


async def test_room_names_are_one_room_whatever_their_case(stub: Stub) -> None:
    await stub.CreateRoom(pb.CreateRoomRequest(room="Lobby"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateRoom(pb.CreateRoomRequest(room="lobby"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "room 'Lobby' already exists (too like 'lobby' to tell apart)" in (info.value.details() or "")
    _, joined = await Stream.joined(stub, "LOBBY", "alice")
    assert joined.room == "Lobby"
    assert [room.name for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms] == ["Lobby"]


async def test_whisper_reaches_only_the_recipient_and_echoes_to_sender(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, _ = await Stream.joined(stub, "r", "bob")
    carol, _ = await Stream.joined(stub, "r", "carol")
    await alice.whisper("bob", "psst")
    await alice.say("public")
    for stream in (alice, bob):
        whisper = (await stream.next_of("whisper")).whisper
        assert (whisper.sender, whisper.recipient, whisper.text) == ("alice", "bob", "psst")
    next_for_carol = (await carol.next_of("message")).message
    assert next_for_carol.text == "public"
    await carol.leave()
    assert all(event.WhichOneof("kind") != "whisper" for event in await carol.expect_end())


async def test_whisper_to_absent_member_is_an_error_event(stub: Stub) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    await alice.whisper("nobody", "hello?")
    error = (await alice.next()).error
    assert error.code == pb.ERROR_CODE_MEMBER_NOT_FOUND
    assert "nobody" in error.message
    await alice.say("still here")
    assert (await alice.next()).message.text == "still here"


@pytest.mark.parametrize(
    "text",
    ["", "x" * 4097, "two\nlines", "\r* room lobby was closed by the server", "\x1b]0;pwned\x07", "\u202eevil"],
    ids=["empty", "too-long", "newline", "carriage-return", "escape", "bidi-override"],
)
async def test_bad_text_is_an_error_event(stub: Stub, text: str) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    bob, _ = await Stream.joined(stub, "r", "bob")
    await alice.say(text)
    assert (await alice.next_of("error")).error.code == pb.ERROR_CODE_INVALID_TEXT
    await alice.whisper("bob", text)
    assert (await alice.next()).error.code == pb.ERROR_CODE_INVALID_TEXT
    await alice.say("é" * 2048)
    assert (await alice.next()).message.seq == 1
    # Nothing refused reached bob: the first message he gets is the valid one.
    assert (await bob.next_of("message")).message.seq == 1


async def test_second_join_on_a_stream_is_an_error(stub: Stub) -> None:
    await stub.CreateRoom(pb.CreateRoomRequest(room="other"))
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    await alice.join("other", "alice")
    assert (await alice.next()).error.code == pb.ERROR_CODE_ALREADY_JOINED
    rooms = {room.name: room.member_count for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms}
    assert rooms == {"other": 0, "r": 1}


async def test_requests_before_joining_get_errors(stub: Stub) -> None:
    stream = Stream(stub)
    await stream.say("hello?")
    assert (await stream.next()).error.code == pb.ERROR_CODE_NOT_JOINED
    await stream.join("missing", "me")
    error = (await stream.next()).error
    assert error.code == pb.ERROR_CODE_ROOM_NOT_FOUND
    assert error.message == "room 'missing' does not exist"


async def test_join_create_refuses_an_existing_room(stub: Stub) -> None:
    await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    stream = Stream(stub)
    await stream.join("r", "me", create=True)
    assert (await stream.next()).error.code == pb.ERROR_CODE_ROOM_EXISTS


@pytest.mark.parametrize("name", ["", "a b", "x" * 33, "tab\there", "bell\a"])
async def test_create_room_rejects_bad_names(stub: Stub, name: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateRoom(pb.CreateRoomRequest(room=name))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in (info.value.details() or "")


async def test_create_room_twice_is_already_exists(stub: Stub) -> None:
    created = await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    assert (created.room.name, created.room.member_count) == ("r", 0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_rooms_past_the_servers_limit_are_refused_and_the_stream_lives_on(tmp_path: Path) -> None:
    server = start_server_process(tmp_path / "state", "--max-rooms", "1")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            await stub.CreateRoom(pb.CreateRoomRequest(room="first"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateRoom(pb.CreateRoomRequest(room="second"))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of rooms (1)" in (info.value.details() or "")
            stream = Stream(stub)
            await stream.join("second", "me", create=True)
            error = (await stream.next()).error
            assert error.code == pb.ERROR_CODE_ROOM_LIMIT
            assert "ask an administrator to close rooms nobody uses" in error.message
            await stream.join("first", "me")
            assert (await stream.next()).joined.room == "first"
    finally:
        server.stop()


async def test_list_rooms_counts_members_and_last_seq(stub: Stub) -> None:
    assert list((await stub.ListRooms(pb.ListRoomsRequest())).rooms) == []
    alice, _ = await Stream.joined(stub, "b-room", "alice", create=True)
    await Stream.joined(stub, "b-room", "bob")
    await stub.CreateRoom(pb.CreateRoomRequest(room="a-room"))
    await alice.say("one")
    await alice.next_of("message")
    rooms = [(r.name, r.member_count, r.last_seq) for r in (await stub.ListRooms(pb.ListRoomsRequest())).rooms]
    assert rooms == [("a-room", 0, 0), ("b-room", 2, 1)]


def _admin(server: ChatServer) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {server.admin_token}"),)


async def test_kill_room_ejects_members_and_leaves_ls(stub: Stub, server: ChatServer) -> None:
    alice, _ = await Stream.joined(stub, "doomed", "alice", create=True)
    bob, _ = await Stream.joined(stub, "doomed", "bob")
    response = await stub.KillRoom(pb.KillRoomRequest(room="doomed"), metadata=_admin(server))
    assert response.ejected_members == 2
    assert list((await stub.ListRooms(pb.ListRoomsRequest())).rooms) == []
    for stream in (alice, bob):
        closed = [e.room_closed for e in await stream.expect_end() if e.WhichOneof("kind") == "room_closed"]
        assert [(c.room, c.reason) for c in closed] == [("doomed", pb.CLOSE_REASON_KILLED)]
    _, joined = await Stream.joined(stub, "doomed", "alice", create=True)
    assert joined.created


async def test_kill_needs_the_admin_token(stub: Stub) -> None:
    await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.KillRoom(pb.KillRoomRequest(room="r"))
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stub.KillRoom(pb.KillRoomRequest(room="r"), metadata=(("authorization", "Bearer nope"),))
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert [r.name for r in (await stub.ListRooms(pb.ListRoomsRequest())).rooms] == ["r"]


async def test_kill_unknown_room_is_not_found(stub: Stub, server: ChatServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.KillRoom(pb.KillRoomRequest(room="ghost"), metadata=_admin(server))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in (info.value.details() or "")


async def test_refusals_speak_to_any_caller_not_in_one_clients_commands(stub: Stub, server: ChatServer) -> None:
    """A gRPC caller is told what went wrong; what to type next (`/ls`, `/who`) is for each client to add."""
    await stub.CreateRoom(pb.CreateRoomRequest(room="lobby"))
    alice, _ = await Stream.joined(stub, "lobby", "alice")
    details: list[str] = []
    await alice.whisper("nobody", "hi")
    details.append((await alice.next_of("error")).error.message)
    stray = Stream(stub)
    await stray.join("nowhere", "bob")
    details.append((await stray.next_of("error")).error.message)
    await stray.join("lobby", "alice", create=True)
    details.append((await stray.next_of("error")).error.message)
    metadata = (("authorization", f"Bearer {server.admin_token}"),)
    for call in (
        stub.CreateRoom(pb.CreateRoomRequest(room="lobby")),
        stub.KillRoom(pb.KillRoomRequest(room="nowhere"), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        details.append(refused.value.details() or "")
    assert len(details) == 5
    assert [detail for detail in details if re.search(r"/[a-z]", detail)] == []
