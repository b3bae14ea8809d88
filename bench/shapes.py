"""The load shapes the benchmark runs, and how a shape's members are spread over worker processes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a shape drives its rooms."""

    BURST = "burst"  # closed loop: each sender keeps at most WINDOW messages in flight
    STEADY = "steady"  # open loop: senders pace their messages to a fixed offered load
    IDLE = "idle"  # members join and send nothing; the figure is memory


WINDOW = 16  # a burst sender's messages not yet seen by its room's watcher, at most


@dataclass(frozen=True)
class Shape:
    """One benchmark scenario: `rooms` rooms of `members` members (senders included)."""

    name: str
    kind: Kind
    rooms: int
    members: int
    senders: int = 0
    messages: int = 0  # per sender
    seconds: float = 0.0  # steady: how long the offered load lasts

    @property
    def group(self) -> str:
        """burst, steady, idle, or scale for the bursts named rooms-... and members-..."""
        prefix = self.name.partition("-")[0]
        return "scale" if prefix in ("rooms", "members") else prefix

    @property
    def room_messages(self) -> int:
        """Messages said in each room, which every member of the room must receive exactly once."""
        return self.senders * self.messages

    @property
    def total_members(self) -> int:
        return self.rooms * self.members

    @property
    def deliveries(self) -> int:
        """Message events the server must deliver in the measured phase."""
        return self.total_members * self.room_messages

    @property
    def interval_ns(self) -> int:
        """Steady: the time between one sender's messages; 0 for the others."""
        return int(self.seconds * 1e9 / self.messages) if self.kind is Kind.STEADY else 0

    def describe(self) -> str:
        """A one-line human description."""
        base = f"{self.rooms} room(s) x {self.members} members"
        if self.kind is Kind.IDLE:
            return f"{base}, joined and idle"
        rate = f", {self.deliveries / self.seconds:,.0f} deliveries/s" if self.seconds else ""
        return f"{base}, {self.senders} sender(s)/room x {self.messages} messages{rate}"


def burst(rooms: int, members: int, senders: int, messages: int, prefix: str = "burst") -> Shape:
    return Shape(f"{prefix}-{rooms}x{members}", Kind.BURST, rooms, members, senders, messages)


def steady(rooms: int, members: int, senders: int, rate: int, seconds: float) -> Shape:
    """An open-loop load of `rate` deliveries per second for `seconds`, spread evenly over the senders."""
    messages = round(rate * seconds / (rooms * members * senders))
    return Shape(f"steady-{rooms}x{members}", Kind.STEADY, rooms, members, senders, messages, seconds)


def _scale(rooms: tuple[int, ...], members: tuple[int, ...], room_size: int, messages: int) -> list[Shape]:
    by_rooms = [burst(n, room_size, 2, messages, "rooms") for n in rooms]
    return by_rooms + [burst(1, n, 1, messages, "members") for n in members]


# The scale group leaves out the room sizes the bursts above measure already.
FULL = [
    burst(10, 100, 2, 200),
    burst(1, 1000, 1, 200),
    steady(10, 100, 2, 20_000, 10.0),
    Shape("idle-2000", Kind.IDLE, 20, 100),
    *_scale((1, 4, 16), (100, 4000), 100, 200),
]
QUICK = [
    burst(4, 50, 2, 50),
    burst(1, 200, 1, 50),
    steady(2, 50, 2, 2_000, 2.0),
    Shape("idle-200", Kind.IDLE, 4, 50),
    *_scale((1,), (50, 400), 50, 50),
]


def select(shapes: list[Shape], only: list[str]) -> list[Shape]:
    """The shapes named in `only` (a full name such as burst-10x100, or a group: burst, steady, idle, scale)."""
    unknown = set(only) - {shape.name for shape in shapes} - {shape.group for shape in shapes}
    if unknown:
        names = ", ".join(shape.name for shape in shapes)
        raise ValueError(f"unknown shape {', '.join(sorted(unknown))}; choose a group or one of {names}")
    return [shape for shape in shapes if not only or shape.name in only or shape.group in only]


@dataclass(frozen=True)
class MemberSpec:
    """One member a worker must join: the room's watcher creates the room and acknowledges its senders."""

    room: str
    name: str
    sender: bool = False
    watcher: bool = False
    phase: float = 0.0  # steady senders: offset within one send interval, so senders do not fire together
    wave: int = -1  # which join wave; the watcher (-1) joins before every wave


def assign(shape: Shape, workers: int, wave_size: int) -> list[list[MemberSpec]]:
    """Spread the shape's members over `workers` processes, each room's senders with its watcher.

    The watcher gates its senders' windows, so they share a process and need no cross-process signal; when there
    are fewer rooms than workers, a room's other members are dealt round-robin over all workers.
    """
    plans: list[list[MemberSpec]] = [[] for _ in range(workers)]
    all_senders = max(1, shape.rooms * shape.senders)
    for r in range(shape.rooms):
        room, home = f"r{r}", r % workers
        plans[home].append(MemberSpec(room, "w", watcher=True))
        for s in range(shape.senders):
            phase = (r * shape.senders + s) / all_senders
            plans[home].append(MemberSpec(room, f"s{s}", sender=True, phase=phase, wave=s // wave_size))
        for m in range(shape.members - shape.senders - 1):
            target = (home + 1 + m) % workers if shape.rooms < workers else home
            plans[target].append(MemberSpec(room, f"m{m}", wave=(shape.senders + m) // wave_size))
    return [plan for plan in plans if plan]
