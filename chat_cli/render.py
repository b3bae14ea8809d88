"""Pure functions turning events and results into the lines both front ends print."""

from __future__ import annotations

from collections.abc import Iterable

from chat_cli.session import ConnectionLost, Incoming
from chat_service._pb.chat.v1 import chat_pb2

_LEFT_SUFFIX = {
    chat_pb2.LEAVE_REASON_DISCONNECTED: " (connection lost)",
    chat_pb2.LEAVE_REASON_TOO_SLOW: " (too slow, disconnected)",
}


def event(incoming: Incoming, me: str) -> str:
    """The line for one incoming event, as seen by the member named `me`."""
    if isinstance(incoming, ConnectionLost):
        return error(incoming.message)
    kind = incoming.WhichOneof("kind")
    if kind == "joined":
        return joined(incoming.joined)
    if kind == "message":
        return f"{incoming.message.sender} : {incoming.message.text}"
    if kind == "whisper":
        return whisper(incoming.whisper, me)
    if kind == "member_joined":
        return f"* {incoming.member_joined.name} joined"
    if kind == "member_left":
        left = incoming.member_left
        return f"* {left.name} left{_LEFT_SUFFIX.get(left.reason, '')}"
    if kind == "room_closed":
        return room_closed(incoming.room_closed)
    if kind == "error":
        return error(incoming.error.message)
    return f"* unknown event from the server: {kind}; is this client older than the server?"


def joined(event: chat_pb2.Joined) -> str:
    """The confirmation of a join, naming the room, the name given and who is there."""
    if event.created:
        return f"* room {event.room} created; you joined as {event.name}"
    return f"* you joined {event.room} as {event.name} (members: {', '.join(event.members)})"


def whisper(event: chat_pb2.Whisper, me: str) -> str:
    """A whisper to `me`, or the echo of one `me` sent to someone else."""
    if event.sender == me and event.recipient != me:
        return f"(whisper to {event.recipient}) {event.sender} : {event.text}"
    return f"(whisper) {event.sender} : {event.text}"


def room_closed(event: chat_pb2.RoomClosed) -> str:
    """Why the member's room went away."""
    if event.reason == chat_pb2.CLOSE_REASON_SERVER_SHUTDOWN:
        return "* the server is shutting down"
    return f"* room {event.room} was closed by the server"


def rooms(listed: Iterable[chat_pb2.Room]) -> list[str]:
    """The /ls listing: a header and one line per room, or a hint when there are none."""
    lines = [f"  {room.name} ({_count(room.member_count, 'member')})" for room in listed]
    if not lines:
        return ["no rooms yet; /create ROOM makes one"]
    return ["rooms:", *lines]


def members(room: str, names: Iterable[str]) -> str:
    """The /who listing."""
    return f"members of {room}: {', '.join(names)}"


def left(room: str) -> str:
    """The confirmation of /leave."""
    return f"* you left {room}"


def killed(room: str, ejected: int) -> str:
    """The confirmation of an admin kill."""
    return f"room {room} killed; {_count(ejected, 'member')} sent back to waiting"


def error(message: str) -> str:
    """An expected failure, as one line scripts can recognise."""
    return f"error: {message}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
