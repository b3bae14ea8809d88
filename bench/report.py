"""Turning runs into figures: medians over runs, the bottleneck verdict, the printed table and results.json."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.protocol import Check
from bench.runner import RunResult
from bench.shapes import Kind, Shape

BUSY = 0.9  # an event loop busy (running or waiting for a CPU) this much of the time never waits for work
NOISE = 0.2  # CPUs used by other processes beyond which the figures are suspect

# The targets: (figure, floor, goal), server CPU µs per delivery unless the figure says otherwise.
TARGETS: dict[str, list[tuple[str, float, float]]] = {
    "burst-10x100": [("server_us_per_delivery", 1.5, 0.76)],
    "burst-1x1000": [("server_us_per_delivery", 1.5, 0.75)],
    "steady-10x100": [("server_us_per_delivery", 13.0, 6.4), ("latency_p99_ms", 5.0, 1.6)],
    "idle-2000": [("rss_per_member_kib", 32.0, 9.7)],
}


@dataclass
class Outcome:
    """A shape's result: the median of its runs, each run, and any failure that stopped a run."""

    shape: Shape
    median: RunResult | None = None
    runs: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    same_as: str | None = None  # measured under another name with identical parameters

    @property
    def ok(self) -> bool:
        """Every run finished, every message arrived exactly once and in order, and the server stopped cleanly."""
        return not self.errors and all(_run_ok(run) for run in self.runs) and bool(self.runs)


def _run_ok(run: RunResult) -> bool:
    return run.check.ok and run.server_dropped_members == 0 and run.server_exit_code in (0, None)


def median(runs: Sequence[RunResult]) -> RunResult:
    """The median of every figure over `runs`; delivery checks are added up, so one bad run shows."""
    first = runs[0]
    values: dict[str, Any] = {}  # one value per field, of that field's type
    for item in dataclasses.fields(RunResult):
        column = [getattr(run, item.name) for run in runs]
        if item.name == "check":
            check = Check()
            for run in runs:
                check.add(run.check)
            check.members = first.check.members
            values[item.name] = check
        elif item.name == "server_exit_code":
            values[item.name] = next((code for code in column if code != 0), 0)
        elif all(isinstance(value, float) for value in column):
            values[item.name] = statistics.median(column)
        elif item.name == "server_dropped_members":
            values[item.name] = max(column)
        elif all(isinstance(value, int) for value in column) and item.name.startswith(("rss", "deliveries")):
            values[item.name] = round(statistics.median(column))
        else:
            values[item.name] = column[0]
    return dataclasses.replace(first, **values)


def bottleneck(run: RunResult, kind: Kind) -> str:
    """Which side limited the measured phase, judged by whose event loop never waited for work."""
    server = run.server_loop_busy >= BUSY
    generator = run.loadgen_loop_busy >= BUSY
    if kind is Kind.IDLE:
        return "-"
    if server and generator:
        return "both"
    if server:
        return "server"
    if generator:
        return "load generator"
    return "neither (paced)" if kind is Kind.STEADY else "neither (window)"


def explain(run: RunResult, cpus: int) -> str:
    """The evidence behind the verdict, in one line."""
    text = (
        f"server loop busy {run.server_loop_busy:.0%} (waiting for a CPU {run.server_loop_starved:.0%}), "
        f"busiest load-generator loop {run.loadgen_loop_busy:.0%}; CPUs used: server {run.server_cpu_share:.2f}, "
        f"load generator {run.loadgen_cpu_share:.2f} ({run.workers} workers), others {run.other_cpu_share:.2f}, "
        f"of {cpus}"
    )
    if run.sender_lag_ms is not None:
        text += f"; senders fell behind their schedule by up to {run.sender_lag_ms:.1f} ms"
    if run.other_cpu_share > NOISE:
        text += " -- NOISY: other processes competed for the CPUs"
    return text


def _num(value: float | None, digits: int = 2, *, thousands: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if thousands else f"{value:.{digits}f}"


COLUMNS = (
    ("shape", "<", 16),
    ("members", ">", 7),
    ("deliveries", ">", 10),
    ("wall s", ">", 6),
    ("deliv/s", ">", 8),
    ("srv µs/deliv", ">", 12),
    ("srv CPU", ">", 7),
    ("gen CPU", ">", 7),
    ("ev/batch", ">", 8),
    ("p50 ms", ">", 7),
    ("p99 ms", ">", 7),
    ("max ms", ">", 7),
    ("RSS/member", ">", 10),
    ("delivery", "<", 8),
    ("bottleneck", "<", 16),
)


def _row(cells: Sequence[str]) -> str:
    return "  ".join(f"{cell:{align}{width}}" for cell, (_, align, width) in zip(cells, COLUMNS, strict=True)).rstrip()


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """The results table, one row per shape."""
    lines = [_row([name for name, _, _ in COLUMNS]), _row(["-" * width for _, _, width in COLUMNS])]
    for outcome in outcomes:
        run = outcome.median
        if run is None:
            lines.append(_row([outcome.shape.name, *["-"] * 12, "FAILED", "-"]))
            continue
        rss = f"{run.rss_per_member_kib:.1f} KiB" if run.rss_per_member_kib is not None else "-"
        kind = outcome.shape.kind
        lines.append(
            _row(
                [
                    outcome.shape.name,
                    f"{run.members:,}",
                    f"{run.deliveries:,}" if kind is not Kind.IDLE else "-",
                    _num(run.wall_seconds) if kind is not Kind.IDLE else "-",
                    _num(run.deliveries_per_second, thousands=True) if kind is not Kind.IDLE else "-",
                    _num(run.server_us_per_delivery),
                    _num(run.server_cpu_share) if kind is not Kind.IDLE else "-",
                    _num(run.loadgen_cpu_share) if kind is not Kind.IDLE else "-",
                    _num(run.events_per_batch, 1),
                    _num(run.latency_p50_ms),
                    _num(run.latency_p99_ms),
                    _num(run.latency_max_ms, 1),
                    rss,
                    "ok" if outcome.ok else "FAILED",
                    bottleneck(run, kind),
                ]
            )
        )
    return lines


def failures(outcomes: Sequence[Outcome]) -> list[str]:
    """What went wrong, shape by shape, with examples: printed before anything else."""
    lines: list[str] = []
    for outcome in outcomes:
        if outcome.ok:
            continue
        lines.append(f"  {outcome.shape.name}:")
        lines.extend(f"    {error}" for error in outcome.errors)
        for index, run in enumerate(outcome.runs, 1):
            if _run_ok(run):
                continue
            problems = [] if run.check.ok else [run.check.summary()]
            if run.server_dropped_members:
                problems.append(f"the server dropped {run.server_dropped_members} member(s) as too slow")
            if run.server_exit_code not in (0, None):
                problems.append(f"the server exited with code {run.server_exit_code} on SIGTERM")
            lines.append(f"    run {index}: " + "; ".join(problems))
            lines.extend(f"      e.g. {example}" for example in run.check.examples[:5])
    return lines


def warnings(outcomes: Sequence[Outcome]) -> list[str]:
    """Things that make figures suspect without being failures."""
    lines: list[str] = []
    for outcome in outcomes:
        if outcome.same_as is not None:
            continue
        for index, run in enumerate(outcome.runs, 1):
            if run.server_exit_code is None:
                lines.append(f"  {outcome.shape.name} run {index}: the server ignored SIGTERM for 20 s and was killed")
            if run.other_cpu_share > NOISE and outcome.shape.kind is not Kind.IDLE:
                lines.append(
                    f"  {outcome.shape.name} run {index}: other processes used {run.other_cpu_share:.2f} CPUs "
                    "during the measurement; its figures are noisy"
                )
    return lines


def targets(outcomes: Sequence[Outcome]) -> list[str]:
    """Each figure the issue sets a target for, against its floor and goal (informational, never a failure)."""
    lines: list[str] = []
    for outcome in outcomes:
        run = outcome.median
        for figure, floor, goal in TARGETS.get(outcome.shape.name, []):
            value = getattr(run, figure) if run is not None else None
            if value is None:
                continue
            verdict = "meets goal" if value <= goal else "meets floor" if value <= floor else "misses floor"
            lines.append(
                f"  {outcome.shape.name:<14} {figure:<24} {value:>8.2f}   floor <= {floor:<5g} goal <= {goal:<5g} "
                f"{verdict}"
            )
    return lines


def scaling(outcomes: Sequence[Outcome]) -> list[str]:
    """How the cost per delivery grows along the scale series, relative to the smallest shape of each."""
    lines: list[str] = []
    for prefix, label in (("rooms-", "rooms of equal size"), ("members-", "members in one room")):
        series = [o for o in outcomes if o.shape.name.startswith(prefix) and o.median is not None]
        costs = [(o, o.median.server_us_per_delivery) for o in series if o.median is not None]
        known = [(o, cost) for o, cost in costs if cost]
        if len(known) < 2:
            continue
        base = known[0][1]
        assert base is not None
        parts = [f"{o.shape.name} {cost:.2f} µs (x{cost / base:.2f})" for o, cost in known if cost is not None]
        lines.append(f"  {label}: " + ", ".join(parts))
    return lines


def as_json(outcome: Outcome) -> dict[str, object]:
    """One shape's entry in results.json."""
    return {
        "description": outcome.shape.describe(),
        "kind": outcome.shape.kind.value,
        "ok": outcome.ok,
        "same_as": outcome.same_as,
        "errors": outcome.errors,
        "bottleneck": bottleneck(outcome.median, outcome.shape.kind) if outcome.median else None,
        "median": dataclasses.asdict(outcome.median) if outcome.median else None,
        "runs": [dataclasses.asdict(run) for run in outcome.runs],
    }
