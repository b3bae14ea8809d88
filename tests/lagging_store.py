"""A store that behaves as one shared between processes would: every operation pauses, and followers hear later.

It wraps the in-memory store: what is kept is the same, but each operation yields to the event loop before it runs,
and a follower is called from a task of its own a few loop turns after the store logged or signalled, so that the
registry above it meets the races a networked store brings (a follower behind the log, a signal after the reply).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from chat_service.events import CloseReason, Message, RoomInfo, Whisper
from chat_service.memory_store import MemoryStore
from chat_service.store import Appended, Backlog, Entry, Follower, RoomRecord, Seat, Signal, TokenIssuer

# Loop turns between the store logging an entry and its follower hearing it.
LAG = 3


class _Relay:
    """Hands what the inner store tells a follower on to it later, in order, from a task."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.active = True
        self.calls: asyncio.Queue[Callable[[], None]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    def logged(self, entry: Entry) -> None:
        self.calls.put_nowait(lambda: self.follower.logged(entry))

    def signalled(self, signal: Signal) -> None:
        self.calls.put_nowait(lambda: self.follower.signalled(signal))

    def whispered(self, recipient_key: str, whisper: Whisper) -> None:
        self.calls.put_nowait(lambda: self.follower.whispered(recipient_key, whisper))

    async def _run(self) -> None:
        while True:
            call = await self.calls.get()
            for _ in range(LAG):
                await asyncio.sleep(0)
            if self.active:
                call()
            self.calls.task_done()

    async def stop(self) -> None:
        self.active = False
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class LaggingStore:
    """The in-memory store behind pauses and late followers."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self._relays: dict[str, _Relay] = {}

    @property
    def available(self) -> bool:
        return True

    @property
    def shared(self) -> bool:
        return False

    @property
    def room_count(self) -> int:
        return self.inner.room_count

    @property
    def seated(self) -> int:
        return self.inner.seated

    async def create_room(self, name: str) -> RoomRecord:
        await asyncio.sleep(0)
        return await self.inner.create_room(name)

    async def find_room(self, name: str) -> RoomRecord | None:
        await asyncio.sleep(0)
        return await self.inner.find_room(name)

    async def list_rooms(self) -> list[RoomInfo]:
        await asyncio.sleep(0)
        return await self.inner.list_rooms()

    async def members(self, room: RoomRecord) -> list[str]:
        await asyncio.sleep(0)
        return await self.inner.members(room)

    async def close_room(self, name: str, reason: CloseReason) -> RoomRecord:
        await asyncio.sleep(0)
        return await self.inner.close_room(name, reason)

    async def prune_rooms(self) -> list[str]:
        await asyncio.sleep(0)
        return await self.inner.prune_rooms()

    async def claim(self, room: RoomRecord, name: str, token_for: TokenIssuer, resume_token: str = "") -> Seat:
        await asyncio.sleep(0)
        return await self.inner.claim(room, name, token_for, resume_token)

    async def vacate(self, room: RoomRecord, seat: Seat, grace: float) -> None:
        await asyncio.sleep(0)
        await self.inner.vacate(room, seat, grace)

    async def append(self, room: RoomRecord, message: Message, dedup_key: str = "") -> Appended:
        await asyncio.sleep(0)
        return await self.inner.append(room, message, dedup_key)

    async def read(self, room: RoomRecord, *, after: int | None = None, last: int = 0) -> Backlog:
        await asyncio.sleep(0)
        return await self.inner.read(room, after=after, last=last)

    async def whisper(self, room: RoomRecord, recipient: str, whisper: Whisper) -> str:
        await asyncio.sleep(0)
        return await self.inner.whisper(room, recipient, whisper)

    async def signal(self, room: RoomRecord, signal: Signal) -> None:
        await asyncio.sleep(0)
        await self.inner.signal(room, signal)

    async def follow(self, room: RoomRecord, follower: Follower) -> int:
        await asyncio.sleep(0)
        relay = _Relay(follower)
        try:
            last_seq = await self.inner.follow(room, relay)
        except BaseException:
            await relay.stop()
            raise
        if (old := self._relays.pop(room.uid, None)) is not None:
            await old.stop()
        self._relays[room.uid] = relay
        return last_seq

    async def unfollow(self, room: RoomRecord) -> None:
        await asyncio.sleep(0)
        await self.inner.unfollow(room)
        if (relay := self._relays.pop(room.uid, None)) is not None:
            await relay.stop()

    async def close(self) -> None:
        await self.inner.close()
        # What the rooms' closing told the followers reaches them before the relays stop.
        for relay in list(self._relays.values()):
            await relay.calls.join()
            await relay.stop()
        self._relays.clear()
