"""What a store keeps for the chat service, behind one small interface: rooms, the names held in them, each room's
ordered log, and the signals server processes send each other about a room.

The in-memory store and the NATS JetStream store implement it. Delivery to members (queues, batching, eviction,
encoding once per process, the replay-then-live hand-over) is the registry's, the same over every store. Every
operation may await, so the registry never relies on one running without a pause; the store is the one owner of what
it keeps and makes each operation whole (a name is claimed or not, a message has its sequence number or is not kept).

Words: a *room record* is what every server knows of a room; a *seat* is a name claimed in a room, *live* while a
member holds it and *held* for the resume grace after its connection dropped; the *log* is a room's messages in order,
ending with RoomClosed when the room is killed; a *signal* is news about a room that is not logged (presence, a
whisper, a takeover); a process *follows* a room while it has members there, and hears its log and signals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from chat_service.events import CloseReason, MemberJoined, MemberLeft, Message, RoomClosed, RoomInfo, Whisper
from chat_service.registry import DEFAULT_NAME

# Rooms stay until killed, about 1.4 KiB each when empty: a cap keeps a script from filling the server's memory.
DEFAULT_MAX_ROOMS = 10_000
# Names held server-wide, by members (an idle one costs about 30 KiB) and for resumes.
DEFAULT_MAX_MEMBERS = 50_000
DEFAULT_RESUME_GRACE_SECONDS = 30.0
# Dedup keys a room remembers, the newest kept: a client re-sends within seconds of reconnecting, long before a room
# has had this many lines with client ids since.
DEDUP_KEYS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """A room as every server process knows it: `uid` tells it from an older room of the same name, and `secret`
    signs its resume tokens, so that any process can check a token another issued."""

    name: str
    uid: str
    secret: bytes


@dataclass(frozen=True, slots=True)
class Seat:
    """A name claimed in a room. `claim` is new on every claim, so a takeover tells the old holder from the new one."""

    name: str
    key: str
    token: str
    claim: str
    took_over: bool


@dataclass(frozen=True, slots=True)
class Takeover:
    """The seat with `key` was resumed by the claim `claim`: any member holding it under another claim stops."""

    key: str
    claim: str


@dataclass(frozen=True, slots=True)
class Backlog:
    """Messages read from a room's log, oldest first, how many asked for are no longer kept, and the log's last seq
    when it was read."""

    messages: list[Message]
    lost: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Appended:
    """A message as the log keeps it, with its seq; `duplicate` when its dedup key was already logged, in which case
    `message` is the first one and nothing new was logged."""

    message: Message
    duplicate: bool


Entry = Message | RoomClosed
Signal = MemberJoined | MemberLeft | Takeover


class Follower(Protocol):
    """This process's side of a followed room; the store calls it on the event loop, never concurrently."""

    def logged(self, entry: Entry) -> None:
        """The room's next log entry: messages in seq order without gaps, RoomClosed last."""

    def signalled(self, signal: Signal) -> None:
        """A signal some process (this one included) sent about the room."""

    def whispered(self, recipient_key: str, whisper: Whisper) -> None:
        """A whisper for the member of this room whose name key is `recipient_key`, if this process holds it."""


class Store(Protocol):
    """Rooms, names and logs, shared by every server process that uses the same store; raises ChatError."""

    @property
    def available(self) -> bool:
        """Whether the store answers now; while it does not, operations raise STORE_UNAVAILABLE."""

    @property
    def shared(self) -> bool:
        """Whether other server processes may share the rooms: they outlive this process's `close`."""

    @property
    def room_count(self) -> int:
        """Rooms this process knows to be open; for metrics, so cheap and never awaiting."""

    @property
    def seated(self) -> int:
        """Names this process holds (live and held); what --max-members caps."""

    async def create_room(self, name: str) -> RoomRecord:
        """Make a room, atomically across processes; raises ROOM_EXISTS, or ROOM_LIMIT past --max-rooms."""

    async def find_room(self, name: str) -> RoomRecord | None:
        """The open room called `name` (or a name too alike to tell apart), if there is one."""

    async def list_rooms(self) -> list[RoomInfo]:
        """Every open room, sorted by name, with its live members counted across processes."""

    async def members(self, room: RoomRecord) -> list[str]:
        """The names held live in `room`, across processes, sorted; raises ROOM_NOT_FOUND."""

    async def close_room(self, name: str, reason: CloseReason) -> RoomRecord:
        """Log RoomClosed in the room and forget it and its names; raises ROOM_NOT_FOUND."""

    async def prune_rooms(self) -> list[str]:
        """Close (as KILLED) every room where no name is held, live or held; returns their names, sorted."""

    async def claim(self, room: RoomRecord, name: str, token_for: TokenIssuer, resume_token: str = "") -> Seat:
        """Claim `name` in `room` live (an empty name: the lowest free numbered default). With `resume_token`, which
        the caller has checked was issued for this name, a seat held under that token is taken over (Takeover is
        signalled) and a free name is claimed. Raises NAME_TAKEN, MEMBER_LIMIT, ROOM_NOT_FOUND."""

    async def vacate(self, room: RoomRecord, seat: Seat, grace: float) -> None:
        """The member holding `seat` under its claim left: the name is held for `grace` seconds (0: freed now) for a
        resume. Does nothing if the seat was taken over or the room closed."""

    async def append(self, room: RoomRecord, message: Message, dedup_key: str = "") -> Appended:
        """Log `message` (its seq is ignored) with the room's next seq; once per non-empty `dedup_key` for at least
        the resume grace. Followers hear it through `logged`; returns once it is kept. Raises ROOM_NOT_FOUND.
        Appends to one room are logged in the order called, even one called before the last returned (pipelined
        lines): an append takes its place before it awaits anything a later call could overtake (a round trip)."""

    async def read(self, room: RoomRecord, *, after: int | None = None, last: int = 0) -> Backlog:
        """The messages after seq `after` (a resume) or else the newest `last` (history on joining)."""

    async def whisper(self, room: RoomRecord, recipient: str, whisper: Whisper) -> str:
        """Send `whisper` to the live member called `recipient` in `room`, wherever it is; returns that member's name
        as it holds it. Raises MEMBER_NOT_FOUND, saying so when the name is only held for a resume."""

    async def signal(self, room: RoomRecord, signal: Signal) -> None:
        """Tell every process following `room`, this one included, through `signalled`."""

    async def follow(self, room: RoomRecord, follower: Follower) -> int:
        """Start hearing the room's log and signals (one follower per room per process); returns the log's last seq
        then: every later entry reaches `follower.logged`. Raises ROOM_NOT_FOUND."""

    async def unfollow(self, room: RoomRecord) -> None:
        """Stop hearing the room; nothing reaches its follower afterwards."""

    async def close(self) -> None:
        """Stop this process's use of the store: it stops following rooms. The in-memory store closes every room
        (SERVER_SHUTDOWN) as its rooms go with the process; a shared store keeps them for the other processes."""


def numbered_name(number: int) -> str:
    """The default name with `number`: the first is plain, the rest carry their number."""
    return DEFAULT_NAME if number == 1 else f"{DEFAULT_NAME}-{number}"


class TokenIssuer(Protocol):
    """Makes the resume token for the name with key `key` in a room; the registry signs it with the room's secret."""

    def __call__(self, key: str) -> str: ...
