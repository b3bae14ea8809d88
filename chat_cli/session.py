"""The shell around the client's protocol core: channels, calls, the tasks that read them, reconnect timing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_cli.protocol import Feed, Incoming, Outcome, Protocol, SessionError, Stay, StreamEnd

CONNECT_TIMEOUT = 3.0
# How long a bare TCP connection may take when telling why gRPC could not connect.
PROBE_TIMEOUT = 1.0
RPC_TIMEOUT = 10.0
# How long a stream may take to end after a leave or a half-close before the client cancels it.
CLOSE_TIMEOUT = 5.0
# How many of a room's recent messages a join asks for by default.
DEFAULT_HISTORY = 20

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

_ENDED_BY_SENDING = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


def target(host: str, port: int) -> str:
    """The `host:port` address gRPC dials, with an IPv6 host in brackets whether or not it was given with them."""
    host = host.removeprefix("[").removesuffix("]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


EventHandler = Callable[[Incoming, str], None]
"""Called for every incoming event, in order, with the name of the member it is addressed to."""

_Call = grpc.aio.StreamStreamCall[chat_pb2.ChatRequest, chat_pb2.ChatResponse]


@dataclass(eq=False)
class _Stream:
    """One Chat call and the feed the protocol core keeps for it."""

    call: _Call
    feed: Feed
    answered: asyncio.Future[chat_pb2.Joined | None]
    # True once the messages replayed after Joined are delivered; False if the stream ends first.
    caught_up: asyncio.Future[bool]
    # grpc.aio allows one write at a time on a call.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader: asyncio.Task[None] = field(init=False)


class _RefusedError(Exception):
    """The server answered a resume with an error: the stay cannot come back."""

    def __init__(self, error: chat_pb2.Error | None) -> None:
        super().__init__()
        self.error = error


class Session:
    """One client's channel and at most one room membership; await one command at a time.

    Use it as an async context manager: its tasks (a reader per stream, the reconnect loop, channels closing) run in
    one task group, so that none outlives the session and none fails unseen. Every event the server sends reaches
    `on_event` in order, and always before the command that caused it (a join, a leave) returns. When the member's
    stream breaks, the session resumes the stay by itself; no message is shown twice, and every line said is sent
    exactly once.
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
        self.core = Protocol(address)
        self._on_event = on_event
        self._credentials = credentials
        self._channel = self._new_channel()
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._tasks = asyncio.TaskGroup()
        self._streams: dict[Feed, _Stream] = {}
        self._reconnect: asyncio.Task[None] | None = None
        # Set while no line of the current stay waits for the server's answer.
        self._quiet = asyncio.Event()
        self._quiet.set()

    async def __aenter__(self) -> Session:
        await self._tasks.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            await self.close()
        finally:
            await self._tasks.__aexit__(exc_type, exc, traceback)

    @property
    def room(self) -> str | None:
        """The room the member is in (or reconnecting to), or None while waiting."""
        return self.core.current.room if self.core.current else None

    @property
    def name(self) -> str | None:
        """The member's name in its room, or None while waiting."""
        return self.core.current.name if self.core.current else None

    @property
    def members(self) -> list[str]:
        """The members of the room, sorted, as last reported by the server; none while waiting."""
        return sorted(self.core.current.members) if self.core.current else []

    @property
    def reconnecting(self) -> bool:
        """Whether the member's stream broke and the session is resuming its stay."""
        return self.core.reconnecting

    @property
    def repeats_dropped(self) -> int:
        """How many repeats of messages already delivered were dropped."""
        return self.core.repeats_dropped

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

    async def say(self, text: str, *, action: bool = False) -> bool:
        """Send a line (an action, for /me) to the room, which echoes it back; True when it waits for a reconnect
        (show it as pending)."""
        return await self._send(*self.core.say(text, action=action))

    async def whisper(self, recipient: str, text: str) -> bool:
        """Send a line to one member, echoed back as a whisper event; True when it waits for a reconnect."""
        return await self._send(*self.core.whisper(recipient, text))

    async def answered(self) -> None:
        """Return once the server has answered every line sent (with its echo or an error), or the stay is gone."""
        await self._quiet.wait()

    async def leave(self) -> str:
        """Leave the room (or stop reconnecting to it) and return its name, once its last events are delivered."""
        stay = self.core.require_room()
        stream = self._carrier(stay)
        if stream is None:
            await self._stop_reconnecting()
        else:
            stream.feed.leaving = True
            await self._write(stream, chat_pb2.ChatRequest(leave=chat_pb2.ChatRequest.LeaveRoom()))
            await self._finish(stream)
        if self.core.current is stay:
            self.core.leave()
        self._settle()
        return stay.room

    def who(self) -> tuple[str, list[str]]:
        """The room and its members, sorted, as last reported by the server."""
        return self.core.who()

    async def close(self) -> None:
        """Leave the room if in one, stop reconnecting, end every stream and close the channel."""
        if self.core.current is not None:
            await self.leave()
        streams = list(self._streams.values())
        for stream in streams:
            stream.feed.leaving = True
            stream.call.cancel()
        await asyncio.gather(*(stream.reader for stream in streams))
        await self._channel.close()

    async def _join(self, room: str, name: str | None, *, create: bool) -> chat_pb2.Joined | None:
        feed, request = self.core.join(room, name, create=create, history=self.history)
        stream = self._open(self._live_stub(), feed)
        # A failed write means the call failed; the reader sees the same failure and reports it via `answered`.
        await self._write(stream, request)
        joined = await stream.answered
        if joined is None:
            # A refused join leaves the stream open for another try; this client opens a fresh one instead.
            await self._finish(stream)
            return None
        await stream.caught_up
        return joined

    async def _send(self, stay: Stay, client_id: str, request: chat_pb2.ChatRequest) -> bool:
        self._quiet.clear()
        stream = self._carrier(stay)
        if stream is None:
            return True
        if await self._write(stream, request):
            return False
        if self.core.current is stay:
            # The stream broke under the write: the line goes out again on the resumed stream, or is counted
            # among the lines dropped if the stay cannot come back.
            return True
        error = self.core.unsent(stay, client_id)
        self._settle()
        raise error

    def _carrier(self, stay: Stay) -> _Stream | None:
        """The stream carrying `stay`, None while reconnecting."""
        return self._streams.get(stay.feed) if stay.feed is not None else None

    def _settle(self) -> None:
        """Mark the session quiet once no line waits for an answer."""
        stay = self.core.current
        if stay is None or not stay.unanswered:
            self._quiet.set()

    async def _write(self, stream: _Stream, request: chat_pb2.ChatRequest) -> bool:
        """Write one request; False if the call has ended (its reader sees the same failure)."""
        async with stream.lock:
            try:
                await stream.call.write(request)
            except _ENDED_BY_SENDING:
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
        self._tasks.create_task(old.close(grace=CLOSE_TIMEOUT))

    def _open(self, stub: chat_pb2_grpc.ChatServiceAsyncStub, feed: Feed) -> _Stream:
        """Start a Chat call for `feed` and the task that reads it."""
        loop = asyncio.get_running_loop()
        stream = _Stream(stub.Chat(), feed, loop.create_future(), loop.create_future())
        stream.reader = self._tasks.create_task(self._read(stream))
        self._streams[feed] = stream
        stream.reader.add_done_callback(lambda _: self._streams.pop(feed, None))
        return stream

    async def _finish(self, stream: _Stream) -> None:
        """Half-close the stream and wait for the server to end it, cancelling it if that takes too long."""
        await _half_close(stream)
        done, _ = await asyncio.wait({stream.reader}, timeout=CLOSE_TIMEOUT)
        if not done:
            stream.feed.leaving = True
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
                half_close = False
                for event in response.events:
                    half_close = self._apply(stream, self.core.receive(stream.feed, event)) or half_close
                if half_close:
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

    def _apply(self, stream: _Stream, outcome: Outcome) -> bool:
        """Do what the core says of one event; True when the stream should be half-closed."""
        for incoming in outcome.show:
            self._on_event(incoming, outcome.me)
        if outcome.resume:
            self._reconnect_later(stream.feed)
        if outcome.answered_ids or outcome.show:
            self._settle()
        # An attempt that timed out has stopped waiting for its answer.
        if outcome.answered and not stream.answered.done():
            stream.answered.set_result(outcome.joined)
        if outcome.caught_up and not stream.caught_up.done():
            stream.caught_up.set_result(True)
        return outcome.half_close

    def _ended(self, stream: _Stream, failure: grpc.aio.AioRpcError | None) -> None:
        if not stream.caught_up.done():
            stream.caught_up.set_result(False)
        if not stream.answered.done():
            error = (
                self._rpc_error(failure)
                if failure
                else SessionError(f"the server ended the stream before answering the join to {stream.feed.room}")
            )
            stream.answered.set_exception(error)
            return
        end = StreamEnd(failure.code().name, failure.details() or "") if failure is not None else StreamEnd()
        self._apply(stream, self.core.ended(stream.feed, end))
        self._settle()

    def _reconnect_later(self, feed: Feed) -> None:
        stay = feed.stay
        assert stay is not None, "only an answered feed loses its stay"
        self._reconnect = self._tasks.create_task(self._reconnect_loop(stay))

    async def _reconnect_loop(self, stay: Stay) -> None:
        """Resume `stay` on fresh channels, waiting longer each time, until it is back, refused, or cancelled."""
        for number in itertools.count(1):
            if self.core.current is not stay:
                # The room was killed while an attempt was catching up; its RoomClosed has been delivered.
                return
            attempt = self.core.attempt(stay, number)
            self._on_event(attempt, stay.name)
            await asyncio.sleep(attempt.delay)
            try:
                if await self._resume(stay):
                    return
            except _RefusedError as refused:
                self._on_event(self.core.refused(stay, refused.error), stay.name)
                self._settle()
                return

    async def _resume(self, stay: Stay) -> bool:
        """One attempt: True once the stay runs on a new channel; False to try again; _RefusedError if it cannot."""
        # A fresh channel each time: a failed one waits out gRPC's own reconnect backoff, which reaches minutes.
        channel = self._new_channel()
        stream: _Stream | None = None
        adopted = False
        try:
            async with asyncio.timeout(RESUME_TIMEOUT):
                if not await _ready(channel):
                    return False
                feed, request = self.core.resume(stay)
                stream = self._open(chat_pb2_grpc.ChatServiceStub(channel), feed)
                await self._write(stream, request)
                joined = await stream.answered
            if joined is None:
                if self.core.retry_refusal(stream.feed):
                    # Too many resumes from this address at once (a crowd behind one NAT): the backoff retries.
                    return False
                raise _RefusedError(stream.feed.refusal)
            # The server skips a re-sent line it already broadcast, so everything unanswered goes out again.
            if not await stream.caught_up or not await self._resend(stream, stay):
                return False
            # No await from the check to the adoption, so nothing can be said on the stream before it carries the stay.
            if stream.reader.done() or not self.core.adopt(stream.feed):
                return False
            self._reconnect = None
            self._use(channel)
            adopted = True
            return True
        except (TimeoutError, SessionError):
            return False
        finally:
            if not adopted:
                if stream is not None:
                    stream.feed.leaving = True
                await channel.close()
                if stream is not None:
                    await stream.reader

    async def _resend(self, stream: _Stream, stay: Stay) -> bool:
        """Write every unanswered request of `stay` in order, those queued meanwhile too; False if the call ended."""
        written: set[str] = set()
        while todo := [(cid, request) for cid, request in self.core.unanswered(stay) if cid not in written]:
            for client_id, request in todo:
                written.add(client_id)
                if not await self._write(stream, request):
                    return False
        return True

    async def _stop_reconnecting(self) -> None:
        task, self._reconnect = self._reconnect, None
        if task is None:
            return
        task.cancel()
        # wait() rather than await: the task's CancelledError is expected, and must not look like ours.
        await asyncio.wait({task})
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error

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


async def _ready(channel: grpc.aio.Channel) -> bool:
    """Wait for `channel` to connect; False as soon as its first try fails."""
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            return False
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
    return True
