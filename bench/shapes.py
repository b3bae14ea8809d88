"""The load shapes the benchmark runs, and how a shape's members are spread over worker processes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a shape drives its rooms."""

    BURST = "burst"  # closed loop: each sender keeps at most `window` messages in flight
    STEADY = "steady"  # open loop: senders pace their messages to a fixed offered load
    IDLE = "idle"  # members join and send nothing; the figure is memory


@dataclass(frozen=True)
class Shape:
    """One benchmark scenario: `rooms` rooms of `members` members (senders included)."""

    name: str
    group: str
    kind: Kind
    rooms: int
    members: int
    senders: int = 0
    messages: int = 0  # per sender
    window: int = 16
    seconds: float = 0.0  # steady: how long the offered load lasts

    @property
    def room_messages(self) -> int:
        """Messages said in each room, which every member of the room must receive exactly once."""
        return self.senders * self.messages

    @property
    def total_members(self) -> int:
        """Members across all rooms."""
        return self.rooms * self.members

    @property
    def deliveries(self) -> int:
        """Message events the server must deliver in the measured phase."""
        return self.rooms * self.members * self.room_messages

    @property
    def offered_rate(self) -> float:
        """Steady shapes: deliveries per second offered; 0 for the others."""
        return self.deliveries / self.seconds if self.kind is Kind.STEADY and self.seconds else 0.0

    @property
    def key(self) -> tuple[object, ...]:
        """Shapes with equal keys measure the same thing, so one result serves both."""
        return (self.kind, self.rooms, self.members, self.senders, self.messages, self.window, self.seconds)

    def describe(self) -> str:
        """A one-line human description."""
        base = f"{self.rooms} room(s) x {self.members} members"
        if self.kind is Kind.IDLE:
            return f"{base}, joined and idle"
        if self.kind is Kind.STEADY:
            return (
                f"{base}, {self.senders} senders/room, {self.offered_rate:,.0f} deliveries/s offered "
                f"for {self.seconds:g} s"
            )
        return f"{base}, {self.senders} sender(s)/room x {self.messages} messages, window {self.window}"


def burst(rooms: int, members: int, senders: int, messages: int, *, group: str = "burst", prefix: str = "") -> Shape:
    """A closed-loop burst: every sender says `messages` lines, at most 16 unacknowledged at a time."""
    name = f"{prefix or group}-{rooms}x{members}"
    return Shape(name, group, Kind.BURST, rooms, members, senders, messages)


def steady(rooms: int, members: int, senders: int, rate: int, seconds: float) -> Shape:
    """An open-loop load of `rate` deliveries per second for `seconds`, spread evenly over the senders."""
    messages = round(rate * seconds / (rooms * members * senders))
    return Shape(f"steady-{rooms}x{members}", "steady", Kind.STEADY, rooms, members, senders, messages, 0, seconds)


def idle(rooms: int, members: int) -> Shape:
    """`rooms` x `members` members that join and stay silent."""
    return Shape(f"idle-{rooms * members}", "idle", Kind.IDLE, rooms, members)


def _scale(rooms: tuple[int, ...], members: tuple[int, ...], room_size: int, messages: int) -> list[Shape]:
    by_rooms = [burst(n, room_size, 2, messages, group="scale", prefix="rooms") for n in rooms]
    by_members = [burst(1, n, 1, messages, group="scale", prefix="members") for n in members]
    return by_rooms + by_members


FULL: list[Shape] = [
    burst(10, 100, 2, 200),
    burst(1, 1000, 1, 200),
    steady(10, 100, 2, 20_000, 10.0),
    idle(20, 100),
    *_scale((1, 4, 16), (100, 1000, 4000), 100, 200),
]

QUICK: list[Shape] = [
    burst(4, 50, 2, 50),
    burst(1, 200, 1, 50),
    steady(2, 50, 2, 2_000, 3.0),
    idle(4, 50),
    *_scale((1, 4), (50, 200, 400), 50, 50),
]


def select(shapes: list[Shape], only: list[str]) -> list[Shape]:
    """The shapes named in `only` (a full name such as burst-10x100, or a group: burst, steady, idle, scale)."""
    if not only:
        return shapes
    chosen = [shape for shape in shapes if shape.name in only or shape.group in only]
    unknown = sorted(set(only) - {shape.name for shape in shapes} - {shape.group for shape in shapes})
    if unknown:
        names = ", ".join(shape.name for shape in shapes)
        raise ValueError(f"unknown shape {', '.join(unknown)}; choose from burst, steady, idle, scale, {names}")
    return chosen


@dataclass(frozen=True)
class MemberSpec:
    """One member a worker must join: the room's watcher creates the room and acknowledges its senders."""

    room: str
    name: str
    sender: bool = False
    watcher: bool = False
    phase: float = 0.0  # steady senders: offset within one send interval, so senders do not fire together
    wave: int = -1  # which join wave; the watcher (-1) joins before every wave


def waves(shape: Shape, wave_size: int) -> int:
    """How many join waves the members after each room's watcher need."""
    return -(-(shape.members - 1) // wave_size)


def room_size_after(wave: int, room_members: int, wave_size: int) -> int:
    """Members in a room of `room_members` once `wave` has joined (the watcher, then `wave_size` a wave)."""
    return min(room_members, 1 + (wave + 1) * wave_size)


def assign(shape: Shape, workers: int, wave_size: int) -> list[list[MemberSpec]]:
    """Spread the shape's members over `workers` processes, each room's senders with its watcher.

    The watcher (the room's first non-sending member) gates each sender's in-flight window, so it shares a
    process with the senders and the acknowledgement needs no cross-process signal. When there are fewer rooms
    than workers, the other members of a room are dealt round-robin over all workers. The members after the
    watcher join in waves of `wave_size`, so no member ever has more join announcements queued than that.
    """
    plans: list[list[MemberSpec]] = [[] for _ in range(workers)]
    spread = shape.rooms < workers
    all_senders = max(1, shape.rooms * shape.senders)
    for r in range(shape.rooms):
        room = f"r{r}"
        home = r % workers
        plans[home].append(MemberSpec(room, "w", watcher=True))
        for s in range(shape.senders):
            phase = (r * shape.senders + s) / all_senders
            plans[home].append(MemberSpec(room, f"s{s}", sender=True, phase=phase, wave=s // wave_size))
        for m in range(shape.members - shape.senders - 1):
            target = (home + 1 + m) % workers if spread else home
            plans[target].append(MemberSpec(room, f"m{m}", wave=(shape.senders + m) // wave_size))
    return plans
