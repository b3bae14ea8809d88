"""Pure functions turning events and results into the lines both front ends print."""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Iterable, Sequence

from chat.v1 import chat_pb2
from chat_cli.protocol import ConnectionLost, HistoryMessage, Incoming, Reconnecting

# Control characters could end the line or drive the terminal (a forged "* room lobby was closed" line, a new window
# title), and bidi embeddings, overrides and isolates reorder what follows them. The server refuses them in what it
# accepts; escaping whatever arrives is the second wall, should a server or a stored name ever let one through.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")

# A member list longer than this is told as a count: a crowd's names would fill the screen.
MEMBERS_NAMED = 10
# Nicknames take one of these colours by a hash of the name, so a member has the same colour in every run.
NICK_COLOURS = (
    "ansired",
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansibrightred",
    "ansibrightgreen",
    "ansibrightyellow",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
)
OWN_STYLE = "bold"
MENTION_STYLE = "reverse"
NOTICE_STYLE = "ansibrightblack"
ERROR_STYLE = "ansired bold"
_LEFT_SUFFIX = {
    chat_pb2.LEAVE_REASON_DISCONNECTED: " (connection lost)",
    chat_pb2.LEAVE_REASON_TOO_SLOW: " (too slow, disconnected)",
}


def safe(text: str) -> str:
    """`text` with its control and bidi control characters written as escapes (`\\n`, `\\x1b`, `\\u202e`)."""
    return _UNSAFE.sub(_escape, text)


def _escape(unsafe: re.Match[str]) -> str:
    return unsafe.group().encode("unicode_escape").decode("ascii")


def event(incoming: Incoming, me: str) -> str:
    """The line for one incoming event, as seen by the member named `me`; nothing in it can act on the terminal."""
    return safe(_event(incoming, me))


def _event(incoming: Incoming, me: str) -> str:
    if isinstance(incoming, ConnectionLost):
        return error(incoming.message)
    if isinstance(incoming, Reconnecting):
        return reconnecting(incoming)
    if isinstance(incoming, HistoryMessage):
        return history(incoming.message)
    kind = incoming.WhichOneof("kind")
    if kind == "joined":
        return joined(incoming.joined)
    if kind == "message":
        return said(incoming.message)
    if kind == "whisper":
        return whisper(incoming.whisper, me)
    if kind == "member_joined":
        newcomer = incoming.member_joined
        return f"* {newcomer.name} is back" if newcomer.returned else f"* {newcomer.name} joined"
    if kind == "member_left":
        left = incoming.member_left
        return f"* {left.name} left{_LEFT_SUFFIX.get(left.reason, '')}"
    if kind == "members":
        return members_now(incoming.members.names)
    if kind == "room_closed":
        return room_closed(incoming.room_closed)
    if kind == "error":
        return problem(incoming.error)
    return f"* unknown event from the server: {kind}; is this client older than the server?"


def joined(event: chat_pb2.Joined) -> str:
    """The confirmation of a join, naming the room, the name given and who is there; or of a resume."""
    if event.resumed:
        line = f"* reconnected to {event.room} as {event.name}; {_count(event.replayed, 'missed message')} replayed"
        if event.lost:
            line += f"; {event.lost} could not be recovered (older than the server keeps)"
        return line
    if event.created:
        return f"* room {event.room} created; you joined as {event.name}"
    return f"* you joined {event.room} as {event.name} (members: {', '.join(event.members)})"


def whisper(event: chat_pb2.Whisper, me: str) -> str:
    """A whisper to `me`, or the echo of one `me` sent to someone else."""
    if event.sender == me and event.recipient != me:
        return f"(whisper to {event.recipient}) {event.sender} : {event.text}"
    return f"(whisper) {event.sender} : {event.text}"


def history(message: chat_pb2.Message) -> str:
    """A message from before the member joined, marked with the local time it was said (HH:MM)."""
    return f"[history {clock(message.sent_at.seconds)}] {said(message)}"


def said(message: chat_pb2.Message) -> str:
    """A line said to the room, or what its sender does (`* alice waves`) if it is an action."""
    if message.action:
        return f"* {message.sender} {message.text}"
    return f"{message.sender} : {message.text}"


def clock(seconds: float) -> str:
    """A time as the local HH:MM."""
    return time.strftime("%H:%M", time.localtime(seconds))


def reconnecting(event: Reconnecting) -> str:
    """A reconnect attempt about to start."""
    if event.attempt == 1:
        return f"* connection to the server lost; reconnecting to {event.room} in {event.delay:.1f} s"
    return f"* still reconnecting to {event.room}: attempt {event.attempt} in {event.delay:.1f} s"


def pending(text: str, recipient: str | None = None) -> str:
    """A line (or a whisper to `recipient`) held back until the session has reconnected."""
    if recipient is not None:
        return safe(f"(pending whisper to {recipient}) {text}")
    return safe(f"(pending) {text}")


def members_now(names: Sequence[str]) -> str:
    """The member list that replaces a run of joins and leaves: the names, or only their count when there are many."""
    if len(names) > MEMBERS_NAMED:
        return f"* {len(names):,} members now"
    return f"* members now: {', '.join(names)}"


def room_closed(event: chat_pb2.RoomClosed) -> str:
    """Why the member's room went away."""
    if event.reason == chat_pb2.CLOSE_REASON_SERVER_SHUTDOWN:
        return "* the server is shutting down"
    return f"* room {event.room} was closed by the server"


def rooms(listed: Iterable[chat_pb2.Room]) -> list[str]:
    """The /ls listing: a header and one line per room, or a hint when there are none."""
    lines = [
        safe(f"  {room.name} ({_count(room.member_count, 'member')}, {_count(room.last_seq, 'message')})")
        for room in listed
    ]
    if not lines:
        return ["no rooms yet; /create ROOM makes one"]
    return ["rooms:", *lines]


def members(room: str, names: Iterable[str]) -> str:
    """The /who listing."""
    return safe(f"members of {room}: {', '.join(names)}")


def left(room: str) -> str:
    """The confirmation of /leave."""
    return safe(f"* you left {room}")


def killed(room: str, ejected: int) -> str:
    """The confirmation of an admin kill."""
    return safe(f"room {room} killed; {_count(ejected, 'member')} sent back to waiting")


def pruned(rooms: Sequence[str]) -> str:
    """The confirmation of an admin prune."""
    if not rooms:
        return "no empty rooms to prune"
    return f"pruned {_count(len(rooms), 'empty room')}: {', '.join(rooms)}"


# The server's sentences are neutral, for any caller; what to type next is this client's to say.
HINTS: dict[int, str] = {
    chat_pb2.ERROR_CODE_ROOM_NOT_FOUND: "/ls lists rooms, /create ROOM makes one",
    chat_pb2.ERROR_CODE_ROOM_EXISTS: "/join ROOM enters it",
    chat_pb2.ERROR_CODE_MEMBER_NOT_FOUND: "/who lists the members",
    chat_pb2.ERROR_CODE_NOT_JOINED: "/join ROOM or /create ROOM first",
    chat_pb2.ERROR_CODE_ROOM_LIMIT: "/ls lists the rooms to /join",
}


def problem(event: chat_pb2.Error) -> str:
    """A request the server refused, with what to type next; a rate limit says how long to wait."""
    if event.code == chat_pb2.ERROR_CODE_RATE_LIMITED and event.HasField("retry_after"):
        # Rounded up, so that waiting as long as it says is always enough.
        wait = math.ceil(event.retry_after.ToNanoseconds() / 1e8) / 10
        return error(f"slow down: {event.message} (try again in {wait:.1f} s)")
    return error(hinted(event.message, event.code))


def hinted(message: str, code: int) -> str:
    """`message` with this client's hint for the error code, if it has one."""
    hint = HINTS.get(code)
    return f"{message}; {hint}" if hint else message


def error(message: str) -> str:
    """An expected failure, as one line scripts can recognise."""
    return f"error: {safe(message)}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def pasted(lines: int) -> str:
    """The notice that a pasted block goes out as one message per line."""
    return f"* pasted {lines} lines: sending them as {lines} messages"


def nick_colour(name: str) -> str:
    """The colour of `name`, the same in every run and on every machine."""
    return NICK_COLOURS[zlib.crc32(name.encode("utf-8", "surrogatepass")) % len(NICK_COLOURS)]


def styled(line: str, incoming: Incoming | None, me: str) -> list[tuple[str, str]]:
    """`line` (what `event` made of `incoming`) as prompt_toolkit style fragments: the sender's name in its colour,
    your own lines bold, lines that mention `me` reversed, notices dimmed, errors red."""
    if line.startswith("error: "):
        return [(ERROR_STYLE, line)]
    said_by = _sender_and_text(incoming)
    if said_by is None:
        return [(NOTICE_STYLE if line.startswith("* ") else "", line)]
    sender, text = said_by
    base = OWN_STYLE if sender == me else MENTION_STYLE if me and _mentions(text, me) else ""
    name = safe(sender)
    at = line.find(f"{name} : ")
    if at < 0 and (at := line.find(f"* {name} ")) >= 0:
        at += 2
    if at < 0:
        return [(base, line)]
    end = at + len(name)
    return [(base, line[:at]), (f"{base} {nick_colour(sender)}".strip(), name), (base, line[end:])]


def sent_at(incoming: Incoming | None) -> float | None:
    """When the server accepted the line `incoming` carries, in seconds since the epoch; None if it carries none."""
    if isinstance(incoming, HistoryMessage):
        return incoming.message.sent_at.seconds
    if isinstance(incoming, chat_pb2.Event):
        kind = incoming.WhichOneof("kind")
        if kind == "message" and incoming.message.HasField("sent_at"):
            return incoming.message.sent_at.seconds
        if kind == "whisper" and incoming.whisper.HasField("sent_at"):
            return incoming.whisper.sent_at.seconds
    return None


def _sender_and_text(incoming: Incoming | None) -> tuple[str, str] | None:
    if isinstance(incoming, HistoryMessage):
        return incoming.message.sender, incoming.message.text
    if isinstance(incoming, chat_pb2.Event):
        kind = incoming.WhichOneof("kind")
        if kind == "message":
            return incoming.message.sender, incoming.message.text
        if kind == "whisper":
            return incoming.whisper.sender, incoming.whisper.text
    return None


def _mentions(text: str, name: str) -> bool:
    """Whether `text` names `name` as a word of its own, in any case."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None
