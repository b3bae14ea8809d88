"""Many members at once: every member gets every message exactly once, in one order, and nobody is left behind."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat_service.server import ChatServer
from tests.conftest import start_server_process
from tests.streams import Stream

if TYPE_CHECKING:
    from chat.v1 import chat_pb2_grpc

    Stub = chat_pb2_grpc.ChatServiceAsyncStub

MEMBERS = 12
LINES = 15
# gRPC's own default backlog of calls not yet taken by the server turns some of these away at random.
STORM = 4000
STORM_STREAMS_PER_CHANNEL = 64
STORM_ROUNDS = 3


async def _member(stub: Stub, room: str, name: str, joined_all: asyncio.Event) -> list[tuple[int, str, str]]:
    """Join, wait until every member of the room is in, say LINES lines, read every line of the room."""
    stream, _ = await Stream.joined(stub, room, name)
    await joined_all.wait()
    for i in range(LINES):
        await stream.say(f"{name}:{i}")
    seen: list[tuple[int, str, str]] = []
    while len(seen) < MEMBERS * LINES:
        event = await stream.next()
        if event.WhichOneof("kind") == "message":
            seen.append((event.message.seq, event.message.sender, event.message.text))
    await stream.leave()
    await stream.expect_end()
    return seen


async def _doomed(stub: Stub, name: str, joined_all: asyncio.Event) -> list[int]:
    """Join the room that gets killed, chat until the kill, and return the seqs seen before RoomClosed."""
    stream, _ = await Stream.joined(stub, "doomed", name)
    # Read while writing, as a real client does, so the room's last events are taken before any failed write.
    reading = asyncio.create_task(stream.expect_end())
    await joined_all.wait()
    for i in range(LINES):
        try:
            await stream.say(f"{name}:{i}")
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            # The kill raced ahead of this line and the server has already ended the stream.
            break
    events = await reading
    assert events[-1].WhichOneof("kind") == "room_closed"
    return [event.message.seq for event in events if event.WhichOneof("kind") == "message"]


@pytest.mark.unlimited
async def test_many_members_chat_at_once_with_a_kill_in_the_middle(stub: Stub, server: ChatServer) -> None:
    rooms = ["alpha", "beta", "doomed"]
    for room in rooms:
        await stub.CreateRoom(pb.CreateRoomRequest(room=room))
    ready = {room: asyncio.Event() for room in rooms}
    watchers = {room: asyncio.create_task(_wait_for_members(stub, room, MEMBERS, ready[room])) for room in rooms}
    living = [
        asyncio.create_task(_member(stub, room, f"{room}-{i}", ready[room]))
        for room in ("alpha", "beta")
        for i in range(MEMBERS)
    ]
    doomed = [asyncio.create_task(_doomed(stub, f"doomed-{i}", ready["doomed"])) for i in range(MEMBERS)]
    await asyncio.wait_for(asyncio.gather(*watchers.values()), 10)
    metadata = (("authorization", f"Bearer {server.admin_token}"),)
    await stub.KillRoom(pb.KillRoomRequest(room="doomed"), metadata=metadata)

    results = await asyncio.wait_for(asyncio.gather(*living), 30)
    for room_index in range(2):
        views = results[room_index * MEMBERS : (room_index + 1) * MEMBERS]
        first = views[0]
        assert [seq for seq, _, _ in first] == list(range(1, MEMBERS * LINES + 1))
        assert len({text for _, _, text in first}) == MEMBERS * LINES
        assert all(view == first for view in views)

    doomed_views = await asyncio.wait_for(asyncio.gather(*doomed), 30)
    # The kill lands at one point in the room's order, so every member saw the same gap-free prefix.
    assert all(view == doomed_views[0] for view in doomed_views)
    assert doomed_views[0] == list(range(1, len(doomed_views[0]) + 1))

    rooms_now = {r.name: r.member_count for r in (await stub.ListRooms(pb.ListRoomsRequest())).rooms}
    assert rooms_now == {"alpha": 0, "beta": 0}


async def _wait_for_members(stub: Stub, room: str, count: int, ready: asyncio.Event) -> None:
    """Poll-free: watch the room as one more member and set `ready` once `count` others have joined."""
    watcher, joined = await Stream.joined(stub, room, "watcher")
    present = len(joined.members) - 1
    while present < count:
        if (await watcher.next()).WhichOneof("kind") == "member_joined":
            present += 1
    await watcher.leave()
    ready.set()


# A separate process with a plain event loop, so the calls go out as fast as a real crowd's would. A stream whose
# connection is lost (a keepalive ping unanswered on a busy machine ends it UNAVAILABLE) goes again after the crowd,
# as a reconnecting client's would; a stream refused for the crowd (the client sees INTERNAL) never does.
_STORM_CLIENT = """
import asyncio, collections, contextlib, json, sys, grpc
from chat.v1 import chat_pb2 as pb, chat_pb2_grpc
address, count, per_channel, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
async def main():
    async with contextlib.AsyncExitStack() as stack:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(address, options=options))
            for _ in range(-(-count // per_channel))
        ]
        async def answered(index):
            call = chat_pb2_grpc.ChatServiceStub(channels[index // per_channel]).Chat()
            try:
                # A request with no action draws an error event: proof that a handler serves this stream.
                await call.write(pb.ChatRequest())
                response = await call.read()
                return response.events[0].WhichOneof("kind")
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()}"
        outcomes, retried, waiting = collections.Counter(), 0, list(range(count))
        for round in range(rounds):
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
            results = await asyncio.gather(*(answered(index) for index in waiting))
            last = round == rounds - 1
            again = [i for i, result in zip(waiting, results) if result.startswith("UNAVAILABLE") and not last]
            outcomes.update(result for result in results if last or not result.startswith("UNAVAILABLE"))
            retried, waiting = retried + len(again), again
    print(json.dumps({"outcomes": outcomes, "retried": retried}))
asyncio.run(main())
"""


async def test_a_storm_of_streams_opened_at_once_is_served_in_full(tmp_path: Path) -> None:
    """Clients that all reconnect at once, as after a restart, all get in: none is refused for the crowd."""
    # Asyncio's debug mode makes both processes several times slower, long enough under load for keepalive pings
    # to go unanswered and for gRPC to cancel calls left waiting over 30 s; the crowd is what is tested here.
    plain = {"PYTHONASYNCIODEBUG": ""}
    server = start_server_process(tmp_path / "state", extra_env=plain)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _STORM_CLIENT,
        server.address,
        str(STORM),
        str(STORM_STREAMS_PER_CHANNEL),
        str(STORM_ROUNDS),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, **plain},
    )
    try:
        output, _ = await asyncio.wait_for(child.communicate(), 50)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        server.stop()
    assert child.returncode == 0
    result = json.loads(output)
    assert result["outcomes"] == {"error": STORM}, result
