"""A crowd of members in a process of its own: `python -m tests.crowd ADDRESS ROOM COUNT`.

It joins COUNT members (c0, c1, ...) to ROOM without reading their streams, prints `joined`, then on a line `leave`
on stdin makes every one of them leave at once, reads their streams to the end and prints `left`. A test that wants
them to vanish instead kills the process.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc

STREAMS_PER_CHANNEL = 64

Call = grpc.aio.StreamStreamCall[pb.ChatRequest, pb.ChatResponse]


async def _join(stub: chat_pb2_grpc.ChatServiceAsyncStub, room: str, name: str) -> Call:
    call: Call = stub.Chat()
    await call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name=name)))
    response = await call.read()
    assert isinstance(response, pb.ChatResponse), response
    kind = response.events[0].WhichOneof("kind")
    assert kind == "joined", response.events[0]
    return call


async def _leave(call: Call) -> None:
    await call.write(pb.ChatRequest(leave=pb.ChatRequest.LeaveRoom()))
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass


async def main(address: str, room: str, count: int) -> None:
    # A connection of its own per channel: channels to one address otherwise share one, and its stream limit.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
    calls = await asyncio.gather(*(_join(stubs[i // STREAMS_PER_CHANNEL], room, f"c{i}") for i in range(count)))
    print("joined", flush=True)
    command = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if command.strip() == "leave":
        await asyncio.gather(*(_leave(call) for call in calls))
        print("left", flush=True)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
