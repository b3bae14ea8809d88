"""What the coordinator and its worker processes tell each other over their pipe (all picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.procstat import Sched
from bench.shapes import MemberSpec


@dataclass(frozen=True)
class WorkerPlan:
    """Everything one worker process needs: its members, the load to offer, and its time limits."""

    index: int
    address: str
    members: tuple[MemberSpec, ...]
    room_sizes: dict[str, int]
    wave_size: int  # members of a room that join together, after the room's watcher
    room_messages: int  # every member must receive this many messages
    messages: int  # each sender says this many
    window: int  # burst: messages a sender may have unacknowledged; 0 means paced (steady)
    interval_ns: int  # steady: time between one sender's messages
    latency: bool  # record send-to-receipt latency of every delivery
    streams_per_channel: int
    open_concurrency: int
    join_timeout: float
    run_timeout: float
    drain_timeout: float


@dataclass(frozen=True)
class Opened:
    """Every stream is open and answered once by the server; this worker's rooms exist, their watchers in them."""


@dataclass(frozen=True)
class Join:
    """Join the members of `wave` now; every worker joins its share at once, so the server sees them together."""

    wave: int


@dataclass(frozen=True)
class Settled:
    """The wave joined and every member has seen every join so far: the server is quiet again."""

    wave: int
    cpu: float
    sched: Sched
    channels: int


@dataclass(frozen=True)
class Go:
    """Start sending; `at_ns` is the coordinator's CLOCK_MONOTONIC start of the measured phase."""

    at_ns: int


@dataclass(frozen=True)
class Done:
    """Every member received every message (or the run timed out): the measured phase is over here."""

    cpu: float
    sched: Sched
    finish_ns: int  # when the last message arrived at the last member of this worker
    deliveries: int
    responses: int  # ChatResponse batches those deliveries came in
    sender_lag_ns: int  # steady: how far the worst sender fell behind its schedule


@dataclass(frozen=True)
class End:
    """The server was asked to stop: read every stream to its end and report."""


@dataclass
class Check:
    """Whether every message arrived exactly once and in order at every member, counted over members."""

    members: int = 0
    lost: int = 0  # messages some member never received
    duplicated: int = 0
    out_of_order: int = 0  # messages that did not come with the next expected sequence number
    extra: int = 0  # messages beyond the number said (a sequence number past the last)
    incomplete: int = 0  # members that did not receive every message
    dropped: int = 0  # members whose stream the server ended with RESOURCE_EXHAUSTED (too slow)
    stream_errors: int = 0  # members whose stream failed with another status
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was lost, duplicated, reordered or cut off."""
        return not (
            self.lost
            or self.duplicated
            or self.out_of_order
            or self.extra
            or self.incomplete
            or self.dropped
            or self.stream_errors
        )

    def add(self, other: Check) -> None:
        """Fold another member's or worker's check into this one."""
        self.members += other.members
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.out_of_order += other.out_of_order
        self.extra += other.extra
        self.incomplete += other.incomplete
        self.dropped += other.dropped
        self.stream_errors += other.stream_errors
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def summary(self) -> str:
        """One line: 'exactly once, in order' or what went wrong."""
        if self.ok:
            return f"exactly once, in order at all {self.members} members"
        parts = [
            f"{value} {label}"
            for value, label in (
                (self.lost, "lost"),
                (self.duplicated, "duplicated"),
                (self.out_of_order, "out of order"),
                (self.extra, "extra"),
                (self.incomplete, "members incomplete"),
                (self.dropped, "members dropped as too slow"),
                (self.stream_errors, "streams failed"),
            )
            if value
        ]
        return "FAILED: " + ", ".join(parts)


@dataclass(frozen=True)
class Final:
    """The worker's verdict on ordering and counts, and its latency samples (int64 ns, native order)."""

    check: Check
    latencies: bytes


@dataclass(frozen=True)
class Failed:
    """The worker could not carry on; `reason` says why."""

    reason: str


Report = Opened | Settled | Done | Final | Failed
Command = Join | Go | End
