"""The client's connection to the chat server and its state machine (waiting / chatting); it never prints."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from chat_service._pb.chat.v1 import chat_pb2, chat_pb2_grpc

CONNECT_TIMEOUT = 3.0
RPC_TIMEOUT = 10.0
# How long a stream may take to end after a leave or a half-close before the client cancels it.
CLOSE_TIMEOUT = 5.0

# Pings notice a server that vanished without closing the connection (a network cut) within ~15 s.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Current gRPC cores time the ack with this instead (default one minute), whatever keepalive_timeout says.
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

NOT_IN_ROOM = "you are not in a room; /join ROOM or /create ROOM first"

_ENDED_BY_SENDING = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


def target(host: str, port: int) -> str:
    """The `host:port` address gRPC dials, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SessionError(Exception):
    """An expected failure; its text is a sentence the user can act on."""


class UnreachableError(SessionError):
    """No chat server answers at the address."""

    def __init__(self, address: str) -> None:
        super().__init__(f"cannot reach the chat server at {address} (is it running? start it with 'make run')")


@dataclass(frozen=True)
class ConnectionLost:
    """The member's stream failed or ended unasked; the session is back to waiting."""

    room: str
    message: str


Incoming = chat_pb2.Event | ConnectionLost
# Called for every incoming event, in order, with the name of the member it is addressed to.
EventHandler = Callable[[Incoming, str], None]

_Call = grpc.aio.StreamStreamCall[chat_pb2.ChatRequest, chat_pb2.ChatResponse]


@dataclass(eq=False)
class _Membership:
    """One Chat stream: one join attempt and, when it succeeds, one stay in a room."""

    call: _Call
    room: str
    answered: asyncio.Future[chat_pb2.Joined | None]
    name: str = ""
    members: set[str] = field(default_factory=set)
    leaving: bool = False
    reader: asyncio.Task[None] = field(init=False)


class Session:
    """One client's channel and at most one room membership; await one command at a time.

    Create it inside a running event loop. Every event the server sends reaches `on_event` in order,
    and always before the command that caused it (a join, a leave) returns.
    """

    def __init__(self, address: str, on_event: EventHandler) -> None:
        self.address = address
        self._on_event = on_event
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._current: _Membership | None = None
        self._streams: set[_Membership] = set()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def room(self) -> str | None:
        """The room the member is in, or None while waiting."""
        return self._current.room if self._current else None

    @property
    def name(self) -> str | None:
        """The member's name in its room, or None while waiting."""
        return self._current.name if self._current else None

    async def connect(self) -> None:
        """Return once the server answers; raise UnreachableError if it does not within CONNECT_TIMEOUT."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise UnreachableError(self.address) from None

    async def list_rooms(self) -> list[chat_pb2.Room]:
        """Every open room, sorted by name."""
        try:
            response = await self._stub.ListRooms(chat_pb2.ListRoomsRequest(), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(exc) from None
        return list(response.rooms)

    async def create(self, room: str, name: str | None = None) -> chat_pb2.Joined | None:
        """Create `room` and join it in one step; see `join`."""
        return await self._join(room, name, create=True)

    async def join(self, room: str, name: str | None = None) -> chat_pb2.Joined | None:
        """Join `room`; returns the Joined event, or None when the server refused (its Error event was delivered)."""
        return await self._join(room, name, create=False)

    async def say(self, text: str) -> None:
        """Send a line to the room; it comes back as a message event like everyone else's."""
        await self._send(chat_pb2.ChatRequest(say=chat_pb2.ChatRequest.SendMessage(text=text)))

    async def whisper(self, recipient: str, text: str) -> None:
        """Send a line to one member; the server echoes it back as a whisper event."""
        await self._send(chat_pb2.ChatRequest(whisper=chat_pb2.ChatRequest.SendWhisper(recipient=recipient, text=text)))

    async def leave(self) -> str:
        """Leave the room and return its name, once the stream has ended and its last events are delivered."""
        membership = self._require_room()
        membership.leaving = True
        with contextlib.suppress(*_ENDED_BY_SENDING):
            await membership.call.write(chat_pb2.ChatRequest(leave=chat_pb2.ChatRequest.LeaveRoom()))
        await self._finish(membership)
        self._drop(membership)
        return membership.room

    def who(self) -> tuple[str, list[str]]:
        """The room and its members, sorted, as last reported by the server."""
        membership = self._require_room()
        return membership.room, sorted(membership.members)

    async def close(self) -> None:
        """Leave the room if in one, end every stream and close the channel."""
        if self._current is not None:
            await self.leave()
        for membership in self._streams:
            membership.leaving = True
            membership.call.cancel()
        await asyncio.gather(*(membership.reader for membership in self._streams))
        await self._channel.close()

    async def _join(self, room: str, name: str | None, *, create: bool) -> chat_pb2.Joined | None:
        if self._current is not None:
            raise SessionError(f"you are already in room {self._current.room}; /leave first")
        membership = _Membership(self._stub.Chat(), room, asyncio.get_running_loop().create_future())
        membership.reader = asyncio.create_task(self._read(membership))
        self._streams.add(membership)
        membership.reader.add_done_callback(lambda _: self._streams.discard(membership))
        request = chat_pb2.ChatRequest(join=chat_pb2.ChatRequest.JoinRoom(room=room, name=name or "", create=create))
        # A failed write means the call failed; the reader sees the same failure and reports it via `answered`.
        with contextlib.suppress(*_ENDED_BY_SENDING):
            await membership.call.write(request)
        joined = await membership.answered
        if joined is None:
            # A refused join leaves the stream open for another try; this client opens a fresh one instead.
            await self._finish(membership)
        return joined

    async def _send(self, request: chat_pb2.ChatRequest) -> None:
        membership = self._require_room()
        try:
            await membership.call.write(request)
        except _ENDED_BY_SENDING:
            raise SessionError(f"not sent: your stream to room {membership.room} has ended") from None

    def _require_room(self) -> _Membership:
        if self._current is None:
            raise SessionError(NOT_IN_ROOM)
        return self._current

    def _drop(self, membership: _Membership) -> None:
        if self._current is membership:
            self._current = None

    async def _finish(self, membership: _Membership) -> None:
        """Half-close the stream and wait for the server to end it, cancelling it if that takes too long."""
        with contextlib.suppress(*_ENDED_BY_SENDING):
            await membership.call.done_writing()
        done, _ = await asyncio.wait({membership.reader}, timeout=CLOSE_TIMEOUT)
        if not done:
            membership.leaving = True
            membership.call.cancel()
        await membership.reader

    async def _read(self, membership: _Membership) -> None:
        """Deliver the stream's events in order until it ends, then settle the session's state."""
        try:
            while True:
                response = await membership.call.read()
                # read() returns grpc.aio.EOF, not a ChatResponse, once the server ends the stream.
                if not isinstance(response, chat_pb2.ChatResponse):
                    break
                for event in response.events:
                    self._apply(membership, event)
                if any(event.HasField("room_closed") for event in response.events):
                    # The server waits a moment for this half-close before ending the call itself.
                    with contextlib.suppress(*_ENDED_BY_SENDING):
                        await membership.call.done_writing()
        except grpc.aio.AioRpcError as exc:
            self._ended(membership, exc)
        except asyncio.CancelledError:
            # A call this client cancelled ends read() with CancelledError rather than an AioRpcError.
            task = asyncio.current_task()
            if not membership.call.cancelled() or (task is not None and task.cancelling()):
                raise
            self._ended(membership, None)
        else:
            self._ended(membership, None)

    def _apply(self, membership: _Membership, event: chat_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "joined":
            membership.room = event.joined.room
            membership.name = event.joined.name
            membership.members = set(event.joined.members)
            self._current = membership
        elif kind == "member_joined":
            membership.members.add(event.member_joined.name)
        elif kind == "member_left":
            membership.members.discard(event.member_left.name)
        elif kind == "room_closed":
            # Back to waiting before the event is shown, so the next command already sees the new state.
            self._drop(membership)
        self._on_event(event, membership.name)
        if kind in ("joined", "error") and not membership.answered.done():
            membership.answered.set_result(event.joined if kind == "joined" else None)

    def _ended(self, membership: _Membership, failure: grpc.aio.AioRpcError | None) -> None:
        was_current = self._current is membership
        self._drop(membership)
        if not membership.answered.done():
            error = (
                self._rpc_error(failure)
                if failure
                else SessionError(f"the server ended the stream before answering the join to {membership.room}")
            )
            membership.answered.set_exception(error)
        elif was_current and not membership.leaving:
            self._on_event(ConnectionLost(membership.room, self._lost(membership, failure)), membership.name)

    def _lost(self, membership: _Membership, failure: grpc.aio.AioRpcError | None) -> str:
        if failure is None:
            return f"the server ended your stay in room {membership.room}"
        if failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return failure.details() or f"the server dropped you from room {membership.room} for reading too slowly"
        return (
            f"the chat server at {self.address} went away ({failure.code().name}); "
            f"you are no longer in room {membership.room}"
        )

    def _rpc_error(self, failure: grpc.aio.AioRpcError) -> SessionError:
        if failure.code() == grpc.StatusCode.UNAVAILABLE:
            return UnreachableError(self.address)
        return SessionError(failure.details() or f"the server refused the request ({failure.code().name})")
