"""Closing empty rooms: PruneRooms (chat-admin prune) at once, or --empty-room-ttl after a while."""

from __future__ import annotations

import asyncio
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


def admin(server: ChatServer) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the server's admin token."""
    return (("authorization", f"Bearer {server.admin_token}"),)


async def _wait_until_empty(stub: Stub, room: str) -> None:
    """Poll ListRooms, a bounded number of times, until `room` has no members."""
    for _ in range(200):
        rooms = {r.name: r.member_count for r in (await stub.ListRooms(pb.ListRoomsRequest())).rooms}
        if rooms.get(room) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"room {room} never emptied")


async def test_prune_closes_only_rooms_nobody_is_in_or_may_come_back_to(stub: Stub, server: ChatServer) -> None:
    for room in ("attic", "cellar", "held"):
        await stub.CreateRoom(pb.CreateRoomRequest(room=room))
    await Stream.joined(stub, "lobby", "alice", create=True)
    # A member whose connection dropped keeps its name for a resume, so its room is not empty yet.
    away, _ = await Stream.joined(stub, "held", "bob")
    away.call.cancel()
    await _wait_until_empty(stub, "held")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.PruneRooms(pb.PruneRoomsRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    pruned = await stub.PruneRooms(pb.PruneRoomsRequest(), metadata=admin(server))
    assert list(pruned.rooms) == ["attic", "cellar"]
    rooms = [room.name for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms]
    assert rooms == ["held", "lobby"]
    assert list((await stub.PruneRooms(pb.PruneRoomsRequest(), metadata=admin(server))).rooms) == []


async def test_empty_room_ttl_closes_a_room_nobody_is_in(tmp_path: Path) -> None:
    proc = await asyncio.to_thread(start_server_process, tmp_path / "state", "--empty-room-ttl", "0.5")
    try:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            await stub.CreateRoom(pb.CreateRoomRequest(room="idle"))
            await Stream.joined(stub, "busy", "alice", create=True)
            for _ in range(200):
                rooms = [room.name for room in (await stub.ListRooms(pb.ListRoomsRequest())).rooms]
                if "idle" not in rooms:
                    break
                await asyncio.sleep(0.05)
            assert rooms == ["busy"]
        await asyncio.to_thread(proc.wait_for_line, "Room idle closed: nobody was in it for 0.5 s")
    finally:
        await asyncio.to_thread(proc.stop)
