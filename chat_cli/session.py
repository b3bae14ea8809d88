"""The client's connection to the chat server and its state machine (waiting, chatting, reconnecting); no printing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]

from chat.v1 import chat_pb2, chat_pb2_grpc

CONNECT_TIMEOUT = 3.0
# How long a bare TCP connection may take when telling why gRPC could not connect.
PROBE_TIMEOUT = 1.0
RPC_TIMEOUT = 10.0
# How long a stream may take to end after a leave or a half-close before the client cancels it.
CLOSE_TIMEOUT = 5.0
# How many of a room's recent messages a join asks for by default.
DEFAULT_HISTORY = 20

# A broken stream is resumed after RECONNECT_FIRST_DELAY, then after twice as long each time up to
# RECONNECT_MAX_DELAY. Each delay is scaled by a random factor within 1 +- RECONNECT_JITTER, so that the members
# of a room that lost the server together do not all come back in the same instant.
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
RECONNECT_JITTER = 0.5
# How long one reconnect attempt may take to reach the server and have its resume answered.
RESUME_TIMEOUT = 3.0

# Pings notice a server that vanished without closing the connection (a network cut) within ~15 s.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Current gRPC cores time the ack with this instead (default one minute), whatever keepalive_timeout says.
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Channels to one address otherwise share their connections process-wide, and with them gRPC's reconnect
    # backoff: a fresh channel, opened to try again now, would fail at once for as long as an old one waits.
    ("grpc.use_local_subchannel_pool", 1),
]

NOT_IN_ROOM = "you are not in a room; /join ROOM or /create ROOM first"

_ENDED_BY_SENDING = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


def target(host: str, port: int) -> str:
    """The `host:port` address gRPC dials, with an IPv6 host in brackets whether or not it was given with them."""
    host = host.removeprefix("[").removesuffix("]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SessionError(Exception):
    """An expected failure; its text is a sentence the user can act on."""


class UnreachableError(SessionError):
    """No chat server answers at the address; `reason` says what was found there instead, if anything."""

    def __init__(self, address: str, reason: str | None = None) -> None:
        super().__init__(
            reason or f"cannot reach the chat server at {address} (is it running? start it with 'make run')"
        )


def diagnose(address: str, tls: bool) -> UnreachableError:
    """Why no gRPC connection came up: nothing listens, or what listens speaks another transport (TLS or not)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.removeprefix("[").removesuffix("]"), int(port)), timeout=PROBE_TIMEOUT):
            pass
    except OSError:
        return UnreachableError(address)
    if tls:
        return UnreachableError(
            address,
            f"the TLS handshake with {address} failed: the server may not use TLS (leave out --tls), its "
            "certificate may not be signed by a CA you trust (--ca), or it may want a client certificate "
            "(--cert and --key)",
        )
    return UnreachableError(
        address,
        f"{address} accepted the connection but does not speak plaintext gRPC; if the server uses TLS, add --tls "
        "(and --ca for a private CA)",
    )


@dataclass(frozen=True)
class ConnectionLost:
    """The member's stay in its room ended unasked and cannot be resumed; the session is back to waiting."""

    room: str
    message: str


@dataclass(frozen=True)
class Reconnecting:
    """The member's stream broke; attempt number `attempt` to resume its stay in `room` starts in `delay` s."""

    room: str
    attempt: int
    delay: float


@dataclass(frozen=True)
class HistoryMessage:
    """A message said in the room before the member joined, replayed because the join asked for history."""

    message: chat_pb2.Message


Incoming = chat_pb2.Event | HistoryMessage | Reconnecting | ConnectionLost
# Called for every incoming event, in order, with the name of the member it is addressed to.
EventHandler = Callable[[Incoming, str], None]

_Call = grpc.aio.StreamStreamCall[chat_pb2.ChatRequest, chat_pb2.ChatResponse]


@dataclass(eq=False)
class _Stay:
    """One stay in a room; it outlives a broken stream while the session resumes it on a new one."""

    room: str
    name: str
    token: str
    # The newest live message seen; a message numbered no higher is a duplicate.
    last_seq: int
    members: set[str]
    # The stream carrying the stay, None while reconnecting.
    stream: _Stream | None
    # Lines and whispers by client id, in the order sent, until the server answers them.
    unacked: dict[str, chat_pb2.ChatRequest] = field(default_factory=dict)
    reconnect: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Stream:
    """One Chat stream: a join (or a resume of `stay`) and, once answered, the connection of that stay."""

    call: _Call
    room: str
    answered: asyncio.Future[chat_pb2.Joined | None]
    # True once the messages replayed after Joined are delivered; False if the stream ends first.
    caught_up: asyncio.Future[bool]
    stay: _Stay | None = None
    resuming: bool = False
    refusal: chat_pb2.Error | None = None
    replaying: int = 0
    # Client ids written on this stream whose answer has not come: the server answers requests in order, with
    # the echo or an error event.
    in_flight: deque[str] = field(default_factory=deque)
    # grpc.aio allows one write at a time on a call.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    leaving: bool = False
    reader: asyncio.Task[None] = field(init=False)


class _RefusedError(Exception):
    """The server answered a resume with an error: the stay cannot come back."""

    def __init__(self, error: chat_pb2.Error | None) -> None:
        super().__init__()
        self.error = error


class Session:
    """One client's channel and at most one room membership; await one command at a time.

    Create it inside a running event loop. Every event the server sends reaches `on_event` in order,
    and always before the command that caused it (a join, a leave) returns. When the member's stream breaks, the
    session resumes the stay by itself; no message is shown twice, and every line said is sent exactly once.
    """

    def __init__(
        self,
        address: str,
        on_event: EventHandler,
        history: int = DEFAULT_HISTORY,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.history = history
        self._on_event = on_event
        self._credentials = credentials
        self._channel = self._new_channel()
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._current: _Stay | None = None
        self._streams: set[_Stream] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._client_ids = itertools.count(1)
        self.repeats_dropped = 0

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def room(self) -> str | None:
        """The room the member is in (or reconnecting to), or None while waiting."""
        return self._current.room if self._current else None

    @property
    def name(self) -> str | None:
        """The member's name in its room, or None while waiting."""
        return self._current.name if self._current else None

    @property
    def reconnecting(self) -> bool:
        """Whether the member's stream broke and the session is resuming its stay."""
        return self._current is not None and self._current.stream is None

    async def connect(self) -> None:
        """Return once the server answers; raise UnreachableError, saying why, as soon as connecting fails."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if await _ready(self._channel):
                    return
        except TimeoutError:
            pass
        raise await asyncio.to_thread(diagnose, self.address, self._credentials is not None)

    def _new_channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(self.address, self._credentials, options=CHANNEL_OPTIONS)

    async def list_rooms(self) -> list[chat_pb2.Room]:
        """Every open room, sorted by name."""
        try:
            response = await self._live_stub().ListRooms(chat_pb2.ListRoomsRequest(), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(exc) from None
        return list(response.rooms)

    async def create(self, room: str, name: str | None = None) -> chat_pb2.Joined | None:
        """Create `room` and join it in one step; see `join`."""
        return await self._join(room, name, create=True)

    async def join(self, room: str, name: str | None = None) -> chat_pb2.Joined | None:
        """Join `room`, its last `history` messages delivered as HistoryMessage first; returns the Joined event,
        or None when the server refused (its Error event was delivered)."""
        return await self._join(room, name, create=False)

    async def say(self, text: str) -> bool:
        """Send a line to the room, which echoes it back; True when it waits for a reconnect (show it as pending)."""
        client_id = str(next(self._client_ids))
        return await self._send(
            chat_pb2.ChatRequest(say=chat_pb2.ChatRequest.SendMessage(text=text, client_id=client_id)), client_id
        )

    async def whisper(self, recipient: str, text: str) -> bool:
        """Send a line to one member, echoed back as a whisper event; True when it waits for a reconnect."""
        client_id = str(next(self._client_ids))
        request = chat_pb2.ChatRequest(
            whisper=chat_pb2.ChatRequest.SendWhisper(recipient=recipient, text=text, client_id=client_id)
        )
        return await self._send(request, client_id)

    async def leave(self) -> str:
        """Leave the room (or stop reconnecting to it) and return its name, once its last events are delivered."""
        stay = self._require_room()
        stream = stay.stream
        if stream is None:
            await self._stop_reconnecting(stay)
        else:
            stream.leaving = True
            await self._write(stream, chat_pb2.ChatRequest(leave=chat_pb2.ChatRequest.LeaveRoom()))
            await self._finish(stream)
        self._drop(stay)
        return stay.room

    def who(self) -> tuple[str, list[str]]:
        """The room and its members, sorted, as last reported by the server."""
        stay = self._require_room()
        return stay.room, sorted(stay.members)

    async def close(self) -> None:
        """Leave the room if in one, stop reconnecting, end every stream and close the channel."""
        if self._current is not None:
            await self.leave()
        for stream in self._streams:
            stream.leaving = True
            stream.call.cancel()
        await asyncio.gather(*(stream.reader for stream in self._streams))
        await asyncio.gather(*self._retiring)
        await self._channel.close()

    async def _join(self, room: str, name: str | None, *, create: bool) -> chat_pb2.Joined | None:
        if self._current is not None:
            state = " (reconnecting to it)" if self.reconnecting else ""
            raise SessionError(f"you are already in room {self._current.room}{state}; /leave first")
        stream = self._open(self._live_stub(), room)
        request = chat_pb2.ChatRequest(
            join=chat_pb2.ChatRequest.JoinRoom(room=room, name=name or "", create=create, history=self.history)
        )
        # A failed write means the call failed; the reader sees the same failure and reports it via `answered`.
        await self._write(stream, request)
        joined = await stream.answered
        if joined is None:
            # A refused join leaves the stream open for another try; this client opens a fresh one instead.
            await self._finish(stream)
            return None
        await stream.caught_up
        return joined

    async def _send(self, request: chat_pb2.ChatRequest, client_id: str) -> bool:
        stay = self._require_room()
        stay.unacked[client_id] = request
        stream = stay.stream
        if stream is None:
            return True
        if await self._write(stream, request, client_id):
            return False
        if self._current is stay:
            # The stream broke under the write: the line goes out again on the resumed stream, or is counted
            # among the lines dropped if the stay cannot come back.
            return True
        del stay.unacked[client_id]
        raise SessionError(f"not sent: your stream to room {stay.room} has ended")

    async def _write(self, stream: _Stream, request: chat_pb2.ChatRequest, client_id: str = "") -> bool:
        """Write one request; False if the call has ended (its reader sees the same failure)."""
        async with stream.lock:
            # Before the write: its answer may be read before this task runs again.
            if client_id:
                stream.in_flight.append(client_id)
            try:
                await stream.call.write(request)
            except _ENDED_BY_SENDING:
                if client_id:
                    stream.in_flight.remove(client_id)
                return False
        return True

    def _live_stub(self) -> chat_pb2_grpc.ChatServiceAsyncStub:
        """The stub, moved to a fresh channel unless the current one is connected."""
        # A channel that lost its connection may sit in gRPC's own reconnect backoff (up to minutes), even while it
        # reports IDLE, and a call on it fails at once though the server is back; a fresh channel tries now.
        if self._channel.get_state() != grpc.ChannelConnectivity.READY:
            self._use(self._new_channel())
        return self._stub

    def _use(self, channel: grpc.aio.Channel) -> None:
        """Make `channel` the session's; the old one closes once the calls still on it are done."""
        old, self._channel = self._channel, channel
        self._stub = chat_pb2_grpc.ChatServiceStub(channel)
        retiring = asyncio.create_task(old.close(grace=CLOSE_TIMEOUT))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    def _require_room(self) -> _Stay:
        if self._current is None:
            raise SessionError(NOT_IN_ROOM)
        return self._current

    def _drop(self, stay: _Stay) -> None:
        if self._current is stay:
            self._current = None

    def _open(self, stub: chat_pb2_grpc.ChatServiceAsyncStub, room: str, stay: _Stay | None = None) -> _Stream:
        """Start a Chat call and the task that reads it."""
        loop = asyncio.get_running_loop()
        stream = _Stream(stub.Chat(), room, loop.create_future(), loop.create_future(), stay, resuming=stay is not None)
        stream.reader = asyncio.create_task(self._read(stream))
        self._streams.add(stream)
        stream.reader.add_done_callback(lambda _: self._streams.discard(stream))
        return stream

    async def _finish(self, stream: _Stream) -> None:
        """Half-close the stream and wait for the server to end it, cancelling it if that takes too long."""
        await _half_close(stream)
        done, _ = await asyncio.wait({stream.reader}, timeout=CLOSE_TIMEOUT)
        if not done:
            stream.leaving = True
            stream.call.cancel()
        await stream.reader

    async def _read(self, stream: _Stream) -> None:
        """Deliver the stream's events in order until it ends, then settle the session's state."""
        try:
            while True:
                response = await stream.call.read()
                # read() returns grpc.aio.EOF, not a ChatResponse, once the server ends the stream.
                if not isinstance(response, chat_pb2.ChatResponse):
                    break
                for event in response.events:
                    self._apply(stream, event)
                if any(event.HasField("room_closed") for event in response.events):
                    # The server waits a moment for this half-close before ending the call itself.
                    await _half_close(stream)
        except grpc.aio.AioRpcError as exc:
            self._ended(stream, exc)
        except asyncio.CancelledError:
            # A call this client cancelled ends read() with CancelledError rather than an AioRpcError.
            task = asyncio.current_task()
            if not stream.call.cancelled() or (task is not None and task.cancelling()):
                raise
            self._ended(stream, None)
        else:
            self._ended(stream, None)

    def _apply(self, stream: _Stream, event: chat_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "joined":
            stay = self._joined(stream, event.joined)
        elif stream.stay is None or not stream.answered.done():
            self._before_joined(stream, event)
            return
        else:
            stay = stream.stay
        incoming: Incoming | None = event
        if kind == "message":
            incoming = self._message(stream, stay, event)
        elif kind == "whisper":
            self._acknowledge(stream, stay, event.whisper.sender, event.whisper.client_id)
        elif kind == "member_joined":
            stay.members.add(event.member_joined.name)
        elif kind == "member_left":
            stay.members.discard(event.member_left.name)
        elif kind == "members":
            stay.members = set(event.members.names)
        elif kind == "error" and stream.in_flight:
            stay.unacked.pop(stream.in_flight.popleft(), None)
        elif kind == "room_closed":
            incoming = self._room_closed(stream, stay, event)
        if incoming is not None:
            self._on_event(incoming, stay.name)
        # An attempt that timed out has stopped waiting for its answer.
        if kind == "joined" and not stream.answered.done():
            stream.answered.set_result(event.joined)
        if not stream.replaying and not stream.caught_up.done():
            stream.caught_up.set_result(True)

    def _before_joined(self, stream: _Stream, event: chat_pb2.Event) -> None:
        """An event before the join is answered, which can only be the error that refuses it."""
        if stream.resuming:
            # Told to the user as a ConnectionLost, in words about coming back rather than about joining.
            stream.refusal = event.error if event.HasField("error") else None
        else:
            self._on_event(event, "")
        if event.HasField("error") and not stream.answered.done():
            stream.answered.set_result(None)

    def _joined(self, stream: _Stream, joined: chat_pb2.Joined) -> _Stay:
        stay = stream.stay
        if stay is None:
            stay = stream.stay = _Stay(
                joined.room, joined.name, joined.resume_token, joined.last_seq, set(joined.members), stream
            )
            self._current = stay
        else:
            stay.token = joined.resume_token
            stay.members = set(joined.members)
            # Messages the server no longer keeps are gone for good; the next resume must not count them again.
            stay.last_seq = max(stay.last_seq, joined.last_seq - joined.replayed)
        stream.replaying = joined.replayed
        return stay

    def _message(self, stream: _Stream, stay: _Stay, event: chat_pb2.Event) -> Incoming | None:
        """What to deliver for a message: history is marked as such, and a repeat of one seen is dropped."""
        message = event.message
        self._acknowledge(stream, stay, message.sender, message.client_id)
        if stream.replaying:
            stream.replaying -= 1
            if not stream.resuming:
                return HistoryMessage(message)
        if message.seq <= stay.last_seq:
            # Expected only as the echo of a line re-sent after a resume; counted so that tests can tell.
            self.repeats_dropped += 1
            return None
        stay.last_seq = message.seq
        return event

    def _acknowledge(self, stream: _Stream, stay: _Stay, sender: str, client_id: str) -> None:
        if client_id and sender == stay.name and stay.unacked.pop(client_id, None) is not None:
            with contextlib.suppress(ValueError):
                stream.in_flight.remove(client_id)

    def _room_closed(self, stream: _Stream, stay: _Stay, event: chat_pb2.Event) -> Incoming | None:
        if event.room_closed.reason == chat_pb2.CLOSE_REASON_SERVER_SHUTDOWN and not stream.leaving:
            if stream is stay.stream:
                # Delivered first, so that the shutdown is shown before the reconnect attempts it leads to.
                self._on_event(event, stay.name)
                self._reconnect_later(stay)
            # A resume still catching up just fails with its stream, and the next attempt goes on trying.
            return None
        # Back to waiting before the event is shown, so the next command already sees the new state.
        self._drop(stay)
        return event

    def _ended(self, stream: _Stream, failure: grpc.aio.AioRpcError | None) -> None:
        if not stream.caught_up.done():
            stream.caught_up.set_result(False)
        if not stream.answered.done():
            error = (
                self._rpc_error(failure)
                if failure
                else SessionError(f"the server ended the stream before answering the join to {stream.room}")
            )
            stream.answered.set_exception(error)
            return
        stay = stream.stay
        if stay is None or stream.leaving or stay.stream is not stream or self._current is not stay:
            return
        if failure is not None and failure.code() == grpc.StatusCode.UNAVAILABLE:
            self._reconnect_later(stay)
            return
        self._drop(stay)
        self._on_event(ConnectionLost(stay.room, self._lost(stay, failure)), stay.name)

    def _reconnect_later(self, stay: _Stay) -> None:
        stay.stream = None
        stay.reconnect = asyncio.create_task(self._reconnect(stay))

    async def _reconnect(self, stay: _Stay) -> None:
        """Resume `stay` on fresh channels, waiting longer each time, until it is back, refused, or cancelled."""
        for attempt in itertools.count(1):
            if self._current is not stay:
                # The room was killed while an attempt was catching up; its RoomClosed has been delivered.
                return
            delay = _backoff(attempt)
            self._on_event(Reconnecting(stay.room, attempt, delay), stay.name)
            await asyncio.sleep(delay)
            try:
                if await self._resume(stay):
                    return
            except _RefusedError as refused:
                self._drop(stay)
                self._on_event(ConnectionLost(stay.room, self._refused(stay, refused.error)), stay.name)
                return

    async def _resume(self, stay: _Stay) -> bool:
        """One attempt: True once the stay runs on a new channel; False to try again; _RefusedError if it cannot."""
        # A fresh channel each time: a failed one waits out gRPC's own reconnect backoff, which reaches minutes.
        channel = self._new_channel()
        stream: _Stream | None = None
        adopted = False
        try:
            async with asyncio.timeout(RESUME_TIMEOUT):
                if not await _ready(channel):
                    return False
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                stream = self._open(stub, stay.room, stay)
                resume = chat_pb2.ChatRequest.Resume(token=stay.token, last_seq=stay.last_seq)
                join = chat_pb2.ChatRequest.JoinRoom(room=stay.room, name=stay.name, resume=resume)
                await self._write(stream, chat_pb2.ChatRequest(join=join))
                joined = await stream.answered
            if joined is None:
                refusal = stream.refusal
                if refusal is not None and refusal.code == chat_pb2.ERROR_CODE_RATE_LIMITED:
                    # Too many resumes from this address at once (a crowd behind one NAT): the backoff retries.
                    return False
                raise _RefusedError(refusal)
            # The server skips a re-sent line it already broadcast, so everything unanswered goes out again.
            if not await stream.caught_up or not await self._resend(stream, stay):
                return False
            if stream.reader.done() or self._current is not stay:
                return False
            # No await from the check above to here, so nothing can be said on the stream before it is adopted.
            stay.stream = stream
            stay.reconnect = None
            self._use(channel)
            adopted = True
            return True
        except (TimeoutError, SessionError):
            return False
        finally:
            if not adopted:
                if stream is not None:
                    stream.leaving = True
                await channel.close()
                if stream is not None:
                    await stream.reader

    async def _resend(self, stream: _Stream, stay: _Stay) -> bool:
        """Write every unanswered request of `stay` in order, those queued meanwhile too; False if the call ended."""
        written: set[str] = set()
        while todo := [(cid, request) for cid, request in stay.unacked.items() if cid not in written]:
            for client_id, request in todo:
                written.add(client_id)
                if not await self._write(stream, request, client_id):
                    return False
        return True

    async def _stop_reconnecting(self, stay: _Stay) -> None:
        task = stay.reconnect
        if task is None:
            return
        task.cancel()
        # wait() rather than await: the task's CancelledError is expected, and must not look like ours.
        await asyncio.wait({task})
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error

    def _lost(self, stay: _Stay, failure: grpc.aio.AioRpcError | None) -> str:
        dropped = _dropped(stay)
        if failure is None:
            return f"the server ended your stay in room {stay.room}{dropped}"
        if failure.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED):
            reason = failure.details() or f"the server dropped you from room {stay.room} ({failure.code().name})"
            return f"{reason}{dropped}"
        return (
            f"the chat server at {self.address} went away ({failure.code().name}); "
            f"you are no longer in room {stay.room}{dropped}"
        )

    def _refused(self, stay: _Stay, error: chat_pb2.Error | None) -> str:
        if error is not None and error.code == chat_pb2.ERROR_CODE_ROOM_NOT_FOUND:
            why = f"room {stay.room} no longer exists (it was closed, or the server restarted)"
        elif error is not None and error.code == chat_pb2.ERROR_CODE_NAME_TAKEN:
            why = f"someone else took the name {stay.name} in room {stay.room} while you were away"
        else:
            detail = error.message if error is not None else "the server refused"
            why = f"could not get back into room {stay.room}: {detail}"
        return f"{why}; you are back in the waiting state{_dropped(stay)}"

    def _rpc_error(self, failure: grpc.aio.AioRpcError) -> SessionError:
        if failure.code() == grpc.StatusCode.UNAVAILABLE:
            return UnreachableError(self.address)
        return SessionError(failure.details() or f"the server refused the request ({failure.code().name})")


async def _half_close(stream: _Stream) -> None:
    """Tell the server this client writes no more on `stream`; nothing to do if the call has ended."""
    async with stream.lock:
        # When the server ends the call while the half-close is on its way, grpc.aio can raise its internal
        # ExecuteBatchError instead of an AioRpcError (seen on a busy machine); either way the call is over.
        with contextlib.suppress(*_ENDED_BY_SENDING, cygrpc.ExecuteBatchError):
            await stream.call.done_writing()


def _backoff(attempt: int) -> float:
    """The delay before reconnect attempt number `attempt` (from 1), with jitter."""
    # The exponent is bounded only so that a very long outage cannot overflow a float.
    base = RECONNECT_FIRST_DELAY * 2.0 ** min(attempt - 1, 32)
    jitter = random.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)
    return min(base * jitter, RECONNECT_MAX_DELAY)


async def _ready(channel: grpc.aio.Channel) -> bool:
    """Wait for `channel` to connect; False as soon as its first try fails."""
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            return False
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
    return True


def _dropped(stay: _Stay) -> str:
    count = len(stay.unacked)
    if not count:
        return ""
    return "; 1 unsent line was dropped" if count == 1 else f"; {count} unsent lines were dropped"
