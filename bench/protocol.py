"""What the coordinator and its worker processes tell each other over their pipe (all picklable)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bench.shapes import MemberSpec, Shape


@dataclass(frozen=True)
class WorkerPlan:
    """Everything one worker process needs: the shape, its share of the members, and its time limits."""

    address: str
    shape: Shape
    members: tuple[MemberSpec, ...]
    wave_size: int  # members of a room that join together, after the room's watcher
    streams_per_channel: int
    join_timeout: float  # each step of opening and joining
    run_timeout: float  # the measured phase


@dataclass(frozen=True)
class Join:
    """Join the members of `wave` now; every worker joins its share at once, so the server sees them together."""

    wave: int


@dataclass(frozen=True)
class Go:
    """Start sending; `at_ns` is the coordinator's CLOCK_MONOTONIC start of the measured phase."""

    at_ns: int


@dataclass(frozen=True)
class End:
    """The server was asked to stop: read every stream to its end and report."""


@dataclass(frozen=True)
class Ready:
    """Every stream is open (or the wave has joined and every member has heard of it); a bare server's port."""

    port: int = 0


@dataclass(frozen=True)
class Done:
    """Every member received every message (or the run stalled): the measured phase is over here."""

    finish_ns: int  # when the last message arrived at the last member of this worker
    deliveries: int
    responses: int  # ChatResponse batches those deliveries came in


@dataclass
class Check:
    """Whether every message arrived exactly once and in order at every member, counted over members."""

    members: int = 0
    lost: int = 0  # messages after the last one a member received
    duplicated: int = 0  # messages that came again, or after a later one
    out_of_order: int = 0  # messages that came before an earlier one (which is lost, or comes late)
    extra: int = 0  # messages beyond the number said (a sequence number past the last)
    dropped: int = 0  # members whose stream the server ended with RESOURCE_EXHAUSTED (too slow)
    stream_errors: int = 0  # members whose stream failed with another status
    examples: list[str] = field(default_factory=list)

    def _counts(self) -> dict[str, int]:
        names = (f.name for f in dataclasses.fields(self) if f.name not in ("members", "examples"))
        return {name: getattr(self, name) for name in names}

    @property
    def ok(self) -> bool:
        """True when nothing was lost, duplicated, reordered or cut off."""
        return not any(self._counts().values())

    def add(self, other: Check) -> None:
        """Fold another member's or worker's check into this one."""
        self.members += other.members
        for name, value in other._counts().items():
            setattr(self, name, getattr(self, name) + value)
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def summary(self) -> str:
        """One line: 'exactly once, in order' or what went wrong."""
        if self.ok:
            return f"exactly once, in order at all {self.members} members"
        labels = {"dropped": "members dropped as too slow"}
        problems = (f"{value} {labels.get(name, name.replace('_', ' '))}" for name, value in self._counts().items())
        return "FAILED: " + ", ".join(problem for problem in problems if not problem.startswith("0 "))


@dataclass(frozen=True)
class Final:
    """The worker's verdict on ordering and counts, and its latency samples (int64 ns, native order)."""

    check: Check
    latencies: bytes


@dataclass(frozen=True)
class Failed:
    """The worker could not carry on; `reason` says why."""

    reason: str


Command = Join | Go | End
