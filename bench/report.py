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

# Goals (issue #13): the chat server's CPU per delivery within this factor of its bare floor in every shape, and an
# idle member's memory at most 32 KB.
RATIO_GOAL = 1.2
IDLE_GOAL_KIB = 32_000 / 1024


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
    return run.check.ok and run.server_exit_code in (0, None)


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
        elif column and all(isinstance(value, float) for value in column):
            values[item.name] = statistics.median(column)
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
    ("deliv/s", ">", 8),
    ("srv µs/deliv", ">", 12),
    ("floor µs", ">", 8),
    ("x floor", ">", 7),
    ("ev/batch", ">", 8),
    ("srv CPU", ">", 7),
    ("gen CPU", ">", 7),
    ("p50 ms", ">", 7),
    ("p99 ms", ">", 7),
    ("RSS/member", ">", 10),
    ("floor RSS", ">", 9),
    ("delivery", "<", 8),
    ("bottleneck", "<", 16),
)


def ratio(run: RunResult) -> float | None:
    """The chat server's cost over its bare floor: CPU per delivery, or memory per member for idle shapes."""
    pairs = (
        (run.server_us_per_delivery, run.floor_us_per_delivery),
        (run.rss_per_member_kib, run.floor_rss_per_member_kib),
    )
    for value, floor in pairs:
        if value is not None and floor:
            return value / floor
    return None


def _row(cells: Sequence[str]) -> str:
    return "  ".join(f"{cell:{align}{width}}" for cell, (_, align, width) in zip(cells, COLUMNS, strict=True)).rstrip()


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """The results table, one row per shape."""
    lines = [_row([name for name, _, _ in COLUMNS]), _row(["-" * width for _, _, width in COLUMNS])]
    for outcome in outcomes:
        run = outcome.median
        if run is None:
            lines.append(_row([outcome.shape.name, *["-"] * 13, "FAILED", "-"]))
            continue
        kind = outcome.shape.kind
        busy = kind is not Kind.IDLE
        lines.append(
            _row(
                [
                    outcome.shape.name,
                    f"{run.members:,}",
                    f"{run.deliveries:,}" if busy else "-",
                    _num(run.deliveries_per_second, thousands=True) if busy else "-",
                    _num(run.server_us_per_delivery),
                    _num(run.floor_us_per_delivery),
                    _num(ratio(run)),
                    _num(run.events_per_batch, 1),
                    _num(run.server_cpu_share) if busy else "-",
                    _num(run.loadgen_cpu_share) if busy else "-",
                    _num(run.latency_p50_ms),
                    _num(run.latency_p99_ms),
                    _num(run.rss_per_member_kib, 1),
                    _num(run.floor_rss_per_member_kib, 1),
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


def goals(outcomes: Sequence[Outcome]) -> list[str]:
    """Each shape against the goals: cost within 1.2x its floor, idle memory within 32 KB (never a failure)."""
    lines: list[str] = []
    for outcome in outcomes:
        run = outcome.median
        if run is None or outcome.same_as is not None:
            continue
        found = ratio(run)
        if found is not None:
            verdict = "meets" if found <= RATIO_GOAL else "misses"
            lines.append(f"  {outcome.shape.name:<16} {found:5.2f} x its floor: {verdict} <= {RATIO_GOAL:g} x")
        if run.rss_per_member_kib is not None:
            kib = run.rss_per_member_kib
            verdict = "meets" if kib <= IDLE_GOAL_KIB else "misses"
            lines.append(f"  {outcome.shape.name:<16} {kib * 1.024:5.1f} KB per idle member: {verdict} <= 32 KB")
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
