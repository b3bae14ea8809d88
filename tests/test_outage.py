"""Chat servers over a NATS that goes away and comes back: members are told, lines fail out loud, health follows,
and every room goes on by itself once NATS is back, with no gap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_cli.session import Session
from tests.conftest import ServerProcess, start_server_process
from tests.nats import NatsNode
from tests.recorder import Recorder
from tests.streams import Stream

# NATS is away for a while in this test; each wait is bounded well above what a busy machine needs.
WAIT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(channel: grpc.aio.Channel) -> AsyncIterator[int]:
    """The chat service's health, as the server reports each change."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="chat.v1.ChatService"))
    async for answer in watch:
        yield answer.status


async def alice_and_bob(here: grpc.aio.Channel, there: grpc.aio.Channel) -> tuple[Stream, Stream, pb.Joined]:
    """alice makes room r through `here` and bob joins it through `there`; alice has heard him come."""
    alice, _ = await Stream.joined(chat_pb2_grpc.ChatServiceStub(here), "r", "alice", create=True)
    bob, joined = await Stream.joined(chat_pb2_grpc.ChatServiceStub(there), "r", "bob")
    await alice.next_of("member_joined")
    return alice, bob, joined


async def say(stream: Stream, text: str, client_id: str) -> None:
    await stream.call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=text, client_id=client_id)))


async def test_nats_stopped_and_restarted_members_are_told_then_the_rooms_go_on(nats: NatsNode, tmp_path: Path) -> None:
    servers: list[ServerProcess] = []
    try:
        for name in ("one", "two"):
            servers.append(start_server_process(tmp_path / name, "--store", nats.url, "--lines-per-second", "0"))
        async with (
            grpc.aio.insecure_channel(servers[0].address) as one,
            grpc.aio.insecure_channel(servers[1].address) as two,
        ):
            health = aiter(statuses(one))
            assert await anext(health) == SERVING
            alice, bob, _ = await alice_and_bob(one, two)

            await nats.stop()
            assert await anext(health) == NOT_SERVING
            told = (await alice.next_of("error", WAIT)).error
            assert (told.code, told.client_id) == (pb.ERROR_CODE_UNAVAILABLE, "")
            assert "message store is unreachable" in told.message
            assert (await bob.next_of("error", WAIT)).error.code == pb.ERROR_CODE_UNAVAILABLE
            # A line said meanwhile is refused, naming it, rather than lost or acknowledged.
            await say(alice, "lost?", "c1")
            refused = (await alice.next(WAIT)).error
            assert (refused.code, refused.client_id) == (pb.ERROR_CODE_UNAVAILABLE, "c1")
            late = Stream(chat_pb2_grpc.ChatServiceStub(one))
            await late.join("r", "carol")
            turned_away = (await late.next(WAIT)).error
            assert turned_away.code == pb.ERROR_CODE_UNAVAILABLE
            assert "message store is unreachable" in turned_away.message

            nats.start()
            await nats.ready()
            assert await anext(health) == SERVING
            # Told once per outage: the next event either member gets is the line said once NATS is back.
            await say(alice, "back", "c2")
            for stream in (alice, bob):
                message = (await stream.next(WAIT)).message
                assert (message.seq, message.text) == (1, "back")
            carol, joined = await Stream.joined(chat_pb2_grpc.ChatServiceStub(two), "r", "carol")
            assert list(joined.members) == ["alice", "bob", "carol"]
            await say(carol, "hello", "c3")
            for stream in (alice, bob, carol):
                assert (await stream.next_of("message", WAIT)).message.seq == 2
            rooms = await chat_pb2_grpc.ChatServiceStub(one).ListRooms(pb.ListRoomsRequest(), timeout=WAIT)
            assert [(room.name, room.member_count, room.last_seq) for room in rooms.rooms] == [("r", 3, 2)]
            anonymous, joined = await Stream.joined(chat_pb2_grpc.ChatServiceStub(one), "r")
            assert joined.name == "Unknown"
            for stream in (alice, bob, carol, late, anonymous):
                stream.call.cancel()
    finally:
        for server in servers:
            server.stop()


async def test_a_server_stopping_over_nats_sends_its_members_to_resume_and_holds_their_names(
    nats: NatsNode, tmp_path: Path
) -> None:
    staying = start_server_process(tmp_path / "staying", "--store", nats.url)
    leaving = start_server_process(tmp_path / "leaving", "--store", nats.url)
    try:
        async with (
            grpc.aio.insecure_channel(staying.address) as here,
            grpc.aio.insecure_channel(leaving.address) as there,
        ):
            alice, bob, joined = await alice_and_bob(here, there)
            # In a thread: stop waits for the server to exit, and this loop must read bob's stream meanwhile, or the
            # server's grace runs out and it cancels the call instead (seen once on a busy machine).
            await asyncio.to_thread(leaving.stop)
            # Not RoomClosed: the room lives on in NATS, and UNAVAILABLE is what the chat client resumes after.
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await bob.next(WAIT)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == "the server is restarting; reconnect to resume"
            left = (await alice.next_of("member_left", WAIT)).member_left
            assert (left.name, left.reason) == ("bob", pb.LEAVE_REASON_DISCONNECTED)
            thief = Stream(chat_pb2_grpc.ChatServiceStub(here))
            await thief.join("r", "bob")
            assert (await thief.next(WAIT)).error.code == pb.ERROR_CODE_NAME_TAKEN
            back = Stream(chat_pb2_grpc.ChatServiceStub(here))
            resume = pb.ChatRequest.Resume(token=joined.resume_token, last_seq=joined.last_seq)
            await back.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="r", name="bob", resume=resume)))
            answer = (await back.next(WAIT)).joined
            assert (answer.name, answer.resumed, list(answer.members)) == ("bob", True, ["alice", "bob"])
            for stream in (alice, thief, back):
                stream.call.cancel()
    finally:
        staying.stop()
        leaving.stop()


async def test_the_chat_client_resumes_its_room_after_its_server_restarts_over_nats(
    nats: NatsNode, tmp_path: Path
) -> None:
    seen = Recorder()
    first = start_server_process(tmp_path / "state", "--store", nats.url)
    restarted: ServerProcess | None = None
    try:
        async with Session(first.address, seen) as alice:
            await alice.connect()
            await alice.create("lobby", "alice")
            await asyncio.to_thread(first.stop)
            assert first.process.returncode == 0
            await seen.until("reconnecting")
            # No RoomClosed: the room lives on in NATS. A busy machine may see the client retry more than once.
            kinds = [kind for kind, _ in seen.seen]
            assert kinds[0] == "joined" and set(kinds[1:]) == {"reconnecting"}
            assert await alice.say("still here?")
            restarted = await asyncio.to_thread(
                start_server_process, tmp_path / "state", "--store", nats.url, "--port", str(first.port)
            )
            await seen.until("message")
            assert seen.joined[-1].resumed
            assert seen.lost == []
            assert seen.texts() == ["still here?"]
            assert alice.room == "lobby"
    finally:
        for server in (first, restarted):
            if server is not None:
                server.stop()
