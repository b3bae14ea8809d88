"""The NATS JetStream store: rooms, names and logs shared by every server process connected to the same NATS.

Layout: each room's log is the subject `chat.log.<uid>` of one stream, its entries carrying the room's seq in a header;
rooms and names are keys of two KV buckets; each process keeps a heartbeat key (with its live members per room) in a
third bucket whose entries age out, so that the names of a process that died free themselves within seconds.
Signals and whispers travel over core NATS subjects, which keep nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, ParamSpec, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from chat_service import tokens
from chat_service.errors import ChatError, ErrorKind
from chat_service.events import (
    CloseReason,
    LeaveReason,
    MemberJoined,
    MemberLeft,
    Message,
    RoomClosed,
    RoomInfo,
    Whisper,
)
from chat_service.history import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES
from chat_service.store import (
    DEDUP_KEYS_KEPT,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_ROOMS,
    DEFAULT_RESUME_GRACE_SECONDS,
    Appended,
    Backlog,
    Entry,
    Follower,
    RoomRecord,
    Seat,
    Signal,
    Takeover,
    TokenIssuer,
    numbered_name,
)
from chat_service.throttled_log import ThrottledLog
from chat_service.validation import name_key

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

LOG_STREAM = "CHAT_LOG"
ROOMS_BUCKET = "CHAT_ROOMS"
NAMES_BUCKET = "CHAT_NAMES"
PROCESSES_BUCKET = "CHAT_PROCESSES"
SEQ_HEADER = "Chat-Seq"
# How long a process's heartbeat outlives it: its names are free this long after it died. It beats three times in
# that span, so one late beat on a busy machine does not free the names of a process that is alive.
DEFAULT_LIVENESS_SECONDS = 6.0
DEFAULT_TIMEOUT_SECONDS = 5.0
# JetStream remembers message ids for at least this long, even with a shorter resume grace.
MIN_DUPLICATE_WINDOW_SECONDS = 120.0
# Compare-and-set rounds for one append or claim before giving up: each lost round means another writer got in first.
CAS_ATTEMPTS = 64
# How long a request is made again while a NATS cluster moves (another server taking over the connection, a stream
# electing a new leader), and the pause between attempts. A follower waits 4 to 9 s for a lost leader before it
# campaigns (nats-server's Raft election timeout), and an attempt under way when the leader went waits out its own
# timeout: at 10 s, one node killed mid-burst on a busy machine refused a line now and then (tests/test_scale_out.py).
FAILOVER_SECONDS = 20.0
# How long an operation asked for while the connection is down waits for it to come back before it is refused, and
# how long the connection may be down before members are told the store is away. At 2 s, the client moving to another
# node of a cluster took longer now and then on a busy machine (a CI run of the node-kill test refused a line).
RECONNECT_WAIT_SECONDS = 5.0
FAILOVER_PAUSE_SECONDS = 0.25
# NATS's heartbeat on a followed room's consumer: two missed, the client makes the consumer anew from the last entry
# it delivered (after NATS restarted, say). Shorter resumes sooner, but costs every followed room a message per beat.
FOLLOW_HEARTBEAT_SECONDS = 2.0
# A group commit's bounds: messages and encoded bytes in one log entry, well under NATS's 1 MiB payload limit.
MAX_BATCH_MESSAGES = 256
# Turns of the event loop a room's writer lets pass before it takes the waiting lines as its next entry: a sender's
# pipelined lines are read a turn or a few apart, and each entry costs a publish, an acknowledgement and a consumer
# delivery in both processes. One sender into a 100-member room (3,000 lines, 3 interleaved pairs at load 2.3-3):
# 2.8 -> about 6 lines per entry, 10.4-11.3 -> 7.8-9.6 µs per delivery (nats-server 0.7-0.9 -> 0.4).
ENTRY_TURNS = 8
MAX_BATCH_BYTES = 256 * 1024
# How long a group commit waits for the room's consumer to show the entries before the tail it found, before it
# reads them itself: the consumer is there within milliseconds unless NATS moved and it is being made anew.
CATCH_UP_SECONDS = 1.0
# Messages a followed room keeps in this process for reads. A resume, and a join catching up with what this process
# has sent live, want the last few: kept here they cost no scan of the room's log, which under load took longer than
# the room took to say more, so that busy rooms could not be joined. Older reads scan the log as before.
READ_CACHE_MESSAGES = 128
# Rooms this process appends to without following them whose log's keys it keeps (tests and tools do that; the
# server follows every room it has members in).
UNFOLLOWED_WRITERS = 16
# Tails fetched at once by list_rooms.
TAIL_FETCHES = 32
# JetStream's error codes for a failed Nats-Expected-Last-Subject-Sequence, and for a stream that exists with
# another configuration.
_WRONG_LAST_SEQUENCE = (10071, 10164)
_STREAM_NAME_IN_USE = 10058
# Failures that pass once the cluster has moved.
# JetStream's answer when a replicated stream cannot be placed yet: a cluster's peers are still meeting (seen in CI).
_NO_SUITABLE_PEERS = 10005
_PASSING = (
    TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
UNREACHABLE = "the message store is unreachable; try again shortly"


def _unreachable() -> ChatError:
    return ChatError(ErrorKind.STORE_UNAVAILABLE, UNREACHABLE)


def _guarded(operation: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Refuse an operation while NATS is away, and turn NATS's own failures into STORE_UNAVAILABLE."""

    @functools.wraps(operation)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, NatsStore)
        if not await store._reachable():
            raise _unreachable()
        try:
            return await operation(*args, **kwargs)
        except (TimeoutError, nats.errors.Error) as error:
            raise store._failed(error) from error

    return run


def _key(text: str) -> str:
    """`text` as a KV key or subject token: URL-safe base64 uses only characters both allow."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def _log_subject(uid: str) -> str:
    return f"chat.log.{uid}"


@dataclass(frozen=True, slots=True)
class _Tail:
    """The last entry of a room's log: its room seq, its stream seq (0: the log is empty), and whether it closed."""

    seq: int
    stream_seq: int
    closed: bool = False


@dataclass(frozen=True, slots=True)
class _SeatRecord:
    """A names-bucket entry: `holder` is the process holding it live, or empty while it is held until `until`."""

    name: str
    token: str
    claim: str
    holder: str
    until: float
    revision: int

    def value(self) -> bytes:
        return json.dumps([self.name, self.token, self.claim, self.holder, self.until]).encode()

    @classmethod
    def parse(cls, data: bytes, revision: int) -> _SeatRecord:
        name, token, claim, holder, until = json.loads(data)
        return cls(name, token, claim, holder, until, revision)


class _Pending:
    """An append waiting for its room's next group commit, its message already encoded as a log row."""

    __slots__ = ("done", "key", "message", "row")

    def __init__(self, message: Message, key: str) -> None:
        self.message = message
        self.key = key
        self.row = _encode_message(message, key)
        self.done: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()

    def settle(self, result: Appended | BaseException) -> None:
        """Answer the append, unless its caller has gone."""
        if self.done.done():
            return
        if isinstance(result, Appended):
            self.done.set_result(result)
        else:
            self.done.set_exception(result)


class _Followed:
    """A room this process follows: its follower, subscriptions, the last entry delivered and the log's known tail."""

    __slots__ = (
        "arrived",
        "cache",
        "caught_up",
        "closed",
        "delivered",
        "follower",
        "known",
        "pending",
        "recent",
        "subscriptions",
        "tail",
        "tail_read",
        "uid",
        "writer",
    )

    def __init__(self, uid: str, follower: Follower, tail: _Tail | None, cached: int) -> None:
        self.uid = uid
        self.follower = follower
        # None for a room written without following it: its writer reads the tail before its first commit.
        self.tail = tail if tail is not None else _Tail(0, 0)
        self.tail_read = tail is not None
        # The room's latest messages heard, consecutive, and an event set whenever an entry is heard.
        self.cache: deque[Message] = deque(maxlen=cached)
        self.arrived = asyncio.Event()
        self.delivered = self.tail.seq
        self.closed = self.tail.closed
        self.subscriptions: list[Subscription | JetStreamContext.PushSubscription] = []
        # The dedup keys of the room's recent messages, and the stream seq up to which every entry's keys are in it:
        # an entry committed right after that one cannot repeat a key some process logged before.
        self.recent: dict[str, Message] = {}
        self.known = 0
        self.caught_up = asyncio.Event()
        # Group commit: while one entry is in flight the appends that arrive wait here, then go as the next entry.
        self.pending: list[_Pending] = []
        self.writer: asyncio.Task[None] | None = None


class _Unheard:
    """The follower of a room appended to without following it: nothing reaches it."""

    def logged(self, entry: Entry) -> None:
        pass

    def signalled(self, signal: Signal) -> None:
        pass

    def whispered(self, recipient_key: str, whisper: Whisper) -> None:
        pass


class _Held:
    """A seat this process claimed: live, or held for a resume until its expiry runs."""

    __slots__ = ("claim", "expiry", "live")

    def __init__(self, claim: str) -> None:
        self.claim = claim
        self.live = True
        self.expiry: asyncio.TimerHandle | None = None


def _encode_message(message: Message, key: str) -> bytes:
    return json.dumps(
        [message.sender, message.text, message.sent_at_ns, message.client_id, message.action, key]
    ).encode()


def _encode_entry(rows: list[bytes]) -> bytes:
    """One message's row is an entry by itself; several go in one entry, their seqs consecutive."""
    return rows[0] if len(rows) == 1 else b'{"messages":[' + b",".join(rows) + b"]}"


def _encode_closed(entry: RoomClosed) -> bytes:
    return json.dumps({"room": entry.room, "reason": entry.reason.name}).encode()


def _decode_entries(data: bytes, seq: int) -> list[tuple[Entry, str]]:
    """A log entry's messages with their dedup keys, or its RoomClosed; `seq` (its header) is its last message's."""
    value = json.loads(data)
    if isinstance(value, dict) and "messages" not in value:
        return [(RoomClosed(value["room"], CloseReason[value["reason"]]), "")]
    rows = value["messages"] if isinstance(value, dict) else [value]
    first = seq - len(rows) + 1
    return [
        (Message(first + n, sender, text, sent_at_ns, client_id, action), key[0] if key else "")
        for n, (sender, text, sent_at_ns, client_id, action, *key) in enumerate(rows)
    ]


def _cache(followed: _Followed, entries: Sequence[tuple[Entry, str]]) -> None:
    """Keep an entry's messages among the room's latest, which stay consecutive: after a gap they start again."""
    cache = followed.cache
    for entry, _ in entries:
        if isinstance(entry, Message) and cache.maxlen:
            if cache and entry.seq <= cache[-1].seq:
                continue
            if cache and entry.seq != cache[-1].seq + 1:
                cache.clear()
            cache.append(entry)
    followed.arrived.set()


async def _cached(followed: _Followed, first: int, last: int) -> list[Message] | None:
    """Messages `first` to `last` from the room's latest heard here, once heard (waiting a moment for them); None if
    they are not all kept here."""
    cache = followed.cache
    deadline = asyncio.get_running_loop().time() + CATCH_UP_SECONDS
    while not cache or cache[-1].seq < last:
        followed.arrived.clear()
        try:
            async with asyncio.timeout_at(deadline):
                await followed.arrived.wait()
        except TimeoutError:
            return None
    if cache[0].seq > max(first, 1):
        return None
    return [message for message in cache if first <= message.seq <= last]


def _header_seq(msg: Msg | api.RawStreamMsg) -> int:
    return int((msg.headers or {}).get(SEQ_HEADER, 0))


def _encode_signal(origin: str, signal: Signal) -> bytes:
    if isinstance(signal, Takeover):
        return json.dumps([origin, "takeover", signal.key, signal.claim]).encode()
    if isinstance(signal, MemberJoined):
        return json.dumps([origin, "joined", signal.name, signal.returned]).encode()
    return json.dumps([origin, "left", signal.name, signal.reason.name]).encode()


def _decode_signal(data: bytes) -> tuple[str, Signal]:
    origin, kind, first, second = json.loads(data)
    if kind == "takeover":
        return origin, Takeover(first, second)
    if kind == "joined":
        return origin, MemberJoined(first, bool(second))
    return origin, MemberLeft(first, LeaveReason[second])


class NatsStore:
    """Rooms, names and logs in NATS JetStream, shared by every server process connected to it."""

    def __init__(
        self,
        connection: Client,
        *,
        replicas: int = 1,
        history_limit: int = DEFAULT_HISTORY,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        resume_grace: float = DEFAULT_RESUME_GRACE_SECONDS,
        max_rooms: int = DEFAULT_MAX_ROOMS,
        max_members: int = DEFAULT_MAX_MEMBERS,
        liveness: float = DEFAULT_LIVENESS_SECONDS,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        empty_room_ttl: float | None = None,
        on_availability: Callable[[bool], None] | None = None,
    ) -> None:
        self._nc = connection
        self.empty_room_ttl = empty_room_ttl
        self._js = connection.jetstream(timeout=timeout)
        self.replicas = replicas
        self.history_limit = history_limit
        self.history_bytes = history_bytes
        self.resume_grace = resume_grace
        self.max_rooms = max_rooms
        self.max_members = max_members
        self.liveness = liveness
        self.timeout = timeout
        self.on_availability = on_availability
        self.throttled_log = ThrottledLog(log)
        # Names this process holds record it as their holder by this id, and its heartbeat key is the same.
        self.process = secrets.token_hex(8)
        self._rooms_kv: KeyValue | None = None
        self._names_kv: KeyValue | None = None
        self._processes_kv: KeyValue | None = None
        self._followed: dict[str, _Followed] = {}
        self._unfollowed: dict[str, _Followed] = {}
        self._held: dict[tuple[str, str], _Held] = {}
        # Live members per room uid, in this process: what the heartbeat tells the others.
        self._live: dict[str, int] = {}
        self._room_count = 0
        self._beat = asyncio.Event()
        self._connected = asyncio.Event()
        # Says the store is away once the connection has been down as long as an operation waits for it, so that a
        # NATS node lost from a cluster (the client moves to another node at once) is a pause nobody is told of.
        self._away: asyncio.TimerHandle | None = None
        self._declared_away = False
        self._connected.set()
        self._heart: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # The processes alive at the last beat, to notice one whose heartbeat aged out.
        self._alive_at_beat: set[str] = set()
        # NATS away longer than the liveness span ages out every heartbeat, the live processes' too. Until each has
        # had a span to beat again after a reconnection, the processes last seen alive count as alive still.
        self._seen: dict[str, dict[str, int]] = {}
        self._beats_trusted_from = 0.0

    @property
    def available(self) -> bool:
        """Whether NATS is reachable now; operations raise STORE_UNAVAILABLE while it is not."""
        return self._nc.is_connected and not self._closed

    @property
    def shared(self) -> bool:
        return True

    @property
    def room_count(self) -> int:
        return self._room_count

    @property
    def seated(self) -> int:
        return len(self._held)

    async def start(self) -> None:
        """Create the stream and buckets, or bind to them when another process made them first; start beating."""
        await self._ensure_stream(
            api.StreamConfig(
                name=LOG_STREAM,
                subjects=["chat.log.>"],
                storage=api.StorageType.FILE,
                num_replicas=self.replicas,
                # A room's last entry is its tail, which appends compare against: at least one is always kept.
                max_msgs_per_subject=max(self.history_limit, 1),
                max_bytes=self.history_bytes,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=max(self.resume_grace, MIN_DUPLICATE_WINDOW_SECONDS),
            )
        )
        self._rooms_kv = await self._ensure_bucket(api.KeyValueConfig(ROOMS_BUCKET, storage=api.StorageType.FILE))
        self._names_kv = await self._ensure_bucket(api.KeyValueConfig(NAMES_BUCKET, storage=api.StorageType.FILE))
        # On disk, as the names are: a bucket in memory is gone after NATS restarts, and until every process had
        # made it again and beaten, each name held live would look free to a claim.
        self._processes_kv = await self._ensure_bucket(
            api.KeyValueConfig(PROCESSES_BUCKET, storage=api.StorageType.FILE, ttl=self.liveness)
        )
        await self._heartbeat()
        self._heart = asyncio.get_running_loop().create_task(self._beating())
        if self.empty_room_ttl is not None:
            self._sweep = asyncio.get_running_loop().create_task(self._sweeping(self.empty_room_ttl))

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self._js.add_stream(config)
        except nats.js.errors.APIError as error:
            # Another process made it first, maybe with other limits: theirs stand, and this one says so.
            if error.err_code != _STREAM_NAME_IN_USE:
                raise
            log.info("Stream %s exists with other settings; using it as it is", config.name)

    async def _ensure_bucket(self, config: api.KeyValueConfig) -> KeyValue:
        config = replace(config, replicas=self.replicas)
        try:
            return await self._js.create_key_value(config)
        except nats.js.errors.APIError as error:
            if error.err_code != _STREAM_NAME_IN_USE:
                raise
            return await self._js.key_value(config.bucket)

    def _kv(self, bucket: KeyValue | None) -> KeyValue:
        if bucket is None:
            raise RuntimeError("NatsStore.start() was not awaited")
        return bucket

    # Rooms

    @_guarded
    async def create_room(self, name: str) -> RoomRecord:
        rooms = self._kv(self._rooms_kv)
        # Counted, then created: two processes creating at once may both pass the count, so the cap is approximate
        # by the number of processes creating rooms at the same moment.
        count = (await self._patiently(rooms.status)).values
        self._room_count = count
        if count >= self.max_rooms:
            raise ChatError(
                ErrorKind.ROOM_LIMIT,
                f"the server has reached its limit of rooms ({self.max_rooms}); join an existing room, or ask an "
                "administrator to close rooms nobody uses",
            )
        record = RoomRecord(name, secrets.token_hex(6), secrets.token_bytes(16))
        value = json.dumps([record.name, record.uid, record.secret.hex()]).encode()
        try:
            # Asked again while a cluster that has just formed or lost a server moves (no responders, a timeout).
            await self._patiently(functools.partial(rooms.create, _key(name_key(name)), value))
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.find_room(name)
            # Unless an earlier try got in and only its answer was lost: then the room is this one.
            if existing is None or existing.uid != record.uid:
                shown = existing.name if existing is not None else name
                alike = "" if shown == name else f" (too like {name!r} to tell apart)"
                raise ChatError(ErrorKind.ROOM_EXISTS, f"room {shown!r} already exists{alike}") from None
        self._room_count += 1
        return record

    @_guarded
    async def find_room(self, name: str) -> RoomRecord | None:
        try:
            entry = await self._kv(self._rooms_kv).get(_key(name_key(name)))
        except nats.js.errors.KeyNotFoundError:
            return None
        assert entry.value is not None
        shown, uid, secret = json.loads(entry.value)
        return RoomRecord(shown, uid, bytes.fromhex(secret))

    @_guarded
    async def list_rooms(self) -> list[RoomInfo]:
        records = await self._rooms()
        live = await self._live_counts()
        fetches = asyncio.Semaphore(TAIL_FETCHES)

        async def info(record: RoomRecord) -> RoomInfo:
            async with fetches:
                tail = await self._tail(record.uid)
            return RoomInfo(record.name, live.get(record.uid, 0), tail.seq)

        rooms = await asyncio.gather(*(info(record) for record in records))
        self._room_count = len(rooms)
        return sorted(rooms, key=lambda room: room.name)

    @_guarded
    async def members(self, room: RoomRecord) -> list[str]:
        await self._check_open(room)
        return sorted(seat.name for _, seat in await self._seats_in_use(room.uid) if seat.holder)

    @_guarded
    async def close_room(self, name: str, reason: CloseReason) -> RoomRecord:
        record = await self.find_room(name)
        if record is None:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {name!r} does not exist")
        # The log decides who closes a room: RoomClosed goes in only after its last entry, and only once.
        await self._log_closed(record, RoomClosed(record.name, reason))
        await self._forget(record)
        return record

    async def _forget(self, record: RoomRecord) -> None:
        """Drop a closed room's record, names and (but for RoomClosed) its log."""
        # Purged rather than deleted: no marker stays, so the bucket's message count is its number of rooms.
        await self._js.purge_stream(f"KV_{ROOMS_BUCKET}", subject=f"$KV.{ROOMS_BUCKET}.{_key(name_key(record.name))}")
        await self._js.purge_stream(f"KV_{NAMES_BUCKET}", subject=f"$KV.{NAMES_BUCKET}.{record.uid}.>")
        await self._js.purge_stream(LOG_STREAM, subject=_log_subject(record.uid), keep=1)
        self._room_count = max(self._room_count - 1, 0)
        self._release(record.uid)

    def _release(self, uid: str) -> None:
        """Forget the seats this process held in a room that closed."""
        for key in [key for key in self._held if key[0] == uid]:
            self._drop_held(key)

    @_guarded
    async def prune_rooms(self) -> list[str]:
        used = {uid for uid, _ in await self._seats_in_use()}
        return sorted(
            [record.name for record in await self._rooms() if record.uid not in used and await self._end(record)]
        )

    async def _end(self, record: RoomRecord) -> bool:
        """Close a room nobody uses as KILLED; False if another process closed it first."""
        # Processes pruning or sweeping the same room at once: the log lets one of them close it.
        try:
            await self._log_closed(record, RoomClosed(record.name, CloseReason.KILLED))
        except ChatError as error:
            if error.kind is not ErrorKind.ROOM_NOT_FOUND:
                raise
            return False
        await self._forget(record)
        return True

    async def _sweeping(self, ttl: float) -> None:
        """Close the rooms seen empty for `ttl` seconds, looking every quarter of it; every process sweeps."""
        loop = asyncio.get_running_loop()
        empty_since: dict[str, float] = {}
        while not self._closed:
            await asyncio.sleep(ttl / 4)
            if not self.available:
                continue
            try:
                used = {uid for uid, _ in await self._seats_in_use()}
                now = loop.time()
                seen, empty_since = empty_since, {}
                for record in await self._rooms():
                    since = seen.get(record.uid, now)
                    if record.uid in used:
                        continue
                    if now - since < ttl:
                        empty_since[record.uid] = since
                    elif await self._end(record):
                        log.info(
                            "Room %s closed: nobody was in it for %g s",
                            record.name,
                            ttl,
                            extra={"room": record.name, "reason": "expired"},
                        )
            except (TimeoutError, nats.errors.Error, ChatError) as error:
                log.debug("A sweep of empty rooms stopped short: %s", error)

    async def _rooms(self) -> list[RoomRecord]:
        records = []
        for msg in await self._scan(f"KV_{ROOMS_BUCKET}", f"$KV.{ROOMS_BUCKET}.>", api.DeliverPolicy.LAST_PER_SUBJECT):
            if not _deleted(msg):
                shown, uid, secret = json.loads(msg.data)
                records.append(RoomRecord(shown, uid, bytes.fromhex(secret)))
        return records

    async def _processes(self) -> dict[str, dict[str, int]]:
        """The live processes, each with its live members per room uid."""
        beats = await self._scan(
            f"KV_{PROCESSES_BUCKET}", f"$KV.{PROCESSES_BUCKET}.>", api.DeliverPolicy.LAST_PER_SUBJECT
        )
        processes = {msg.subject.rsplit(".", 1)[1]: json.loads(msg.data) for msg in beats if not _deleted(msg)}
        if time.monotonic() < self._beats_trusted_from:
            processes = self._seen | processes
        self._seen = processes
        return processes | {self.process: dict(self._live)}

    async def _live_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rooms in (await self._processes()).values():
            for uid, live in rooms.items():
                counts[uid] = counts.get(uid, 0) + live
        return counts

    # Names

    @_guarded
    async def claim(self, room: RoomRecord, name: str, token_for: TokenIssuer, resume_token: str = "") -> Seat:
        await self._check_open(room)
        if resume_token and name:
            resumed = await self._resume(room, name, resume_token)
            if resumed is not None:
                return resumed
        if self.seated >= self.max_members:
            raise ChatError(
                ErrorKind.MEMBER_LIMIT,
                f"the server has reached its limit of members ({self.max_members}); try again later",
            )
        if name:
            return await self._claim_named(room, name, token_for)
        for _ in range(CAS_ATTEMPTS):
            default = await self._free_default(room)
            try:
                return await self._claim_named(room, default, token_for)
            except ChatError as error:
                if error.kind is not ErrorKind.NAME_TAKEN:
                    raise
        raise _unreachable()

    async def _resume(self, room: RoomRecord, name: str, token: str) -> Seat | None:
        """Take the seat held under `token` back, live from another claim, held, or left by a process that died;
        None if the name is free."""
        names = self._kv(self._names_kv)
        key = name_key(name)
        for _ in range(CAS_ATTEMPTS):
            seat = await self._seat(room, key)
            if seat is None:
                return None
            state = await self._state(seat)
            if not tokens.same(seat.token, token):
                if state == "free":
                    return None
                raise ChatError(ErrorKind.NAME_TAKEN, await self._taken(room, seat, name))
            took_over = state == "live"
            claim = secrets.token_hex(8)
            mine = replace(seat, claim=claim, holder=self.process, until=0.0)
            try:
                await names.update(f"{room.uid}.{_key(key)}", mine.value(), last=seat.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self._hold(room.uid, key, claim)
            if took_over:
                await self.signal(room, Takeover(key, claim))
            return Seat(seat.name, key, seat.token, claim, took_over)
        raise _unreachable()

    async def _claim_named(self, room: RoomRecord, name: str, token_for: TokenIssuer) -> Seat:
        names = self._kv(self._names_kv)
        key = name_key(name)
        kv_key = f"{room.uid}.{_key(key)}"
        claim = secrets.token_hex(8)
        token = token_for(key)
        mine = _SeatRecord(name, token, claim, self.process, 0.0, 0)
        for _ in range(CAS_ATTEMPTS):
            try:
                await names.create(kv_key, mine.value())
            except nats.js.errors.KeyWrongLastSequenceError:
                seat = await self._seat(room, key)
                if seat is None:
                    continue
                if await self._state(seat) != "free":
                    raise ChatError(ErrorKind.NAME_TAKEN, await self._taken(room, seat, name)) from None
                # Held past its grace, or by a process that died: free, but taken by compare-and-set, so that of
                # two claims one wins.
                try:
                    await names.update(kv_key, mine.value(), last=seat.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            self._hold(room.uid, key, claim)
            return Seat(name, key, token, claim, took_over=False)
        raise _unreachable()

    async def _free_default(self, room: RoomRecord) -> str:
        """The lowest numbered default name nobody holds in `room`."""
        taken = {name_key(seat.name) for _, seat in await self._seats_in_use(room.uid)}
        number = 1
        while name_key(numbered_name(number)) in taken:
            number += 1
        return numbered_name(number)

    async def _seats_in_use(self, uid: str = "") -> list[tuple[str, _SeatRecord]]:
        """Room uid and seat of every name held, live by a live process or within its grace, in one room or all."""
        alive = await self._processes()
        now = time.time()
        subject = f"$KV.{NAMES_BUCKET}.{uid or '*'}.>"
        used = []
        for msg in await self._scan(f"KV_{NAMES_BUCKET}", subject, api.DeliverPolicy.LAST_PER_SUBJECT):
            if _deleted(msg):
                continue
            seat = _SeatRecord.parse(msg.data, msg.metadata.sequence.stream)
            if seat.holder in alive if seat.holder else seat.until > now:
                used.append((msg.subject.split(".")[2], seat))
        return used

    @_guarded
    async def vacate(self, room: RoomRecord, seat: Seat, grace: float) -> None:
        held = self._held.get((room.uid, seat.key))
        if held is None or held.claim != seat.claim or not held.live:
            return
        held.live = False
        self._count_live(room.uid, -1)
        names = self._kv(self._names_kv)
        record = await self._seat(room, seat.key)
        if record is None or record.claim != seat.claim:
            self._drop_held((room.uid, seat.key))
            return
        kv_key = f"{room.uid}.{_key(seat.key)}"
        try:
            if grace > 0:
                revision = await names.update(
                    kv_key, replace(record, holder="", until=time.time() + grace).value(), last=record.revision
                )
                held.expiry = asyncio.get_running_loop().call_later(
                    grace, self._expire_later, room.uid, seat.key, seat.claim, revision
                )
                return
            await names.delete(kv_key, last=record.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        self._drop_held((room.uid, seat.key))

    def _expire_later(self, uid: str, key: str, claim: str, revision: int) -> None:
        task = asyncio.get_running_loop().create_task(self._expire(uid, key, claim, revision))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, uid: str, key: str, claim: str, revision: int) -> None:
        """Free a seat held for a resume once its grace is over, unless it was resumed meanwhile."""
        held = self._held.get((uid, key))
        if held is None or held.claim != claim or held.live:
            return
        self._drop_held((uid, key))
        try:
            await self._kv(self._names_kv).delete(f"{uid}.{_key(key)}", last=revision)
        except (TimeoutError, nats.errors.Error) as error:
            # Claims treat a seat past its grace as free, so a seat left behind here only takes bucket space.
            log.debug("A seat past its grace was not removed: %s", error)

    def _hold(self, uid: str, key: str, claim: str) -> None:
        previous = self._held.get((uid, key))
        if previous is not None and previous.expiry is not None:
            previous.expiry.cancel()
        if previous is None or not previous.live:
            self._count_live(uid, 1)
        self._held[(uid, key)] = _Held(claim)

    def _drop_held(self, key: tuple[str, str]) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        if held.expiry is not None:
            held.expiry.cancel()
        if held.live:
            self._count_live(key[0], -1)

    def _count_live(self, uid: str, change: int) -> None:
        live = self._live.get(uid, 0) + change
        if live > 0:
            self._live[uid] = live
        else:
            self._live.pop(uid, None)
        self._beat.set()

    async def _seat(self, room: RoomRecord, key: str) -> _SeatRecord | None:
        try:
            entry = await self._kv(self._names_kv).get(f"{room.uid}.{_key(key)}")
        except nats.js.errors.KeyNotFoundError:
            return None
        assert entry.value is not None and entry.revision is not None
        return _SeatRecord.parse(entry.value, entry.revision)

    async def _state(self, seat: _SeatRecord) -> str:
        """ "live" (its holder's process is alive), "held" (within its grace) or "free"."""
        if seat.holder:
            return "live" if await self._alive(seat.holder) else "free"
        return "held" if seat.until > time.time() else "free"

    async def _alive(self, process: str) -> bool:
        if process == self.process:
            return True
        try:
            await self._kv(self._processes_kv).get(process)
        except nats.js.errors.KeyNotFoundError:
            return time.monotonic() < self._beats_trusted_from and process in self._seen
        return True

    async def _taken(self, room: RoomRecord, seat: _SeatRecord, wanted: str) -> str:
        name = repr(seat.name) if seat.name == wanted else f"{seat.name!r} (too like {wanted!r} to tell apart)"
        if await self._state(seat) == "held":
            return f"the name {name} in room {room.name!r} is held for a member whose connection dropped; pick another"
        return f"someone in room {room.name!r} is already called {name}; pick another name"

    async def _check_open(self, room: RoomRecord) -> None:
        found = await self.find_room(room.name)
        if found is None or found.uid != room.uid:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room.name!r} does not exist")

    # The log

    async def append(self, room: RoomRecord, message: Message, dedup_key: str = "") -> Appended:
        # Nothing here awaits before the line is queued for the room's writer, which keeps the queue's order: that is
        # the order the store's contract promises. Waiting for NATS to come back is the writer's, after that.
        if self._closed:
            raise _unreachable()
        followed = self._followed.get(room.uid) or self._unfollowed_writer(room)
        if dedup_key and (logged := followed.recent.get(dedup_key)) is not None:
            return Appended(logged, True)
        pending = _Pending(message, dedup_key)
        followed.pending.append(pending)
        if followed.writer is None:
            followed.writer = asyncio.get_running_loop().create_task(self._write(room, followed))
            self._tasks.add(followed.writer)
            followed.writer.add_done_callback(self._tasks.discard)
        try:
            return await pending.done
        except (TimeoutError, nats.errors.Error) as error:
            raise self._failed(error) from error

    def _unfollowed_writer(self, room: RoomRecord) -> _Followed:
        """What appends to a room this process does not follow share: their group commits and the log's keys, read
        from the stream rather than heard; kept for the UNFOLLOWED_WRITERS last rooms written, and while it writes."""
        writer = self._unfollowed.pop(room.uid, None)
        if writer is None:
            writer = _Followed(room.uid, _Unheard(), None, 0)
        self._unfollowed[room.uid] = writer
        if len(self._unfollowed) > UNFOLLOWED_WRITERS:
            # One still writing stays: a second writer for its room could log the next lines before its own.
            idle = next((uid for uid, kept in self._unfollowed.items() if kept.writer is None), None)
            if idle is not None:
                del self._unfollowed[idle]
        return writer

    async def _write(self, room: RoomRecord, followed: _Followed) -> None:
        """Commit the room's waiting appends, as many as one entry holds at a time, until none waits: one round trip
        to JetStream per entry, and the entry's messages reach the fan-out together (measured in bench/README)."""
        batch: list[_Pending] = []
        try:
            # Keeping no history, the log holds only its last entry, too little to answer re-sent lines from: each
            # line goes alone under its own message id.
            most = MAX_BATCH_MESSAGES if self.history_limit else 1
            while followed.pending:
                # Lines already queued wait out a cluster's failover, as a commit under way does: a lost node is a
                # pause. Once the store has been declared away (its members told), they are refused at once.
                if not await self._reachable(0.0 if self._declared_away else FAILOVER_SECONDS):
                    break
                if most > 1:
                    for _ in range(ENTRY_TURNS):
                        await asyncio.sleep(0)
                batch = _take(followed, most)
                try:
                    await self._commit(room, followed, batch)
                except Exception as error:
                    for pending in batch:
                        pending.settle(error)
        finally:
            followed.writer = None
            # Cancelled as the store closes: the callers still waiting hear that the store is gone.
            for pending in batch + followed.pending:
                pending.settle(_unreachable())
            followed.pending = []

    async def _commit(self, room: RoomRecord, followed: _Followed, batch: list[_Pending]) -> None:
        """Log `batch` as one entry after the room's last by compare-and-set; a line whose dedup key the log holds
        already is answered with the message logged then. A retry after a lost answer goes under the same message id,
        so JetStream keeps the entry once."""
        if not followed.tail_read:
            followed.tail = await self._tail(room.uid)
            followed.tail_read = True
        tail = followed.tail
        for _ in _contended_rounds():
            if tail.closed:
                raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room.name!r} does not exist")
            await self._catch_up(followed, tail.stream_seq)
            fresh = _fresh(followed, batch)
            if not fresh:
                return
            # A lone keyed line keeps JetStream's de-duplication too, which outlasts the keys the log still holds.
            alone = len(fresh) == 1 and fresh[0].key
            message_id = f"{room.uid}.{fresh[0].key}" if alone else secrets.token_hex(12)
            seq = tail.seq + len(fresh)
            payload = _encode_entry([pending.row for pending in fresh])
            ack = await self._publish_after(room.uid, tail, seq, message_id, payload)
            if ack is None:
                tail = await self._tail(room.uid)
                continue
            if ack.duplicate and alone:
                for entry, key in await self._entries(ack.seq):
                    if key == fresh[0].key and isinstance(entry, Message):
                        fresh[0].settle(Appended(entry, True))
                        return
                raise _unreachable()
            kept = [(replace(pending.message, seq=tail.seq + 1 + n), pending.key) for n, pending in enumerate(fresh)]
            # Every entry up to the tail compared against was known, and this one follows it.
            followed.known = max(followed.known, ack.seq)
            if self._followed.get(room.uid) is followed:
                self._arrive(followed, seq, ack.seq, kept, local=True)
            else:
                followed.tail = _Tail(seq, ack.seq)
                _learn(followed, kept)
            for pending, (message, _) in zip(fresh, kept, strict=True):
                pending.settle(Appended(message, False))
            return
        raise _unreachable()

    async def _catch_up(self, followed: _Followed, stream_seq: int) -> None:
        """Learn the dedup keys of every entry up to `stream_seq`: from the room's consumer, or, while it lags (being
        made anew after NATS moved, say), read from the stream."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP_SECONDS):
                while followed.known < stream_seq and self._followed.get(followed.uid) is followed:
                    followed.caught_up.clear()
                    await followed.caught_up.wait()
        subject = _log_subject(followed.uid)
        if followed.known == 0 < stream_seq:
            # Nothing heard yet (a room written without following it): one read of the whole log beats one per entry.
            scan = functools.partial(self._scan, LOG_STREAM, subject, api.DeliverPolicy.ALL)
            for scanned in await self._patiently(scan):
                _learn(followed, _decode_entries(scanned.data, _header_seq(scanned)))
                followed.known = max(followed.known, scanned.metadata.sequence.stream)
        while followed.known < stream_seq:
            msg = await self._patiently(
                functools.partial(self._js.get_msg, LOG_STREAM, seq=followed.known + 1, subject=subject, next=True)
            )
            assert msg.seq is not None and msg.data is not None
            seq = _header_seq(msg)
            entries = _decode_entries(msg.data, seq)
            if self._followed.get(followed.uid) is followed:
                self._arrive(followed, seq, msg.seq, entries, local=False)
            else:
                _learn(followed, entries)
            followed.known = max(followed.known, msg.seq)

    async def _log_closed(self, room: RoomRecord, entry: RoomClosed) -> None:
        """Put RoomClosed after the room's last entry by compare-and-set, learning the real tail when another process
        got in first; the same message id on every attempt makes a retry after a lost answer safe."""
        followed = self._followed.get(room.uid)
        tail = followed.tail if followed is not None else await self._tail(room.uid)
        message_id = secrets.token_hex(12)
        payload = _encode_closed(entry)
        for _ in range(CAS_ATTEMPTS):
            if tail.closed:
                raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room.name!r} does not exist")
            ack = await self._publish_after(room.uid, tail, tail.seq, message_id, payload)
            if ack is None:
                tail = await self._tail(room.uid)
                continue
            if followed is not None and self._followed.get(room.uid) is followed:
                self._arrive(followed, tail.seq, ack.seq, [(entry, "")], local=True)
            return
        raise _unreachable()

    async def _publish_after(
        self, uid: str, tail: _Tail, seq: int, message_id: str, payload: bytes
    ) -> api.PubAck | None:
        """Publish `payload` as the room's entry after `tail`, its last message numbered `seq`; None when another entry
        got there first. The message id makes a retry after a lost answer safe."""
        headers = {
            api.Header.MSG_ID: message_id,
            api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(tail.stream_seq),
            SEQ_HEADER: str(seq),
        }
        try:
            return await self._patiently(
                functools.partial(self._js.publish, _log_subject(uid), payload, headers=headers)
            )
        except nats.js.errors.APIError as error:
            if error.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            return None

    async def _reachable(self, patience: float = RECONNECT_WAIT_SECONDS) -> bool:
        """Whether NATS answers, waiting up to `patience` for it while it is away: moving to another server of a
        cluster takes a moment; NATS away for longer, or a closed store, is refused."""
        if self.available:
            return True
        try:
            await asyncio.wait_for(self._connected.wait(), 0 if self._closed else patience)
        except TimeoutError:
            return False
        return True

    def _failed(self, error: BaseException) -> ChatError:
        """STORE_UNAVAILABLE for an operation NATS failed, logged (sampled)."""
        self.throttled_log.warning("failed", "The message store failed an operation: %s", error or type(error).__name__)
        return _unreachable()

    async def _patiently(self, request: Callable[[], Awaitable[R]]) -> R:
        """Make a JetStream request, again while the cluster moves (a server lost, a stream leader being elected) for
        up to FAILOVER_SECONDS. A publish goes again under the same message id: JetStream drops it if the first got
        in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FAILOVER_SECONDS
        while True:
            try:
                return await request()
            except _PASSING as error:
                left = deadline - loop.time()
                if self._closed or left <= 0:
                    raise
                log.debug("JetStream did not answer, asking again: %s", error or type(error).__name__)
                await asyncio.wait_for(self._connected.wait(), left)
                await asyncio.sleep(FAILOVER_PAUSE_SECONDS)

    async def _tail(self, uid: str) -> _Tail:
        try:
            msg = await self._patiently(functools.partial(self._js.get_last_msg, LOG_STREAM, _log_subject(uid)))
        except nats.js.errors.NotFoundError:
            return _Tail(0, 0)
        assert msg.seq is not None and msg.data is not None
        seq = _header_seq(msg)
        return _Tail(seq, msg.seq, isinstance(_decode_entries(msg.data, seq)[-1][0], RoomClosed))

    async def _entries(self, stream_seq: int) -> list[tuple[Entry, str]]:
        msg = await self._js.get_msg(LOG_STREAM, seq=stream_seq)
        assert msg.data is not None
        return _decode_entries(msg.data, _header_seq(msg))

    async def _logged(self, uid: str) -> list[tuple[Entry, str]]:
        """Every entry the room's log keeps, oldest first, each message with its dedup key."""
        msgs = await self._patiently(
            functools.partial(self._scan, LOG_STREAM, _log_subject(uid), api.DeliverPolicy.ALL)
        )
        return [logged for msg in msgs for logged in _decode_entries(msg.data, _header_seq(msg))]

    @_guarded
    async def read(self, room: RoomRecord, *, after: int | None = None, last: int = 0) -> Backlog:
        tail = await self._tail(room.uid)
        if tail.closed:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room.name!r} does not exist")
        wanted = tail.seq - min(max(after, 0), tail.seq) if after is not None else min(max(last, 0), tail.seq)
        if wanted == 0 or self.history_limit == 0:
            return Backlog([], wanted if after is not None else 0, tail.seq)
        followed = self._followed.get(room.uid)
        if followed is not None and (cached := await _cached(followed, tail.seq - wanted + 1, tail.seq)) is not None:
            return Backlog(
                cached[-self.history_limit :], max(wanted - len(cached), 0) if after is not None else 0, tail.seq
            )
        # The stream's limit counts entries, and a group commit's entry holds several messages: count them here.
        kept = [
            entry for entry, _ in await self._logged(room.uid) if isinstance(entry, Message) and entry.seq <= tail.seq
        ][-self.history_limit :]
        messages = kept[-wanted:] if wanted else []
        lost = wanted - len(messages) if after is not None else 0
        return Backlog(messages, lost, tail.seq)

    # Following

    @_guarded
    async def follow(self, room: RoomRecord, follower: Follower) -> int:
        await self.unfollow(room)
        await self._check_open(room)
        tail = await self._tail(room.uid)
        if tail.closed:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room.name!r} does not exist")
        self._unfollowed.pop(room.uid, None)
        followed = self._followed[room.uid] = _Followed(
            room.uid, follower, tail, min(READ_CACHE_MESSAGES, self.history_limit)
        )
        # From the log's oldest kept entry, not its tail: the entries before the tail teach the dedup keys logged,
        # and pass no further (their seqs were delivered).
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)

        async def logged(msg: Msg) -> None:
            if self._followed.get(room.uid) is followed:
                seq = _header_seq(msg)
                stream_seq = msg.metadata.sequence.stream
                self._arrive(followed, seq, stream_seq, _decode_entries(msg.data, seq), local=False)
                followed.known = max(followed.known, stream_seq)
                followed.caught_up.set()

        async def signalled(msg: Msg) -> None:
            origin, signal = _decode_signal(msg.data)
            if origin != self.process and self._followed.get(room.uid) is followed:
                if isinstance(signal, Takeover):
                    held = self._held.get((room.uid, signal.key))
                    if held is not None and held.claim != signal.claim:
                        # Resumed in another process: the name is no longer this one's to count or free.
                        self._drop_held((room.uid, signal.key))
                followed.follower.signalled(signal)

        async def whispered(msg: Msg) -> None:
            key, sender, recipient, text, sent_at_ns, client_id = json.loads(msg.data)
            if self._followed.get(room.uid) is followed:
                followed.follower.whispered(key, Whisper(sender, recipient, text, sent_at_ns, client_id))

        try:
            # One ordered consumer per room per process, never one per member: it is ephemeral, in memory, and
            # recreated by the client from the last entry it delivered when it notices a gap or a lost server.
            followed.subscriptions.append(
                await self._js.subscribe(
                    _log_subject(room.uid),
                    stream=LOG_STREAM,
                    cb=logged,
                    ordered_consumer=True,
                    config=config,
                    idle_heartbeat=FOLLOW_HEARTBEAT_SECONDS,
                )
            )
            followed.subscriptions.append(await self._nc.subscribe(f"chat.signal.{room.uid}", cb=signalled))
            followed.subscriptions.append(
                await self._nc.subscribe(f"chat.whisper.{room.uid}.{self.process}", cb=whispered)
            )
            await self._sent()
        except BaseException:
            await self.unfollow(room)
            raise
        return tail.seq

    async def _sent(self) -> None:
        """Return once NATS has processed every command this connection sent before, subscriptions included, so that
        nothing published after is missed. nats-py's flush() does not promise it: its PING can overtake the queue."""
        inbox = self._nc.new_inbox()
        echo = await self._nc.subscribe(inbox, max_msgs=1)
        try:
            # A connection's commands are processed in order: its own message comes back after all of them.
            await self._nc.publish(inbox, b"")
            await echo.next_msg(timeout=max(self.timeout, 1.0))
        finally:
            with contextlib.suppress(nats.errors.Error):
                await echo.unsubscribe()

    def _arrive(
        self, followed: _Followed, seq: int, stream_seq: int, entries: Sequence[tuple[Entry, str]], *, local: bool
    ) -> None:
        """Learn a log entry's dedup keys and pass its messages to the follower once, in order: an append's own go at
        once when every entry before them has, or else come with the rest from the consumer."""
        closed = isinstance(entries[-1][0], RoomClosed)
        if stream_seq > followed.tail.stream_seq:
            followed.tail = _Tail(seq, stream_seq, closed)
        _learn(followed, entries)
        _cache(followed, entries)
        for entry, _ in entries:
            self._pass(followed, entry.seq if isinstance(entry, Message) else seq, entry, local=local)

    def _pass(self, followed: _Followed, seq: int, entry: Entry, *, local: bool) -> None:
        closed = isinstance(entry, RoomClosed)
        if followed.closed:
            return
        if closed:
            if local and seq != followed.delivered:
                return
            followed.closed = True
            self._release(followed.uid)
        elif seq <= followed.delivered or (local and seq != followed.delivered + 1):
            return
        elif seq != followed.delivered + 1:
            log.warning(
                "Messages %d to %d of a room were dropped from the store before this server read them",
                followed.delivered + 1,
                seq - 1,
            )
        if not closed:
            followed.delivered = seq
        followed.follower.logged(entry)

    async def unfollow(self, room: RoomRecord) -> None:
        await self._unfollow(room.uid)

    async def _unfollow(self, uid: str) -> None:
        followed = self._followed.pop(uid, None)
        if followed is None:
            return
        # A group commit waiting for this room's consumer stops waiting.
        followed.caught_up.set()
        for subscription in followed.subscriptions:
            try:
                await subscription.unsubscribe()
            except (TimeoutError, nats.errors.Error) as error:
                # The consumer goes by itself once NATS sees it idle; nothing reaches the follower meanwhile.
                log.debug("Unsubscribing from a room failed: %s", error)

    @_guarded
    async def signal(self, room: RoomRecord, signal: Signal) -> None:
        followed = self._followed.get(room.uid)
        if followed is not None:
            followed.follower.signalled(signal)
        await self._nc.publish(f"chat.signal.{room.uid}", _encode_signal(self.process, signal))

    @_guarded
    async def whisper(self, room: RoomRecord, recipient: str, whisper: Whisper) -> str:
        key = name_key(recipient)
        seat = await self._seat(room, key)
        state = await self._state(seat) if seat is not None else "free"
        if seat is None or state != "live":
            raise ChatError(
                ErrorKind.MEMBER_NOT_FOUND,
                f"{recipient} lost their connection and may be back shortly; try again later"
                if state == "held"
                else f"nobody named {recipient!r} is in room {room.name!r}",
            )
        followed = self._followed.get(room.uid)
        if seat.holder == self.process and followed is not None:
            followed.follower.whispered(key, whisper)
        else:
            fields = [key, whisper.sender, whisper.recipient, whisper.text, whisper.sent_at_ns, whisper.client_id]
            await self._nc.publish(f"chat.whisper.{room.uid}.{seat.holder}", json.dumps(fields).encode())
        return seat.name

    # Liveness

    async def _heartbeat(self) -> None:
        processes = self._kv(self._processes_kv)
        await processes.put(self.process, json.dumps(self._live).encode())

    async def _beating(self) -> None:
        """Beat every third of the liveness span, and at once after this process's live members changed."""
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), self.liveness / 3)
            self._beat.clear()
            if not self.available:
                continue
            try:
                await self._heartbeat()
                self._room_count = (await self._kv(self._rooms_kv).status()).values
                if self._followed:
                    await self._notice_departed()
            except (TimeoutError, nats.errors.Error) as error:
                # The connection's own callbacks tell the operator NATS is away; this says only what it cost.
                log.debug("A heartbeat was not sent: %s", error)

    async def _notice_departed(self) -> None:
        """Tell the rooms followed here that the live members of a process whose heartbeat aged out have left: it
        died, so nobody else will."""
        alive = set(await self._processes())
        gone, self._alive_at_beat = self._alive_at_beat - alive, alive
        if not gone:
            return
        for uid, followed in list(self._followed.items()):
            subject = f"$KV.{NAMES_BUCKET}.{uid}.>"
            for msg in await self._scan(f"KV_{NAMES_BUCKET}", subject, api.DeliverPolicy.LAST_PER_SUBJECT):
                seat = None if _deleted(msg) else _SeatRecord.parse(msg.data, msg.metadata.sequence.stream)
                if seat is not None and seat.holder in gone and self._followed.get(uid) is followed:
                    followed.follower.signalled(MemberLeft(seat.name, LeaveReason.DISCONNECTED))

    async def _scan(self, stream: str, subject: str, policy: api.DeliverPolicy) -> list[Msg]:
        """Every message on `subject` (or the last on each subject it matches), read through a short-lived
        consumer that is deleted afterwards."""
        config = api.ConsumerConfig(
            deliver_policy=policy,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=max(self.timeout * 2, 10.0),
            mem_storage=True,
            num_replicas=1,
        )
        subscription = await self._js.pull_subscribe(subject, stream=stream, config=config)
        try:
            info = await subscription.consumer_info()
            pending = info.num_pending or 0
            msgs: list[Msg] = []
            while pending > 0:
                batch = await subscription.fetch(min(pending, 256), timeout=self.timeout)
                msgs.extend(batch)
                pending = batch[-1].metadata.num_pending
        finally:
            await subscription.unsubscribe()
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await self._js.delete_consumer(stream, info.name)
        return msgs

    # The connection's callbacks

    async def disconnected(self) -> None:
        if self._closed:
            return
        log.warning("Lost the connection to the message store (NATS); reconnecting")
        self._connected.clear()
        if self._away is None:
            self._away = asyncio.get_running_loop().call_later(RECONNECT_WAIT_SECONDS, self._changed)

    async def reconnected(self) -> None:
        url = self._nc.connected_url
        log.warning("Reconnected to the message store (NATS) at %s", url.netloc if url is not None else "?")
        self._connected.set()
        self._beats_trusted_from = time.monotonic() + self.liveness
        self._beat.set()
        self._changed()

    def _changed(self) -> None:
        if self._away is not None:
            self._away.cancel()
            self._away = None
        self._declared_away = not self.available
        if self.on_availability is not None:
            self.on_availability(self.available)

    async def errored(self, error: Exception) -> None:
        # While NATS is away the client reports every attempt to reconnect: one line per interval says enough.
        self.throttled_log.warning("error", "The message store (NATS) reported: %s", error or type(error).__name__)

    async def connection_closed(self) -> None:
        if not self._closed:
            log.warning("The connection to the message store (NATS) closed")
        self._changed()

    async def close(self) -> None:
        if self._closed:
            return
        for task in (self._heart, self._sweep):
            if task is not None:
                task.cancel()
        for uid in list(self._followed):
            await self._unfollow(uid)
        for key in list(self._held):
            self._drop_held(key)
        for task in list(self._tasks):
            task.cancel()
        if self._nc.is_connected:
            try:
                # Without its heartbeat this process's live names are free at once, not after the liveness span.
                await self._kv(self._processes_kv).purge(self.process)
            except (TimeoutError, nats.errors.Error) as error:
                log.debug("The heartbeat was not removed: %s", error)
        self._closed = True
        await self._nc.close()


def _learn(followed: _Followed, entries: Sequence[tuple[Entry, str]]) -> None:
    """Remember the dedup keys of a log entry's messages, the oldest forgotten past DEDUP_KEYS_KEPT."""
    recent = followed.recent
    for entry, key in entries:
        if key and isinstance(entry, Message):
            recent[key] = entry
            if len(recent) > DEDUP_KEYS_KEPT:
                del recent[next(iter(recent))]


def _contended_rounds() -> Iterator[int]:
    """Rounds of a room's compare-and-set: at least CAS_ATTEMPTS, and more for FAILOVER_SECONDS. A writer slowed by a
    cluster's failover can lose many rounds in a row to one that was not (a line was refused after 64 in a CI run)."""
    deadline = time.monotonic() + FAILOVER_SECONDS
    for attempt in itertools.count():
        if attempt >= CAS_ATTEMPTS and time.monotonic() > deadline:
            return
        yield attempt


def _take(followed: _Followed, most: int) -> list[_Pending]:
    """The waiting appends the next entry holds, oldest first: at most `most`, and MAX_BATCH_BYTES unless just one."""
    size = 0
    taken = 0
    for pending in followed.pending[:most]:
        size += len(pending.row) + 1
        if taken and size > MAX_BATCH_BYTES:
            break
        taken += 1
    batch, followed.pending = followed.pending[:taken], followed.pending[taken:]
    return batch


def _fresh(followed: _Followed, batch: list[_Pending]) -> list[_Pending]:
    """The appends of `batch` to log: a line whose key the log holds is answered from there, one whose key an earlier
    line of the batch carries waits for the next entry (and is answered from this one), one whose caller left goes."""
    fresh = []
    keys = set()
    later = []
    for pending in batch:
        if pending.done.done():
            continue
        logged = followed.recent.get(pending.key) if pending.key else None
        if logged is not None:
            pending.settle(Appended(logged, True))
        elif pending.key in keys:
            later.append(pending)
        else:
            if pending.key:
                keys.add(pending.key)
            fresh.append(pending)
    followed.pending[:0] = later
    return fresh


def _deleted(msg: Msg) -> bool:
    return bool(msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"))


async def connect(
    urls: list[str],
    *,
    replicas: int | None,
    history_limit: int = DEFAULT_HISTORY,
    history_bytes: int = DEFAULT_HISTORY_BYTES,
    resume_grace: float = DEFAULT_RESUME_GRACE_SECONDS,
    max_rooms: int = DEFAULT_MAX_ROOMS,
    max_members: int = DEFAULT_MAX_MEMBERS,
    liveness: float = DEFAULT_LIVENESS_SECONDS,
    request_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    empty_room_ttl: float | None = None,
    on_availability: Callable[[bool], None] | None = None,
) -> NatsStore:
    """Connect to NATS at `urls` (nats://HOST:PORT each) and set up the store; `replicas` None means min(3, the
    number of NATS servers the cluster announces). Raises ChatError(STORE_UNAVAILABLE) when none answers."""
    handlers: dict[str, NatsStore] = {}

    async def disconnected() -> None:
        if "store" in handlers:
            await handlers["store"].disconnected()

    async def reconnected() -> None:
        if "store" in handlers:
            await handlers["store"].reconnected()

    async def errored(error: Exception) -> None:
        if "store" in handlers:
            await handlers["store"].errored(error)
        else:
            log.warning("The message store (NATS) reported: %s", error or type(error).__name__)

    async def closed() -> None:
        if "store" in handlers:
            await handlers["store"].connection_closed()

    try:
        connection = await nats.connect(
            servers=urls,
            name="chat-server",
            error_cb=errored,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            closed_cb=closed,
            allow_reconnect=True,
            # Once over every URL at start-up, so that a wrong or missing NATS is one clear error, not a wait.
            max_reconnect_attempts=1,
            reconnect_time_wait=1,
            connect_timeout=int(max(request_timeout, 1)),
        )
    except (TimeoutError, nats.errors.Error, OSError) as error:
        raise ChatError(ErrorKind.STORE_UNAVAILABLE, f"{UNREACHABLE} ({error})") from error
    # Connected, the store outlasts any outage of NATS: the client retries for as long as the process runs.
    connection.options["max_reconnect_attempts"] = -1
    if replicas is None:
        # The pool holds the URLs given and the cluster's other servers, which NATS announces on connecting.
        replicas = min(3, max(len(connection.servers), 1))
    store = NatsStore(
        connection,
        replicas=replicas,
        history_limit=history_limit,
        history_bytes=history_bytes,
        resume_grace=resume_grace,
        max_rooms=max_rooms,
        max_members=max_members,
        liveness=liveness,
        timeout=request_timeout,
        empty_room_ttl=empty_room_ttl,
        on_availability=on_availability,
    )
    handlers["store"] = store
    try:
        await _start(store)
    except nats.js.errors.ServiceUnavailableError as error:
        await connection.close()
        raise ChatError(
            ErrorKind.STORE_UNAVAILABLE,
            f"NATS at {', '.join(urls)} has no JetStream; start nats-server with --jetstream",
        ) from error
    except (TimeoutError, nats.errors.Error) as error:
        await connection.close()
        raise ChatError(ErrorKind.STORE_UNAVAILABLE, f"{UNREACHABLE} ({error})") from error
    except BaseException:
        await connection.close()
        raise
    return store


async def _start(store: NatsStore) -> None:
    """Set the store up, asking again while a cluster that has just started elects its JetStream leader and meets its
    peers: its servers answer health checks a moment before JetStream answers requests (in time, on a busy machine) or
    can place a replica."""
    deadline = asyncio.get_running_loop().time() + FAILOVER_SECONDS
    while True:
        try:
            await store.start()
            return
        except (
            TimeoutError,
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.js.errors.APIError,
        ) as error:
            forming = not isinstance(error, nats.js.errors.APIError) or error.err_code == _NO_SUITABLE_PEERS
            if not forming or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(FAILOVER_PAUSE_SECONDS)
