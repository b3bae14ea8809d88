"""The in-memory store: rooms, names and logs held by this process alone, and gone with it.

Its operations never pause, and it calls the one follower of a room synchronously: a line said goes from `append`
to `Follower.logged` to the members' queues in one step, as fast as a registry with no store beneath it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import secrets

from chat_service import tokens
from chat_service.errors import ChatError, ErrorKind
from chat_service.events import CloseReason, Message, RoomClosed, RoomInfo, Whisper
from chat_service.history import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES, History, HistoryBudget
from chat_service.store import (
    DEDUP_KEYS_KEPT,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_ROOMS,
    Appended,
    Backlog,
    Follower,
    RoomRecord,
    Seat,
    Signal,
    Takeover,
    TokenIssuer,
    numbered_name,
)
from chat_service.validation import name_key

log = logging.getLogger(__name__)


def message_size(message: Message) -> int:
    """What a kept message's text and names take in UTF-8; the history budget adds its fixed overhead."""
    # isascii() is O(1) in CPython: most lines are measured without encoding them. Measured at every line kept and
    # again as it goes, so in one function, not one call per string.
    text, sender = message.text, message.sender
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    size += len(sender) if sender.isascii() else len(sender.encode("utf-8", "surrogatepass"))
    return size + len(message.client_id)


class _Seat:
    """A name claimed in a room: live while a member holds it, else held until `expiry` for a resume."""

    __slots__ = ("claim", "expiry", "key", "live", "name", "number", "token")

    def __init__(self, name: str, key: str, token: str, claim: str, number: int) -> None:
        self.name = name
        self.key = key
        self.token = token
        self.claim = claim
        # The default name's number, given back when the seat goes; 0 for a name the member chose.
        self.number = number
        self.live = True
        self.expiry: asyncio.TimerHandle | None = None

    def public(self, took_over: bool) -> Seat:
        return Seat(self.name, self.key, self.token, self.claim, took_over)

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None


class _Room:
    __slots__ = ("dedup", "follower", "free_numbers", "history", "live", "next_number", "record", "seats")

    def __init__(self, record: RoomRecord, history: History[Message]) -> None:
        self.record = record
        # Keyed by name_key(name): names that could be taken for each other on screen are one name.
        self.seats: dict[str, _Seat] = {}
        self.live = 0
        self.history = history
        self.follower: Follower | None = None
        # Made on the first line with a client id: most rooms of a busy server never see one re-sent.
        self.dedup: dict[str, Message] | None = None
        # Default names are numbered: the lowest number given back is reused first, from a heap, else the next new.
        self.free_numbers: list[int] | None = None
        self.next_number = 1


class MemoryStore:
    """Rooms held in this process; one event loop owns every structure here."""

    def __init__(
        self,
        *,
        history_limit: int = DEFAULT_HISTORY,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        max_rooms: int = DEFAULT_MAX_ROOMS,
        max_members: int = DEFAULT_MAX_MEMBERS,
        empty_room_ttl: float | None = None,
    ) -> None:
        self.history_limit = history_limit
        self.history_budget = HistoryBudget(history_bytes, message_size)
        self.max_rooms = max_rooms
        self.max_members = max_members
        self.empty_room_ttl = empty_room_ttl
        self._rooms: dict[str, _Room] = {}
        # The same rooms by uid, found without folding a name: every line said looks its room up.
        self._by_uid: dict[str, _Room] = {}
        self._seated = 0
        self._claims = itertools.count(1)
        self._closed = False
        # When the sweep first saw each room empty; a claim forgets it, so a room closes only after a whole TTL empty.
        self._empty_since: dict[_Room, float] = {}
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def available(self) -> bool:
        return True

    @property
    def shared(self) -> bool:
        return False

    @property
    def room_count(self) -> int:
        """Rooms open now; one len(), so another thread may read it."""
        return len(self._rooms)

    @property
    def seated(self) -> int:
        return self._seated

    async def create_room(self, name: str) -> RoomRecord:
        if self._closed:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, "the server is shutting down; no rooms can be made")
        key = name_key(name)
        if (existing := self._rooms.get(key)) is not None:
            alike = "" if existing.record.name == name else f" (too like {name!r} to tell apart)"
            raise ChatError(ErrorKind.ROOM_EXISTS, f"room {existing.record.name!r} already exists{alike}")
        if len(self._rooms) >= self.max_rooms:
            raise ChatError(
                ErrorKind.ROOM_LIMIT,
                f"the server has reached its limit of rooms ({self.max_rooms}); join an existing room, or ask an "
                "administrator to close rooms nobody uses",
            )
        # The uid goes into tokens, so that a resume cannot land in a newer room that took the same name.
        record = RoomRecord(name, secrets.token_hex(6), secrets.token_bytes(16))
        self._rooms[key] = self._by_uid[record.uid] = _Room(record, History(self.history_limit, self.history_budget))
        self._schedule_sweep()
        return record

    async def find_room(self, name: str) -> RoomRecord | None:
        room = self._rooms.get(name_key(name))
        return room.record if room is not None else None

    async def list_rooms(self) -> list[RoomInfo]:
        rooms = sorted(self._rooms.values(), key=lambda room: room.record.name)
        return [RoomInfo(room.record.name, room.live, room.history.last_seq) for room in rooms]

    async def members(self, room: RoomRecord) -> list[str]:
        return sorted(seat.name for seat in self._room(room).seats.values() if seat.live)

    async def close_room(self, name: str, reason: CloseReason) -> RoomRecord:
        room = self._rooms.pop(name_key(name), None)
        if room is None:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {name!r} does not exist")
        self._close(room, reason)
        return room.record

    async def prune_rooms(self) -> list[str]:
        empty = [(key, room) for key, room in self._rooms.items() if not room.seats]
        for key, room in empty:
            del self._rooms[key]
            self._close(room, CloseReason.KILLED)
        return sorted(room.record.name for _, room in empty)

    async def claim(self, room: RoomRecord, name: str, token_for: TokenIssuer, resume_token: str = "") -> Seat:
        found = self._room(room)
        if resume_token and (held := found.seats.get(name_key(name))) is not None:
            if not tokens.same(held.token, resume_token):
                raise ChatError(ErrorKind.NAME_TAKEN, _taken(found, held, name))
            return self._resume(found, held)
        if self._seated >= self.max_members:
            raise ChatError(
                ErrorKind.MEMBER_LIMIT,
                f"the server has reached its limit of members ({self.max_members}); try again later",
            )
        number = 0
        if name:
            if (holder := found.seats.get(name_key(name))) is not None:
                raise ChatError(ErrorKind.NAME_TAKEN, _taken(found, holder, name))
        else:
            name, number = _free_default(found)
        key = name_key(name)
        seat = found.seats[key] = _Seat(name, key, token_for(key), str(next(self._claims)), number)
        found.live += 1
        self._seated += 1
        self._empty_since.pop(found, None)
        return seat.public(took_over=False)

    def _resume(self, room: _Room, seat: _Seat) -> Seat:
        """Claim a seat again under its token: a live one is taken from the member holding it, who is signalled."""
        seat.cancel_expiry()
        took_over = seat.live
        seat.claim = str(next(self._claims))
        if not took_over:
            seat.live = True
            room.live += 1
        self._empty_since.pop(room, None)
        if took_over and room.follower is not None:
            room.follower.signalled(Takeover(seat.key, seat.claim))
        return seat.public(took_over)

    async def vacate(self, room: RoomRecord, seat: Seat, grace: float) -> None:
        found = self._by_uid.get(room.uid)
        if found is None:
            return
        held = found.seats.get(seat.key)
        if held is None or held.claim != seat.claim or not held.live:
            return
        held.live = False
        found.live -= 1
        if grace > 0:
            held.expiry = asyncio.get_running_loop().call_later(grace, self._expire, found, held)
        else:
            self._unseat(found, held)

    async def append(self, room: RoomRecord, message: Message, dedup_key: str = "") -> Appended:
        found = self._room(room)
        dedup = found.dedup
        if dedup_key and dedup is not None and (original := dedup.get(dedup_key)) is not None:
            return Appended(original, duplicate=True)
        history = found.history
        seq = history.last_seq + 1
        kept = Message(seq, message.sender, message.text, message.sent_at_ns, message.client_id, message.action)
        history.append(seq, kept)
        if dedup_key:
            if dedup is None:
                dedup = found.dedup = {}
            dedup[dedup_key] = kept
            if len(dedup) > DEDUP_KEYS_KEPT:
                del dedup[next(iter(dedup))]
        if found.follower is not None:
            found.follower.logged(kept)
        return Appended(kept, duplicate=False)

    async def read(self, room: RoomRecord, *, after: int | None = None, last: int = 0) -> Backlog:
        history = self._room(room).history
        if after is not None:
            messages, lost = history.after(after)
            return Backlog(messages, lost, history.last_seq)
        return Backlog(history.last(last), 0, history.last_seq)

    async def whisper(self, room: RoomRecord, recipient: str, whisper: Whisper) -> str:
        found = self._room(room)
        key = name_key(recipient)
        seat = found.seats.get(key)
        if seat is None or not seat.live:
            raise ChatError(
                ErrorKind.MEMBER_NOT_FOUND,
                f"{recipient} lost their connection and may be back shortly; try again later"
                if seat is not None
                else f"nobody named {recipient!r} is in room {room.name!r}",
            )
        if found.follower is not None:
            found.follower.whispered(key, whisper)
        return seat.name

    async def signal(self, room: RoomRecord, signal: Signal) -> None:
        follower = self._room(room).follower
        if follower is not None:
            follower.signalled(signal)

    async def follow(self, room: RoomRecord, follower: Follower) -> int:
        found = self._room(room)
        found.follower = follower
        return found.history.last_seq

    async def unfollow(self, room: RoomRecord) -> None:
        found = self._by_uid.get(room.uid)
        if found is not None:
            found.follower = None

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        rooms, self._rooms = self._rooms, {}
        for room in rooms.values():
            self._close(room, CloseReason.SERVER_SHUTDOWN)

    def _room(self, record: RoomRecord) -> _Room:
        room = self._by_uid.get(record.uid)
        if room is None:
            raise ChatError(ErrorKind.ROOM_NOT_FOUND, f"room {record.name!r} does not exist")
        return room

    def _close(self, room: _Room, reason: CloseReason) -> None:
        """Forget the room's names and messages, and log RoomClosed to its follower last."""
        del self._by_uid[room.record.uid]
        for seat in room.seats.values():
            seat.cancel_expiry()
        self._seated -= len(room.seats)
        room.seats.clear()
        room.live = 0
        room.history.clear()
        room.dedup = None
        self._empty_since.pop(room, None)
        follower, room.follower = room.follower, None
        if follower is not None:
            follower.logged(RoomClosed(room.record.name, reason))

    def _expire(self, room: _Room, seat: _Seat) -> None:
        seat.expiry = None
        if not seat.live:
            self._unseat(room, seat)

    def _unseat(self, room: _Room, seat: _Seat) -> None:
        seat.cancel_expiry()
        if room.seats.get(seat.key) is seat:
            del room.seats[seat.key]
            self._seated -= 1
            if seat.number:
                if room.free_numbers is None:
                    room.free_numbers = []
                heapq.heappush(room.free_numbers, seat.number)

    def _sweep_empty(self) -> None:
        """Close the rooms the sweep has seen empty for the TTL, and come back in a quarter of it."""
        ttl = self.empty_room_ttl
        assert ttl is not None
        now = asyncio.get_running_loop().time()
        seen, self._empty_since = self._empty_since, {}
        for key, room in list(self._rooms.items()):
            if room.seats:
                continue
            since = seen.get(room, now)
            if now - since < ttl:
                self._empty_since[room] = since
                continue
            del self._rooms[key]
            self._close(room, CloseReason.KILLED)
            log.info(
                "Room %s closed: nobody was in it for %g s",
                room.record.name,
                ttl,
                extra={"room": room.record.name, "reason": "expired"},
            )
        self._sweep = None
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self.empty_room_ttl is not None and self._sweep is None and self._rooms and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(self.empty_room_ttl / 4, self._sweep_empty)


def _taken(room: _Room, holder: _Seat, wanted: str) -> str:
    name = repr(holder.name) if holder.name == wanted else f"{holder.name!r} (too like {wanted!r} to tell apart)"
    where = repr(room.record.name)
    if not holder.live:
        return f"the name {name} in room {where} is held for a member whose connection dropped; pick another"
    return f"someone in room {where} is already called {name}; pick another name"


def _free_default(room: _Room) -> tuple[str, int]:
    """The lowest default name given back and free, else the next new one: O(log n), not a scan of every name."""
    taken = room.seats
    free = room.free_numbers
    while free:
        number = heapq.heappop(free)
        if name_key(numbered_name(number)) not in taken:
            return numbered_name(number), number
    # A name a member chose can take a number out of turn; it is skipped, and not handed out later either.
    while name_key(numbered_name(room.next_number)) in taken:
        room.next_number += 1
    number = room.next_number
    room.next_number += 1
    return numbered_name(number), number
