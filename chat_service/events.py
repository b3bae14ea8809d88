"""What happens in a room, as plain values: the registry produces these and the edge encodes them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from chat_service.errors import ChatError


class LeaveReason(enum.Enum):
    """Why a member left its room."""

    LEFT = enum.auto()
    DISCONNECTED = enum.auto()
    TOO_SLOW = enum.auto()


class CloseReason(enum.Enum):
    """Why a room was closed."""

    KILLED = enum.auto()
    SERVER_SHUTDOWN = enum.auto()


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """A room as `/ls` shows it."""

    name: str
    member_count: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Resume:
    """What a member presents to come back after its stream broke: its membership's token and the last seq it saw."""

    token: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class Joined:
    """Sent to a member once, first: the room it entered, who is there, and how many history messages follow."""

    room: str
    name: str
    members: tuple[str, ...]
    last_seq: int
    created: bool
    resumed: bool
    resume_token: str
    replayed: int
    lost: int


@dataclass(frozen=True, slots=True)
class Message:
    """A line said to the whole room; `seq` orders the room's messages, from 1 without gaps."""

    seq: int
    sender: str
    text: str
    sent_at_ns: int
    client_id: str = ""
    action: bool = False


@dataclass(frozen=True, slots=True)
class Whisper:
    """A line between two members, delivered to the recipient and echoed to the sender."""

    sender: str
    recipient: str
    text: str
    sent_at_ns: int
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """Another member entered the room, or came back after its connection was lost (`returned`)."""

    name: str
    returned: bool = False


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """Another member left the room."""

    name: str
    reason: LeaveReason


@dataclass(frozen=True, slots=True)
class Members:
    """Everyone in the room now, sorted: sent in place of a run of MemberJoined and MemberLeft events."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoomClosed:
    """The room is gone; nothing follows this event."""

    room: str
    reason: CloseReason


@dataclass(frozen=True, slots=True)
class Problem:
    """A request of this member failed; its stream lives on. `client_id` is the failed request's, if it had one."""

    error: ChatError
    client_id: str = ""


Event = Joined | Message | Whisper | MemberJoined | MemberLeft | Members | RoomClosed | Problem
