"""The gRPC servicer: it translates between protobuf and the registry, and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from chat.v1 import chat_pb2 as pb
from chat_service.admin_token import carries_token
from chat_service.encoding import encode
from chat_service.errors import ChatError, ErrorKind
from chat_service.events import LeaveReason, Problem, Resume, RoomInfo
from chat_service.limits import Limiter, client_address
from chat_service.registry import Membership, Registry
from chat_service.status import status_code
from chat_service.throttled_log import ThrottledLog

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ChatService"].full_name

CLIENT_CLOSE_GRACE_SECONDS = 5.0
# A stream costs the server about 22 KiB before it joins; one that never does is ended after this long.
DEFAULT_JOIN_TIMEOUT_SECONDS = 10.0
# Lines one member may have in flight, read and waiting for the store to keep them (see `_Pipeline`). 16 is the
# benchmark's burst window, and below the line rate limit's burst (20); with 4 KiB of text a line in flight holds
# about 14 KiB (its request, text, message, log row and task), so a member's window stays far below its queue's.
DEFAULT_LINES_IN_FLIGHT = 16

Context = grpc.aio.ServicerContext[bytes, bytes]
Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)

# Bad input is the client's mistake, not the server's: each is answered, and the log samples them per client.
_bad_input = ThrottledLog(logging.getLogger(__name__))


class ChatServicer:
    """Serves chat.v1.ChatService from a registry whose events are already encoded batch pieces."""

    def __init__(
        self,
        registry: Registry[bytes],
        limiter: Limiter | None = None,
        admin_token: str | None = None,
        join_timeout: float = DEFAULT_JOIN_TIMEOUT_SECONDS,
        lines_in_flight: int = DEFAULT_LINES_IN_FLIGHT,
    ) -> None:
        self._registry = registry
        self._limiter = limiter
        self._admin_token = admin_token
        self._join_timeout = join_timeout
        self._lines_in_flight = lines_in_flight

    def _limiter_for(self, context: grpc.aio.ServicerContext[Any, Any]) -> Limiter | None:
        """The limiter for this call; None for a call that carries the admin token, which no limit applies to."""
        token = self._admin_token
        if token is not None and carries_token(context.invocation_metadata(), token):
            return None
        return self._limiter

    async def ListRooms(
        self, request: pb.ListRoomsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListRoomsResponse:
        try:
            rooms = await self._registry.list_rooms()
        except ChatError as error:
            await _abort(context, error)
        return pb.ListRoomsResponse(rooms=[_room(info) for info in rooms])

    async def CreateRoom(
        self, request: pb.CreateRoomRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CreateRoomResponse:
        try:
            if limiter := self._limiter_for(context):
                limiter.create_room(client_address(context.peer()), request.room)
            info = await self._registry.create_room(request.room)
        except ChatError as error:
            await _abort(context, error)
        return pb.CreateRoomResponse(room=_room(info))

    async def KillRoom(
        self, request: pb.KillRoomRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.KillRoomResponse:
        try:
            ejected = await self._registry.kill_room(request.room)
        except ChatError as error:
            await _abort(context, error)
        return pb.KillRoomResponse(ejected_members=ejected)

    async def PruneRooms(
        self, request: pb.PruneRoomsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.PruneRoomsResponse:
        try:
            pruned = await self._registry.prune_rooms()
        except ChatError as error:
            await _abort(context, error)
        return pb.PruneRoomsResponse(rooms=pruned)

    async def Chat(self, requests: AsyncIterator[bytes], context: Context) -> None:
        requests = aiter(requests)
        limiter = self._limiter_for(context)
        member = await self._join(requests, context, limiter)
        if member is None:
            return
        reader = asyncio.create_task(_serve_requests(requests, member, context, limiter, self._lines_in_flight))
        guard = _WriteGuard(context)
        member.dropped.add_done_callback(guard.interrupt)
        try:
            try:
                await member.deliver(guard.write)
            except asyncio.CancelledError:
                if not guard.interrupted:
                    raise
                guard.uncancel()
            if member.dropped.done():
                error = member.dropped.result()
                await context.abort(status_code(error.kind), error.message)
            # A client still writing when the server ends the call loses the events it has not read yet, so
            # after the room's last event the client gets a moment to see it and half-close first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), CLIENT_CLOSE_GRACE_SECONDS)
        finally:
            reader.cancel()
            await member.leave(LeaveReason.DISCONNECTED)

    async def _join(
        self, requests: AsyncIterator[bytes], context: Context, limiter: Limiter | None
    ) -> Membership[bytes] | None:
        """Read requests until one joins a room, within the join timeout; every other request gets an error event."""
        try:
            async with asyncio.timeout(self._join_timeout):
                return await self._first_join(requests, context, limiter)
        except TimeoutError:
            error = ChatError(
                ErrorKind.JOIN_TIMEOUT,
                f"no room was joined within {self._join_timeout:g} s of opening the stream; send join first",
            )
            await context.abort(status_code(error.kind), error.message)

    async def _first_join(
        self, requests: AsyncIterator[bytes], context: Context, limiter: Limiter | None
    ) -> Membership[bytes] | None:
        address = client_address(context.peer())
        while (raw := await anext(requests, None)) is not None:
            try:
                request = _decode(pb.ChatRequest, raw, context)
                if request.WhichOneof("action") != "join":
                    raise ChatError(ErrorKind.NOT_JOINED, "you are not in a room yet; send join first")
                join = request.join
                resume = Resume(join.resume.token, join.resume.last_seq) if join.HasField("resume") else None
                if limiter is not None:
                    limiter.join(address, join.room, join.name)
                    if join.create:
                        limiter.create_room(address, join.room)
                return await self._registry.join(
                    join.room, join.name, create=join.create, history=join.history, resume=resume
                )
            except ChatError as error:
                await context.write(encode(Problem(error)))
        return None


async def _serve_requests(
    requests: AsyncIterator[bytes],
    member: Membership[bytes],
    context: Context,
    limiter: Limiter | None,
    lines_in_flight: int,
) -> None:
    """Apply a joined member's requests in order, until `leave` or the end of the requests: its lines are pipelined
    (see `_Pipeline`), and any other request first waits for the lines before it."""
    lines = limiter.lines(client_address(context.peer()), member.room, member.name) if limiter is not None else None
    pipeline = _Pipeline(member, lines_in_flight)
    try:
        async for raw in requests:
            try:
                request = _decode(pb.ChatRequest, raw, context)
            except ChatError as error:
                await pipeline.drain()
                member.report(error)
                continue
            # The id of the line being answered, so that its error names it too.
            client_id = ""
            try:
                action = request.WhichOneof("action")
                if action == "say":
                    client_id = request.say.client_id
                    if lines is not None:
                        lines.charge()
                    await pipeline.say(request.say)
                    continue
                await pipeline.drain()
                if action == "whisper":
                    whisper = request.whisper
                    client_id = whisper.client_id
                    if lines is not None:
                        lines.charge()
                    await member.whisper(whisper.recipient, whisper.text, client_id)
                elif action == "leave":
                    await member.leave()
                    # Ending the call under requests the client still sends would fail its writes (grpc.aio calls
                    # that INTERNAL), so whatever follows a leave is read and ignored until the client half-closes.
                    async for _ in requests:
                        pass
                    return
                elif action == "join":
                    raise ChatError(
                        ErrorKind.ALREADY_JOINED,
                        f"you are already in room {member.room!r}; leave it first (one stream is one membership)",
                    )
                else:
                    raise ChatError(ErrorKind.BAD_REQUEST, "the request has no action; set join, say, whisper or leave")
            except ChatError as error:
                member.report(error, client_id)
        await pipeline.drain()
        # A vanished client ends the requests just as a half-close does, and neither said goodbye.
        await member.leave(LeaveReason.DISCONNECTED)
    finally:
        await pipeline.cancel()


class _Pipeline:
    """A member's lines in flight, each said from its own task as soon as it is read, so that the store logs it along
    with those before it (in order: see Store.append); at most `most` at once, past that the reader waits."""

    __slots__ = ("_member", "_most", "_tasks")

    def __init__(self, member: Membership[bytes], most: int) -> None:
        self._member = member
        self._most = most
        # A list, not a deque: an idle member's empty deque holds a block of 0.5 KiB, and it never holds more than
        # `most` tasks.
        self._tasks: list[asyncio.Task[None]] = []

    async def say(self, say: pb.ChatRequest.SendMessage) -> None:
        """Start saying `say`, once fewer than the bound of lines are in flight."""
        tasks = self._tasks
        while tasks and (tasks[0].done() or len(tasks) >= self._most):
            # Awaited before it leaves the list, so that `cancel` still finds it if this reader is cancelled here.
            await tasks[0]
            del tasks[0]
        tasks.append(asyncio.create_task(_say(self._member, say)))

    async def drain(self) -> None:
        """Wait until every line in flight has been answered."""
        tasks = self._tasks
        while tasks:
            await tasks[0]
            del tasks[0]

    async def cancel(self) -> None:
        """Stop the lines still in flight (those the store has already taken may still be logged) and wait for them."""
        tasks = self._tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()


async def _say(member: Membership[bytes], say: pb.ChatRequest.SendMessage) -> None:
    """Say one line, reporting its error to the member under its client_id."""
    try:
        await member.say(say.text, say.client_id, action=say.action)
    except ChatError as error:
        member.report(error, say.client_id)


class _WriteGuard:
    """Lets the server's drop of a member interrupt its handler while the client's flow control holds a write."""

    __slots__ = ("_context", "interrupted", "task", "writing")

    def __init__(self, context: Context) -> None:
        self._context = context
        self.task = asyncio.current_task()
        self.writing = False
        self.interrupted = False

    def interrupt(self, _: object) -> None:
        # Only a blocked write needs cancelling: a handler waiting for events sees the end of its queue instead.
        if self.writing and self.task is not None:
            self.interrupted = True
            self.task.cancel()

    async def write(self, batch: list[bytes]) -> None:
        """Write one batch as one ChatResponse, marked as a write the guard may interrupt."""
        self.writing = True
        await self._context.write(b"".join(batch))
        self.writing = False

    def uncancel(self) -> None:
        if self.task is not None:
            self.task.uncancel()


async def _abort(context: grpc.aio.ServicerContext[object, object], error: ChatError) -> None:
    message = error.message
    if error.retry_after is not None:
        # Rounded up, so that waiting as long as it says is always enough.
        message += f"; try again in {math.ceil(error.retry_after * 10) / 10:.1f} s"
    await context.abort(status_code(error.kind), message)


def _decode(message_type: type[Request], raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Request:
    """`raw` parsed as `message_type`, or ChatError(BAD_REQUEST): left to gRPC, it fails UNKNOWN with a traceback."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        name = message_type.DESCRIPTOR.full_name
        peer = context.peer()
        _bad_input.warning(
            "undecodable",
            "undecodable %s (%d bytes) from %s",
            name,
            len(raw),
            peer,
            client=client_address(peer),
            extra={"peer": peer},
        )
        raise ChatError(
            ErrorKind.BAD_REQUEST,
            f"the request is not a valid {name}: it is not protobuf of that type, or a string in it is not UTF-8",
        ) from None


def _unary(
    method: Callable[[Request, grpc.aio.ServicerContext[object, object]], Awaitable[Response]],
    request_type: type[Request],
    response_type: type[Response],
) -> grpc.RpcMethodHandler[bytes, Response]:
    """A unary method handler that decodes its own request, so that a malformed one fails INVALID_ARGUMENT."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext[object, object]) -> Response:
        try:
            request = _decode(request_type, raw, context)
        except ChatError as error:
            await _abort(context, error)
        return await method(request, context)

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=None, response_serializer=response_type.SerializeToString
    )


def _room(info: RoomInfo) -> pb.Room:
    return pb.Room(name=info.name, member_count=info.member_count, last_seq=info.last_seq)


def method_handlers(servicer: ChatServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's method table by method name. Requests arrive as bytes and each handler decodes its own (see
    `_decode`); Chat's responses are pre-encoded bytes, so they are written as they are."""
    return {
        "ListRooms": _unary(servicer.ListRooms, pb.ListRoomsRequest, pb.ListRoomsResponse),
        "CreateRoom": _unary(servicer.CreateRoom, pb.CreateRoomRequest, pb.CreateRoomResponse),
        "KillRoom": _unary(servicer.KillRoom, pb.KillRoomRequest, pb.KillRoomResponse),
        "PruneRooms": _unary(servicer.PruneRooms, pb.PruneRoomsRequest, pb.PruneRoomsResponse),
        "Chat": grpc.stream_stream_rpc_method_handler(
            servicer.Chat, request_deserializer=None, response_serializer=None
        ),
    }


def handler(servicer: ChatServicer) -> grpc.GenericRpcHandler:
    """The service as gRPC serves it."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(servicer))
