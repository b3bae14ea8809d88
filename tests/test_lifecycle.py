"""Members that go away or fall behind, and a server that stops: nobody is left registered, nothing hangs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.rooms import DEFAULT_WRITE_SLOTS
from chat_service.server import ChatServer, Config
from tests.conftest import UNLIMITED, ServerProcess, executable, running, start_server_process
from tests.proxy import Proxy
from tests.streams import Stream

if TYPE_CHECKING:
    Stub = chat_pb2_grpc.ChatServiceAsyncStub


async def _member_counts(stub: Stub) -> dict[str, int]:
    return {room.name: room.member_count for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms}


async def test_closed_channel_removes_the_member_and_tells_the_others(stub: Stub, server: ChatServer) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    async with grpc.aio.insecure_channel(server.address) as other:
        await Stream.joined(chat_pb2_grpc.ChatServiceStub(other), "r", "bob")
        assert (await alice.next()).member_joined.name == "bob"
    left = (await alice.next()).member_left
    assert (left.name, left.reason) == ("bob", pb.LEAVE_REASON_DISCONNECTED)
    assert await _member_counts(stub) == {"r": 1}


_VANISHING_CLIENT = """
import asyncio, sys, grpc
from chat.v1 import chat_pb2 as pb, chat_pb2_grpc
async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat()
        await call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room="r", name="ghost")))
        await call.read()
        print("joined", flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_killed_client_process_is_removed(stub: Stub, server: ChatServer) -> None:
    alice, _ = await Stream.joined(stub, "r", "alice", create=True)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VANISHING_CLIENT, server.address, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"joined\n"
        assert (await alice.next()).member_joined.name == "ghost"
        child.kill()
        left = (await alice.next(timeout=5)).member_left
        assert (left.name, left.reason) == ("ghost", pb.LEAVE_REASON_DISCONNECTED)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert await _member_counts(stub) == {"r": 1}


@pytest.fixture
async def small_queue_server() -> AsyncIterator[ChatServer]:
    async with running(Config(port=0, queue_limit=16, grace_seconds=1.0, limits=UNLIMITED)) as chat:
        yield chat


async def test_member_too_slow_to_read_is_dropped_and_the_room_goes_on(small_queue_server: ChatServer) -> None:
    async with (
        grpc.aio.insecure_channel(small_queue_server.address) as fast_channel,
        grpc.aio.insecure_channel(small_queue_server.address) as slow_channel,
    ):
        fast, _ = await Stream.joined(chat_pb2_grpc.ChatServiceStub(fast_channel), "r", "fast", create=True)
        slow, _ = await Stream.joined(chat_pb2_grpc.ChatServiceStub(slow_channel), "r", "slow")
        await fast.next_of("member_joined")
        # The slow member never reads: once the transport's buffers are full its queue fills and it is dropped,
        # while the fast member keeps getting every line at once.
        line = "x" * 4000
        dropped = None
        for i in range(2000):
            await fast.say(line)
            event = await fast.next()
            while event.WhichOneof("kind") != "message":
                if event.WhichOneof("kind") == "member_left":
                    dropped = event.member_left
                event = await fast.next()
            assert event.message.seq == i + 1
            if dropped is not None:
                break
        assert dropped is not None, "the slow member was never dropped"
        assert dropped.name == "slow"
        assert dropped.reason == pb.LEAVE_REASON_TOO_SLOW
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await slow.next()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too" in (info.value.details() or "") or "read" in (info.value.details() or "")


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "chat.v1.ChatService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    assert isinstance(response, reflection_pb2.ServerReflectionResponse)
    names = {service.name for service in response.list_services_response.service}
    assert {"chat.v1.ChatService", "grpc.health.v1.Health"} <= names
    listed = await health.List(health_pb2.HealthListRequest())
    assert {name: status.status for name, status in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        "chat.v1.ChatService": health_pb2.HealthCheckResponse.SERVING,
    }


async def test_sigterm_tells_members_and_exits_within_grace(server_process: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server_process.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        alice, _ = await Stream.joined(stub, "lobby", "alice", create=True)
        server_process.wait_for_line("New room lobby created")
        server_process.process.send_signal(signal.SIGTERM)
        events = await alice.expect_end()
        closed = events[-1].room_closed
        assert (closed.room, closed.reason) == ("lobby", pb.CLOSE_REASON_SERVER_SHUTDOWN)
    exit_code = await asyncio.to_thread(server_process.process.wait, 10)
    assert exit_code == 0
    server_process.wait_for_line("server stopped")
    assert not server_process.token_path.exists()


def test_sigterm_at_once_after_the_listening_line_still_shuts_down_cleanly(tmp_path: Path) -> None:
    # Before the handlers came first, half of such starts died of the signal and left the token file behind.
    for attempt in range(4):
        proc = start_server_process(tmp_path / f"state-{attempt}")
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(timeout=10) == 0
        proc.wait_for_line("server stopped")
        assert not proc.token_path.exists()
        proc.stop()


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_is_taken_with_or_without_brackets(tmp_path: Path, host: str) -> None:
    proc = start_server_process(tmp_path / "state", "--host", host)
    try:
        with grpc.insecure_channel(f"[::1]:{proc.port}") as channel:
            rooms = chat_pb2_grpc.ChatServiceStub(channel).ListRooms(pb.ListRoomsRequest(), timeout=10)
        assert list(rooms.rooms) == []
        listed = subprocess.run(
            [executable("chat-admin"), "--host", host, "--port", str(proc.port), "ls"],
            capture_output=True,
            text=True,
            timeout=20,
            env=proc.env,
            check=False,
        )
        assert (listed.returncode, listed.stdout) == (0, "no rooms yet; /create ROOM makes one\n")
    finally:
        proc.stop()


def test_second_server_on_a_taken_port_fails_clearly(server_process: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chat_service", "--port", str(server_process.port), "--no-console"],
        capture_output=True,
        text=True,
        timeout=30,
        env=server_process.env,
        check=False,
    )
    assert result.returncode == 1
    assert f"cannot start the server on 127.0.0.1:{server_process.port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
async def fast_keepalive_server() -> AsyncIterator[ChatServer]:
    async with running(Config(port=0, keepalive_seconds=1.0, grace_seconds=1.0)) as chat:
        yield chat


async def test_member_behind_a_dead_network_is_removed_by_keepalive(fast_keepalive_server: ChatServer) -> None:
    server = fast_keepalive_server
    async with (
        grpc.aio.insecure_channel(server.address) as direct,
        Proxy(server.port) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as proxied,
    ):
        alice, _ = await Stream.joined(chat_pb2_grpc.ChatServiceStub(direct), "r", "alice", create=True)
        await Stream.joined(chat_pb2_grpc.ChatServiceStub(proxied), "r", "bob")
        assert (await alice.next()).member_joined.name == "bob"
        proxy.freeze()
        left = (await alice.next(timeout=10)).member_left
        assert (left.name, left.reason) == ("bob", pb.LEAVE_REASON_DISCONNECTED)


@pytest.mark.unlimited
async def test_clients_that_never_read_cannot_hold_up_other_rooms(server: ChatServer) -> None:
    # Each non-reader's write blocks on HTTP/2 flow control once its window is full; more of them than the
    # server has write slots must still leave every other room's delivery running.
    no_bdp = [("grpc.http2.bdp_probe", 0)]
    async with contextlib.AsyncExitStack() as stack:
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(server.address))
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        flooder, _ = await Stream.joined(stub, "flood", "flooder", create=True)
        for i in range(2 * DEFAULT_WRITE_SLOTS):
            idle = await stack.enter_async_context(grpc.aio.insecure_channel(server.address, options=no_bdp))
            await Stream.joined(chat_pb2_grpc.ChatServiceStub(idle), "flood", f"idle{i}")
        line = "x" * 4000
        for _ in range(200):
            await flooder.say(line)
            await flooder.next_of("message")
        alice, _ = await Stream.joined(stub, "calm", "alice", create=True)
        bob, _ = await Stream.joined(stub, "calm", "bob")
        await alice.say("still there?")
        assert (await bob.next_of("message", timeout=5)).message.text == "still there?"
