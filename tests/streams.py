"""Thin test drivers for Chat streams: through the real generated stub, or as raw request bytes."""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc

TIMEOUT = 10.0


def raw_chat(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[bytes, pb.ChatResponse]:
    """A Chat call that sends requests as the bytes given, however malformed, and decodes the server's answers."""
    method: grpc.aio.StreamStreamMultiCallable[bytes, pb.ChatResponse] = channel.stream_stream(
        "/chat.v1.ChatService/Chat", request_serializer=None, response_deserializer=pb.ChatResponse.FromString
    )
    return method()


class Stream:
    """One Chat stream: send requests, and read its events one at a time whatever their batching."""

    def __init__(
        self, stub: chat_pb2_grpc.ChatServiceAsyncStub, metadata: tuple[tuple[str, str], ...] | None = None
    ) -> None:
        self.call = stub.Chat(metadata=metadata)
        self._pending: deque[pb.Event] = deque()
        self.batches = 0

    @classmethod
    async def joined(
        cls, stub: chat_pb2_grpc.ChatServiceAsyncStub, room: str, name: str = "", *, create: bool = False
    ) -> tuple[Stream, pb.Joined]:
        """Open a stream and join; fails the test unless the join succeeds."""
        stream = cls(stub)
        await stream.join(room, name, create=create)
        event = await stream.next()
        assert event.WhichOneof("kind") == "joined", event
        return stream, event.joined

    async def join(self, room: str, name: str = "", *, create: bool = False) -> None:
        await self.call.write(pb.ChatRequest(join=pb.ChatRequest.JoinRoom(room=room, name=name, create=create)))

    async def say(self, text: str) -> None:
        await self.call.write(pb.ChatRequest(say=pb.ChatRequest.SendMessage(text=text)))

    async def whisper(self, recipient: str, text: str) -> None:
        await self.call.write(pb.ChatRequest(whisper=pb.ChatRequest.SendWhisper(recipient=recipient, text=text)))

    async def leave(self) -> None:
        """Leave and half-close, as a well-behaved client does; the server ends the stream once it has both."""
        await self.call.write(pb.ChatRequest(leave=pb.ChatRequest.LeaveRoom()))
        await self.call.done_writing()

    async def next(self, timeout: float = TIMEOUT) -> pb.Event:
        """The next event; fails the test if none comes within `timeout` or the stream ends."""
        while not self._pending:
            response = await asyncio.wait_for(self.call.read(), timeout)
            assert response is not grpc.aio.EOF, "the stream ended while an event was expected"
            assert isinstance(response, pb.ChatResponse)
            self.batches += 1
            self._pending.extend(response.events)
        return self._pending.popleft()

    async def next_of(self, kind: str, timeout: float = TIMEOUT) -> pb.Event:
        """Skip events until one of `kind` arrives."""
        while True:
            event = await self.next(timeout)
            if event.WhichOneof("kind") == kind:
                return event

    async def expect_end(self, timeout: float = TIMEOUT) -> list[pb.Event]:
        """Read to the end of the stream and return the events that came before it."""
        rest = list(self._pending)
        self._pending.clear()
        while True:
            response = await asyncio.wait_for(self.call.read(), timeout)
            if response is grpc.aio.EOF:
                return rest
            assert isinstance(response, pb.ChatResponse)
            rest.extend(response.events)
            if rest and rest[-1].WhichOneof("kind") == "room_closed":
                # As a well-behaved client does: the room is gone, so stop writing and let the server finish.
                await self.call.done_writing()
