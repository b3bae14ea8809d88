"""The in-memory room registry: rooms, members and fan-out. Plain asyncio; it knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import base64
import heapq
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast

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
from chat_service.history import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES, History, HistoryBudget, unsized
from chat_service.registry import DEFAULT_NAME
from chat_service.stats import Stats
from chat_service.throttled_log import ThrottledLog
from chat_service.validation import check_client_id, check_name, check_text, name_key

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_QUEUE_LIMIT = 1024
DEFAULT_BATCH_LIMIT = 256
DEFAULT_WRITE_SLOTS = 16
DEFAULT_SLOT_HOLD_SECONDS = 0.1
DEFAULT_RESUME_GRACE_SECONDS = 30.0
# Rooms stay until killed, about 1.4 KiB each when empty: a cap keeps a script from filling the server's memory.
DEFAULT_MAX_ROOMS = 10_000
# Names held server-wide, by members (an idle one costs about 30 KiB) and for resumes.
DEFAULT_MAX_MEMBERS = 50_000
# How many of a member's recent client ids are remembered to recognise a re-sent line.
SENT_IDS_KEPT = 256
# Joins and leaves queued for one member before the rest of a run of them becomes one member list. A crowd of N
# leaving at once would otherwise queue N events for each of the others, and overflow prompt readers' queues.
PRESENCE_RUN = 8
# Stands in a member's queue for the room's member list, made when it is written so that it is current then.
_MEMBER_LIST = object()


class WriteSlots:
    """A FIFO pool of slots, one leased by each stream while its write is in flight."""

    __slots__ = ("_free", "_leases", "_sweeping", "_waiting", "hold_limit")

    def __init__(self, size: int, hold_limit: float = DEFAULT_SLOT_HOLD_SECONDS) -> None:
        self._free = size
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._leases: deque[Lease] = deque()
        self._sweeping = False
        self.hold_limit = hold_limit

    async def acquire(self) -> Lease:
        """Lease a slot, waiting in line when none is free."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return self._lease()
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()
            raise
        return self._lease()

    def _lease(self) -> Lease:
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

    def _release(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
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
            self._slots._release()


class _Room(Generic[T]):
    __slots__ = ("free_numbers", "history", "member_list", "members", "name", "next_number", "seats", "secret", "uid")

    def __init__(self, name: str, history: History[T]) -> None:
        self.name = name
        # Tokens carry the uid, so that a resume cannot land in a newer room that took the same name.
        self.uid = secrets.token_hex(6)
        self.secret = secrets.token_bytes(16)
        # Both keyed by name_key(name): names that could be taken for each other on screen are one name.
        self.members: dict[str, Member[T]] = {}
        self.seats: dict[str, _Seat[T]] = {}
        self.history = history
        # The encoded member list, made once per change of members however many members are sent it.
        self.member_list: T | None = None
        # Default names are numbered: the lowest number given back is reused first, from a heap, else the next new.
        self.free_numbers: list[int] | None = None
        self.next_number = 1

    def info(self) -> RoomInfo:
        return RoomInfo(self.name, len(self.members), self.history.last_seq)


class _Seat(Generic[T]):
    """A name held in a room across reconnects: by a live member, or reserved for a while after its stream broke."""

    __slots__ = ("expiry", "key", "member", "name", "number", "sent", "token")

    def __init__(self, room: _Room[T], name: str, number: int = 0) -> None:
        self.name = name
        self.key = name_key(name)
        # The default name's number, given back when the seat goes; 0 for a name the member chose.
        self.number = number
        self.token = _issue_token(room, self.key, secrets.token_urlsafe(12))
        self.member: Member[T] | None = None
        self.expiry: asyncio.TimerHandle | None = None
        # Made on the first client id: most members of a busy server are idle, and every byte counts there.
        self.sent: dict[str, T] | None = None

    def remember(self, client_id: str, item: T) -> None:
        """Keep what a client id produced, so that a re-send gets it back instead of a second broadcast."""
        if self.sent is None:
            self.sent = {}
        sent = self.sent
        sent[client_id] = item
        if len(sent) > SENT_IDS_KEPT:
            del sent[next(iter(sent))]

    def recall(self, client_id: str) -> T | None:
        """What `client_id` produced, if it was used and is still remembered."""
        return self.sent.get(client_id) if self.sent is not None else None

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None


class Member(Generic[T]):
    """A membership of the in-memory registry; every method runs to completion without yielding."""

    __slots__ = ("_backlog", "_dropped", "_presence", "_queue", "_registry", "_room", "_seat", "_stale", "_waiter")

    def __init__(self, registry: MemoryRegistry[T], room: _Room[T], seat: _Seat[T], backlog: list[T]) -> None:
        self._registry = registry
        self._room: _Room[T] | None = room
        self._seat = seat
        # The join's answer and its history, written before anything live and not counted against the bound.
        self._backlog: list[T] | None = backlog
        self._queue: deque[T] = deque()
        # Joins and leaves queued since the queue was last empty; past PRESENCE_RUN, `_stale` holds a member list
        # in the queue instead. They never count against the bound: a crowd coming or going never evicts anyone.
        self._presence = 0
        self._stale = False
        self._waiter: asyncio.Future[None] | None = None
        self._dropped: asyncio.Future[ChatError] = asyncio.get_running_loop().create_future()

    @property
    def room(self) -> str:
        return self._room.name if self._room is not None else ""

    @property
    def name(self) -> str:
        return self._seat.name

    @property
    def dropped(self) -> asyncio.Future[ChatError]:
        return self._dropped

    async def say(self, text: str, client_id: str = "", *, action: bool = False) -> None:
        room = self._joined_room()
        check_text(text)
        if client_id and self._resent(check_client_id(client_id)):
            return
        seq = room.history.last_seq + 1
        self._registry.stats.received["say"] += 1
        item = self._registry.fan_out(room, Message(seq, self.name, text, time.time_ns(), client_id, action))
        room.history.append(seq, item)
        if client_id:
            self._seat.remember(client_id, item)

    async def whisper(self, recipient: str, text: str, client_id: str = "") -> None:
        room = self._joined_room()
        check_text(text)
        if client_id and self._resent(check_client_id(client_id)):
            return
        key = name_key(recipient)
        target = room.members.get(key)
        if target is None:
            away = key in room.seats
            raise ChatError(
                ErrorKind.MEMBER_NOT_FOUND,
                f"{recipient} lost their connection and may be back shortly; try again later"
                if away
                else f"nobody named {recipient!r} is in room {room.name!r}",
            )
        self._registry.stats.received["whisper"] += 1
        item = self._registry.encode(Whisper(self.name, target.name, text, time.time_ns(), client_id))
        target.push(item)
        if target is not self:
            self.push(item)
        if client_id:
            self._seat.remember(client_id, item)

    async def leave(self, reason: LeaveReason = LeaveReason.LEFT) -> None:
        room = self._room
        if room is None:
            return
        self.close()
        del room.members[self._seat.key]
        self._registry.vacate(room, self._seat, reason)
        log.debug("%s left room %s (%s)", self.name, room.name, reason.name.lower())
        self._registry.announce(room, MemberLeft(self.name, reason))

    def report(self, error: ChatError, client_id: str = "") -> None:
        self.push(self._registry.encode(Problem(error, client_id)))

    async def deliver(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        # Writes in flight are capped server-wide: the transport completes operations in order, so a flood of
        # writes would hold back reading the room's next requests. Capped, reading keeps up, and what arrives
        # while a member waits for a slot joins its batch (bench/README.md has the measurements).
        slots = self._registry.slots
        stats = self._registry.stats
        while True:
            while not self._queue and not self._backlog:
                if self._room is None:
                    return
                waiter = asyncio.get_running_loop().create_future()
                self._waiter = waiter
                try:
                    await waiter
                finally:
                    self._waiter = None
            lease = await slots.acquire()
            try:
                batch = self._take() if self._queue or self._backlog else None
                if batch:
                    stats.wrote(len(batch), len(self._queue))
                    await write(batch)
            finally:
                lease.release()

    def _take(self) -> list[T]:
        limit = self._registry.batch_limit
        queue = self._queue
        if self._backlog is not None:
            batch, rest = self._backlog[:limit], self._backlog[limit:]
            self._backlog = rest or None
            limit -= len(batch)
            batch.extend(queue.popleft() for _ in range(min(limit, len(queue))))
            if not queue:
                self._presence = 0
        elif len(queue) <= limit:
            self._queue = deque()
            self._presence = 0
            batch = list(queue)
        else:
            batch = [queue.popleft() for _ in range(limit)]
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

    def _resent(self, client_id: str) -> bool:
        """Give a re-sent line's original event back to this member alone; False if the id is new."""
        sent = self._seat.recall(client_id)
        if sent is None:
            return False
        self.push(sent)
        return True

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
        self.wake()

    def drop(self, error: ChatError) -> None:
        """End the membership at once, discarding what is queued, and tell its stream why through `dropped`."""
        self._queue.clear()
        self._backlog = None
        self.close()
        if not self._dropped.done():
            self._dropped.set_result(error)

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _joined_room(self) -> _Room[T]:
        if self._room is None:
            raise ChatError(ErrorKind.NOT_JOINED, "you are not in a room")
        return self._room


class MemoryRegistry(Generic[T]):
    """Rooms held in this process; one event loop owns every structure here."""

    def __init__(
        self,
        encode: Callable[[Event], T],
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        batch_limit: int = DEFAULT_BATCH_LIMIT,
        write_slots: int = DEFAULT_WRITE_SLOTS,
        history_limit: int = DEFAULT_HISTORY,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        size: Callable[[T], int] = unsized,
        resume_grace: float = DEFAULT_RESUME_GRACE_SECONDS,
        max_rooms: int = DEFAULT_MAX_ROOMS,
        max_members: int = DEFAULT_MAX_MEMBERS,
        empty_room_ttl: float | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.encode = encode
        self.stats = stats if stats is not None else Stats()
        # Caps hit by a flood of requests: one line per cap and interval says so without following the flood.
        self._limit_log = ThrottledLog(log)
        self.queue_limit = queue_limit
        self.batch_limit = batch_limit
        self.slots = WriteSlots(write_slots)
        self.history_limit = history_limit
        self.history_budget = HistoryBudget(history_bytes, size)
        self.resume_grace = resume_grace
        self.max_rooms = max_rooms
        self.max_members = max_members
        # Names held server-wide, by members and for resumes: what --max-members caps.
        self.seated = 0
        self._rooms: dict[str, _Room[T]] = {}
        self._closed = False
        self.empty_room_ttl = empty_room_ttl
        # When the sweep first saw each room empty; a join forgets it, so a room closes only after a whole TTL empty.
        self._empty_since: dict[_Room[T], float] = {}
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def room_count(self) -> int:
        """Rooms open now; one len(), so another thread may read it."""
        return len(self._rooms)

    async def list_rooms(self) -> list[RoomInfo]:
        return [room.info() for room in sorted(self._rooms.values(), key=lambda room: room.name)]

    async def create_room(self, room: str) -> RoomInfo:
        return self._create(room).info()

    async def kill_room(self, room: str) -> int:
        found = self._rooms.pop(name_key(room), None)
        if found is None:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room!r} does not exist")
        ejected = self._close(found, CloseReason.KILLED)
        log.info(
            "Room %s killed, %d members ejected", found.name, ejected, extra={"room": found.name, "reason": "killed"}
        )
        return ejected

    async def prune_rooms(self) -> list[str]:
        empty = [(key, room) for key, room in self._rooms.items() if _empty(room)]
        for key, room in empty:
            del self._rooms[key]
            self._close(room, CloseReason.KILLED)
            log.info("Room %s pruned: nobody was in it", room.name, extra={"room": room.name, "reason": "pruned"})
        if empty:
            log.info("%d empty rooms pruned", len(empty))
        return sorted(room.name for _, room in empty)

    def _sweep_empty(self) -> None:
        """Close the rooms the sweep has seen empty for the TTL, and come back in a quarter of it."""
        ttl = self.empty_room_ttl
        assert ttl is not None
        now = asyncio.get_running_loop().time()
        seen, self._empty_since = self._empty_since, {}
        for key, room in list(self._rooms.items()):
            if not _empty(room):
                continue
            since = seen.get(room, now)
            if now - since < ttl:
                self._empty_since[room] = since
                continue
            del self._rooms[key]
            self._close(room, CloseReason.KILLED)
            log.info(
                "Room %s closed: nobody was in it for %g s",
                room.name,
                ttl,
                extra={"room": room.name, "reason": "expired"},
            )
        self._sweep = None
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self.empty_room_ttl is not None and self._sweep is None and self._rooms and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(self.empty_room_ttl / 4, self._sweep_empty)

    async def join(
        self, room: str, name: str, *, create: bool = False, history: int = 0, resume: Resume | None = None
    ) -> Member[T]:
        room = check_name(room, "room")
        if name or resume is not None:
            name = check_name(name, "member")
        if resume is not None:
            return self._resume(room, name, resume)
        self._check_member_limit(room, name)
        target = self._create(room) if create else self._rooms.get(name_key(room))
        if target is None:
            raise ChatError(
                ErrorKind.ROOM_NOT_FOUND,
                f"room {room!r} does not exist",
            )
        if name and name_key(name) in target.seats:
            raise ChatError(ErrorKind.NAME_TAKEN, _taken(target, name))
        seat = self._seat(target, name) if name else self._seat(target, *_free_default(target))
        return self._admit(target, seat, target.history.last(history), lost=0, created=create, resumed=False)

    def _resume(self, room: str, name: str, resume: Resume) -> Member[T]:
        target = self._rooms.get(name_key(room))
        if target is None or not resume.token.startswith(f"{target.uid}."):
            raise ChatError(
                ErrorKind.ROOM_NOT_FOUND,
                f"room {room!r} no longer exists (it was closed, or the server restarted)",
            )
        key = name_key(name)
        seat = target.seats.get(key)
        if seat is None:
            # The grace period ran out, but the name is free: come back under it, with whatever history holds, if
            # the token was given out for it; any other name would be announced as back without ever having been.
            if not _proves(resume.token, target, key):
                raise ChatError(
                    ErrorKind.BAD_REQUEST,
                    f"this resume token was not issued for the name {name!r} in room {target.name!r}; join "
                    "without resuming to enter under that name",
                )
            self._check_member_limit(target.name, name)
            seat = self._seat(target, name)
        elif not _same_token(seat.token, resume.token):
            raise ChatError(ErrorKind.NAME_TAKEN, _taken(target, name))
        seat.cancel_expiry()
        replay, lost = target.history.after(resume.last_seq)
        previous = seat.member
        if previous is not None:
            # The old stream is most likely dead but not yet noticed; the room need not hear of the swap.
            previous.drop(ChatError(ErrorKind.RESUMED_ELSEWHERE, "this membership was resumed on another connection"))
            self.stats.evicted["resumed_elsewhere"] += 1
            del target.members[key]
        log.debug("%s resumed in room %s after message %d", name, room, resume.last_seq)
        return self._admit(target, seat, replay, lost=lost, created=False, resumed=True, swap=previous is not None)

    def _admit(
        self,
        room: _Room[T],
        seat: _Seat[T],
        replay: list[T],
        *,
        lost: int,
        created: bool,
        resumed: bool,
        swap: bool = False,
    ) -> Member[T]:
        """Seat a new member: its Joined event and `replay` first, then the room hears of it, unless it only swapped
        streams; a resumed member is announced as returned."""
        self._empty_since.pop(room, None)
        members = tuple(sorted([*(member.name for member in room.members.values()), seat.name]))
        joined = Joined(
            room.name, seat.name, members, room.history.last_seq, created, resumed, seat.token, len(replay), lost
        )
        member = Member(self, room, seat, [self.encode(joined), *replay])
        if not swap:
            self.announce(room, MemberJoined(seat.name, returned=resumed))
        room.members[seat.key] = seat.member = member
        log.debug("%s joined room %s", seat.name, room.name)
        return member

    def vacate(self, room: _Room[T], seat: _Seat[T], reason: LeaveReason) -> None:
        """Give up the seat of a member that left; a lost connection keeps it reserved for the grace period."""
        seat.member = None
        if reason is LeaveReason.DISCONNECTED and self.resume_grace > 0:
            seat.expiry = asyncio.get_running_loop().call_later(self.resume_grace, self._expire, room, seat)
        else:
            self._unseat(room, seat)

    def _expire(self, room: _Room[T], seat: _Seat[T]) -> None:
        seat.expiry = None
        if seat.member is None:
            self._unseat(room, seat)

    def _seat(self, room: _Room[T], name: str, number: int = 0) -> _Seat[T]:
        seat = _Seat(room, name, number)
        room.seats[seat.key] = seat
        self.seated += 1
        return seat

    def _unseat(self, room: _Room[T], seat: _Seat[T]) -> None:
        seat.cancel_expiry()
        if room.seats.get(seat.key) is seat:
            del room.seats[seat.key]
            self.seated -= 1
            if seat.number:
                if room.free_numbers is None:
                    room.free_numbers = []
                heapq.heappush(room.free_numbers, seat.number)

    def _check_member_limit(self, room: str, name: str) -> None:
        if self.seated >= self.max_members:
            self._refused(
                "max_members",
                "Refused %s in room %s: the server holds its limit of %d names (--max-members)",
                name or DEFAULT_NAME,
                room,
                self.max_members,
                room=room,
                member=name,
            )
            raise ChatError(
                ErrorKind.MEMBER_LIMIT,
                f"the server has reached its limit of members ({self.max_members}); try again later",
            )

    async def shutdown(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        rooms, self._rooms = self._rooms, {}
        for room in rooms.values():
            self._close(room, CloseReason.SERVER_SHUTDOWN)

    def fan_out(self, room: _Room[T], event: Event) -> T:
        """Encode `event` once, queue it for every member of `room` in the same order for all, and return it."""
        item = self.encode(event)
        limit = self.queue_limit
        slow: list[Member[T]] = []
        for member in room.members.values():
            queue = member._queue
            if len(queue) >= limit and member._full():
                slow.append(member)
                continue
            queue.append(item)
            member.wake()
        if slow:
            self._evict_all(room, slow)
        return item

    def announce(self, room: _Room[T], event: MemberJoined | MemberLeft) -> None:
        """Queue a join or leave for every member of `room`; one with a run of them queued gets the member list."""
        item = self.encode(event)
        room.member_list = None
        placeholder = cast(T, _MEMBER_LIST)
        for member in room.members.values():
            if member._stale:
                continue
            if member._presence >= PRESENCE_RUN:
                member._stale = True
                member._queue.append(placeholder)
            else:
                member._queue.append(item)
            member._presence += 1
            member.wake()

    def member_list(self, room: _Room[T]) -> T:
        """The room's members now, encoded once for every member that is sent the list."""
        if room.member_list is None:
            room.member_list = self.encode(Members(tuple(sorted(member.name for member in room.members.values()))))
        return room.member_list

    def evict(self, member: Member[T]) -> None:
        """Drop a member whose queue is full, so the rest of its room is never held up by it."""
        room = member._room
        if room is not None:
            self._evict_all(room, [member])

    def _evict_all(self, room: _Room[T], slow: list[Member[T]]) -> None:
        # Everyone full is dropped before any is announced, so that a room of stalled members is not told of each
        # other's going: only those who stay hear of it.
        dropped = [member for member in slow if self._drop(member)]
        for member in dropped:
            self.announce(room, MemberLeft(member.name, LeaveReason.TOO_SLOW))

    def _drop(self, member: Member[T]) -> bool:
        """Take a too-slow member out of its room and tell its stream why; False if it had already gone."""
        room = member._room
        if room is None:
            return False
        del room.members[member._seat.key]
        seat = member._seat
        # Nothing else refers to a dropped member once its stream ends: freed at once, not by a rare full collection.
        seat.member = None
        self._unseat(room, seat)
        member.drop(
            ChatError(
                ErrorKind.TOO_SLOW,
                f"you were disconnected from room {room.name!r}: more than {self.queue_limit} events "
                "were waiting for you to read them",
            )
        )
        self.stats.evicted["too_slow"] += 1
        log.info(
            "%s dropped from room %s for reading too slowly",
            member.name,
            room.name,
            extra={"room": room.name, "member": member.name, "reason": "too_slow"},
        )
        return True

    def _refused(self, limit: str, message: str, *args: object, room: str, member: str = "") -> None:
        """Count a request refused by one of the server's caps, and log it unless that cap was logged lately."""
        self.stats.refused[limit] += 1
        self._limit_log.info(limit, message, *args, extra={"limit": limit, "room": room, "member": member})

    def _create(self, room: str) -> _Room[T]:
        room = check_name(room, "room")
        if self._closed:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, "the server is shutting down; no rooms can be made")
        key = name_key(room)
        if (existing := self._rooms.get(key)) is not None:
            alike = "" if existing.name == room else f" (too like {room!r} to tell apart)"
            raise ChatError(ErrorKind.ROOM_EXISTS, f"room {existing.name!r} already exists{alike}")
        if len(self._rooms) >= self.max_rooms:
            self._refused(
                "max_rooms",
                "Refused to create room %s: the server holds its limit of %d rooms (--max-rooms)",
                room,
                self.max_rooms,
                room=room,
            )
            raise ChatError(
                ErrorKind.ROOM_LIMIT,
                f"the server has reached its limit of rooms ({self.max_rooms}); join an existing room, or ask an "
                "administrator to close rooms nobody uses",
            )
        created = self._rooms[key] = _Room[T](room, History(self.history_limit, self.history_budget))
        log.info("New room %s created", room, extra={"room": room})
        self._schedule_sweep()
        return created

    def _close(self, room: _Room[T], reason: CloseReason) -> int:
        item = self.encode(RoomClosed(room.name, reason))
        members = list(room.members.values())
        room.members.clear()
        for seat in room.seats.values():
            seat.cancel_expiry()
            seat.member = None
        self.seated -= len(room.seats)
        room.seats.clear()
        room.history.clear()
        for member in members:
            member.end_with(item)
        return len(members)


def _empty(room: _Room[T]) -> bool:
    """Nobody is in the room and no name in it is held for a member that may resume."""
    return not room.members and not room.seats


def _taken(room: _Room[T], wanted: str) -> str:
    holder = room.seats[name_key(wanted)]
    name = repr(holder.name) if holder.name == wanted else f"{holder.name!r} (too like {wanted!r} to tell apart)"
    if holder.member is None:
        return f"the name {name} in room {room.name!r} is held for a member whose connection dropped; pick another"
    return f"someone in room {room.name!r} is already called {name}; pick another name"


def _free_default(room: _Room[T]) -> tuple[str, int]:
    """The lowest default name given back and free, else the next new one: O(log n), not a scan of every name."""
    taken = room.seats
    free = room.free_numbers
    while free:
        number = heapq.heappop(free)
        if name_key(_numbered(number)) not in taken:
            return _numbered(number), number
    # A name a member chose can take a number out of turn; it is skipped, and not handed out later either.
    while name_key(_numbered(room.next_number)) in taken:
        room.next_number += 1
    number = room.next_number
    room.next_number += 1
    return _numbered(number), number


def _numbered(number: int) -> str:
    return DEFAULT_NAME if number == 1 else f"{DEFAULT_NAME}-{number}"


def _issue_token(room: _Room[T], key: str, nonce: str) -> str:
    """A resume token: the room's uid, a nonce, and a MAC proving the room gave it out for the name with `key`."""
    mac = hmac.digest(room.secret, f"{key}\0{nonce}".encode("utf-8", "surrogatepass"), "sha256")
    return f"{room.uid}.{nonce}.{base64.urlsafe_b64encode(mac[:18]).decode()}"


def _proves(token: str, room: _Room[T], key: str) -> bool:
    """Whether `room` gave out `token` for the name with `key`, in this membership or an earlier one."""
    nonce = token.split(".")[1] if token.count(".") == 2 else ""
    return _same_token(_issue_token(room, key, nonce), token)


def _same_token(expected: str, presented: str) -> bool:
    # Compared as bytes, in constant time: compare_digest refuses a str that is not ASCII.
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "surrogatepass"))
