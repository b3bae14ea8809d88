"""Malformed and out-of-place requests through real gRPC: each gets a status or an error event, never UNKNOWN."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.server import ChatServer
from tests.conftest import ServerProcess
from tests.streams import TIMEOUT, Stream, raw_chat

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub

# Field 1 holding two bytes that are not UTF-8: well-formed protobuf, but no valid proto3 string.
BAD_UTF8_ROOM = b"\x0a\x02\xff\xfe"
# ChatRequest.say (field 2) whose text (field 1) is the same two bytes.
BAD_UTF8_SAY = b"\x12\x04\x0a\x02\xff\xfe"
# A varint tag that never ends: not protobuf at all.
TRUNCATED = b"\xff\xff\xff"

Call = grpc.aio.StreamStreamCall[bytes, pb.ChatResponse]


def _join(room: str, name: str, *, create: bool = False) -> bytes:
    return pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name=name, create=create)).SerializeToString()


def _say(text: str) -> bytes:
    return pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=text)).SerializeToString()


async def _next_event(call: Call, within: float = TIMEOUT) -> pb.Event:
    response = await asyncio.wait_for(call.read(), within)
    assert isinstance(response, pb.ChatResponse), response
    assert len(response.events) == 1, response
    return response.events[0]


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("ListRooms", TRUNCATED),
        ("CreateRoom", TRUNCATED),
        ("CreateRoom", BAD_UTF8_ROOM),
        ("KillRoom", TRUNCATED),
        ("KillRoom", BAD_UTF8_ROOM),
    ],
)
async def test_an_undecodable_unary_request_is_invalid_argument(
    channel: grpc.aio.Channel, server: ChatServer, method: str, body: bytes
) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/chat.v1.ChatService/{method}")
    metadata = (("authorization", f"Bearer {server.admin_token}"),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(body, metadata=metadata, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid chat.v1.{method}Request" in (info.value.details() or "")


async def test_an_undecodable_frame_gets_an_error_event_and_the_stream_lives_on(
    channel: grpc.aio.Channel, stub: Stub
) -> None:
    bob, _ = await Stream.joined(stub, "r", "bob", create=True)
    alice = raw_chat(channel)
    await alice.write(BAD_UTF8_SAY)
    assert (await _next_event(alice)).error.code == pb.ERROR_CODE_BAD_REQUEST
    await alice.write(_join("r", "alice"))
    assert (await _next_event(alice)).joined.name == "alice"
    assert (await bob.next()).member_joined.name == "alice"

    # After the join a bad frame is answered the same way, and what follows it is still read.
    for bad in (BAD_UTF8_SAY, TRUNCATED):
        await alice.write(bad)
        error = (await _next_event(alice)).error
        assert error.code == pb.ERROR_CODE_BAD_REQUEST
        assert "not a valid chat.v1.ChatRequest" in error.message
    await alice.write(_say("still here"))
    assert (await _next_event(alice)).message.text == "still here"
    assert (await bob.next()).message.text == "still here"


async def test_a_resume_token_with_a_non_ascii_tail_is_refused_as_a_wrong_one(stub: Stub) -> None:
    alice, joined = await Stream.joined(stub, "r", "alice", create=True)
    thief = Stream(stub)
    resume = pb.ChatRequest.Resume(token=joined.resume_token[:-1] + "é", last_seq=0)
    await thief.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="r", name="alice", resume=resume)))
    assert (await thief.next()).error.code == pb.ERROR_CODE_NAME_TAKEN
    # The refusal leaves both streams as they were: the thief may try again, alice still chats.
    await thief.join("r", "mallory")
    assert (await thief.next()).joined.name == "mallory"
    await alice.say("mine")
    assert (await alice.next_of("message")).message.text == "mine"


async def _leave_then_write(channel: grpc.aio.Channel, name: str, *, half_close: bool) -> grpc.StatusCode:
    call = raw_chat(channel)
    await call.write(_join("r", name))
    # 200 streams joining at once share the test's event loop with the server: on a busy machine one waited 10 s.
    assert (await _next_event(call, 3 * TIMEOUT)).joined.name == name
    await call.write(pb.ChatRequest(leave=pb.ChatRequest.LeaveRoom()).SerializeToString())
    for line in ("one", "two", "three"):
        await call.write(_say(line))
    if half_close:
        await call.done_writing()
    # Without a half-close the server ends the call itself a few seconds after the leave.
    while await asyncio.wait_for(call.read(), 2 * TIMEOUT) is not grpc.aio.EOF:
        pass
    return await call.code()


@pytest.mark.unlimited
async def test_requests_written_after_leave_end_the_call_cleanly(server: ChatServer, stub: Stub) -> None:
    await stub.CreateRoom(pb.CreateRoomRequest(room="r"))
    # Four connections of 50 streams each (channels share one connection unless told otherwise): the server allows
    # a connection 100 streams at once, and refuses more that arrive before the client has heard of the limit.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(server.address, options=options) for _ in range(4)]
    try:
        # Most clients half-close after their last write; a few never do, and those wait out the server's grace.
        runs = [_leave_then_write(channels[i % 4], f"m{i}", half_close=i % 10 != 0) for i in range(200)]
        codes = await asyncio.wait_for(asyncio.gather(*runs), 60)
    finally:
        for channel in channels:
            await channel.close()
    assert set(codes) == {grpc.StatusCode.OK}
    rooms = {room.name: room.member_count for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms}
    assert rooms == {"r": 0}


async def test_a_flood_of_bad_requests_logs_a_line_or_two_and_no_traceback(server_process: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server_process.address) as channel:
        create: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/chat.v1.ChatService/CreateRoom")
        for _ in range(300):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await create(BAD_UTF8_ROOM, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        chat = raw_chat(channel)
        for _ in range(300):
            await chat.write(TRUNCATED)
            assert (await _next_event(chat)).error.code == pb.ERROR_CODE_BAD_REQUEST
        chat.cancel()
    server_process.process.terminate()
    server_process.wait_for_line("server stopped")
    logged = [line for line in server_process.seen if "undecodable" in line]
    # One line per ten seconds: the first names the peer, and a later one (if the run was slow) counts the rest.
    assert 1 <= len(logged) <= 3, server_process.seen
    assert "from ipv4:127.0.0.1:" in logged[0]
    assert not any("Traceback" in line for line in server_process.seen), server_process.seen
