"""The in-memory room registry: rooms, members and fan-out. Plain asyncio; it knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

from chat_service.errors import ChatError, ErrorKind
from chat_service.events import (
    CloseReason,
    Event,
    Joined,
    LeaveReason,
    MemberJoined,
    MemberLeft,
    Message,
    Problem,
    Resume,
    RoomClosed,
    RoomInfo,
    Whisper,
)
from chat_service.history import DEFAULT_HISTORY, History
from chat_service.registry import DEFAULT_NAME
from chat_service.validation import check_client_id, check_name, check_text

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_QUEUE_LIMIT = 1024
DEFAULT_BATCH_LIMIT = 256
DEFAULT_WRITE_SLOTS = 16
DEFAULT_SLOT_HOLD_SECONDS = 0.1
DEFAULT_RESUME_GRACE_SECONDS = 30.0
# Rooms stay until killed, about 1.4 KiB each when empty: a cap keeps a script from filling the server's memory.
DEFAULT_MAX_ROOMS = 10_000
# How many of a member's recent client ids are remembered to recognise a re-sent line.
SENT_IDS_KEPT = 256


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
    __slots__ = ("history", "members", "name", "seats", "uid")

    def __init__(self, name: str, history_limit: int) -> None:
        self.name = name
        # Tokens carry the uid, so that a resume cannot land in a newer room that took the same name.
        self.uid = secrets.token_hex(6)
        self.members: dict[str, Member[T]] = {}
        self.seats: dict[str, _Seat[T]] = {}
        self.history = History[T](history_limit)

    def info(self) -> RoomInfo:
        return RoomInfo(self.name, len(self.members), self.history.last_seq)


class _Seat(Generic[T]):
    """A name held in a room across reconnects: by a live member, or reserved for a while after its stream broke."""

    __slots__ = ("expiry", "member", "name", "sent", "token")

    def __init__(self, room: _Room[T], name: str) -> None:
        self.name = name
        self.token = f"{room.uid}.{secrets.token_urlsafe(16)}"
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

    __slots__ = ("_backlog", "_dropped", "_queue", "_registry", "_room", "_seat", "_waiter")

    def __init__(self, registry: MemoryRegistry[T], room: _Room[T], seat: _Seat[T], backlog: list[T]) -> None:
        self._registry = registry
        self._room: _Room[T] | None = room
        self._seat = seat
        # The join's answer and its history, written before anything live and not counted against the bound.
        self._backlog: list[T] | None = backlog
        self._queue: deque[T] = deque()
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

    async def say(self, text: str, client_id: str = "") -> None:
        room = self._joined_room()
        check_text(text)
        if client_id and self._resent(check_client_id(client_id)):
            return
        seq = room.history.last_seq + 1
        item = self._registry.fan_out(room, Message(seq, self.name, text, time.time_ns(), client_id))
        room.history.append(seq, item)
        if client_id:
            self._seat.remember(client_id, item)

    async def whisper(self, recipient: str, text: str, client_id: str = "") -> None:
        room = self._joined_room()
        check_text(text)
        if client_id and self._resent(check_client_id(client_id)):
            return
        target = room.members.get(recipient)
        if target is None:
            away = recipient in room.seats
            raise ChatError(
                ErrorKind.MEMBER_NOT_FOUND,
                f"{recipient} lost their connection and may be back shortly; try again later"
                if away
                else f"nobody named {recipient!r} is in room {room.name!r}; /who lists its members",
            )
        item = self._registry.encode(Whisper(self.name, recipient, text, time.time_ns(), client_id))
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
        del room.members[self.name]
        self._registry.vacate(room, self._seat, reason)
        log.debug("%s left room %s (%s)", self.name, room.name, reason.name.lower())
        self._registry.fan_out(room, MemberLeft(self.name, reason))

    def report(self, error: ChatError) -> None:
        self.push(self._registry.encode(Problem(error)))

    async def deliver(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        # Writes in flight are capped server-wide: the transport completes operations in order, so a flood of
        # writes would hold back reading the room's next requests. Capped, reading keeps up, and what arrives
        # while a member waits for a slot joins its batch (bench/README.md has the measurements).
        slots = self._registry.slots
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
                if self._queue or self._backlog:
                    await write(self._take())
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
            return batch
        if len(queue) <= limit:
            self._queue = deque()
            return list(queue)
        return [queue.popleft() for _ in range(limit)]

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
        if len(self._queue) >= self._registry.queue_limit:
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
            raise ChatError(ErrorKind.NOT_JOINED, "you are not in a room; /join ROOM or /create ROOM first")
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
        resume_grace: float = DEFAULT_RESUME_GRACE_SECONDS,
        max_rooms: int = DEFAULT_MAX_ROOMS,
    ) -> None:
        self.encode = encode
        self.queue_limit = queue_limit
        self.batch_limit = batch_limit
        self.slots = WriteSlots(write_slots)
        self.history_limit = history_limit
        self.resume_grace = resume_grace
        self.max_rooms = max_rooms
        self._rooms: dict[str, _Room[T]] = {}
        self._closed = False

    async def list_rooms(self) -> list[RoomInfo]:
        return [self._rooms[name].info() for name in sorted(self._rooms)]

    async def create_room(self, room: str) -> RoomInfo:
        return self._create(room).info()

    async def kill_room(self, room: str) -> int:
        found = self._rooms.pop(room, None)
        if found is None:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {room!r} does not exist; /ls lists rooms")
        ejected = self._close(found, CloseReason.KILLED)
        log.info("Room %s killed, %d members ejected", room, ejected)
        return ejected

    async def join(
        self, room: str, name: str, *, create: bool = False, history: int = 0, resume: Resume | None = None
    ) -> Member[T]:
        check_name(room, "room")
        if name or resume is not None:
            check_name(name, "member")
        if resume is not None:
            return self._resume(room, name, resume)
        target = self._create(room) if create else self._rooms.get(room)
        if target is None:
            raise ChatError(
                ErrorKind.ROOM_NOT_FOUND,
                f"room {room!r} does not exist; /ls lists rooms, /create {room} makes it",
            )
        if name in target.seats:
            raise ChatError(ErrorKind.NAME_TAKEN, _taken(target, name))
        seat = _Seat(target, name or _free_default(target.seats))
        target.seats[seat.name] = seat
        return self._admit(target, seat, target.history.last(history), lost=0, created=create, resumed=False)

    def _resume(self, room: str, name: str, resume: Resume) -> Member[T]:
        target = self._rooms.get(room)
        if target is None or not resume.token.startswith(f"{target.uid}."):
            raise ChatError(
                ErrorKind.ROOM_NOT_FOUND,
                f"room {room!r} no longer exists (it was closed, or the server restarted); /ls lists rooms",
            )
        seat = target.seats.get(name)
        if seat is None:
            # The grace period ran out, but the name is free: come back under it, with whatever history holds.
            seat = target.seats[name] = _Seat(target, name)
        # compare_digest refuses str with non-ASCII characters (TypeError); bytes it compares whatever they hold.
        elif not hmac.compare_digest(seat.token.encode(), resume.token.encode("utf-8", "surrogatepass")):
            raise ChatError(ErrorKind.NAME_TAKEN, _taken(target, name))
        seat.cancel_expiry()
        replay, lost = target.history.after(resume.last_seq)
        previous = seat.member
        if previous is not None:
            # The old stream is most likely dead but not yet noticed; the room need not hear of the swap.
            previous.drop(ChatError(ErrorKind.RESUMED_ELSEWHERE, "this membership was resumed on another connection"))
            del target.members[name]
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
        members = tuple(sorted([*room.members, seat.name]))
        joined = Joined(
            room.name, seat.name, members, room.history.last_seq, created, resumed, seat.token, len(replay), lost
        )
        member = Member(self, room, seat, [self.encode(joined), *replay])
        if not swap:
            self.fan_out(room, MemberJoined(seat.name, returned=resumed))
        room.members[seat.name] = seat.member = member
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

    def _unseat(self, room: _Room[T], seat: _Seat[T]) -> None:
        seat.cancel_expiry()
        if room.seats.get(seat.name) is seat:
            del room.seats[seat.name]

    async def shutdown(self) -> None:
        self._closed = True
        rooms, self._rooms = self._rooms, {}
        for room in rooms.values():
            self._close(room, CloseReason.SERVER_SHUTDOWN)

    def fan_out(self, room: _Room[T], event: Event) -> T:
        """Encode `event` once, queue it for every member of `room` in the same order for all, and return it."""
        item = self.encode(event)
        slow = self._queue_for_all(room, item)
        # Each eviction is announced to the rest, which can overflow more queues. Everyone full is dropped before
        # any announcement, in rounds rather than by recursion, so that a room of stalled members costs neither
        # the stack nor a quadratic worklist.
        while slow:
            dropped = [member for member in slow if self._drop(member)]
            overflowed: dict[Member[T], None] = {}
            for member in dropped:
                left = self.encode(MemberLeft(member.name, LeaveReason.TOO_SLOW))
                overflowed.update(dict.fromkeys(self._queue_for_all(room, left)))
            slow = list(overflowed)
        return item

    def evict(self, member: Member[T]) -> None:
        """Drop a member whose queue is full, so the rest of its room is never held up by it."""
        room = member._room
        if room is not None and self._drop(member):
            self.fan_out(room, MemberLeft(member.name, LeaveReason.TOO_SLOW))

    def _queue_for_all(self, room: _Room[T], item: T) -> list[Member[T]]:
        """Queue `item` for every member with room for it; return the members whose queues are full."""
        limit = self.queue_limit
        slow: list[Member[T]] = []
        for member in room.members.values():
            queue = member._queue
            if len(queue) >= limit:
                slow.append(member)
                continue
            queue.append(item)
            member.wake()
        return slow

    def _drop(self, member: Member[T]) -> bool:
        """Take a too-slow member out of its room and tell its stream why; False if it had already gone."""
        room = member._room
        if room is None:
            return False
        del room.members[member.name]
        self._unseat(room, member._seat)
        member.drop(
            ChatError(
                ErrorKind.TOO_SLOW,
                f"you were disconnected from room {room.name!r}: more than {self.queue_limit} events "
                "were waiting for you to read them",
            )
        )
        log.info("%s dropped from room %s for reading too slowly", member.name, room.name)
        return True

    def _create(self, room: str) -> _Room[T]:
        check_name(room, "room")
        if self._closed:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, "the server is shutting down; no rooms can be made")
        if room in self._rooms:
            raise ChatError(ErrorKind.ROOM_EXISTS, f"room {room!r} already exists; /join {room} enters it")
        if len(self._rooms) >= self.max_rooms:
            raise ChatError(
                ErrorKind.ROOM_LIMIT,
                f"the server has reached its limit of rooms ({self.max_rooms}); /join one of them, or ask an "
                "admin to /kill rooms nobody uses",
            )
        created = self._rooms[room] = _Room[T](room, self.history_limit)
        log.info("New room %s created", room)
        return created

    def _close(self, room: _Room[T], reason: CloseReason) -> int:
        item = self.encode(RoomClosed(room.name, reason))
        members = list(room.members.values())
        room.members.clear()
        for seat in room.seats.values():
            seat.cancel_expiry()
        room.seats.clear()
        for member in members:
            member.end_with(item)
        return len(members)


def _taken(room: _Room[T], name: str) -> str:
    seat = room.seats[name]
    if seat.member is None:
        return f"the name {name!r} in room {room.name!r} is held for a member whose connection dropped; pick another"
    return f"someone in room {room.name!r} is already called {name!r}; pick another name"


def _free_default(taken: Mapping[str, object]) -> str:
    if DEFAULT_NAME not in taken:
        return DEFAULT_NAME
    number = 2
    while f"{DEFAULT_NAME}-{number}" in taken:
        number += 1
    return f"{DEFAULT_NAME}-{number}"
