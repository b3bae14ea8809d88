"""The client's protocol core: a session's state, fed the server's events, answering what to show and do; no I/O.

Words used here and in session.py: a *stay* is one membership of one room, which outlives a broken stream while
the session resumes it; a *feed* is one Chat stream as the core sees it (a join, or a resume of a stay); a line is
*unanswered* until the server echoes it or sends an error event carrying its client id. The session owns the
channels, calls and tasks; it feeds every event to `Protocol.receive` and does what the returned `Outcome` says.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from chat.v1 import chat_pb2

# The server refuses longer lines (SendMessage.text); refused here first, so a huge line never reaches the wire.
MAX_LINE_BYTES = 4096

# A broken stream is resumed after RECONNECT_FIRST_DELAY, then after twice as long each time up to
# RECONNECT_MAX_DELAY. Each delay is scaled by a random factor within 1 +- RECONNECT_JITTER, so that the members
# of a room that lost the server together do not all come back in the same instant.
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
RECONNECT_JITTER = 0.5

NOT_IN_ROOM = "you are not in a room; /join ROOM or /create ROOM first"

# gRPC status names (StreamEnd.code) the core tells apart.
UNAVAILABLE = "UNAVAILABLE"
_DROPPED_BY_SERVER = ("RESOURCE_EXHAUSTED", "ABORTED")


class SessionError(Exception):
    """An expected failure; its text is a sentence the user can act on."""


@dataclass(frozen=True)
class ConnectionLost:
    """The member's stay in its room ended unasked and cannot be resumed; the session is back to waiting."""

    room: str
    message: str


@dataclass(frozen=True)
class Reconnecting:
    """The member's stream broke; attempt number `attempt` to resume its stay in `room` starts in `delay` s."""

    room: str
    attempt: int
    delay: float


@dataclass(frozen=True)
class HistoryMessage:
    """A message said in the room before the member joined, replayed because the join asked for history."""

    message: chat_pb2.Message


Incoming = chat_pb2.Event | HistoryMessage | Reconnecting | ConnectionLost


@dataclass(frozen=True)
class StreamEnd:
    """How a stream ended: the gRPC status name (`UNAVAILABLE`) and details, or an empty code for a clean end."""

    code: str = ""
    details: str = ""


@dataclass(eq=False)
class Stay:
    """One stay in a room, as the member knows it."""

    room: str
    name: str
    token: str
    # The newest live message seen; a message numbered no higher is a duplicate.
    last_seq: int
    members: set[str]
    # The feed carrying the stay, None while reconnecting.
    feed: Feed | None
    # Lines and whispers by client id, in the order sent, until the server answers them.
    unanswered: dict[str, chat_pb2.ChatRequest] = field(default_factory=dict)


@dataclass(eq=False)
class Feed:
    """One Chat stream: a join, or a resume of `stay`; `stay` is set once a join is answered."""

    room: str
    stay: Stay | None = None
    resuming: bool = False
    answered: bool = False
    caught_up: bool = False
    # The error that refused a resume, told to the user in words about coming back rather than about joining.
    refusal: chat_pb2.Error | None = None
    # How many replayed messages are still to come after Joined.
    replaying: int = 0
    # The client ended (or is ending) this stream itself: its end is no loss.
    leaving: bool = False


@dataclass
class Outcome:
    """What one event (or the end of a feed) means for the session: what to show, as whom, and what to do."""

    me: str = ""
    show: list[Incoming] = field(default_factory=list)
    # The join was answered by this event: `joined`, or None when refused.
    answered: bool = False
    joined: chat_pb2.Joined | None = None
    # Every replayed message has been delivered.
    caught_up: bool = False
    # The stay lost its feed and should be resumed on a new one.
    resume: bool = False
    # The room is gone: the client half-closes the stream, as the server waits for.
    half_close: bool = False
    # Client ids the server has now answered, with the echo or an error.
    answered_ids: list[str] = field(default_factory=list)


class Protocol:
    """A session's state: at most one stay, its sequence, its members and its unanswered lines."""

    def __init__(self, address: str, rand: Callable[[float, float], float] = random.uniform) -> None:
        self.address = address
        self.current: Stay | None = None
        # Repeats of messages already shown; expected only as echoes of lines re-sent after a resume.
        self.repeats_dropped = 0
        self._client_ids = itertools.count(1)
        self._rand = rand

    @property
    def reconnecting(self) -> bool:
        """Whether the member's stream broke and the stay waits to be resumed."""
        return self.current is not None and self.current.feed is None

    def require_room(self) -> Stay:
        """The current stay; SessionError when waiting."""
        if self.current is None:
            raise SessionError(NOT_IN_ROOM)
        return self.current

    def join(self, room: str, name: str | None, *, create: bool, history: int) -> tuple[Feed, chat_pb2.ChatRequest]:
        """A feed for a new join and the request that opens it; SessionError when already in a room."""
        if self.current is not None:
            state = " (reconnecting to it)" if self.reconnecting else ""
            raise SessionError(f"you are already in room {self.current.room}{state}; /leave first")
        join = chat_pb2.ChatRequest.JoinRoom(room=room, name=name or "", create=create, history=history)
        return Feed(room), chat_pb2.ChatRequest(join=join)

    def resume(self, stay: Stay) -> tuple[Feed, chat_pb2.ChatRequest]:
        """A feed for one attempt to resume `stay` and the request that opens it."""
        resume = chat_pb2.ChatRequest.Resume(token=stay.token, last_seq=stay.last_seq)
        join = chat_pb2.ChatRequest.JoinRoom(room=stay.room, name=stay.name, resume=resume)
        return Feed(stay.room, stay, resuming=True), chat_pb2.ChatRequest(join=join)

    def say(self, text: str, *, action: bool = False) -> tuple[Stay, str, chat_pb2.ChatRequest]:
        """Record a line as unanswered; the stay, its client id and the request to send."""
        stay, client_id = self._line(text)
        say = chat_pb2.ChatRequest.SendMessage(text=text, client_id=client_id, action=action)
        request = stay.unanswered[client_id] = chat_pb2.ChatRequest(say=say)
        return stay, client_id, request

    def whisper(self, recipient: str, text: str) -> tuple[Stay, str, chat_pb2.ChatRequest]:
        """Record a whisper as unanswered; the stay, its client id and the request to send."""
        stay, client_id = self._line(text)
        whisper = chat_pb2.ChatRequest.SendWhisper(recipient=recipient, text=text, client_id=client_id)
        request = stay.unanswered[client_id] = chat_pb2.ChatRequest(whisper=whisper)
        return stay, client_id, request

    def _line(self, text: str) -> tuple[Stay, str]:
        stay = self.require_room()
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_LINE_BYTES:
            raise SessionError(too_long(size))
        return stay, str(next(self._client_ids))

    def unanswered(self, stay: Stay) -> list[tuple[str, chat_pb2.ChatRequest]]:
        """Every line of `stay` still unanswered, in the order sent."""
        return list(stay.unanswered.items())

    def unsent(self, stay: Stay, client_id: str) -> SessionError:
        """A line whose stream ended under its write while the stay is gone: forget it, and say so."""
        del stay.unanswered[client_id]
        return SessionError(f"not sent: your stream to room {stay.room} has ended")

    def leave(self) -> Stay:
        """Back to waiting; the stay left."""
        stay = self.require_room()
        self._drop(stay)
        return stay

    def who(self) -> tuple[str, list[str]]:
        """The room and its members, sorted, as last reported by the server."""
        stay = self.require_room()
        return stay.room, sorted(stay.members)

    def adopt(self, feed: Feed) -> bool:
        """Make a resumed feed carry its stay; False if the stay is no longer current."""
        stay = feed.stay
        if stay is None or self.current is not stay:
            return False
        stay.feed = feed
        return True

    def attempt(self, stay: Stay, number: int) -> Reconnecting:
        """Reconnect attempt number `number` (from 1) of `stay`, with its delay: backoff with jitter."""
        # The exponent is bounded only so that a very long outage cannot overflow a float.
        base = RECONNECT_FIRST_DELAY * 2.0 ** min(number - 1, 32)
        jitter = self._rand(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)
        return Reconnecting(stay.room, number, min(base * jitter, RECONNECT_MAX_DELAY))

    def retry_refusal(self, feed: Feed) -> bool:
        """Whether a refused resume is worth trying again (too many resumes from one address at once)."""
        return feed.refusal is not None and feed.refusal.code == chat_pb2.ERROR_CODE_RATE_LIMITED

    def refused(self, stay: Stay, error: chat_pb2.Error | None) -> ConnectionLost:
        """The server refused to resume `stay`: back to waiting, and why."""
        self._drop(stay)
        if error is not None and error.code == chat_pb2.ERROR_CODE_ROOM_NOT_FOUND:
            why = f"room {stay.room} no longer exists (it was closed, or the server restarted)"
        elif error is not None and error.code == chat_pb2.ERROR_CODE_NAME_TAKEN:
            why = f"someone else took the name {stay.name} in room {stay.room} while you were away"
        else:
            detail = error.message if error is not None else "the server refused"
            why = f"could not get back into room {stay.room}: {detail}"
        return ConnectionLost(stay.room, f"{why}; you are back in the waiting state{_dropped(stay)}")

    def receive(self, feed: Feed, event: chat_pb2.Event) -> Outcome:
        """Apply one event of `feed`."""
        kind = event.WhichOneof("kind")
        if kind == "joined":
            stay = self._joined(feed, event.joined)
        elif feed.stay is None or not feed.answered:
            return self._before_joined(feed, event)
        else:
            stay = feed.stay
        outcome = Outcome(me=stay.name)
        shown: Incoming | None = event
        if kind == "message":
            shown = self._message(feed, stay, event, outcome)
        elif kind == "whisper":
            self._acknowledge(stay, event.whisper.sender, event.whisper.client_id, outcome)
        elif kind == "member_joined":
            stay.members.add(event.member_joined.name)
        elif kind == "member_left":
            stay.members.discard(event.member_left.name)
        elif kind == "members":
            stay.members = set(event.members.names)
        elif kind == "error" and stay.unanswered.pop(event.error.client_id, None) is not None:
            outcome.answered_ids.append(event.error.client_id)
        elif kind == "room_closed":
            shown = self._room_closed(feed, stay, event, outcome)
        if shown is not None:
            outcome.show.append(shown)
        if kind == "joined" and not feed.answered:
            feed.answered = outcome.answered = True
            outcome.joined = event.joined
        if not feed.replaying and not feed.caught_up:
            feed.caught_up = outcome.caught_up = True
        return outcome

    def ended(self, feed: Feed, end: StreamEnd) -> Outcome:
        """Apply the end of an answered `feed`: nothing, a resume to start, or the stay lost."""
        stay = feed.stay
        if stay is None or feed.leaving or stay.feed is not feed or self.current is not stay:
            return Outcome()
        if end.code == UNAVAILABLE:
            stay.feed = None
            return Outcome(me=stay.name, resume=True)
        self._drop(stay)
        return Outcome(me=stay.name, show=[ConnectionLost(stay.room, self._lost(stay, end))])

    def _before_joined(self, feed: Feed, event: chat_pb2.Event) -> Outcome:
        """An event before the join is answered, which can only be the error that refuses it."""
        outcome = Outcome()
        if feed.resuming:
            feed.refusal = event.error if event.HasField("error") else None
        else:
            outcome.show.append(event)
        if event.HasField("error") and not feed.answered:
            feed.answered = outcome.answered = True
        return outcome

    def _joined(self, feed: Feed, joined: chat_pb2.Joined) -> Stay:
        stay = feed.stay
        if stay is None:
            stay = feed.stay = Stay(
                joined.room, joined.name, joined.resume_token, joined.last_seq, set(joined.members), feed
            )
            self.current = stay
        else:
            stay.token = joined.resume_token
            stay.members = set(joined.members)
            # Messages the server no longer keeps are gone for good; the next resume must not count them again.
            stay.last_seq = max(stay.last_seq, joined.last_seq - joined.replayed)
        feed.replaying = joined.replayed
        return stay

    def _message(self, feed: Feed, stay: Stay, event: chat_pb2.Event, outcome: Outcome) -> Incoming | None:
        """What to show for a message: history is marked as such, and a repeat of one seen is dropped."""
        message = event.message
        self._acknowledge(stay, message.sender, message.client_id, outcome)
        if feed.replaying:
            feed.replaying -= 1
            if not feed.resuming:
                return HistoryMessage(message)
        if message.seq <= stay.last_seq:
            self.repeats_dropped += 1
            return None
        stay.last_seq = message.seq
        return event

    def _acknowledge(self, stay: Stay, sender: str, client_id: str, outcome: Outcome) -> None:
        if client_id and sender == stay.name and stay.unanswered.pop(client_id, None) is not None:
            outcome.answered_ids.append(client_id)

    def _room_closed(self, feed: Feed, stay: Stay, event: chat_pb2.Event, outcome: Outcome) -> Incoming | None:
        outcome.half_close = True
        if event.room_closed.reason == chat_pb2.CLOSE_REASON_SERVER_SHUTDOWN and not feed.leaving:
            if feed is stay.feed:
                stay.feed = None
                outcome.resume = True
                return event
            # A resume still catching up just fails with its stream, and the next attempt goes on trying.
            return None
        # Back to waiting before the event is shown, so the next command already sees the new state.
        self._drop(stay)
        return event

    def _drop(self, stay: Stay) -> None:
        if self.current is stay:
            self.current = None

    def _lost(self, stay: Stay, end: StreamEnd) -> str:
        dropped = _dropped(stay)
        if not end.code:
            return f"the server ended your stay in room {stay.room}{dropped}"
        if end.code in _DROPPED_BY_SERVER:
            reason = end.details or f"the server dropped you from room {stay.room} ({end.code})"
            return f"{reason}{dropped}"
        return (
            f"the chat server at {self.address} went away ({end.code}); you are no longer in room {stay.room}{dropped}"
        )


def too_long(size: int) -> str:
    """Why a line of `size` bytes was not sent."""
    return (
        f"not sent: a line is at most {MAX_LINE_BYTES:,} bytes of UTF-8 and this one has {size:,}; "
        "split it into shorter lines"
    )


def _dropped(stay: Stay) -> str:
    count = len(stay.unanswered)
    if not count:
        return ""
    return "; 1 unsent line was dropped" if count == 1 else f"; {count} unsent lines were dropped"
