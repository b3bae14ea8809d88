"""Per-process delivery over any store: member queues, batching, eviction, encoding once per process, and the
replay-then-live hand-over. Plain asyncio; it knows nothing of gRPC, nor of which store holds the rooms.

Words (as in chat_service.store): a *local room* is a room this process follows because it has members there; the
store logs each message once, and the local room's follower fans it out to the local members' queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast

from chat_service import tokens
from chat_service.errors import ChatError, ErrorKind
from chat_service.events import (
    CloseReason,
    Event,
    Joined,
    LeaveReason,
    MemberJoined,
    MemberLeft,
    Members,
    Message,
    Problem,
    Resume,
    RoomClosed,
    RoomInfo,
    Whisper,
)
from chat_service.registry import DEFAULT_NAME
from chat_service.stats import Stats
from chat_service.store import DEFAULT_RESUME_GRACE_SECONDS, Entry, RoomRecord, Seat, Signal, Store, Takeover
from chat_service.throttled_log import ThrottledLog
from chat_service.validation import check_client_id, check_name, check_text, name_key

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_QUEUE_LIMIT = 1024
DEFAULT_BATCH_LIMIT = 256
DEFAULT_WRITE_SLOTS = 16
DEFAULT_SLOT_HOLD_SECONDS = 0.1
# Whispers' client ids remembered server-wide to recognise a re-sent whisper (lines are the store's to dedup).
WHISPER_IDS_KEPT = 16_384
# How long a join waits for this process to have heard the room's log up to where it read the member's backlog.
CATCH_UP_SECONDS = 10.0
# Reads a join makes at most to meet a follower that keeps moving on, before it gives up on a room that busy.
MAX_BACKLOG_READS = 100
# Joins and leaves queued for one member before the rest of a run of them becomes one member list. A crowd of N
# leaving at once would otherwise queue N events for each of the others, and overflow prompt readers' queues.
PRESENCE_RUN = 8
# Reads of a room's members once the store is back, a second longer apart each time, before the roster is left as is.
ROSTER_READS = 5
# Every member here is told this once when the store goes away; lines each get their own error meanwhile.
STORE_AWAY = (
    "the message store is unreachable: lines sent now are not delivered; the server reconnects by itself, "
    "and the room goes on once it is back"
)
# Stands in a member's queue for the room's member list, made when it is written so that it is current then.
_MEMBER_LIST = object()


class WriteSlots:
    """A FIFO pool of slots, one leased by each stream while its write is in flight."""

    __slots__ = ("_free", "_leases", "_sweeping", "_waiting", "hold_limit")

    def __init__(self, size: int, hold_limit: float = DEFAULT_SLOT_HOLD_SECONDS) -> None:
        self._free = size
        self._waiting: deque[asyncio.Future[bool]] = deque()
        self._leases: deque[Lease] = deque()
        self._sweeping = False
        self.hold_limit = hold_limit

    async def acquire(self) -> Lease:
        """Lease a slot, waiting in line when none is free."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return self.lease()
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.give_back()
            raise
        return self.lease()

    def line_up(self, turn: asyncio.Future[bool]) -> None:
        """Resolve `turn` to True once a slot is leased to it: now if one is free, else in line after the others."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            turn.set_result(True)
        else:
            self._waiting.append(turn)

    def lease(self) -> Lease:
        """The lease of a slot already counted as taken: acquired, or granted to a turn put in line."""
        loop = asyncio.get_running_loop()
        lease = Lease(self, loop.time())
        self._leases.append(lease)
        if not self._sweeping:
            self._sweeping = True
            loop.call_later(self.hold_limit, self._sweep)
        return lease

    def _sweep(self) -> None:
        # A client that stops reading blocks its write on flow control for as long as it likes; without a limit,
        # a few such clients would hold every slot and stop delivery to everyone else. So a lease older than the
        # hold limit gives its slot back, and that write goes on without one.
        loop = asyncio.get_running_loop()
        expired = loop.time() - self.hold_limit
        leases = self._leases
        while leases and (leases[0].released or leases[0].taken_at <= expired):
            leases.popleft().release()
        if leases:
            loop.call_later(self.hold_limit, self._sweep)
        else:
            self._sweeping = False

    def give_back(self) -> None:
        """Pass a slot to the first in line, or free it."""
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(True)
                return
        self._free += 1


class Lease:
    """One slot, given back by `release`, or by the pool once it is older than the hold limit."""

    __slots__ = ("_slots", "released", "taken_at")

    def __init__(self, slots: WriteSlots, taken_at: float) -> None:
        self._slots = slots
        self.taken_at = taken_at
        self.released = False

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        if not self.released:
            self.released = True
            self._slots.give_back()


class _Local(Generic[T]):
    """A room this process follows while it has members there: the store's follower for it, and those members."""

    __slots__ = (
        "closed",
        "following",
        "last_seq",
        "lock",
        "member_list",
        "members",
        "record",
        "registry",
        "roster",
        "seeding",
        "users",
        "waiters",
    )

    def __init__(self, registry: RoomRegistry[T], record: RoomRecord) -> None:
        self.registry = registry
        self.record = record
        # This process's members, keyed by name_key(name).
        self.members: dict[str, Member[T]] = {}
        # Every process's live members by name key, kept from the presence signals, so that a member list is made
        # when it is written without asking the store.
        self.roster: dict[str, str] = {}
        # While the roster is being read from the store: presence heard meanwhile, newer than what is read.
        self.seeding: dict[str, str | None] | None = None
        # The seq of the last message sent live to the members here: a joining member's backlog ends exactly there.
        self.last_seq = 0
        # The encoded member list, made once per change of members however many members are sent it.
        self.member_list: T | None = None
        # Joins under way: the room stays followed while any is, even before its member is in.
        self.users = 0
        self.following = False
        self.closed = False
        # Follow and unfollow one at a time, so that a join never follows while a last leave unfollows.
        self.lock = asyncio.Lock()
        # Joins waiting for this process to hear the log up to a seq; made only when a follower lags the store.
        self.waiters: list[tuple[int, asyncio.Future[None]]] | None = None

    def logged(self, entry: Entry) -> None:
        if type(entry) is Message:
            self.last_seq = entry.seq
            self.registry.fan_out(self, entry)
            if self.waiters is not None:
                self._wake()
        else:
            self.registry.close_local(self, cast(RoomClosed, entry))

    def signalled(self, signal: Signal) -> None:
        registry = self.registry
        if isinstance(signal, Takeover):
            registry.taken_over(self, signal)
            return
        key = name_key(signal.name)
        present = signal.name if isinstance(signal, MemberJoined) else None
        if self.seeding is not None:
            self.seeding[key] = present
        if present is None:
            self.roster.pop(key, None)
            registry.announce(self, signal)
        else:
            self.roster[key] = present
            # The member who joined is in already, and is not told of itself.
            registry.announce(self, signal, skip=self.members.get(key))

    def whispered(self, recipient_key: str, whisper: Whisper) -> None:
        member = self.members.get(recipient_key)
        if member is not None:
            if whisper.recipient != member.name:
                whisper = dataclasses.replace(whisper, recipient=member.name)
            member.push(self.registry.encode(whisper))

    async def reach(self, seq: int) -> None:
        """Wait until this process has heard the room's log up to `seq`, or the room closed."""
        if self.last_seq >= seq or self.closed:
            return
        heard = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append((seq, heard))
        try:
            await asyncio.wait_for(heard, CATCH_UP_SECONDS)
        except TimeoutError:
            raise ChatError(
                ErrorKind.JOIN_TIMEOUT,
                f"the messages of room {self.record.name!r} did not reach this server in time; try joining again",
            ) from None

    def _wake(self) -> None:
        waiting = []
        for seq, heard in self.waiters or ():
            if self.closed or seq <= self.last_seq:
                if not heard.done():
                    heard.set_result(None)
            else:
                waiting.append((seq, heard))
        self.waiters = waiting or None


class Member(Generic[T]):
    """A membership of this process; the methods that do not await run to completion without yielding."""

    __slots__ = (
        "_backlog",
        "_dropped",
        "_in_line",
        "_presence",
        "_queue",
        "_registry",
        "_room",
        "_seat",
        "_stale",
        "_waiter",
    )

    def __init__(self, registry: RoomRegistry[T], room: _Local[T], seat: Seat, backlog: list[T]) -> None:
        self._registry = registry
        self._room: _Local[T] | None = room
        self._seat = seat
        # The join's answer and its history, written before anything live and not counted against the bound.
        self._backlog: list[T] | None = backlog
        # A list, not a deque: an idle member's empty deque holds a block of 0.5 KiB, and a batch mostly takes the
        # whole queue (at most `batch_limit` when it takes the front).
        self._queue: list[T] = []
        # Joins and leaves queued since the queue was last empty; past PRESENCE_RUN, `_stale` holds a member list
        # in the queue instead. They never count against the bound: a crowd coming or going never evicts anyone.
        self._presence = 0
        self._stale = False
        # What `deliver` waits on with an empty queue: the first event puts it in line for a write slot (`_in_line`),
        # and it resolves to True holding one, or to False when the membership ends first.
        self._waiter: asyncio.Future[bool] | None = None
        self._in_line = False
        self._dropped: asyncio.Future[ChatError] = asyncio.get_running_loop().create_future()

    @property
    def room(self) -> str:
        return self._room.record.name if self._room is not None else ""

    @property
    def name(self) -> str:
        return self._seat.name

    @property
    def dropped(self) -> asyncio.Future[ChatError]:
        return self._dropped

    async def say(self, text: str, client_id: str = "", *, action: bool = False) -> None:
        room = self._joined_room()
        check_text(text)
        registry = self._registry
        # The store logs a line once per key: a client re-sending after a reconnect gets the original back.
        dedup_key = self._sent_key(room, client_id)
        message = Message(0, self._seat.name, text, time.time_ns(), client_id, action)
        appended = await registry.store.append(room.record, message, dedup_key)
        if appended.duplicate:
            self.push(registry.encode(appended.message))
            return
        registry.stats.received["say"] += 1
        if registry.departing:
            # Those this line made too slow are announced before the sender goes on, as they were dropped.
            await registry.flush_departures()

    async def whisper(self, recipient: str, text: str, client_id: str = "") -> None:
        room = self._joined_room()
        check_text(text)
        registry = self._registry
        sent_key = self._sent_key(room, client_id)
        if sent_key and (sent := registry.whispers_sent.get(sent_key)) is not None:
            self.push(sent)
            return
        whisper = Whisper(self._seat.name, recipient, text, time.time_ns(), client_id)
        held = await registry.store.whisper(room.record, recipient, whisper)
        registry.stats.received["whisper"] += 1
        echo = registry.encode(whisper if held == recipient else dataclasses.replace(whisper, recipient=held))
        if name_key(held) != self._seat.key:
            self.push(echo)
        if sent_key:
            registry.remember_whisper(sent_key, echo)

    def _sent_key(self, room: _Local[T], client_id: str) -> str:
        """What names a line this member sent under `client_id` in this room, for any server; empty without an id."""
        return f"{room.record.uid}\0{self._seat.key}\0{check_client_id(client_id)}" if client_id else ""

    async def leave(self, reason: LeaveReason = LeaveReason.LEFT) -> None:
        room = self._room
        if room is None:
            return
        self.close()
        if room.members.get(self._seat.key) is self:
            del room.members[self._seat.key]
        log.debug("%s left room %s (%s)", self.name, room.record.name, reason.name.lower())
        await self._registry.vacate(room, self._seat, reason)

    def report(self, error: ChatError, client_id: str = "") -> None:
        self.push(self._registry.encode(Problem(error, client_id)))

    async def deliver(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        # Writes in flight are capped server-wide: the transport completes operations in order, so a flood of
        # writes would hold back reading the room's next requests. Capped, reading keeps up, and what arrives
        # while a member waits for a slot joins its batch (bench/README.md has the measurements).
        # A member waiting for events is put in line for a slot by the first one, so that it wakes once per write,
        # holding a slot, rather than once for the event and again for the slot.
        slots = self._registry.slots
        stats = self._registry.stats
        loop = asyncio.get_running_loop()
        while True:
            if self._queue or self._backlog:
                lease = await slots.acquire()
            elif self._room is None:
                return
            else:
                turn = loop.create_future()
                self._waiter = turn
                try:
                    granted = await turn
                except asyncio.CancelledError:
                    # A slot given to a stream that ended before it could write goes back to the others.
                    if turn.done() and not turn.cancelled() and turn.result():
                        slots.give_back()
                    raise
                finally:
                    self._waiter = None
                    self._in_line = False
                if not granted:
                    continue
                lease = slots.lease()
            try:
                batch = self._take() if self._queue or self._backlog else None
                if batch:
                    stats.wrote(len(batch), len(self._queue))
                    await write(batch)
                # Not kept while the member waits again: an idle member would hold its last batch (its Joined, with the
                # room's member list, or the joins announced to it) for as long as it stays.
                del batch
            finally:
                lease.release()

    def _take(self) -> list[T]:
        limit = self._registry.batch_limit
        queue = self._queue
        if self._backlog is not None:
            batch, rest = self._backlog[:limit], self._backlog[limit:]
            self._backlog = rest or None
            limit -= len(batch)
            batch += queue[:limit]
            del queue[:limit]
            if not queue:
                self._presence = 0
        elif len(queue) <= limit:
            self._queue = []
            self._presence = 0
            batch = queue
        else:
            batch = queue[:limit]
            del queue[:limit]
        if self._stale:
            self._list_members(batch)
        return batch

    def _list_members(self, batch: list[T]) -> None:
        """Put the room's member list, as it is now, where the batch holds its placeholder (if this batch does)."""
        for index, item in enumerate(batch):
            if item is _MEMBER_LIST:
                room = self._room
                if room is None:
                    # The membership has ended; its last event (left, or the room closed) says more than a list.
                    del batch[index]
                else:
                    batch[index] = self._registry.member_list(room)
                # Every join and leave before the placeholder has been taken with it: the count starts again.
                self._stale = False
                self._presence = 0
                return

    def _full(self) -> bool:
        """Whether the queue holds the bound's worth of events besides joins and leaves."""
        return len(self._queue) - self._presence >= self._registry.queue_limit

    def push(self, item: T) -> None:
        """Queue one encoded event for this member alone; a full queue evicts it."""
        if self._room is None:
            # The stream's last event (RoomClosed) is already queued; nothing may follow it.
            return
        if len(self._queue) >= self._registry.queue_limit and self._full():
            self._registry.evict(self)
            return
        self._queue.append(item)
        self.wake()

    def end_with(self, item: T) -> None:
        """Queue a room's last event past the bound and end the membership after it."""
        self._queue.append(item)
        self.close()

    def close(self) -> None:
        """End the membership: `deliver` writes what is still queued, then returns."""
        self._room = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Woken without a slot: whatever is still queued waits for one as any write does.
            waiter.set_result(False)

    def drop(self, error: ChatError) -> None:
        """End the membership at once, discarding what is queued, and tell its stream why through `dropped`."""
        self._queue.clear()
        self._backlog = None
        self.close()
        if not self._dropped.done():
            self._dropped.set_result(error)

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not self._in_line and not waiter.done():
            self._in_line = True
            self._registry.slots.line_up(waiter)

    def _joined_room(self) -> _Local[T]:
        if self._room is None:
            raise ChatError(ErrorKind.NOT_JOINED, "you are not in a room")
        return self._room


class RoomRegistry(Generic[T]):
    """The registry of one server process over a store: the rooms are the store's, delivery to members is here."""

    def __init__(
        self,
        store: Store,
        encode: Callable[[Event], T],
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        batch_limit: int = DEFAULT_BATCH_LIMIT,
        write_slots: int = DEFAULT_WRITE_SLOTS,
        resume_grace: float = DEFAULT_RESUME_GRACE_SECONDS,
        stats: Stats | None = None,
    ) -> None:
        self.store = store
        self.encode = encode
        self.stats = stats if stats is not None else Stats()
        # Caps hit by a flood of requests: one line per cap and interval says so without following the flood.
        self._limit_log = ThrottledLog(log)
        self.queue_limit = queue_limit
        self.batch_limit = batch_limit
        self.slots = WriteSlots(write_slots)
        self.resume_grace = resume_grace
        # The rooms this process follows, by uid: a newer room of the same name is another room.
        self._local: dict[str, _Local[T]] = {}
        # Seats of members dropped as too slow, to free and announce: dropping happens while a message is fanned
        # out, which cannot wait for the store.
        self.departing: deque[tuple[_Local[T], Seat]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        # Departures and releases started where nothing could await them: kept, so that none is collected unfinished.
        self._tasks: set[asyncio.Task[None]] = set()
        # What each whisper's client id produced, by room uid, name key and client id (lines are the store's to dedup).
        self.whispers_sent: dict[str, T] = {}
        # Whether the store is away now: its members were told when it went, and are not told again until it is back.
        self._store_away = False

    async def list_rooms(self) -> list[RoomInfo]:
        return await self.store.list_rooms()

    async def create_room(self, room: str) -> RoomInfo:
        record = await self._create(check_name(room, "room"))
        log.info("New room %s created", record.name, extra={"room": record.name})
        return RoomInfo(record.name, 0, 0)

    async def kill_room(self, room: str) -> int:
        found = await self.store.find_room(room)
        if found is None:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room!r} does not exist")
        ejected = len(await self.store.members(found))
        record = await self.store.close_room(room, CloseReason.KILLED)
        log.info(
            "Room %s killed, %d members ejected", record.name, ejected, extra={"room": record.name, "reason": "killed"}
        )
        return ejected

    async def prune_rooms(self) -> list[str]:
        pruned = await self.store.prune_rooms()
        for name in pruned:
            log.info("Room %s pruned: nobody was in it", name, extra={"room": name, "reason": "pruned"})
        if pruned:
            log.info("%d empty rooms pruned", len(pruned))
        return pruned

    async def join(
        self, room: str, name: str, *, create: bool = False, history: int = 0, resume: Resume | None = None
    ) -> Member[T]:
        room = check_name(room, "room")
        if name or resume is not None:
            name = check_name(name, "member")
        created = create and resume is None
        record = await self._create(room) if created else await self._find(room, resume)
        local = self._local.get(record.uid)
        if local is None:
            local = self._local[record.uid] = _Local(self, record)
        local.users += 1
        try:
            seat = await self._claim(record, name, resume, created)
            if created:
                log.info("New room %s created", record.name, extra={"room": record.name})
            try:
                member = await self._admit(local, seat, history, resume, created)
            except BaseException:
                await self.store.vacate(record, seat, 0)
                raise
        finally:
            local.users -= 1
            await self._release(local)
        log.debug("%s joined room %s", seat.name, record.name)
        if not seat.took_over:
            # Announced when the signal comes back, as members on other processes hear it.
            with contextlib.suppress(ChatError):
                await self.store.signal(record, MemberJoined(seat.name, returned=resume is not None))
        return member

    async def _create(self, room: str) -> RoomRecord:
        try:
            return await self.store.create_room(room)
        except ChatError as error:
            if error.kind is ErrorKind.ROOM_LIMIT:
                self._refused("max_rooms", "Refused to create room %s: %s (--max-rooms)", room, error, room=room)
            raise

    async def _find(self, room: str, resume: Resume | None) -> RoomRecord:
        record = await self.store.find_room(room)
        if resume is None:
            if record is None:
                raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room!r} does not exist")
        elif record is None or not resume.token.startswith(f"{record.uid}."):
            raise ChatError(
                ErrorKind.ROOM_NOT_FOUND,
                f"room {room!r} no longer exists (it was closed, or the server restarted)",
            )
        return record

    async def _claim(self, record: RoomRecord, name: str, resume: Resume | None, created: bool) -> Seat:
        try:
            return await self._claim_seat(record, name, resume)
        except ChatError as error:
            if error.kind is ErrorKind.MEMBER_LIMIT:
                self._refused(
                    "max_members",
                    "Refused %s in room %s: %s (--max-members)",
                    name or DEFAULT_NAME,
                    record.name,
                    error,
                    room=record.name,
                    member=name,
                )
                if created:
                    # Made for this member alone, who cannot enter: left open it would hold a room for nobody.
                    with contextlib.suppress(ChatError):
                        await self.store.close_room(record.name, CloseReason.KILLED)
            raise

    async def _claim_seat(self, record: RoomRecord, name: str, resume: Resume | None) -> Seat:
        def token_for(key: str) -> str:
            return tokens.issue(record, key)

        if resume is None:
            return await self.store.claim(record, name, token_for)
        if tokens.proves(resume.token, record, name_key(name)):
            seat = await self.store.claim(record, name, token_for, resume.token)
            log.debug("%s resumed in room %s after message %d", name, record.name, resume.last_seq)
            return seat
        # Not a token for this name: if someone holds the name it is theirs (NAME_TAKEN); if nobody does, a token
        # for another name would announce this member as back without its ever having been here.
        probe = await self.store.claim(record, name, token_for)
        await self.store.vacate(record, probe, 0)
        raise ChatError(
            ErrorKind.BAD_REQUEST,
            f"this resume token was not issued for the name {name!r} in room {record.name!r}; join "
            "without resuming to enter under that name",
        )

    async def _admit(
        self, local: _Local[T], seat: Seat, history: int, resume: Resume | None, created: bool
    ) -> Member[T]:
        """Follow the room if this process does not yet, read the member's backlog, and install the member."""
        if not local.following:
            async with local.lock:
                if not local.following and not local.closed:
                    await self._follow(local)
        replay, lost = await self._backlog(local, history, resume)
        # From here to the member's install nothing awaits: its backlog ends at local.last_seq, and what the room
        # logs next reaches it live.
        if local.closed or not local.following:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {local.record.name!r} was closed")
        previous = local.members.get(seat.key)
        if previous is not None:
            # The store's Takeover signal has not come yet: the member it stands for goes now.
            self._resumed_elsewhere(local, previous)
        local.roster[seat.key] = seat.name
        local.member_list = None
        names = tuple(sorted(local.roster.values()))
        joined = Joined(
            local.record.name,
            seat.name,
            names,
            local.last_seq,
            created,
            resume is not None,
            seat.token,
            len(replay),
            lost,
        )
        encode = self.encode
        member = Member(self, local, seat, [encode(joined), *map(encode, replay)])
        local.members[seat.key] = member
        return member

    async def _follow(self, local: _Local[T]) -> None:
        """Start hearing the room, and read its roster."""
        local.last_seq = await self.store.follow(local.record, local)
        try:
            await self._read_roster(local)
        except BaseException:
            with contextlib.suppress(ChatError):
                await self.store.unfollow(local.record)
            raise
        local.following = True

    async def _read_roster(self, local: _Local[T]) -> None:
        """Read a followed room's live members from the store: presence heard while it is read is newer, and wins."""
        local.seeding = {}
        try:
            roster = {name_key(name): name for name in await self.store.members(local.record)}
            for key, name in local.seeding.items():
                if name is None:
                    roster.pop(key, None)
                else:
                    roster[key] = name
        finally:
            local.seeding = None
        # Whatever the store says, the members here are in.
        roster.update((key, member.name) for key, member in local.members.items())
        local.roster = roster
        local.member_list = None

    async def _backlog(self, local: _Local[T], history: int, resume: Resume | None) -> tuple[list[Message], int]:
        """The messages a joining member is sent first, ending at the last seq this process has sent live, and how
        many of those it asked for are no longer kept."""
        if resume is None and history <= 0:
            return [], 0
        record = local.record
        read = (
            await self.store.read(record, after=resume.last_seq)
            if resume is not None
            else await self.store.read(record, last=history)
        )
        messages, lost, covered = read.messages, read.lost, read.last_seq
        # A store shared between processes logs ahead of what this process has heard: wait until the follower has
        # heard what was read, then read on to where it is; the two meet, with no gap and no message twice.
        await local.reach(covered)
        for _ in range(MAX_BACKLOG_READS):
            if covered >= local.last_seq or local.closed:
                break
            more = await self.store.read(record, after=covered)
            messages = [*messages, *more.messages]
            lost += more.lost
            covered = more.last_seq
            await local.reach(covered)
        else:
            raise ChatError(
                ErrorKind.JOIN_TIMEOUT,
                f"room {record.name!r} is too busy to join right now; try again",
            )
        return (messages if resume is not None else messages[-history:]), lost

    async def vacate(self, local: _Local[T], seat: Seat, reason: LeaveReason) -> None:
        """Give up the seat of a member that left, and tell the room; a lost connection keeps it for the grace."""
        grace = self.resume_grace if reason is LeaveReason.DISCONNECTED else 0.0
        try:
            await self.store.vacate(local.record, seat, grace)
            await self.store.signal(local.record, MemberLeft(seat.name, reason))
        except ChatError as error:
            if error.kind is not ErrorKind.ROOM_NOT_FOUND:
                raise
        finally:
            await self._release(local)

    async def _release(self, local: _Local[T]) -> None:
        """Stop following a room this process no longer has members in, nor joins under way."""
        if local.members or local.users:
            return
        if local.following:
            async with local.lock:
                if local.members or local.users or not local.following:
                    return
                local.following = False
                await self.store.unfollow(local.record)
            if local.members or local.users:
                return
        if self._local.get(local.record.uid) is local:
            del self._local[local.record.uid]

    async def shutdown(self) -> None:
        if self.store.shared:
            await self._hand_over()
        await self.store.close()
        for local in list(self._local.values()):
            self.close_local(local, RoomClosed(local.record.name, CloseReason.SERVER_SHUTDOWN))
        await self.flush_departures()

    async def _hand_over(self) -> None:
        """End every stream here so that its client resumes, here after a restart or on another server: the rooms
        live on in the shared store, and each name is held for the resume grace, as after a lost connection."""
        restarting = ChatError(ErrorKind.SERVER_RESTARTING, "the server is restarting; reconnect to resume")
        leaving: list[tuple[_Local[T], Seat]] = []
        for local in list(self._local.values()):
            members = list(local.members.values())
            local.members.clear()
            for member in members:
                member.drop(restarting)
                leaving.append((local, member._seat))
        if self.store.available:
            await asyncio.gather(*(self._vacate_quietly(local, seat) for local, seat in leaving))

    async def _vacate_quietly(self, local: _Local[T], seat: Seat) -> None:
        try:
            await self.vacate(local, seat, LeaveReason.DISCONNECTED)
        except ChatError as error:
            # The name frees itself once this process's heartbeat stops: only sooner than the grace.
            log.debug("%s was not held for a resume in room %s: %s", seat.name, local.record.name, error.message)

    def store_changed(self, available: bool) -> None:
        """The store went away or came back: every member here is told once when it goes, as its lines fail; the
        rosters are read again when it is back, as joins and leaves elsewhere meanwhile were not heard."""
        if available or self._store_away:
            if available and self._store_away:
                self._spawn(self._reread_rosters())
            self._store_away = not available
            return
        self._store_away = True
        told = self.encode(Problem(ChatError(ErrorKind.STORE_UNAVAILABLE, STORE_AWAY)))
        for local in list(self._local.values()):
            for member in list(local.members.values()):
                member.push(told)

    async def _reread_rosters(self) -> None:
        for local in list(self._local.values()):
            for attempt in range(ROSTER_READS):
                try:
                    await self._read_roster(local)
                    break
                except ChatError as error:
                    log.debug("The members of room %s were not read again: %s", local.record.name, error.message)
                    if error.kind is not ErrorKind.STORE_UNAVAILABLE:
                        break
                    # NATS answers a moment before its JetStream does.
                    await asyncio.sleep(attempt + 1)

    def fan_out(self, room: _Local[T], event: Message) -> None:
        """Encode `event` once and queue it for every member of `room` here, in the same order for all."""
        item = self.encode(event)
        limit = self.queue_limit
        slow: list[Member[T]] = []
        for member in room.members.values():
            queue = member._queue
            if queue:
                # `deliver` waits only on an empty queue, so the event that made this one non-empty woke it: in a
                # burst most members have events queued, and skipping their wake is most of this loop's saving.
                if len(queue) >= limit and member._full():
                    slow.append(member)
                    continue
                queue.append(item)
            else:
                queue.append(item)
                member.wake()
        if slow:
            self._evict_all(room, slow)

    def announce(self, room: _Local[T], event: MemberJoined | MemberLeft, skip: Member[T] | None = None) -> None:
        """Queue a join or leave for every member of `room` but `skip`; one with a run of them queued gets the
        member list."""
        item = self.encode(event)
        room.member_list = None
        placeholder = cast(T, _MEMBER_LIST)
        for member in room.members.values():
            if member._stale or member is skip:
                continue
            if member._presence >= PRESENCE_RUN:
                member._stale = True
                member._queue.append(placeholder)
            else:
                member._queue.append(item)
            member._presence += 1
            member.wake()

    def member_list(self, room: _Local[T]) -> T:
        """The room's members now, encoded once for every member that is sent the list."""
        if room.member_list is None:
            room.member_list = self.encode(Members(tuple(sorted(room.roster.values()))))
        return room.member_list

    def close_local(self, local: _Local[T], closed: RoomClosed) -> None:
        """End every membership here in a room that closed, with RoomClosed last, and forget the room."""
        local.closed = True
        local.following = False
        item = self.encode(closed)
        members = list(local.members.values())
        local.members.clear()
        for member in members:
            member.end_with(item)
        if local.waiters is not None:
            local._wake()
        if self._local.get(local.record.uid) is local:
            del self._local[local.record.uid]

    def taken_over(self, local: _Local[T], takeover: Takeover) -> None:
        """A resume claimed the seat with `takeover.key`: a member here holding it under another claim stops."""
        member = local.members.get(takeover.key)
        if member is not None and member._seat.claim != takeover.claim:
            self._resumed_elsewhere(local, member)
            if not local.members and not local.users:
                self._spawn(self._release(local))

    def _resumed_elsewhere(self, local: _Local[T], member: Member[T]) -> None:
        # The old stream is most likely dead but not yet noticed; the room need not hear of the swap.
        del local.members[member._seat.key]
        member.drop(ChatError(ErrorKind.RESUMED_ELSEWHERE, "this membership was resumed on another connection"))
        self.stats.evicted["resumed_elsewhere"] += 1

    def remember_whisper(self, key: str, item: T) -> None:
        """Keep what a whisper's client id produced, so that a re-send gets it back instead of a second whisper."""
        sent = self.whispers_sent
        sent[key] = item
        if len(sent) > WHISPER_IDS_KEPT:
            del sent[next(iter(sent))]

    def evict(self, member: Member[T]) -> None:
        """Drop a member whose queue is full, so the rest of its room is never held up by it."""
        room = member._room
        if room is not None:
            self._evict_all(room, [member])

    def _evict_all(self, room: _Local[T], slow: list[Member[T]]) -> None:
        # Everyone full is dropped before any is announced, so that a room of stalled members is not told of each
        # other's going: only those who stay hear of it.
        for member in slow:
            if self._drop(room, member):
                self.departing.append((room, member._seat))
        if self.departing and self._flusher is None:
            self._flusher = self._spawn(self.flush_departures())

    async def flush_departures(self) -> None:
        """Free the seats of members dropped as too slow and announce their going, in the order they were dropped."""
        departing = self.departing
        try:
            while departing:
                local, seat = departing.popleft()
                await self.vacate(local, seat, LeaveReason.TOO_SLOW)
        finally:
            self._flusher = None

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _drop(self, room: _Local[T], member: Member[T]) -> bool:
        """Take a too-slow member out of its room and tell its stream why; False if it had already gone."""
        if member._room is None:
            return False
        if room.members.get(member._seat.key) is member:
            del room.members[member._seat.key]
        member.drop(
            ChatError(
                ErrorKind.TOO_SLOW,
                f"you were disconnected from room {room.record.name!r}: more than {self.queue_limit} events "
                "were waiting for you to read them",
            )
        )
        self.stats.evicted["too_slow"] += 1
        log.info(
            "%s dropped from room %s for reading too slowly",
            member.name,
            room.record.name,
            extra={"room": room.record.name, "member": member.name, "reason": "too_slow"},
        )
        return True

    def _refused(self, limit: str, message: str, *args: object, room: str, member: str = "") -> None:
        """Count a request refused by one of the store's caps, and log it unless that cap was logged lately."""
        self.stats.refused[limit] += 1
        self._limit_log.info(limit, message, *args, extra={"limit": limit, "room": room, "member": member})
