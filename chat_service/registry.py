"""The registry's async interface, what the servicer calls: rooms, and the memberships of this process's streams.

rooms.RoomRegistry implements it over any store.Store: the store keeps rooms, names and logs (in this process's
memory, or shared by several server processes), the registry delivers to the members here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from chat_service.errors import ChatError
from chat_service.events import LeaveReason, Resume, RoomInfo

T = TypeVar("T")

DEFAULT_NAME = "Unknown"


class Membership(Protocol[T]):
    """One member of one room, owned by the stream that joined it."""

    @property
    def room(self) -> str:
        """The room's name."""

    @property
    def name(self) -> str:
        """The name this member got."""

    @property
    def dropped(self) -> asyncio.Future[ChatError]:
        """Resolves when the server ends this membership itself: too slow to read, or resumed by another stream."""

    async def say(self, text: str, client_id: str = "", *, action: bool = False) -> None:
        """Broadcast a line (an action if `action`) to the room, this member included, once per non-empty
        `client_id`; raises ChatError."""

    async def whisper(self, recipient: str, text: str, client_id: str = "") -> None:
        """Send a line to one member of the room and echo it to this one, once per `client_id`; raises ChatError."""

    async def leave(self, reason: LeaveReason = LeaveReason.LEFT) -> None:
        """Leave the room; safe to call more than once and after the room closed."""

    def report(self, error: ChatError, client_id: str = "") -> None:
        """Queue a failed request's error, naming its `client_id`, for this member alone, in order with its other
        events."""

    async def deliver(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        """Write this member's events with `write`, everything queued (up to a bound) at a time, until it ends."""


class Registry(Protocol[T]):
    """The rooms of a chat service: events leave it already encoded as T, once per broadcast."""

    async def list_rooms(self) -> list[RoomInfo]:
        """Every open room, sorted by name."""

    async def create_room(self, room: str) -> RoomInfo:
        """Make an empty room; raises ChatError (INVALID_NAME, ROOM_EXISTS)."""

    async def kill_room(self, room: str) -> int:
        """Close a room and eject its members; returns how many; raises ChatError (ROOM_NOT_FOUND)."""

    async def prune_rooms(self) -> list[str]:
        """Close every room with no members and no name held for a resume, in one step; returns their names, sorted."""

    async def join(
        self, room: str, name: str, *, create: bool = False, history: int = 0, resume: Resume | None = None
    ) -> Membership[T]:
        """Enter a room (making it first when `create`; an empty name means the numbered default). The member first
        gets the room's last `history` messages, or with `resume` its old name and every message after last_seq."""

    async def shutdown(self) -> None:
        """End every membership for a server shutdown: RoomClosed when the rooms go with this process, else a status
        the client resumes after; later joins fail."""

    def store_changed(self, available: bool) -> None:
        """The store went away (`available` False) or came back; the members here are told when it goes."""
